"""Walking the repository's trust roots: the thin I/O shell around :mod:`updater.trustroot`.

The host starts from the newer of the root shipped in the OS image (``[source]
trust_root``; without one, the keyring of ``[source] keyring`` is root 0) and
the root it accepted before (``<state_dir>/trust-root.json``, the floor: never
lowered). It fetches ``root.<N+1>.json`` and its signatures until the server
has no next root, accepting each by the rules of :func:`trustroot.accept_next`
and persisting it before fetching the next (a crash keeps every step taken).
The newest root must not have expired; its keys, with its threshold, then
verify the manifest.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from updater import jsonutil
from updater.clock import Clock
from updater.errors import DownloadError, StateError, VerificationError
from updater.fsutil import atomic_write
from updater.gpg import GnupgVerifier, SignatureChecker
from updater.transport import Transport
from updater.trustroot import (
    MAX_ROOT_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_WALK,
    Root,
    RootKey,
    Trusted,
    accept_next,
    adopt,
    check_expiry,
    missing,
    normalize_fingerprint,
    parse_root,
)
from updater.verify import SignatureVerdict

log = structlog.get_logger(__name__)

TRUST_FILE = "trust-root.json"
_TRUST_SCHEMA = 1
_MAX_TRUST_FILE_BYTES = 2 * MAX_ROOT_BYTES

RootUrl = Callable[[int], str]
"""Where root ``N`` is published (``<repo>/keys/root.<N>.json``); its signature at ``+ .asc``."""


class _Invalid(Exception):
    pass


class TrustFile:
    """The accepted root and the retired keys, in one file written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / TRUST_FILE

    def load(self) -> Trusted | None:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(_MAX_TRUST_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError("unwritable", f"{self.path}: {exc.strerror}") from None
        try:
            doc = jsonutil.loads(data, _Invalid, max_bytes=_MAX_TRUST_FILE_BYTES)
            if not isinstance(doc, dict) or not isinstance(doc.get("schema"), int):
                raise _Invalid("not a trust file")
            if doc["schema"] > _TRUST_SCHEMA:
                raise StateError(
                    "newer_schema",
                    f"{self.path} has schema {doc['schema']}; this agent reads {_TRUST_SCHEMA}",
                    hint="a newer agent wrote it: boot the newer version again",
                )
            root_text, retired = doc.get("root"), doc.get("retired")
            if not isinstance(root_text, str) or not isinstance(retired, list):
                raise _Invalid("root or retired missing")
            root = parse_root(root_text.encode())
            fprs = [normalize_fingerprint(r) if isinstance(r, str) else None for r in retired]
            if any(f is None for f in fprs):
                raise _Invalid("a retired key is not a fingerprint")
            return Trusted(root, frozenset(f for f in fprs if f is not None))
        except (_Invalid, VerificationError) as exc:
            aside = self.path.with_name(
                f"{TRUST_FILE}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
            )
            try:
                os.replace(self.path, aside)
            except OSError as err:
                raise StateError(
                    "unwritable",
                    f"{self.path} is corrupt ({exc}) and cannot be moved aside: {err.strerror}",
                    hint="move or delete the file; the agent starts again from the shipped root",
                ) from None
            log.error("trust_root_corrupt_set_aside", path=str(self.path), error=str(exc))
            return None

    def save(self, trusted: Trusted, body: bytes) -> None:
        """Record ``trusted`` unless a newer root is recorded already: two walks at once
        (the agent and `updatectl check`) must not lower the floor. Under a lock."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with (self.path.parent / (TRUST_FILE + ".lock")).open("a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                recorded = self.load()
                if recorded is not None and recorded.root.version >= trusted.root.version:
                    return
                self._write(trusted, body)
        except OSError as exc:
            raise StateError(
                "unwritable",
                f"cannot write {self.path}: {exc.strerror}",
                hint="check that [agent] state_dir exists and is writable",
            ) from None

    def _write(self, trusted: Trusted, body: bytes) -> None:
        doc = {
            "schema": _TRUST_SCHEMA,
            "version": trusted.root.version,
            "root": body.decode(),
            "retired": sorted(trusted.retired),
        }
        atomic_write(self.path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)


class TrustChain:
    """The host's trust root: shipped, persisted, and walked forward from the repository."""

    def __init__(
        self,
        *,
        state_dir: Path,
        transport: Transport,
        clock: Clock,
        shipped_root: Path | None = None,
        keyring: tuple[Path, ...] = (),
        gpg_binary: str = "gpg",
    ) -> None:
        self.file = TrustFile(state_dir)
        self._transport = transport
        self._clock = clock
        self._shipped_root = shipped_root
        self._keyring = keyring
        self._gpg_binary = gpg_binary

    # -- where the walk starts

    def shipped(self, *, keys: bool = True) -> tuple[Root, bytes | None]:
        """The root in the OS image and its bytes (None for root 0, the keyring; its
        fingerprints, a gpg run, only with ``keys``)."""
        if self._shipped_root is None:
            fprs = GnupgVerifier(self._keyring, self._gpg_binary).fingerprints() if keys else ()
            return Root(0, 1, tuple(RootKey(f, "") for f in sorted(fprs)), None), None
        try:
            with self._shipped_root.open("rb") as fh:
                body = fh.read(MAX_ROOT_BYTES + 1)
        except OSError as exc:
            raise VerificationError(
                "root_missing",
                f"the trust root {self._shipped_root} cannot be read: {exc.strerror}",
                hint="the OS image must ship its root there ([source] trust_root), "
                "a copy of the repository's keys/root.<N>.json",
            ) from None
        return parse_root(body), body

    def current(self) -> Trusted:
        """What this host trusts now, without asking the repository."""
        return self._start(keys=True)[0]

    def _start(self, *, keys: bool) -> tuple[Trusted, bytes | None]:
        """The trusted root, and its bytes if it is the shipped one and newer than the floor.
        Root 0's fingerprints only with ``keys`` (the manifest check reads the keyring
        itself: one gpg run per check, as without trust roots)."""
        persisted = self.file.load()
        if persisted is not None and self._shipped_root is None:
            return persisted, None  # root 0 (the keyring) is below any persisted root
        shipped, body = self.shipped(keys=keys)
        trusted = adopt(persisted, shipped)
        newer = trusted.root is shipped and body is not None
        return trusted, body if newer else None

    # -- the walk

    def _get(self, url: str, max_bytes: int) -> bytes | None:
        try:
            return self._transport.get(url, max_bytes=max_bytes).body
        except DownloadError as exc:
            if exc.status in (404, 410):
                return None
            if exc.kind == "too_much_data":
                raise VerificationError(
                    "root_malformed", f"{url} is larger than {max_bytes} bytes"
                ) from None
            raise

    def _blobs(self, root: Root) -> list[bytes]:
        if root.version == 0:  # the keyring's files, as GnupgVerifier reads them
            return [p.read_bytes() for p in self._keyring if p.is_file()]
        return [k.public_key.encode() for k in root.keys]

    def walk(self, root_url: RootUrl) -> Trusted:
        """Every newer root the repository publishes, accepted in order; the newest must
        not have expired. Raises VerificationError (nothing persisted past the last good
        root)."""
        trusted, shipped_body = self._start(keys=False)
        if shipped_body is not None:  # the image's root is the new floor
            self.file.save(trusted, shipped_body)
        for _ in range(MAX_WALK):
            n = trusted.root.version + 1
            url = root_url(n)
            body = self._get(url, MAX_ROOT_BYTES)
            if body is None:
                break
            if trusted.root.version == 0 and not trusted.root.keys:
                trusted = Trusted(self.shipped(keys=True)[0])  # root 1 is signed by these
            signature = self._get(url + ".asc", MAX_SIGNATURE_BYTES)
            if signature is None:
                raise VerificationError(
                    "root_signature",
                    f"root.{n}.json has no signature file (root.{n}.json.asc)",
                    hint="publish the root with its signatures (updatectl keys rotate)",
                )
            candidate = parse_root(body)
            verdict = GnupgVerifier(
                keys=[*self._blobs(trusted.root), *self._blobs(candidate)],
                gpg_binary=self._gpg_binary,
            ).verify(body, signature)
            trusted = accept_next(trusted, candidate, verdict.signers)
            self.file.save(trusted, body)
            log.info(
                "trust_root_accepted",
                version=candidate.version,
                threshold=candidate.threshold,
                keys=sorted(candidate.fingerprints),
                retired=sorted(trusted.retired),
            )
        check_expiry(trusted.root, self._clock.now())
        return trusted

    def verifier(self, root_url: RootUrl) -> SignatureChecker:
        """The checker of a manifest: the newest root's keys and threshold (walked first)."""
        trusted = self.walk(root_url)
        root = trusted.root
        if root.version == 0:
            inner = GnupgVerifier(self._keyring, self._gpg_binary, retired=trusted.retired)
        else:
            inner = GnupgVerifier(
                keys=self._blobs(root),
                trusted=root.fingerprints,
                threshold=root.threshold,
                retired=trusted.retired,
                root_version=root.version,
                gpg_binary=self._gpg_binary,
            )
        return _GapAware(inner, lambda: self._get(root_url(root.version + 2), MAX_ROOT_BYTES), root)


class ChainVerifier:
    """The manifest's signature checker with trust roots: each check first walks the
    repository's newer roots (``root_url``: the source's, asked after its fetch)."""

    def __init__(self, chain: TrustChain, root_url: RootUrl) -> None:
        self.chain = chain
        self._root_url = root_url

    def verify(self, data: bytes, signature: bytes) -> SignatureVerdict:
        return self.chain.verifier(self._root_url).verify(data, signature)


class _GapAware:
    """A refused manifest signature, when the repository skips a root, is that gap."""

    def __init__(
        self, inner: SignatureChecker, probe: Callable[[], bytes | None], root: Root
    ) -> None:
        self._inner = inner
        self._probe = probe
        self._root = root

    def verify(self, data: bytes, signature: bytes) -> SignatureVerdict:
        verdict = self._inner.verify(data, signature)
        if not verdict.valid and self._probe() is not None:
            raise missing(self._root.version)
        return verdict
