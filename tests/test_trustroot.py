"""The trust root rules, pure (updater/trustroot.py), gpg's per-signature verdicts
(updater.gpg.explain_signers): tables, no gpg run; and the host's record of its root."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from updater.errors import VerificationError
from updater.gpg import explain_signers, is_key
from updater.trustchain import TrustFile
from updater.trustroot import (
    Root,
    RootKey,
    Signer,
    Trusted,
    accept_next,
    adopt,
    check_expiry,
    parse_root,
    serialize_root,
)

T0 = datetime(2026, 12, 6, tzinfo=UTC)
PUB = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxx\n-----END PGP PUBLIC KEY BLOCK-----\n"
A, B, C, D = ("A" * 40, "B" * 40, "C" * 40, "D" * 40)


def root(version: int, threshold: int, *fprs: str) -> Root:
    return Root(version, threshold, tuple(RootKey(f, PUB) for f in fprs), T0 + timedelta(days=30))


def signed(*fprs: str, bad: tuple[str, ...] = ()) -> tuple[Signer, ...]:
    return tuple(Signer(f, True) for f in fprs) + tuple(Signer(f, False) for f in bad)


ACCEPT_CASES = [
    # (trusted, candidate, signers, kind or None)
    (root(1, 1, A), root(2, 1, A), signed(A), None),
    (root(1, 1, A), root(2, 1, A, B), signed(A, B), None),
    (root(1, 1, A), root(2, 1, B), signed(A, B), None),  # A hands over to B
    (root(1, 1, A), root(2, 1, B), signed(B), "root_signature"),  # A did not sign
    (root(1, 1, A), root(2, 1, B), signed(A), "root_signature"),  # B did not sign
    (root(1, 2, A, B), root(2, 1, A), signed(A), "root_signature"),  # 1 of 2 old
    (root(1, 2, A, B), root(2, 1, A), signed(A, B), None),
    (root(1, 2, A, B), root(2, 1, A), signed(A, bad=(B,)), "root_signature"),  # B's is bad
    (root(1, 1, A), root(2, 2, A, B), signed(A), "root_signature"),  # 1 of 2 new
    (root(1, 1, A), root(2, 1, A), signed(C, D), "root_signature"),  # strangers
    (root(1, 1, A), root(2, 1, A), signed(A, A), None),
    (root(3, 1, A), root(2, 1, A), signed(A), "root_rollback"),  # replayed
    (root(3, 1, A), root(3, 1, A), signed(A), "root_rollback"),  # the same again
    (root(1, 1, A), root(3, 1, A), signed(A), "root_chain_broken"),  # skipped 2
]


@pytest.mark.parametrize(("trusted", "candidate", "signers", "kind"), ACCEPT_CASES)
def test_accept_next(
    trusted: Root, candidate: Root, signers: tuple[Signer, ...], kind: str | None
) -> None:
    if kind is None:
        assert accept_next(Trusted(trusted), candidate, signers).root == candidate
    else:
        with pytest.raises(VerificationError) as err:
            accept_next(Trusted(trusted), candidate, signers)
        assert err.value.kind == kind and err.value.hint


def test_retired_keys_accumulate_and_a_readded_key_is_trusted_again() -> None:
    t = accept_next(Trusted(root(1, 1, A, B)), root(2, 1, B), signed(A, B))
    assert t.retired == {A}
    t = accept_next(t, root(3, 1, C), signed(B, C))
    assert t.retired == {A, B}
    t = accept_next(t, root(4, 1, A, C), signed(A, C))
    assert t.retired == {B}


def test_adopt_keeps_the_floor() -> None:
    shipped = root(2, 1, A)
    assert adopt(None, shipped) == Trusted(shipped)
    floor = Trusted(root(5, 1, C), frozenset({A}))
    assert adopt(floor, shipped) is floor  # an older image's root does not lower it
    newer = root(7, 1, D)
    assert adopt(floor, newer) == Trusted(newer, frozenset({A, C}))


def test_expiry() -> None:
    r = root(1, 1, A)
    check_expiry(r, T0)
    assert r.expires is not None
    with pytest.raises(VerificationError) as err:
        check_expiry(r, r.expires)
    assert err.value.kind == "root_expired"
    check_expiry(Root(0, 1, (RootKey(A, ""),), None), T0 + timedelta(days=10_000))  # root 0


GOOD = json.loads(serialize_root(root(3, 2, A, B)))
MALFORMED = [
    ("schema", 2),
    ("type", "root"),
    ("version", 0),
    ("version", True),
    ("version", 2**31),
    ("expires", "tomorrow"),
    ("expires", "2027-01-01T00:00:00"),  # no time zone
    ("threshold", 0),
    ("threshold", 3),
    ("keys", []),
    ("keys", [{"fingerprint": A, "public_key": PUB}] * 2),  # twice
    ("keys", [{"fingerprint": A.lower(), "public_key": PUB}]),
    ("keys", [{"fingerprint": A[:39], "public_key": PUB}]),
    ("keys", [{"fingerprint": A, "public_key": "not armored"}]),
    ("keys", [{"fingerprint": A, "public_key": PUB + "x" * 20_000}]),
    ("keys", [{"fingerprint": f"{i:040X}", "public_key": PUB} for i in range(33)]),
    ("keys", ["A"]),
]


@pytest.mark.parametrize(("field", "value"), MALFORMED)
def test_malformed_roots(field: str, value: object) -> None:
    doc = dict(GOOD, **{field: value})
    with pytest.raises(VerificationError) as err:
        parse_root(json.dumps(doc).encode())
    assert err.value.kind == "root_malformed"


def test_root_round_trip_and_caps() -> None:
    r = root(3, 2, A, B)
    assert parse_root(serialize_root(r)) == r
    with pytest.raises(VerificationError):
        parse_root(b"{" + b" " * (256 * 1024) + b"}")
    with pytest.raises(VerificationError):
        parse_root(b'{"schema": NaN}')


# gpg 2.2's status lines for one file with two signatures: A good, B's key unknown
FA = "DC7FCE5844AF771B66375F3727FEAECD32B86F12"
FB = "764528D3D3932741D996C8A209CFC4F6EF7F8A9F"
TWO = [
    "[GNUPG:] NEWSIG",
    f"[GNUPG:] KEY_CONSIDERED {FA} 0",
    "[GNUPG:] GOODSIG 27FEAECD32B86F12 a <a@x>",
    f"[GNUPG:] VALIDSIG {FA} 2026-12-06 1796585783 0 4 0 22 8 00 {FA}",
    "[GNUPG:] TRUST_UNDEFINED 0 pgp",
    "[GNUPG:] NEWSIG",
    f"[GNUPG:] ERRSIG 09CFC4F6EF7F8A9F 22 8 00 1796585783 9 {FB}",
    "[GNUPG:] NO_PUBKEY 09CFC4F6EF7F8A9F",
]


def test_explain_signers() -> None:
    assert explain_signers(TWO) == (Signer(FA, True), Signer(FB, False))
    revoked = [
        "[GNUPG:] NEWSIG",
        "[GNUPG:] REVKEYSIG 27FEAECD32B86F12 a <a@x>",
        f"[GNUPG:] VALIDSIG {FA} 2026-12-06 1796585783 0 4 0 22 8 00 {FA}",
    ]
    assert explain_signers(revoked) == (Signer(FA, False),)
    bad = ["[GNUPG:] NEWSIG", "[GNUPG:] BADSIG 27FEAECD32B86F12 a <a@x>"]
    assert explain_signers(bad) == (Signer("27FEAECD32B86F12", False),)
    assert explain_signers(["[GNUPG:] NODATA 1"]) == ()
    assert explain_signers([]) == ()


def test_is_key() -> None:
    assert is_key(FB, "09CFC4F6EF7F8A9F") and is_key(FB, FB)
    assert not is_key(FB, "") and not is_key(FB, "8A9F") and not is_key(FA, "09CFC4F6EF7F8A9F")


def test_the_recorded_floor_never_goes_down(tmp_path: Path) -> None:
    """Two walks at once (the agent, `updatectl check`): the slower, older one does not
    overwrite the newer root."""
    store = TrustFile(tmp_path / "state")
    r3, r2 = root(3, 1, B), root(2, 1, A)
    store.save(Trusted(r3, frozenset({A})), serialize_root(r3))
    store.save(Trusted(r2), serialize_root(r2))
    assert store.load() == Trusted(r3, frozenset({A}))
    (tmp_path / "state" / "trust-root.json").write_text("{not json")
    assert store.load() is None  # set aside, never trusted
    assert any(p.name.startswith("trust-root.json.corrupt-") for p in store.path.parent.iterdir())
