"""The fleet dashboard: ``updatectl fleet serve``, read-only HTTP(S) over etcd.

A :class:`FleetCache` reads etcd every ``refresh_s`` in one transaction (the
hosts' records, the reboot semaphores, the failed versions) and renders the
views of :mod:`policies.fleetview` once per read; requests are answered from
that, so a hundred open dashboards cost etcd nothing more than one. Answers:

* ``GET /api/v1/hosts``, ``/api/v1/groups``, ``/api/v1/versions``: JSON;
  ``/api/v1/fleet``: the three together (what the page polls); with an
  ``ETag``, so an unchanged fleet costs a ``304``;
* ``GET /metrics``: the fleet-wide gauges (Prometheus text);
* ``GET /``: the page (``policies/fleetweb/``: plain HTML, CSS and JavaScript
  shipped in the package, no build step, nothing from another origin) under a
  Content-Security-Policy that allows only its own script: a record holding
  markup is shown as text by the page, and could not run even if it were not.

Nothing changes anything: every method but ``GET`` and ``HEAD`` is ``405``.
With a token file, ``/api/`` and ``/metrics`` need ``Authorization: Bearer
<token>`` (``401`` otherwise); the page itself holds no data and is served to
anyone (it takes the token from its URL's fragment, ``#token=...``, which the
browser never sends to the server).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

import structlog

from policies.etcdtxn import KeyValue, request_range
from policies.failed import PREFIX as FAILED_PREFIX
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.fleetview import (
    FleetSnapshot,
    Unreadable,
    decode_host,
    fleet_view,
    metrics_text,
    parse_snapshot,
)
from policies.semaphore import KEY_PREFIX as LOCK_PREFIX
from policies.tlsserve import server_tls_context
from updater.errors import ConfigError, LockError

if TYPE_CHECKING:
    from policies.etcdclient import EtcdClient

log = structlog.get_logger(__name__)

MAX_TOKEN_BYTES: Final = 4096
STATIC: Final = {  # path -> (file in policies/fleetweb, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
API: Final = ("/api/v1/fleet", "/api/v1/hosts", "/api/v1/groups", "/api/v1/versions", "/metrics")
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped), or ConfigError."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            "unreadable", f"cannot read the token: {exc.strerror or exc}", file=str(path)
        ) from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or len(raw) > MAX_TOKEN_BYTES or not token.isprintable() or " " in token:
        raise ConfigError(
            "invalid",
            "the token file must hold one token of printable ASCII, at most 4 KiB",
            file=str(path),
            key="--token-file",
            hint="e.g. `openssl rand -hex 32 > token`",
        )
    return token


def static_files() -> dict[str, bytes]:
    """The page's files, from the package."""
    base = resources.files("policies") / "fleetweb"
    return {name: (base / name).read_bytes() for name in ("index.html", "app.js", "style.css")}


# ---- reading etcd ------------------------------------------------------------------------------


class FleetReads(Protocol):
    """Where the fleet is read from (the port :class:`FleetCache` uses)."""

    def read(self, now: float) -> FleetSnapshot:
        """The fleet as it is now; LockError when it cannot be read."""
        ...


class EtcdReads:
    """One consistent read of the three prefixes from etcd: a :class:`FleetReads`."""

    def __init__(self, client: EtcdClient, max_failures: int) -> None:
        self.client = client
        self.max_failures = max_failures
        # key -> (mod_revision, what it decoded to): most records are the same from one
        # read to the next, and decoding (bounded JSON) is most of a read's time
        self._decoded: dict[str, tuple[int, HostRecord | Unreadable]] = {}

    def read(self, now: float) -> FleetSnapshot:
        result = self.client.txn(
            [],
            [
                request_range(HOSTS_PREFIX, prefix=True),
                request_range(LOCK_PREFIX, prefix=True),
                request_range(FAILED_PREFIX, prefix=True),
            ],
        )
        if len(result.ranges) != 3:
            raise LockError("malformed", "etcd answered a transaction without its reads")
        hosts, locks, failed = result.ranges
        known, self._decoded = self._decoded, {}

        def decode(kv: KeyValue) -> HostRecord | Unreadable:
            seen = known.get(kv.key)
            decoded = seen[1] if seen and seen[0] == kv.mod_revision else decode_host(kv)
            self._decoded[kv.key] = (kv.mod_revision, decoded)  # only keys that still exist
            return decoded

        return parse_snapshot(
            hosts,
            locks,
            failed,
            max_failures=self.max_failures,
            revision=result.revision,
            read_at=now,
            decode=decode,
        )


