"""Reboot strategies: may this host finalize (reboot into) a staged update now?

Zincati's shape: two questions. ``can_finalize()`` is asked before every
reboot; ``report_steady()`` once the booted slot is marked good (a lock
strategy releases what it holds there). An exception means "no": the caller
fails closed (no reboot) and counts it.

Maintenance windows combine with any strategy (:class:`Windowed`, and built
into :class:`LockStrategy`, which checks the window before asking for the lock
and again once it is granted: locksmith checked only once and so rebooted
outside its window).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog

from policies.rebootlock import FailureReport, RebootLock
from updater.clock import Clock

log = structlog.get_logger(__name__)


class RebootStrategy(Protocol):
    name: str

    @property
    def holding(self) -> bool | None:
        """Holds a cluster-lock slot now; None when no lock is involved."""
        ...

    def can_finalize(self, version: str | None = None) -> bool:
        """True if a reboot (into the staged ``version``) may happen now (False, or an
        exception, on any doubt; RefusedError ``version_blocked``: never into it)."""
        ...

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        """The host booted well and is steady: release anything held for the reboot.

        ``failed``: a rollback the lock service should record for the group before
        the release; True if it went along (see :meth:`RebootLock.release`).
        """
        ...


class WindowCheck(Protocol):
    def is_open(self, now: datetime) -> bool: ...


class Immediate:
    """Reboot as soon as an update is staged (single machines, test fleets)."""

    name = "immediate"
    holding: bool | None = None

    def can_finalize(self, version: str | None = None) -> bool:
        return True

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        return False


class Off:
    """Stage updates only; an admin (or another tool, e.g. kured) reboots."""

    name = "off"
    holding: bool | None = None

    def can_finalize(self, version: str | None = None) -> bool:
        return False

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        return False


class Windowed:
    """Any strategy, but only inside the maintenance windows."""

    def __init__(self, inner: RebootStrategy, windows: WindowCheck, clock: Clock) -> None:
        self.inner = inner
        self.windows = windows
        self.clock = clock
        self.name = f"{inner.name}+windows"

    @property
    def holding(self) -> bool | None:
        return self.inner.holding

    def can_finalize(self, version: str | None = None) -> bool:
        if not self.windows.is_open(self.clock.now()):
            log.info("reboot_window_closed", strategy=self.inner.name)
            return False
        return self.inner.can_finalize(version)

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        return self.inner.report_steady(failed)


class LockStrategy:
    """Reboot while holding a slot of the cluster lock, inside the windows if any."""

    name = "lock"

    def __init__(
        self,
        lock: RebootLock,
        holder: str,
        clock: Clock,
        windows: WindowCheck | None = None,
        observe: Callable[[bool], None] | None = None,
    ) -> None:
        self.lock = lock
        self.holder = holder
        self.clock = clock
        self.windows = windows
        # told each answer of the lock (True: granted), e.g. to export the holders' ages
        # while waiting; what it raises is logged and changes nothing
        self.observe = observe
        self.holding: bool | None = None  # unknown until the lock was first asked

    def _observe(self, granted: bool) -> None:
        if self.observe is None:
            return
        try:
            self.observe(granted)
        except Exception as exc:
            log.warning("reboot_lock_not_observed", lock=self.lock.name, error=str(exc))

    def _window_open(self) -> bool:
        return self.windows is None or self.windows.is_open(self.clock.now())

    def can_finalize(self, version: str | None = None) -> bool:
        if not self._window_open():
            log.info("reboot_window_closed", strategy=self.name)
            return False
        # LockError (and a FleetLock server's version_blocked refusal) propagates: fail closed
        if not self.lock.acquire(self.holder, version=version):
            log.info("reboot_lock_not_granted", lock=self.lock.name, holder=self.holder)
            self.holding = False
            self._observe(False)
            return False
        self.holding = True
        self._observe(True)
        if not self._window_open():
            # The window closed while we waited for the lock: give the slot back.
            log.info("reboot_window_closed_after_lock", lock=self.lock.name)
            self.lock.release(self.holder)
            self.holding = False
            return False
        log.info("reboot_lock_granted", lock=self.lock.name, holder=self.holder)
        return True

    def report_steady(self, failed: FailureReport | None = None) -> bool:
        carried = self.lock.release(self.holder, failed=failed)
        self.holding = False
        log.info(
            "reboot_lock_released",
            lock=self.lock.name,
            holder=self.holder,
            failed_version=failed.version if failed is not None and carried else None,
        )
        return carried


STRATEGIES: dict[str, type[Immediate] | type[Off]] = {"immediate": Immediate, "off": Off}
