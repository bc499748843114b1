"""The agent's reboot path: ask the reboot policy, run the pre-reboot hooks, reboot;
give the reboot slot back when the machine says so; report steady once booted
(recording this host's rollbacks for its group first).

The agent's machine (updater.machine) decides when an attempt starts and what a
refusal means; this class carries the attempt out through the ports and feeds
the outcome back as events (:class:`AgentSide`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Protocol

import structlog

from policies.failed import refusal
from policies.rebootlock import FailureReport
from policies.strategy import RebootStrategy
from updater import machine as mc
from updater.agentports import MetricsPort
from updater.blessing import HealthCheck
from updater.blocking import run_blocking
from updater.clock import Clock
from updater.errors import RefusedError, UpdaterError, internal_error
from updater.fleetrecord import FleetRecord
from updater.rebooter import Rebooter
from updater.sessions import UserSessions
from updater.update import Updater

log = structlog.get_logger(__name__)


class AgentSide(Protocol):
    """What the reboot path needs of the agent that runs it."""

    @property
    def machine(self) -> mc.Machine: ...

    @property
    def stopping(self) -> bool: ...

    async def dispatch(self, event: mc.Event) -> None:
        """Step the machine with ``event`` and carry out its actions."""
        ...

    async def recover(self, exc: Exception, step: str) -> UpdaterError:
        """End a step that crashed as a failure (the machine's WorkCrashed)."""
        ...

    def note_blocked(self, version: str, blocked: bool) -> None:
        """Show (or stop showing) that this host refuses ``version``."""
        ...


class RebootPath:
    """Finalize (policy, hooks, reboot), release and report steady for one agent."""

    def __init__(
        self,
        agent: AgentSide,
        fleet: FleetRecord,
        *,
        updater: Updater,
        strategy: RebootStrategy,
        rebooter: Rebooter,
        clock: Clock,
        timing: mc.Timing,
        metrics: MetricsPort | None = None,
        pre_reboot: HealthCheck | None = None,
        users: UserSessions | None = None,
        on_request: RebootStrategy | None = None,
    ) -> None:
        self.agent = agent
        self.fleet = fleet
        self.updater = updater
        self.strategy = strategy
        self.rebooter = rebooter
        self.clock = clock
        self.timing = timing
        self.metrics = metrics
        self.pre_reboot = pre_reboot
        self.users = users
        # what an admin's request (`updatectl reboot`) asks instead of ``strategy``: the
        # same lock and windows, but `off` gives way (None: ``strategy`` itself)
        self.on_request = on_request
        self._steady_task: asyncio.Task[None] | None = None

    def report_steady(self) -> None:
        """Report steady in the background (again only once the last report ended)."""
        if self._steady_task is None or self._steady_task.done():
            self._steady_task = asyncio.create_task(self._report_steady())

    def stop(self) -> None:
        if self._steady_task is not None:
            self._steady_task.cancel()

    async def finalize(self, force: bool, requested: bool = False) -> None:
        """Policy (unless forced; ``requested``: the on-request strategy), pre-reboot
        hooks, then logind. Fails closed.

        A crash of any of them is a failed reboot attempt (asked again later,
        backing off); the machine gives back the slot taken for it. The machine
        started this attempt and hears when it is over (one at a time).
        """
        try:
            await self._try_finalize(force, requested)
        except RefusedError:
            raise  # a forced reboot that logind refused: the caller hears of it
        except Exception as exc:
            error = await self.agent.recover(exc, "finalize")
            if force and error is exc:
                raise
            if force:
                raise error from exc
        finally:
            await self.agent.dispatch(mc.FinalizeEnded())

    async def _try_finalize(self, force: bool, requested: bool) -> None:
        # The group's failed versions, before the lock is asked for and again once it is
        # held: a host that rolled back meanwhile has recorded its version before it let
        # the slot go (see _report_steady).
        if await self._reboot_blocked(force):
            return
        if not force:
            staged = self.agent.machine.staged
            policy = self.strategy
            if requested and self.on_request is not None:
                policy = self.on_request
            try:
                allowed = await run_blocking(functools.partial(policy.can_finalize, staged))
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
                    strategy=policy.name,
                    error_kind=kind,
                    error=str(exc),
                )
                if self.metrics is not None:
                    self.metrics.error(kind)
                # counted as a refusal: the next attempt backs off (up to the cap)
                await self.agent.dispatch(mc.RebootRefused(mc.ErrorInfo(kind, str(exc))))
                allowed = False
            self.fleet.refresh()  # lock held or not: the fleet shows who waits
            if not allowed:
                log.info(
                    "reboot_deferred",
                    strategy=policy.name,
                    staged=self.agent.machine.staged,
                    requested=requested,
                )
                return
            if staged is not None and self.updater.blocks is None:
                self.agent.note_blocked(staged, False)  # the lock service let it through
            if await self._reboot_blocked(force):
                return
            if await self._users_logged_in():
                return
        if self.pre_reboot is not None:
            report = await self.pre_reboot.run()
            if not report.ok:
                failed = [r.name for r in report.failures]
                log.error(
                    "pre_reboot_hooks_failed", failed=failed, staged=self.agent.machine.staged
                )
                if self.metrics is not None:
                    self.metrics.error("pre_reboot_failed")
                await self.agent.dispatch(mc.AttemptAbandoned("pre_reboot_failed"))
                return
        log.info(
            "reboot_requested", staged=self.agent.machine.staged, forced=force, asked=requested
        )
        if self.metrics is not None:
            self.metrics.reboot_requested()
        try:
            await self.rebooter.reboot()
        except RefusedError as exc:
            since = self.agent.machine.refused_since
            log.warning(
                "reboot_refused",
                error=exc.message,
                refusals=self.agent.machine.reboot_refusals + 1,
                refused_for_s=0.0 if since is None else round(self.clock.monotonic() - since, 1),
            )
            if self.metrics is not None:
                self.metrics.reboot_refused()
            await self.agent.dispatch(mc.RebooterRefused(mc.ErrorInfo(exc.kind, exc.message)))
            if force:
                raise
            return
        await self.agent.dispatch(mc.RebootStarted())

    async def _users_logged_in(self) -> bool:
        """Wait while interactive users are logged in (or logind cannot say who is); True
        if so. A refusal like logind's: retried, backing off, and going on for
        ``release_after_s`` it gives the slot back. A forced reboot does not ask."""
        if self.users is None:
            return False
        try:
            sessions = await self.users.interactive()
        except Exception as exc:
            error = exc if isinstance(exc, UpdaterError) else internal_error(exc, "logind sessions")
            log.warning("reboot_waits", reason="sessions_unknown", error=error.message)
            if self.metrics is not None:
                self.metrics.error(error.kind)
            await self.agent.dispatch(mc.RebooterRefused(mc.ErrorInfo(error.kind, error.message)))
            return True
        if self.metrics is not None:
            self.metrics.users_waited_for(len(sessions))
        if not sessions:
            return False
        who = [s.describe() for s in sessions]
        since = self.agent.machine.refused_since
        log.info(
            "reboot_waits_for_users",
            sessions=who,
            staged=self.agent.machine.staged,
            waited_s=0.0 if since is None else round(self.clock.monotonic() - since, 1),
        )
        message = f"the reboot waits for {len(who)} logged-in user session(s): {', '.join(who)}"
        await self.agent.dispatch(mc.RebooterRefused(mc.ErrorInfo("users_logged_in", message)))
        return True

    async def _reboot_blocked(self, force: bool) -> bool:
        """Refuse to reboot into a staged version the group blocks; True if refused.

        Fails safe: a version whose block could not be looked up is not rebooted
        into, unless forced (an admin's explicit reboot goes ahead when etcd is
        down, never into a version known to be blocked). A refusal gives back
        any reboot slot held, is counted and shows as the last error.
        """
        blocks, version = self.updater.blocks, self.agent.machine.staged
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
            self.agent.note_blocked(version, verdict.blocked)
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
                await self.agent.dispatch(mc.AttemptAbandoned(error.kind))
            await self.agent.dispatch(mc.RebootRefused(mc.ErrorInfo(error.kind, error.message)))
            self.fleet.refresh()
        if force:
            raise error
        return True

    async def _refuse_blocked(self, version: str, error: UpdaterError) -> None:
        """The staged ``version`` is blocked for the group: give back any slot, take it
        off the next boot (an unplanned reboot must not boot it either) and report the
        refusal (IDLE, last error ``version_blocked``); the next check decides again.
        If it cannot be un-staged, the refusal is a refused reboot, asked again later."""
        self.agent.note_blocked(version, True)
        if self.metrics is not None:
            self.metrics.error(error.kind)
        if self.strategy.holding:
            await self.agent.dispatch(mc.AttemptAbandoned(error.kind))
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
            await self.agent.dispatch(mc.RebootRefused(info))
        else:
            await self.agent.dispatch(mc.Unstaged(info))
        self.fleet.refresh()

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

    async def release(self, why: str) -> None:
        """Give back what the strategy holds for a reboot that is not happening now
        (the machine decides when: :class:`updater.machine.Release`)."""
        try:
            await run_blocking(self.strategy.report_steady)
            log.info("reboot_lock_given_back", reason=why)
        except Exception as exc:
            log.error("reboot_lock_release_failed", reason=why, error=str(exc))

    async def _report_steady(self) -> None:
        """Report steady (release any slot this host holds) until it is acknowledged."""
        delay = self.timing.retry_base_s / 60.0  # seconds: 1 s with the defaults
        while not self.agent.stopping:
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
