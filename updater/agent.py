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
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import structlog

from policies.failed import refusal
from policies.strategy import RebootStrategy
from updater import machine as mc
from updater import machinerecord
from updater.agentapi import AgentStatus, StatusListener
from updater.agentports import Blesser, FleetReporter, MetricsPort, NotifierPort, Waiter, wait_any
from updater.blessing import HealthCheck
from updater.blocking import release_memory, run_blocking
from updater.clock import Clock
from updater.errors import Cancelled, RefusedError, UpdaterError, internal_error
from updater.fleetrecord import FleetRecord
from updater.hostpolicy import HostPolicy
from updater.install import Progress
from updater.rebooter import Rebooter
from updater.rebootpath import RebootPath
from updater.sessions import UserSessions
from updater.update import UpdateCheckResult, Updater

log = structlog.get_logger(__name__)

STOP_GRACE_S = 3.0  # how long a stop waits for running work to wind down


def status_text(st: AgentStatus) -> str:
    """The one-line STATUS= shown by `systemctl status`."""
    booted = f"booted {st.booted_slot} {st.booted_version or '?'}"
    match st.state:
        case "IDLE":
            text = f"Idle, {booted}"
            if st.held:
                text += "; held"
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
            if st.last_error_kind == "users_logged_in":
                text += " (the last attempt waited for logged-in users)"
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
        notifier: NotifierPort,
        metrics: MetricsPort | None = None,
        timing: mc.Timing | None = None,
        rng: random.Random | None = None,
        waiter: Waiter = wait_any,
        pre_reboot: HealthCheck | None = None,
        fleet: FleetReporter | None = None,
        users: UserSessions | None = None,
        on_request: RebootStrategy | None = None,
        reloader: Callable[[], Updater] | None = None,
    ) -> None:
        self.updater = updater
        # builds the updater of the configuration as it is now (D-Bus Reload)
        self._reloader = reloader
        self._reloaded: Updater | None = None  # swapped in when the next check starts
        self._policy = HostPolicy()
        self._recheck = False  # a Reload asks for a check as soon as the agent is idle
        self._bless = bless
        self.clock = clock
        self.notifier = notifier
        self.metrics = metrics
        self.timing = timing or mc.Timing()
        self.rng = rng or random.SystemRandom()
        self.waiter = waiter
        self.fleet_record = FleetRecord(
            self.status, lambda: self.strategy.holding, metrics=metrics, reporter=fleet
        )
        self.reboots = RebootPath(
            self,
            self.fleet_record,
            updater=updater,
            strategy=strategy,
            rebooter=rebooter,
            clock=clock,
            timing=self.timing,
            metrics=metrics,
            pre_reboot=pre_reboot,
            users=users,
            on_request=on_request,
        )
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

    # the reboot path's ports, here too: the daemon's tests and tools swap them
    @property
    def strategy(self) -> RebootStrategy:
        return self.reboots.strategy

    @strategy.setter
    def strategy(self, strategy: RebootStrategy) -> None:
        self.reboots.strategy = strategy

    @property
    def rebooter(self) -> Rebooter:
        return self.reboots.rebooter

    @property
    def pre_reboot(self) -> HealthCheck | None:
        return self.reboots.pre_reboot

    @property
    def fleet(self) -> FleetReporter | None:
        return self.fleet_record.reporter

    @fleet.setter
    def fleet(self, reporter: FleetReporter | None) -> None:
        self.fleet_record.reporter = reporter

    @property
    def blocked_version(self) -> str:
        """A version this host refuses: it failed on hosts of the group."""
        return self.fleet_record.blocked_version

    # ---- what the reboot path sees (updater.rebootpath.AgentSide) -------------------------------

    @property
    def machine(self) -> mc.Machine:
        return self._m

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def dispatch(self, event: mc.Event) -> None:
        await self._dispatch(event)

    async def recover(self, exc: Exception, step: str) -> UpdaterError:
        return await self._recover(exc, step)

    def note_blocked(self, version: str, blocked: bool) -> None:
        self.fleet_record.note_blocked(version, blocked)

    # ---- AgentControl ---------------------------------------------------------------------------

    def status(self) -> AgentStatus:
        m = self._m
        until = self._policy.held_until(self.clock.now().timestamp())
        return AgentStatus(
            held=until is not None,
            held_until=int(until or 0),
            skipped_versions=self._policy.skipped,
            pin=self.updater.settings.pin or "",
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
        await self._dispatch(mc.RebootRequested(force=True))

    async def request_reboot(self) -> str:
        await self._dispatch(mc.RebootRequested(force=False))
        return "started" if self._m.reboot_started_at is not None else "waiting"

    async def reload(self) -> None:
        """The host policy now; the configuration's update source (channel, pin, server)
        from the next check. The reboot policy and the rest need a restart."""
        policy = await run_blocking(self.updater.host_policy)  # policy_corrupt: the caller hears
        self._policy = policy
        self._publish()
        try:
            if self._reloader is not None:
                # a bad configuration is the caller's to hear; the agent keeps the one it has
                self._reloaded = await run_blocking(self._reloader)
        finally:
            log.info(
                "agent_reloaded",
                held=policy.held(self.clock.now().timestamp()),
                skipped=list(policy.skipped),
                config=self._reloaded is not None,
            )
            # what changed (a channel, a pin, an unhold) is weighed by a check: now if
            # idle, else as soon as the agent is idle again (a check under way read the old)
            self._recheck = True
            self._reschedule()

    async def mark_good(self) -> None:
        await self._bless()
        await self._refresh_booted()
        self.reboots.report_steady()

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
        try:
            self._policy = await run_blocking(self.updater.host_policy)
        except UpdaterError as exc:  # every check fails on it too, visibly
            log.error("host_policy_unreadable", error_kind=exc.kind, error=exc.message)
        staged = await run_blocking(self.updater.staged_slot_boots_next)
        resumed = machinerecord.resume(
            machinerecord.from_dict(state.agent), now, staged_still_next=staged
        )
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
            self.reboots.report_steady()
        delay = mc.first_delay(self._m, self.timing, self.rng.random())
        self._deadline = self.clock.monotonic() + delay

    async def _shutdown(self) -> None:
        self._stopping = True
        self.reboots.stop()
        self.fleet_record.stop()
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

    # ---- events and actions ---------------------------------------------------------------------

    async def _dispatch(self, event: mc.Event) -> None:
        for action in self._apply(event):
            await self._execute(action)

    def _apply(self, event: mc.Event) -> tuple[mc.Action, ...]:
        """Step the machine (the only place that does), save, publish and re-arm the timer."""
        before = self._m
        self._m, actions = mc.step(
            self._m,
            event,
            self.clock.now().timestamp(),
            monotonic=self.clock.monotonic(),
            timing=self.timing,
        )
        if machinerecord.to_dict(before) != machinerecord.to_dict(self._m):
            self._persist()
        self._publish()
        self._reschedule()
        return actions

    def _reschedule(self) -> None:
        delay = mc.next_delay(self._m, self.timing, self.rng.random())
        if self._recheck and self._m.state == mc.S.IDLE:
            delay = 0.0
        self._deadline = None if delay is None else self.clock.monotonic() + delay
        self._wake.set()

    async def _execute(self, action: mc.Action) -> None:
        match action:
            case mc.Check():
                self._start_work(self._do_check(), "check")
            case mc.Install(offer=offer):
                self._start_work(self._do_install(offer), "install")
            case mc.Finalize(force=force, requested=requested):
                await self.reboots.finalize(force, requested)
            case mc.ReportError(error=error):
                log.error(
                    "update_failed",
                    error_kind=error.kind,
                    error=error.message,
                    failures=self._m.failures,
                )
                await self._dispatch(mc.ErrorReported())
            case mc.Release(reason=reason):
                await self.reboots.release(reason)
            case mc.Refuse(kind=kind, message=message, hint=hint):
                raise RefusedError(kind, message, hint=hint)
            case mc.Note(event=event, level=level, fields=fields):
                getattr(log, level)(event, **dict(fields))

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

    def _take_reloaded(self) -> None:
        """A check is starting and nothing else runs: the reloaded configuration's
        updater takes over (channel, pin, source)."""
        if self._reloaded is None:
            return
        self.updater = self.reboots.updater = self._reloaded
        self._reloaded = None
        log.info("config_applied", channel=self.updater.settings.channel)

    async def _do_check(self) -> None:
        self._recheck = False
        self._take_reloaded()
        try:
            self._policy = await run_blocking(self.updater.host_policy)
        except UpdaterError as exc:
            await self._fail(exc)
            return
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
        if m is not None and result.refused is not None:
            # the admin's decision, not a failure: nothing to back off from
            log.info("update_refused_by_host", version=m.version, error_kind=result.refused.kind)
            await self._dispatch(mc.NoUpdate(result.interval_s))
            return
        if m is not None and result.blocked is not None:
            self.note_blocked(m.version, True)
            await self._fail(refusal(result.blocked))
            return
        if m is not None and result.update_available and self.updater.blocks is not None:
            self.note_blocked(m.version, False)
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
        if self._stopping:
            return
        try:
            self._apply(mc.Progressed(phase, fraction))  # type: ignore[arg-type]
        except mc.InvalidTransition:
            return  # a late callback after the install ended

    # ---- publishing -----------------------------------------------------------------------------

    def _persist(self) -> None:
        record = machinerecord.to_dict(self._m)
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
        if self.metrics is not None:
            try:
                self.metrics.host_policy(
                    st.held_until if st.held else None, st.skipped_versions, st.pin
                )
            except Exception:
                log.exception("metrics_not_counted", error_kind="host_policy")
        self.fleet_record.refresh()
        for listener in list(self._listeners):
            try:
                listener(st)
            except Exception:
                log.exception("status_listener_failed")
