"""The static release repository: ``<repo>/<channel>/release.json`` + ``.asc``.

Polls are conditional (If-None-Match with the ETag of the last answer, the
body kept in a small cache), so an idle fleet costs the server 304s. The
cached bytes are verified again on every check, exactly like fresh ones: the
expiry must be re-evaluated against the clock each time (freeze attack).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urljoin, urlsplit

import structlog

from updater import jsonutil
from updater.errors import DownloadError, UpdaterError, VerificationError, internal_error
from updater.fsutil import atomic_write
from updater.manifest import MAX_MANIFEST_BYTES, BootFileRef, Manifest
from updater.transport import Transport

log = structlog.get_logger(__name__)

MAX_SIGNATURE_BYTES = 16 * 1024


@dataclass(frozen=True)
class ImageClaim:
    """What an update server (Omaha) says of the image; must match the signed manifest."""

    url: str  # where the server says the image is
    size: int
    sha256: str
    version: str | None = None  # the version the server offers


@dataclass(frozen=True)
class SignedDocument:
    url: str
    body: bytes
    signature: bytes | None  # None: the server has no signature file
    claim: ImageClaim | None = None  # an Omaha server's own size/hash/URL
    interval_s: float | None = None  # the server's poll interval, if it gave one


@dataclass(frozen=True)
class NoOffer:
    """The server has nothing newer for this host."""

    interval_s: float | None = None


@dataclass(frozen=True)
class HeldBack:
    """The server holds the update back (its rollout policy); not an error."""

    reason: str
    interval_s: float | None = None


SourceAnswer = SignedDocument | NoOffer | HeldBack

Happened = Literal[
    "download_started",  # the image download begins
    "download_finished",  # every byte arrived and matched
    "staged",  # installed and made the next boot
    "rebooted",  # the first check after booting the new version
    "rolled_back",  # came back on the old slot: the new version failed
    "failed",  # a check or an install failed
    "deferred",  # the server held the update back
]


@dataclass(frozen=True)
class Happening:
    """Something an update server may want to hear of (Omaha's events)."""

    what: Happened
    version: str | None = None
    previous_version: str | None = None
    error: UpdaterError | None = None
    during_check: bool = False


class UpdateSource(Protocol):
    def fetch(self, current_version: str | None) -> SourceAnswer:
        """Ask for the channel's release: a signed manifest, nothing, or a deferral."""
        ...

    def image_url(self, manifest: Manifest) -> str: ...

    def index_url(self, manifest: Manifest) -> str | None:
        """Where the image's chunk index is (delta updates); None: none to use."""
        ...

    def boot_url(self, manifest: Manifest, ref: BootFileRef) -> str:
        """Where one of the manifest's boot files is (its URL is relative to the manifest)."""
        ...

    def root_url(self, version: int) -> str:
        """Where trust root ``version`` is published (``keys/root.<N>.json``); after a fetch."""
        ...

    def report(self, happening: Happening) -> None:
        """Tell the server (best effort: kept and retried, never raises)."""
        ...


def report(source: UpdateSource, happening: Happening) -> None:
    """Tell the update server what happened. Best effort (``UpdateSource.report``
    never raises): a source that breaks that promise is logged, and the check or
    install it reports on goes on."""
    try:
        source.report(happening)
    except Exception as exc:
        log.error(
            "event_report_crashed",
            happened=happening.what,
            version=happening.version,
            error_kind="internal",
            error=internal_error(exc, "report").message,
            exc_info=exc,
        )


# base64 of a manifest (or signature) of at most MAX_MANIFEST_BYTES, and its URL and ETag
_MAX_CACHE_FILE_BYTES = 2 * MAX_MANIFEST_BYTES + 64 * 1024


class HttpCache:
    """ETag + body of small documents, one file per URL, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, url: str) -> Path:
        return self.directory / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".json")

    def get(self, url: str) -> tuple[str, bytes] | None:
        try:
            with self._path(url).open("rb") as fh:
                data = fh.read(_MAX_CACHE_FILE_BYTES + 1)
            doc = jsonutil.loads(
                data, ValueError, max_bytes=_MAX_CACHE_FILE_BYTES, allow_constants=True
            )
            if doc["url"] != url:
                return None
            return str(doc["etag"]), base64.b64decode(doc["body"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, url: str, etag: str | None, body: bytes) -> None:
        path = self._path(url)
        if etag is None:
            path.unlink(missing_ok=True)
            return
        doc = {"url": url, "etag": etag, "body": base64.b64encode(body).decode()}
        atomic_write(path, json.dumps(doc).encode(), mode=0o600)


class SignedFetcher:
    """Fetches a manifest and its detached signature, conditionally (ETag cache)."""

    def __init__(self, transport: Transport, cache: HttpCache | None = None) -> None:
        self._transport = transport
        self._cache = cache

    def _get(self, url: str, max_bytes: int) -> bytes:
        cached = self._cache.get(url) if self._cache else None
        result = self._transport.get(url, max_bytes=max_bytes, etag=cached[0] if cached else None)
        if result.body is None:
            assert cached is not None
            log.debug("not_modified", url=url)
            return cached[1]
        if self._cache is not None:
            self._cache.put(url, result.etag, result.body)
        return result.body

    def fetch(self, manifest_url: str, signature_url: str) -> SignedDocument:
        try:
            body = self._get(manifest_url, MAX_MANIFEST_BYTES)
        except DownloadError as exc:
            if exc.kind == "too_much_data":
                raise VerificationError(
                    "manifest_too_large",
                    f"{manifest_url} is larger than {MAX_MANIFEST_BYTES} bytes",
                ) from None
            raise
        try:
            signature: bytes | None = self._get(signature_url, MAX_SIGNATURE_BYTES)
        except DownloadError as exc:
            if exc.status not in (404, 410):
                raise
            signature = None
        return SignedDocument(manifest_url, body, signature)


def resolve_image_url(manifest_url: str, manifest: Manifest) -> str:
    """The image's URL, relative to the manifest's; it may not change scheme family."""
    return resolve_url(manifest_url, manifest.image.url)


def resolve_url(manifest_url: str, relative: str) -> str:
    """A URL the manifest names, relative to the manifest's; it may not change scheme family."""
    url = urljoin(manifest_url, relative)
    web = {"http", "https"}
    ours, theirs = urlsplit(manifest_url).scheme, urlsplit(url).scheme
    if not (ours == theirs or {ours, theirs} <= web):
        raise VerificationError(
            "manifest_malformed", f"URL {url} leaves the repository's scheme ({ours})"
        )
    return url


class StaticSource:
    """The static release repository: ``<url>/<channel>/release.json`` + ``.asc``."""

    def __init__(
        self, base_url: str, channel: str, transport: Transport, cache: HttpCache | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.manifest_url = self.base_url + f"/{channel}/release.json"
        self.signature_url = self.manifest_url + ".asc"
        self._fetcher = SignedFetcher(transport, cache)

    def report(self, happening: Happening) -> None:
        return None  # a static repository listens to nobody

    def fetch(self, current_version: str | None = None) -> SignedDocument:
        return self._fetcher.fetch(self.manifest_url, self.signature_url)

    def image_url(self, manifest: Manifest) -> str:
        return resolve_image_url(self.manifest_url, manifest)

    def index_url(self, manifest: Manifest) -> str | None:
        index = manifest.image.index
        return None if index is None else resolve_url(self.manifest_url, index.url)

    def boot_url(self, manifest: Manifest, ref: BootFileRef) -> str:
        return resolve_url(self.manifest_url, ref.url)

    def root_url(self, version: int) -> str:
        return self.base_url + f"/keys/root.{version}.json"
