"""The failed-version block (issue 12, part 2) on a real single-node etcd: the pure
decision, the store (record, read, unblock, concurrent recorders, hostile values),
the CLI, and agents: a host that rolls back records the version before it gives its
reboot slot back; the other hosts of the group refuse to install it or to reboot
into it until an admin unblocks it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from devtools.etcd import EtcdNode
from devtools.host import Host, provision
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.failed import (
    MAX_FAILURES_KEPT,
    FailedRecord,
    FailedVersions,
    Failure,
    GroupBlocks,
    decide,
    failed_key,
)
from policies.fleet import FleetPublisher, HostRecord, read_hosts, summarize
from policies.fleetlock import FleetLock
from policies.fleetlockd import FleetLockServer, ServerSettings
from policies.fleetlockd import running as running_server
from policies.fleetlockservice import FleetLockService, StoredFailedVersions
from policies.semaphore import semaphore_key
from policies.strategy import LockStrategy, Off
from tests.conftest import HOST_SLOT_SIZE, NotifySocket, Repo, until, updatectl
from tests.test_agent import Harness, image_gets, running, samples
from updater.clock import SystemClock
from updater.errors import DiskError, LockError
from updater.fleetreport import EtcdFleetReporter
from updater.metrics import Metrics

A, B, C = "aaaa", "bbbb", "cccc"


def put_raw(client: EtcdClient, key: str, value: bytes) -> None:
    client.call(
        "kv/put",
        {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()},
    )


def rec(*hosts: str, version: str = "1.2.0") -> FailedRecord:
    return FailedRecord(version, tuple(Failure(h, "rolled_back", 1.0) for h in hosts))


# ---- the decision (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "max_failures", "blocked"),
    [
        (None, 1, False),
        (rec(), 1, False),  # an empty list (an admin's hand-written key) blocks nobody
        (rec(A), 1, True),
        (rec(A), 2, False),
        (rec(A, B), 2, True),
        (rec(A, B), 3, False),
        (rec(A, B, C), 3, True),
        (LockError("malformed", "not JSON"), 1, True),  # someone wrote the key: fail safe
        (LockError("malformed", "not JSON"), 100, True),
    ],
)
def test_decide(stored: FailedRecord | LockError | None, max_failures: int, blocked: bool) -> None:
    verdict = decide("1.2.0", stored, max_failures)
    assert verdict.blocked is blocked
    assert verdict.version == "1.2.0"


def test_decide_refuses_a_zero_threshold() -> None:
    with pytest.raises(ValueError):
        decide("1.2.0", None, 0)


def test_a_host_counts_once_and_the_list_is_capped() -> None:
    r = rec(A)
    assert r.with_failure(Failure(A, "check_failed", 9.0)) is r
    full = FailedRecord(
        "1.2.0", tuple(Failure(f"h{i}", "rolled_back", 1.0) for i in range(MAX_FAILURES_KEPT))
    )
    assert full.with_failure(Failure("one-more", "rolled_back", 1.0)) is full
    assert FailedRecord.decode(full.encode(), "k", "1.2.0") == full


def test_metric_shows_each_refused_version_while_refused() -> None:
    m = Metrics()
    m.version_blocked("1.2.0", True)
    m.version_blocked("1.3.0", True)
    m.version_blocked("1.2.0", False)
    m.version_blocked("9.9.9", False)  # never shown: nothing to remove
    shown = {k: v for k, v in samples(m).items() if k.startswith("updater_version_blocked")}
    assert shown == {"updater_version_blocked{version=1.3.0}": 1.0}


def test_host_records_of_older_agents_read_without_a_blocked_version() -> None:
    doc = json.loads(HostRecord("h", "n", "g", "USR-A", "1", "IDLE", "", 0, "", None, 1.0).encode())
    del doc["blocked_version"]
    assert HostRecord.decode(json.dumps(doc).encode()).blocked_version == ""


# ---- the store on etcd -------------------------------------------------------------------------


def test_record_read_unblock(client: EtcdClient, group: str) -> None:
    store = FailedVersions(client, group, max_failures=2)
    assert store.read() == {} and not store.verdict("1.2.0").blocked
    assert store.unblock("1.2.0") is None

    first = store.record("1.2.0", A, "check_failed", 100.0)
    assert first == FailedRecord("1.2.0", (Failure(A, "check_failed", 100.0),))
    assert not store.verdict("1.2.0").blocked  # one of two
    again = store.record("1.2.0", A, "rolled_back", 200.0)  # the same host: counted once
    assert again == first
    store.record("1.2.0", B, "rolled_back", 300.0)
    verdict = store.verdict("1.2.0")
    assert verdict.blocked and verdict.hosts == 2
    assert "aaaa (check_failed)" in verdict.describe()
    store.record("1.3.0", C, "rolled_back", 400.0)

    stored = json.loads(client.range(failed_key(group, "1.2.0")).value)  # type: ignore[union-attr]
    assert stored == {
        "version": "1.2.0",
        "failures": [
            {"host": A, "kind": "check_failed", "at": 100.0},
            {"host": B, "kind": "rolled_back", "at": 300.0},
        ],
    }
    assert set(store.read()) == {"1.2.0", "1.3.0"}
    assert [(v.version, v.blocked) for v in store.verdicts()] == [("1.2.0", True), ("1.3.0", False)]

    gone = store.unblock("1.2.0")
    assert gone is not None and gone.removed == FailedRecord(
        "1.2.0", (Failure(A, "check_failed", 100.0), Failure(B, "rolled_back", 300.0))
    )
    assert client.range(failed_key(group, "1.2.0")) is None
    assert not store.verdict("1.2.0").blocked
    assert set(store.read()) == {"1.3.0"}  # the other version is untouched


def test_concurrent_recorders_all_count(client: EtcdClient, etcd: EtcdNode, group: str) -> None:
    hosts = [f"host-{i}" for i in range(8)]
    start = threading.Barrier(len(hosts))
    errors: list[BaseException] = []

    def one(host: str) -> None:
        c = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
        try:
            start.wait()
            for _ in range(2):  # and each twice: still once
                FailedVersions(c, group).record("1.2.0", host, "rolled_back", 1.0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    record = FailedVersions(client, group).read()["1.2.0"]
    assert isinstance(record, FailedRecord)
    assert sorted(f.host for f in record.failures) == hosts


HOSTILE = [
    b"",
    b"not json",
    b"[" * 5000,
    b'{"failures": 5}',
    b'{"failures": [{"host": "", "kind": "x", "at": 1}]}',
    b'{"failures": [{"host": "a", "kind": "x", "at": "yesterday"}]}',
    b'{"failures": [{"host": "a", "kind": "x", "at": 1}, {"host": "a", "kind": "y", "at": 2}]}',
    b'{"version": "9.9.9", "failures": []}',
    b'{"failures": [{"host": "a\\u0000", "kind": "x", "at": 1}]}',
    b'{"failures": [{"host": "\\ud800", "kind": "x", "at": 1}]}',
    b'{"failures": []}' + b" " * (70 * 1024),
    b"\xff\xfe",
    b'{"failures": [{"host": "a", "kind": "x", "at": 1' + b"0" * 400 + b"}]}",
    b'{"failures": ['
    + b",".join(b'{"host":"h%d","kind":"k","at":1}' % i for i in range(101))
    + b"]}",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_stored_values(client: EtcdClient, group: str, value: bytes) -> None:
    """A typed error, the version blocked (fail safe), the value never rewritten."""
    key = failed_key(group, "1.2.0")
    put_raw(client, key, value)
    before = client.range(key)
    assert before is not None
    store = FailedVersions(client, group, max_failures=3)

    verdict = store.verdict("1.2.0")
    assert verdict.blocked and verdict.malformed is not None
    assert verdict.malformed.kind == "malformed" and key in verdict.malformed.message
    assert len(verdict.malformed.message) < 1000
    read = store.read()["1.2.0"]
    assert isinstance(read, LockError) and read.kind == "malformed"
    assert isinstance(store.record("1.2.0", A, "rolled_back", 1.0), LockError)
    after = client.range(key)
    assert after is not None and (after.value, after.mod_revision) == (
        before.value,
        before.mod_revision,
    )

    gone = store.unblock("1.2.0")  # the admin's way out
    assert gone is not None and isinstance(gone.removed, LockError)
    assert client.range(key) is None


def test_a_hostile_key_under_the_prefix_is_reported_not_crashed_on(
    client: EtcdClient, group: str
) -> None:
    put_raw(client, failed_key(group, "1.0.0")[: -len("1.0.0")] + "../../x y", rec(A).encode())
    FailedVersions(client, group).record("1.2.0", A, "rolled_back", 1.0)
    read = FailedVersions(client, group).read()
    assert isinstance(read["1.2.0"], FailedRecord)
    assert isinstance(read["../../x y"], LockError)


def test_bad_arguments(client: EtcdClient, group: str) -> None:
    store = FailedVersions(client, group)
    for version in ("", "../x", "1.2.0/x", "v" * 80):
        with pytest.raises(LockError) as err:
            store.verdict(version)
        assert err.value.kind == "bad_argument"
    with pytest.raises(LockError):
        store.record("1.2.0", "", "rolled_back", 1.0)
    with pytest.raises(LockError):
        FailedVersions(client, group, max_failures=0)


# ---- the CLI -----------------------------------------------------------------------------------


def lock_config(host: Host, etcd: EtcdNode, group: str, max_failures: int = 1) -> None:
    host.config.write_text(
        host.config.read_text()
        + f"""
