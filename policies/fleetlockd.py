"""A FleetLock server over the etcd semaphore: ``updatectl fleetlock serve``.

Zincati (and our own :mod:`policies.fleetlock` client) ask it for a reboot
slot; it takes the slot in the same etcd semaphore the etcd-lock agents (and
airlock) use, :class:`policies.etcdlock.EtcdLock`, so hosts of one group meet
on one semaphore whichever way they ask.

The protocol (coreos/zincati ``docs/development/fleetlock/protocol.md``):
``POST /v1/pre-reboot`` takes a slot (recursive: asking again while holding one
is success), ``POST /v1/steady-state`` gives it back (releasing nothing is
success). Every request carries ``fleet-lock-protocol: true`` and the JSON body
``{"client_params": {"id": ..., "group": ...}}``; 200 is success, anything else
a failure with the JSON body ``{"kind": ..., "value": ...}``, ``kind`` from the
bounded set :data:`policies.fleetlockproto.KINDS`.

Beyond the protocol, read-only and marked as ours: ``GET /v1/status`` answers
each served group's slots and holders with their ages, and the failed-version
block of each group. Our own client may add ``"version"`` (the staged
version) to ``client_params``; a pre-reboot for a version the group has
recorded as failed is refused (``version_blocked``). Zincati sends no version,
so it is never refused that way. In a steady-state, our client may add
``"failed_version"`` and ``"failure_kind"`` (a rollback): the failure is
recorded for the group (:mod:`policies.failed`) before the slot is given back,
and if it cannot be recorded, neither happens. Servers that are not ours
(airlock) ignore both fields and only release.

Decisions where the protocol leaves room, failing closed:

* Groups are the ones configured (airlock's ``unknown_group`` otherwise): a
  client cannot make the server create semaphores for groups nobody set up.
* A full semaphore is 409 ``failed_lock_semaphore_full`` (the spec's own
  example kind). airlock answers 500 ``failed_lock`` for both "full" and "etcd
  failed"; keeping them apart lets a client tell "wait" from "broken".
* etcd failures are 503 (``etcd_unavailable``, ``etcd_conflict``) or 500
  (``semaphore_malformed``, ``etcd_refused``): never a 200 without the slot.
* The body is read only with a ``Content-Length`` of at most
  :data:`~policies.fleetlockproto.MAX_REQUEST_BYTES` bytes (no chunked bodies), parsed by
  :mod:`updater.jsonutil` (bounded size and nesting); unknown fields in
  ``client_params`` are ignored, as a newer client may send more.
* Every connection has a read timeout, at most ``max_connections`` are served
  at once (more are closed at once), and a TLS handshake happens in the
  connection's own thread, so a slow client holds up nobody else.

The request checks are pure (:mod:`policies.fleetlockproto`), the decisions
over etcd are :class:`policies.fleetlockservice.FleetLockService`; this module
is the HTTP(S) shell around them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from policies.fleetlockproto import (
    MAX_REQUEST_BYTES,
    STATUS,
    ProtocolError,
    body_length,
    lock_failure,
    parse_body,
    route,
)
from policies.fleetlockservice import FleetLockService
from policies.tlsserve import server_tls_context
from updater.errors import ConfigError, LockError

log = structlog.get_logger(__name__)

LINGER_S: Final = 0.5  # seconds to read what a refused client still sends, before closing
LINGER_BYTES: Final = 1024 * 1024


# ---- the HTTP shell ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to listen. ``host`` is an IP literal (``0.0.0.0`` for all)."""

    host: str = "127.0.0.1"
    port: int = 9476
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve HTTPS
    tls_key: Path | None = None
    request_timeout_s: float = 30.0  # per read on a connection (headers, body, keep-alive)
    max_connections: int = 256  # served at once; more are closed at once
    groups: Mapping[str, int] = field(default_factory=lambda: {"default": 1})

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "invalid", "the TLS certificate and key go together", key="tls-cert/tls-key"
            )
        if not 0 < self.request_timeout_s <= 3600:
            raise ConfigError("invalid", "request_timeout_s must be in (0, 3600]")
        if self.max_connections < 1:
            raise ConfigError("invalid", "max_connections must be >= 1")

    def tls_context(self) -> ssl.SSLContext | None:
        return server_tls_context(self.tls_cert, self.tls_key)


