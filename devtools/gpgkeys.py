"""Throwaway OpenPGP signing keys for tests and the demo (real gpg, no passphrase)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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


def _at(when: datetime | None) -> tuple[str, ...]:
    """gpg's clock frozen at ``when`` (offline: gpg only reads it differently)."""
    if when is None:
        return ()
    return ("--faked-system-time", when.astimezone(UTC).strftime("%Y%m%dT%H%M%S") + "!")


def create_key(
    home: Path,
    uid: str = "updater test <release@localhost>",
    algo: str = "ed25519",
    *,
    expire: str = "never",
    created: datetime | None = None,
) -> SigningKey:
    """A key without passphrase; ``expire`` as gpg reads it (``1d``), made at ``created``."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    _gpg(
        home,
        *_at(created),
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        "--quick-generate-key",
        uid,
        algo,
        "sign",
        expire,
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


def revoke(key: SigningKey) -> SigningKey:
    """Revoke ``key`` with the certificate gpg made along with it; the public key
    file of the result carries the revocation (what a publisher would publish)."""
    cert = key.gnupghome / "openpgp-revocs.d" / f"{key.fingerprint}.rev"
    # gpg prefixes the armor with ":" so that the certificate is not imported by accident
    _gpg(key.gnupghome, "--import", input=cert.read_bytes().replace(b":-----BEGIN", b"-----BEGIN"))
    public = key.gnupghome / f"{key.fingerprint}.revoked.pub.asc"
    public.write_text(_gpg(key.gnupghome, "--armor", "--export", key.fingerprint))
    return replace(key, public_key=public)


def sign_at(
    key: SigningKey, data: Path, out: Path, *, when: datetime, expire: str | None = None
) -> bytes:
    """An armored detached signature made at ``when``, expiring after ``expire`` (``1d``)."""
    out.unlink(missing_ok=True)
    _gpg(
        key.gnupghome,
        *_at(when),
        *(("--default-sig-expire", expire) if expire else ()),
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
        "--local-user",
        key.fingerprint,
        "--armor",
        "--output",
        str(out),
        "--detach-sign",
        str(data),
    )
    return out.read_bytes()


def ceremony_home(home: Path, *keys: SigningKey) -> Path:
    """One GNUPGHOME holding the secret keys of ``keys`` (a key ceremony signs with several);
    kill its agent with :func:`kill_agents` afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    for key in keys:
        secret = run(
            [
                "gpg",
                "--homedir",
                str(key.gnupghome),
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--armor",
                "--export-secret-keys",
                key.fingerprint,
            ],
            timeout=120,
        ).stdout
        _gpg(home, "--import", input=secret)
    return home


def kill_agents(home: Path) -> None:
    run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, timeout=30)


@contextlib.contextmanager
def signing_key(home: Path, uid: str = "updater test <release@localhost>") -> Iterator[SigningKey]:
    try:
        yield create_key(home, uid)
    finally:
        kill_agents(home)