[reboot]
strategy = "lock"
lock = "etcd"
group = "{group}"
retry_s = 1
max_failures = {max_failures}

[etcd]
endpoints = ["{etcd.endpoint}"]
slots = 1
"""
    )


def test_fleet_status_and_unblock_cli(
    etcd: EtcdNode, client: EtcdClient, group: str, host: Host
) -> None:
    lock_config(host, etcd, group)
    assert updatectl(host, "fleet", "status", "--json").json()["failed_versions"] == []
    none = updatectl(host, "fleet", "unblock", "1.2.0", "--json")
    assert none.code == 7 and none.json()["error"]["kind"] == "not_blocked"
    bad = updatectl(host, "fleet", "unblock", "../1.2.0")
    assert bad.code == 10 and "bad_argument" in bad.err

    FailedVersions(client, group).record("1.2.0", A, "check_failed", 1_800_000_000.0)
    doc = updatectl(host, "fleet", "status", "--json").json()
    assert doc["failed_versions"] == [
        {
            "version": "1.2.0",
            "blocked": True,
            "failures": [{"host": A, "kind": "check_failed", "at": 1_800_000_000.0}],
            "malformed": None,
        }
    ]
    text = updatectl(host, "fleet", "status").out
    assert "1.2.0" in text and "BLOCKED" in text and A in text and "check_failed" in text
    status = updatectl(host, "status", "--json").json()
    assert (
        status["failed_versions"][0]["version"] == "1.2.0"
        and status["failed_versions_error"] is None
    )
    assert "BLOCKED" in updatectl(host, "status").out

    out = updatectl(host, "fleet", "unblock", "1.2.0")
    assert out.code == 0 and "Unblocked 1.2.0" in out.out and A in out.out
    assert updatectl(host, "fleet", "status", "--json").json()["failed_versions"] == []
    assert updatectl(host, "fleet", "unblock", "1.2.0").code == 7


# ---- agents ------------------------------------------------------------------------------------


def blocks_for(
    etcd: EtcdNode,
    group: str,
    hid: str,
    max_failures: int = 1,
    endpoints: tuple[str, ...] | None = None,
) -> GroupBlocks:
    def store() -> FailedVersions:
        c = EtcdClient(EtcdSettings(endpoints=endpoints or etcd.endpoints, timeout_s=0.5))
        return FailedVersions(c, group, max_failures)

    return GroupBlocks(group, store, lambda: hid)


def lock_harness(
    host: Host,
    etcd: EtcdNode,
    group: str,
    hid: str,
    notify: NotifySocket,
    *,
    max_failures: int = 1,
    metrics: Metrics | None = None,
    strategy: LockStrategy | None = None,
) -> Harness:
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=etcd.endpoints)), group, 1)
    h = Harness(
        host, notify, strategy or LockStrategy(lock, hid, clock=SystemClock()), metrics=metrics
    )
    h.updater.blocks = blocks_for(etcd, group, hid, max_failures)
    return h


def other_host(tmp_path: Path, name: str, usr_images: dict[str, Path], repo: Repo) -> Host:
    return provision(
        tmp_path / name,
        slot_size=HOST_SLOT_SIZE,
        first_image=usr_images["1.0.0"],
        first_version="1.0.0",
        repo_url=repo.url,
        keyring=repo.key.public_key,
    )


def holders(client: EtcdClient, group: str, revision: int | None = None) -> list[str]:
    kv = client.range(semaphore_key(group), revision=revision)
    return [] if kv is None else list(json.loads(kv.value)["holders"])


def roll_back(host: Host, etcd: EtcdNode, group: str, hid: str, notify: NotifySocket) -> None:
    """``host`` installs the repo's release under the lock, reboots holding the slot, and
    its trial boot is never blessed: the firmware falls back to the old slot."""
    h = lock_harness(host, etcd, group, hid, notify)

    async def install() -> None:
        async with running(h):
            await until(lambda: len(h.rebooter.calls) == 1, timeout=60)

    asyncio.run(install())
    assert host.reboot() == "USR-B"  # the trial boot ...
    assert host.reboot() == "USR-A"  # ... never blessed


def test_a_bad_release_stops_at_the_first_host(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    notify: NotifySocket,
) -> None:
    hb = other_host(tmp_path, "host-b", usr_images, repo)
    hc = other_host(tmp_path, "host-c", usr_images, repo)
    lock_config(host, etcd, group)
    lock_config(hb, etcd, group)
    repo.publish("1.2.0", usr_images["1.2.0"])

    # C stages 1.2.0 before anything is known against it (it reboots only later)
    c0 = Harness(hc, notify, Off())
    c0.updater.blocks = blocks_for(etcd, group, C)

    async def stage_c() -> None:
        async with running(c0):
            await until(lambda: c0.agent.status().state == "UPDATED_NEED_REBOOT", timeout=60)

    asyncio.run(stage_c())

    # A takes the slot, reboots into 1.2.0, which never gets blessed
    roll_back(host, etcd, group, A, notify)
    assert holders(client, group) == [A]  # held across the reboot

    # A comes back on 1.0.0: records 1.2.0 while still holding its slot, then lets it go
    a = lock_harness(host, etcd, group, A, notify)
    with capture_logs() as logs:

        async def come_back() -> None:
            async with running(a):
                await until(
                    lambda: (
                        holders(client, group) == []
                        and any(e["event"] == "reported_steady" for e in logs)
                    )
                )

        asyncio.run(come_back())
    kv = client.range(failed_key(group, "1.2.0"))
    assert kv is not None
    assert json.loads(kv.value)["failures"][0] | {"at": 0} == {
        "host": A,
        "kind": "rolled_back",
        "at": 0,
    }
    assert holders(client, group, revision=kv.create_revision) == [A]  # the record came first
    events = [e["event"] for e in logs]
    assert events.index("rollback_detected") < events.index("failed_version_reported")
    assert events.index("failed_version_reported") < events.index("reported_steady")
    assert json.loads((host.state_dir / "state.json").read_text())["unrecorded"] == []

    # B is offered 1.2.0: refuses to install it, its slot and state untouched
    gets = image_gets(repo)
    metrics = Metrics()
    b = lock_harness(hb, etcd, group, B, notify, metrics=metrics)
    b.agent.fleet = EtcdFleetReporter(FleetPublisher(client, B, 60), B, group)

    async def offered() -> None:
        async with running(b):
            await until(lambda: b.agent.status().last_error_kind == "version_blocked")

    asyncio.run(offered())
    st = b.agent.status()
    assert st.staged_version == "" and "1.2.0" in st.last_error_message
    assert b.agent.blocked_version == "1.2.0"
    assert image_gets(repo) == gets  # not a byte downloaded
    assert holders(client, group) == []
    saved = json.loads((hb.state_dir / "state.json").read_text())
    assert all(s["version"] != "1.2.0" for s in saved["slots"].values())
    assert b.rebooter.calls == []
    assert samples(metrics)["updater_version_blocked{version=1.2.0}"] == 1.0
    record = next(r for r in read_hosts(client) if r.id == B)
    assert (record.blocked_version, record.last_error_kind) == ("1.2.0", "version_blocked")
    assert summarize([record], None, 0).refusing == ((record.hostname, "1.2.0"),)
    assert (
        updatectl(hb, "check", "--install", "--json").json()["error"]["kind"] == "version_blocked"
    )

    # C has 1.2.0 staged: refuses to reboot into it, holds no slot
    c = lock_harness(hc, etcd, group, C, notify)

    async def staged() -> None:
        async with running(c):
            await until(
                lambda: (
                    c.agent.status().last_error_kind == "version_blocked"
                    and c.agent.status().state == "IDLE"
                )  # refused, then un-staged
            )

    asyncio.run(staged())
    assert c.rebooter.calls == [] and holders(client, group) == []
    assert c.agent.status().state == "IDLE"  # un-staged: the old slot boots next
    assert hc.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]

    # unblocked by the admin: C stages its bytes again and reboots, B installs
    assert updatectl(hb, "fleet", "unblock", "1.2.0").code == 0
    b2 = lock_harness(hb, etcd, group, B, notify)
    c2 = lock_harness(hc, etcd, group, C, notify)
    gets = image_gets(repo)

    async def proceed() -> None:
        async with running(c2):
            await until(lambda: len(c2.rebooter.calls) == 1, timeout=30)
        assert image_gets(repo) == gets  # C re-hashed its slot, downloaded nothing
        async with running(b2):
            await until(lambda: b2.agent.status().state == "UPDATED_NEED_REBOOT", timeout=60)

    asyncio.run(proceed())
    assert holders(client, group) == [C]  # C reboots under the lock; B waits for it
    assert b2.agent.status().staged_version == "1.2.0"


class RecordsAfterLocking(LockStrategy):
    """Another host's rollback lands in etcd right after this one got the slot."""

    def __init__(self, *args: object, record: FailedVersions, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.record = record

    def can_finalize(self, version: str | None = None) -> bool:
        ok = super().can_finalize(version)
        if ok:
            self.record.record("1.2.0", A, "check_failed", 1.0)
        return ok


def test_a_block_that_lands_while_taking_the_slot_gives_it_back(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    repo.publish("1.2.0", usr_images["1.2.0"])
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=etcd.endpoints)), group, 1)
    strategy = RecordsAfterLocking(lock, B, SystemClock(), record=FailedVersions(client, group))
    h = lock_harness(host, etcd, group, B, notify, strategy=strategy)
    with capture_logs() as logs:

        async def scenario() -> None:
            async with running(h):
                await until(
                    lambda: h.agent.status().last_error_kind == "version_blocked", timeout=60
                )

        asyncio.run(scenario())
    assert h.rebooter.calls == []
    assert holders(client, group) == []  # given back
    events = [e["event"] for e in logs]
    assert "reboot_lock_granted" in events
    assert events.index("reboot_lock_granted") < events.index("reboot_refused_version_blocked")


