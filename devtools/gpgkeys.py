"""Throwaway OpenPGP signing keys for tests and the demo (real gpg, no passphrase)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from updater.run import run


@dataclass(frozen=True)
class SigningKey:
    gnupghome: Path  # holds the secret key
    fingerprint: str
    public_key: Path  # armored export, what agents pin


def _gpg(home: Path, *args: str, input: bytes | None = None) -> str:
    return run(
        ["gpg", "--homedir", str(home), "--batch", "--quiet", *args], input=input, timeout=120
    ).text


def create_key(
    home: Path, uid: str = "updater test <release@localhost>", algo: str = "ed25519"
) -> SigningKey:
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    _gpg(
        home,
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        "--quick-generate-key",
        uid,
        algo,
        "sign",
        "never",
    )
    fingerprint = ""
    for line in _gpg(home, "--with-colons", "--list-secret-keys", uid).splitlines():
        fields = line.split(":")
        if fields[0] == "fpr":
            fingerprint = fields[9]
            break
    if not fingerprint:
        raise RuntimeError(f"no key for {uid} in {home}")
    public = home / f"{fingerprint}.pub.asc"
    public.write_text(_gpg(home, "--armor", "--export", fingerprint))
    return SigningKey(home, fingerprint, public)


def kill_agents(home: Path) -> None:
    run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, timeout=30)


@contextlib.contextmanager
def signing_key(home: Path, uid: str = "updater test <release@localhost>") -> Iterator[SigningKey]:
    try:
        yield create_key(home, uid)
    finally:
        kill_agents(home)
