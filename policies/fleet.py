"""Fleet status in etcd: every agent keeps ``updater/v1/hosts/<id>`` current.

The record lives under a lease of about three poll intervals, refreshed on
every change and every poll: a host that dies or is removed disappears by
itself, no one has to clean up. `updatectl fleet status` reads them all,
together with the reboot semaphore, and shows what a fleet dashboard needs:
hosts per version, who waits for the lock, who holds it and for how long, who
reported errors.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from policies.etcdtxn import MAX_VALUE_BYTES, b64
from policies.semaphore import SemaphoreStatus
from updater.errors import LockError
from updater.jsonutil import loads as load_json

if TYPE_CHECKING:  # the client is passed in: the dashboard's pure views use the record alone
    from policies.etcdclient import EtcdClient

log = structlog.get_logger(__name__)

HOSTS_PREFIX = "updater/v1/hosts/"
LAST_ERROR_CHARS = 500  # of an error message in a record: a dashboard shows it, not a log


@dataclass(frozen=True)
class HostRecord:
    id: str
    hostname: str
    group: str
    booted_slot: str
    booted_version: str
    state: str
    staged_version: str
    last_check: int  # unix seconds, 0 never
    last_error_kind: str
    lock_held: bool | None  # None: this host does not use a cluster lock
    updated: float  # unix seconds of this record
    blocked_version: str = ""  # a version it refuses (failed on hosts of its group); "" none
    strategy: str = ""  # its [reboot] strategy (immediate, off, lock); "" an older agent
    last_error: str = ""  # the last error's message (at most LAST_ERROR_CHARS); "" none
    held: bool = False  # an admin holds it (`updatectl hold`): no installs
    held_until: int = 0  # unix seconds the hold ends; 0: until `updatectl unhold`

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> HostRecord:
        """The record in ``raw``; ValueError if it is not one (bounded, never another error)."""
        doc = load_json(raw, ValueError, max_bytes=MAX_VALUE_BYTES)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        fields: dict[str, Any] = {f: doc.get(f) for f in cls.__dataclass_fields__}
        for name in ("blocked_version", "strategy", "last_error"):
            if fields[name] is None:  # a record of an agent from before the field
                fields[name] = ""
        if fields["held"] is None:  # older agents: no hold
            fields["held"] = False
        if fields["held_until"] is None:
            fields["held_until"] = 0
        held_until = fields["held_until"]
        if not isinstance(fields["held"], bool) or isinstance(held_until, bool):
            raise ValueError("held must be a boolean")
        if not isinstance(held_until, int) or held_until < 0:
            raise ValueError("held_until must be unix seconds")
        for name in (
            "id",
            "hostname",
            "group",
            "booted_slot",
            "booted_version",
            "state",
            "staged_version",
            "last_error_kind",
            "blocked_version",
            "strategy",
            "last_error",
        ):
            if not isinstance(fields[name], str):
                raise ValueError(f"{name} must be a string")
        last_check, updated = fields["last_check"], fields["updated"]
        if (
            isinstance(last_check, bool)
            or not isinstance(last_check, int)
            or isinstance(updated, bool)
            or not isinstance(updated, int | float)
            or not math.isfinite(updated)
        ):
            raise ValueError("last_check and updated must be numbers")
        if fields["lock_held"] is not None and not isinstance(fields["lock_held"], bool):
            raise ValueError("lock_held must be a boolean or null")
        return cls(**fields)


def _gateway_int(value: Any) -> int | None:
    """An int64 as etcd's JSON gateway writes it (a string of digits, zero omitted)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        return int(value) if isinstance(value, int) or value.lstrip("-").isdigit() else None
    except ValueError:  # more digits than Python converts
        return None


