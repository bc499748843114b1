"""The python-gnupg adapter with real keys, signatures and a private GNUPGHOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import updater.gpg
from devtools.gpgkeys import SigningKey
from updater.errors import VerificationError
from updater.gpg import GnupgVerifier, sign_detached
from updater.run import run


def signed(tmp_path: Path, key: SigningKey, data: bytes) -> bytes:
    src = tmp_path / "doc"
    src.write_bytes(data)
    sign_detached(src, tmp_path / "doc.asc", gnupghome=key.gnupghome, key_id=key.fingerprint)
    return (tmp_path / "doc.asc").read_bytes()


def test_valid_signature(tmp_path: Path, release_key: SigningKey) -> None:
    sig = signed(tmp_path, release_key, b"hello")
    assert sig.startswith(b"-----BEGIN PGP SIGNATURE-----")
    verdict = GnupgVerifier([release_key.public_key]).verify(b"hello", sig)
    assert verdict.valid
    assert verdict.fingerprint == release_key.fingerprint
    assert verdict.keyring == frozenset({release_key.fingerprint})


def test_tampered_data(tmp_path: Path, release_key: SigningKey) -> None:
    sig = signed(tmp_path, release_key, b"hello")
    verdict = GnupgVerifier([release_key.public_key]).verify(b"hellO", sig)
    assert not verdict.valid


def test_other_key(tmp_path: Path, release_key: SigningKey, rogue_key: SigningKey) -> None:
    sig = signed(tmp_path, rogue_key, b"hello")
    verdict = GnupgVerifier([release_key.public_key]).verify(b"hello", sig)
    assert not verdict.valid  # gpg has no public key for it in the private home


def test_several_keys_any_may_sign(
    tmp_path: Path, release_key: SigningKey, rogue_key: SigningKey
) -> None:
    sig = signed(tmp_path, rogue_key, b"hello")
    verifier = GnupgVerifier([release_key.public_key, rogue_key.public_key])
    verdict = verifier.verify(b"hello", sig)
    assert verdict.valid and verdict.fingerprint == rogue_key.fingerprint
    assert len(verdict.keyring) == 2


def test_garbage_signature(release_key: SigningKey) -> None:
    verdict = GnupgVerifier([release_key.public_key]).verify(b"hello", b"not a signature")
    assert not verdict.valid


@pytest.mark.parametrize("case", ["none", "missing", "empty", "garbage"])
def test_no_keyring_is_an_error(tmp_path: Path, release_key: SigningKey, case: str) -> None:
    sig = signed(tmp_path, release_key, b"hello")
    path = tmp_path / "keys.asc"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(300))
    keyring = [] if case == "none" else [path]
    with pytest.raises(VerificationError) as err:
        GnupgVerifier(keyring).verify(b"hello", sig)
    assert err.value.kind == "no_keyring"


def test_private_home_is_removed(
    tmp_path: Path, release_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is left behind, and the user's own keyring is never consulted."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    sig = signed(tmp_path, release_key, b"hello")
    GnupgVerifier([release_key.public_key]).verify(b"hello", sig)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_no_gpg_agent_is_started(
    tmp_path: Path, release_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check killed by SIGKILL skips its cleanup: nothing may be left running then."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sig = signed(tmp_path, release_key, b"hello")
    skipped: list[list[str]] = []
    monkeypatch.setattr(updater.gpg, "run", lambda argv, **kw: skipped.append(list(argv)))
    GnupgVerifier([release_key.public_key]).verify(b"hello", sig)
    assert skipped and skipped[0][0] == "gpgconf"  # the cleanup that a kill would skip
    agents = run(["pgrep", "-f", f"gpg-agent --homedir {tmp_path}/updater-gpg-"], check=False)
    assert agents.returncode == 1, f"a gpg-agent was started: {agents.text}"


def test_sign_with_unknown_key_fails(tmp_path: Path, release_key: SigningKey) -> None:
    src = tmp_path / "doc"
    src.write_bytes(b"x")
    with pytest.raises(VerificationError):
        sign_detached(src, tmp_path / "doc.asc", gnupghome=release_key.gnupghome, key_id="0" * 40)