class _Handler(BaseHTTPRequestHandler):
    server: FleetLockServer
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    server_version = "updater-fleetlockd"
    sys_version = ""

    _linger = False  # an error answer left part of the request unread

    def setup(self) -> None:
        super().setup()
        # every read (request line, headers, body, the next keep-alive request) times out
        self.connection.settimeout(self.server.settings.request_timeout_s)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("fleetlock_http", client=self.address_string(), message=format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (unparsable request, unknown method), as FleetLock JSON."""
        kind = {414: "uri_too_long", 431: "headers_too_large", 501: "method_not_allowed"}.get(
            code, "bad_request"
        )
        if self.request_version == "HTTP/0.9":  # http.server would answer without headers
            self.request_version = "HTTP/1.0"
        self.close_connection = self._linger = True
        self._answer_error(ProtocolError(kind, message or "bad request"))

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._drain()

    def _drain(self) -> None:
        """Read (briefly) what the client still sends before the connection closes:
        closing with unread data resets the connection, and the client could lose
        the error answer it has not read yet."""
        try:
            if not isinstance(self.connection, ssl.SSLSocket):
                self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            left = LINGER_BYTES
            while left > 0:
                chunk = self.connection.recv(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def do_POST(self) -> None:
        self._dispatch()

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _dispatch(self) -> None:
        if self.request_version == "HTTP/0.9":  # no headers, so no protocol header either
            self.send_error(400, "HTTP/0.9 requests are not served")
            return
        service = self.server.service
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value.strip())
        body_read = False
        try:
            endpoint = route(self.command, self.path)
            if endpoint == "status":
                self._discard_body(headers)
                self._answer_status()
                return
            length = body_length(headers)
            body = self.rfile.read(length)
            body_read = True
            if len(body) != length:
                self.close_connection = True
                return  # the client went away mid-body
            params = parse_body(body)
            if endpoint == "pre-reboot":
                service.pre_reboot(params)
            else:
                service.steady_state(params)
        except ProtocolError as exc:
            if not body_read:  # else the body would be read as the next request
                self._discard_body(headers)
            self._answer_error(exc)
            return
        except Exception:  # a bug: answered, logged, and the server keeps serving
            log.exception("fleetlock_internal_error", path=self.path[:100])
            self._answer_error(ProtocolError("internal_error", "the server failed; see its log"))
            return
        self._send(200, b"", None)

    def _discard_body(self, headers: Mapping[str, list[str]]) -> None:
        """Read a small body we do not want, so the connection stays usable; else close it."""
        lengths = headers.get("content-length", [])
        if headers.get("transfer-encoding") or len(lengths) > 1:
            self.close_connection = self._linger = True
        elif lengths:
            if (
                lengths[0].isascii()
                and lengths[0].isdigit()
                and int(lengths[0]) <= MAX_REQUEST_BYTES
            ):
                self.rfile.read(int(lengths[0]))
            else:
                self.close_connection = self._linger = True

    def _answer_status(self) -> None:
        try:
            doc = self.server.service.status()
        except LockError as exc:
            self._answer_error(lock_failure(exc))
            return
        self._send(200, json.dumps(doc, indent=2).encode() + b"\n", "application/json")

    def _answer_error(self, exc: ProtocolError) -> None:
        self._send(exc.status, exc.body(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if status == 405:
            allow = "GET, HEAD" if urlsplit(self.path).path == STATUS else "POST"
            self.send_header("Allow", allow)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class FleetLockServer(ThreadingHTTPServer):
    """The HTTP(S) server: one thread per connection, at most ``max_connections``."""

    daemon_threads = True
    block_on_close = False  # stopping does not wait for idle keep-alive connections
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, settings: ServerSettings, service: FleetLockService) -> None:
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.settings = settings
        self.service = service
        self._tls = settings.tls_context()
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        super().__init__((settings.host, settings.port), _Handler)

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def url(self) -> str:
        host, port = self.server_address[0], self.server_address[1]
        name = host.decode() if isinstance(host, bytes) else host
        shown = f"[{name}]" if ":" in name else name
        return f"{self.scheme}://{shown}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("fleetlock_too_many_connections", client=_peer(client_address))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.settings.request_timeout_s)
        try:  # the handshake, here in the connection's thread
            conn = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("fleetlock_tls_failed", client=_peer(client_address), error=str(exc))
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("fleetlock_connection_failed", client=_peer(client_address), exc_info=True)


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return repr(address)


@contextlib.contextmanager
def running(server: FleetLockServer, *, poll_interval_s: float = 0.2) -> Iterator[FleetLockServer]:
    """Serve from a thread for the ``with`` block; then stop serving and close the socket
    (connections still open end with their threads, daemons: nothing waits for them)."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval_s}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