class FleetPublisher:
    """Keeps one host's record in etcd under a lease (blocking; call from a thread)."""

    def __init__(self, client: EtcdClient, host_id: str, ttl_s: float) -> None:
        self.client = client
        self.key = HOSTS_PREFIX + host_id
        self.ttl_s = max(2, math.ceil(ttl_s))
        self._lease: str | None = None

    def publish(self, record: HostRecord) -> None:
        """Write ``record`` and renew its lease (a new lease when the old one expired)."""
        if self._lease is not None:
            answer = self.client.call("lease/keepalive", {"ID": self._lease})
            result = answer.get("result")
            ttl = _gateway_int(result.get("TTL") if isinstance(result, dict) else None)
            if ttl is None or ttl <= 0:
                log.info("fleet_lease_expired", lease=self._lease)
                self._lease = None
        if self._lease is None:
            lease = _gateway_int(self.client.call("lease/grant", {"TTL": self.ttl_s}).get("ID"))
            if lease is None or lease <= 0:
                raise LockError("malformed", "etcd granted a lease without a valid ID")
            self._lease = str(lease)
        self.client.call(
            "kv/put", {"key": b64(self.key), "value": b64(record.encode()), "lease": self._lease}
        )


def read_hosts(client: EtcdClient) -> list[HostRecord]:
    """Every host's record; unreadable ones are logged and skipped."""
    hosts = []
    for kv in client.range_prefix(HOSTS_PREFIX):
        try:
            hosts.append(HostRecord.decode(kv.value))
        except (ValueError, TypeError) as exc:
            log.warning("fleet_record_unreadable", key=kv.key, error=str(exc))
    return sorted(hosts, key=lambda h: (h.hostname, h.id))


@dataclass(frozen=True)
class Holding:
    id: str
    hostname: str | None  # None: not in the fleet records (an airlock host, or gone)
    age_s: float | None


@dataclass(frozen=True)
class FleetSummary:
    hosts: int
    versions: dict[str, int]  # booted version -> hosts
    staged: dict[str, int]  # staged version -> hosts waiting to reboot into it
    waiting: tuple[str, ...] = ()  # hostnames with an update staged, without the lock
    holders: tuple[Holding, ...] = ()
    total_slots: int | None = None
    errors: tuple[tuple[str, str], ...] = ()  # (hostname, last error kind)
    states: dict[str, int] = field(default_factory=dict)
    refusing: tuple[tuple[str, str], ...] = ()  # (hostname, blocked version it refuses)
    held: tuple[tuple[str, int], ...] = ()  # (hostname, until: unix seconds, 0 until unhold)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    hosts: list[HostRecord], semaphore: SemaphoreStatus | None, now: float
) -> FleetSummary:
    """What a fleet dashboard shows. Pure."""
    names = {h.id: h.hostname for h in hosts}
    holders = (
        ()
        if semaphore is None
        else tuple(Holding(h.id, names.get(h.id), h.age_s(now)) for h in semaphore.holders)
    )
    held = {h.id for h in holders}
    return FleetSummary(
        hosts=len(hosts),
        versions=dict(sorted(Counter(h.booted_version or "?" for h in hosts).items())),
        staged=dict(sorted(Counter(h.staged_version for h in hosts if h.staged_version).items())),
        waiting=tuple(
            h.hostname
            for h in hosts
            if h.state == "UPDATED_NEED_REBOOT" and h.id not in held and h.lock_held is not None
        ),
        holders=holders,
        total_slots=None if semaphore is None else semaphore.total_slots,
        errors=tuple((h.hostname, h.last_error_kind) for h in hosts if h.last_error_kind),
        states=dict(sorted(Counter(h.state for h in hosts).items())),
        refusing=tuple((h.hostname, h.blocked_version) for h in hosts if h.blocked_version),
        held=tuple((h.hostname, h.held_until) for h in hosts if h.held),
    )


def fleet_status(client: EtcdClient, semaphore: SemaphoreStatus | None, now: float) -> FleetSummary:
    return summarize(read_hosts(client), semaphore, now)
