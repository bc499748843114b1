"""This host's record for the fleet (``updatectl fleet status``): refreshed in the
background when something a dashboard shows changed: the agent's status, whether
the host holds a reboot slot, the version it refuses."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace

import structlog

from updater.agentapi import AgentStatus
from updater.agentports import FleetReporter, MetricsPort
from updater.blocking import run_blocking

log = structlog.get_logger(__name__)


class FleetRecord:
    def __init__(
        self,
        status: Callable[[], AgentStatus],
        holding: Callable[[], bool | None],
        *,
        metrics: MetricsPort | None = None,
        reporter: FleetReporter | None = None,
    ) -> None:
        self.status = status
        self.holding = holding
        self.metrics = metrics
        self.reporter = reporter
        self.blocked_version = ""  # a version this host refuses: it failed on hosts of the group
        self._task: asyncio.Task[None] | None = None
        self._reported: tuple[AgentStatus, bool | None, str] | None = None
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def note_blocked(self, version: str, blocked: bool) -> None:
        """Show (or stop showing) that this host refuses ``version``."""
        if blocked:
            self.blocked_version = version
        elif self.blocked_version == version:
            self.blocked_version = ""
        else:
            return
        if self.metrics is not None:
            try:
                self.metrics.version_blocked(version, blocked)
            except Exception:
                log.exception("metrics_not_counted", error_kind="version_blocked")
        self.refresh()

    def refresh(self) -> None:
        """Refresh the fleet record when something a dashboard shows changed."""
        if self.reporter is None or self._stopping:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._report())

    async def _report(self) -> None:
        assert self.reporter is not None
        reporter = self.reporter
        while not self._stopping:
            # progress alone is not fleet news: it would write etcd every percent
            current = (replace(self.status(), progress=0.0), self.holding(), self.blocked_version)
            if current == self._reported:
                return
            try:
                await run_blocking(functools.partial(reporter.report, *current))
            except Exception as exc:
                log.warning("fleet_status_not_published", error=str(exc))
                return  # the next change or poll tries again
            self._reported = current
