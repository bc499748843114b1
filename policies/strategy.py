"""Reboot strategies: may this host finalize (reboot into) a staged update now?

Zincati's shape: two questions. ``can_finalize()`` is asked before every
reboot; ``report_steady()`` once the booted slot is marked good (a lock
strategy releases what it holds there). Errors mean "no": a strategy that
cannot answer fails closed and the caller counts it.
"""

from __future__ import annotations

from typing import Protocol


class RebootStrategy(Protocol):
    name: str

    def can_finalize(self) -> bool:
        """True if a reboot may happen now (False on any doubt)."""
        ...

    def report_steady(self) -> None:
        """The host booted well and is steady: release anything held for the reboot."""
        ...


class Immediate:
    """Reboot as soon as an update is staged (single machines, test fleets)."""

    name = "immediate"

    def can_finalize(self) -> bool:
        return True

    def report_steady(self) -> None:
        return None


class Off:
    """Stage updates only; an admin (or another tool, e.g. kured) reboots."""

    name = "off"

    def can_finalize(self) -> bool:
        return False

    def report_steady(self) -> None:
        return None


STRATEGIES: dict[str, type[Immediate] | type[Off]] = {"immediate": Immediate, "off": Off}
