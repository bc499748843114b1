"""The real daemon, as systemd runs it: `updatectl agent` in a subprocess, on a
private dbus-daemon with our policy, a captured NOTIFY_SOCKET, a watchdog,
metrics on a Unix socket, and a logind (which cannot reboot here) that records
the reboot it is asked for. Two updates: one blessed, one whose health check
fails, is marked bad, comes back on the old slot and is then refused."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from prometheus_client.parser import text_string_to_metric_families

from devtools.dbusdaemon import PrivateBus
from devtools.diskimage import cgpt_flags
from devtools.fake_logind import FakeLogindProcess
from devtools.host import Host
from partitions.bootcontrol import SlotFlags
from tests.conftest import NotifySocket, Repo, wait_for
from tests.dbus_support import POLICY, add_match, connect

UPDATECTL = str(Path(sys.executable).with_name("updatectl"))

pytestmark = pytest.mark.root  # only root may own the agent's bus name (our policy)


class Signals:
    """A D-Bus client recording PropertiesChanged(State) and StatusUpdate, in a thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.states: list[str] = []
        self.coreos: list[str] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        bus = await connect(self.address)
        self._stop = asyncio.Event()

        def handler(msg: Message) -> None:
            if msg.message_type != MessageType.SIGNAL:
                return
            if msg.member == "PropertiesChanged" and msg.body[0] == "org.updater.Agent1":
                if "State" in msg.body[1]:
                    self.states.append(msg.body[1]["State"].value)
            elif msg.member == "StatusUpdate":
                self.coreos.append(msg.body[2])

        bus.add_message_handler(handler)
        for rule in (
            "type='signal',interface='org.freedesktop.DBus.Properties'",
            "type='signal',interface='com.coreos.update1.Manager'",
        ):
            await add_match(bus, rule)
        self._ready.set()
        await self._stop.wait()
        bus.disconnect()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def dbus_call(address: str, dest: str, path: str, iface: str, member: str) -> Any:
    bus = await connect(address)
    try:
        reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member))
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
        return reply.body
    finally:
        bus.disconnect()


def scrape(path: Path) -> dict[str, float]:
    conn = http.client.HTTPConnection("localhost", timeout=5)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(path))
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Daemon:
    def __init__(self, host: Host, bus: PrivateBus, notify: Path, log: Path) -> None:
        self.log = log
        env = {**os.environ, **bus.env(), "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"}
        env.pop("JOURNAL_STREAM", None)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [UPDATECTL, "--config", str(host.config), "agent", "--log", "json"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
            )
        env["WATCHDOG_PID"] = str(self.proc.pid)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def world(tmp_path: Path, host: Host) -> Iterator[dict[str, Any]]:
    health = tmp_path / "health.d"
    health.mkdir()
    metrics = tmp_path / "metrics.sock"
    host.config.write_text(
        host.config.read_text()
        + f"""
[reboot]
strategy = "immediate"

[health]
checks_dir = "{health}"
timeout_s = 5

[metrics]
listen = "unix:{metrics}"
"""
    )
    text = host.config.read_text().replace(
        "[agent]\n", "[agent]\nfirst_check_delay_s = 0.2\ncoreos_compat = true\n"
    )
    host.config.write_text(text)
    with (
        PrivateBus(policy_files=(POLICY,)) as bus,
        FakeLogindProcess(bus.address, tmp_path / "logind.jsonl") as logind,
    ):
        notify = NotifySocket(tmp_path / "notify.sock")
        signals = Signals(bus.address)
        daemons: list[Daemon] = []
        try:
            yield {
                "bus": bus,
                "logind": logind,
                "notify": notify,
                "signals": signals,
                "health": health,
                "metrics": metrics,
                "daemons": daemons,
            }
        finally:
            for d in daemons:
                d.kill()
            signals.close()
            notify.close()


def start(world: dict[str, Any], host: Host, tmp_path: Path) -> Daemon:
    d = Daemon(host, world["bus"], world["notify"].path, tmp_path / "agent.log")
    world["daemons"].append(d)
    return d


