"""The ports of the agent (updater.agent): what it is given to notify, count, wait,
publish and bless with. The real ones are built in updater.compose; the pre-reboot
hooks are a :class:`updater.blessing.HealthCheck`.

Named ``...Port`` where an implementation has the plain name (updater.metrics.Metrics,
updater.sdnotify.Notifier)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from partitions.bootcontrol import Slot
from updater.agentapi import AgentStatus


class NotifierPort(Protocol):
    """The service manager's notifications (sd_notify: updater.sdnotify.Notifier)."""

    def ready(self) -> object: ...

    def status(self, text: str) -> object: ...

    def watchdog(self) -> object: ...

    def stopping(self) -> object: ...

    def watchdog_interval_s(self) -> float | None: ...


class MetricsPort(Protocol):
    """What the agent counts (Prometheus: updater.metrics.Metrics)."""

    def state_changed(self, state: str, when: float) -> None: ...

    def checked(self, when: float) -> None: ...

    def check_failed(self, kind: str) -> None: ...

    def error(self, kind: str) -> None: ...

    def installed(self, raw_bytes: int, seconds: float) -> None: ...

    def rollback(self, version: str) -> None: ...

    def reboot_requested(self) -> None: ...

    def reboot_refused(self) -> None: ...

    def users_waited_for(self, sessions: int) -> None: ...

    def version_blocked(self, version: str, blocked: bool) -> None: ...

    def host_policy(self, held_until: float | None, skipped: tuple[str, ...], pin: str) -> None: ...


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


class Blesser(Protocol):
    async def __call__(self) -> Slot:
        """Run the health checks and mark the booted slot good (HealthError if not)."""
        ...
