"""What the fleet dashboard (``updatectl fleet serve``) shows, from what etcd holds. Pure.

One read of etcd is three prefixes, taken in one transaction
(:mod:`policies.fleetserve`): the hosts' records (``updater/v1/hosts/``,
:mod:`policies.fleet`), the reboot semaphores with their holders' start times
(``com.coreos.airlock/groups/``, :mod:`policies.semaphore`) and the groups'
failed versions (``updater/v1/groups/``, :mod:`policies.failed`).
:func:`parse_snapshot` turns those key-values into a :class:`FleetSnapshot`
and the views below turn that into the JSON of ``/api/v1/...`` and the
Prometheus text of ``/metrics``.

Everything in etcd is outside input: any host (or anyone with write access to
those prefixes) may have written anything. A value that is not a record is
kept as :class:`Unreadable` (its key and why, both cut short) and shown as
such; strings are passed on as JSON strings (the page sets them as text,
never as markup) and cut to :data:`MAX_TEXT` characters; metric label values
are escaped and cut too.
"""

from __future__ import annotations

import math
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from policies.etcdtxn import KeyValue
from policies.failed import PREFIX as FAILED_PREFIX
from policies.failed import FailedRecord, Verdict, check_version, decide
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.semaphore import KEY_PREFIX as LOCK_PREFIX
from policies.semaphore import Holder, Semaphore, SemaphoreStatus, decode_since
from updater.errors import LockError
from updater.versions import compare, is_valid

MAX_TEXT: Final = 500  # characters of any string from etcd that a view passes on
MAX_LABEL: Final = 128  # characters of a metric label value
UNKNOWN_VERSION: Final = "?"
BUSY_STATES: Final = frozenset(
    {"CHECKING_FOR_UPDATE", "UPDATE_AVAILABLE", "DOWNLOADING", "VERIFYING", "FINALIZING"}
)


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@dataclass(frozen=True)
class Unreadable:
    """A key under one of the dashboard's prefixes whose value is not what belongs there."""

    key: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        # the kind the agents' own readers raise for such a value (LockError "malformed")
        return {"key": _cut(self.key, 200), "kind": "malformed", "error": _cut(self.error)}


@dataclass(frozen=True)
class GroupLock:
    group: str
    status: SemaphoreStatus | None  # None: no semaphore, or an unreadable one
    error: str = ""  # why the semaphore cannot be read; "" it can (or there is none)


@dataclass(frozen=True)
class FleetSnapshot:
    hosts: tuple[HostRecord, ...]
    locks: Mapping[str, GroupLock]  # group -> its semaphore
    failed: Mapping[str, tuple[Verdict, ...]]  # group -> its failed versions
    unreadable: tuple[Unreadable, ...] = ()
    revision: int = 0  # etcd's revision when read
    read_at: float = 0.0  # unix seconds

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(sorted({h.group for h in self.hosts} | set(self.locks) | set(self.failed)))


# ---- parsing what etcd holds -------------------------------------------------------------------


def decode_host(kv: KeyValue) -> HostRecord | Unreadable:
    """The record at ``kv``, or why it is not one."""
    try:
        record = HostRecord.decode(kv.value)
    except (ValueError, TypeError) as exc:
        return Unreadable(kv.key, str(exc))
    if HOSTS_PREFIX + record.id != kv.key:
        return Unreadable(kv.key, f"the record names another host: {record.id[:80]!r}")
    return record


def parse_hosts(
    kvs: Iterable[KeyValue], decode: Callable[[KeyValue], HostRecord | Unreadable] = decode_host
) -> tuple[list[HostRecord], list[Unreadable]]:
    """The hosts' records, and the keys that hold none. ``decode``: :func:`decode_host`,
    or the same remembered per key and revision (a reader that reads again and again)."""
    hosts, bad = [], []
    for kv in kvs:
        result = decode(kv)
        if isinstance(result, Unreadable):
            bad.append(result)
        else:
            hosts.append(result)
    return sorted(hosts, key=lambda h: (h.group, h.hostname, h.id)), bad


