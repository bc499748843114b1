"""The etcd reboot lock: airlock's counting semaphore (:mod:`policies.semaphore`),
changed by compare-and-swap transactions over :class:`policies.etcdclient.EtcdClient`.

The semaphore key is created, when missing, with the configured slot count by
a create-if-absent transaction (compare ``create_revision == 0``); after that
the stored count wins (``set_max`` changes it). Every change is a transaction
that compares the key's ``mod_revision`` with the one read: a concurrent
change makes it fail, and the change is recomputed from the new value, a
bounded number of times with jittered backoff.

Each holder's ``.../v1/holders/<id>`` record is written and deleted in the
same transaction as the semaphore change, so the two never disagree.

A semaphore that cannot be read is never overwritten, except by the explicit
:meth:`EtcdLock.repair`.
"""

from __future__ import annotations

import random
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import structlog

from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdtxn import (
    compare_absent,
    compare_mod_revision,
    request_delete_range,
    request_put,
    request_range,
)
from policies.rebootlock import FailureReport, check_group
from policies.semaphore import (
    Holder,
    Semaphore,
    SemaphoreStatus,
    check_holder,
    check_slots,
    decode_since,
    encode_since,
    holder_key,
    holders_prefix,
    semaphore_key,
)
from updater.clock import Clock, SystemClock
from updater.errors import LockError

log = structlog.get_logger(__name__)


