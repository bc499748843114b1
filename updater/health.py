"""Boot assessment: is the booted system healthy enough to bless its slot?

Two kinds of evidence, both must pass:

- **check executables**: every executable regular file in ``checks_dir``
  (``/etc/updater/health.d``), in name order, dotfiles skipped, run with no
  arguments, stdin closed, a minimal environment and its own session (so its
  process group can be killed as a whole). Exit 0 passes. One that outlives
  ``timeout_s`` gets SIGTERM on its process group, SIGKILL after a grace, and
  fails with kind ``check_timeout``. The tail of its output (stdout and stderr)
  is kept for the report and the log.
- **units**: each must be ``active`` according to systemd, asked over D-Bus
  through the :class:`UnitStates` port (:class:`SystemdUnits` in production).

Checks do not go through :mod:`updater.run`: that runner is synchronous and
kills only the child, while a health check must run on the agent's event loop
and may leave grandchildren that have to die with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from updater.dbuscompat import BUS_FAILURES
from updater.errors import HealthError, UpdaterError
from updater.run import minimal_env

log = structlog.get_logger(__name__)

DEFAULT_CHECKS_DIR = Path("/etc/updater/health.d")
OUTPUT_LIMIT = 4096  # bytes of a check's output kept: the tail, where the reason usually is

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


@dataclass(frozen=True)
class CheckResult:
    name: str  # the executable's file name, or the unit name
    ok: bool
    kind: str | None  # None when ok; else "check_failed" | "check_timeout" | "unit_inactive"
    detail: str  # one line: "exit status 0", "exit status 3", "ActiveState=failed", ...
    seconds: float
    output: str = ""  # tail of a check's stdout+stderr (at most OUTPUT_LIMIT bytes)


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    results: tuple[CheckResult, ...]

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    def raise_for_failure(self) -> None:
        """HealthError naming every failed check; its kind is the first failure's."""
        failed = self.failures
        if not failed:
            return
        names = ", ".join(f"{r.name} ({r.detail})" for r in failed)
        raise HealthError(
            failed[0].kind or "check_failed",
            f"health checks failed: {names}",
            hint="see the health_check_* events in the log; the slot stays on trial",
        )


class UnitStates(Protocol):
    async def active_state(self, unit: str) -> str:
        """systemd's ActiveState of ``unit`` ("active", "failed", ...); an unknown
        unit is "inactive". Raises HealthError when systemd cannot be asked."""
        ...


