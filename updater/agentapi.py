"""What the running agent shows and accepts: the contract between the daemon
(updater.agent) and its front ends (D-Bus, metrics, `updatectl status`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# The agent's states, update_engine's names (also the D-Bus "State" values).
STATES = (
    "IDLE",
    "CHECKING_FOR_UPDATE",
    "UPDATE_AVAILABLE",
    "DOWNLOADING",
    "VERIFYING",
    "FINALIZING",
    "UPDATED_NEED_REBOOT",
    "REPORTING_ERROR_EVENT",
)


@dataclass(frozen=True)
class AgentStatus:
    state: str  # one of STATES
    booted_slot: str  # GPT label of the booted slot
    booted_version: str  # "" when unknown
    staged_version: str  # installed into the other slot, waiting for a reboot; "" none
    new_version: str  # offered by the last successful check; "" none
    new_size: int  # bytes to download for it; 0 none
    progress: float  # 0.0 .. 1.0 of the download under way
    last_error_kind: str  # bounded kind of the last error (UpdaterError.kind); "" none
    last_error_message: str
    last_check_time: int  # unix seconds of the last completed check; 0 never
    last_change_time: int  # unix seconds of the last state change
    # what an admin decided for this host (updater.hostpolicy); the API only grows
    held: bool = False  # `updatectl hold`: no installs
    held_until: int = 0  # unix seconds the hold ends; 0: until `updatectl unhold` (or none)
    skipped_versions: tuple[str, ...] = ()  # `updatectl skip`
    pin: str = ""  # [source] pin


StatusListener = Callable[[AgentStatus], None]


class AgentControl(Protocol):
    """The running agent, as its front ends see it. Methods raise UpdaterError."""

    def status(self) -> AgentStatus: ...

    def subscribe(self, listener: StatusListener) -> Callable[[], None]:
        """Call ``listener`` after every change; returns the unsubscribe function."""
        ...

    async def check_now(self) -> None:
        """Start a check now (no-op while a check or install runs)."""
        ...

    async def install_now(self) -> None:
        """Check and install now, whatever the schedule (no-op while one runs)."""
        ...

    async def reboot_now(self) -> None:
        """Reboot into the staged update now, bypassing the reboot policy
        (RefusedError if nothing is staged or the reboot is refused)."""
        ...

    async def mark_good(self) -> None:
        """Run the health checks, then mark the booted slot good (or bad)."""
        ...

    async def request_reboot(self) -> str:
        """Reboot into the staged update through the reboot policy (its lock and
        windows; ``off`` gives way), as soon as it allows: ``started`` if the reboot
        was asked of logind now, ``waiting`` if the policy said not yet (the agent
        keeps asking). RefusedError ``nothing_staged`` if nothing is staged."""
        ...

    async def reload(self) -> None:
        """Re-read the host's hold, skips and downgrade allowance (``<state_dir>``) and
        the configuration (applied at the next check; ConfigError if it is invalid)."""
        ...

    async def reset_status(self) -> None:
        """Leave REPORTING_ERROR_EVENT for IDLE (com.coreos.update1 ResetStatus)."""
        ...