@dataclass(frozen=True)
class Rendered:
    """The answers of one read: path -> body (and its ETag)."""

    bodies: dict[str, bytes]
    etags: dict[str, str]
    read_at: float


def render(snapshot: FleetSnapshot | None, *, up: bool, stale_after_s: float) -> Rendered:
    bodies: dict[str, bytes] = {
        "/metrics": metrics_text(snapshot, up=up, stale_after_s=stale_after_s).encode()
    }
    if snapshot is not None:
        views = fleet_view(snapshot, stale_after_s)
        docs = {
            "/api/v1/fleet": {**views, "up": up},
            "/api/v1/hosts": views["hosts"],
            "/api/v1/groups": views["groups"],
            "/api/v1/versions": views["versions"],
        }
        for path, doc in docs.items():
            bodies[path] = _json_bytes(doc)
    etags = {p: '"' + hashlib.sha256(b).hexdigest()[:32] + '"' for p, b in bodies.items()}
    return Rendered(bodies, etags, 0.0 if snapshot is None else snapshot.read_at)


def _json_bytes(doc: Any) -> bytes:
    """JSON with ``<``, ``>`` and ``&`` escaped as ``\\u003c``...: the same document,
    and no byte of it reads as markup to anything that sniffs."""
    text = json.dumps(doc, ensure_ascii=True, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.encode()


class FleetCache:
    """The last read of etcd, rendered; refreshed by :meth:`run` every ``refresh_s``."""

    def __init__(
        self,
        reads: FleetReads,
        *,
        refresh_s: float,
        stale_after_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reads = reads
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._snapshot: FleetSnapshot | None = None
        self.rendered = render(None, up=False, stale_after_s=stale_after_s)
        self.error = ""

    def refresh(self) -> None:
        try:
            snapshot = self.reads.read(self.clock())
            rendered = render(snapshot, up=True, stale_after_s=self.stale_after_s)
        except LockError as exc:
            if self.error != exc.message:
                log.warning("fleet_serve_etcd_failed", error_kind=exc.kind, error=exc.message)
            self._down(exc.message)
            return
        except Exception:  # a bug: logged, and the server keeps serving the last read
            log.exception("fleet_serve_read_crashed")
            self._down("the dashboard failed to read the fleet; see its log")
            return
        if self.error:
            log.info("fleet_serve_etcd_back")
        self.error = ""
        self._snapshot = snapshot
        self.rendered = rendered

    def _down(self, why: str) -> None:
        """The last good read stays, marked down: a dashboard shows the fleet as it was."""
        self.error = why
        self.rendered = render(self._snapshot, up=False, stale_after_s=self.stale_after_s)

    def run(self, stop: threading.Event) -> None:
        """Refresh until ``stop``: every ``refresh_s``, and never busy more than a third of
        the time (a fleet so large that a read takes a second is read every 3 s)."""
        while not stop.is_set():
            started = time.monotonic()
            self.refresh()
            took = time.monotonic() - started
            stop.wait(max(self.refresh_s - took, 2 * took))


# ---- the HTTP shell ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 9477
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None  # bearer token for /api/ and /metrics; None: none needed
    request_timeout_s: float = 30.0
    max_connections: int = 128

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "invalid", "the TLS certificate and key go together", key="--tls-cert/--tls-key"
            )

    def tls_context(self) -> ssl.SSLContext | None:
        return server_tls_context(self.tls_cert, self.tls_key)


class _Handler(BaseHTTPRequestHandler):
    server: FleetServer
    protocol_version = "HTTP/1.1"
    server_version = "updater-fleet-serve"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.settings.request_timeout_s)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("fleet_serve_http", client=self.address_string(), message=format % args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.server.note_request(self.command, path)
        if path in STATIC:
            name, ctype = STATIC[path]
            self._send(200, self.server.files[name], ctype)
            return
        if path not in API:
            self._send_json(404, {"error": "not_found", "message": "no such page"})
            return
        if not self._authorized():
            self._send_json(
                401,
                {"error": "unauthorized", "message": "send Authorization: Bearer <token>"},
                extra={"WWW-Authenticate": 'Bearer realm="updater-fleet"'},
            )
            return
        rendered = self.server.cache.rendered
        body = rendered.bodies.get(path)
        if body is None:  # etcd never answered yet
            self._send_json(
                503,
                {"error": "etcd_unavailable", "message": self.server.cache.error or "not read yet"},
                extra={"Retry-After": "5"},
            )
            return
        etag = rendered.etags[path]
        if self.headers.get("If-None-Match") == etag:
            self._send(304, b"", None, extra={"ETag": etag})
            return
        ctype = METRICS_TYPE if path == "/metrics" else "application/json"
        self._send(200, body, ctype, extra={"ETag": etag})

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self.server.note_request(self.command, urlsplit(self.path).path)
        # a body we do not read would be taken for the next request: close after answering
        self.close_connection = True
        self._send_json(
            405,
            {"error": "method_not_allowed", "message": "the dashboard is read-only"},
            extra={"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (unknown method, bad request line), as JSON."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        if code == 501:
            self._send_json(
                405,
                {"error": "method_not_allowed", "message": "the dashboard is read-only"},
                extra={"Allow": "GET, HEAD"},
            )
            return
        self._send_json(code, {"error": "bad_request", "message": message or "bad request"})

    def _authorized(self) -> bool:
        token = self.server.settings.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8", "replace"), token.encode()
        )

    def _send_json(
        self, status: int, doc: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        self._send(status, json.dumps(doc).encode() + b"\n", "application/json", extra=extra)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(body)


class FleetServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections``; answers from ``cache``."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, settings: ServeSettings, cache: FleetCache, files: dict[str, bytes] | None = None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.settings = settings
        self.cache = cache
        self.files = static_files() if files is None else files
        self.requests: list[tuple[str, str]] = []  # (method, path), the last MAX_NOTED
        self._tls = settings.tls_context()
        self._connections = threading.BoundedSemaphore(settings.max_connections)
        self._noted = threading.Lock()
        super().__init__((settings.host, settings.port), _Handler)

    MAX_NOTED: Final = 10000

    def note_request(self, method: str, path: str) -> None:
        with self._noted:
            self.requests.append((method, path[:200]))
            del self.requests[: -self.MAX_NOTED]

    @property
    def url(self) -> str:
        host, port = self.server_address[0], self.server_address[1]
        name = host.decode() if isinstance(host, bytes) else host
        shown = f"[{name}]" if ":" in name else name
        return f"{'https' if self._tls else 'http'}://{shown}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("fleet_serve_too_many_connections")
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
        try:
            conn = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("fleet_serve_tls_failed", error=str(exc))
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("fleet_serve_connection_failed", exc_info=True)


@contextlib.contextmanager
def serving(server: FleetServer) -> Iterator[FleetServer]:
    """Refresh the cache and serve, each from a thread, for the ``with`` block."""
    stop = threading.Event()
    server.cache.refresh()  # the first answers already hold the fleet
    refresher = threading.Thread(target=server.cache.run, args=(stop,), daemon=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
    )
    refresher.start()
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        refresher.join(timeout=10)
