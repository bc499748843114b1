"""Deciding whether a signed manifest may be installed. Pure: no I/O.

The order matters (python-tuf's lesson): the size of the untrusted bytes is
capped first, the signature is checked over the exact bytes next, and only
then is any field of the manifest read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from updater import versions
from updater.errors import VerificationError
from updater.manifest import MAX_MANIFEST_BYTES, Manifest, parse
from updater.trustroot import Signer


@dataclass(frozen=True)
class SignatureVerdict:
    """What the OpenPGP layer found; produced by the gpg adapter."""

    valid: bool  # cryptographically good, by a key that is in ``keyring``
    fingerprint: str | None  # primary key fingerprint of the signer, upper-case hex
    detail: str  # what gpg said, for messages
    keyring: frozenset[str]  # fingerprints of every configured key
    reason: str = "good"  # bounded: good, bad_signature, key_revoked, key_expired,
    # signature_expired, unknown_key, check_error, no_signature, no_answer,
    # key_retired (by a key a rotation removed), below_threshold (too few trusted signers)
    good: frozenset[str] = frozenset()  # trusted keys with a good signature
    threshold: int = 1  # how many distinct trusted keys must have signed
    signers: tuple[Signer, ...] = ()  # every signature in the file


# What to do about each reason a signature is not good.
_HINTS = {
    "bad_signature": "the manifest or its signature was altered, or they do not belong together",
    "key_revoked": "the publisher revoked this key: it must re-sign with a current key, "
    "and [source] keyring must hold that key",
    "key_expired": "the publisher must extend the key's expiry (and republish its public key) "
    "or re-sign with a current key",
    "signature_expired": "the publisher must sign the release again",
    "unknown_key": "the signing key is not in [source] keyring: pin the publisher's key, "
    "or the release is not from your publisher",
    "no_signature": "release.json.asc must be an armored detached OpenPGP signature",
    "key_retired": "a key rotation removed this key (revoked: leaked or retired); a release "
    "signed by it now is not from your publisher, or the publisher must sign with the keys of "
    "the newest root (updatectl status shows them)",
    "below_threshold": "the trust root requires more signers: publish with one --key per "
    "signing key (updatectl release --key A --key B)",
}
# Reasons that are their own kind of error (the rest are signature_invalid).
_KINDS = {"key_retired": "key_rotated_out", "below_threshold": "signature_threshold"}


@dataclass(frozen=True)
class Expectations:
    """What this host requires of a release, gathered by the caller."""

    channel: str
    booted_version: str | None  # None: unknown (first install)
    highest_accepted: str | None  # highest version this host ever accepted
    slot_size: int  # bytes
    now: datetime
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    # the one version an admin allowed below the floor (`updatectl channel --allow-downgrade`)
    allow_below: str | None = None


def check_size(data: bytes, limit: int = MAX_MANIFEST_BYTES) -> None:
    if len(data) > limit:
        raise VerificationError(
            "manifest_too_large", f"manifest is {len(data)} bytes, the limit is {limit}"
        )


def verify_manifest(
    data: bytes, signature: bytes | None, verdict: SignatureVerdict | None, exp: Expectations
) -> Manifest:
    """Return the manifest if every rule holds, else raise VerificationError.

    ``verdict`` is None when there was no signature to check.
    """
    check_size(data, exp.max_manifest_bytes)
    if signature is None or verdict is None:
        raise VerificationError(
            "signature_missing", "the manifest has no signature (release.json.asc)"
        )
    if not verdict.keyring:
        raise VerificationError(
            "no_keyring",
            "no trusted signing key is configured",
            hint="set [source] keyring to the release public key file(s), or [source] trust_root",
        )
    if not verdict.valid:
        raise VerificationError(
            _KINDS.get(verdict.reason, "signature_invalid"),
            f"the manifest signature is not valid: {verdict.detail}",
            hint=_HINTS.get(verdict.reason),
        )
    if verdict.fingerprint is None or verdict.fingerprint.upper() not in verdict.keyring:
        raise VerificationError(
            "signature_invalid",
            f"the manifest is signed by {verdict.fingerprint}, which is not a trusted key",
        )

    manifest = parse(data, exp.max_manifest_bytes)

    if manifest.expires <= exp.now:
        raise VerificationError(
            "expired",
            f"the manifest expired at {manifest.expires.isoformat()}",
            hint="the server serves a stale release (freeze attack?) or the clock is wrong",
        )
    if manifest.channel != exp.channel:
        raise VerificationError(
            "channel_mismatch",
            f"the manifest is for channel {manifest.channel!r}, this host follows {exp.channel!r}",
        )
    below_allowed = exp.allow_below is not None and manifest.version == exp.allow_below
    if (
        not below_allowed
        and exp.booted_version is not None
        and versions.compare(manifest.version, exp.booted_version) < 0
    ):
        raise VerificationError(
            "older_than_booted",
            f"the manifest offers {manifest.version}, older than the booted {exp.booted_version}",
        )
    if (
        not below_allowed
        and exp.highest_accepted is not None
        and versions.compare(manifest.version, exp.highest_accepted) < 0
    ):
        raise VerificationError(
            "below_highest_accepted",
            f"the manifest offers {manifest.version}, this host already accepted "
            f"{exp.highest_accepted}",
            hint="a replayed older release (rollback attack?)",
        )
    if manifest.image.raw_size > exp.slot_size:
        raise VerificationError(
            "image_too_large",
            f"the image is {manifest.image.raw_size} bytes, the slot holds {exp.slot_size}",
        )
    return manifest


def is_newer(manifest: Manifest, booted_version: str | None) -> bool:
    """An update exists when the verified manifest is newer than what is booted."""
    return booted_version is None or versions.compare(manifest.version, booted_version) > 0
