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
bounded set :data:`KINDS`.

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
  :data:`MAX_BODY` bytes (no chunked bodies), parsed by
  :mod:`updater.jsonutil` (bounded size and nesting); unknown fields in
  ``client_params`` are ignored, as a newer client may send more.
* Every connection has a read timeout, at most ``max_connections`` are served
  at once (more are closed at once), and a TLS handshake happens in the
  connection's own thread, so a slow client holds up nobody else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit

import structlog

from policies.etcdclient import EtcdClient
from policies.etcdlock import EtcdLock
from policies.failed import FailedVersions as FailedVersionStore
from policies.lock import FAILURE_KIND_RE, check_group
from policies.semaphore import SemaphoreStatus, check_holder, check_slots
from updater.clock import Clock, SystemClock
from updater.errors import ConfigError, LockError
from updater.jsonutil import loads as load_json
from updater.versions import is_valid as is_valid_version

log = structlog.get_logger(__name__)

PROTOCOL_HEADER: Final = "fleet-lock-protocol"
PRE_REBOOT: Final = "/v1/pre-reboot"
STEADY_STATE: Final = "/v1/steady-state"
STATUS: Final = "/v1/status"  # ours, not part of the FleetLock protocol
MAX_BODY: Final = 16 * 1024  # bytes; Zincati's body is about 90, ours a little more
MAX_VALUE: Final = 300  # characters of a description quoted back to a client
FULL_KIND: Final = "failed_lock_semaphore_full"
LINGER_S: Final = 0.5  # seconds to read what a refused client still sends, before closing
LINGER_BYTES: Final = 1024 * 1024

# Every kind this server answers, with its HTTP status: a bounded set (clients
# use kinds as metric labels).
KINDS: Final[Mapping[str, int]] = {
    "not_found": 404,
    "method_not_allowed": 405,
    "bad_request": 400,  # an HTTP request that http.server could not parse
    "headers_too_large": 431,
    "uri_too_long": 414,
    "missing_protocol_header": 400,
    "length_required": 411,
    "body_too_large": 413,
    "invalid_json": 400,
    "invalid_client_params": 400,
    "invalid_id": 400,
    "invalid_group": 400,
    "invalid_version": 400,
    "unknown_group": 400,
    FULL_KIND: 409,
    "version_blocked": 403,
    "etcd_unavailable": 503,
    "etcd_conflict": 503,
    "etcd_refused": 500,
    "semaphore_malformed": 500,
    "internal_error": 500,
}

Endpoint = Literal["pre-reboot", "steady-state", "status"]


class ProtocolError(Exception):
    """A FleetLock error answer: ``kind`` (one of :data:`KINDS`) and a human ``value``."""

    def __init__(self, kind: str, value: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"no FleetLock error kind {kind!r}")
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value[:MAX_VALUE] or kind

    @property
    def status(self) -> int:
        return KINDS[self.kind]

    def body(self) -> bytes:
        return json.dumps({"kind": self.kind, "value": self.value}).encode()


# ---- the request, checked (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ClientParams:
    id: str
    group: str
    version: str | None = None  # ours only: the version the client is about to reboot into
    # ours only, in a steady-state: a version the client rolled back from, and why
    failed_version: str | None = None
    failure_kind: str | None = None


def route(method: str, target: str) -> Endpoint:
    """The endpoint ``method`` and ``target`` (the request line's path) ask for."""
    path = urlsplit(target).path
    wanted: dict[str, tuple[Endpoint, tuple[str, ...]]] = {
        PRE_REBOOT: ("pre-reboot", ("POST",)),
        STEADY_STATE: ("steady-state", ("POST",)),
        STATUS: ("status", ("GET", "HEAD")),
    }
    if path not in wanted:
        raise ProtocolError("not_found", f"no FleetLock endpoint at {path[:100]}")
    endpoint, methods = wanted[path]
    if method not in methods:
        raise ProtocolError("method_not_allowed", f"{path} takes {' or '.join(methods)}")
    return endpoint


def body_length(headers: Mapping[str, list[str]]) -> int:
    """The checked body length of a lock request (``headers``: lower-case name -> values)."""
    if headers.get(PROTOCOL_HEADER, []) != ["true"]:
        raise ProtocolError(
            "missing_protocol_header", f"the header {PROTOCOL_HEADER}: true is required"
        )
    if headers.get("transfer-encoding"):
        raise ProtocolError("length_required", "send the body with a Content-Length, not chunked")
    lengths = headers.get("content-length", [])
    if not lengths:
        raise ProtocolError("length_required", "a Content-Length is required")
    if len(lengths) != 1 or not lengths[0].isascii() or not lengths[0].isdigit():
        raise ProtocolError("bad_request", "Content-Length is not one whole number")
    length = int(lengths[0])
    if length > MAX_BODY:
        raise ProtocolError("body_too_large", f"the body is over {MAX_BODY} bytes")
    return length


