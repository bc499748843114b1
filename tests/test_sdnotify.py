"""sd_notify over a real AF_UNIX datagram socket that the test binds and reads."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from updater.sdnotify import Notifier


class Listener:
    """A service manager's notify socket: bound here, read by the test."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)

    def recv(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(2)
        return True


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify")
    lst = Listener(path)
    try:
        yield lst, path
    finally:
        lst.sock.close()


def test_messages_arrive_as_datagrams(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    with Notifier(env={"NOTIFY_SOCKET": path}) as n:
        assert n.enabled
        assert n.ready()
        assert lst.recv() == ["READY=1"]
        assert n.ready(status="idle, next check in 5 min")
        assert lst.recv() == ["READY=1", "STATUS=idle, next check in 5 min"]
        assert n.status("DOWNLOADING 1.2.0\n  42%")
        assert lst.recv() == ["STATUS=DOWNLOADING 1.2.0 42%"]  # one line
        assert n.watchdog()
        assert lst.recv() == ["WATCHDOG=1"]
        assert n.stopping()
        assert lst.recv() == ["STOPPING=1"]
        assert n.status("x" * 2000)
        assert len(lst.recv()[0]) == len("STATUS=") + 512
        with pytest.raises(ValueError, match="KEY=value"):
            n.notify("READY=1\nSTOPPING=1")


def test_abstract_socket_address() -> None:
    name = f"updater-test-{uuid.uuid4().hex}"
    lst = Listener(b"\0" + name.encode())
    try:
        with Notifier(env={"NOTIFY_SOCKET": "@" + name}) as n:
            assert n.ready()
        assert lst.recv() == ["READY=1"]
    finally:
        lst.sock.close()


def test_no_notify_socket_is_a_noop() -> None:
    with Notifier(env={}) as n:
        assert not n.enabled
        assert not n.ready()
        assert not n.status("idle")
        assert not n.watchdog()
        assert not n.stopping()
        assert n.watchdog_interval_s() is None


def test_unsupported_address_is_a_noop() -> None:
    with capture_logs() as logs, Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"}) as n:
        assert not n.ready()
    assert logs[0]["event"] == "notify_socket_unsupported"


def test_unreachable_socket_is_logged_not_raised(tmp_path: Path) -> None:
    with capture_logs() as logs, Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) as n:
        assert not n.ready()
    assert logs[0]["event"] == "sd_notify_failed"
    assert logs[0]["assignment"] == "READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 20.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env=env, pid=4242).watchdog_interval_s() == expected


def test_watchdog_pid_defaults_to_ours() -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env=env).watchdog_interval_s() == 1.0


def test_watchdog_loop_pings_at_half_the_interval(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})

    async def run() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(n.watchdog_loop())
        start = loop.time()
        for _ in range(3):
            assert await loop.run_in_executor(None, lst.recv) == ["WATCHDOG=1"]
        elapsed = loop.time() - start
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return elapsed

    try:
        elapsed = asyncio.run(run())
    finally:
        n.close()
    assert 0.15 <= elapsed < 1.0  # pings at 0, 0.1, 0.2 s


def test_watchdog_loop_returns_without_watchdog(listener: tuple[Listener, str]) -> None:
    lst, path = listener
    with Notifier(env={"NOTIFY_SOCKET": path}) as n:
        asyncio.run(asyncio.wait_for(n.watchdog_loop(), 1))
    assert not lst.pending()
