"""The agent's state machine: ``step(machine, event, now) -> (machine, actions)``.

update_engine's states, kept pure: no I/O, no clock, no randomness inside.
The daemon feeds it events (timer ticks, results of the work it did, requests
from D-Bus) and carries out the actions it returns. Each transition names the
states it may start from: an event from the agent's own work arriving in any
other state is a bug and raises :class:`InvalidTransition`; a request from
outside (check now, reset) in a state where it makes no sense is ignored
(update_engine's behaviour: a check while one runs is a no-op); a forced
reboot with nothing staged is refused (:class:`Refuse`: its caller hears why).

Retry counters live in the machine (``failures``, ``reboot_refusals``), and
the time to the next poll is a pure function of it (:func:`next_delay`). The
machine in the state file and across restarts: updater.machinerecord; its
vocabulary (states, events, actions, timing): updater.machinemodel, re-exported here.

The reboot attempt is decided here too: one attempt at a time
(``finalizing``), no new attempt for ``reboot_patience_s`` once the rebooter
accepted one, the reboot slot given back when the rebooter keeps refusing for
``release_after_s`` and never once the host is going down. Those rules read
the monotonic clock the agent passes to :func:`step`; they are not persisted
(an agent that restarts starts a fresh attempt).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from updater.machinemodel import (
    BUSY,
    DEFAULT_TIMING,
    INSTALLING,
    Action,
    AlreadyStaged,
    AttemptAbandoned,
    Check,
    CheckRequested,
    ErrorInfo,
    ErrorReported,
    Event,
    Failed,
    Finalize,
    FinalizeEnded,
    Install,
    InvalidTransition,
    Machine,
    Note,
    NoUpdate,
    Offer,
    Progressed,
    RebooterRefused,
    RebootRefused,
    RebootRequested,
    RebootStarted,
    Refuse,
    Release,
    ReportError,
    ResetRequested,
    S,
    Staged,
    Tick,
    Timing,
    Unstaged,
    UpdateFound,
    WorkCrashed,
)

__all__ = [
    "BUSY",
    "DEFAULT_TIMING",
    "INSTALLING",
    "Action",
    "AlreadyStaged",
    "AttemptAbandoned",
    "Check",
    "CheckRequested",
    "ErrorInfo",
    "ErrorReported",
    "Event",
    "Failed",
    "Finalize",
    "FinalizeEnded",
    "Install",
    "InvalidTransition",
    "Machine",
    "NoUpdate",
    "Note",
    "Offer",
    "Progressed",
    "RebootRefused",
    "RebootRequested",
    "RebootStarted",
    "RebooterRefused",
    "Refuse",
    "Release",
    "ReportError",
    "ResetRequested",
    "S",
    "Staged",
    "Tick",
    "Timing",
    "Unstaged",
    "UpdateFound",
    "WorkCrashed",
    "enter",
    "first_delay",
    "next_delay",
    "server_interval",
    "step",
]


# ---- transitions ------------------------------------------------------------------------------

_PHASE_STATE = {"download": S.DOWNLOADING, "verify": S.VERIFYING, "finalize": S.FINALIZING}
_PHASE_ORDER = [S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING]


def enter(m: Machine, state: S, now: float, **changes: Any) -> Machine:
    """``m`` in ``state`` (entered at ``now``, unless it is already there) with ``changes``."""
    return replace(m, state=state, since=now if state != m.state else m.since, **changes)


def step(
    m: Machine,
    event: Event,
    now: float,
    *,
    monotonic: float | None = None,
    timing: Timing = DEFAULT_TIMING,
) -> tuple[Machine, tuple[Action, ...]]:
    """The machine after ``event`` at unix time ``now``, and the actions to carry out.

    ``monotonic`` (default ``now``) is the clock of the reboot attempt's rules
    (patience, release): a wall clock that jumps must not shorten them.
    """
    mono = now if monotonic is None else monotonic

    def require(*states: S) -> None:
        if m.state not in states:
            raise InvalidTransition(m, event)

    match event:
        case Tick():
            if m.state == S.IDLE:
                return enter(m, S.CHECKING_FOR_UPDATE, now), (Check(),)
            if m.state == S.UPDATED_NEED_REBOOT:
                return _attempt(m, mono, timing, force=False)
            return m, ()  # a late timer while busy: nothing to do
        case CheckRequested():
            if m.state in (S.IDLE, S.REPORTING_ERROR_EVENT):
                return enter(m, S.CHECKING_FOR_UPDATE, now), (Check(),)
            return m, ()
        case ResetRequested():
            if m.state == S.REPORTING_ERROR_EVENT:
                return enter(m, S.IDLE, now), ()
            return m, ()
        case RebootRequested(force=force):
            if m.state == S.UPDATED_NEED_REBOOT:
                if not force:
                    m = replace(m, reboot_wanted=True)
                return _attempt(m, mono, timing, force=force)
            return m, (Refuse("nothing_staged", "no update is staged: nothing to reboot into"),)
        case NoUpdate(interval_s=interval):
            require(S.CHECKING_FOR_UPDATE)
            return enter(
                m,
                S.IDLE,
                now,
                failures=0,
                offer=None,
                last_error=None,
                last_check=now,
                server_interval_s=interval,
            ), ()
        case UpdateFound(offer=offer, interval_s=interval):
            require(S.CHECKING_FOR_UPDATE)
            # failures are kept: an install that fails every time must back off
            return enter(
                m,
                S.UPDATE_AVAILABLE,
                now,
                offer=offer,
                last_check=now,
                progress=0.0,
                server_interval_s=interval,
            ), (Install(offer),)
        case AlreadyStaged(version=version):
            require(S.CHECKING_FOR_UPDATE)
            return enter(
                m,
                S.UPDATED_NEED_REBOOT,
                now,
                staged=version,
                failures=0,
                last_check=now,
                last_error=None,
                progress=1.0,
                finalizing=True,
                reboot_wanted=False,
            ), (Finalize(),)
        case Progressed(phase=phase, fraction=fraction):
            require(*INSTALLING)
            target = _PHASE_STATE[phase]
            if _PHASE_ORDER.index(target) < _PHASE_ORDER.index(m.state):
                raise InvalidTransition(m, event)  # the pipeline never goes back
            return enter(m, target, now, progress=min(max(fraction, 0.0), 1.0)), ()
        case Staged(version=version):
            require(*INSTALLING)
            return enter(
                m,
                S.UPDATED_NEED_REBOOT,
                now,
                staged=version,
                failures=0,
                last_error=None,
                progress=1.0,
                reboot_refusals=0,
                finalizing=True,
                reboot_wanted=False,
            ), (Finalize(),)
        case Failed(error=error):
            require(*BUSY)
            return enter(
                m,
                S.REPORTING_ERROR_EVENT,
                now,
                failures=m.failures + 1,
                last_error=error,
                progress=0.0,
            ), (ReportError(error),)
        case ErrorReported():
            require(S.REPORTING_ERROR_EVENT)
            return enter(m, S.IDLE, now), ()
        case WorkCrashed(error=error):
            return _crashed(m, error, now)
        case RebootRefused(error=error):
            require(S.UPDATED_NEED_REBOOT)
            return replace(m, reboot_refusals=m.reboot_refusals + 1, last_error=error), ()
        case RebooterRefused(error=error):
            require(S.UPDATED_NEED_REBOOT)
            since = mono if m.refused_since is None else m.refused_since
            m = replace(
                m, reboot_refusals=m.reboot_refusals + 1, last_error=error, refused_since=since
            )
            if mono - since >= timing.release_after_s:
                # someone keeps blocking the reboot: let another host have the slot
                return _release(replace(m, refused_since=None), "reboot_refused_too_long")
            return m, ()
        case RebootStarted():
            require(S.UPDATED_NEED_REBOOT)
            return replace(m, reboot_started_at=mono, refused_since=None), ()
        case AttemptAbandoned(reason=reason):
            require(S.UPDATED_NEED_REBOOT)
            return _release(m, reason)
        case FinalizeEnded():
            return replace(m, finalizing=False), ()
        case Unstaged(error=error):
            require(S.UPDATED_NEED_REBOOT)
            return enter(
                m,
                S.REPORTING_ERROR_EVENT,
                now,
                staged=None,
                offer=None,
                failures=m.failures + 1,
                last_error=error,
                progress=0.0,
                reboot_refusals=0,
                reboot_wanted=False,
            ), (ReportError(error),)
    raise AssertionError(f"unhandled event {event!r}")  # pragma: no cover


def _attempt(
    m: Machine, mono: float, timing: Timing, *, force: bool
) -> tuple[Machine, tuple[Action, ...]]:
    """A reboot attempt is due (the timer, or forced by a request), if none is under way.

    One at a time: the timer may fire while the policy or the hooks of the last
    attempt still run (a forced one hears why not). Once the rebooter accepted a
    reboot, none until ``reboot_patience_s`` has passed without it happening.
    """
    if m.finalizing:
        note = Note("reboot_attempt_under_way", "info", (("forced", force),))
        if not force:
            return m, (note,)
        return m, (
            note,
            Refuse(
                "reboot_refused",
                "a reboot attempt is under way (waiting for the policy or the pre-reboot hooks)",
                hint="ask again once it has ended (updatectl status)",
            ),
        )
    notes: tuple[Action, ...] = ()
    if m.reboot_started_at is not None:
        since = round(mono - m.reboot_started_at, 1)
        if mono - m.reboot_started_at < timing.reboot_patience_s:
            return m, (Note("reboot_already_started", "debug", (("seconds_ago", since),)),)
        notes = (Note("reboot_did_not_happen", "warning", (("seconds_ago", since),)),)
    finalize = Finalize(force=force, requested=m.reboot_wanted and not force)
    return replace(m, finalizing=True, reboot_started_at=None), (*notes, finalize)


def _release(m: Machine, reason: str) -> tuple[Machine, tuple[Action, ...]]:
    """Give the reboot slot back, never once the rebooter accepted a reboot: whatever
    fails then (a hook killed by the shutdown) happens on a host that is going down, and
    its slot is what keeps the next host from going down with it. The next boot's steady
    step gives it back."""
    if m.reboot_started_at is not None:
        kept = (("reason", reason), ("why", "the reboot already started"))
        return m, (Note("reboot_lock_kept", "warning", kept),)
    return m, (Release(reason),)


def _crashed(m: Machine, error: ErrorInfo, now: float) -> tuple[Machine, tuple[Action, ...]]:
    """Whatever the state, a crash ends as a failure that is backed off, never a wedge.

    Busy: a failed check or install (reported, then IDLE). Reporting an error:
    the report is over. Staged: a failed reboot attempt, asked again later, that
    gives back the slot taken for it. Idle: a failure, so the next check backs off.
    """
    if m.state in BUSY:
        return enter(
            m,
            S.REPORTING_ERROR_EVENT,
            now,
            failures=m.failures + 1,
            last_error=error,
            progress=0.0,
        ), (ReportError(error),)
    if m.state == S.REPORTING_ERROR_EVENT:
        return enter(m, S.IDLE, now, last_error=error), ()
    if m.state == S.UPDATED_NEED_REBOOT:
        m = replace(m, reboot_refusals=m.reboot_refusals + 1, last_error=error)
        return _release(m, "finalize_crashed") if m.finalizing else (m, ())
    return replace(m, failures=m.failures + 1, last_error=error), ()


# ---- delays -----------------------------------------------------------------------------------


def _jittered(seconds: float, timing: Timing, rnd: float) -> float:
    return seconds * (1.0 - timing.jitter + 2.0 * timing.jitter * rnd)


def next_delay(m: Machine, timing: Timing, rnd: float) -> float | None:
    """Seconds until the next Tick; None while work is under way.

    ``rnd`` is a uniform random number in [0, 1), passed in to keep this pure.
    """
    if m.state in BUSY:
        return None
    if m.state == S.UPDATED_NEED_REBOOT:
        # a refused reboot is asked again later, backing off up to the cap
        wait = timing.reboot_retry_s * 2 ** min(m.reboot_refusals, 16)
        return _jittered(min(wait, max(timing.retry_cap_s, timing.reboot_retry_s)), timing, rnd)
    if m.failures:
        backoff = timing.retry_base_s * 2 ** min(m.failures - 1, 32)
        return _jittered(min(backoff, timing.retry_cap_s), timing, rnd)
    interval = timing.poll_interval_s
    if m.server_interval_s is not None:
        interval = server_interval(m.server_interval_s, timing)
    return _jittered(interval, timing, rnd)


def server_interval(asked_s: float, timing: Timing) -> float:
    """The poll interval a server asked for, held to [min_interval_s, the ceiling]."""
    ceiling = max(timing.poll_interval_s, timing.max_server_interval_s)
    if math.isnan(asked_s):  # from a hand-edited state file
        return timing.poll_interval_s
    return min(max(asked_s, timing.min_interval_s), ceiling)


def first_delay(m: Machine, timing: Timing, rnd: float) -> float:
    """Seconds from the agent's start to its first Tick."""
    return timing.first_check_delay_s * (1.0 + timing.jitter * rnd)
