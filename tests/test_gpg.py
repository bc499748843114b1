"""The python-gnupg adapter with real keys, signatures and a private GNUPGHOME."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import updater.gpg
from devtools.gpgkeys import SigningKey, create_key, kill_agents, revoke, sign_at, signing_key
from updater.errors import VerificationError
from updater.gpg import GnupgVerifier, explain_status, sign_detached
from updater.run import run
from updater.verify import Expectations, SignatureVerdict, verify_manifest


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


# ---- why a signature is refused, from gpg's own status lines ----------------------------------

NOW = datetime.now(UTC)
DAYS_AGO = NOW - timedelta(days=3)


def _refusal(verdict: SignatureVerdict) -> VerificationError:
    exp = Expectations("stable", None, None, 1 << 30, NOW)
    with pytest.raises(VerificationError) as err:
        verify_manifest(b"{}", b"sig", verdict, exp)
    assert err.value.kind == "signature_invalid"
    # python-gnupg's .status was the last line it saw: "signature valid" after REVKEYSIG
    assert "signature valid" not in err.value.message
    return err.value


@pytest.fixture
def fresh_key(tmp_path: Path) -> Iterator[SigningKey]:
    """A key of this test only (revoking the session's key would spoil other tests)."""
    with signing_key(tmp_path / "fresh", "fresh <fresh@localhost>") as key:
        yield key


def test_revoked_key_is_refused_and_says_so(tmp_path: Path, fresh_key: SigningKey) -> None:
    sig = signed(tmp_path, fresh_key, b"hello")  # signed before the revocation
    revoked = revoke(fresh_key)
    verdict = GnupgVerifier([revoked.public_key]).verify(b"hello", sig)
    assert not verdict.valid
    assert verdict.reason == "key_revoked"
    assert fresh_key.fingerprint.endswith(verdict.detail.split()[3])  # made by key <keyid>
    err = _refusal(verdict)
    assert "revoked" in err.message and err.hint is not None and "re-sign" in err.hint


def test_expired_key_is_refused_and_says_so(tmp_path: Path) -> None:
    key = create_key(tmp_path / "old", "old <old@localhost>", expire="1d", created=DAYS_AGO)
    try:
        (tmp_path / "doc").write_bytes(b"hello")
        sig = sign_at(key, tmp_path / "doc", tmp_path / "doc.asc", when=DAYS_AGO)
        verdict = GnupgVerifier([key.public_key]).verify(b"hello", sig)
    finally:
        kill_agents(key.gnupghome)
    assert (verdict.valid, verdict.reason) == (False, "key_expired")
    assert "has expired" in _refusal(verdict).message


def test_expired_signature_is_refused_and_says_so(tmp_path: Path) -> None:
    key = create_key(tmp_path / "old", "old <old@localhost>", created=DAYS_AGO)
    try:
        (tmp_path / "doc").write_bytes(b"hello")
        sig = sign_at(key, tmp_path / "doc", tmp_path / "doc.asc", when=DAYS_AGO, expire="1d")
        verdict = GnupgVerifier([key.public_key]).verify(b"hello", sig)
    finally:
        kill_agents(key.gnupghome)
    assert (verdict.valid, verdict.reason) == (False, "signature_expired")
    assert "signature by key" in verdict.detail and "has expired" in verdict.detail
    _refusal(verdict)


def test_unknown_key_bad_signature_and_garbage_say_so(
    tmp_path: Path, release_key: SigningKey, rogue_key: SigningKey
) -> None:
    verifier = GnupgVerifier([release_key.public_key])
    unknown = verifier.verify(b"hello", signed(tmp_path, rogue_key, b"hello"))
    assert unknown.reason == "unknown_key"
    assert rogue_key.fingerprint.endswith(unknown.detail.split()[3].rstrip(","))
    assert "not in the keyring" in _refusal(unknown).message
    bad = verifier.verify(b"hellO", signed(tmp_path, release_key, b"hello"))
    assert bad.reason == "bad_signature" and "bad signature" in _refusal(bad).message
    garbage = verifier.verify(b"hello", b"not a signature")
    assert garbage.reason == "no_signature"
    assert "no OpenPGP signature" in _refusal(garbage).message
    good = verifier.verify(b"hello", signed(tmp_path, release_key, b"hello"))
    assert (good.valid, good.reason) == (True, "good")
    assert good.detail.startswith("good signature by key")


# The status lines gpg 2.2 wrote for these cases (a table for the pure reader).
FPR = "ABAF1AD2FC1B0C626558F78849E655712E8DCF42"
STATUS_CASES = [
    (
        [
            "[GNUPG:] NEWSIG",
            "[GNUPG:] SIG_ID x 2026-12-06 1796523493",
            "[GNUPG:] REVKEYSIG 49E655712E8DCF42 updater test <release@localhost>",
            f"[GNUPG:] VALIDSIG {FPR} 2026-12-06 1796523493 0 4 0 22 8 00 {FPR}",
            "[GNUPG:] KEYREVOKED",
        ],
        "key_revoked",
        "made by key 49E655712E8DCF42 (updater test <release@localhost>), which is revoked",
    ),
    (
        [
            "[GNUPG:] KEYEXPIRED 1796350693",
            "[GNUPG:] EXPKEYSIG C5A1FD354BE11E98 exp <e@l>",
            f"[GNUPG:] VALIDSIG {FPR} 2026-12-03 1796264293 0 4 0 22 8 00 {FPR}",
        ],
        "key_expired",
        "made by key C5A1FD354BE11E98 (exp <e@l>), which has expired",
    ),
    (
        ["[GNUPG:] EXPSIG DCFFFDD71B0BA8E0 sx <s@l>", f"[GNUPG:] VALIDSIG {FPR} x"],
        "signature_expired",
        "the signature by key DCFFFDD71B0BA8E0 (sx <s@l>) has expired",
    ),
    (
        [
            f"[GNUPG:] ERRSIG B33BE0C04BBA4FC1 22 8 00 1796523503 9 {FPR}",
            "[GNUPG:] NO_PUBKEY B33BE0C04BBA4FC1",
        ],
        "unknown_key",
        "made by key B33BE0C04BBA4FC1, which is not in the keyring",
    ),
    (
        ["[GNUPG:] ERRSIG B33BE0C04BBA4FC1 99 8 00 1796523503 4"],
        "check_error",
        "gpg could not check the signature by key B33BE0C04BBA4FC1 (error code 4)",
    ),
    (
        ["[GNUPG:] BADSIG 49E6 a <b>", "[GNUPG:] FAILURE gpg-exit 33554433"],
        "bad_signature",
        "bad signature by key 49E6 (a <b>): the data or the signature was changed",
    ),
    (["[GNUPG:] NODATA 1", "[GNUPG:] NODATA 2"], "no_signature", "no OpenPGP signature found"),
    # a good signature next to a bad one is not good
    (
        ["[GNUPG:] GOODSIG 49E6 a <b>", "[GNUPG:] NEWSIG", "[GNUPG:] BADSIG 77 c"],
        "bad_signature",
        "bad signature by key 77 (c): the data or the signature was changed",
    ),
    (["[GNUPG:] GOODSIG 49E6 a\x1b[31m <b>"], "good", "good signature by key 49E6 (a?[31m <b>)"),
    (
        ["gpg: some text", "[GNUPG:] ERRSIG"],
        "check_error",
        "gpg could not check the signature by key ? (error code ?)",
    ),
    ([], "no_answer", "gpg reported no signature"),
]


@pytest.mark.parametrize(("lines", "reason", "detail"), STATUS_CASES)
def test_explain_status(lines: list[str], reason: str, detail: str) -> None:
    assert explain_status(lines) == (reason, detail)