class HealthChecker:
    def __init__(
        self,
        checks_dir: Path = DEFAULT_CHECKS_DIR,
        timeout_s: float = 60.0,
        units: tuple[str, ...] = (),
        unit_states: UnitStates | None = None,
        *,
        kill_grace_s: float = 5.0,  # between SIGTERM and SIGKILL of a check that timed out
        output_limit: int = OUTPUT_LIMIT,  # bytes
        event: str = "health_check",  # its log events prefix; pre-reboot hooks: pre_reboot_hook
    ) -> None:
        self.checks_dir = checks_dir
        self.timeout_s = timeout_s
        self.units = units
        self._unit_states = unit_states
        self.kill_grace_s = kill_grace_s
        self.output_limit = output_limit
        self.event = event

    async def run(self) -> HealthReport:
        start = time.monotonic()
        results: list[CheckResult] = []
        for path in self._executables(results):
            results.append(await self._run_check(path))
        if self.units:
            states = self._unit_states if self._unit_states is not None else SystemdUnits()
            for unit in self.units:
                results.append(await self._check_unit(states, unit))
        report = HealthReport(ok=all(r.ok for r in results), results=tuple(results))
        (log.info if report.ok else log.warning)(
            f"{self.event}s_finished",
            ok=report.ok,
            checks=len(results),
            failed=[r.name for r in report.failures],
            seconds=round(time.monotonic() - start, 3),
        )
        return report

    # ---- executables -------------------------------------------------------------------------

    def _executables(self, results: list[CheckResult]) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.checks_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as exc:  # unreadable, not a directory: fail closed
            log.warning(f"{self.event}s_unlistable", dir=str(self.checks_dir), error=str(exc))
            results.append(
                CheckResult(str(self.checks_dir), False, "check_failed", f"cannot list: {exc}", 0.0)
            )
            return []
        found = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                st = e.stat()  # follows symlinks: a link to an executable counts
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                found.append(Path(e.path))
            else:
                log.debug(f"{self.event}_skipped", name=e.name)
        return found

    async def _run_check(self, path: Path) -> CheckResult:
        name = path.name
        start = time.monotonic()
        capture = _OutputTail(self.output_limit)
        try:
            proc = await asyncio.create_subprocess_exec(
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=capture.write_fd,
                stderr=capture.write_fd,
                env=minimal_env(),
                cwd="/",
                start_new_session=True,  # its own process group, killable as a whole
            )
        except OSError as exc:
            capture.close()
            result = CheckResult(name, False, "check_failed", f"cannot run: {exc}", 0.0)
            log.warning(f"{self.event}_failed", check=name, detail=result.detail)
            return result
        capture.start()
        timed_out = False
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    returncode = await proc.wait()
            except TimeoutError:
                timed_out = True
                returncode = await self._terminate(proc)
        finally:
            # Whatever it left behind in its group goes too (also when we are cancelled).
            if _signal_group(proc.pid, signal.SIGKILL):
                log.info(f"{self.event}_leftovers_killed", check=name)
            try:
                if proc.returncode is None:  # cancelled: reap it before the loop goes away
                    await _wait_quietly(proc.wait(), timeout_s=5.0)
                await _wait_quietly(capture.eof(), timeout_s=1.0)
            finally:
                capture.close()
        seconds = round(time.monotonic() - start, 3)
        output = capture.text()
        if timed_out:
            detail = f"timed out after {self.timeout_s:g} s"
            log.warning(f"{self.event}_timeout", check=name, seconds=seconds, output=output)
            return CheckResult(name, False, "check_timeout", detail, seconds, output)
        detail = _describe_exit(returncode)
        if returncode == 0:
            log.info(f"{self.event}_passed", check=name, seconds=seconds)
            return CheckResult(name, True, None, detail, seconds, output)
        log.warning(
            f"{self.event}_failed", check=name, detail=detail, seconds=seconds, output=output
        )
        return CheckResult(name, False, "check_failed", detail, seconds, output)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> int:
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.kill_grace_s):
                return await proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)
        return await proc.wait()

    # ---- units ---------------------------------------------------------------------------------

    async def _check_unit(self, states: UnitStates, unit: str) -> CheckResult:
        start = time.monotonic()
        try:
            state = await states.active_state(unit)
        except UpdaterError as exc:
            seconds = round(time.monotonic() - start, 3)
            log.warning("health_unit_unknown", unit=unit, error=exc.message)
            return CheckResult(unit, False, "unit_inactive", exc.message, seconds)
        seconds = round(time.monotonic() - start, 3)
        if state == "active":
            log.info("health_unit_active", unit=unit)
            return CheckResult(unit, True, None, "ActiveState=active", seconds)
        log.warning("health_unit_inactive", unit=unit, state=state)
        return CheckResult(unit, False, "unit_inactive", f"ActiveState={state}", seconds)


