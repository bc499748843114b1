"""The pure verification rules, table-tested (no gpg, no network)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from updater.errors import VerificationError
from updater.manifest import Compression, parse, serialize
from updater.verify import Expectations, SignatureVerdict, is_newer, verify_manifest

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
KEY = "A" * 40
OTHER = "B" * 40
H1, H2 = "1" * 64, "2" * 64


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": 1,
        "channel": "stable",
        "version": "1.1.0",
        "created": "2026-11-27T00:00:00Z",
        "expires": "2026-12-27T00:00:00Z",
        "image": {
            "url": "../images/1.1.0/usr.img.zst",
            "size": 1000,
            "sha256": H1,
            "compression": "zstd",
            "raw_size": 4096,
            "raw_sha256": H2,
        },
    }
    image = over.pop("image", {})
    d.update(over)
    d["image"] = {**d["image"], **image}
    return d


def body(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


GOOD = SignatureVerdict(
    valid=True, fingerprint=KEY, detail="signature valid", keyring=frozenset({KEY})
)
EXP = Expectations(
    channel="stable", booted_version="1.0.0", highest_accepted="1.0.0", slot_size=8192, now=NOW
)


def test_accepts_a_good_release() -> None:
    m = verify_manifest(body(doc()), b"sig", GOOD, EXP)
    assert (m.version, m.channel, m.image.compression) == ("1.1.0", "stable", Compression.ZSTD)
    assert m.expires == datetime(2026, 12, 27, tzinfo=UTC)
    assert is_newer(m, "1.0.0") and not is_newer(m, "1.1.0") and is_newer(m, None)


def test_serialize_round_trips() -> None:
    m = parse(body(doc()))
    assert parse(serialize(m)) == m


@pytest.mark.parametrize(
    ("data", "signature", "verdict", "exp", "kind"),
    [
        # the size cap comes before anything else, even a missing signature
        (b" " * (64 * 1024 + 1), None, None, EXP, "manifest_too_large"),
        (body(doc()), None, None, EXP, "signature_missing"),
        (body(doc()), b"sig", replace(GOOD, keyring=frozenset()), EXP, "no_keyring"),
        (
            body(doc()),
            b"sig",
            replace(GOOD, valid=False, detail="signature bad"),
            EXP,
            "signature_invalid",
        ),
        (body(doc()), b"sig", replace(GOOD, fingerprint=OTHER), EXP, "signature_invalid"),
        (body(doc()), b"sig", replace(GOOD, fingerprint=None), EXP, "signature_invalid"),
        # fields are only read after the signature passed
        (b"{not json", b"sig", replace(GOOD, valid=False), EXP, "signature_invalid"),
        (b"{not json", b"sig", GOOD, EXP, "manifest_malformed"),
        (b"\xff\xfe", b"sig", GOOD, EXP, "manifest_malformed"),
        (b"[]", b"sig", GOOD, EXP, "manifest_malformed"),
        # hostile JSON: nested deeper than the parser's stack, NaN, a 5000-digit int
        (b"[" * 2000, b"sig", GOOD, EXP, "manifest_malformed"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"size": float("nan")})), b"sig", GOOD, EXP, "manifest_malformed"),
        (
            body(doc()).replace(b": 1000,", b": " + b"9" * 5000 + b","),
            b"sig",
            GOOD,
            EXP,
            "manifest_malformed",
        ),
        (body(doc(image={"size": 1e999})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(expires="0001-01-01T00:00:00+01:00")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(schema=2)), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(schema="1")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(version="1.1 beta")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(channel="../x")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(expires="tomorrow")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(expires="2026-12-27T00:00:00")), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"size": 0})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"size": True})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"raw_size": -1})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"sha256": "XYZ"})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"sha256": "A" * 64})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"compression": "lz4"})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"url": ""})), b"sig", GOOD, EXP, "manifest_malformed"),
        (body(doc(image={"compression": "none"})), b"sig", GOOD, EXP, "manifest_malformed"),
        # freshness, channel, versions, sizes
        (body(doc(expires="2026-11-28T12:00:00Z")), b"sig", GOOD, EXP, "expired"),
        (body(doc(expires="2026-11-28T13:59:59+02:00")), b"sig", GOOD, EXP, "expired"),
        (body(doc(channel="beta")), b"sig", GOOD, EXP, "channel_mismatch"),
        (body(doc(version="0.9.9")), b"sig", GOOD, EXP, "older_than_booted"),
        (body(doc(version="1.0.0~rc1")), b"sig", GOOD, EXP, "older_than_booted"),
        (
            body(doc(version="1.1.0")),
            b"sig",
            GOOD,
            replace(EXP, highest_accepted="1.2.0"),
            "below_highest_accepted",
        ),
        (body(doc(image={"raw_size": 8193})), b"sig", GOOD, EXP, "image_too_large"),
    ],
)
def test_refusals(
    data: bytes,
    signature: bytes | None,
    verdict: SignatureVerdict | None,
    exp: Expectations,
    kind: str,
) -> None:
    with pytest.raises(VerificationError) as err:
        verify_manifest(data, signature, verdict, exp)
    assert err.value.kind == kind


@pytest.mark.parametrize(
    ("booted", "highest", "version", "newer"),
    [
        ("1.0.0", "1.0.0", "1.0.0", False),  # up to date: accepted, nothing to do
        ("1.0.0", None, "1.0.1", True),
        (None, None, "0.0.1", True),  # first install: anything signed
        ("1.0.0", "1.2.0", "1.2.0", True),  # the accepted version may be installed again
        ("1.0.0", "1.2.0", "1.3.0", True),
    ],
)
def test_version_rules(booted: str | None, highest: str | None, version: str, newer: bool) -> None:
    exp = replace(EXP, booted_version=booted, highest_accepted=highest)
    m = verify_manifest(body(doc(version=version)), b"sig", GOOD, exp)
    assert is_newer(m, booted) is newer


@pytest.mark.parametrize(
    "over",
    [
        {"channel": "9" * 5000},
        {"version": "x" * 5000},
        {"expires": "y" * 5000},
        {"image": {"compression": "z" * 5000}},
    ],
)
def test_refusal_messages_are_bounded(over: dict[str, Any]) -> None:
    # found by make fuzz: a 5000-character channel was echoed whole
    with pytest.raises(VerificationError) as err:
        verify_manifest(body(doc(**over)), b"sig", GOOD, EXP)
    assert err.value.kind == "manifest_malformed"
    assert len(err.value.message) < 200


def test_unknown_top_level_fields_are_ignored() -> None:
    """A newer publisher may add fields; an older agent still reads the manifest."""
    m = verify_manifest(body(doc(notes="extra", mirrors=["x"])), b"sig", GOOD, EXP)
    assert m.version == "1.1.0"


def test_uncompressed_requires_equal_hashes() -> None:
    d = doc(image={"compression": "none", "size": 4096, "sha256": H2})
    assert parse(body(d)).image.compression is Compression.NONE
