"""The agent's state machine and its timing, table-driven, no I/O."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from updater.machine import (
    BUSY,
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
    first_delay,
    next_delay,
    server_interval,
    step,
)
from updater.machinerecord import from_dict, resume, to_dict

T = 1_000_000.0
NOTHING_STAGED = Refuse("nothing_staged", "no update is staged: nothing to reboot into")
OFFER = Offer("1.1.0", 4096)
ERR = ErrorInfo("timeout", "the server stopped sending")


def M(state: S, **kw: object) -> Machine:
    return replace(Machine(state=state, since=T - 10), **kw)  # type: ignore[arg-type]


# (start, event) -> (end state, actions, checks on the machine)
TRANSITIONS: list[tuple[Machine, Event, S, tuple[object, ...]]] = [
    (M(S.IDLE), Tick(), S.CHECKING_FOR_UPDATE, (Check(),)),
    (M(S.IDLE), CheckRequested(), S.CHECKING_FOR_UPDATE, (Check(),)),
    (M(S.REPORTING_ERROR_EVENT), CheckRequested(), S.CHECKING_FOR_UPDATE, (Check(),)),
    (M(S.CHECKING_FOR_UPDATE), NoUpdate(), S.IDLE, ()),
    (M(S.CHECKING_FOR_UPDATE), UpdateFound(OFFER), S.UPDATE_AVAILABLE, (Install(OFFER),)),
    (M(S.CHECKING_FOR_UPDATE), AlreadyStaged("1.1.0"), S.UPDATED_NEED_REBOOT, (Finalize(),)),
    (M(S.UPDATE_AVAILABLE), Progressed("download", 0.1), S.DOWNLOADING, ()),
    (M(S.DOWNLOADING), Progressed("download", 0.5), S.DOWNLOADING, ()),
    (M(S.DOWNLOADING), Progressed("verify", 0.2), S.VERIFYING, ()),
    (M(S.VERIFYING), Progressed("finalize", 1.0), S.FINALIZING, ()),
    (M(S.UPDATE_AVAILABLE), Progressed("finalize", 1.0), S.FINALIZING, ()),  # read-back off
    (M(S.FINALIZING), Staged("1.1.0"), S.UPDATED_NEED_REBOOT, (Finalize(),)),
    (M(S.DOWNLOADING), Staged("1.1.0"), S.UPDATED_NEED_REBOOT, (Finalize(),)),
    (M(S.CHECKING_FOR_UPDATE), Failed(ERR), S.REPORTING_ERROR_EVENT, (ReportError(ERR),)),
    (M(S.DOWNLOADING), Failed(ERR), S.REPORTING_ERROR_EVENT, (ReportError(ERR),)),
    (M(S.VERIFYING), Failed(ERR), S.REPORTING_ERROR_EVENT, (ReportError(ERR),)),
    (M(S.REPORTING_ERROR_EVENT), ErrorReported(), S.IDLE, ()),
    (M(S.REPORTING_ERROR_EVENT), ResetRequested(), S.IDLE, ()),
    (M(S.UPDATED_NEED_REBOOT), Tick(), S.UPDATED_NEED_REBOOT, (Finalize(),)),
    (M(S.UPDATED_NEED_REBOOT), RebootRequested(), S.UPDATED_NEED_REBOOT, (Finalize(force=True),)),
    (M(S.UPDATED_NEED_REBOOT), RebootRefused(ERR), S.UPDATED_NEED_REBOOT, ()),
    (M(S.UPDATED_NEED_REBOOT), RebootStarted(), S.UPDATED_NEED_REBOOT, ()),
    (M(S.UPDATED_NEED_REBOOT), Unstaged(ERR), S.REPORTING_ERROR_EVENT, (ReportError(ERR),)),
    # requests where they make no sense are no-ops, not errors
    *[(M(s), CheckRequested(), s, ()) for s in (*sorted(BUSY), S.UPDATED_NEED_REBOOT)],
    *[(M(s), Tick(), s, ()) for s in sorted(BUSY)],
    *[(M(s), ResetRequested(), s, ()) for s in S if s != S.REPORTING_ERROR_EVENT],
    # ... except a forced reboot: its caller hears why not
    *[(M(s), RebootRequested(), s, (NOTHING_STAGED,)) for s in S if s != S.UPDATED_NEED_REBOOT],
    # the end of a reboot attempt may come after it un-staged the update
    *[(M(s), FinalizeEnded(), s, ()) for s in S],
]


@pytest.mark.parametrize(
    ("start", "event", "end", "actions"),
    TRANSITIONS,
    ids=lambda x: type(x).__name__ if not isinstance(x, S | tuple) else None,
)
def test_transition(start: Machine, event: Event, end: S, actions: tuple[object, ...]) -> None:
    m, acts = step(start, event, T)
    assert (m.state, acts) == (end, actions)
    assert m.since == (T if end != start.state else start.since)


# work results arriving where the work cannot be under way are bugs
INVALID = [
    (s, e)
    for e, allowed in [
        (NoUpdate(), {S.CHECKING_FOR_UPDATE}),
        (UpdateFound(OFFER), {S.CHECKING_FOR_UPDATE}),
        (AlreadyStaged("1"), {S.CHECKING_FOR_UPDATE}),
        (Progressed("download", 0.0), {S.UPDATE_AVAILABLE, S.DOWNLOADING}),
        (Staged("1"), {S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING}),
        (Failed(ERR), set(BUSY)),
        (ErrorReported(), {S.REPORTING_ERROR_EVENT}),
        (RebootRefused(ERR), {S.UPDATED_NEED_REBOOT}),
        (RebootStarted(), {S.UPDATED_NEED_REBOOT}),
        (RebooterRefused(ERR), {S.UPDATED_NEED_REBOOT}),
        (AttemptAbandoned("pre_reboot_failed"), {S.UPDATED_NEED_REBOOT}),
        (Unstaged(ERR), {S.UPDATED_NEED_REBOOT}),
    ]
    for s in S
    if s not in allowed
]


@pytest.mark.parametrize(("state", "event"), INVALID)
def test_invalid_transitions_raise(state: S, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        step(M(state), event, T)


def test_counters() -> None:
    m = M(S.CHECKING_FOR_UPDATE, failures=2)
    m, _ = step(m, UpdateFound(OFFER), T)
    assert m.failures == 2 and m.last_check == T  # kept until the install succeeds
    m, _ = step(m, Failed(ERR), T)
    assert (m.failures, m.last_error) == (3, ERR)
    m, _ = step(m, ErrorReported(), T)
    assert m.state == S.IDLE and m.last_error == ERR  # shown until the next success
    m, _ = step(replace(m, state=S.CHECKING_FOR_UPDATE), NoUpdate(900.0), T + 1)
    assert (m.failures, m.last_error, m.server_interval_s) == (0, None, 900.0)
    m = M(S.UPDATED_NEED_REBOOT)
    m, _ = step(m, RebootRefused(ERR), T)
    m, _ = step(m, RebootRefused(ERR), T)
    assert m.reboot_refusals == 2
    m, _ = step(M(S.DOWNLOADING, failures=4), Staged("1.1.0"), T)
    assert (m.failures, m.staged, m.progress) == (0, "1.1.0", 1.0)
    # un-staged: the refusal is reported, then IDLE shows it; the next check backs off
    m, _ = step(replace(m, reboot_refusals=3), Unstaged(ERR), T)
    assert (m.staged, m.failures, m.last_error, m.reboot_refusals) == (None, 1, ERR, 0)
    m, _ = step(m, ErrorReported(), T)
    assert (m.state, m.last_error) == (S.IDLE, ERR)


# ---- the reboot attempt -------------------------------------------------------------------------
#
# One attempt at a time; once the rebooter accepted a reboot, none for reboot_patience_s
# and the slot is never given back; the rebooter refusing for release_after_s gives it
# back. Times are monotonic seconds (``monotonic=`` of step), the wall clock is T.

RULES = Timing(reboot_patience_s=600, release_after_s=900)
STAGED = M(S.UPDATED_NEED_REBOOT, staged="1.1.0")
ATTEMPT = replace(STAGED, finalizing=True)
STARTED = replace(STAGED, reboot_started_at=100.0)
UNDER_WAY = Note("reboot_attempt_under_way", "info", (("forced", False),))
UNDER_WAY_FORCED = Note("reboot_attempt_under_way", "info", (("forced", True),))
BUSY_REFUSAL = Refuse(
    "reboot_refused",
    "a reboot attempt is under way (waiting for the policy or the pre-reboot hooks)",
    hint="ask again once it has ended (updatectl status)",
)
KEPT = Note(
    "reboot_lock_kept",
    "warning",
    (("reason", "pre_reboot_failed"), ("why", "the reboot already started")),
)
REFUSED = ErrorInfo("reboot_refused", "a shutdown inhibitor is held")

# (start, event, monotonic now) -> (actions, the machine's attempt fields after it:
# finalizing, reboot_started_at, refused_since)
ATTEMPT_RULES: list[
    tuple[str, Machine, Event, float, tuple[object, ...], tuple[bool, float | None, float | None]]
] = [
    ("tick starts one", STAGED, Tick(), 50.0, (Finalize(),), (True, None, None)),
    ("request forces one", STAGED, RebootRequested(), 50.0, (Finalize(True),), (True, None, None)),
    ("staged starts one", M(S.FINALIZING), Staged("1.1.0"), 0.0, (Finalize(),), (True, None, None)),
    (
        "already staged starts one",
        M(S.CHECKING_FOR_UPDATE),
        AlreadyStaged("1.1.0"),
        0.0,
        (Finalize(),),
        (True, None, None),
    ),
    ("tick while one runs", ATTEMPT, Tick(), 50.0, (UNDER_WAY,), (True, None, None)),
    (
        "request while one runs",
        ATTEMPT,
        RebootRequested(),
        50.0,
        (UNDER_WAY_FORCED, BUSY_REFUSAL),
        (True, None, None),
    ),
    ("the attempt ends", ATTEMPT, FinalizeEnded(), 50.0, (), (False, None, None)),
    ("the rebooter accepts", ATTEMPT, RebootStarted(), 100.0, (), (True, 100.0, None)),
    (
        "tick while going down",
        STARTED,
        Tick(),
        699.0,
        (Note("reboot_already_started", "debug", (("seconds_ago", 599.0),)),),
        (False, 100.0, None),
    ),
    (
        "request while going down",
        STARTED,
        RebootRequested(),
        699.0,
        (Note("reboot_already_started", "debug", (("seconds_ago", 599.0),)),),
        (False, 100.0, None),
    ),
    (
        "tick after the patience",
        STARTED,
        Tick(),
        700.0,
        (Note("reboot_did_not_happen", "warning", (("seconds_ago", 600.0),)), Finalize()),
        (True, None, None),
    ),
    (
        "hooks failed",
        ATTEMPT,
        AttemptAbandoned("pre_reboot_failed"),
        50.0,
        (Release("pre_reboot_failed"),),
        (True, None, None),
    ),
    (
        "hooks failed while going down",
        replace(STARTED, finalizing=True),
        AttemptAbandoned("pre_reboot_failed"),
        150.0,
        (KEPT,),
        (True, 100.0, None),
    ),
    (
        "crashed attempt gives the slot back",
        ATTEMPT,
        WorkCrashed(ERR),
        50.0,
        (Release("finalize_crashed"),),
        (True, None, None),
    ),
    (
        "crashed attempt while going down keeps it",
        replace(STARTED, finalizing=True),
        WorkCrashed(ERR),
        150.0,
        (
            Note(
                "reboot_lock_kept",
                "warning",
                (("reason", "finalize_crashed"), ("why", "the reboot already started")),
            ),
        ),
        (True, 100.0, None),
    ),
    ("crash out of an attempt", STAGED, WorkCrashed(ERR), 50.0, (), (False, None, None)),
    ("first refusal", ATTEMPT, RebooterRefused(REFUSED), 50.0, (), (True, None, 50.0)),
    (
        "refused for a while",
        replace(ATTEMPT, refused_since=50.0),
        RebooterRefused(REFUSED),
        949.0,
        (),
        (True, None, 50.0),
    ),
    (
        "refused too long",
        replace(ATTEMPT, refused_since=50.0),
        RebooterRefused(REFUSED),
        950.0,
        (Release("reboot_refused_too_long"),),
        (True, None, None),
    ),
    (
        "accepted after refusals",
        replace(ATTEMPT, refused_since=50.0),
        RebootStarted(),
        300.0,
        (),
        (True, 300.0, None),
    ),
    # a refusal by the policy is no refusal by the rebooter: no release timer
    ("policy refused", ATTEMPT, RebootRefused(ERR), 50.0, (), (True, None, None)),
]


@pytest.mark.parametrize(
    ("start", "event", "mono", "actions", "after"),
    [pytest.param(*case[1:], id=case[0]) for case in ATTEMPT_RULES],
)
def test_reboot_attempt(
    start: Machine,
    event: Event,
    mono: float,
    actions: tuple[object, ...],
    after: tuple[bool, float | None, float | None],
) -> None:
    m, acts = step(start, event, T, monotonic=mono, timing=RULES)
    assert acts == actions
    assert (m.finalizing, m.reboot_started_at, m.refused_since) == after


def test_refusals_by_the_rebooter_count_like_any_refusal() -> None:
    m, _ = step(ATTEMPT, RebooterRefused(REFUSED), T, monotonic=1.0)
    m, _ = step(m, RebootRefused(ERR), T, monotonic=2.0)
    assert (m.reboot_refusals, m.last_error, m.state) == (2, ERR, S.UPDATED_NEED_REBOOT)


def test_the_attempt_is_not_persisted() -> None:
    m = replace(STARTED, finalizing=True, refused_since=3.0)
    assert from_dict(to_dict(m)) == replace(STAGED, since=m.since)


def test_progress_is_clamped() -> None:
    m, _ = step(M(S.DOWNLOADING), Progressed("download", 1.7), T)
    assert m.progress == 1.0


# ---- timing -----------------------------------------------------------------------------------

TIMING = Timing(
    poll_interval_s=3600,
    first_check_delay_s=60,
    jitter=0.1,
    retry_base_s=60,
    retry_cap_s=3600,
    reboot_retry_s=300,
    min_interval_s=60,
)


@pytest.mark.parametrize(
    ("machine", "lo", "hi"),
    [
        (M(S.IDLE), 3240, 3960),
        (M(S.IDLE, failures=1), 54, 66),
        (M(S.IDLE, failures=2), 108, 132),
        (M(S.IDLE, failures=5), 864, 1056),
        (M(S.IDLE, failures=7), 3240, 3960),  # capped
        (M(S.IDLE, failures=500), 3240, 3960),
        (M(S.REPORTING_ERROR_EVENT, failures=1), 54, 66),
        (M(S.IDLE, server_interval_s=600.0), 540, 660),  # the server's interval
        (M(S.IDLE, server_interval_s=1.0), 54, 66),  # ... never below the floor
        (M(S.IDLE, server_interval_s=999_999_999.0), 12960, 15840),  # ... nor above 4 h
        (M(S.IDLE, server_interval_s=float("inf")), 12960, 15840),
        (M(S.IDLE, server_interval_s=float("nan")), 3240, 3960),  # a broken state file
        (M(S.IDLE, server_interval_s=600.0, failures=3), 216, 264),  # failures first
        (M(S.UPDATED_NEED_REBOOT), 270, 330),
        (M(S.UPDATED_NEED_REBOOT, reboot_refusals=2), 1080, 1320),
        (M(S.UPDATED_NEED_REBOOT, reboot_refusals=40), 3240, 3960),
    ],
)
def test_next_delay(machine: Machine, lo: float, hi: float) -> None:
    delays = [next_delay(machine, TIMING, r) for r in (0.0, 0.5, 0.999999)]
    assert all(d is not None and lo <= d <= hi for d in delays), delays
    assert delays[0] != delays[2]  # jittered


@pytest.mark.parametrize(
    ("poll", "asked", "used"),
    [
        (3600, 30, 60),
        (3600, 1800, 1800),
        (3600, 4 * 3600, 4 * 3600),
        (3600, 999_999_999, 4 * 3600),  # update_engine's ceiling
        (86400, 999_999_999, 86400),  # ... or the admin's own interval, if longer
        (86400, 7200, 7200),
    ],
)
def test_server_interval_is_bounded(poll: float, asked: float, used: float) -> None:
    assert server_interval(asked, replace(TIMING, poll_interval_s=poll)) == used


@pytest.mark.parametrize("state", sorted(BUSY))
def test_no_timer_while_busy(state: S) -> None:
    assert next_delay(M(state), TIMING, 0.5) is None


def test_first_delay() -> None:
    assert 60 <= first_delay(Machine(), TIMING, 0.3) <= 66


def test_a_failing_server_never_makes_a_tight_loop() -> None:
    """A day of failures: requests stay few, and never closer than the first retry."""
    rng = random.Random(1)
    m, now, checks = Machine(), 0.0, 0
    gaps = []
    while now < 86400:
        delay = next_delay(m, TIMING, rng.random())
        assert delay is not None
        gaps.append(delay)
        now += delay
        m, acts = step(m, Tick(), now)
        assert acts == (Check(),)
        checks += 1
        m, acts = step(m, Failed(ERR), now)
        m, _ = step(m, ErrorReported(), now)
    assert checks <= 35 and min(gaps) >= 54


# ---- a unit of work that crashed ----------------------------------------------------------------

CRASH = ErrorInfo("internal", "RuntimeError: boom")

# start -> (end state, actions, failures, reboot refusals)
CRASHES: list[tuple[Machine, S, tuple[object, ...], int, int]] = [
    *[
        (M(s, failures=2, progress=0.5), S.REPORTING_ERROR_EVENT, (ReportError(CRASH),), 3, 0)
        for s in sorted(BUSY)
    ],
    # the error report itself crashed: the report is over, the failure already counted
    (M(S.REPORTING_ERROR_EVENT, failures=2, last_error=ERR), S.IDLE, (), 2, 0),
    (M(S.IDLE, failures=2), S.IDLE, (), 3, 0),
    # a reboot attempt that crashed counts as refused: asked again, backing off
    (M(S.UPDATED_NEED_REBOOT, staged="1.1.0", reboot_refusals=1), S.UPDATED_NEED_REBOOT, (), 0, 2),
]


@pytest.mark.parametrize(("start", "end", "actions", "failures", "refusals"), CRASHES)
def test_crash_transition(
    start: Machine, end: S, actions: tuple[object, ...], failures: int, refusals: int
) -> None:
    m, acts = step(start, WorkCrashed(CRASH), T)
    assert (m.state, acts, m.failures, m.reboot_refusals) == (end, actions, failures, refusals)
    assert m.last_error == CRASH and m.progress in (0.0, start.progress)
    assert m.staged == start.staged


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("failures", [0, 1, 7, 40])
def test_a_crash_never_wedges(state: S, failures: int) -> None:
    """From any state, a crash (and a crash of what it starts) leaves a timer set,
    backed off as far as a typed failure would be."""
    m = M(state, failures=failures, staged="1.1.0")
    for _ in range(3):  # every action it returns crashes too
        m, acts = step(m, WorkCrashed(CRASH), T)
        if not acts:
            break
    assert m.state not in BUSY
    delay = next_delay(m, TIMING, 0.0)
    assert delay is not None and delay >= min(
        TIMING.retry_base_s * 0.9, TIMING.reboot_retry_s * 0.9
    )
    typed, _ = step(M(S.CHECKING_FOR_UPDATE, failures=failures), Failed(ERR), T)
    typed, _ = step(typed, ErrorReported(), T)
    if state in BUSY:  # the same failure count, so the same backoff, as a typed error
        assert (m.state, m.failures) == (typed.state, typed.failures)
        assert next_delay(m, TIMING, 0.5) == next_delay(typed, TIMING, 0.5)


# ---- persistence and restarts -----------------------------------------------------------------


def test_round_trip() -> None:
    m = M(
        S.UPDATED_NEED_REBOOT,
        failures=1,
        offer=OFFER,
        staged="1.1.0",
        last_error=ERR,
        last_check=T,
        reboot_refusals=3,
        server_interval_s=120.0,
    )
    assert from_dict(to_dict(m)) == replace(m, progress=0.0)


@pytest.mark.parametrize("junk", [None, [], {"state": "NAPPING"}, {"state": 3}, "x"])
def test_unreadable_is_fresh(junk: object) -> None:
    assert from_dict(junk) == Machine()


def test_junk_fields_are_dropped() -> None:
    m = from_dict(
        {
            "state": "IDLE",
            "failures": "many",
            "offer": {"version": "1 0"},
            "staged": 7,
            "last_error": "x",
        }
    )
    assert m == Machine(state=S.IDLE)


@pytest.mark.parametrize(
    ("state", "still_next", "end", "note"),
    [
        (S.UPDATED_NEED_REBOOT, True, S.UPDATED_NEED_REBOOT, "update_still_staged"),
        (S.UPDATED_NEED_REBOOT, False, S.IDLE, "staged_update_gone"),
        (S.DOWNLOADING, False, S.IDLE, "work_interrupted"),
        (S.CHECKING_FOR_UPDATE, False, S.IDLE, "work_interrupted"),
        (S.REPORTING_ERROR_EVENT, False, S.IDLE, "error_reported"),
        (S.IDLE, False, S.IDLE, "idle"),
    ],
)
def test_resume(state: S, still_next: bool, end: S, note: str) -> None:
    r = resume(M(state, staged="1.1.0", failures=2), T, staged_still_next=still_next)
    assert (r.machine.state, r.note) == (end, note)
    assert r.machine.failures == 2  # the backoff survives a restart
