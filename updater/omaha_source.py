"""An Omaha server (Nebraska, Flatcar's update server) as the update source.

The server decides *whether* and *which* version a host gets (groups, rollout
policy); it is not trusted with *what* gets installed. Its answer names a
package under a codebase; beside the package lie the signed manifest
``<package>.json`` and its signature ``<package>.json.asc`` (the layout
`updatectl release` writes), and the manifest decides, exactly as with the
static repository. The server's own size, SHA-256, URL and version must equal
the manifest's (:func:`updater.update.check_claim`).

Events go to the server as update_engine sends them. Undelivered ones are
kept (in ``<state_dir>/omaha-events.json``) and go with the next request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from updater import jsonutil
from updater.errors import UpdaterError
from updater.fsutil import atomic_write
from updater.manifest import BootFileRef, Manifest
from updater.omaha import (
    Deferred as OmahaDeferred,
)
from updater.omaha import OmahaNoUpdate, UpdateOffer
from updater.omaha_client import OmahaClient
from updater.omaha_request import OmahaEvent, OmahaRequestContext
from updater.source import (
    Happening,
    HeldBack,
    ImageClaim,
    NoOffer,
    SignedFetcher,
    SourceAnswer,
    resolve_image_url,
    resolve_url,
)

log = structlog.get_logger(__name__)

MAX_PENDING_EVENTS = 64  # a server gone for weeks does not grow the file forever
MAX_EVENTS_FILE_BYTES = 1024 * 1024  # 64 events are a few KiB


def omaha_event(h: Happening) -> OmahaEvent:
    match h.what:
        case "download_started":
            return OmahaEvent.download_started()
        case "download_finished":
            return OmahaEvent.download_finished()
        case "staged":
            return OmahaEvent.install_staged()
        case "rebooted":
            return OmahaEvent.rebooted(h.previous_version or "")
        case "rolled_back":
            return OmahaEvent.rollback()
        case "deferred":
            return OmahaEvent.deferred()
        case "failed":
            assert h.error is not None
            return OmahaEvent.failed_with(h.error, during_check=h.during_check)
    raise AssertionError(h.what)  # pragma: no cover


class EventQueue:
    """Events not yet delivered, persisted so that a restart loses none."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pending(self) -> list[OmahaEvent]:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_EVENTS_FILE_BYTES + 1)
            raw = jsonutil.loads(
                data, ValueError, max_bytes=MAX_EVENTS_FILE_BYTES, allow_constants=True
            )
            return [OmahaEvent.from_dict(e) for e in raw]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("omaha_events_unreadable", path=str(self.path), error=str(exc))
            return []

    def _save(self, events: list[OmahaEvent]) -> None:
        atomic_write(self.path, json.dumps([e.as_dict() for e in events]).encode(), mode=0o600)

    def add(self, event: OmahaEvent) -> list[OmahaEvent]:
        events = [*self.pending(), event][-MAX_PENDING_EVENTS:]
        self._save(events)
        return events

    def delivered(self, count: int) -> None:
        """The oldest ``count`` events reached the server."""
        if count:
            self._save(self.pending()[count:])


class OmahaSource:
    def __init__(
        self,
        client: OmahaClient,
        context: Callable[[str], OmahaRequestContext],
        fetcher: SignedFetcher,
        queue: EventQueue,
    ) -> None:
        self.client = client
        self._context = context
        self._fetcher = fetcher
        self._queue = queue
        self._offer: UpdateOffer | None = None
        self._version = "0.0.0"  # the running version, as of the last check
        # the version whose deferral was last reported: once each, across restarts
        self._deferral_file = queue.path.with_name("omaha-deferred")

    def fetch(self, current_version: str | None) -> SourceAnswer:
        self._version = current_version or "0.0.0"
        ctx = self._context(self._version)
        events = self._queue.pending()
        response = self.client.check(ctx, events=events)  # raises: the events stay queued
        self._queue.delivered(len(events))
        match response:
            case OmahaNoUpdate(poll_interval_s=interval):
                self._deferral_file.unlink(missing_ok=True)
                return NoOffer(interval)
            case OmahaDeferred(reason=reason, poll_interval_s=interval):
                return HeldBack(reason, interval)
            case UpdateOffer() as offer:
                self._offer = offer
                doc = self._fetcher.fetch(offer.manifest_url, offer.signature_url)
                claim = ImageClaim(offer.url, offer.size, offer.sha256, offer.version)
                return replace(doc, claim=claim, interval_s=offer.poll_interval_s)
        raise AssertionError(response)  # pragma: no cover

    def image_url(self, manifest: Manifest) -> str:
        if self._offer is None:
            raise RuntimeError("image_url before an offer")
        return resolve_image_url(self._offer.manifest_url, manifest)

    def index_url(self, manifest: Manifest) -> str | None:
        # the chunk index lies beside the package, named in the manifest beside it
        if self._offer is None:
            raise RuntimeError("index_url before an offer")
        index = manifest.image.index
        return None if index is None else resolve_url(self._offer.manifest_url, index.url)

    def boot_url(self, manifest: Manifest, ref: BootFileRef) -> str:
        if self._offer is None:
            raise RuntimeError("boot_url before an offer")
        return resolve_url(self._offer.manifest_url, ref.url)

    def root_url(self, version: int) -> str:
        """Roots lie beside the package: ``<codebase>/keys/`` (updatectl release links
        ``images/<version>/keys`` to the repository's ``keys``)."""
        if self._offer is None:
            raise RuntimeError("root_url before an offer")
        return resolve_url(self._offer.manifest_url, f"keys/root.{version}.json")

    def report(self, happening: Happening) -> None:
        """Tell the server; never raises (the source contract): a report is best
        effort, and what cannot be sent now stays queued for the next request."""
        try:
            self._report(happening)
        except Exception as exc:  # whatever the server or the disk did
            log.warning(
                "omaha_report_failed",
                happened=happening.what,
                error=str(exc),
                error_type=type(exc).__name__,
                error_kind=exc.kind if isinstance(exc, UpdaterError) else "internal",
            )

    def _report(self, happening: Happening) -> None:
        if happening.what == "deferred":
            said = happening.version or ""
            try:
                if self._deferral_file.read_text() == said:
                    return  # once per held-back version, not every poll
            except OSError:
                pass
            atomic_write(self._deferral_file, said.encode())
        events = self._queue.add(omaha_event(happening))
        try:
            self.client.report(self._context(self._version), events)
        except UpdaterError as exc:
            log.warning("omaha_events_queued", count=len(events), error=str(exc))
            return
        self._queue.delivered(len(events))
        log.info("omaha_event_sent", happened=happening.what, version=happening.version)


class DisabledSource:
    """SERVER=disabled (Flatcar's update.conf): no checks, nothing reported."""

    def fetch(self, current_version: str | None) -> SourceAnswer:
        log.info("update_checks_disabled")
        return NoOffer()

    def image_url(self, manifest: Manifest) -> str:
        raise RuntimeError("update checks are disabled")

    def index_url(self, manifest: Manifest) -> str | None:
        raise RuntimeError("update checks are disabled")

    def boot_url(self, manifest: Manifest, ref: BootFileRef) -> str:
        raise RuntimeError("update checks are disabled")

    def root_url(self, version: int) -> str:
        raise RuntimeError("update checks are disabled")

    def report(self, happening: Happening) -> None:
        return None