def mark_good(host: Host, world: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UPDATECTL, "--config", str(host.config), "mark-good", "--json"],
        env={**os.environ, **world["bus"].env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_daemon_end_to_end(
    world: dict[str, Any], host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    logind, notify, signals = world["logind"], world["notify"], world["signals"]
    repo.publish("1.1.0", usr_images["1.1.0"])

    # 1. idle -> ... -> UPDATED_NEED_REBOOT, and the reboot is asked of logind
    daemon = start(world, host, tmp_path)
    wait_for(lambda: len(logind.reboots()) == 1, what="the first reboot")
    expected = [
        "CHECKING_FOR_UPDATE",
        "UPDATE_AVAILABLE",
        "DOWNLOADING",
        "VERIFYING",
        "FINALIZING",
        "UPDATED_NEED_REBOOT",
    ]
    wait_for(lambda: signals.states[-1:] == ["UPDATED_NEED_REBOOT"], what="the signal")
    assert [s for s in signals.states if s in expected] == expected
    assert signals.coreos[-1] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
    assert "UPDATE_STATUS_DOWNLOADING" in signals.coreos
    assert notify.assignments("READY") == ["1"]
    statuses = notify.assignments("STATUS")
    assert statuses[0] == "Idle, booted USR-A 1.0.0"
    assert "Checking for an update, booted USR-A 1.0.0" in statuses
    assert any(s.startswith("Downloading 1.1.0:") for s in statuses)
    assert statuses[-1] == "Update 1.1.0 staged, waiting for a reboot"
    wait_for(lambda: len(notify.assignments("WATCHDOG")) >= 2, what="watchdog pings")
    got = asyncio.run(
        dbus_call(
            world["bus"].address,
            "com.coreos.update1",
            "/com/coreos/update1",
            "com.coreos.update1.Manager",
            "GetStatus",
        )
    )
    assert got[2:4] == ["UPDATE_STATUS_UPDATED_NEED_REBOOT", "1.1.0"] and got[0] > 0
    status = subprocess.run(
        [UPDATECTL, "--config", str(host.config), "status", "--json"],
        env={**os.environ, **world["bus"].env()},
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(status.stdout)
    assert doc["agent"]["state"] == "UPDATED_NEED_REBOOT"
    assert doc["agent"]["staged_version"] == "1.1.0" and doc["state"] == "update_staged"
    m = scrape(world["metrics"])
    assert m["updater_state{state=UPDATED_NEED_REBOOT}"] == 1
    assert m["updater_reboots_requested_total"] == 1
    assert (host.root / "reboot-required").exists()
    assert daemon.stop() < 5
    assert notify.assignments("STOPPING") == ["1"]
    events = {e["event"] for e in daemon.events()}
    assert {
        "agent_started",
        "update_checked",
        "install_started",
        "update_staged",
        "reboot_requested",
        "agent_stopped",
    } <= events

    # 2. the machine reboots into B; the health checks pass; B is blessed
    assert host.reboot() == "USR-B"
    (world["health"] / "10-ok").write_text("#!/bin/sh\nexit 0\n")
    (world["health"] / "10-ok").chmod(0o755)
    r = mark_good(host, world)
    assert r.returncode == 0, r.stderr
    assert cgpt_flags(host.disk, 2) == SlotFlags(2, 0, True)

    # 3. a second update whose health check fails on its trial boot
    repo.publish("1.2.0", usr_images["1.2.0"])
    daemon = start(world, host, tmp_path)
    wait_for(lambda: len(logind.reboots()) == 2, what="the second reboot")
    assert daemon.stop() < 5
    assert host.reboot() == "USR-A"
    (world["health"] / "20-broken").write_text("#!/bin/sh\necho 'app is down' >&2\nexit 3\n")
    (world["health"] / "20-broken").chmod(0o755)
    r = mark_good(host, world)
    assert r.returncode == 9, r.stderr
    assert json.loads(r.stdout)["error"]["kind"] == "check_failed"
    assert "20-broken" in r.stderr
    assert cgpt_flags(host.disk, 1) == SlotFlags(0, 0, False)  # A: never again
    wait_for(lambda: len(logind.reboots()) == 3, what="the fallback reboot")
    assert host.reboot() == "USR-B"  # back on the old slot

    # 4. the agent reports the rollback and refuses that version
    image_gets = len([q for q in repo.server.requests if "/images/1.2.0/" in q.path])
    daemon = start(world, host, tmp_path)
    wait_for(
        lambda: any(
            e["event"] == "update_checked" and e.get("failed_before") for e in daemon.events()
        ),
        what="the refusing check",
    )
    # update_checked is logged as the check ends; the machine turns idle just after
    wait_for(
        lambda: scrape(world["metrics"])["updater_state{state=IDLE}"] == 1,
        what="the agent idle after the refusing check",
    )
    assert scrape(world["metrics"])["updater_rollbacks_total"] == 1
    assert daemon.stop() < 5
    assert len([q for q in repo.server.requests if "/images/1.2.0/" in q.path]) == image_gets
    assert any(
        e["event"] == "rollback_detected" and e["failed_version"] == "1.2.0"
        for e in daemon.events()
    )
    state = json.loads((host.state_dir / "state.json").read_text())
    assert state["failed_versions"] == ["1.2.0"]
    assert len(logind.reboots()) == 3
