"""Prometheus metrics of the agent, served over loopback HTTP or a Unix socket.

The agent owns one :class:`Metrics` (its own ``CollectorRegistry``, never the
process-global one, so tests and several agents in one process do not mix) and
calls its methods as things happen. ``serve()`` exposes it in the Prometheus
text format on ``/metrics``; only a loopback address or a Unix socket is
accepted: the numbers are not secret, but the agent has no business listening
on the network.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import choose_encoder

from updater import errors
from updater.agentapi import STATES
from updater.errors import ConfigError, RefusedError
from updater.listen import ListenAddress, parse_listen

log = structlog.get_logger(__name__)

OTHER_KIND = "other"  # label value for an error kind we do not know (keeps labels bounded)
# kinds the agent counts that are not UpdaterError kinds
AGENT_KINDS = frozenset({"policy"})  # a reboot strategy failed (and so said no)
_REQUEST_TIMEOUT_S = 10.0  # a scraper that stalls longer is dropped
_SOCKET_MODE = 0o660


def error_kinds() -> frozenset[str]:
    """Every ``kind`` of every UpdaterError category, plus AGENT_KINDS: the bounded
    label set."""
    kinds: set[str] = set(AGENT_KINDS)
    todo: list[type[errors.UpdaterError]] = [errors.UpdaterError]
    while todo:
        cls = todo.pop()
        kinds |= cls.kinds
        todo.extend(cls.__subclasses__())
    return frozenset(kinds)


class Metrics:
    """What the daemon counts. Thread-safe (prometheus-client locks each value)."""

    def __init__(self, states: Iterable[str] = STATES, kinds: frozenset[str] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.states = tuple(states)
        self.kinds = error_kinds() if kinds is None else kinds
        r = self.registry
        self._state = Gauge(
            "updater_state",
            "1 for the agent's current state, 0 for the others",
            ["state"],
            registry=r,
        )
        for s in self.states:
            self._state.labels(state=s).set(0)
        self._state_changed = Gauge(
            "updater_last_state_change_timestamp_seconds",
            "Unix time of the last state change",
            registry=r,
        )
        self._last_check = Gauge(
            "updater_last_check_timestamp_seconds",
            "Unix time of the last successful update check (0: none yet)",
            registry=r,
        )
        self._checks = Counter(
            "updater_checks", "Update checks finished, successful or not", registry=r
        )
        self._check_failures = Counter(
            "updater_check_failures",
            "Update checks that failed, by error kind",
            ["kind"],
            registry=r,
        )
        self._errors = Counter(
            "updater_errors",
            "Errors of any step (failed checks included), by kind",
            ["kind"],
            registry=r,
        )
        self._installs = Counter("updater_installs", "Updates installed into a slot", registry=r)
        self._install_bytes = Counter(
            "updater_installed_bytes", "Raw image bytes written by installs", registry=r
        )
        self._install_seconds = Counter(
            "updater_install_seconds", "Seconds spent in successful installs", registry=r
        )
        self._rollbacks = Counter(
            "updater_rollbacks",
            "Boots that came back on the old slot after an update",
            registry=r,
        )
        self._rollback_version = Gauge(
            "updater_last_rollback_info",
            "The version of the last update rolled back",
            ["version"],
            registry=r,
        )
        self._reboots_requested = Counter(
            "updater_reboots_requested", "Reboots the agent asked for", registry=r
        )
        self._reboots_refused = Counter(
            "updater_reboots_refused", "Reboots refused (inhibitors, logind errors)", registry=r
        )
        self._users_waited_for = Gauge(
            "updater_reboot_waiting_for_users",
            "Interactive user sessions the staged reboot waits for ([reboot] wait_for_users)",
            registry=r,
        )
        self._version_blocked = Gauge(
            "updater_version_blocked",
            "1 while the agent refuses a version that failed on hosts of its group",
            ["version"],
            registry=r,
        )
        self._held = Gauge(
            "updater_held",
            "1 while an admin holds this host (`updatectl hold`): no installs",
            registry=r,
        )
        self._held_until = Gauge(
            "updater_held_until_timestamp_seconds",
            "Unix time the hold ends (0: until `updatectl unhold`, or not held)",
            registry=r,
        )
        self._skipped = Gauge(
            "updater_version_skipped",
            "1 for each version an admin refused on this host (`updatectl skip`)",
            ["version"],
            registry=r,
        )
        self._pin = Gauge(
            "updater_pin_info",
            "1, labelled with [source] pin, while this host is pinned to a line",
            ["pin"],
            registry=r,
        )
        self._policy_shown: tuple[float | None, tuple[str, ...], str] = (None, (), "")
        self._held.set(0)
        # The cluster lock as a host waiting for a slot last read it: only waiting
        # hosts export these, so max by (group) over the fleet is the stuck holder.
        self._lock_holders = Gauge(
            "updater_lock_holders",
            "Holders of the group's reboot lock, as read while waiting for a slot",
            ["group"],
            registry=r,
        )
        self._lock_slots = Gauge(
            "updater_lock_slots",
            "Slots of the group's reboot lock, as read while waiting for a slot",
            ["group"],
            registry=r,
        )
        self._lock_oldest = Gauge(
            "updater_lock_oldest_holder_age_seconds",
            "How long the oldest holder has held its slot (from its start time, at scrape "
            "time), as read while waiting for a slot",
            ["group"],
            registry=r,
        )
        # this host's own use of the reboot lock (policies.rebootlock, any lock kind)
        self._lock_held = Gauge(
            "updater_lock_slot_held",
            "1 while this host holds a slot of its group's reboot lock",
            ["group"],
            registry=r,
        )
        self._lock_held_s = Gauge(
            "updater_lock_held_seconds",
            "How long this host has held its reboot slot (0: it holds none)",
            ["group"],
            registry=r,
        )
        self._lock_wait_s = Gauge(
            "updater_lock_waiting_seconds",
            "How long this host has waited for a reboot slot (0: it does not wait)",
            ["group"],
            registry=r,
        )
        self._lock_errors = Counter(
            "updater_lock_errors",
            "Requests to the reboot lock that failed, by error kind",
            ["group", "kind"],
            registry=r,
        )
        self._lock_times: dict[str, tuple[float | None, float | None]] = {}  # held, waiting since
        self._lock_mutex = threading.Lock()

    # ---- what the daemon calls ---------------------------------------------------------------

    def state_changed(self, state: str, when: float) -> None:
        if state not in self.states:
            raise ValueError(f"unknown state {state!r}")
        for s in self.states:
            self._state.labels(state=s).set(1 if s == state else 0)
        self._state_changed.set(when)

    def checked(self, when: float) -> None:
        """A check finished successfully at ``when`` (unix seconds)."""
        self._checks.inc()
        self._last_check.set(when)

    def check_failed(self, kind: str) -> None:
        """A check failed; counted in the errors too (do not also call ``error``)."""
        k = self._bounded(kind)
        self._checks.inc()
        self._check_failures.labels(kind=k).inc()
        self._errors.labels(kind=k).inc()

    def error(self, kind: str) -> None:
        """Any other failed step (download, install, reboot, state, health)."""
        self._errors.labels(kind=self._bounded(kind)).inc()

    def installed(self, raw_bytes: int, seconds: float) -> None:
        self._installs.inc()
        self._install_bytes.inc(raw_bytes)
        self._install_seconds.inc(seconds)

    def rollback(self, version: str) -> None:
        self._rollbacks.inc()
        self._rollback_version.clear()  # one series: the latest
        self._rollback_version.labels(version=version).set(1)

    def reboot_requested(self) -> None:
        self._reboots_requested.inc()

    def reboot_refused(self) -> None:
        self._reboots_refused.inc()

    def users_waited_for(self, sessions: int) -> None:
        self._users_waited_for.set(sessions)

    def version_blocked(self, version: str, blocked: bool) -> None:
        """``version`` is refused (or no longer is): one series per refused version."""
        if blocked:
            self._version_blocked.labels(version=version).set(1)
        else:
            with contextlib.suppress(KeyError):
                self._version_blocked.remove(version)

    def host_policy(self, held_until: float | None, skipped: tuple[str, ...], pin: str) -> None:
        """The admin's decisions for this host: held (``held_until``: None not held, 0
        until unhold, else unix time), the versions it skips, its pin ("" none)."""
        shown = (held_until, skipped, pin)
        if shown == self._policy_shown:
            return
        before = self._policy_shown
        self._policy_shown = shown
        self._held.set(0 if held_until is None else 1)
        self._held_until.set(held_until or 0)
        for version in set(before[1]) - set(skipped):
            with contextlib.suppress(KeyError):
                self._skipped.remove(version)
        for version in skipped:
            self._skipped.labels(version=version).set(1)
        if before[2] and before[2] != pin:
            with contextlib.suppress(KeyError):
                self._pin.remove(before[2])
        if pin:
            self._pin.labels(pin=pin).set(1)

    def lock_waiting(
        self, group: str, holders: int, slots: int, oldest_since: float | None
    ) -> None:
        """This host waits for a slot of ``group``'s lock, which ``holders`` hold since
        ``oldest_since`` at the earliest (unix seconds; None: no holder of known age)."""
        self._lock_holders.labels(group=group).set(holders)
        self._lock_slots.labels(group=group).set(slots)
        if oldest_since is None:
            with contextlib.suppress(KeyError):
                self._lock_oldest.remove(group)
            return
        since = oldest_since
        self._lock_oldest.labels(group=group).set_function(lambda: max(0.0, time.time() - since))

    def lock_not_waiting(self, group: str) -> None:
        """This host holds a slot (or no longer asks): it reports no holders' ages."""
        for gauge in (self._lock_holders, self._lock_slots, self._lock_oldest):
            with contextlib.suppress(KeyError):
                gauge.remove(group)

    def lock_state(self, group: str, *, held: bool, waiting: bool, now: float) -> None:
        """This host holds a slot of ``group`` (since the first ``held`` report), or waits
        for one (since the first ``waiting`` report), or neither; ``now``: monotonic
        seconds, the clock the durations are read with at scrape time."""
        with self._lock_mutex:
            held_since, wait_since = self._lock_times.get(group, (None, None))
            held_since = (held_since if held_since is not None else now) if held else None
            wait_since = (wait_since if wait_since is not None else now) if waiting else None
            self._lock_times[group] = (held_since, wait_since)
        self._lock_held.labels(group=group).set(1 if held else 0)
        self._lock_held_s.labels(group=group).set_function(lambda: self._lock_age(group, 0))
        self._lock_wait_s.labels(group=group).set_function(lambda: self._lock_age(group, 1))

    def _lock_age(self, group: str, which: int) -> float:
        with self._lock_mutex:
            since = self._lock_times.get(group, (None, None))[which]
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def lock_error(self, group: str, kind: str) -> None:
        self._lock_errors.labels(group=group, kind=self._bounded(kind)).inc()

    # ---- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format, as served."""
        return generate_latest(self.registry)

    def serve(self, listen: str) -> MetricsServer:
        """Serve ``/metrics`` on ``listen`` (see :func:`parse_listen`; port 0: any free one)
        from a thread."""
        return MetricsServer(self.registry, parse_listen(listen, allow_port_zero=True))

    def _bounded(self, kind: str) -> str:
        return kind if kind in self.kinds else OTHER_KIND


