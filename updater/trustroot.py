"""Signed trust roots (TUF's root rotation): the keys that may sign releases. Pure: no I/O.

A root lists the release keys (fingerprint and armored public key), how many
of them must sign (``threshold``), when it expires and its version ``N``. It
is published as ``<repo>/keys/root.<N>.json`` with a detached signature file
``root.<N>.json.asc`` holding one OpenPGP signature per signing key. Root
``N+1`` is accepted only when a threshold of root ``N``'s keys *and* a
threshold of its own keys signed it, so a host that trusts root ``N`` can walk
to the newest root on its own. The keyring of ``[source] keyring`` is root 0:
threshold 1, no expiry.

The order of the rules (:func:`accept_next`): the bounded parse, the version
(an older root offered as the next one is a replay; a newer one a broken
chain), the previous root's signatures, the new root's own signatures.
Expiry is checked on the newest root only (:func:`check_expiry`): an old root
in the chain may have expired long ago.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from updater import jsonutil
from updater.errors import VerificationError

SCHEMA = 1
TYPE = "updater-root"
MAX_ROOT_BYTES = 256 * 1024  # a root of MAX_KEYS armored RSA-4096 keys fits
MAX_SIGNATURE_BYTES = 64 * 1024  # MAX_KEYS detached signatures, armored
MAX_KEYS = 32
MAX_PUBLIC_KEY_CHARS = 16 * 1024  # one armored key (RSA-4096 with a few user ids: ~3 KiB)
MAX_VERSION = 2**31 - 1
MAX_WALK = 1024  # roots walked in one check: a repository cannot keep a host walking forever
_FPR_RE = re.compile(r"^(?:[0-9A-F]{40}|[0-9A-F]{64})$")  # v4 or v5/v6 fingerprints
_ARMOR = "-----BEGIN PGP PUBLIC KEY BLOCK-----"

CHAIN_HINT = "each root.<N+1>.json must be signed by a threshold of root N's keys and of its own"


@dataclass(frozen=True)
class RootKey:
    fingerprint: str  # primary key fingerprint, upper-case hex
    public_key: str  # armored OpenPGP public key (what gpg imports)


@dataclass(frozen=True)
class Root:
    version: int
    threshold: int
    keys: tuple[RootKey, ...]
    expires: datetime | None  # None: root 0 (the configured keyring), never expires
    schema: int = SCHEMA

    @property
    def fingerprints(self) -> frozenset[str]:
        return frozenset(k.fingerprint for k in self.keys)


@dataclass(frozen=True)
class Signer:
    """One signature of a detached signature file, as gpg judged it."""

    fingerprint: str  # the primary key's fingerprint, or the key id gpg named (upper-case)
    good: bool  # cryptographically good, by a key that is neither revoked nor expired


@dataclass(frozen=True)
class Trusted:
    """What a host trusts: the newest accepted root and every key a rotation removed."""

    root: Root
    retired: frozenset[str] = frozenset()  # fingerprints removed by a rotation, never re-added


def _bad(message: str) -> VerificationError:
    return VerificationError(
        "root_malformed",
        f"trust root: {message}",
        hint="the publisher must fix the root (updatectl keys rotate writes a valid one)",
    )


def _field(obj: dict[str, Any], key: str, typ: type, where: str = "") -> Any:
    return jsonutil.field(obj, key, typ, _bad, where)


def _time(text: str) -> datetime:
    return jsonutil.utc_time(text, "expires", _bad)


def normalize_fingerprint(text: str) -> str | None:
    """``text`` as an upper-case fingerprint (spaces and 0x dropped), or None if it is none."""
    fpr = text.replace(" ", "").upper().removeprefix("0X")
    return fpr if _FPR_RE.match(fpr) else None


def parse_root(data: bytes, max_bytes: int = MAX_ROOT_BYTES) -> Root:
    """Parse a root document; raises VerificationError(root_malformed). Bounded like
    every JSON reader (:mod:`updater.jsonutil`)."""
    obj = jsonutil.loads(data, _bad, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise _bad("top level must be an object")
    schema = _field(obj, "schema", int)
    if schema != SCHEMA:
        raise _bad(f"schema {schema} is not supported (this agent reads schema {SCHEMA})")
    if _field(obj, "type", str) != TYPE:
        raise _bad(f"type must be {TYPE!r}")
    version = _field(obj, "version", int)
    if not 1 <= version <= MAX_VERSION:
        raise _bad(f"version {version} is not between 1 and {MAX_VERSION}")
    expires = _time(_field(obj, "expires", str))
    raw_keys = _field(obj, "keys", list)
    if not 1 <= len(raw_keys) <= MAX_KEYS:
        raise _bad(f"{len(raw_keys)} keys; a root has 1 to {MAX_KEYS}")
    keys: list[RootKey] = []
    for i, raw in enumerate(raw_keys):
        where = f"keys[{i}]."
        if not isinstance(raw, dict):
            raise _bad(f"keys[{i}] must be an object")
        fpr_text = _field(raw, "fingerprint", str, where)
        fpr = normalize_fingerprint(fpr_text)
        if fpr is None or fpr != fpr_text:
            raise _bad(f"{where}fingerprint {fpr_text[:80]!r} is not 40 or 64 upper-case hex")
        public = _field(raw, "public_key", str, where)
        if len(public) > MAX_PUBLIC_KEY_CHARS or not public.lstrip().startswith(_ARMOR):
            raise _bad(f"{where}public_key must be one armored public key block")
        if any(k.fingerprint == fpr for k in keys):
            raise _bad(f"key {fpr} is listed twice")
        keys.append(RootKey(fpr, public))
    threshold = _field(obj, "threshold", int)
    if not 1 <= threshold <= len(keys):
        raise _bad(f"threshold {threshold} is not between 1 and the {len(keys)} keys")
    return Root(version, threshold, tuple(keys), expires, schema)


def serialize_root(root: Root) -> bytes:
    if root.expires is None:
        raise ValueError("root 0 (the keyring) is not published")
    doc = {
        "schema": root.schema,
        "type": TYPE,
        "version": root.version,
        "expires": root.expires.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threshold": root.threshold,
        "keys": [{"fingerprint": k.fingerprint, "public_key": k.public_key} for k in root.keys],
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def good_signers(signers: Iterable[Signer], keys: frozenset[str]) -> frozenset[str]:
    """The distinct keys of ``keys`` with a good signature among ``signers``."""
    return frozenset(s.fingerprint for s in signers if s.good and s.fingerprint in keys)


def _count(signers: tuple[Signer, ...], root: Root, whose: str, candidate: int) -> None:
    good = good_signers(signers, root.fingerprints)
    if len(good) < root.threshold:
        raise VerificationError(
            "root_signature",
            f"root {candidate} carries {len(good)} valid signature(s) by {whose} "
            f"(root {root.version}); it needs {root.threshold}",
            hint=CHAIN_HINT + " (updatectl keys rotate signs with both)",
        )


def accept_next(trusted: Trusted, candidate: Root, signers: tuple[Signer, ...]) -> Trusted:
    """Root ``trusted.root.version + 1``, if ``candidate`` (offered as that root) is it
    and is signed as the chain requires; else VerificationError."""
    current = trusted.root
    expected = current.version + 1
    if candidate.version < expected:
        raise VerificationError(
            "root_rollback",
            f"root.{expected}.json holds root {candidate.version}; this host already trusts "
            f"root {current.version}",
            hint="an older root replayed (rollback attack?) or the repository was rolled back: "
            "republish the newest roots",
        )
    if candidate.version > expected:
        raise VerificationError(
            "root_chain_broken",
            f"root.{expected}.json holds root {candidate.version}",
            hint=CHAIN_HINT + "; the file names must follow the versions",
        )
    _count(signers, current, "the previous root's keys", candidate.version)
    _count(signers, candidate, "its own keys", candidate.version)
    removed = current.fingerprints - candidate.fingerprints
    return Trusted(candidate, (trusted.retired | removed) - candidate.fingerprints)


def adopt(trusted: Trusted | None, shipped: Root) -> Trusted:
    """The starting point: the persisted root (a floor) or the OS image's, the newer."""
    if trusted is None:
        return Trusted(shipped)
    if shipped.version > trusted.root.version:
        removed = trusted.root.fingerprints - shipped.fingerprints
        return Trusted(shipped, (trusted.retired | removed) - shipped.fingerprints)
    return trusted


def check_expiry(root: Root, now: datetime) -> None:
    if root.expires is not None and root.expires <= now:
        raise VerificationError(
            "root_expired",
            f"trust root {root.version} expired at {root.expires.isoformat()}",
            hint="the publisher must publish the next root before the newest expires "
            "(updatectl keys rotate --expires); or the server withholds it (freeze attack?), "
            "or the clock is wrong",
        )


def missing(version: int) -> VerificationError:
    return VerificationError(
        "root_missing",
        f"root.{version + 1}.json is missing while a later root is published",
        hint=CHAIN_HINT + ": publish every root in order, none may be deleted",
    )
