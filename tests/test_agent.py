"""The agent daemon in-process: real Updater, disk image, loopback repository,
sd_notify over a real datagram socket; the reboot (which cannot happen here)
recorded by a Rebooter that implements the real port."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from devtools.repo_server import Fault
from partitions.bootcontrol import Slot
from policies.strategy import Immediate, Off, RebootStrategy
from tests.conftest import NotifySocket, Repo
from updater import compose, config
from updater.agent import Agent, wait_any
from updater.agentapi import AgentStatus
from updater.errors import RefusedError
from updater.machine import Timing
from updater.sdnotify import Notifier

FAST = Timing(
    poll_interval_s=3600,
    first_check_delay_s=0.01,
    jitter=0.0,
    retry_base_s=60,
    retry_cap_s=3600,
    reboot_retry_s=0.3,
    min_interval_s=1,
)


class RecordingRebooter:
    """The reboot cannot happen here: record it (and refuse when told to)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.refuse = False

    async def reboot(self) -> None:
        self.calls.append(time.monotonic())
        if self.refuse:
            raise RefusedError("reboot_refused", "a shutdown inhibitor is held")


class VirtualClock:
    """Time that jumps to the next deadline instead of waiting for it."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def monotonic(self) -> float:
        return self.t

    async def wait(self, timeout: float | None, *events: asyncio.Event) -> None:
        if any(e.is_set() for e in events):
            return
        if timeout is None:  # work under way in a thread: really wait for it
            await wait_any(None, *events)
            return
        self.t += timeout
        await asyncio.sleep(0)


class Harness:
    def __init__(
        self,
        host: Host,
        notify: NotifySocket,
        strategy: RebootStrategy,
        timing: Timing = FAST,
        clock: VirtualClock | None = None,
    ) -> None:
        self.cfg = config.load(host.config)
        self.updater = compose.updater(self.cfg)
        self.rebooter = RecordingRebooter()
        self.statuses: list[AgentStatus] = []
        self.blessed: list[Slot] = []

        async def bless() -> Slot:
            slot = await asyncio.to_thread(self.updater.mark_good)
            self.blessed.append(slot)
            return slot

        kw = {} if clock is None else {"clock": clock, "waiter": clock.wait}
        self.agent = Agent(
            updater=self.updater,
            strategy=strategy,
            rebooter=self.rebooter,
            bless=bless,
            clock=kw.pop("clock", self.updater.clock),  # type: ignore[arg-type]
            notifier=Notifier(env={"NOTIFY_SOCKET": str(notify.path)}),
            timing=timing,
            **kw,  # type: ignore[arg-type]
        )
        self.agent.subscribe(self.statuses.append)
        self.stop = asyncio.Event()

    @property
    def states(self) -> list[str]:
        out: list[str] = []
        for s in self.statuses:
            if not out or out[-1] != s.state:
                out.append(s.state)
        return out


@asynccontextmanager
async def running(h: Harness) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(h.agent.run(h.stop))
    try:
        yield task
    finally:
        h.stop.set()
        await asyncio.wait_for(task, 10)


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


def run_until(h: Harness, cond: Callable[[], bool]) -> None:
    """Run the agent until ``cond`` holds, then stop it."""

    async def go() -> None:
        async with running(h):
            await until(cond)

    asyncio.run(go())


def image_gets(repo: Repo) -> int:
    return len([r for r in repo.server.requests if "/images/" in r.path])


def test_installs_and_reboots(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Immediate())

    run_until(h, lambda: len(h.rebooter.calls) >= 1)
    assert h.states == [
        "IDLE",
        "CHECKING_FOR_UPDATE",
        "UPDATE_AVAILABLE",
        "DOWNLOADING",
        "VERIFYING",
        "FINALIZING",
        "UPDATED_NEED_REBOOT",
    ]
    final = h.statuses[-1]
    assert (final.staged_version, final.new_version, final.booted_slot) == (
        "1.1.0",
        "1.1.0",
        "USR-A",
    )
    assert final.last_check_time > 0 and final.progress == 1.0
    messages = notify.drain()
    assert messages[0].startswith("READY=1") or "READY=1" in messages
    texts = [m for m in messages if m.startswith("STATUS=")]
    assert "STATUS=Idle, booted USR-A 1.0.0" in texts
    assert any(t.startswith("STATUS=Downloading 1.1.0") for t in texts)
    assert "STATUS=Update 1.1.0 staged, waiting for a reboot" in texts
    assert messages[-1].startswith("STOPPING=1")
    assert cgpt_flags(host.disk, 2).priority == 2
    assert (host.root / "reboot-required").exists()
    assert (host.root / "reboot-required.pkgs").read_text() == "updater-demo 1.1.0\n"
    assert host.reboot() == "USR-B"


def test_strategy_off_stages_only_and_reboot_now_forces(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Off())

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
            await asyncio.sleep(1.0)  # several reboot-retry periods: the policy says no
            assert h.rebooter.calls == []
            await h.agent.reboot_now()
            assert len(h.rebooter.calls) == 1

    asyncio.run(scenario())


def test_refused_reboot_is_retried_and_counted(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Immediate())
    h.rebooter.refuse = True

    async def scenario() -> None:
        async with running(h):
            await until(lambda: len(h.rebooter.calls) >= 2)
            with pytest.raises(RefusedError):
                await h.agent.reboot_now()

    asyncio.run(scenario())
    st = h.agent.status()
    assert st.state == "UPDATED_NEED_REBOOT" and st.last_error_kind == "reboot_refused"
    assert h.agent._m.reboot_refusals >= 3  # counted in the machine (and the metric)
    gaps = [b - a for a, b in zip(h.rebooter.calls, h.rebooter.calls[1:], strict=False)]
    assert min(gaps[:1]) >= 0.25  # retried after reboot_retry_s, not in a tight loop


def test_check_while_one_runs_is_a_no_op(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    repo.server.fault(repo.image_path(), Fault(chunk_delay_s=0.02))
    h = Harness(host, notify, Off())

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "DOWNLOADING")
            for _ in range(3):
                await h.agent.check_now()
                await h.agent.install_now()
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")

    asyncio.run(scenario())
    assert image_gets(repo) == 1
    manifests = [r for r in repo.server.requests if r.path == "/stable/release.json"]
    assert len(manifests) == 1


def test_stop_during_install_then_resume(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    repo.server.fault(repo.image_path(), Fault(chunk_delay_s=0.05))
    h = Harness(host, notify, Off())

    async def stop_midway() -> float:
        task = asyncio.create_task(h.agent.run(h.stop))
        await until(lambda: h.agent.status().state == "DOWNLOADING")
        started = time.monotonic()
        h.stop.set()
        await asyncio.wait_for(task, 10)
        return time.monotonic() - started

    assert asyncio.run(stop_midway()) < 5
    assert not cgpt_flags(host.disk, 2).bootable
    saved = json.loads((host.state_dir / "state.json").read_text())
    assert saved["agent"]["state"] == "DOWNLOADING"

    repo.server.clear_faults()
    h2 = Harness(host, notify, Off())

    run_until(h2, lambda: h2.agent.status().state == "UPDATED_NEED_REBOOT")
    assert h2.states[:2] == ["IDLE", "CHECKING_FOR_UPDATE"]
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw


def test_staged_update_survives_a_restart(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Off())

    run_until(h, lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
    h2 = Harness(host, notify, Off())

    async def restart() -> None:
        async with running(h2):
            await until(lambda: bool(h2.statuses))
            assert h2.statuses[0].state == "UPDATED_NEED_REBOOT"
            assert h2.statuses[0].staged_version == "1.1.0"

    asyncio.run(restart())
    assert image_gets(repo) == 1


def test_rollback_detected_and_that_version_refused(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Off())

    run_until(h, lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
    assert host.reboot() == "USR-B"  # the trial boot ...
    assert host.reboot() == "USR-A"  # ... never blessed: the firmware falls back
    (host.root / "reboot-required").write_text("")  # a stale sentinel from before
    h2 = Harness(host, notify, Off())

    run_until(h2, lambda: h2.agent.status().last_check_time > 0)
    saved = json.loads((host.state_dir / "state.json").read_text())
    assert saved["failed_versions"] == ["1.1.0"]
    assert h2.agent.status().state == "IDLE"  # 1.1.0 is not offered again
    assert image_gets(repo) == 1
    assert not (host.root / "reboot-required").exists()

    repo.publish("1.2.0", usr_images["1.2.0"])  # a newer one installs
    h3 = Harness(host, notify, Off())

    run_until(h3, lambda: h3.agent.status().state == "UPDATED_NEED_REBOOT")
    assert h3.agent.status().staged_version == "1.2.0"


def test_trial_boot_is_not_updated_until_blessed(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Off())

    run_until(h, lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
    assert host.reboot() == "USR-B"
    repo.publish("1.2.0", usr_images["1.2.0"])
    h2 = Harness(host, notify, Off())

    async def trial() -> None:
        async with running(h2):
            # a poll comes and goes without a check of the server
            await until(
                lambda: "CHECKING_FOR_UPDATE" in h2.states and h2.agent.status().state == "IDLE",
                timeout=5,
            )
            assert image_gets(repo) == 1  # nothing downloaded onto the fallback slot
            await h2.agent.mark_good()
            assert h2.blessed and h2.blessed[0].label == "USR-B"
            await h2.agent.check_now()
            await until(lambda: h2.agent.status().state == "UPDATED_NEED_REBOOT")

    asyncio.run(trial())
    assert h2.agent.status().staged_version == "1.2.0"
    assert h2.agent.status().booted_version == "1.1.0"


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500),
        Fault(status=503),
        Fault(body=b"<html>garbage</html>"),
        Fault(body=b"\x00" * 70_000),
        Fault(delay_s=3.0),  # hangs: the read timeout (0.2 s here) fires
    ],
    ids=["500", "503", "garbage", "huge", "hanging"],
)
def test_a_bad_server_for_a_whole_day(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket, fault: Fault
) -> None:
    """The agent keeps running, backs off up to the cap, and never loops tightly."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    repo.server.fault("/stable/release.json", fault)
    text = host.config.read_text()
    host.config.write_text(
        text.replace("[source]\n", "[source]\nretries = 0\nread_timeout_s = 0.2\n")
    )
    clock = VirtualClock()
    h = Harness(host, notify, Off(), timing=Timing(first_check_delay_s=60), clock=clock)
    start = clock.t

    async def day() -> None:
        task = asyncio.create_task(h.agent.run(h.stop))
        await until(lambda: clock.t - start > 86400, timeout=60)
        h.stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(day())
    checks = [p for p in repo.server.begun if p == "/stable/release.json"]
    # first check at ~1 min, retries after 1, 2, 4 ... 32 min, then hourly (+-10%): ~33
    assert 25 <= len(checks) <= 35, len(checks)
    assert h.agent.status().state != "UPDATED_NEED_REBOOT"
    assert len(checks) - 1 <= h.agent._m.failures <= len(checks)  # the last may be under way
    assert cgpt_flags(host.disk, 2).priority == 0


def test_corrupt_state_file_is_set_aside(host: Host, repo: Repo, notify: NotifySocket) -> None:
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / "state.json").write_bytes(b'{"schema": 1, "slots": ')  # truncated
    before = (cgpt_flags(host.disk, 1), cgpt_flags(host.disk, 2), host.slot_bytes("USR-A"))
    h = Harness(host, notify, Off())

    async def scenario() -> None:
        async with running(h):  # the empty repository answers 404: a failed check
            await until(lambda: h.agent._m.failures > 0)

    asyncio.run(scenario())
    assert list(host.state_dir.glob("state.json.corrupt-*"))
    assert (cgpt_flags(host.disk, 1), cgpt_flags(host.disk, 2), host.slot_bytes("USR-A")) == before
    assert h.agent.status().last_error_kind == "http_status"