def parse_body(body: bytes) -> ClientParams:
    """``{"client_params": {"id", "group"[, "version"]}}``, every field checked."""

    def bad_json(why: str) -> ProtocolError:
        return ProtocolError("invalid_json", f"the body is not a JSON document: {why}")

    doc: Any = load_json(body, bad_json, max_bytes=MAX_BODY)
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise ProtocolError("invalid_client_params", "client_params (a JSON object) is required")
    client_id, group, version = params.get("id"), params.get("group"), params.get("version")
    if not isinstance(client_id, str):
        raise ProtocolError("invalid_id", "client_params.id (a string) is required")
    try:
        check_holder(client_id)
    except LockError:
        raise ProtocolError("invalid_id", "client_params.id: 1-256 printable characters") from None
    if not isinstance(group, str):
        raise ProtocolError("invalid_group", "client_params.group (a string) is required")
    try:
        check_group(group)
    except LockError:
        raise ProtocolError(
            "invalid_group", "client_params.group must match [a-zA-Z0-9.-]+"
        ) from None
    failed, kind = params.get("failed_version"), params.get("failure_kind")
    for v in (version, failed):
        if v is not None and (not isinstance(v, str) or not is_valid_version(v)):
            raise ProtocolError(
                "invalid_version",
                "client_params.version and failed_version: a version like 1.2.3 "
                "(at most 64 characters)",
            )
    if (failed is None) != (kind is None) or (
        kind is not None and (not isinstance(kind, str) or not FAILURE_KIND_RE.fullmatch(kind))
    ):
        raise ProtocolError(
            "invalid_client_params",
            "client_params.failed_version and failure_kind go together; failure_kind: "
            "1-64 of [a-z0-9_]",
        )
    return ClientParams(client_id, group, version, failed, kind)


def lock_failure(exc: LockError) -> ProtocolError:
    """The answer for an etcd failure (bounded kinds; the message is for the admin)."""
    kind = {
        "unavailable": "etcd_unavailable",
        "conflict": "etcd_conflict",
        "malformed": "semaphore_malformed",
        "refused": "etcd_refused",
    }.get(exc.kind, "internal_error")
    return ProtocolError(kind, exc.message)


# ---- the failed-version seam -------------------------------------------------------------------


class FailedVersions(Protocol):
    """The versions a group must not reboot into (part 2's records in etcd).

    Both raise :class:`~updater.errors.LockError` when etcd cannot be asked: the
    request is then refused like any etcd failure (fail closed: no slot taken,
    none given back).
    """

    def blocked(self, group: str) -> Collection[str]: ...

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        """``host`` rolled back from ``version`` (idempotent per host)."""
        ...


class NoFailedVersions:
    """Nothing is blocked, nothing is recorded (a server without a store, in tests)."""

    def blocked(self, group: str) -> Collection[str]:
        return frozenset()

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        log.warning("fleetlock_failed_version_dropped", group=group, version=version, host=host)


class StoredFailedVersions:
    """The group's failed versions in etcd (policies.failed), blocked at ``max_failures``
    hosts: the same records and the same decision as the etcd-lock agents'."""

    def __init__(
        self, client: EtcdClient, max_failures: int = 1, clock: Clock | None = None
    ) -> None:
        self.client = client
        self.max_failures = max_failures
        self.clock = clock or SystemClock()
        self._stores: dict[str, FailedVersionStore] = {}

    def store(self, group: str) -> FailedVersionStore:
        if group not in self._stores:
            self._stores[group] = FailedVersionStore(self.client, group, self.max_failures)
        return self._stores[group]

    def blocked(self, group: str) -> Collection[str]:
        return frozenset(v.version for v in self.store(group).verdicts() if v.blocked)

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        # a stored value that is not a record is left as it is: it blocks the version already
        self.store(group).record(version, host, kind, self.clock.now().timestamp())


# ---- the service: decisions over the etcd lock --------------------------------------------------


