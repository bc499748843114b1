"""A simulated fleet in a real etcd, for the dashboard's tests and benchmark.

:func:`fleet` makes N host records (deterministic: ``host-000``...) spread over
groups, versions, states and reboot strategies the way a rollout in progress
looks; :class:`FleetWriter` puts them where the agents put theirs
(``updater/v1/hosts/<id>``, as :class:`policies.fleet.HostRecord` encodes them),
takes reboot slots with the real :class:`policies.etcdlock.EtcdLock` (at a
chosen start time: a stale holder is one that took its slot long ago), records
failed versions with the real :class:`policies.failed.FailedVersions`, and
writes raw values for the hostile cases.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from policies.etcdclient import EtcdClient
from policies.etcdlock import EtcdLock
from policies.etcdtxn import b64
from policies.failed import FailedVersions
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.semaphore import semaphore_key

OLD, NEW = "1.0.0", "1.1.0"
# markup in a record: if a page ever made elements of it, the browser would fetch these
SCRIPT = '<script>fetch("/pwned-script")</script>'
IMG = '<img src="/pwned-img" onerror="fetch(\'/pwned-onerror\')">'
GROUPS = ("web", "db")


def host_id(i: int) -> str:
    return f"{i:032x}"


def fleet(n: int, now: float) -> list[HostRecord]:
    """``n`` hosts mid-rollout from OLD to NEW: most on NEW, some behind, some staged,
    some updating, a few failing; a quarter in group db, the rest web."""
    hosts = []
    for i in range(n):
        group = "db" if i % 4 == 3 else "web"
        booted, state, staged, error, message = NEW, "IDLE", "", "", ""
        if i % 10 == 1:
            booted = OLD
        elif i % 10 == 2:
            booted, state, staged = OLD, "UPDATED_NEED_REBOOT", NEW
        elif i % 10 == 5:
            booted, state = OLD, "DOWNLOADING"
        elif i % 25 == 7:
            booted, state = OLD, "REPORTING_ERROR_EVENT"
            error, message = "timeout", "the image download stalled (less than 1024 bytes/s)"
        strategy = ("lock", "immediate", "off")[0 if group == "db" else i % 3]
        hosts.append(
            HostRecord(
                id=host_id(i),
                hostname=f"host-{i:03d}",
                group=group,
                booted_slot="USR-B" if booted == NEW else "USR-A",
                booted_version=booted,
                state=state,
                staged_version=staged,
                last_check=int(now) - 60,
                last_error_kind=error,
                lock_held=False if strategy == "lock" else None,
                updated=now - 5,
                strategy=strategy,
                last_error=message,
            )
        )
    return hosts


class _At:
    """A clock stopped at one instant: the start time a holder's slot records."""

    def __init__(self, when: float) -> None:
        self.when = when

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.when, UTC)

    def monotonic(self) -> float:
        return self.when


@dataclass
class FleetWriter:
    client: EtcdClient

    def put(self, record: HostRecord) -> None:
        self.put_raw(HOSTS_PREFIX + record.id, record.encode())

    def put_all(self, records: list[HostRecord]) -> None:
        for r in records:
            self.put(r)

    def change(self, record: HostRecord, **fields: object) -> HostRecord:
        changed = dataclasses.replace(record, **fields)  # type: ignore[arg-type]
        self.put(changed)
        return changed

    def put_raw(self, key: str, value: bytes) -> None:
        self.client.call("kv/put", {"key": b64(key), "value": b64(value)})

    def take_slot(self, group: str, holder: str, *, since: float, slots: int = 2) -> bool:
        """``holder`` takes a slot of ``group``'s semaphore, recorded as taken at ``since``."""
        return EtcdLock(self.client, group, slots, clock=_At(since)).acquire(holder)

    def fail(self, group: str, version: str, holder: str, kind: str, at: float) -> None:
        FailedVersions(self.client, group).record(version, holder, kind, at)

    def revision(self) -> int:
        header = self.client.call("kv/range", {"key": b64("\0"), "limit": 1}).get("header", {})
        return int(header.get("revision", 0))


def hostile(writer: FleetWriter, now: float) -> str:
    """Write what a dashboard must survive: a host record whose fields hold markup (its id
    is returned) and values under the dashboard's prefixes that are no records."""
    evil = HostRecord(
        id="e" * 32,
        hostname=IMG,
        group="web",
        booted_slot="USR-A",
        booted_version=SCRIPT,
        state="<b>IDLE</b>",
        staged_version="",
        last_check=0,
        last_error_kind="</td><td>x",
        lock_held=None,
        updated=now,
        strategy="lock",
        last_error=SCRIPT + IMG,
    )
    writer.put(evil)
    bad = {
        HOSTS_PREFIX + "not-json": b"{not json",
        HOSTS_PREFIX + "array": b"[1,2,3]",
        HOSTS_PREFIX + "nan": b'{"id":"nan","updated":NaN}',
        HOSTS_PREFIX + "deep": b"[" * 10000 + b"]" * 10000,
        HOSTS_PREFIX + "huge": b'{"hostname":"' + b"A" * (1024 * 1024 + 10) + b'"}',
        HOSTS_PREFIX + "f" * 32: dataclasses.replace(evil, id="other").encode(),
        semaphore_key("broken"): b'{"total_slots":"<script>","holders":[]}',
        "updater/v1/groups/web/failed/9.9.9": b"<html>not a record</html>",
    }
    for key, value in bad.items():
        writer.put_raw(key, value)
    return evil.id