class EtcdLock:
    """A group's slot in airlock's etcd semaphore (a :class:`policies.rebootlock.RebootLock`)."""

    name = "etcd"

    def __init__(
        self,
        client: EtcdClient,
        group: str,
        slots: int,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.group = check_group(group)
        self.slots = check_slots(slots)
        self.key = semaphore_key(group)
        self.clock = clock or SystemClock()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        settings = client.settings
        self._attempts = settings.conflict_retries
        self._backoff_s = settings.backoff_s
        self._backoff_max_s = settings.backoff_max_s

    @classmethod
    def from_settings(
        cls, settings: EtcdSettings, group: str, slots: int, *, clock: Clock | None = None
    ) -> EtcdLock:
        return cls(EtcdClient(settings), group, slots, clock=clock)

    # ---- RebootLock ----------------------------------------------------------------------------

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        """``version`` is not checked here: etcd-lock agents read the group's failed
        versions themselves (policies.failed), before asking and once granted."""
        check_holder(holder)
        sem, rev = self._read_or_create()
        for attempt in range(self._attempts):
            if sem.holds(holder):
                log.debug("etcd_lock_already_held", group=self.group, holder=holder)
                return True
            if sem.free_slots == 0:
                log.info(
                    "etcd_lock_no_free_slot",
                    group=self.group,
                    holder=holder,
                    total_slots=sem.total_slots,
                    holders=len(sem.holders),
                )
                return False
            done, sem, rev = self._swap(rev, sem.with_holder(holder), self._took(holder))
            if done:
                log.info("etcd_lock_acquired", group=self.group, holder=holder, revision=rev)
                return True
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("acquire")

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        """``failed`` is not taken along: etcd-lock agents record it themselves first."""
        self._remove(check_holder(holder), event="etcd_lock_released")
        return False

    # ---- admin ---------------------------------------------------------------------------------

    def status(self) -> SemaphoreStatus | None:
        """The semaphore and each holder's start time, read atomically; None if absent."""
        result = self.client.txn(
            [], [request_range(self.key), request_range(holders_prefix(self.group), prefix=True)]
        )
        if len(result.ranges) != 2:
            raise LockError("malformed", "etcd answered a transaction without its reads")
        sem_kvs, since_kvs = result.ranges
        if not sem_kvs:
            return None
        sem = Semaphore.decode(sem_kvs[0].value, self.key)
        prefix = holders_prefix(self.group)
        since = {
            urllib.parse.unquote(kv.key[len(prefix) :]): decode_since(kv.value) for kv in since_kvs
        }
        return SemaphoreStatus(
            group=self.group,
            key=self.key,
            total_slots=sem.total_slots,
            holders=tuple(Holder(h, since.get(h)) for h in sem.holders),
            mod_revision=sem_kvs[0].mod_revision,
        )

    def force_lock(self, holder: str) -> None:
        """Make ``holder`` hold a slot even when none is free (an admin's override)."""
        check_holder(holder)
        sem, rev = self._read_or_create()
        for attempt in range(self._attempts):
            if sem.holds(holder):
                return
            done, sem, rev = self._swap(rev, sem.with_holder(holder), self._took(holder))
            if done:
                log.warning(
                    "etcd_lock_forced",
                    group=self.group,
                    holder=holder,
                    holders=len(sem.holders),
                    total_slots=sem.total_slots,
                )
                return
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("force_lock")

    def unlock(self, holder: str) -> bool:
        """Take ``holder``'s slot away (a dead host's); True if it held one."""
        if not holder:
            raise LockError("bad_argument", "empty holder id")
        return self._remove(holder, event="etcd_lock_unlocked")

    def set_max(self, slots: int) -> int | None:
        """Change total_slots in place; returns the old count (None: the semaphore was new).

        Holders beyond a lowered count keep their slots; nobody new gets one
        until enough of them have released.
        """
        check_slots(slots)
        sem, rev, created = self._read_or_create_with(slots)
        if created:
            log.info("etcd_lock_max_set", group=self.group, old=None, new=slots)
            return None
        for attempt in range(self._attempts):
            old = sem.total_slots
            if old == slots:
                return old
            done, sem, rev = self._swap(rev, sem.with_slots(slots), [])
            if done:
                log.info(
                    "etcd_lock_max_set",
                    group=self.group,
                    old=old,
                    new=slots,
                    holders=len(sem.holders),
                )
                return old
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("set_max")

    def repair(self, slots: int, *, force: bool = False) -> None:
        """Replace a malformed (or missing) semaphore by an empty one with ``slots`` slots.

        The only operation that overwrites a semaphore it cannot read. A
        well-formed one is left alone unless ``force`` (which drops its holders).
        """
        check_slots(slots)
        for attempt in range(self._attempts):
            kv = self.client.range(self.key)
            if kv is not None and not force:
                try:
                    Semaphore.decode(kv.value, self.key)
                except LockError:
                    pass
                else:
                    raise LockError(
                        "bad_argument",
                        f"etcd key {self.key} is well-formed: nothing to repair",
                        hint="use set-max and unlock, or repair with force",
                    )
            guard = (
                compare_absent(self.key)
                if kv is None
                else compare_mod_revision(self.key, kv.mod_revision)
            )
            result = self.client.txn(
                [guard],
                [
                    request_put(self.key, Semaphore(slots).encode()),
                    request_delete_range(holders_prefix(self.group), prefix=True),
                ],
            )
            if result.succeeded:
                log.warning(
                    "etcd_lock_repaired",
                    group=self.group,
                    key=self.key,
                    total_slots=slots,
                    old_value=None if kv is None else kv.value[:200].decode("utf-8", "replace"),
                )
                return
            self._backoff(attempt)
        raise self._conflict("repair")

    # ---- internals -----------------------------------------------------------------------------

    def _took(self, holder: str) -> list[dict[str, Any]]:
        return [
            request_put(holder_key(self.group, holder), encode_since(self.clock.now().timestamp()))
        ]

    def _remove(self, holder: str, *, event: str) -> bool:
        kv = self.client.range(self.key)
        if kv is None:
            log.info("etcd_lock_not_held", group=self.group, holder=holder, semaphore="absent")
            return False
        sem, rev = Semaphore.decode(kv.value, self.key), kv.mod_revision
        for attempt in range(self._attempts):
            if not sem.holds(holder):
                log.info("etcd_lock_not_held", group=self.group, holder=holder)
                return False
            done, sem, rev = self._swap(
                rev,
                sem.without_holder(holder),
                [request_delete_range(holder_key(self.group, holder))],
            )
            if done:
                log.info(event, group=self.group, holder=holder, revision=rev)
                return True
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("release")

    def _read_or_create(self) -> tuple[Semaphore, int]:
        sem, rev, _ = self._read_or_create_with(self.slots)
        return sem, rev

    def _read_or_create_with(self, slots: int) -> tuple[Semaphore, int, bool]:
        """The semaphore and its mod_revision, created with ``slots`` if missing."""
        kv = self.client.range(self.key)
        if kv is not None:
            return Semaphore.decode(kv.value, self.key), kv.mod_revision, False
        fresh = Semaphore(slots)
        result = self.client.txn(
            [compare_absent(self.key)],
            [request_put(self.key, fresh.encode())],
            [request_range(self.key)],
        )
        if result.succeeded:
            log.info("etcd_lock_semaphore_created", group=self.group, key=self.key, slots=slots)
            return fresh, result.revision, True
        current = result.ranges[0] if result.ranges else []
        if not current:  # created and deleted again in between: a very busy admin
            raise self._conflict("create")
        return Semaphore.decode(current[0].value, self.key), current[0].mod_revision, False

    def _swap(
        self, rev: int, new: Semaphore, also: list[dict[str, Any]]
    ) -> tuple[bool, Semaphore, int]:
        """Write ``new`` if the key is still at ``rev``: (True, new, rev after) or (False, now)."""
        result = self.client.txn(
            [compare_mod_revision(self.key, rev)],
            [request_put(self.key, new.encode()), *also],
            [request_range(self.key)],
        )
        if result.succeeded:
            return True, new, result.revision
        current = result.ranges[0] if result.ranges else []
        log.debug("etcd_lock_conflict", group=self.group, expected_revision=rev)
        if not current:
            # Deleted under us: start from scratch (re-created with our slot count).
            sem, new_rev = self._read_or_create()
            return False, sem, new_rev
        return False, Semaphore.decode(current[0].value, self.key), current[0].mod_revision

    def _settle(self, attempt: int, sem: Semaphore, rev: int) -> tuple[Semaphore, int]:
        """What to retry with after a lost compare-and-swap.

        The first retry goes at once with the value the failed transaction
        returned (it is fresh). Later ones back off first and then read the key
        again: a value read before a sleep is stale after it, and retrying with
        it loses again under contention (bench/fleet_rollout measured releases
        starving for seconds that way).
        """
        if attempt == 0:
            return sem, rev
        self._backoff(attempt)
        kv = self.client.range(self.key)
        if kv is None:
            return sem, rev  # deleted meanwhile: the next swap fails and starts over
        return Semaphore.decode(kv.value, self.key), kv.mod_revision

    def _backoff(self, attempt: int) -> None:
        cap = min(self._backoff_max_s, self._backoff_s * 2**attempt)
        self._sleep(self._rng.uniform(0, cap))

    def _conflict(self, op: str) -> LockError:
        log.warning("etcd_lock_conflict_gave_up", group=self.group, op=op, attempts=self._attempts)
        return LockError(
            "conflict",
            f"{op}: etcd key {self.key} kept changing ({self._attempts} attempts)",
            hint="too many hosts changing the semaphore at once; it is retried later",
        )
