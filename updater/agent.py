"""`updatectl agent`: the daemon. A thin asyncio shell around the pure state
machine (updater.machine): it turns timers, finished work and requests into
events, and carries out the actions the machine returns through its ports.

Blocking work (HTTP, gpg, the install, GPT writes) runs in daemon threads, so
the event loop stays free to answer D-Bus, ping the systemd watchdog and
handle SIGTERM, which stops the agent within a few seconds at any point: a
running install is cancelled (the slot stays unbootable and the install
starts over next time), a thread stuck in a network read is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import structlog

from partitions.bootcontrol import Slot
from policies.failed import refusal
from policies.lock import FailureReport
from policies.strategy import RebootStrategy
from updater import machine as mc
from updater.agentapi import AgentStatus, StatusListener
from updater.clock import Clock
from updater.errors import Cancelled, RefusedError, UpdaterError, internal_error
from updater.health import HealthReport
from updater.install import Progress
from updater.rebooter import Rebooter
from updater.update import UpdateCheckResult, Updater

log = structlog.get_logger(__name__)

T = TypeVar("T")

STOP_GRACE_S = 3.0  # how long a stop waits for running work to wind down
# Once logind accepted a reboot, the machine is going down: no second attempt (its
# pre-reboot hooks would die in the shutdown and give the slot back while the host is
# still rebooting) until this long has passed with the agent still running.
REBOOT_PATIENCE_S = 600.0


class Notifier(Protocol):
    def ready(self) -> object: ...

    def status(self, text: str) -> object: ...

    def watchdog(self) -> object: ...

    def stopping(self) -> object: ...

    def watchdog_interval_s(self) -> float | None: ...


class Metrics(Protocol):
    def state_changed(self, state: str, when: float) -> None: ...

    def checked(self, when: float) -> None: ...

    def check_failed(self, kind: str) -> None: ...

    def error(self, kind: str) -> None: ...

    def installed(self, raw_bytes: int, seconds: float) -> None: ...

    def rollback(self, version: str) -> None: ...

    def reboot_requested(self) -> None: ...

    def reboot_refused(self) -> None: ...

    def version_blocked(self, version: str, blocked: bool) -> None: ...


class Waiter(Protocol):
    async def __call__(self, timeout: float | None, *events: asyncio.Event) -> None:
        """Return when one of ``events`` is set or ``timeout`` seconds passed."""
        ...


async def wait_any(timeout: float | None, *events: asyncio.Event) -> None:
    """The real Waiter: the event loop's own clock."""
    tasks = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class FleetReporter(Protocol):
    def report(
        self, status: AgentStatus, lock_held: bool | None, blocked_version: str = ""
    ) -> None:
        """Publish this host's status for the fleet (blocking; run in a thread)."""
        ...


class Hooks(Protocol):
    async def run(self) -> HealthReport:
        """Run the pre-reboot hooks (updater.health runs a directory of executables)."""
        ...


class Blesser(Protocol):
    async def __call__(self) -> Slot:
        """Run the health checks and mark the booted slot good (HealthError if not)."""
        ...