def test_etcd_down_keeps_the_slot_and_the_record_pending_across_a_restart(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    lock_config(host, etcd, group)
    repo.publish("1.2.0", usr_images["1.2.0"])
    roll_back(host, etcd, group, A, notify)

    # the failed-version store is unreachable (the lock is not): the slot stays held
    a = lock_harness(host, etcd, group, A, notify)
    a.updater.blocks = blocks_for(etcd, group, A, endpoints=("http://127.0.0.1:9",))
    with capture_logs() as logs:

        async def down() -> None:
            async with running(a):
                await until(  # tried, and tried again: the slot is kept all along
                    lambda: [e["event"] for e in logs].count("failed_version_not_recorded") >= 2
                )

        asyncio.run(down())
    assert holders(client, group) == [A]
    assert "reported_steady" not in [e["event"] for e in logs]
    saved = json.loads((host.state_dir / "state.json").read_text())
    assert [u["version"] for u in saved["unrecorded"]] == ["1.2.0"]
    assert client.range(failed_key(group, "1.2.0")) is None

    # restarted with etcd reachable: recorded, then released
    a2 = lock_harness(host, etcd, group, A, notify)
    run = asyncio.run

    async def up() -> None:
        async with running(a2):
            await until(lambda: holders(client, group) == [])

    run(up())
    verdict = FailedVersions(client, group).verdict("1.2.0")
    assert verdict.blocked and verdict.record is not None
    assert [f.host for f in verdict.record.failures] == [A]


def test_max_failures_two_needs_two_hosts(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    repo.publish("1.2.0", usr_images["1.2.0"])
    store = FailedVersions(client, group, max_failures=2)
    store.record("1.2.0", A, "check_failed", 1.0)
    store.record("1.2.0", A, "rolled_back", 2.0)  # the same host again: still one
    b = lock_harness(host, etcd, group, B, notify, max_failures=2)
    b.agent.strategy = Off()

    async def one_failure() -> None:
        async with running(b):
            await until(lambda: b.agent.status().state == "UPDATED_NEED_REBOOT", timeout=60)

    asyncio.run(one_failure())  # one host of two: installed

    store.record("1.2.0", C, "rolled_back", 3.0)
    b2 = lock_harness(host, etcd, group, B, notify, max_failures=2)

    async def two_failures() -> None:
        async with running(b2):
            await until(lambda: b2.agent.status().last_error_kind == "version_blocked")

    asyncio.run(two_failures())  # two hosts: the staged version is not rebooted into
    assert b2.rebooter.calls == [] and holders(client, group) == []


# ---- a staged version that gets blocked is un-staged ---------------------------------------------


def stage(host: Host, etcd: EtcdNode, group: str, hid: str, notify: NotifySocket) -> None:
    """``host`` installs the repo's release and keeps it staged (strategy off)."""
    h = Harness(host, notify, Off())
    h.updater.blocks = blocks_for(etcd, group, hid)

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT", timeout=60)

    asyncio.run(scenario())
    assert host.boot_control().primary().label == "USR-B"  # type: ignore[union-attr]
    assert (host.root / "reboot-required").exists()


def slot_record(host: Host, label: str) -> dict[str, object]:
    saved = json.loads((host.state_dir / "state.json").read_text())
    return next(s for s in saved["slots"].values() if s["label"] == label)


def test_a_staged_version_that_gets_blocked_is_unstaged_and_staged_again_once_unblocked(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    lock_config(host, etcd, group)
    repo.publish("1.2.0", usr_images["1.2.0"])
    stage(host, etcd, group, B, notify)
    staged_bytes = host.slot_bytes("USR-B")
    FailedVersions(client, group).record("1.2.0", A, "check_failed", 1.0)

    # B learns 1.2.0 is blocked: the booted slot boots next again, the sentinel goes
    b = lock_harness(host, etcd, group, B, notify)
    with capture_logs() as logs:

        async def blocked() -> None:
            async with running(b):
                await until(lambda: b.agent.status().last_error_kind == "version_blocked")
                await until(lambda: b.agent.status().state == "IDLE")

        asyncio.run(blocked())
    events = [e["event"] for e in logs]
    assert events.index("reboot_refused_version_blocked") < events.index("update_unstaged")
    st = b.agent.status()
    assert (st.state, st.staged_version) == ("IDLE", "")
    assert "1.2.0" in st.last_error_message and b.rebooter.calls == []
    assert holders(client, group) == []
    assert host.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]
    assert not (host.root / "reboot-required").exists()
    assert not (host.root / "reboot-required.pkgs").exists()
    assert slot_record(host, "USR-B") | {"updated": ""} == slot_record(host, "USR-B") | {
        "updated": "",
        "condition": "installed",
        "version": "1.2.0",
        "unstaged": "version_blocked",
    }
    assert host.slot_bytes("USR-B") == staged_bytes  # the bytes stay
    doc = updatectl(host, "status", "--json").json()
    assert doc["state"] == "idle" and doc["primary"] == "USR-A"
    assert [s["unstaged"] for s in doc["slots"]] == [None, "version_blocked"]
    rollback = updatectl(host, "rollback", "--json")
    assert rollback.code == 7 and "un-staged" in rollback.json()["error"]["message"]
    assert host.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]

    # an unplanned reboot now boots the old version; it is no rollback
    assert host.reboot() == "USR-A"
    gets = image_gets(repo)
    b2 = lock_harness(host, etcd, group, B, notify)

    async def after_reboot() -> None:
        async with running(b2):
            await until(lambda: b2.agent.status().last_error_kind == "version_blocked")

    asyncio.run(after_reboot())
    saved = json.loads((host.state_dir / "state.json").read_text())
    assert (saved["failed_versions"], saved["unrecorded"]) == ([], [])
    stored = FailedVersions(client, group).read()["1.2.0"]
    assert isinstance(stored, FailedRecord) and [f.host for f in stored.failures] == [A]
    assert image_gets(repo) == gets and b2.rebooter.calls == []

    # unblocked: the next check stages the same bytes again (re-hashed, not downloaded)
    assert updatectl(host, "fleet", "unblock", "1.2.0").code == 0
    structlog.reset_defaults()  # updatectl configured logging for its process
    b3 = Harness(host, notify, Off())
    b3.updater.blocks = blocks_for(etcd, group, B)
    with capture_logs() as logs:

        async def unblocked() -> None:
            async with running(b3):
                await until(lambda: b3.agent.status().state == "UPDATED_NEED_REBOOT")

        asyncio.run(unblocked())
    assert "update_restaged" in [e["event"] for e in logs]
    assert image_gets(repo) == gets
    assert b3.agent.status().staged_version == "1.2.0"
    assert host.boot_control().primary().label == "USR-B"  # type: ignore[union-attr]
    assert (host.root / "reboot-required").exists()
    assert slot_record(host, "USR-B")["unstaged"] is None
    assert host.reboot() == "USR-B"  # and it is what boots next


def test_an_unstaged_slot_whose_bytes_changed_is_installed_again(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    lock_config(host, etcd, group)
    repo.publish("1.2.0", usr_images["1.2.0"])
    stage(host, etcd, group, B, notify)
    staged_bytes = host.slot_bytes("USR-B")
    store = FailedVersions(client, group)
    store.record("1.2.0", A, "check_failed", 1.0)
    b = lock_harness(host, etcd, group, B, notify)

    async def blocked() -> None:
        async with running(b):
            await until(lambda: b.agent.status().last_error_kind == "version_blocked")

    asyncio.run(blocked())
    assert host.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]
    offset = host.layout.by_label("USR-B").offset + 4096
    with host.disk.open("r+b") as disk:  # a byte of the un-staged slot rots
        disk.seek(offset)
        old = disk.read(1)
        disk.seek(offset)
        disk.write(bytes([old[0] ^ 0xFF]))
    store.unblock("1.2.0")
    gets = image_gets(repo)
    b2 = Harness(host, notify, Off())
    b2.updater.blocks = blocks_for(etcd, group, B)
    with capture_logs() as logs:

        async def unblocked() -> None:
            async with running(b2):
                await until(lambda: b2.agent.status().state == "UPDATED_NEED_REBOOT", timeout=60)

        asyncio.run(unblocked())
    (refused,) = [e for e in logs if e["event"] == "restage_refused"]
    assert "no longer match" in refused["reason"]
    assert "update_restaged" not in [e["event"] for e in logs]
    assert image_gets(repo) == gets + 1  # downloaded and written again
    assert host.slot_bytes("USR-B") == staged_bytes
    assert host.boot_control().primary().label == "USR-B"  # type: ignore[union-attr]


def test_an_unstaging_cut_short_is_finished_and_is_no_rollback(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    """A power cut after the record and before the boot flags: the record is written first,
    so the next start finishes the job, and never reads the slot as a rollback."""
    repo.publish("1.2.0", usr_images["1.2.0"])
    stage(host, etcd, group, B, notify)
    up = Harness(host, notify, Off()).updater

    def cut(slot: object) -> None:
        raise DiskError("io", "the power went")

    up.slots.boot.mark_bad = cut  # type: ignore[method-assign]
    with pytest.raises(DiskError):
        up.unstage("1.2.0", "version_blocked")
    assert host.boot_control().primary().label == "USR-B"  # type: ignore[union-attr]
    assert slot_record(host, "USR-B")["unstaged"] == "version_blocked"
    assert up.unstage("9.9.9", "version_blocked") is None  # not what it holds: nothing changes

    again = Harness(host, notify, Off())
    assert again.updater.note_rollback() is None
    assert host.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]
    assert not (host.root / "reboot-required").exists()
    saved = json.loads((host.state_dir / "state.json").read_text())
    assert (saved["failed_versions"], saved["unrecorded"]) == ([], [])


# ---- FleetLock hosts, through our server -------------------------------------------------------


@contextlib.contextmanager
def fleetlock_server(client: EtcdClient, group: str) -> Iterator[FleetLockServer]:
    service = FleetLockService(client, {group: 1}, failed=StoredFailedVersions(client, 1))
    settings = ServerSettings(host="127.0.0.1", port=0, groups={group: 1})
    with running_server(FleetLockServer(settings, service), poll_interval_s=0.01) as server:
        yield server


def fleetlock_harness(host: Host, url: str, group: str, hid: str, notify: NotifySocket) -> Harness:
    h = Harness(host, notify, LockStrategy(FleetLock(url, group, timeout_s=10), hid, SystemClock()))
    assert h.updater.blocks is None  # a FleetLock host reads no etcd
    return h


class BrokenStore:
    """The server's failed-version store with etcd gone."""

    def blocked(self, group: str) -> Collection[str]:
        raise LockError("unavailable", "etcd is gone")

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        raise LockError("unavailable", "etcd is gone")


def test_fleetlock_hosts_take_part_in_the_block_through_our_server(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    notify: NotifySocket,
) -> None:
    hb = other_host(tmp_path, "host-b", usr_images, repo)  # etcd lock
    hc = other_host(tmp_path, "host-c", usr_images, repo)  # FleetLock
    lock_config(hb, etcd, group)
    repo.publish("1.2.0", usr_images["1.2.0"])
    stage(hb, etcd, group, B, notify)
    stage(hc, etcd, group, C, notify)

    with fleetlock_server(client, group) as srv:
        # A (FleetLock) reboots into 1.2.0 holding the slot; its trial boot is never blessed
        a0 = fleetlock_harness(host, srv.url, group, A, notify)

        async def install() -> None:
            async with running(a0):
                await until(lambda: len(a0.rebooter.calls) == 1, timeout=60)

        asyncio.run(install())
        assert holders(client, group) == [A]
        assert host.reboot() == "USR-B"
        assert host.reboot() == "USR-A"

        # back on 1.0.0, with the server's store down: the steady-state fails, the slot
        # stays held and the rollback stays pending in the state file
        good = srv.service.failed
        srv.service.failed = BrokenStore()
        a1 = fleetlock_harness(host, srv.url, group, A, notify)
        with capture_logs() as logs:

            async def store_down() -> None:
                async with running(a1):
                    await until(lambda: any(e["event"] == "report_steady_failed" for e in logs))

            asyncio.run(store_down())
        failed = next(e for e in logs if e["event"] == "report_steady_failed")
        assert failed["error_kind"] == "refused" and "etcd_unavailable" in failed["error"]
        assert holders(client, group) == [A]
        saved = json.loads((host.state_dir / "state.json").read_text())
        assert [(u["version"], u["kind"]) for u in saved["unrecorded"]] == [
            ("1.2.0", "rolled_back")
        ]
        assert client.range(failed_key(group, "1.2.0")) is None

        # the store is back: one steady-state request records 1.2.0, then frees the slot
        srv.service.failed = good
        a2 = fleetlock_harness(host, srv.url, group, A, notify)
        with capture_logs() as logs:

            async def come_back() -> None:
                async with running(a2):
                    await until(lambda: any(e["event"] == "reported_steady" for e in logs))

            asyncio.run(come_back())
        events = [e["event"] for e in logs]
        assert events.index("fleetlock_failed_version_recorded") < events.index(
            "fleetlock_unlocked"
        )
        assert events.index("fleetlock_unlocked") < events.index("failed_version_reported")
        kv = client.range(failed_key(group, "1.2.0"))
        assert kv is not None
        assert [(f["host"], f["kind"]) for f in json.loads(kv.value)["failures"]] == [
            (A, "rolled_back")
        ]
        assert holders(client, group, revision=kv.create_revision) == [A]  # recorded first
        assert holders(client, group) == []
        saved = json.loads((host.state_dir / "state.json").read_text())
        assert saved["unrecorded"] == []

        # C (FleetLock, 1.2.0 staged) is refused by the server: 403 -> version_blocked, un-staged
        c = fleetlock_harness(hc, srv.url, group, C, notify)
        with capture_logs() as logs:

            async def c_refused() -> None:
                async with running(c):
                    await until(lambda: c.agent.status().last_error_kind == "version_blocked")
                    await until(lambda: c.agent.status().state == "IDLE")

            asyncio.run(c_refused())
        answer = next(e for e in logs if e["event"] == "fleetlock_request_failed")
        assert (answer["status"], answer["protocol_kind"]) == (403, "version_blocked")
        assert "update_unstaged" in [e["event"] for e in logs]
        assert c.rebooter.calls == [] and holders(client, group) == []
        assert c.agent.blocked_version == "1.2.0"
        assert hc.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]
        assert not (hc.root / "reboot-required").exists()

        # B (etcd lock, 1.2.0 staged) reads the record the server wrote, and refuses too
        b = lock_harness(hb, etcd, group, B, notify)

        async def b_refused() -> None:
            async with running(b):
                await until(lambda: b.agent.status().last_error_kind == "version_blocked")
                await until(lambda: b.agent.status().state == "IDLE")

        asyncio.run(b_refused())
        assert b.rebooter.calls == [] and holders(client, group) == []
        assert hb.boot_control().primary().label == "USR-A"  # type: ignore[union-attr]

        # unblocked: both stage their bytes again; C reboots under the lock, B waits for it
        gets = image_gets(repo)
        assert FailedVersions(client, group).unblock("1.2.0") is not None
        c2 = fleetlock_harness(hc, srv.url, group, C, notify)
        b2 = lock_harness(hb, etcd, group, B, notify)

        async def proceed() -> None:
            async with running(c2):
                await until(lambda: len(c2.rebooter.calls) == 1, timeout=30)
            async with running(b2):
                await until(lambda: b2.agent.status().state == "UPDATED_NEED_REBOOT", timeout=30)
                await until(lambda: b2.agent.strategy.holding is False)  # the slot is C's

        asyncio.run(proceed())
        assert holders(client, group) == [C]
        assert c2.agent.blocked_version == "" and b2.rebooter.calls == []
        assert image_gets(repo) == gets  # neither downloaded it again
