"""A FleetLock server for tests, written from the protocol
(coreos/zincati ``docs/development/fleetlock/protocol.md``), not part of the agent.

It keeps an in-memory counting semaphore per group (recursive lock and
unlock-if-held, owned by client id), checks the ``fleet-lock-protocol: true``
header and the ``{"client_params": {"id", "group"}}`` body, answers 200 on
success and ``{"kind", "value"}`` JSON errors otherwise, records every request,
and can misbehave on purpose (:class:`Fault`) to play a broken or hostile
server: a 5xx, garbage, a redirect, a hang, a trickle, a dropped connection,
HTML where JSON belongs.

``with FleetLockServer(slots=2) as srv: srv.base_url`` listens on a free
loopback port; leaving the block always shuts it down, hung requests included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from devtools.loopback import LoopbackHTTPServer, LoopbackServer

GROUP_RE = re.compile(r"[a-zA-Z0-9.-]+")
ENDPOINTS = ("pre-reboot", "steady-state")
MAX_REQUEST = 64 * 1024  # bytes
FULL_KIND = "failed_lock_semaphore_full"  # the spec's own example kind


@dataclass
class Fault:
    """Answer matching requests like this instead of following the protocol."""

    status: int = 500
    body: bytes = b""
    content_type: str | None = None
    location: str | None = None  # a Location header (a redirect)
    hang_s: float = 0.0  # wait this long before answering (cut short by shutdown)
    trickle_s: float = 0.0  # then send the body one byte per this many seconds
    drop: bool = False  # close the connection without an answer
    endpoint: str | None = None  # "pre-reboot" or "steady-state"; None: every request
    times: int | None = None  # apply to this many requests, then behave (None: always)

    @classmethod
    def error(
        cls, status: int, kind: str, value: str, *, content_type: str = "application/json"
    ) -> Fault:
        """A well-formed FleetLock error (airlock sends these as text/plain)."""
        body = json.dumps({"kind": kind, "value": value}).encode()
        return cls(status=status, body=body, content_type=content_type)

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls(status=status, body=b"", content_type=None)

    @classmethod
    def garbage(cls, status: int = 500) -> Fault:
        return cls(status=status, body=b"\x00\xff{not json", content_type="application/json")

    @classmethod
    def html(cls, status: int = 200) -> Fault:
        """A web page where a FleetLock answer belongs (a captive portal, a catch-all)."""
        return cls(
            status=status, body=b"<html><body>Welcome</body></html>", content_type="text/html"
        )

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Fault:
        return cls(status=status, location=location)

    @classmethod
    def hang(cls, seconds: float = 60.0) -> Fault:
        return cls(status=200, hang_s=seconds)

    @classmethod
    def trickle(cls, seconds_per_byte: float, size: int = 4096) -> Fault:
        return cls(status=500, body=b" " * size, trickle_s=seconds_per_byte)

    @classmethod
    def dropped(cls) -> Fault:
        return cls(drop=True)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # as decided on arrival; 0 for a dropped or hung request

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class _State:
    default_slots: int
    base_path: str  # may contain ${group}
    slots: dict[str, int] = field(default_factory=dict)
    holders: dict[str, list[str]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)

    def route(self, path: str) -> tuple[str, str | None] | None:
        """(endpoint, group named in the path or None) for a FleetLock path."""
        prefix = re.escape(self.base_path.rstrip("/")).replace(
            re.escape("${group}"), "(?P<group>[a-zA-Z0-9.-]+)"
        )
        m = re.fullmatch(prefix + r"/v1/(?P<endpoint>pre-reboot|steady-state)", path)
        if m is None:
            return None
        return m["endpoint"], m.groupdict().get("group")

    def take_fault(self, endpoint: str | None) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint not in (None, endpoint):
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state = self.server.state
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = b""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= MAX_REQUEST:
            body = self.rfile.read(int(length))
        routed = state.route(path)
        fault = state.take_fault(routed[0] if routed else None)
        try:
            if fault is not None:
                self._record(headers, body, 0 if fault.drop or fault.hang_s else fault.status)
                self._misbehave(fault)
            else:
                status, reply = self._protocol(path, headers, length, body, routed)
                self._record(headers, body, status)  # before answering: the client sees it then
                self._send(status, reply, "application/json" if reply else None)
        except OSError:
            self.close_connection = True

    def _record(self, headers: dict[str, str], body: bytes, status: int) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append(Request(self.command, self.path, headers, body, status))

    def _protocol(
        self,
        path: str,
        headers: dict[str, str],
        length: str | None,
        body: bytes,
        routed: tuple[str, str | None] | None,
    ) -> tuple[int, bytes]:
        state = self.server.state
        if routed is None:
            return _error(404, "not_found", f"no FleetLock endpoint at {path}")
        if self.command != "POST":
            return _error(405, "method_not_allowed", "FleetLock requests are POST")
        if headers.get("fleet-lock-protocol") != "true":
            return _error(
                400, "missing_protocol_header", "header fleet-lock-protocol: true required"
            )
        if length is None or not length.isdigit():
            return _error(411, "length_required", "a Content-Length is required")
        if int(length) > MAX_REQUEST:
            self.close_connection = True  # the body was not read
            return _error(413, "body_too_large", f"more than {MAX_REQUEST} bytes")
        try:
            doc = json.loads(body)
        except ValueError:
            return _error(400, "invalid_body", "the body is not JSON")
        params = doc.get("client_params") if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            return _error(400, "invalid_client_params", "client_params (object) is required")
        client_id, group = params.get("id"), params.get("group")
        if not isinstance(client_id, str) or not client_id:
            return _error(
                400, "invalid_client_params", "client_params.id must be a non-empty string"
            )
        if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
            return _error(400, "invalid_group", "client_params.group must match ^[a-zA-Z0-9.-]+$")
        endpoint, path_group = routed
        if path_group is not None and path_group != group:
            return _error(400, "group_mismatch", f"path names group {path_group}, body {group}")
        with state.lock:
            holders = state.holders.setdefault(group, [])
            if endpoint == "steady-state":
                if client_id in holders:  # unlock if held; releasing nothing is success
                    holders.remove(client_id)
                return 200, b""
            if client_id in holders:  # recursive: already holding is success
                return 200, b""
            total = state.slots.get(group, state.default_slots)
            if len(holders) >= total:
                return _error(
                    409, FULL_KIND, f"semaphore full, all {total} slots of group {group} are locked"
                )
            holders.append(client_id)
            return 200, b""

    def _misbehave(self, fault: Fault) -> None:
        closing = self.server.state.closing
        if fault.hang_s and closing.wait(fault.hang_s):
            self.close_connection = True
            return
        if fault.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(fault.status)
        if fault.content_type:
            self.send_header("Content-Type", fault.content_type)
        if fault.location:
            self.send_header("Location", fault.location)
        self.send_header("Content-Length", str(len(fault.body)))
        self.end_headers()
        if not fault.trickle_s:
            self.wfile.write(fault.body)
            return
        for i in range(len(fault.body)):
            if closing.wait(fault.trickle_s):
                break
            self.wfile.write(fault.body[i : i + 1])
            self.wfile.flush()
        self.close_connection = True

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _error(status: int, kind: str, value: str) -> tuple[int, bytes]:
    return status, json.dumps({"kind": kind, "value": value}).encode()


class _Server(LoopbackHTTPServer):
    request_queue_size = 128  # the default 5 makes a crowd of clients wait for SYN retries
    state: _State


class FleetLockServer(LoopbackServer[_Server]):
    """``with FleetLockServer(slots=1) as srv: srv.base_url`` on 127.0.0.1:<free port>.

    ``base_path`` prefixes the endpoints and may contain ``${group}``, which then
    must name the request's group (``/groups/${group}`` serves
    ``/groups/workers/v1/pre-reboot``).
    """

    def __init__(
        self, slots: int = 1, *, base_path: str = "", tls: ssl.SSLContext | None = None
    ) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = _State(default_slots=slots, base_path=base_path)
        # closing ends hangs and trickles
        super().__init__(server, tls=tls, poll_interval=0.01, closing=server.state.closing)

    @property
    def url(self) -> str:
        """Scheme, host and port, without the base path."""
        return self.origin

    @property
    def base_url(self) -> str:
        """The FleetLock base URL (``${group}``, if any, left for the client to fill)."""
        return self.url + self._server.state.base_path.rstrip("/")

    @property
    def requests(self) -> list[Request]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    def holders(self, group: str = "default") -> list[str]:
        with self._server.state.lock:
            return list(self._server.state.holders.get(group, []))

    def set_slots(self, slots: int, group: str | None = None) -> None:
        """Change the slot count of ``group`` (None: the default for every group)."""
        with self._server.state.lock:
            if group is None:
                self._server.state.default_slots = slots
            else:
                self._server.state.slots[group] = slots

    def add_fault(self, fault: Fault) -> None:
        """Misbehave from now on (the first matching fault, in the order added, wins)."""
        with self._server.state.lock:
            self._server.state.faults.append(fault)

    def clear_faults(self) -> None:
        with self._server.state.lock:
            self._server.state.faults.clear()


def main() -> None:
    p = argparse.ArgumentParser(description="serve FleetLock on loopback (for tests and demos)")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--base-path", default="")
    args = p.parse_args()
    with FleetLockServer(args.slots, base_path=args.base_path) as srv:
        print(srv.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