class FleetLockService:
    """Answers checked requests with the etcd semaphore of each served group.

    ``groups`` maps each served group to the slot count of its semaphore when
    this server creates it (afterwards the count stored in etcd wins, as for
    every etcd-lock agent; ``updatectl lock set-max`` changes it).
    """

    def __init__(
        self,
        client: EtcdClient,
        groups: Mapping[str, int],
        *,
        failed: FailedVersions | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not groups:
            raise ValueError("serve at least one group")
        self.clock = clock or SystemClock()
        self.client = client
        self.failed: FailedVersions = failed or NoFailedVersions()
        self._locks = {
            check_group(g): EtcdLock(client, g, check_slots(n), clock=self.clock)
            for g, n in groups.items()
        }

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._locks)

    def _lock(self, group: str) -> EtcdLock:
        lock = self._locks.get(group)
        if lock is None:
            raise ProtocolError(
                "unknown_group", f"group {group} is not served here ({', '.join(self._locks)})"
            )
        return lock

    def pre_reboot(self, params: ClientParams) -> None:
        """Take a slot for ``params.id``, or raise ProtocolError."""
        lock = self._lock(params.group)
        try:
            if params.version is not None and params.version in self.failed.blocked(params.group):
                log.warning(
                    "fleetlock_version_blocked",
                    group=params.group,
                    holder=params.id,
                    version=params.version,
                )
                raise ProtocolError(
                    "version_blocked",
                    f"version {params.version} failed in group {params.group}: no reboot into it",
                )
            if not lock.acquire(params.id):
                st = lock.status()
                total = "all" if st is None else f"all {st.total_slots}"
                log.info("fleetlock_semaphore_full", group=params.group, holder=params.id)
                raise ProtocolError(
                    FULL_KIND, f"semaphore full: {total} slots of group {params.group} are locked"
                )
        except LockError as exc:
            raise self._failed("pre-reboot", params, exc) from None
        try:
            held_s, holders, total_slots = self._held(lock, params.id)
        except LockError:  # the slot is taken: only the log misses its age
            held_s, holders, total_slots = None, None, None
        log.info(
            "fleetlock_locked",
            group=params.group,
            holder=params.id,
            version=params.version,
            held_s=held_s,  # > 0: it already held the slot (a recursive lock)
            holders=holders,
            total_slots=total_slots,
        )

    def steady_state(self, params: ClientParams) -> None:
        """Give ``params.id``'s slot back (nothing to do if it holds none), or raise.

        A failed version the client reports is recorded for the group first: if
        that fails, the slot stays held (the client asks again), so no host takes
        the slot before it can see the block.
        """
        lock = self._lock(params.group)
        try:
            if params.failed_version is not None and params.failure_kind is not None:
                self.failed.record(
                    params.group, params.failed_version, params.id, params.failure_kind
                )
                log.warning(
                    "fleetlock_failed_version_recorded",
                    group=params.group,
                    holder=params.id,
                    version=params.failed_version,
                    failure_kind=params.failure_kind,
                )
            held_s, _, _ = self._held(lock, params.id)
            lock.release(params.id)
        except LockError as exc:
            raise self._failed("steady-state", params, exc) from None
        if held_s is not None:
            log.info("fleetlock_unlocked", group=params.group, holder=params.id, held_s=held_s)
        else:
            log.debug("fleetlock_unlock_not_held", group=params.group, holder=params.id)

    def status(self) -> dict[str, Any]:
        """Every served group's semaphore and failed versions (raises LockError)."""
        now = self.clock.now().timestamp()
        groups = []
        for group, lock in self._locks.items():
            st = lock.status()
            doc: dict[str, Any] = (
                st.as_dict(now)
                if st is not None
                else {"group": group, "key": lock.key, "total_slots": None, "holders": []}
            )
            doc["blocked_versions"] = sorted(self.failed.blocked(group))
            groups.append(doc)
        return {"protocol": "not FleetLock: this server's own read-only view", "groups": groups}

    def _held(self, lock: EtcdLock, holder: str) -> tuple[float | None, int | None, int | None]:
        """How long ``holder`` has held its slot (None: holds none), holders, slots."""
        st: SemaphoreStatus | None = lock.status()
        if st is None:
            return None, None, None
        now = self.clock.now().timestamp()
        for h in st.holders:
            if h.id == holder:
                age = h.age_s(now)
                return (-1.0 if age is None else round(age, 3)), len(st.holders), st.total_slots
        return None, len(st.holders), st.total_slots

    @staticmethod
    def _failed(endpoint: str, params: ClientParams, exc: LockError) -> ProtocolError:
        err = lock_failure(exc)
        log.warning(
            "fleetlock_etcd_failed",
            endpoint=endpoint,
            group=params.group,
            holder=params.id,
            kind=err.kind,
            error=exc.message,
        )
        return err


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
        if self.tls_cert is None or self.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "unreadable",
                f"cannot load the TLS certificate and key: {exc}",
                file=str(self.tls_cert),
                hint="PEM files: the certificate chain and its unencrypted private key",
            ) from None
        return ctx


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
            if lengths[0].isascii() and lengths[0].isdigit() and int(lengths[0]) <= MAX_BODY:
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
