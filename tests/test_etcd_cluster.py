"""The etcd lock on a 3-member cluster with members killed: it fails over to a
live endpoint, and when no endpoint can answer it says so quickly, never "granted"."""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

import devtools.etcd
from devtools.etcd import EtcdCluster, EtcdNode, free_port
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from updater.errors import LockError

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as c:
        yield c


@pytest.fixture(autouse=True)
def _all_members_back(cluster: EtcdCluster) -> Iterator[None]:
    yield
    for i, m in enumerate(cluster.members):
        if not m.running:
            cluster.restart(i, wait=False)
    cluster.wait_all_healthy()


def kill_and_settle(cluster: EtcdCluster, index: int) -> None:
    """Kill a member and wait for the others to elect a leader if it was the one.

    During an election every request fails (unavailable): that is the right
    answer, but not what these tests look at.
    """
    cluster.kill(index)
    for m in cluster.members:
        if m.running:
            cluster.wait_healthy(m)


@pytest.fixture
def group() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def closed() -> str:
    """An endpoint where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def failed_endpoints(logs: list[MutableMapping[str, Any]]) -> list[Any]:
    return [e["endpoint"] for e in logs if e["event"] == "etcd_endpoint_failed"]


def test_fails_over_past_dead_first_endpoints(cluster: EtcdCluster, group: str) -> None:
    kill_and_settle(cluster, 0)
    dead = closed()
    endpoints = (dead, *cluster.endpoints)  # nothing there, a killed member, then two live
    client = EtcdClient(EtcdSettings(endpoints=endpoints, timeout_s=2))
    lock = EtcdLock(client, group, 1)
    with capture_logs() as logs:
        assert lock.acquire("a")
    assert failed_endpoints(logs) == [dead, cluster.endpoints[0]]
    assert client.endpoint == cluster.endpoints[1]
    with capture_logs() as logs:
        assert not lock.acquire("b")
        lock.release("a")
    assert failed_endpoints(logs) == []  # the live endpoint stays current


def test_fails_over_past_a_hanging_endpoint(
    cluster: EtcdCluster, group: str, blackhole: str
) -> None:
    client = EtcdClient(EtcdSettings(endpoints=(blackhole, *cluster.endpoints), timeout_s=0.5))
    lock = EtcdLock(client, group, 1)
    t0 = time.monotonic()
    with capture_logs() as logs:
        assert lock.acquire("a")
    assert failed_endpoints(logs) == [blackhole]
    assert time.monotonic() - t0 < 3


def test_holder_releases_after_its_endpoint_died(cluster: EtcdCluster, group: str) -> None:
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=cluster.endpoints, timeout_s=2)), group, 1)
    assert lock.acquire("a")
    kill_and_settle(cluster, 0)  # the endpoint it used
    lock.release("a")
    status = lock.status()
    assert status is not None
    assert status.holders == ()


def test_all_endpoints_dead_is_unavailable_quickly(group: str, blackhole: str) -> None:
    settings = EtcdSettings(endpoints=(closed(), blackhole, closed()), timeout_s=0.5)
    lock = EtcdLock.from_settings(settings, group, 1)
    for op in (lambda: lock.acquire("a"), lambda: lock.release("a"), lock.status):
        t0 = time.monotonic()
        with pytest.raises(LockError) as err:
            op()
        assert err.value.kind == "unavailable"
        assert time.monotonic() - t0 < 2  # one timeout, two refusals
        for endpoint in settings.endpoints:
            assert endpoint in err.value.message


def test_no_quorum_is_unavailable_never_granted(cluster: EtcdCluster, group: str) -> None:
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=cluster.endpoints, timeout_s=1)), group, 2)
    assert lock.acquire("before")
    cluster.kill(0)
    cluster.kill(1)
    # The last member is up but alone: it cannot serve a linearizable read or
    # commit a transaction, so neither a new holder nor the old one gets a yes.
    for holder in ("before", "new"):
        t0 = time.monotonic()
        with pytest.raises(LockError) as err:
            lock.acquire(holder)
        assert err.value.kind == "unavailable"
        assert time.monotonic() - t0 < 5
    with pytest.raises(LockError):
        lock.release("before")
    cluster.restart(0, wait=False)
    cluster.restart(1, wait=False)
    cluster.wait_all_healthy()
    status = lock.status()
    assert status is not None
    assert [h.id for h in status.holders] == ["before"]  # nothing half-done
    assert lock.acquire("new")


# ---- the test servers themselves -------------------------------------------------------------


def test_etcd_is_gone_after_a_failing_test() -> None:
    with pytest.raises(RuntimeError), EtcdNode() as node:
        procs = [m.proc for m in node.members]
        data = node.dir
        assert data.exists()
        raise RuntimeError("the test failed")
    assert all(p is not None and p.poll() is not None for p in procs)
    assert not data.exists()


def test_etcd_start_retries_when_a_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        ports = iter([taken.getsockname()[1]])
        real = devtools.etcd.free_port
        monkeypatch.setattr(devtools.etcd, "free_port", lambda: next(ports, None) or real())
        with EtcdNode() as node:
            assert taken.getsockname()[1] not in (
                node.members[0].client_port,
                node.members[0].peer_port,
            )
            assert EtcdClient(EtcdSettings(endpoints=node.endpoints)).range("x") is None
