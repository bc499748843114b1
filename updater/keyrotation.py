"""Publisher side of the trust roots: ``updatectl keys rotate`` writes the next root.

The next root is the newest one in ``<repo>/keys/`` (or root 0, the keys that
hosts hold in their keyring, named with ``--key``) with keys added and
removed, a threshold and an expiry; it is signed by every key given (one
signature per key in ``root.<N>.json.asc``). Before anything is written the
result is checked exactly as an agent checks it (:func:`trustroot.accept_next`
with gpg's own verdict), so a root that hosts would refuse is never published.
The signature file is renamed into place before the root it signs.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import gnupg
import structlog

from updater.errors import ConfigError
from updater.fsutil import atomic_write
from updater.gpg import GnupgVerifier, sign_detached
from updater.trustroot import (
    MAX_KEYS,
    Root,
    RootKey,
    Trusted,
    accept_next,
    normalize_fingerprint,
    parse_root,
    serialize_root,
)

log = structlog.get_logger(__name__)

DEFAULT_ROOT_EXPIRY = timedelta(days=365)
_ROOT_NAME = re.compile(r"^root\.([1-9][0-9]{0,9})\.json$")


@dataclass(frozen=True)
class RotateRequest:
    repo: Path
    gnupghome: Path
    sign_with: tuple[str, ...]  # fingerprints of the signing keys (old and new)
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    threshold: int | None = None  # None: the current root's (at most the number of keys)
    expires_in: timedelta = DEFAULT_ROOT_EXPIRY
    passphrase: str | None = None


@dataclass(frozen=True)
class Rotated:
    root: Root
    previous: Root
    path: Path
    signature_path: Path
    signed_by: tuple[str, ...]


def newest_root(keys_dir: Path) -> tuple[Root, bytes] | None:
    """The repository's newest root (the highest ``root.<N>.json``), or None."""
    versions = sorted(
        int(m.group(1)) for p in keys_dir.glob("root.*.json") if (m := _ROOT_NAME.match(p.name))
    )
    if not versions:
        return None
    body = (keys_dir / f"root.{versions[-1]}.json").read_bytes()
    return parse_root(body), body


def _fingerprints(values: tuple[str, ...], option: str) -> tuple[str, ...]:
    out = []
    for v in values:
        fpr = normalize_fingerprint(v)
        if fpr is None:
            raise ConfigError(
                "invalid",
                f"{v!r} is not a full key fingerprint",
                key=option,
                hint="give the 40 hex digits gpg --list-keys --with-colons shows",
            )
        out.append(fpr)
    return tuple(out)


def _export(gpg: gnupg.GPG, fingerprint: str) -> str:
    armored = str(gpg.export_keys(fingerprint, armor=True) or "")
    if "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        raise ConfigError(
            "missing",
            f"key {fingerprint} is not in the GnuPG home",
            key="--gnupghome",
            hint="import the new key's public key there first (gpg --import KEY.asc)",
        )
    return armored


def rotate(req: RotateRequest, now: datetime) -> Rotated:
    keys_dir = req.repo / "keys"
    add = _fingerprints(req.add, "--add")
    remove = _fingerprints(req.remove, "--remove")
    sign_with = _fingerprints(req.sign_with, "--key")
    if not sign_with:
        raise ConfigError("missing", "no signing key given", key="--key")
    if req.expires_in <= timedelta(0):
        raise ConfigError("invalid", "the expiry must lie in the future", key="--expires-days")
    gpg = gnupg.GPG(gnupghome=str(req.gnupghome))
    newest = newest_root(keys_dir) if keys_dir.is_dir() else None
    if newest is None:
        # Root 0 is the hosts' keyring: the keys that sign now are the keys they hold.
        current = Root(0, 1, tuple(RootKey(f, _export(gpg, f)) for f in sign_with), None)
    else:
        current = newest[0]
    unknown = [f for f in remove if f not in current.fingerprints]
    if unknown:
        raise ConfigError(
            "invalid", f"root {current.version} has no key {unknown[0]}", key="--remove"
        )
    keys = [k for k in current.keys if k.fingerprint not in remove]
    for f in add:
        if f not in {k.fingerprint for k in keys}:
            keys.append(RootKey(f, _export(gpg, f)))
    if not 1 <= len(keys) <= MAX_KEYS:
        raise ConfigError("invalid", f"the next root would hold {len(keys)} keys (1 to {MAX_KEYS})")
    threshold = req.threshold if req.threshold is not None else min(current.threshold, len(keys))
    if not 1 <= threshold <= len(keys):
        raise ConfigError(
            "invalid",
            f"threshold {threshold} is not between 1 and the {len(keys)} keys",
            key="--threshold",
        )
    root = Root(current.version + 1, threshold, tuple(keys), now + req.expires_in)
    body = serialize_root(root)
    keys_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".root-", dir=keys_dir))
    try:
        (staging / "root.json").write_bytes(body)
        sign_detached(
            staging / "root.json",
            staging / "root.json.asc",
            gnupghome=req.gnupghome,
            key_id=sign_with,
            passphrase=req.passphrase,
        )
        signature = (staging / "root.json.asc").read_bytes()
        # What every host will check, checked here: never publish a root they refuse.
        verdict = GnupgVerifier(
            keys=[k.public_key.encode() for k in (*current.keys, *root.keys)]
        ).verify(body, signature)
        accept_next(Trusted(current), root, verdict.signers)
        path = keys_dir / f"root.{root.version}.json"
        sig_path = path.with_name(path.name + ".asc")
        atomic_write(sig_path, signature)
        atomic_write(path, body)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "trust_root_published",
        version=root.version,
        threshold=root.threshold,
        keys=sorted(root.fingerprints),
        removed=sorted(current.fingerprints - root.fingerprints),
        signed_by=list(sign_with),
    )
    return Rotated(root, current, path, sig_path, sign_with)
