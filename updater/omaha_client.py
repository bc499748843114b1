"""The HTTP side of Omaha: POST a request document, read a size-capped answer.

It rides on :class:`updater.transport.HttpTransport`'s session (its retry
policy, User-Agent, identity encoding) and settings (timeouts, CA file), so
there is one HTTP stack. The session retries only GETs on 5xx; a POST is
retried only when the connection could not be made (nothing was sent), and
otherwise the next poll is the retry, as update_engine does.

Redirects are followed only to the same scheme, host and port (re-POSTing the
document); a redirect elsewhere is refused, so a compromised proxy cannot
send the machine's id and events to a third party.

Also here: the two host facts a request carries (machine id, boot id), read
from injectable paths.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from urllib.parse import urljoin

import requests
import structlog

from updater.errors import ConfigError, DownloadError, OmahaError
from updater.httperrors import status_error
from updater.omaha import MAX_RESPONSE_BYTES, OmahaResponse, parse_response
from updater.omaha_request import OmahaEvent, OmahaRequestContext, build_request
from updater.transport import HttpTransport
from updater.urls import parse_url

log = structlog.get_logger(__name__)

MACHINE_ID_PATH: Final = Path("/etc/machine-id")
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
CONTENT_TYPE: Final = "text/xml"  # update_engine's kHttpContentTypeTextXml
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

_MACHINE_ID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def _read_id(path: Path, what: str, hint: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            "unreadable", f"cannot read the {what}: {exc.strerror}", file=str(path), hint=hint
        ) from None


def read_machine_id(path: Path = MACHINE_ID_PATH) -> str:
    """32 lowercase hex digits, sent as update_engine sends it (no braces)."""
    text = _read_id(path, "machine id", "systemd-machine-id-setup creates it")
    if not _MACHINE_ID_RE.fullmatch(text):
        raise ConfigError(
            "invalid",
            f"not a machine id: {text[:40]!r}",
            file=str(path),
            hint="it must hold 32 hex digits",
        )
    return text.lower()


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id in braces, ``{xxxxxxxx-...}``, as update_engine sends it."""
    text = _read_id(path, "boot id", "the kernel provides it under /proc")
    try:
        return "{" + str(uuid.UUID(text)) + "}"
    except ValueError:
        raise ConfigError("invalid", f"not a boot id: {text[:40]!r}", file=str(path)) from None


def host_context(
    app_id: str,
    version: str,
    track: str,
    *,
    machine_id_path: Path = MACHINE_ID_PATH,
    boot_id_path: Path = BOOT_ID_PATH,
    machine: str | None = None,
) -> OmahaRequestContext:
    """The request context of this host; other fields via ``dataclasses.replace``."""
    return OmahaRequestContext(
        app_id=app_id,
        version=version,
        track=track,
        machine_id=read_machine_id(machine_id_path),
        boot_id=read_boot_id(boot_id_path),
        machine=machine if machine is not None else os.uname().machine,
    )


def _redirect_target(url: str, location: str, status: int) -> str:
    """Where a redirect from ``url`` leads, if it stays on the same server.

    Any Location the server sends, however malformed, is a typed error: a
    redirect to another scheme, host or port is refused, so a compromised proxy
    cannot send the machine's id and events to a third party.
    """

    def refuse(why: str) -> DownloadError:
        return DownloadError(
            "http_status",
            f"{url}: redirected to {location[:200]!r}, not followed: {why}",
            status=status,
            hint="point [omaha] server at the final URL",
        )

    try:
        target = urljoin(url, location)
    except ValueError as exc:  # urljoin splits both: a bad IPv6 literal, an NFKC netloc
        raise refuse(str(exc)) from None
    here = parse_url(url, refuse)
    there = parse_url(target, refuse)
    if there.origin != here.origin:
        raise refuse("another server")
    return target


class OmahaClient:
    def __init__(
        self,
        server_url: str,
        *,
        transport: HttpTransport | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_redirects: int = 3,
    ) -> None:
        parse_url(
            server_url,
            lambda why: ConfigError(
                "invalid", f"the Omaha server must be an http(s) URL: {why}", key="server"
            ),
        )
        self.server_url = server_url
        self.transport = transport or HttpTransport()
        self.max_response_bytes = max_response_bytes
        self.max_redirects = max_redirects

    def _send(self, url: str, body: bytes) -> requests.Response:
        return self.transport.request(
            "POST",
            url,
            data=body,
            headers={"Content-Type": CONTENT_TYPE},
            allow_redirects=False,
        )

    def _read(self, url: str, resp: requests.Response) -> bytes:
        cap = self.max_response_bytes
        declared = resp.headers.get("Content-Length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > cap:
            raise OmahaError(
                "too_large", f"{url}: the answer is {declared} bytes, more than {cap} allowed"
            )
        body = self.transport.read_capped(url, resp, cap)  # held to the speed floor
        if len(body) > cap:
            raise OmahaError("too_large", f"{url}: the answer is more than {cap} bytes")
        return body

    def post(self, request: bytes) -> bytes:
        """POST ``request`` as text/xml; the body of the 200 answer (at most the cap)."""
        url = self.server_url
        for _ in range(self.max_redirects + 1):
            with self._send(url, request) as resp:
                status = resp.status_code
                if status in REDIRECTS:
                    target = _redirect_target(url, resp.headers.get("Location", ""), status)
                    log.debug("omaha_redirected", url=url, target=target, status=status)
                    url = target
                    continue
                if status != 200:
                    raise status_error(url, status)
                body = self._read(url, resp)
                log.debug("omaha_answered", url=url, bytes=len(body))
                return body
        raise DownloadError(
            "http_status", f"{self.server_url}: more than {self.max_redirects} redirects"
        )

    def check(
        self,
        ctx: OmahaRequestContext,
        *,
        events: Sequence[OmahaEvent] = (),
        ping: bool = True,
        interactive: bool = False,
    ) -> OmahaResponse:
        """An update check (with a ping and any pending events); the parsed answer."""
        request = build_request(
            ctx, ping=ping, updatecheck=True, events=events, interactive=interactive
        )
        log.debug("omaha_check", url=self.server_url, events=len(events))
        return parse_response(
            self.post(request),
            ctx.app_id,
            max_bytes=self.max_response_bytes,
            sent_version=ctx.version,
        )

    def report(self, ctx: OmahaRequestContext, events: Sequence[OmahaEvent]) -> None:
        """Send events alone, as update_engine does between the steps of an update.

        Raises DownloadError when the server could not be reached or did not
        answer 200, so the caller can keep the events for the next check;
        the answer's content is not judged (update_engine: events always succeed).
        """
        if not events:
            return
        self.post(build_request(ctx, ping=False, updatecheck=False, events=events))
        log.debug("omaha_reported", url=self.server_url, events=len(events))
