"""The reboot policy wired into the agent, on real etcd and a FleetLock server:
hosts take turns for the slots, never reboot without the lock, give it back
once steady; the lock admin CLI; fleet status with leases."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import cast

import pytest
from structlog.testing import capture_logs

from devtools.etcd import EtcdNode
from devtools.fleetlock_server import Fault as FleetFault
from devtools.fleetlock_server import FleetLockServer
from devtools.host import Host, provision
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.fleet import HOSTS_PREFIX, FleetPublisher, HostRecord, read_hosts, summarize
from policies.fleetlock import FleetLock
from policies.semaphore import Holder, SemaphoreStatus, semaphore_key
from policies.strategy import LockStrategy
from tests.conftest import HOST_SLOT_SIZE, NotifySocket, Repo, until, updatectl, wait_for
from tests.test_agent import Counted, Harness, running, saved_machine
from updater.clock import SystemClock
from updater.errors import LockError
from updater.fleetreport import EtcdFleetReporter


@pytest.fixture
def group(request: pytest.FixtureRequest) -> str:
    return "g-" + str(request.node.name).replace("_", "-")[:40].strip("-").replace(
        "[", "."
    ).replace("]", "")


def client(etcd: EtcdNode) -> EtcdClient:
    return EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,)))


def lock_config(host: Host, etcd: EtcdNode, group: str, slots: int = 1) -> None:
    host.config.write_text(
        host.config.read_text()
        + f"""
[reboot]
strategy = "lock"
lock = "etcd"
group = "{group}"
retry_s = 1

[etcd]
endpoints = ["{etcd.endpoint}"]
slots = {slots}
"""
    )


def second_host(tmp_path: Path, usr_images: dict[str, Path], repo: Repo) -> Host:
    return provision(
        tmp_path / "host2",
        slot_size=HOST_SLOT_SIZE,
        first_image=usr_images["1.0.0"],
        first_version="1.0.0",
        repo_url=repo.url,
        keyring=repo.key.public_key,
    )


# ---- two hosts, one slot ----------------------------------------------------------------------


def test_two_hosts_take_turns_for_one_slot(
    etcd: EtcdNode,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    notify: NotifySocket,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    hosts = {"aaaa": host, "bbbb": second_host(tmp_path, usr_images, repo)}

    policies: dict[str, Counted] = {}

    def harness(hid: str) -> Harness:
        strategy = LockStrategy(EtcdLock(client(etcd), group, 1), hid, clock=SystemClock())
        policies[hid] = Counted(strategy)
        h = Harness(hosts[hid], notify, policies[hid])
        reporter = EtcdFleetReporter(FleetPublisher(client(etcd), hid, 60), hid, group)
        reporter.hostname = f"node-{hid}"
        h.agent.fleet = reporter
        return h

    sem = EtcdLock(client(etcd), group, 1)
    agents = {hid: harness(hid) for hid in hosts}

    async def scenario() -> None:
        tasks = {hid: asyncio.create_task(h.agent.run(h.stop)) for hid, h in agents.items()}
        await until(lambda: any(h.rebooter.calls for h in agents.values()))
        first = next(hid for hid, h in agents.items() if h.rebooter.calls)
        second = next(hid for hid in agents if hid != first)
        await until(lambda: policies[second].no >= 3)  # several retries of the other host
        assert agents[second].rebooter.calls == []  # never without the lock
        st = sem.status()
        assert st is not None and [x.id for x in st.holders] == [first]
        summary = summarize(read_hosts(client(etcd)), st, time.time())
        assert summary.waiting == (f"node-{second}",)
        assert [x.hostname for x in summary.holders] == [f"node-{first}"]

        # the first host reboots into its update and comes back healthy
        agents[first].stop.set()
        await tasks[first]
        assert hosts[first].reboot() == "USR-B"
        agents[first] = harness(first)
        tasks[first] = asyncio.create_task(agents[first].agent.run(agents[first].stop))
        await until(lambda: bool(agents[first].statuses))
        assert agents[second].rebooter.calls == []  # still held across the reboot
        await agents[first].agent.mark_good()  # steady: the slot is released ...
        await until(lambda: bool(agents[second].rebooter.calls))  # ... and taken over
        st = sem.status()
        assert st is not None and [x.id for x in st.holders] == [second]
        for h in agents.values():
            h.stop.set()
        await asyncio.gather(*tasks.values())

    asyncio.run(scenario())


def test_lock_unavailable_never_reboots(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    """etcd unreachable when the lock is needed: retry with backoff, never reboot."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    dead = EtcdClient(EtcdSettings(endpoints=("http://127.0.0.1:9",), timeout_s=0.3))
    policy = Counted(LockStrategy(EtcdLock(dead, "g", 1), "aaaa", clock=_clock()))
    h = Harness(host, notify, policy)

    async def scenario() -> None:
        async with running(h):
            await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
            await until(lambda: policy.no >= 3)  # asked, and failed, again and again

    asyncio.run(scenario())
    assert h.rebooter.calls == []
    st = h.agent.status()
    assert st.state == "UPDATED_NEED_REBOOT" and st.last_error_kind == "unavailable"
    assert saved_machine(host)["reboot_refusals"] >= 1  # counted: the retries back off


