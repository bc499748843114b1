"""The reboot lock, counted: a :class:`policies.rebootlock.RebootLock` that reports to
the agent's metrics whether this host holds a slot and since when, how long it has
waited for one, and every failed request by error kind. Any lock kind (etcd,
FleetLock, none); what it answers and raises is the wrapped lock's, unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from policies.rebootlock import FailureReport, RebootLock
from updater.errors import UpdaterError


class LockMetrics(Protocol):
    def lock_state(self, group: str, *, held: bool, waiting: bool, now: float) -> None: ...

    def lock_error(self, group: str, kind: str) -> None: ...


class MeteredLock:
    def __init__(
        self,
        lock: RebootLock,
        metrics: LockMetrics,
        group: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lock = lock
        self.name = lock.name
        self.metrics = metrics
        self.group = group
        self.monotonic = monotonic
        self._held = False

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        try:
            got = self.lock.acquire(holder, version=version)
        except UpdaterError as exc:
            self._failed(exc)
            raise
        self._held = got
        self.metrics.lock_state(self.group, held=got, waiting=not got, now=self.monotonic())
        return got

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        try:
            carried = self.lock.release(holder, failed=failed)
        except UpdaterError as exc:
            self._failed(exc)  # still held, as far as anyone knows
            raise
        self._held = False
        self.metrics.lock_state(self.group, held=False, waiting=False, now=self.monotonic())
        return carried

    def _failed(self, exc: UpdaterError) -> None:
        self.metrics.lock_error(self.group, exc.kind)
        # a failed acquire is more waiting; a failed release leaves the slot where it was
        self.metrics.lock_state(
            self.group, held=self._held, waiting=not self._held, now=self.monotonic()
        )