def parse_locks(kvs: Iterable[KeyValue]) -> tuple[dict[str, GroupLock], list[Unreadable]]:
    """The semaphores and holders' start times under airlock's prefix, by group."""
    semaphores: dict[str, KeyValue] = {}
    since: dict[str, dict[str, float | None]] = {}
    bad: list[Unreadable] = []
    for kv in kvs:
        group, sep, rest = kv.key[len(LOCK_PREFIX) :].partition("/v1/")
        if not sep:
            bad.append(Unreadable(kv.key, "not a key of a lock group"))
        elif rest == "semaphore":
            semaphores[group] = kv
        elif rest.startswith("holders/"):
            holder = urllib.parse.unquote(rest[len("holders/") :])
            since.setdefault(group, {})[holder] = decode_since(kv.value)
        # airlock may keep other keys of its own there: not ours to judge
    locks: dict[str, GroupLock] = {}
    for group, kv in semaphores.items():
        try:
            sem = Semaphore.decode(kv.value, kv.key)
        except LockError as exc:
            locks[group] = GroupLock(group, None, exc.message)
            continue
        starts = since.get(group, {})
        locks[group] = GroupLock(
            group,
            SemaphoreStatus(
                group=group,
                key=kv.key,
                total_slots=sem.total_slots,
                holders=tuple(Holder(h, starts.get(h)) for h in sem.holders),
                mod_revision=kv.mod_revision,
            ),
        )
    return locks, bad


def parse_failed(
    kvs: Iterable[KeyValue], max_failures: int
) -> tuple[dict[str, tuple[Verdict, ...]], list[Unreadable]]:
    """Each group's failed versions (``<prefix><group>/failed/<version>``), decided."""
    found: dict[str, list[Verdict]] = {}
    bad: list[Unreadable] = []
    for kv in kvs:
        group, sep, version = kv.key[len(FAILED_PREFIX) :].partition("/failed/")
        if not sep:
            continue  # another record of the group: not the dashboard's
        version = urllib.parse.unquote(version)
        stored: FailedRecord | LockError
        try:
            check_version(version)
            stored = FailedRecord.decode(kv.value, kv.key, version)
        except LockError as exc:
            stored = LockError("malformed", exc.message)
            bad.append(Unreadable(kv.key, exc.message))
        found.setdefault(group, []).append(decide(version, stored, max_failures))
    return {g: tuple(sorted(v, key=lambda x: x.version)) for g, v in sorted(found.items())}, bad


def parse_snapshot(
    hosts: Sequence[KeyValue],
    locks: Sequence[KeyValue],
    failed: Sequence[KeyValue],
    *,
    max_failures: int,
    revision: int,
    read_at: float,
    decode: Callable[[KeyValue], HostRecord | Unreadable] = decode_host,
) -> FleetSnapshot:
    records, bad_hosts = parse_hosts(hosts, decode)
    group_locks, bad_locks = parse_locks(locks)
    verdicts, bad_failed = parse_failed(failed, max_failures)
    return FleetSnapshot(
        hosts=tuple(records),
        locks=group_locks,
        failed=verdicts,
        unreadable=tuple(bad_hosts + bad_locks + bad_failed),
        revision=revision,
        read_at=read_at,
    )


# ---- the views ---------------------------------------------------------------------------------


def target_version(snapshot: FleetSnapshot) -> str:
    """The newest valid version any host runs or has staged, not blocked in its group:
    where the rollout goes. "" when no host names one."""
    blocked = {(g, v.version) for g, vs in snapshot.failed.items() for v in vs if v.blocked}
    seen = {
        v
        for h in snapshot.hosts
        for v in (h.booted_version, h.staged_version)
        if (h.group, v) not in blocked
    }
    seen = {v for v in seen if is_valid(v)}  # a fleet runs a handful of versions
    best = ""
    for v in seen:
        if not best or _newer(v, best):
            best = v
    return best


def _newer(a: str, b: str) -> bool:
    try:
        return compare(a, b) > 0
    except (ValueError, TypeError):  # a version a hostile record made up
        return a > b


def _holders(snapshot: FleetSnapshot) -> dict[str, tuple[str, float | None]]:
    """Holder id -> (group, start time)."""
    return {
        h.id: (g, h.since)
        for g, lock in snapshot.locks.items()
        if lock.status is not None
        for h in lock.status.holders
    }


def phase(host: HostRecord, target: str, holding: bool) -> str:
    """One word for where a host is in the rollout (the page colours by it)."""
    if host.last_error_kind:
        return "failing"
    if host.blocked_version:
        return "refusing"
    if holding:
        return "rebooting"
    if host.state == "UPDATED_NEED_REBOOT":
        return "staged"
    if host.state in BUSY_STATES:
        return "updating"
    if target and host.booted_version == target:
        return "current"
    return "behind"


