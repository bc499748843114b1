"""The agent's state machine's vocabulary: its states, the data it keeps, the events it
is fed, the actions it answers and its timing. Pure data; the transitions that use it
are :mod:`updater.machine`, which re-exports all of it (``machine.Tick``...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class S(enum.StrEnum):
    IDLE = "IDLE"
    CHECKING_FOR_UPDATE = "CHECKING_FOR_UPDATE"
    UPDATE_AVAILABLE = "UPDATE_AVAILABLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    FINALIZING = "FINALIZING"
    UPDATED_NEED_REBOOT = "UPDATED_NEED_REBOOT"
    REPORTING_ERROR_EVENT = "REPORTING_ERROR_EVENT"


INSTALLING = frozenset({S.UPDATE_AVAILABLE, S.DOWNLOADING, S.VERIFYING, S.FINALIZING})
BUSY = INSTALLING | {S.CHECKING_FOR_UPDATE}


@dataclass(frozen=True)
class Offer:
    version: str
    size: int  # bytes to download


@dataclass(frozen=True)
class ErrorInfo:
    kind: str  # bounded (UpdaterError.kind)
    message: str


@dataclass(frozen=True)
class Machine:
    state: S = S.IDLE
    since: float = 0.0  # unix time the state was entered
    failures: int = 0  # consecutive failed checks or installs
    offer: Offer | None = None  # what the last check found
    staged: str | None = None  # version installed, waiting for a reboot
    last_error: ErrorInfo | None = None
    last_check: float = 0.0  # unix time of the last completed check
    reboot_refusals: int = 0  # reboots refused since the update was staged
    server_interval_s: float | None = None  # poll interval the server asked for
    progress: float = 0.0  # 0..1 of the install under way
    # the reboot attempt, in monotonic seconds (not persisted)
    finalizing: bool = False  # an attempt (policy, pre-reboot hooks, rebooter) is under way
    reboot_started_at: float | None = None  # the rebooter accepted a reboot then
    refused_since: float | None = None  # the rebooter has refused since then
    # an admin asked for a reboot through the policy (`updatectl reboot`): every attempt,
    # until the update is rebooted into or gone, uses the on-request strategy
    reboot_wanted: bool = False


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """The timer of :func:`next_delay` expired."""


@dataclass(frozen=True)
class CheckRequested:
    """Someone asked for a check now (D-Bus CheckNow/InstallNow, AttemptUpdate)."""


@dataclass(frozen=True)
class ResetRequested:
    """ResetStatus: leave the error state."""


@dataclass(frozen=True)
class RebootRequested:
    """Reboot into the staged update now: ``force``, whatever the policy says (D-Bus
    RebootNow); else through the policy, as soon as it allows (RequestReboot)."""

    force: bool = True


@dataclass(frozen=True)
class NoUpdate:
    interval_s: float | None = None  # the server's wish, if it said one


@dataclass(frozen=True)
class UpdateFound:
    offer: Offer
    interval_s: float | None = None


@dataclass(frozen=True)
class AlreadyStaged:
    version: str


@dataclass(frozen=True)
class Progressed:
    phase: Literal["download", "verify", "finalize"]
    fraction: float


@dataclass(frozen=True)
class Staged:
    version: str


@dataclass(frozen=True)
class Failed:
    error: ErrorInfo


@dataclass(frozen=True)
class ErrorReported:
    pass


@dataclass(frozen=True)
class WorkCrashed:
    """A unit of work (check, install, finalize, report) ended with an exception
    that is not one of ours: a bug, or a library breaking its contract. Valid in
    every state, so the agent can always get out of where the crash left it."""

    error: ErrorInfo


@dataclass(frozen=True)
class RebootRefused:
    error: ErrorInfo


@dataclass(frozen=True)
class RebooterRefused:
    """The rebooter (logind) refused the reboot it was asked for: a refusal that,
    going on for ``release_after_s``, gives the reboot slot back to the group."""

    error: ErrorInfo


@dataclass(frozen=True)
class RebootStarted:
    """The rebooter accepted the reboot: the host is going down."""


@dataclass(frozen=True)
class AttemptAbandoned:
    """The reboot attempt gives up without a reboot (pre-reboot hooks failed, the
    version is blocked): the slot taken for it goes back, unless the host is going down."""

    reason: str


@dataclass(frozen=True)
class FinalizeEnded:
    """The attempt a :class:`Finalize` started is over, whatever its outcome."""


@dataclass(frozen=True)
class Unstaged:
    """The staged update was taken off the next boot (its version may not be booted):
    reported as a failure, then IDLE, and the next check decides again."""

    error: ErrorInfo


Event = (
    Tick
    | CheckRequested
    | ResetRequested
    | RebootRequested
    | NoUpdate
    | UpdateFound
    | AlreadyStaged
    | Progressed
    | Staged
    | Failed
    | ErrorReported
    | WorkCrashed
    | RebootRefused
    | RebooterRefused
    | RebootStarted
    | AttemptAbandoned
    | FinalizeEnded
    | Unstaged
)

# ---- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """Fetch and verify the manifest; answer NoUpdate, UpdateFound, AlreadyStaged or Failed."""


@dataclass(frozen=True)
class Install:
    """Install the offer; answer Progressed*, then Staged or Failed."""

    offer: Offer


@dataclass(frozen=True)
class Finalize:
    """Ask the reboot policy (unless forced), run the pre-reboot hooks and reboot; answer
    RebootStarted, RebooterRefused, RebootRefused, AttemptAbandoned or Unstaged, then
    FinalizeEnded. ``requested``: an admin asked for it (the on-request strategy)."""

    force: bool = False
    requested: bool = False


@dataclass(frozen=True)
class Release:
    """Give back what the reboot strategy holds (the reboot slot); ``reason`` is logged."""

    reason: str


@dataclass(frozen=True)
class Refuse:
    """Answer the request that asked for this with a RefusedError."""

    kind: str  # a RefusedError kind
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Note:
    """Log a decision that did nothing else (the agent logs ``event`` with ``fields``)."""

    event: str
    level: Literal["debug", "info", "warning"] = "info"
    fields: tuple[tuple[str, str | float | bool], ...] = ()


@dataclass(frozen=True)
class ReportError:
    """Log, count and report the error; answer ErrorReported."""

    error: ErrorInfo


Action = Check | Install | Finalize | ReportError | Release | Refuse | Note


class InvalidTransition(Exception):
    def __init__(self, machine: Machine, event: Event) -> None:
        super().__init__(f"{type(event).__name__} cannot happen in {machine.state}")
        self.machine = machine
        self.event = event


# ---- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    poll_interval_s: float = 3600.0
    first_check_delay_s: float = 60.0
    jitter: float = 0.1  # +- this fraction of every delay
    retry_base_s: float = 60.0  # first retry after a failure
    retry_cap_s: float = 3600.0  # backoff never waits longer than this
    reboot_retry_s: float = 60.0  # ask the reboot policy again after this
    min_interval_s: float = 60.0  # a server-given interval is never shorter
    # ... nor longer than this or poll_interval_s, whichever is longer (update_engine
    # caps at 4 h): a server, or a state file, saying 31 years cannot stop the polls
    max_server_interval_s: float = 4 * 3600.0
    # once the rebooter accepted a reboot, no new attempt before this: its pre-reboot hooks
    # would die in the shutdown and give the slot back while the host is still going down
    reboot_patience_s: float = 600.0
    release_after_s: float = 900.0  # the rebooter refusing this long: give the slot back


DEFAULT_TIMING = Timing()