def run_blocking(fn: Callable[[], T]) -> Awaitable[T]:
    """Run ``fn`` in a daemon thread; its result or exception as an awaitable.

    Not the default executor: its threads are joined at interpreter exit, and
    one stuck in a read would hold a stopping agent for the whole timeout.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)

    def work() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as exc:
            result, ok = _awaitable_error(exc), False
        with contextlib.suppress(RuntimeError):  # the loop may be gone when we stop
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, name="agent-work", daemon=True).start()
    return future


def _awaitable_error(exc: BaseException) -> BaseException:
    """What the work's awaiter gets for ``exc``.

    An asyncio future refuses StopIteration (the result would be lost and the
    awaiter wait forever), and SystemExit, KeyboardInterrupt or GeneratorExit
    raised in a worker thread end that work, not the agent: all of them arrive
    as a RuntimeError that names them.
    """
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        return exc
    wrapped = RuntimeError(f"{type(exc).__name__} raised in a worker thread: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def status_text(st: AgentStatus) -> str:
    """The one-line STATUS= shown by `systemctl status`."""
    booted = f"booted {st.booted_slot} {st.booted_version or '?'}"
    match st.state:
        case "IDLE":
            text = f"Idle, {booted}"
            if st.last_error_kind:
                text += f"; last error: {st.last_error_kind}"
        case "CHECKING_FOR_UPDATE":
            text = f"Checking for an update, {booted}"
        case "UPDATE_AVAILABLE":
            text = f"Update {st.new_version} available"
        case "DOWNLOADING":
            text = f"Downloading {st.new_version}: {st.progress:.0%}"
        case "VERIFYING":
            text = f"Verifying {st.new_version}: {st.progress:.0%}"
        case "FINALIZING":
            text = f"Finalizing {st.new_version}"
        case "UPDATED_NEED_REBOOT":
            text = f"Update {st.staged_version} staged, waiting for a reboot"
        case _:
            text = f"Error ({st.last_error_kind}): {st.last_error_message}"
    return text


@dataclass
class _Booted:
    slot: str = ""
    version: str = ""
    trial: bool = False


class Agent:
    """The running agent (implements updater.agentapi.AgentControl)."""

    def __init__(
        self,
        *,
        updater: Updater,
        strategy: RebootStrategy,
        rebooter: Rebooter,
        bless: Blesser,
        clock: Clock,
        notifier: Notifier,
        metrics: Metrics | None = None,
        timing: mc.Timing | None = None,
        rng: random.Random | None = None,
        waiter: Waiter = wait_any,
        pre_reboot: Hooks | None = None,
        release_after_s: float = 900.0,
        fleet: FleetReporter | None = None,
    ) -> None:
        self.updater = updater
        self.strategy = strategy
        self.rebooter = rebooter
        self._bless = bless
        self.clock = clock
        self.notifier = notifier
        self.metrics = metrics
        self.timing = timing or mc.Timing()
        self.rng = rng or random.SystemRandom()
        self.waiter = waiter
        self.pre_reboot = pre_reboot
        self.release_after_s = release_after_s
        self.fleet = fleet
        self._fleet_task: asyncio.Task[None] | None = None
        self._fleet_reported: tuple[AgentStatus, bool | None, str] | None = None
        self.blocked_version = ""  # a version this host refuses: it failed on hosts of the group
        self._m = mc.Machine()
        self._booted = _Booted()
        self._listeners: list[StatusListener] = []
        self._deadline: float | None = None  # monotonic time of the next Tick
        self._wake = asyncio.Event()
        self._cancel = threading.Event()
        self._work: asyncio.Task[None] | None = None
        self._check: UpdateCheckResult | None = None
        self._stopping = False
        self._last_status: AgentStatus | None = None
        self._steady_task: asyncio.Task[None] | None = None
        self._refused_since: float | None = None  # monotonic time of the first refusal
        self._finalizing = False  # one reboot attempt at a time
        self._reboot_started: float | None = None  # monotonic time logind accepted a reboot

    # ---- AgentControl ---------------------------------------------------------------------------

    def status(self) -> AgentStatus:
        m = self._m
        return AgentStatus(
            state=m.state.value,
            booted_slot=self._booted.slot,
            booted_version=self._booted.version,
            staged_version=m.staged or "",
            new_version=m.offer.version if m.offer else "",
            new_size=m.offer.size if m.offer else 0,
            progress=m.progress,
            last_error_kind=m.last_error.kind if m.last_error else "",
            last_error_message=m.last_error.message if m.last_error else "",
            last_check_time=int(m.last_check),
            last_change_time=int(m.since),
        )

    def subscribe(self, listener: StatusListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def check_now(self) -> None:
        await self._dispatch(mc.CheckRequested())

    async def install_now(self) -> None:
        # The agent installs whatever a check finds; an explicit install is a check now.
        await self._dispatch(mc.CheckRequested())

    async def reboot_now(self) -> None:
        if self._m.state != mc.S.UPDATED_NEED_REBOOT:
            raise RefusedError("nothing_staged", "no update is staged: nothing to reboot into")
        await self._finalize(force=True)

    async def mark_good(self) -> None:
        await self._bless()
        await self._refresh_booted()
        self._steady()

    async def reset_status(self) -> None:
        await self._dispatch(mc.ResetRequested())

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._start()
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        try:
            while not stop.is_set():
                timeout = None
                if self._deadline is not None:
                    timeout = max(0.0, self._deadline - self.clock.monotonic())
                await self.waiter(timeout, stop, self._wake)
                self._wake.clear()
                if stop.is_set():
                    break
                if self._deadline is not None and self.clock.monotonic() >= self._deadline:
                    self._deadline = None
                    try:
                        await self._dispatch(mc.Tick())
                    except Exception as exc:
                        await self._recover(exc, "tick")
        finally:
            await self._shutdown()
            watchdog.cancel()

    async def _start(self) -> None:
        now = self.clock.now().timestamp()
        rolled_back = await run_blocking(self.updater.note_rollback)
        if rolled_back is not None:
            log.error("rollback_reported", failed_version=rolled_back)
            if self.metrics is not None:
                self.metrics.rollback(rolled_back)
        state = self.updater.store.load()
        staged = await run_blocking(self.updater.staged_slot_boots_next)
        resumed = mc.resume(mc.from_dict(state.agent), now, staged_still_next=staged)
        self._m = resumed.machine
        if not staged:
            self.updater.clear_reboot_sentinel()
        await self._refresh_booted()
        log.info(
            "agent_started",
            state=self._m.state.value,
            resume=resumed.note,
            failures=self._m.failures,
            booted=self._booted.slot,
            booted_version=self._booted.version,
        )
        self._persist()
        self._publish(force=True)
        self.notifier.ready()
        if not self._booted.trial:
            self._steady()
        delay = mc.first_delay(self._m, self.timing, self.rng.random())
        self._deadline = self.clock.monotonic() + delay

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._steady_task is not None:
            self._steady_task.cancel()
        self.notifier.stopping()
        self._cancel.set()
        if self._work is not None and not self._work.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._work), STOP_GRACE_S)
        self._persist()
        log.info("agent_stopped", state=self._m.state.value)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s()
        if interval is None:
            return
        while True:  # from the event loop itself: a stuck loop stops the pings
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    async def _refresh_booted(self) -> None:
        try:
            report = await run_blocking(self.updater.status)
        except UpdaterError as exc:
            log.error("booted_slot_unknown", error_kind=exc.kind, error=exc.message)
            return
        booted = next(s for s in report.slots if s.booted)
        self._booted = _Booted(
            report.booted, report.booted_version or "", not booted.flags.successful
        )

    def _steady(self) -> None:
        if self._steady_task is None or self._steady_task.done():
            self._steady_task = asyncio.create_task(self._report_steady())

    # ---- events and actions ---------------------------------------------------------------------

    async def _dispatch(self, event: mc.Event) -> None:
        before = self._m
        self._m, actions = mc.step(self._m, event, self.clock.now().timestamp())
        if mc.to_dict(before) != mc.to_dict(self._m):
            self._persist()
        self._publish()
        self._reschedule()
        for action in actions:
            await self._execute(action)

    def _reschedule(self) -> None:
        delay = mc.next_delay(self._m, self.timing, self.rng.random())
        self._deadline = None if delay is None else self.clock.monotonic() + delay
        self._wake.set()

    async def _execute(self, action: mc.Action) -> None:
        match action:
            case mc.Check():
                self._start_work(self._do_check(), "check")
            case mc.Install(offer=offer):
                self._start_work(self._do_install(offer), "install")
            case mc.Finalize(force=force):
                await self._finalize(force)
            case mc.ReportError(error=error):
                log.error(
                    "update_failed",
                    error_kind=error.kind,
                    error=error.message,
                    failures=self._m.failures,
                )
                await self._dispatch(mc.ErrorReported())

    def _start_work(self, coro: Awaitable[None], step: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                await self._recover(exc, step)
            finally:
                release_memory()  # an idle agent should not keep an install's heap

        self._work = asyncio.create_task(guarded())

    async def _recover(self, exc: Exception, step: str) -> UpdaterError:
        """End a unit of work that raised something it should not have as a failure.

        Whatever the exception and wherever it left the machine, the machine
        leaves the busy states (:class:`updater.machine.WorkCrashed`), the error
        is recorded as ``internal`` and counted, and the next try is backed off
        as after any failure. A crash of what the recovery itself starts (the
        error report) is recovered the same way; the machine gets out of the
        busy states within two steps, so this ends.
        """
        error = internal_error(exc, step)
        log.error(
            "agent_work_crashed",
            step=step,
            state=self._m.state.value,
            error_kind=error.kind,
            error=error.message,
            exc_info=exc,
        )
        if self._stopping or isinstance(error, Cancelled):
            return error  # stopping: the state is persisted as it is and resumes at start
        self._count(error.kind)
        info = mc.ErrorInfo(error.kind, error.message)
        for _ in range(3):
            try:
                await self._dispatch(mc.WorkCrashed(info))
                break
            except Exception as again:
                log.error("agent_recovery_crashed", step=step, exc_info=again)
        return error

    def _count(self, kind: str) -> None:
        """Count a failure; a metrics port that breaks must not change what happens."""
        if self.metrics is None:
            return
        try:
            if self._m.state == mc.S.CHECKING_FOR_UPDATE:
                self.metrics.check_failed(kind)  # counts in errors_total too
            else:
                self.metrics.error(kind)
        except Exception:
            log.exception("metrics_not_counted", error_kind=kind)

    async def _fail(self, exc: UpdaterError) -> None:
        if isinstance(exc, Cancelled) or self._stopping:
            return  # stopping: the state is persisted as it is and resumes at start
        self._count(exc.kind)
        await self._dispatch(mc.Failed(mc.ErrorInfo(exc.kind, exc.message)))

    async def _do_check(self) -> None:
        await self._refresh_booted()  # `updatectl mark-good` may have blessed it meanwhile
        if self._booted.trial:
            # Not blessed yet: installing would overwrite the only known-good slot.
            log.info("check_skipped_trial_boot", booted=self._booted.slot)
            await self._dispatch(mc.NoUpdate())
            return
        try:
            result = await run_blocking(self.updater.check)
        except UpdaterError as exc:
            await self._fail(exc)
            return
        if self.metrics is not None:
            self.metrics.checked(self.clock.now().timestamp())
        self._check = result
        m = result.manifest
        if m is not None and result.blocked is not None:
            self._note_blocked(m.version, True)
            await self._fail(refusal(result.blocked))
            return
        if m is not None and result.update_available and self.updater.blocks is not None:
            self._note_blocked(m.version, False)
        if m is not None and result.staged:
            await self._dispatch(mc.AlreadyStaged(m.version))
        elif m is not None and result.update_available:
            await self._dispatch(
                mc.UpdateFound(mc.Offer(m.version, m.image.size), result.interval_s)
            )
        else:
            if result.deferred is not None:
                log.info("update_deferred_by_server", reason=result.deferred)
            await self._dispatch(mc.NoUpdate(result.interval_s))

    async def _do_install(self, offer: mc.Offer) -> None:
        check = self._check
        assert check is not None and check.manifest is not None
        assert check.manifest.version == offer.version
        loop = asyncio.get_running_loop()
        last: list[str] = [""]

        def on_progress(p: Progress) -> None:  # from the install's thread
            phase = {"download": "download", "readback": "verify", "finalize": "finalize"}[p.phase]
            fraction = p.done / p.total if p.total else 1.0
            key = f"{phase}:{fraction:.2f}"
            if key != last[0]:
                last[0] = key
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._progress, phase, fraction)

        self._cancel.clear()
        try:
            result = await run_blocking(
                lambda: self.updater.install(check, self._cancel, on_progress)
            )
        except UpdaterError as exc:
            await self._fail(exc)
            return
        if result is not None and self.metrics is not None:
            self.metrics.installed(result.raw_size, result.seconds)
        await self._dispatch(mc.Staged(offer.version))

    def _progress(self, phase: str, fraction: float) -> None:
        if self._m.state not in mc.INSTALLING or self._stopping:
            return
        event = mc.Progressed(phase, fraction)  # type: ignore[arg-type]
        try:
            self._m, _ = mc.step(self._m, event, self.clock.now().timestamp())
        except mc.InvalidTransition:
            return  # a late callback after the install ended
        self._publish()

    async def _finalize(self, force: bool) -> None:
        """Policy (unless forced), pre-reboot hooks, then logind. Fails closed.

        A crash of any of them is a failed reboot attempt (asked again later,
        backing off) and gives back the cluster lock taken for it.

        One attempt at a time: the retry timer may fire while the hooks of the
        last attempt still run. Once logind accepted the reboot, no attempt until
        REBOOT_PATIENCE_S has passed, and the slot is never given back (see
        :meth:`_release`): the host is going down holding it.
        """
        if self._finalizing:
            log.info("reboot_attempt_under_way", forced=force)
            if force:
                raise RefusedError(
                    "reboot_refused",
                    "a reboot attempt is under way (waiting for the policy or the "
                    "pre-reboot hooks)",
                    hint="ask again once it has ended (updatectl status)",
                )
            return
        if self._reboot_started is not None:
            since = self.clock.monotonic() - self._reboot_started
            if since < REBOOT_PATIENCE_S:
                log.debug("reboot_already_started", seconds_ago=round(since, 1))
                return
            log.warning("reboot_did_not_happen", seconds_ago=round(since, 1))
            self._reboot_started = None
        self._finalizing = True
        try:
            await self._try_finalize(force)
        except RefusedError:
            raise  # a forced reboot that logind refused: the caller hears of it
        except Exception as exc:
            error = await self._recover(exc, "finalize")
            await self._release("finalize_crashed")
            if force and error is exc:
                raise
            if force:
                raise error from exc
        finally:
            self._finalizing = False

    async def _try_finalize(self, force: bool) -> None:
        # The group's failed versions, before the lock is asked for and again once it is
        # held: a host that rolled back meanwhile has recorded its version before it let
        # the slot go (see _report_steady).
        if await self._reboot_blocked(force):
            return
        if not force:
            staged = self._m.staged
            try:
                allowed = await run_blocking(functools.partial(self.strategy.can_finalize, staged))
            except Exception as exc:  # fail closed, and count it
                if isinstance(exc, RefusedError) and exc.kind == "version_blocked" and staged:
                    # a lock service (our FleetLock server) knows the group's failed versions
                    log.error(
                        "reboot_refused_version_blocked",
                        version=staged,
                        strategy=self.strategy.name,
                        reason=exc.message,
                    )
                    await self._refuse_blocked(staged, exc)
                    return
                kind = exc.kind if isinstance(exc, UpdaterError) else "policy"
                log.error(
                    "reboot_policy_failed",
                    strategy=self.strategy.name,
                    error_kind=kind,
                    error=str(exc),
                )
                if self.metrics is not None:
                    self.metrics.error(kind)
                # counted as a refusal: the next attempt backs off (up to the cap)
                await self._dispatch(mc.RebootRefused(mc.ErrorInfo(kind, str(exc))))
                allowed = False
            self._report_to_fleet()  # lock held or not: the fleet shows who waits
            if not allowed:
                log.info("reboot_deferred", strategy=self.strategy.name, staged=self._m.staged)
                return
            if staged is not None and self.updater.blocks is None:
                self._note_blocked(staged, False)  # the lock service let it through
            if await self._reboot_blocked(force):
                return
        if self.pre_reboot is not None:
            report = await self.pre_reboot.run()
            if not report.ok:
                failed = [r.name for r in report.failures]
                log.error("pre_reboot_hooks_failed", failed=failed, staged=self._m.staged)
                if self.metrics is not None:
                    self.metrics.error("pre_reboot_failed")
                await self._release("pre_reboot_failed")
                return
        log.info("reboot_requested", staged=self._m.staged, forced=force)
        if self.metrics is not None:
            self.metrics.reboot_requested()
        try:
            await self.rebooter.reboot()
        except RefusedError as exc:
            now = self.clock.monotonic()
            if self._refused_since is None:
                self._refused_since = now
            log.warning(
                "reboot_refused",
                error=exc.message,
                refusals=self._m.reboot_refusals + 1,
                refused_for_s=round(now - self._refused_since, 1),
            )
            if self.metrics is not None:
                self.metrics.reboot_refused()
            if now - self._refused_since >= self.release_after_s:
                # Someone keeps blocking the reboot: let another host have the slot.
                await self._release("reboot_refused_too_long")
                self._refused_since = None
            await self._dispatch(mc.RebootRefused(mc.ErrorInfo(exc.kind, exc.message)))
            if force:
                raise
            return
        self._refused_since = None
        self._reboot_started = self.clock.monotonic()
        await self._dispatch(mc.RebootStarted())

    async def _reboot_blocked(self, force: bool) -> bool:
        """Refuse to reboot into a staged version the group blocks; True if refused.

        Fails safe: a version whose block could not be looked up is not rebooted
        into, unless forced (an admin's explicit reboot goes ahead when etcd is
        down, never into a version known to be blocked). A refusal gives back
        any reboot slot held, is counted and shows as the last error.
        """
        blocks, version = self.updater.blocks, self._m.staged
        if blocks is None or version is None:
            return False
        error: UpdaterError | None = None
        verdict_blocked = False
        try:
            verdict = await run_blocking(functools.partial(blocks.verdict, version))
        except Exception as exc:
            error = internal_error(exc, "version block lookup")
            log.error(
                "version_block_unknown",
                version=version,
                group=blocks.group,
                error_kind=error.kind,
                error=error.message,
                forced=force,
            )
            if force:
                return False
        else:
            self._note_blocked(version, verdict.blocked)
            if not verdict.blocked:
                return False
            error = refusal(verdict)
            verdict_blocked = True
            log.error(
                "reboot_refused_version_blocked",
                version=version,
                group=blocks.group,
                hosts=verdict.hosts,
                reason=verdict.describe(),
            )
        if verdict_blocked:
            await self._refuse_blocked(version, error)
        else:
            if self.metrics is not None:
                self.metrics.error(error.kind)
            if self.strategy.holding:
                await self._release(error.kind)
            await self._dispatch(mc.RebootRefused(mc.ErrorInfo(error.kind, error.message)))
            self._report_to_fleet()
        if force:
            raise error
        return True

    async def _refuse_blocked(self, version: str, error: UpdaterError) -> None:
        """The staged ``version`` is blocked for the group: give back any slot, take it
        off the next boot (an unplanned reboot must not boot it either) and report the
        refusal (IDLE, last error ``version_blocked``); the next check decides again.
        If it cannot be un-staged, the refusal is a refused reboot, asked again later."""
        self._note_blocked(version, True)
        if self.metrics is not None:
            self.metrics.error(error.kind)
        if self.strategy.holding:
            await self._release(error.kind)
        try:
            unstaged = await run_blocking(
                functools.partial(self.updater.unstage, version, error.kind)
            )
        except Exception as exc:
            failed = internal_error(exc, "unstage")
            log.error(
                "unstage_failed", version=version, error_kind=failed.kind, error=failed.message
            )
            unstaged = None
        info = mc.ErrorInfo(error.kind, error.message)
        if unstaged is None:
            await self._dispatch(mc.RebootRefused(info))
        else:
            await self._dispatch(mc.Unstaged(info))
        self._report_to_fleet()

    def _note_blocked(self, version: str, blocked: bool) -> None:
        """Show (or stop showing) that this host refuses ``version``."""
        if blocked:
            self.blocked_version = version
        elif self.blocked_version == version:
            self.blocked_version = ""
        else:
            return
        if self.metrics is not None:
            try:
                self.metrics.version_blocked(version, blocked)
            except Exception:
                log.exception("metrics_not_counted", error_kind="version_blocked")
        self._report_to_fleet()

    async def _record_rollbacks(self) -> None:
        """Record this host's rollbacks for its group (policies.failed); raises while one is
        left. They wait in the state file, so neither a restart nor etcd being down loses one."""
        blocks = self.updater.blocks
        if blocks is None:
            return
        for note in self.updater.store.load().unrecorded:
            try:
                await run_blocking(
                    functools.partial(blocks.record, note.version, note.kind, note.at)
                )
            except Exception as exc:
                error = internal_error(exc, "failed version record")
                log.error(
                    "failed_version_not_recorded",
                    version=note.version,
                    failure_kind=note.kind,
                    group=blocks.group,
                    error_kind=error.kind,
                    error=error.message,
                )
                raise
            self.updater.store.update(lambda st, v=note.version: st.recorded(v))  # type: ignore[misc]
            log.info(
                "failed_version_reported",
                version=note.version,
                failure_kind=note.kind,
                group=blocks.group,
            )

    async def _release_steady(self) -> None:
        """Release for the steady state; without a failed-version store of its own
        (FleetLock), each pending rollback goes along with the release, and is kept
        until a release that carried it succeeded (the server records it first)."""
        notes = () if self.updater.blocks is not None else self.updater.store.load().unrecorded
        if not notes:
            await run_blocking(self.strategy.report_steady)
            return
        for note in notes:
            report = FailureReport(note.version, note.kind)
            carried = await run_blocking(functools.partial(self.strategy.report_steady, report))
            if not carried:
                return  # nowhere to record it (no lock service): kept in the state file
            self.updater.store.update(lambda st, v=note.version: st.recorded(v))  # type: ignore[misc]
            log.info(
                "failed_version_reported",
                version=note.version,
                failure_kind=note.kind,
                via=self.strategy.name,
            )

    def _report_to_fleet(self) -> None:
        """Refresh the fleet record when something a dashboard shows changed."""
        if self.fleet is None or self._stopping:
            return
        if self._fleet_task is None or self._fleet_task.done():
            self._fleet_task = asyncio.create_task(self._fleet_report())

    async def _fleet_report(self) -> None:
        assert self.fleet is not None
        fleet = self.fleet
        while not self._stopping:
            # progress alone is not fleet news: it would write etcd every percent
            current = (
                replace(self.status(), progress=0.0),
                self.strategy.holding,
                self.blocked_version,
            )
            if current == self._fleet_reported:
                return
            try:
                await run_blocking(functools.partial(fleet.report, *current))
            except Exception as exc:
                log.warning("fleet_status_not_published", error=str(exc))
                return  # the next change or poll tries again
            self._fleet_reported = current

    async def _release(self, why: str) -> None:
        """Give back what the strategy holds for a reboot that is not happening now.

        Never once logind accepted a reboot: whatever fails then (a hook killed by
        the shutdown) happens on a host that is going down, and its slot is what
        keeps the next host from going down with it. The next boot's steady step
        gives it back."""
        if self._reboot_started is not None:
            log.warning("reboot_lock_kept", reason=why, why="the reboot already started")
            return
        try:
            await run_blocking(self.strategy.report_steady)
            log.info("reboot_lock_given_back", reason=why)
        except Exception as exc:
            log.error("reboot_lock_release_failed", reason=why, error=str(exc))

    async def _report_steady(self) -> None:
        """Report steady (release any slot this host holds) until it is acknowledged."""
        delay = self.timing.retry_base_s / 60.0  # seconds: 1 s with the defaults
        while not self._stopping:
            try:
                # A rollback is recorded for the group first, and the slot held until it is:
                # the next host must not take the slot before it can see the block.
                await self._record_rollbacks()
                await self._release_steady()
                log.info("reported_steady", strategy=self.strategy.name)
                return
            except Exception as exc:
                kind = exc.kind if isinstance(exc, UpdaterError) else "policy"
                log.warning(
                    "report_steady_failed",
                    error_kind=kind,
                    error=str(exc),
                    retry_in_s=round(delay, 1),
                )
                if self.metrics is not None:
                    self.metrics.error(kind)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.timing.retry_cap_s)

    # ---- publishing -----------------------------------------------------------------------------

    def _persist(self) -> None:
        record = mc.to_dict(self._m)
        try:
            self.updater.store.update(lambda st: replace(st, agent=record))
        except UpdaterError as exc:
            log.error("state_not_saved", error_kind=exc.kind, error=exc.message)
        except Exception as exc:  # the agent goes on; the state is saved at the next change
            log.error("state_not_saved", error_kind="internal", error=str(exc), exc_info=exc)

    def _publish(self, force: bool = False) -> None:
        st = self.status()
        if st == self._last_status and not force:
            return
        previous = self._last_status
        self._last_status = st
        if previous is None or previous.state != st.state:
            log.info(
                "state_changed",
                state=st.state,
                previous=previous.state if previous else None,
                version=st.new_version or st.staged_version or None,
            )
            if self.metrics is not None:
                self.metrics.state_changed(st.state, self.clock.now().timestamp())
        self.notifier.status(status_text(st))
        self._report_to_fleet()
        for listener in list(self._listeners):
            try:
                listener(st)
            except Exception:
                log.exception("status_listener_failed")
