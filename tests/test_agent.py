"""The agent daemon in-process: real Updater, disk image, loopback repository,
sd_notify over a real datagram socket; the reboot (which cannot happen here)
recorded by a Rebooter that implements the real port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from devtools.repo_server import Fault
from partitions.bootcontrol import Slot
from policies.rebootlock import FailureReport
from policies.strategy import Immediate, Off, RebootStrategy
from tests.conftest import NotifySocket, Repo, reboot_now_when_free, until
from tests.omaha_server import Answer, OmahaServer, Release
from updater import compose, config, machinerecord
from updater import machine as mc
from updater.agent import Agent
from updater.agentapi import AgentStatus
from updater.agentports import wait_any
from updater.blessing import HealthCheck
from updater.errors import RefusedError, UpdaterError
from updater.health import HealthReport
from updater.hostlock import is_held
from updater.machine import Timing
from updater.metrics import Metrics
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


class Counted:
    """A real reboot strategy whose answers are counted: it decides, the test observes."""

    def __init__(self, inner: RebootStrategy) -> None:
        self.inner = inner
        self.name = inner.name
        self.yes = 0
        self.no = 0  # said no, or failed (which is no)

    @property
    def holding(self) -> bool | None:
        return self.inner.holding

    def can_finalize(self, version: str | None = None) -> bool:
        try:
            allowed = self.inner.can_finalize(version)
        except Exception:
            self.no += 1
            raise
        if allowed:
            self.yes += 1
        else:
            self.no += 1
        return allowed

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        return self.inner.report_steady(failed)


def saved_machine(host: Host) -> dict[str, Any]:
    """The agent's machine as saved in the state file (what `updatectl status` reads)."""
    return json.loads((host.state_dir / "state.json").read_text())["agent"]  # type: ignore[no-any-return]


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
        metrics: Metrics | None = None,
        pre_reboot: HealthCheck | None = None,
    ) -> None:
        self.cfg = config.load(host.config)
        self.updater = compose.updater(self.cfg)
        self.rebooter = RecordingRebooter()
        self.statuses: list[AgentStatus] = []
        self.blessed: list[Slot] = []

        async def bless() -> Slot:
            slot = await asyncio.to_thread(self.updater.slots.mark_good)
            self.blessed.append(slot)
            return slot

        kw = {} if clock is None else {"clock": clock, "waiter": clock.wait}
        self.agent = Agent(
            updater=self.updater,
            strategy=strategy,
            rebooter=self.rebooter,
            bless=bless,
            clock=kw.pop("clock", self.updater.slots.clock),  # type: ignore[arg-type]
            notifier=Notifier(env={"NOTIFY_SOCKET": str(notify.path)}),
            timing=timing,
            metrics=metrics,
            pre_reboot=pre_reboot,
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


def run_until(h: Harness, cond: Callable[[], bool]) -> None:
    """Run the agent until ``cond`` holds, then stop it."""

    async def go() -> None:
        async with running(h):
            await until(cond)

    asyncio.run(go())


def image_gets(repo: Repo) -> int:
    """Downloads of an image: its requests, not those of its chunk index (``.chunks``, read
    to plan a delta before any install) or of the manifest beside it."""
    return len(
        [
            r
            for r in repo.server.requests
            if "/images/" in r.path and not r.path.endswith((".chunks", ".json", ".asc"))
        ]
    )


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
    policy = Counted(Off())
    h = Harness(host, notify, policy)

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
            await until(lambda: policy.no >= 3)  # several reboot-retry periods: it says no
            assert h.rebooter.calls == []
            await reboot_now_when_free(h.agent)
            assert len(h.rebooter.calls) == 1

    asyncio.run(scenario())


def test_refused_reboot_is_retried_and_counted(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    metrics = Metrics()
    h = Harness(host, notify, Immediate(), metrics=metrics)
    h.rebooter.refuse = True

    async def scenario() -> None:
        async with running(h):
            await until(lambda: len(h.rebooter.calls) >= 2)
            with pytest.raises(RefusedError):
                await h.agent.reboot_now()

    asyncio.run(scenario())
    st = h.agent.status()
    assert st.state == "UPDATED_NEED_REBOOT" and st.last_error_kind == "reboot_refused"
    assert saved_machine(host)["reboot_refusals"] >= 3  # counted in the machine ...
    assert samples(metrics)["updater_reboots_refused_total"] >= 3  # ... and the metric
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
    failures = saved_machine(host)["failures"]
    assert len(checks) - 1 <= failures <= len(checks)  # the last may be under way
    assert cgpt_flags(host.disk, 2).priority == 0


def test_corrupt_state_file_is_set_aside(host: Host, repo: Repo, notify: NotifySocket) -> None:
    host.state_dir.mkdir(parents=True, exist_ok=True)
    (host.state_dir / "state.json").write_bytes(b'{"schema": 1, "slots": ')  # truncated
    before = (cgpt_flags(host.disk, 1), cgpt_flags(host.disk, 2), host.slot_bytes("USR-A"))
    h = Harness(host, notify, Off())

    async def scenario() -> None:
        async with running(h):  # the empty repository answers 404: a failed check
            await until(lambda: h.agent.status().last_error_kind != "")

    asyncio.run(scenario())
    assert list(host.state_dir.glob("state.json.corrupt-*"))
    assert (cgpt_flags(host.disk, 1), cgpt_flags(host.disk, 2), host.slot_bytes("USR-A")) == before
    assert h.agent.status().last_error_kind == "http_status"


# ---- a unit of work that crashes: the agent never wedges --------------------------------------
#
# An exception that is not one of ours (a bug, a library breaking its contract)
# raised from any step of the agent's work must end as a failed check: state
# back to IDLE, the error recorded as `internal` and counted, the next try backed
# off exactly like a typed failure. Measured before the fix: one request, then
# nothing (the state stuck in CHECKING_FOR_UPDATE, which counts as busy).

WINDOW_S = 3 * 3600.0  # virtual seconds the agent runs
CRASH_TIMING = Timing(
    poll_interval_s=3600,
    first_check_delay_s=60,
    jitter=0.0,
    retry_base_s=60,
    retry_cap_s=3600,
    reboot_retry_s=60,
)


class WindowClock(VirtualClock):
    """Virtual time up to ``end``; past it the agent is parked until told to stop."""

    def __init__(self, window_s: float) -> None:
        super().__init__()
        self.end = self.t + window_s
        self.parked = False  # waiting for a timer past the end: no work under way
        self.reached_end = False

    async def wait(self, timeout: float | None, *events: asyncio.Event) -> None:
        if (
            timeout is not None
            and self.t + timeout > self.end
            and not any(e.is_set() for e in events)
        ):
            self.parked = self.reached_end = True
            await wait_any(None, *events)
            self.parked = False
            return
        await super().wait(timeout, *events)


def scheduled_checks(timing: Timing, window_s: float) -> int:
    """How many checks a run of typed failures makes in ``window_s`` (the pure schedule)."""
    m = mc.Machine()
    t, n = mc.first_delay(m, timing, 0.0), 0
    while t <= window_s:
        n += 1
        m, _ = mc.step(m, mc.Tick(), t)
        m, _ = mc.step(m, mc.Failed(mc.ErrorInfo("timeout", "")), t)
        m, _ = mc.step(m, mc.ErrorReported(), t)
        delay = mc.next_delay(m, timing, 0.0)
        assert delay is not None
        t += delay
    return n


def scheduled_reboots(timing: Timing, window_s: float) -> int:
    """How many reboot attempts a run of refusals makes in ``window_s`` after staging."""
    m = mc.Machine(state=mc.S.UPDATED_NEED_REBOOT, staged="1.1.0")
    t, n = 0.0, 0
    while t <= window_s:
        n += 1
        m, _ = mc.step(m, mc.RebootRefused(mc.ErrorInfo("reboot_refused", "")), t)
        delay = mc.next_delay(m, timing, 0.0)
        assert delay is not None
        t += delay
    return n


def raiser(
    exc: BaseException, calls: list[str], then: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """A port's method that counts its call, maybe does the real thing first, then raises."""

    def method(*args: Any, **kwargs: Any) -> Any:
        calls.append("call")
        if then is not None:
            then(*args, **kwargs)
        raise exc

    return method


def async_raiser(exc: BaseException, calls: list[str]) -> Callable[..., Any]:
    async def method(*args: Any, **kwargs: Any) -> Any:
        calls.append("call")
        raise exc

    return method


class NoHooks:
    async def run(self) -> HealthReport:
        return HealthReport(True, ())


def samples(metrics: Metrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def inject(h: Harness, where: str, exc: BaseException) -> list[str]:
    """Make the step ``where`` of the agent's work raise ``exc``; the list of its calls."""
    calls: list[str] = []
    up = h.updater
    match where:
        case "check":  # the manifest is fetched, then the source breaks
            up.source.fetch = raiser(exc, calls, then=up.source.fetch)  # type: ignore[method-assign]
        case "verify":
            up.verifier.verify = raiser(exc, calls)  # type: ignore[method-assign]
        case "download":
            up.transport.open_stream = raiser(exc, calls)  # type: ignore[method-assign]
        case "install":
            up.slots.open_slot = raiser(exc, calls)
        case "make_primary":  # after the image is written and verified
            up.slots.boot.make_primary = raiser(exc, calls)  # type: ignore[method-assign]
        case "error_report":  # a typed failure, then counting it breaks
            assert h.agent.metrics is not None
            h.agent.metrics.check_failed = raiser(exc, calls)  # type: ignore[method-assign]
            h.agent.metrics.error = raiser(exc, calls)  # type: ignore[method-assign]
        case "policy":
            h.agent.strategy.can_finalize = raiser(exc, calls)  # type: ignore[method-assign]
        case "pre_reboot":
            assert h.agent.pre_reboot is not None
            h.agent.pre_reboot.run = async_raiser(exc, calls)  # type: ignore[method-assign]
        case "reboot":
            h.agent.rebooter.reboot = async_raiser(exc, calls)  # type: ignore[method-assign]
        case _:
            raise AssertionError(where)
    return calls


def run_window(h: Harness, clock: WindowClock) -> asyncio.Task[None] | None:
    """Run the agent through the window; stop it once it is parked past the end."""
    outcome: list[asyncio.Task[None]] = []

    async def window() -> None:
        task = asyncio.create_task(h.agent.run(h.stop))
        outcome.append(task)
        with contextlib.suppress(AssertionError):  # a wedge is told by what it left behind
            await until(lambda: clock.parked or task.done(), timeout=60)  # a busy machine
        h.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), 10)

    asyncio.run(window())
    return outcome[0] if outcome else None


CHECK_STEPS = ["check", "verify", "download", "install", "make_primary", "error_report"]
REBOOT_STEPS = ["policy", "pre_reboot", "reboot"]
CRASHES = [
    RuntimeError("boom"),
    KeyError("slot"),
    RecursionError("maximum recursion depth exceeded"),
    MemoryError(),
    StopIteration(),  # cannot be set on an asyncio future: it must not lose the result
    SystemExit(3),  # from a worker thread: ends that work, not the agent
]


def crash_cases() -> list[Any]:
    cases = [pytest.param(w, RuntimeError("boom"), id=w) for w in CHECK_STEPS + REBOOT_STEPS]
    cases += [pytest.param("check", e, id=f"check-{type(e).__name__}") for e in CRASHES[1:]]
    cases += [pytest.param("download", e, id=f"download-{type(e).__name__}") for e in CRASHES[1:3]]
    return cases


@pytest.mark.parametrize(("where", "exc"), crash_cases())
def test_a_crash_in_any_step_is_a_failed_check_and_polling_goes_on(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
    where: str,
    exc: BaseException,
) -> None:
    if where != "error_report":  # that one needs a typed failure: nothing published (404)
        repo.publish("1.1.0", usr_images["1.1.0"])
    clock = WindowClock(WINDOW_S)
    metrics = Metrics()
    h = Harness(
        host,
        notify,
        Immediate(),
        timing=CRASH_TIMING,
        clock=clock,
        metrics=metrics,
        pre_reboot=NoHooks(),
    )
    calls = inject(h, where, exc)
    task = run_window(h, clock)

    assert task is not None and task.done()
    assert task.exception() is None, f"the agent loop died: {task.exception()!r}"
    checks = [p for p in repo.server.begun if p == "/stable/release.json"]
    saved = json.loads((host.state_dir / "state.json").read_text())["agent"]
    st = h.agent.status()
    if where in REBOOT_STEPS:
        # staged, and the reboot is asked again, backing off like a refusal
        assert len(checks) == 1
        assert (saved["state"], st.state) == ("UPDATED_NEED_REBOOT", "UPDATED_NEED_REBOOT")
        assert len(calls) == scheduled_reboots(CRASH_TIMING, WINDOW_S - 60), calls
        assert clock.reached_end, "the agent stopped asking for the reboot"
        assert cgpt_flags(host.disk, 2).priority == 2  # the staged update is kept
    else:
        assert clock.reached_end, (
            f"the agent wedged in {st.state} after {len(checks)} checks "
            f"(persisted {saved['state']})"
        )
        # exactly the polls a typed failure gets: no tight loop, no silence
        assert len(checks) == scheduled_checks(CRASH_TIMING, WINDOW_S)
        assert saved["state"] == "IDLE" and saved["state"] not in mc.BUSY
        assert saved["failures"] == len(checks)
        assert not cgpt_flags(host.disk, 2).bootable
        assert not is_held(host.state_dir)  # the host's update lock is released
    # a strategy that fails says no (fail closed), counted under its own kind
    kind = {"error_report": "http_status", "policy": "policy"}.get(where, "internal")
    assert (st.last_error_kind, saved["last_error"]["kind"]) == (kind, kind)
    if where != "error_report":
        if kind == "internal":
            assert type(exc).__name__ in st.last_error_message
        counted = samples(metrics)
        key = (
            "updater_check_failures_total{kind=internal}"
            if where in ("check", "verify")
            else f"updater_errors_total{{kind={kind}}}"
        )
        assert counted.get(key, 0) >= 1, counted


def test_a_busy_state_left_by_a_crashed_agent_is_recovered_at_start(
    host: Host, repo: Repo, notify: NotifySocket
) -> None:
    """An older agent died mid-check (state persisted busy): the next one checks again."""
    host.state_dir.mkdir(parents=True, exist_ok=True)
    record = machinerecord.to_dict(
        mc.Machine(state=mc.S.CHECKING_FOR_UPDATE, since=1.0, failures=1)
    )
    (host.state_dir / "state.json").write_text(json.dumps({"schema": 1, "agent": record}))
    clock = WindowClock(WINDOW_S)
    h = Harness(host, notify, Off(), timing=CRASH_TIMING, clock=clock)
    task = run_window(h, clock)  # the empty repository answers 404: typed failures

    assert task is not None and task.exception() is None
    checks = [p for p in repo.server.begun if p == "/stable/release.json"]
    assert len(checks) >= scheduled_checks(CRASH_TIMING, WINDOW_S) - 1
    saved = json.loads((host.state_dir / "state.json").read_text())["agent"]
    assert saved["state"] == "IDLE"


@pytest.mark.parametrize("kind", ["static", "omaha"])
def test_a_crashing_event_report_does_not_stop_the_update(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket, kind: str
) -> None:
    """Reports are best effort: a static source that breaks that promise is caught by the
    agent (event_report_crashed); an Omaha client that raises, as it did on a redirect to a
    malformed URL, is caught by OmahaSource.report itself (omaha_report_failed). Either way
    it is logged and the install goes on."""
    published = repo.publish("1.1.0", usr_images["1.1.0"])
    with contextlib.ExitStack() as stack:
        if kind == "omaha":
            data = published.image_path.read_bytes()
            release = Release(
                version="1.1.0",
                codebase=f"{repo.url}/images/1.1.0/",
                package=published.image_path.name,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
            server = stack.enter_context(OmahaServer(release=release, answer=Answer.UPDATE))
            host.config.write_text(
                host.config.read_text().replace("[source]\n", '[source]\nkind = "omaha"\n')
                + f'\n[omaha]\nserver = "{server.url}"\ngroup = "stable"\nflatcar_conf = false\n'
            )
        h = Harness(host, notify, Off())
        calls: list[str] = []
        target: Any = h.updater.source.client if kind == "omaha" else h.updater.source  # type: ignore[attr-defined]
        target.report = raiser(ValueError("Invalid IPv6 URL"), calls)
        with capture_logs() as logs:
            run_until(h, lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")

    assert len(calls) >= 3  # download_started, download_finished, staged
    logged = "omaha_report_failed" if kind == "omaha" else "event_report_crashed"
    crashed = [e for e in logs if e["event"] == logged]
    assert len(crashed) == len(calls) and crashed[0]["error_kind"] == "internal"
    assert cgpt_flags(host.disk, 2).priority == 2
    assert not [e for e in logs if e["event"] == "agent_work_crashed"]


def test_a_forced_reboot_that_crashes_answers_the_caller_and_is_counted(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = Harness(host, notify, Off())
    calls = inject(h, "reboot", RuntimeError("logind went away"))

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
            with pytest.raises(UpdaterError) as err:
                await reboot_now_when_free(h.agent)
            assert err.value.kind == "internal" and "logind went away" in err.value.message

    asyncio.run(scenario())
    assert calls == ["call"]
    assert h.agent.status().state == "UPDATED_NEED_REBOOT"
    assert saved_machine(host)["reboot_refusals"] == 1
    assert h.agent.status().last_error_kind == "internal"


# ---- one reboot attempt at a time; a host going down keeps its slot ---------------------------


class RecordingLock:
    """A lock strategy that grants the slot and records what it was asked."""

    name = "lock"

    def __init__(self) -> None:
        self.asked = 0
        self.released = 0
        self.held = False

    @property
    def holding(self) -> bool | None:
        return self.held

    def can_finalize(self, version: str | None = None) -> bool:
        self.asked += 1
        self.held = True
        return True

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        self.released += 1
        self.held = False
        return False


class CountingHooks:
    """Pre-reboot hooks that take ``seconds`` (real time) and pass, or fail once told to."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.runs = 0
        self.fail = False

    async def run(self) -> HealthReport:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        if self.fail:
            from updater.health import CheckResult  # noqa: PLC0415

            return HealthReport(False, (CheckResult("drain", False, "check_failed", "x", 0),))
        return HealthReport(True, ())


def test_the_retry_timer_during_slow_pre_reboot_hooks_is_not_a_second_attempt(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    """Found by the fleet test: hooks that outlast reboot_retry_s ran twice at once, and
    the second, killed by the shutdown the first started, gave the slot back while the
    host was still going down, so a second host rebooted with it."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    lock, hooks = RecordingLock(), CountingHooks(seconds=1.0)  # > 3 reboot_retry_s
    h = Harness(host, notify, lock, pre_reboot=hooks)

    def ticks_going_down(logs: list[MutableMapping[str, Any]]) -> int:
        return [e["event"] for e in logs].count("reboot_already_started")

    async def scenario(logs: list[MutableMapping[str, Any]]) -> None:
        async with running(h):
            await until(lambda: len(h.rebooter.calls) == 1)
            lock.released = 0  # (the start's steady step released whatever was held)
            hooks.fail = True  # what a shutdown does to hooks still running
            # five more retry periods, longer than the hooks of a second attempt would take
            await until(lambda: ticks_going_down(logs) >= 5)
            await h.agent.reboot_now()  # the machine is going down: nothing more to do

    with capture_logs() as logs:
        asyncio.run(scenario(logs))
    assert (hooks.runs, lock.asked, len(h.rebooter.calls)) == (1, 1, 1)
    assert lock.released == 0 and lock.held  # the next boot's steady step gives it back
    events = [e["event"] for e in logs]
    assert "reboot_attempt_under_way" in events  # a retry came while the hooks ran
    assert "reboot_lock_given_back" not in events


def test_a_reboot_that_never_happens_is_asked_again_after_the_patience(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    clock = VirtualClock()
    lock, hooks = RecordingLock(), CountingHooks()
    h = Harness(host, notify, lock, clock=clock, pre_reboot=hooks)
    times: list[float] = []
    released: list[int] = []

    async def reboot() -> None:
        times.append(clock.monotonic())
        released.append(lock.released)

    h.rebooter.reboot = reboot  # type: ignore[method-assign]
    run_until(h, lambda: len(times) >= 2)
    assert times[1] - times[0] >= h.agent.timing.reboot_patience_s
    assert hooks.runs == 2 and released[0] == released[1]  # kept all along