class _OutputTail:
    """A pipe that the check writes to and the event loop drains, keeping the last
    ``limit`` bytes. Ours (not asyncio's subprocess pipes) so that it can be
    closed even when an escaped grandchild still holds the write end."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self._buf = bytearray()
        self._eof = asyncio.Event()
        self._reading = False

    def start(self) -> None:
        os.close(self.write_fd)  # the child has its copy; EOF comes when it (and its kids) close
        self.write_fd = -1
        asyncio.get_running_loop().add_reader(self.read_fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._stop_reading()
            self._eof.set()
            return
        self._buf += data
        if len(self._buf) > self.limit:
            del self._buf[: len(self._buf) - self.limit]

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.read_fd)
            self._reading = False

    async def eof(self) -> None:
        """Every holder of the write end has closed it."""
        await self._eof.wait()

    def close(self) -> None:
        self._stop_reading()
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1

    def text(self) -> str:
        return self._buf.decode("utf-8", "replace")


async def _wait_quietly(aw: Coroutine[Any, Any, object], timeout_s: float) -> None:
    """Await ``aw`` for at most ``timeout_s``. Unlike ``asyncio.timeout`` this also
    works inside a task that is being cancelled (our cleanup path)."""
    task = asyncio.ensure_future(aw)
    await asyncio.wait([task], timeout=timeout_s)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False when nobody is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# ---- systemd over D-Bus ------------------------------------------------------------------------


class SystemdUnits:
    """Unit states from systemd (``org.freedesktop.systemd1``) on the system bus;
    ``bus_address`` overrides it (``unix:path=...``), else ``DBUS_SYSTEM_BUS_ADDRESS``
    or the standard socket."""

    def __init__(self, bus_address: str | None = None, timeout_s: float = 10.0) -> None:
        self.bus_address = bus_address
        self.timeout_s = timeout_s

    async def active_state(self, unit: str) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._active_state(unit)
        except TimeoutError:
            raise HealthError(
                "unit_inactive",
                f"systemd did not answer within {self.timeout_s:g} s about {unit}",
            ) from None

    async def _active_state(self, unit: str) -> str:
        where = self.bus_address or "the system bus"
        try:
            bus = await MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM).connect()
        except BUS_FAILURES as exc:
            raise HealthError(
                "unit_inactive",
                f"cannot ask systemd about {unit}: no connection to {where}: {exc}",
                hint="is dbus-daemon running? (unit health checks need systemd and the system bus)",
            ) from exc
        try:
            return await self._query(bus, unit)
        except BUS_FAILURES as exc:
            raise HealthError(
                "unit_inactive", f"cannot ask systemd about {unit}: lost {where}: {exc}"
            ) from exc
        finally:
            bus.disconnect()
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def _query(self, bus: MessageBus, unit: str) -> str:
        path = await self._unit_path(bus, unit)
        if path is None:
            return "inactive"
        get = Message(
            destination=SYSTEMD_BUS_NAME,
            path=path,
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=[SYSTEMD_UNIT, "ActiveState"],
        )
        reply = await self._call(bus, get, unit)
        state = reply.body[0].value
        if not isinstance(state, str):
            raise HealthError("unit_inactive", f"systemd sent a non-string state for {unit}")
        return state

    async def _unit_path(self, bus: MessageBus, unit: str) -> str | None:
        # GetUnit knows only loaded units; LoadUnit also finds an installed unit
        # that nothing has loaded yet (and answers "inactive" for a missing one).
        for method in ("GetUnit", "LoadUnit"):
            call = Message(
                destination=SYSTEMD_BUS_NAME,
                path=SYSTEMD_PATH,
                interface=SYSTEMD_MANAGER,
                member=method,
                signature="s",
                body=[unit],
            )
            reply = await self._call(bus, call, unit, tolerate=NO_SUCH_UNIT)
            if reply.message_type != MessageType.ERROR:
                return str(reply.body[0])
        return None

    async def _call(
        self, bus: MessageBus, call: Message, unit: str, *, tolerate: str | None = None
    ) -> Message:
        reply = await bus.call(call)
        if reply.message_type == MessageType.ERROR and reply.error_name != tolerate:
            text = reply.body[0] if reply.body else ""
            raise HealthError(
                "unit_inactive",
                f"cannot ask systemd about {unit}: {call.member}: {reply.error_name}: {text}",
            )
        return reply