def test_fleetlock_server_decides(
    host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    with FleetLockServer(slots=1) as server:
        server.add_fault(FleetFault.server_error())
        lock = FleetLock(server.base_url, "workers", timeout_s=2)
        policy = Counted(LockStrategy(lock, "aaaa", clock=_clock()))
        h = Harness(host, notify, policy)

        async def scenario() -> None:
            async with running(h):
                await until(lambda: h.agent.status().state == "UPDATED_NEED_REBOOT")
                await until(lambda: policy.no >= 2)
                assert h.rebooter.calls == []  # a 500 is "no"
                server.clear_faults()
                await until(lambda: len(h.rebooter.calls) == 1)

        asyncio.run(scenario())
        assert server.holders("workers") == ["aaaa"]
        pre = [r for r in server.requests if r.path.endswith("/v1/pre-reboot")]
        assert pre and all(r.headers.get("fleet-lock-protocol") == "true" for r in pre)


def _clock() -> SystemClock:
    return SystemClock()


# ---- the lock admin CLI ------------------------------------------------------------------------


def test_lock_cli(etcd: EtcdNode, group: str, host: Host) -> None:
    lock_config(host, etcd, group, slots=1)
    st = updatectl(host, "lock", "status", "--json")
    assert st.code == 0 and st.json() is None  # no semaphore yet
    assert updatectl(host, "lock", "lock", "host-1").code == 0
    busy = updatectl(host, "lock", "lock", "host-2", "--json")
    assert busy.code == 7 and busy.json()["error"]["kind"] == "no_free_slot"
    doc = updatectl(host, "lock", "status", "--json").json()
    assert doc["total_slots"] == 1 and [h["id"] for h in doc["holders"]] == ["host-1"]
    assert doc["holders"][0]["age_s"] >= 0
    text = updatectl(host, "lock", "status").out
    assert f"Group {group}: 1 of 1 slots held (0 free)" in text and "host-1  held for" in text

    assert updatectl(host, "lock", "set-max", "2").code == 0
    assert updatectl(host, "lock", "lock", "host-2").code == 0
    assert updatectl(host, "lock", "set-max", "1").code == 0  # holders keep their slots
    doc = updatectl(host, "lock", "status", "--json").json()
    assert doc["total_slots"] == 1 and len(doc["holders"]) == 2
    assert "more holders than slots" in updatectl(host, "lock", "status").out
    assert updatectl(host, "lock", "lock", "host-3").code == 7  # no one new until below
    assert updatectl(host, "lock", "unlock", "host-1").code == 0  # a dead holder freed
    assert updatectl(host, "lock", "lock", "host-3").code == 7  # still 1 held of 1
    assert updatectl(host, "lock", "unlock", "host-2").code == 0
    assert updatectl(host, "lock", "lock", "host-3").code == 0


def test_malformed_semaphore_is_never_overwritten(etcd: EtcdNode, group: str, host: Host) -> None:
    lock_config(host, etcd, group)
    key = semaphore_key(group)
    etcd.etcdctl("put", key, '{"total_slots": "two", "holders": []}')
    for args in (("lock", "status"), ("lock", "lock", "h"), ("lock", "set-max", "3")):
        r = updatectl(host, *args, "--json")
        assert r.code == 10 and r.json()["error"]["kind"] == "malformed", args
        assert key in r.err
    assert "two" in etcd.etcdctl("get", key, "--print-value-only")
    assert updatectl(host, "lock", "repair", "2").code == 0  # the explicit repair
    assert updatectl(host, "lock", "status", "--json").json()["total_slots"] == 2


# ---- fleet status ------------------------------------------------------------------------------


def record(hid: str, **kw: object) -> HostRecord:
    base = dict(
        id=hid,
        hostname=f"node-{hid}",
        group="g",
        booted_slot="USR-A",
        booted_version="1.0.0",
        state="IDLE",
        staged_version="",
        last_check=1,
        last_error_kind="",
        lock_held=False,
        updated=1.0,
    )
    base.update(kw)
    return HostRecord(**base)  # type: ignore[arg-type]


def test_fleet_records_live_under_a_lease(etcd: EtcdNode) -> None:
    c = client(etcd)
    pub = FleetPublisher(c, "lease-test", ttl_s=2)
    pub.publish(record("lease-test"))
    assert [h.id for h in read_hosts(c) if h.id == "lease-test"] == ["lease-test"]
    pub.publish(record("lease-test", state="CHECKING_FOR_UPDATE"))  # renewed, updated
    assert [h.state for h in read_hosts(c) if h.id == "lease-test"] == ["CHECKING_FOR_UPDATE"]
    # the host stops: its record goes by itself
    wait_for(lambda: [h for h in read_hosts(c) if h.id == "lease-test"] == [], timeout=10)
    pub.publish(record("lease-test"))  # and comes back with a fresh lease
    assert [h.id for h in read_hosts(c) if h.id == "lease-test"] == ["lease-test"]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def test_hostile_fleet_records_are_skipped_never_a_crash(etcd: EtcdNode) -> None:
    # anyone who can write etcd can write these; json.loads raised RecursionError
    c = client(etcd)
    good = record("hostile-good")
    hostile = {
        "hostile-deep": b"[" * 2000,
        "hostile-deep-field": good.encode().replace(b'"state":"IDLE"', b'"state":' + b"[" * 2000),
        "hostile-nan": good.encode().replace(b'"updated":1.0', b'"updated":NaN'),
        "hostile-inf": good.encode().replace(b'"updated":1.0', b'"updated":1e999'),
        "hostile-bool": good.encode().replace(b'"last_check":1', b'"last_check":true'),
        "hostile-utf8": b'{"id":"\xff"}',
    }
    c.call("kv/put", {"key": _b64(HOSTS_PREFIX + "hostile-good"), "value": _b64(good.encode())})
    for host_id, value in hostile.items():
        c.call("kv/put", {"key": _b64(HOSTS_PREFIX + host_id), "value": _b64(value)})
    with capture_logs() as logs:
        hosts = [h.id for h in read_hosts(c) if h.id.startswith("hostile")]
    assert hosts == ["hostile-good"]
    skipped = {e["key"] for e in logs if e["event"] == "fleet_record_unreadable"}
    assert {HOSTS_PREFIX + k for k in hostile} <= skipped
    for host_id in ("hostile-good", *hostile):
        c.call("kv/deleterange", {"key": _b64(HOSTS_PREFIX + host_id)})


def test_summarize() -> None:
    hosts = [
        record("a", booted_version="1.1.0"),
        record("b", state="UPDATED_NEED_REBOOT", staged_version="1.1.0"),
        record("c", state="UPDATED_NEED_REBOOT", staged_version="1.1.0", lock_held=True),
        record("d", last_error_kind="hash_mismatch"),
    ]
    sem = SemaphoreStatus("g", "k", 1, (Holder("c", 100.0), Holder("zz", None)), 5)
    s = summarize(hosts, sem, now=160.0)
    assert s.hosts == 4 and s.versions == {"1.0.0": 3, "1.1.0": 1}
    assert s.staged == {"1.1.0": 2} and s.waiting == ("node-b",)
    assert [(h.hostname, h.age_s) for h in s.holders] == [("node-c", 60.0), (None, None)]
    assert s.errors == (("node-d", "hash_mismatch"),)


def test_fleet_status_cli(etcd: EtcdNode, group: str, host: Host) -> None:
    lock_config(host, etcd, group)
    c = client(etcd)
    FleetPublisher(c, "cli-a", 60).publish(record("cli-a", group=group))
    FleetPublisher(c, "cli-b", 60).publish(
        record("cli-b", group=group, booted_version="1.1.0", last_error_kind="timeout")
    )
    assert updatectl(host, "lock", "lock", "cli-a").code == 0
    doc = updatectl(host, "fleet", "status", "--json").json()
    assert doc["versions"]["1.1.0"] >= 1 and doc["total_slots"] == 1
    assert [h["hostname"] for h in doc["holders"]] == ["node-cli-a"]
    text = updatectl(host, "fleet", "status").out
    assert "Holding a reboot slot:" in text and "node-cli-a" in text
    assert "node-cli-b" in text and "timeout" in text
    json.dumps(doc)


class _LeaseAnswers:
    """An etcd client stand-in whose lease answers are whatever the test says."""

    def __init__(self, grant: dict[str, object], keepalive: dict[str, object]) -> None:
        self.answers = {"lease/grant": grant, "lease/keepalive": keepalive, "kv/put": {}}
        self.calls: list[str] = []

    def call(self, method: str, body: dict[str, object]) -> dict[str, object]:
        self.calls.append(method)
        return self.answers[method]


@pytest.mark.parametrize(
    "grant",
    [{}, {"ID": None}, {"ID": "x"}, {"ID": [1]}, {"ID": "0"}, {"ID": True}, {"ID": "9" * 5000}],
)
def test_a_bad_lease_grant_is_a_lock_error(grant: dict[str, object]) -> None:
    fake = _LeaseAnswers(grant, {})
    pub = FleetPublisher(cast(EtcdClient, fake), "h", ttl_s=30)
    with pytest.raises(LockError) as err:
        pub.publish(record("h"))
    assert err.value.kind == "malformed"
    assert fake.calls == ["lease/grant"]  # nothing written without a lease


@pytest.mark.parametrize(
    "keepalive",
    [{}, {"result": None}, {"result": []}, {"result": {"TTL": "x"}}, {"result": {"TTL": "-1"}}],
)
def test_a_bad_keepalive_answer_takes_a_new_lease(keepalive: dict[str, object]) -> None:
    fake = _LeaseAnswers({"ID": "7587"}, keepalive)
    pub = FleetPublisher(cast(EtcdClient, fake), "h", ttl_s=30)
    pub.publish(record("h"))
    pub.publish(record("h"))
    assert fake.calls == ["lease/grant", "kv/put", "lease/keepalive", "lease/grant", "kv/put"]
