"""The systemd notify protocol (``Type=notify`` services), without libsystemd.

The service manager passes ``NOTIFY_SOCKET``: a file system path or, with a
leading ``@``, a Linux abstract socket name. Each notification is one
``AF_UNIX`` datagram of newline-separated ``KEY=value`` assignments
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). Without
``NOTIFY_SOCKET`` every method is a no-op, so the agent runs the same outside
systemd. The environment is injectable so tests point it at a socket they read.

A notification that cannot be delivered is logged and dropped: losing a status
line must never stop the agent (systemd notices a missing ``READY=1`` or
watchdog ping on its own and acts on that).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

# STATUS= is one line and systemd shows it in `systemctl status`; keep it short.
_STATUS_MAX = 512  # characters


class Notifier:
    """``Notifier()`` reads ``os.environ``; ``Notifier(env={...}, pid=...)`` for tests."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        environ = os.environ if env is None else env
        self._address = _parse_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = environ.get("WATCHDOG_PID", "")
        self._pid = os.getpid() if pid is None else pid
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``NOTIFY_SOCKET`` is set and usable)."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``READY=1``), optionally with the first status line."""
        return self.notify("READY=1", *(() if status is None else (_status(status),)))

    def status(self, text: str) -> bool:
        """Free-form one-line status (``systemctl show -p StatusText``)."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (``STOPPING=1``)."""
        return self.notify("STOPPING=1", *(() if status is None else (_status(status),)))

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram. True if it was sent."""
        if self._address is None or not assignments:
            return False
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a single KEY=value assignment: {a!r}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # never block the event loop on a slow reader: drop and log instead
            self._sock.sendto("\n".join(assignments).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            log.warning(
                "sd_notify_failed",
                socket=_printable(self._address),
                assignment=assignments[0],
                error=str(exc),
            )
            return False
        return True

    def watchdog_interval_s(self) -> float | None:
        """The service's watchdog timeout in seconds (``WatchdogSec=``), or None when
        the watchdog is off or meant for another process (``WATCHDOG_PID``).
        Ping at half of it."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != self._pid:
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("watchdog_usec_invalid", value=self._watchdog_usec)
            return None
        return usec / 1_000_000 if usec > 0 else None

    async def watchdog_loop(self) -> None:
        """Ping the watchdog at half its interval until cancelled; returns at once when
        there is no watchdog. Runs on the event loop, so a stuck loop stops pinging
        and systemd restarts the service."""
        interval = self.watchdog_interval_s()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _parse_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace: a leading NUL byte
    if value.startswith("/"):
        return value
    # e.g. systemd 253's "vsock:CID:PORT", which only VMs get; we do not speak it
    log.warning("notify_socket_unsupported", socket=value)
    return None


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address


def _status(text: str) -> str:
    line = " ".join(text.split())
    return "STATUS=" + line[:_STATUS_MAX]
