"""Boot assessment with real executables and a fake systemd on a private dbus-daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.dbusdaemon import PrivateBus
from devtools.fake_systemd import FakeSystemd, unit_object_path
from updater.errors import HealthError
from updater.health import CheckResult, HealthChecker, HealthReport, SystemdUnits


def script(d: Path, name: str, body: str, mode: int = 0o755) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(mode)
    return p


def run(checker: HealthChecker) -> HealthReport:
    return asyncio.run(checker.run())


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


# ---- check executables ------------------------------------------------------------------------


def test_missing_dir_means_no_checks(tmp_path: Path) -> None:
    report = run(HealthChecker(tmp_path / "absent"))
    assert report == HealthReport(ok=True, results=())
    report.raise_for_failure()


def test_checks_run_in_name_order_with_a_minimal_environment(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    log = tmp_path / "order"
    env_dump = tmp_path / "env"
    script(d, "20-second", f'echo 20 >> {log}\necho "hello from 20"\n')
    script(
        d, "10-first", f"echo 10 >> {log}\nenv > {env_dump}\nread x && echo stdin-open\nexit 0\n"
    )
    script(d, "15-not-executable", f"echo 15 >> {log}\n", mode=0o644)
    script(d, ".hidden", f"echo hidden >> {log}\n")
    (d / "subdir").mkdir()
    with capture_logs() as logs:
        report = run(HealthChecker(d, timeout_s=10))
    assert report.ok
    assert [r.name for r in report.results] == ["10-first", "20-second"]
    assert log.read_text() == "10\n20\n"
    assert all(r.ok and r.kind is None and r.detail == "exit status 0" for r in report.results)
    assert report.results[1].output == "hello from 20\n"
    assert "stdin-open" not in report.results[0].output  # stdin is closed (/dev/null)
    env = dict(line.split("=", 1) for line in env_dump.read_text().splitlines())
    assert env["LANG"] == "C.UTF-8" and "PATH" in env
    assert not {k for k in env if k.startswith(("PYTEST", "DBUS"))}
    events = [e["event"] for e in logs]
    assert events.count("health_check_passed") == 2
    assert events[-1] == "health_checks_finished"


def test_pre_reboot_hooks_log_under_their_own_name(tmp_path: Path) -> None:
    """The same runner serves the pre-reboot hooks: their events say so, not health_check_*."""
    d = tmp_path / "pre-reboot.d"
    script(d, "10-drain", "exit 0\n")
    script(d, "20-refuse", "exit 1\n")
    with capture_logs() as logs:
        report = run(HealthChecker(d, timeout_s=10, event="pre_reboot_hook"))
    assert [r.ok for r in report.results] == [True, False]
    events = [e["event"] for e in logs]
    assert events == [
        "pre_reboot_hook_passed",
        "pre_reboot_hook_failed",
        "pre_reboot_hooks_finished",
    ]
    assert not [e for e in events if e.startswith("health_check")]


def test_a_failing_check_reports_its_output(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    script(d, "10-ok", "exit 0\n")
    script(d, "20-disk", "echo checking /var\necho '/var is read-only' >&2\nexit 3\n")
    with capture_logs() as logs:
        report = run(HealthChecker(d))
    assert not report.ok
    failed = report.results[1]
    assert failed == CheckResult(
        "20-disk", False, "check_failed", "exit status 3", failed.seconds, failed.output
    )
    assert failed.output == "checking /var\n/var is read-only\n"
    [event] = [e for e in logs if e["event"] == "health_check_failed"]
    assert event["check"] == "20-disk" and "/var is read-only" in event["output"]
    assert event["log_level"] == "warning"
    with pytest.raises(HealthError) as err:
        report.raise_for_failure()
    assert err.value.kind == "check_failed"
    assert "20-disk (exit status 3)" in err.value.message
    assert "10-ok" not in err.value.message


def test_output_keeps_only_the_tail(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    script(d, "noisy", "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; exit 1\n")
    report = run(HealthChecker(d, output_limit=100))
    out = report.results[0].output
    assert len(out.encode()) == 100 and out.endswith("line 1999\n")


def test_a_hanging_check_and_its_children_are_killed(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    # The child ignores SIGTERM, so only the SIGKILL to the whole group stops it.
    script(
        d,
        "50-hang",
        f"sh -c 'trap \"\" TERM; exec sleep 300' &\n"
        f"echo $! > {pids}\necho $$ >> {pids}\necho started\nsleep 300\n",
    )
    script(d, "60-after", "exit 0\n")
    start = time.monotonic()
    with capture_logs() as logs:
        report = run(HealthChecker(d, timeout_s=0.5, kill_grace_s=0.3))
    elapsed = time.monotonic() - start
    assert elapsed < 3
    hung, after = report.results
    assert (hung.ok, hung.kind, hung.detail) == (False, "check_timeout", "timed out after 0.5 s")
    assert 0.5 <= hung.seconds < 2
    assert hung.output == "started\n"
    assert after.ok  # the next check still ran
    child, shell = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 2
    while not (gone(child) and gone(shell)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(child) and gone(shell)
    assert any(e["event"] == "health_check_timeout" for e in logs)
    with pytest.raises(HealthError) as err:
        report.raise_for_failure()
    assert err.value.kind == "check_timeout" and "50-hang" in err.value.message


def test_a_check_that_ignores_sigterm_gets_sigkill_after_the_grace(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    pid_file = tmp_path / "pid"
    script(d, "10-stubborn", f"trap '' TERM\necho $$ > {pid_file}\nsleep 300\n")
    start = time.monotonic()
    report = run(HealthChecker(d, timeout_s=0.3, kill_grace_s=0.3))
    assert 0.6 <= time.monotonic() - start < 2
    assert report.results[0].kind == "check_timeout"
    assert gone(int(pid_file.read_text()))


def test_leftover_background_processes_are_killed(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    script(d, "10-forks", f"sleep 300 &\necho $! > {pids}\nexit 0\n")
    with capture_logs() as logs:
        report = run(HealthChecker(d, timeout_s=5))
    assert report.ok
    assert report.results[0].seconds < 2  # did not wait for the background sleep
    pid = int(pids.read_text())
    deadline = time.monotonic() + 2
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(pid)
    assert any(e["event"] == "health_check_leftovers_killed" for e in logs)


def test_an_escaped_grandchild_holding_the_output_does_not_block(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    # setsid leaves the check's process group, so the group kill cannot reach it
    script(
        d,
        "10-daemonizes",
        f"setsid sh -c 'echo $$ > {pids}; exec sleep 300' &\n"
        f"while [ ! -s {pids} ]; do sleep 0.01; done\necho done\nexit 0\n",
    )
    fds = len(os.listdir("/proc/self/fd"))
    try:
        start = time.monotonic()
        report = run(HealthChecker(d, timeout_s=5))
        assert 1 <= time.monotonic() - start < 3  # waited 1 s for the pipe to close
        assert report.ok and report.results[0].output == "done\n"
        assert len(os.listdir("/proc/self/fd")) == fds  # the pipe was closed anyway
    finally:
        os.kill(int(pids.read_text()), 9)


def test_a_check_that_cannot_be_executed_fails(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    d.mkdir()
    bad = d / "10-garbage"
    bad.write_bytes(b"\x7fELF garbage")
    bad.chmod(0o755)
    report = run(HealthChecker(d))
    assert not report.ok
    assert report.results[0].kind == "check_failed"
    assert report.results[0].detail.startswith("cannot run")


def test_a_check_killed_by_a_signal(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    script(d, "10-suicide", "kill -KILL $$\n")
    report = run(HealthChecker(d))
    assert report.results[0].kind == "check_failed"
    assert report.results[0].detail == "killed by SIGKILL"


def test_a_checks_path_that_is_not_a_directory_fails_closed(tmp_path: Path) -> None:
    f = tmp_path / "health.d"
    f.write_text("")
    report = run(HealthChecker(f))
    assert not report.ok and report.results[0].kind == "check_failed"


def test_cancellation_kills_the_running_check(tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    pids = tmp_path / "pids"
    script(d, "10-hang", f"echo $$ > {pids}\nexec sleep 300\n")

    async def cancel_midway() -> None:
        task = asyncio.create_task(HealthChecker(d, timeout_s=60).run())
        while not pids.exists() or not pids.read_text():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    pid = int(pids.read_text())
    deadline = time.monotonic() + 2
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(pid)


# ---- units through the fake systemd ----------------------------------------------------------


UNITS = {
    "sshd.service": "active",
    "app.service": "failed",
    "idle.service": "inactive",
    "starting.service": "activating",
}


def test_units_must_be_active(bus: PrivateBus, tmp_path: Path) -> None:
    async def scenario() -> tuple[HealthReport, HealthReport, list[tuple[str, str]]]:
        async with FakeSystemd(bus.address, UNITS) as fake:
            states = SystemdUnits(bus.address)
            good = await HealthChecker(tmp_path, units=("sshd.service",), unit_states=states).run()
            units = (*UNITS, "nonexistent.service")
            bad = await HealthChecker(tmp_path, units=units, unit_states=states).run()
            return good, bad, list(fake.calls)

    good, bad, calls = asyncio.run(scenario())
    assert good.ok and good.results[0].detail == "ActiveState=active"
    assert [(r.name, r.ok, r.kind, r.detail) for r in bad.results] == [
        ("sshd.service", True, None, "ActiveState=active"),
        ("app.service", False, "unit_inactive", "ActiveState=failed"),
        ("idle.service", False, "unit_inactive", "ActiveState=inactive"),
        ("starting.service", False, "unit_inactive", "ActiveState=activating"),
        ("nonexistent.service", False, "unit_inactive", "ActiveState=inactive"),
    ]
    # an unknown unit: GetUnit says NoSuchUnit, LoadUnit loads it as not-found
    assert calls[-2:] == [("GetUnit", "nonexistent.service"), ("LoadUnit", "nonexistent.service")]
    with pytest.raises(HealthError) as err:
        bad.raise_for_failure()
    assert err.value.kind == "unit_inactive"
    assert "app.service (ActiveState=failed)" in err.value.message


def test_a_unit_that_recovers_passes(bus: PrivateBus) -> None:
    states = SystemdUnits(bus.address)
    fake = FakeSystemd(bus.address, {"app.service": "failed"})
    with fake.running():  # its own loop in a thread, as under a synchronous CLI
        assert asyncio.run(states.active_state("app.service")) == "failed"
        fake.set_state("app.service", "active")
        assert asyncio.run(states.active_state("app.service")) == "active"


def test_checks_and_units_together(bus: PrivateBus, tmp_path: Path) -> None:
    d = tmp_path / "health.d"
    script(d, "10-fails", "exit 1\n")

    async def scenario() -> HealthReport:
        async with FakeSystemd(bus.address, {"sshd.service": "failed"}):
            return await HealthChecker(
                d, units=("sshd.service",), unit_states=SystemdUnits(bus.address)
            ).run()

    report = asyncio.run(scenario())
    assert [r.kind for r in report.failures] == ["check_failed", "unit_inactive"]
    with pytest.raises(HealthError) as err:
        report.raise_for_failure()
    assert err.value.kind == "check_failed"  # the first failure's
    assert "10-fails" in err.value.message and "sshd.service" in err.value.message


def test_invalid_unit_name_is_a_failure(bus: PrivateBus, tmp_path: Path) -> None:
    async def scenario() -> HealthReport:
        async with FakeSystemd(bus.address, {}):
            return await HealthChecker(
                tmp_path, units=("not a unit",), unit_states=SystemdUnits(bus.address)
            ).run()

    [result] = asyncio.run(scenario()).results
    assert result.kind == "unit_inactive" and "InvalidArgs" in result.detail


def test_no_bus_is_a_health_error(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path / 'no-bus'}"
    with pytest.raises(HealthError) as err:
        asyncio.run(SystemdUnits(address).active_state("sshd.service"))
    assert err.value.kind == "unit_inactive"
    assert "no connection" in err.value.message and err.value.hint is not None
    report = run(
        HealthChecker(tmp_path, units=("sshd.service",), unit_states=SystemdUnits(address))
    )
    assert not report.ok and "no connection" in report.results[0].detail
    with pytest.raises(HealthError):
        report.raise_for_failure()


def test_bus_without_systemd_is_a_health_error(bus: PrivateBus) -> None:
    with pytest.raises(HealthError) as err:
        asyncio.run(SystemdUnits(bus.address).active_state("sshd.service"))
    assert "ServiceUnknown" in err.value.message


def test_default_unit_states_use_the_system_bus_address(
    bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)

    async def scenario() -> HealthReport:
        async with FakeSystemd(bus.address, {"sshd.service": "active"}):
            return await HealthChecker(tmp_path, units=("sshd.service",)).run()

    assert asyncio.run(scenario()).ok


def test_unit_object_paths_follow_systemd_escaping() -> None:
    assert unit_object_path("dbus.service") == "/org/freedesktop/systemd1/unit/dbus_2eservice"
    assert unit_object_path("getty@tty1.service") == (
        "/org/freedesktop/systemd1/unit/getty_40tty1_2eservice"
    )
    assert unit_object_path("1x.target") == "/org/freedesktop/systemd1/unit/_31x_2etarget"


def test_fake_systemd_as_a_process(bus: PrivateBus) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.fake_systemd", "--bus", bus.address,
         "--unit", "sshd.service=failed"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        states = SystemdUnits(bus.address)
        assert asyncio.run(states.active_state("sshd.service")) == "failed"
        proc.stdin.write("sshd.service=active\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 5
        while asyncio.run(states.active_state("sshd.service")) != "active":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