# ---- the HTTP server ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = _REQUEST_TIMEOUT_S
    server_version = "updater-metrics"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            self._reply(200, b"updater metrics: /metrics\n", "text/plain; charset=utf-8")
            return
        if path != "/metrics":
            self._reply(404, b"not found; try /metrics\n", "text/plain; charset=utf-8")
            return
        registry: CollectorRegistry = getattr(self.server, "registry")  # noqa: B009
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._reply(200, encoder(registry), content_type)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the request threads

    def __init__(self, address: ListenAddress, registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.registry = registry
        super().__init__((address.host, address.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's name (getfqdn): not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, path: Path, registry: CollectorRegistry) -> None:
        self.path = path
        self.registry = registry
        self.inode = 0
        super().__init__(str(path), _Handler)

    def server_bind(self) -> None:
        # Bind under a temporary name, set the mode, then rename over the final
        # name: no moment with a wrong mode, and a stale socket is replaced atomically.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, _SOCKET_MODE)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.inode = os.stat(self.path).st_ino


def _check_unix_path(path: Path) -> None:
    """Refuse to clobber a file that is not a socket, or a live socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            "invalid",
            f"metrics socket {path} exists and is not a socket",
            hint="remove it or choose another path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        log.info("metrics_stale_socket_replaced", path=str(path))
        return
    finally:
        probe.close()
    raise RefusedError(
        "busy",
        f"another process serves metrics on {path}",
        hint="stop it, or choose another metrics address",
    )


class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it and removes its socket."""

    def __init__(self, registry: CollectorRegistry, address: ListenAddress) -> None:
        self._server: _TCPServer | _UnixServer
        if address.family == "unix":
            assert address.path is not None
            address.path.parent.mkdir(parents=True, exist_ok=True)
            _check_unix_path(address.path)
            self._server = _UnixServer(address.path, registry)
            self.address = address
        else:
            self._server = _TCPServer(address, registry)
            host, port = self._server.server_address[:2]
            self.address = ListenAddress("tcp", host=str(host), port=int(port))
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._closed = False
        self._thread.start()
        log.info("metrics_serving", address=str(self.address))

    def _serve(self) -> None:
        # Wait on the listening socket and a wake-up pipe: no idle polling, and
        # close() returns at once.
        with selectors.DefaultSelector() as sel:
            sel.register(self._server.socket, selectors.EVENT_READ, "accept")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    try:
                        self._server.handle_request()
                    except Exception as exc:  # one bad connection must not stop serving
                        log.warning("metrics_request_failed", error=str(exc))

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` (TCP) or the socket path's ``unix:`` form."""
        if self.address.family == "unix":
            return str(self.address)
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._server.server_close()  # joins request threads
        os.close(self._wake_r)
        os.close(self._wake_w)
        if isinstance(self._server, _UnixServer):
            path = self._server.path
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == self._server.inode:  # still ours
                    path.unlink()
        log.info("metrics_stopped", address=str(self.address))

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