def hosts_view(snapshot: FleetSnapshot) -> dict[str, Any]:
    """``GET /api/v1/hosts``."""
    now, target = snapshot.read_at, target_version(snapshot)
    holders = _holders(snapshot)
    rows = []
    for h in snapshot.hosts:
        held = holders.get(h.id)
        rows.append(
            {
                "id": _cut(h.id, 256),
                "hostname": _cut(h.hostname),
                "group": _cut(h.group, 256),
                "strategy": _cut(h.strategy, 64),
                "state": _cut(h.state, 64),
                "phase": phase(h, target, held is not None),
                "booted_version": _cut(h.booted_version, 128),
                "booted_slot": _cut(h.booted_slot, 128),
                "staged_version": _cut(h.staged_version, 128),
                "blocked_version": _cut(h.blocked_version, 128),
                "last_check": h.last_check,
                "last_error_kind": _cut(h.last_error_kind, 64),
                "last_error": _cut(h.last_error),
                "lock_held": h.lock_held if held is None else True,
                "held_for_s": _age(held[1], now) if held else None,
                "record_age_s": _age(h.updated, now),
            }
        )
    return {
        "read_at": snapshot.read_at,
        "revision": snapshot.revision,
        "target_version": _cut(target, 128),
        "hosts": rows,
        "unreadable": [u.as_dict() for u in snapshot.unreadable],
    }


def _age(since: float | None, now: float) -> float | None:
    if since is None or not math.isfinite(since):
        return None
    return round(max(0.0, now - since), 3)


def groups_view(snapshot: FleetSnapshot, stale_after_s: float) -> dict[str, Any]:
    """``GET /api/v1/groups``: slots, holders and their ages (``stale`` past
    ``stale_after_s``), failed versions, hosts per group."""
    now = snapshot.read_at
    names = {h.id: h.hostname for h in snapshot.hosts}
    per_group = Counter(h.group for h in snapshot.hosts)
    groups = []
    for g in snapshot.groups:
        lock = snapshot.locks.get(g)
        st = lock.status if lock else None
        holders = []
        for holder in st.holders if st else ():
            age = _age(holder.since, now)
            holders.append(
                {
                    "id": _cut(holder.id, 256),
                    "hostname": None if holder.id not in names else _cut(names[holder.id]),
                    "age_s": age,
                    "stale": age is not None and age > stale_after_s,
                }
            )
        groups.append(
            {
                "group": _cut(g, 256),
                "hosts": per_group.get(g, 0),
                "total_slots": st.total_slots if st else None,
                "free_slots": st.free_slots if st else None,
                "holders": holders,
                "oldest_holder_age_s": max(
                    (h["age_s"] for h in holders if h["age_s"] is not None), default=None
                ),
                "lock_error": _cut(lock.error) if lock else "",
                "failed_versions": [_verdict(v) for v in snapshot.failed.get(g, ())],
            }
        )
    return {"read_at": now, "stale_after_s": stale_after_s, "groups": groups}


def _verdict(v: Verdict) -> dict[str, Any]:
    return {
        "version": _cut(v.version, 128),
        "blocked": v.blocked,
        "hosts": v.hosts,
        "failures": []
        if v.record is None
        else [
            {"host": _cut(f.host, 256), "kind": _cut(f.kind, 64), "at": f.at}
            for f in v.record.failures
        ],
        "malformed": None if v.malformed is None else _cut(v.malformed.message),
    }


def versions_view(snapshot: FleetSnapshot) -> dict[str, Any]:
    """``GET /api/v1/versions``: hosts per booted version and state, and the rollout's
    progress towards the target version."""
    target = target_version(snapshot)
    booted: dict[str, Counter[str]] = {}
    staged: Counter[str] = Counter()
    for h in snapshot.hosts:
        booted.setdefault(_cut(h.booted_version or UNKNOWN_VERSION, 128), Counter())[
            _cut(h.state, 64)
        ] += 1
        if h.staged_version:
            staged[_cut(h.staged_version, 128)] += 1
    order = sorted(booted, key=_version_key, reverse=True)
    on_target = sum(booted.get(target, Counter()).values()) if target else 0
    total = len(snapshot.hosts)
    return {
        "read_at": snapshot.read_at,
        "target_version": _cut(target, 128),
        "progress": {
            "on_target": on_target,
            "staged": staged.get(target, 0) if target else 0,
            "hosts": total,
            "fraction": round(on_target / total, 4) if total else None,
        },
        "versions": [
            {
                "version": v,
                "hosts": sum(booted[v].values()),
                "states": dict(sorted(booted[v].items())),
                "staged": staged.get(v, 0),
            }
            for v in order
        ],
    }


class _VersionKey:
    """Orders versions as the agents do; made-up ones by their text."""

    def __init__(self, version: str) -> None:
        self.version = version

    def __lt__(self, other: _VersionKey) -> bool:
        return _newer(other.version, self.version)


def _version_key(version: str) -> _VersionKey:
    return _VersionKey(version)


