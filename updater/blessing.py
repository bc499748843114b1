"""Boot assessment: run the health checks, then bless the booted slot or give it up.

Used by `updatectl mark-good` (from updater-mark-good.service, after
boot-complete.target) and by the agent's MarkGood method.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from partitions.bootcontrol import Slot
from updater.errors import RefusedError
from updater.health import HealthReport
from updater.rebooter import Rebooter
from updater.slots import Slots

log = structlog.get_logger(__name__)


class HealthCheck(Protocol):
    async def run(self) -> HealthReport: ...


async def bless(updater: Slots, checks: HealthCheck, rebooter: Rebooter | None) -> Slot:
    """Mark the booted slot good if every check passes; else raise HealthError.

    On a failure during a trial boot the slot is marked bad (never booted
    again) and a reboot into the fallback is requested. The known-good slot
    itself is never marked bad: there would be nothing to fall back to.
    """
    report = await checks.run()
    if report.ok:
        return await asyncio.to_thread(updater.mark_good)
    kind = next((r.kind for r in report.failures if r.kind), "check_failed")
    bad = await asyncio.to_thread(updater.mark_booted_bad, kind)
    if bad is not None and rebooter is not None:
        log.error("rebooting_into_fallback", slot=bad.label)
        try:
            await rebooter.reboot()
        except RefusedError as exc:
            log.error("fallback_reboot_refused", error=exc.message)
    report.raise_for_failure()
    raise AssertionError("a failed report raises")  # pragma: no cover
