"""The FleetLock server's decisions over the etcd semaphore (no HTTP here).

:class:`FleetLockService` answers checked requests
(:class:`policies.fleetlockproto.ClientParams`) with each served group's
:class:`policies.etcdlock.EtcdLock`, and refuses a reboot into a version the
group has blocked (:class:`GroupFailedVersions`, the records of
:mod:`policies.failed`). Every failure is a
:class:`policies.fleetlockproto.ProtocolError`; an etcd failure never
answers success.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

import structlog

from policies.etcdclient import EtcdClient
from policies.etcdlock import EtcdLock
from policies.failed import FailedVersions
from policies.fleetlockproto import FULL_KIND, ClientParams, ProtocolError, lock_failure
from policies.rebootlock import check_group
from policies.semaphore import SemaphoreStatus, check_slots
from updater.clock import Clock, SystemClock
from updater.errors import LockError

log = structlog.get_logger(__name__)


# ---- the failed-version seam -------------------------------------------------------------------


class GroupFailedVersions(Protocol):
    """The versions a group must not reboot into (part 2's records in etcd).

    Both raise :class:`~updater.errors.LockError` when etcd cannot be asked: the
    request is then refused like any etcd failure (fail closed: no slot taken,
    none given back).
    """

    def blocked(self, group: str) -> Collection[str]: ...

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        """``host`` rolled back from ``version`` (idempotent per host)."""
        ...


class NoFailedVersions:
    """Nothing is blocked, nothing is recorded (a server without a store, in tests)."""

    def blocked(self, group: str) -> Collection[str]:
        return frozenset()

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        log.warning("fleetlock_failed_version_dropped", group=group, version=version, host=host)


class StoredFailedVersions:
    """The group's failed versions in etcd (policies.failed), blocked at ``max_failures``
    hosts: the same records and the same decision as the etcd-lock agents'."""

    def __init__(
        self, client: EtcdClient, max_failures: int = 1, clock: Clock | None = None
    ) -> None:
        self.client = client
        self.max_failures = max_failures
        self.clock = clock or SystemClock()
        self._stores: dict[str, FailedVersions] = {}

    def store(self, group: str) -> FailedVersions:
        if group not in self._stores:
            self._stores[group] = FailedVersions(self.client, group, self.max_failures)
        return self._stores[group]

    def blocked(self, group: str) -> Collection[str]:
        return frozenset(v.version for v in self.store(group).verdicts() if v.blocked)

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        # a stored value that is not a record is left as it is: it blocks the version already
        self.store(group).record(version, host, kind, self.clock.now().timestamp())


# ---- the service: decisions over the etcd lock --------------------------------------------------


class FleetLockService:
    """Answers checked requests with the etcd semaphore of each served group.

    ``groups`` maps each served group to the slot count of its semaphore when
    this server creates it (afterwards the count stored in etcd wins, as for
    every etcd-lock agent; ``updatectl lock set-max`` changes it).
    """

    def __init__(
        self,
        client: EtcdClient,
        groups: Mapping[str, int],
        *,
        failed: GroupFailedVersions | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not groups:
            raise ValueError("serve at least one group")
        self.clock = clock or SystemClock()
        self.client = client
        self.failed: GroupFailedVersions = failed or NoFailedVersions()
        self._locks = {
            check_group(g): EtcdLock(client, g, check_slots(n), clock=self.clock)
            for g, n in groups.items()
        }

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._locks)

    def _lock(self, group: str) -> EtcdLock:
        lock = self._locks.get(group)
        if lock is None:
            raise ProtocolError(
                "unknown_group", f"group {group} is not served here ({', '.join(self._locks)})"
            )
        return lock

    def pre_reboot(self, params: ClientParams) -> None:
        """Take a slot for ``params.id``, or raise ProtocolError."""
        lock = self._lock(params.group)
        try:
            if params.version is not None and params.version in self.failed.blocked(params.group):
                log.warning(
                    "fleetlock_version_blocked",
                    group=params.group,
                    holder=params.id,
                    version=params.version,
                )
                raise ProtocolError(
                    "version_blocked",
                    f"version {params.version} failed in group {params.group}: no reboot into it",
                )
            if not lock.acquire(params.id):
                st = lock.status()
                total = "all" if st is None else f"all {st.total_slots}"
                log.info("fleetlock_semaphore_full", group=params.group, holder=params.id)
                raise ProtocolError(
                    FULL_KIND, f"semaphore full: {total} slots of group {params.group} are locked"
                )
        except LockError as exc:
            raise self._failed("pre-reboot", params, exc) from None
        try:
            held_s, holders, total_slots = self._held(lock, params.id)
        except LockError:  # the slot is taken: only the log misses its age
            held_s, holders, total_slots = None, None, None
        log.info(
            "fleetlock_locked",
            group=params.group,
            holder=params.id,
            version=params.version,
            held_s=held_s,  # > 0: it already held the slot (a recursive lock)
            holders=holders,
            total_slots=total_slots,
        )

    def steady_state(self, params: ClientParams) -> None:
        """Give ``params.id``'s slot back (nothing to do if it holds none), or raise.

        A failed version the client reports is recorded for the group first: if
        that fails, the slot stays held (the client asks again), so no host takes
        the slot before it can see the block.
        """
        lock = self._lock(params.group)
        try:
            if params.failed_version is not None and params.failure_kind is not None:
                self.failed.record(
                    params.group, params.failed_version, params.id, params.failure_kind
                )
                log.warning(
                    "fleetlock_failed_version_recorded",
                    group=params.group,
                    holder=params.id,
                    version=params.failed_version,
                    failure_kind=params.failure_kind,
                )
            held_s, _, _ = self._held(lock, params.id)
            lock.release(params.id)
        except LockError as exc:
            raise self._failed("steady-state", params, exc) from None
        if held_s is not None:
            log.info("fleetlock_unlocked", group=params.group, holder=params.id, held_s=held_s)
        else:
            log.debug("fleetlock_unlock_not_held", group=params.group, holder=params.id)

    def status(self) -> dict[str, Any]:
        """Every served group's semaphore and failed versions (raises LockError)."""
        now = self.clock.now().timestamp()
        groups = []
        for group, lock in self._locks.items():
            st = lock.status()
            doc: dict[str, Any] = (
                st.as_dict(now)
                if st is not None
                else {"group": group, "key": lock.key, "total_slots": None, "holders": []}
            )
            doc["blocked_versions"] = sorted(self.failed.blocked(group))
            groups.append(doc)
        return {"protocol": "not FleetLock: this server's own read-only view", "groups": groups}

    def _held(self, lock: EtcdLock, holder: str) -> tuple[float | None, int | None, int | None]:
        """How long ``holder`` has held its slot (None: holds none), holders, slots."""
        st: SemaphoreStatus | None = lock.status()
        if st is None:
            return None, None, None
        now = self.clock.now().timestamp()
        for h in st.holders:
            if h.id == holder:
                age = h.age_s(now)
                return (-1.0 if age is None else round(age, 3)), len(st.holders), st.total_slots
        return None, len(st.holders), st.total_slots

    @staticmethod
    def _failed(endpoint: str, params: ClientParams, exc: LockError) -> ProtocolError:
        err = lock_failure(exc)
        log.warning(
            "fleetlock_etcd_failed",
            endpoint=endpoint,
            group=params.group,
            holder=params.id,
            kind=err.kind,
            error=exc.message,
        )
        return err