def fleet_view(snapshot: FleetSnapshot, stale_after_s: float) -> dict[str, Any]:
    """The page's one document: the three views together, from one read."""
    return {
        "hosts": hosts_view(snapshot),
        "groups": groups_view(snapshot, stale_after_s),
        "versions": versions_view(snapshot),
    }


# ---- /metrics ----------------------------------------------------------------------------------


@dataclass
class _Family:
    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def _label(value: str) -> str:
    cut = _cut(value, MAX_LABEL)
    return cut.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def metrics_text(snapshot: FleetSnapshot | None, *, up: bool, stale_after_s: float) -> str:
    """The fleet-wide gauges in the Prometheus text format (version 0.0.4).
    ``snapshot`` None: etcd was never read (only ``updater_fleet_up`` 0)."""
    fams = [_Family("updater_fleet_up", "1 when the last read of etcd succeeded")]
    fams[0].samples.append(({}, 1 if up else 0))
    if snapshot is not None:
        fams += _fleet_families(snapshot, stale_after_s)
    out = []
    for f in fams:
        out.append(f"# HELP {f.name} {f.help}\n# TYPE {f.name} gauge\n")
        for labels, value in f.samples:
            shown = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(
                f"{f.name}{{{shown}}} {_number(value)}\n"
                if shown
                else f"{f.name} {_number(value)}\n"
            )
    return "".join(out)


def _fleet_families(snapshot: FleetSnapshot, stale_after_s: float) -> list[_Family]:
    read = _Family("updater_fleet_read_timestamp_seconds", "Unix time of the last read of etcd")
    read.samples.append(({}, snapshot.read_at))
    hosts = _Family("updater_fleet_hosts", "Hosts by group, booted version and state")
    for (g, v, s), n in sorted(
        Counter(
            (h.group, h.booted_version or UNKNOWN_VERSION, h.state) for h in snapshot.hosts
        ).items()
    ):
        hosts.samples.append(({"group": g, "version": v, "state": s}, n))
    errors = _Family(
        "updater_fleet_hosts_failing", "Hosts whose last check or install failed, by kind"
    )
    for kind, n in sorted(
        Counter(h.last_error_kind for h in snapshot.hosts if h.last_error_kind).items()
    ):
        errors.samples.append(({"kind": kind}, n))
    refusing = _Family(
        "updater_fleet_hosts_refusing", "Hosts refusing a blocked version, by group and version"
    )
    for (g, v), n in sorted(
        Counter((h.group, h.blocked_version) for h in snapshot.hosts if h.blocked_version).items()
    ):
        refusing.samples.append(({"group": g, "version": v}, n))
    target = _Family("updater_fleet_target_info", "The newest version a host runs or has staged")
    t = target_version(snapshot)
    if t:
        target.samples.append(({"version": t}, 1))
    slots = _Family("updater_fleet_lock_slots", "Reboot slots of the group's semaphore")
    holders = _Family("updater_fleet_lock_holders", "Hosts holding a reboot slot")
    oldest = _Family(
        "updater_fleet_lock_oldest_holder_age_seconds",
        "How long the longest holder of the group has held its slot",
    )
    stale = _Family(
        "updater_fleet_lock_stale_holders", "Holders older than the server's --stale-after"
    )
    bad_lock = _Family("updater_fleet_lock_malformed", "1 when the group's semaphore is unreadable")
    for g in sorted(snapshot.locks):
        lock = snapshot.locks[g]
        bad_lock.samples.append(({"group": g}, 0 if lock.status is not None else 1))
        if lock.status is None:
            continue
        ages = [
            a
            for a in (_age(h.since, snapshot.read_at) for h in lock.status.holders)
            if a is not None
        ]
        slots.samples.append(({"group": g}, lock.status.total_slots))
        holders.samples.append(({"group": g}, len(lock.status.holders)))
        oldest.samples.append(({"group": g}, max(ages, default=0)))
        stale.samples.append(({"group": g}, sum(1 for a in ages if a > stale_after_s)))
    failed = _Family(
        "updater_fleet_failed_version_hosts",
        "Hosts that failed on a version, by group and version (blocked: the group refuses it)",
    )
    for g, verdicts in sorted(snapshot.failed.items()):
        for verdict in verdicts:
            labels = {
                "group": g,
                "version": verdict.version,
                "blocked": str(verdict.blocked).lower(),
            }
            failed.samples.append((labels, verdict.hosts))
    unreadable = _Family("updater_fleet_records_unreadable", "Keys whose value is not a record")
    unreadable.samples.append(({}, len(snapshot.unreadable)))
    return [
        read,
        hosts,
        errors,
        refusing,
        target,
        slots,
        holders,
        oldest,
        stale,
        bad_lock,
        failed,
        unreadable,
    ]
