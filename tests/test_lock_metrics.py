"""Lock metrics on each agent (updater/lockmetrics.py): whether this host holds a
reboot slot and for how long, how long it has waited, and failed lock requests by
kind; around the real etcd lock and through the composition root."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.etcd import EtcdNode, free_port
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.strategy import LockStrategy
from updater import compose, config
from updater.clock import SystemClock
from updater.errors import LockError
from updater.lockmetrics import MeteredLock
from updater.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
    }


class Ticks:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


def test_held_waiting_and_released(etcd: EtcdNode, client: EtcdClient, group: str) -> None:
    a_metrics, b_metrics = Metrics(), Metrics()
    a = MeteredLock(EtcdLock(client, group, 1), a_metrics, group)
    b = MeteredLock(EtcdLock(client, group, 1), b_metrics, group)
    g = (("group", group),)
    assert a.name == "etcd"
    assert a.acquire("host-a")
    assert not b.acquire("host-b")
    sa, sb = samples(a_metrics), samples(b_metrics)
    assert sa[("updater_lock_slot_held", g)] == 1 and sa[("updater_lock_waiting_seconds", g)] == 0
    assert sa[("updater_lock_held_seconds", g)] >= 0
    assert sb[("updater_lock_slot_held", g)] == 0 and sb[("updater_lock_held_seconds", g)] == 0
    waited = sb[("updater_lock_waiting_seconds", g)]
    assert not b.acquire("host-b")  # still waiting: since the first refusal, not reset
    assert samples(b_metrics)[("updater_lock_waiting_seconds", g)] >= waited
    a.release("host-a")
    assert b.acquire("host-b")
    sa, sb = samples(a_metrics), samples(b_metrics)
    assert sa[("updater_lock_slot_held", g)] == 0 and sa[("updater_lock_held_seconds", g)] == 0
    assert sb[("updater_lock_slot_held", g)] == 1 and sb[("updater_lock_waiting_seconds", g)] == 0


def test_since_is_kept_while_held() -> None:
    m, clock = Metrics(), Ticks()
    m.lock_state("g", held=True, waiting=False, now=clock())
    m.lock_state("g", held=True, waiting=False, now=clock())  # asked again: same slot
    assert since(m) == (101.0, None)
    m.lock_state("g", held=False, waiting=True, now=clock())
    m.lock_state("g", held=False, waiting=True, now=clock())
    assert since(m) == (None, 103.0)


def since(m: Metrics) -> tuple[float | None, float | None]:
    return m._lock_times["g"]


def test_errors_by_kind_and_nothing_taken(etcd: EtcdNode, client: EtcdClient, group: str) -> None:
    metrics = Metrics()
    dead = EtcdClient(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",), timeout_s=1))
    lock = MeteredLock(EtcdLock(dead, group, 1), metrics, group)
    with pytest.raises(LockError) as err:
        lock.acquire("host-a")
    assert err.value.kind == "unavailable"
    with pytest.raises(LockError):
        lock.release("host-a")
    s = samples(metrics)
    assert s[("updater_lock_errors_total", (("group", group), ("kind", "unavailable")))] == 2
    assert s[("updater_lock_slot_held", (("group", group),))] == 0
    assert EtcdLock(client, group, 1).status() is None  # no semaphore was made
    dead.close()


def test_the_agent_counts_its_lock(etcd: EtcdNode, tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[reboot]\nstrategy = "lock"\n[etcd]\nendpoints = ["{etcd.endpoints[0]}"]\n')
    strategy = compose.reboot_strategy(config.load(f), SystemClock(), metrics=Metrics())
    assert isinstance(strategy, LockStrategy) and isinstance(strategy.lock, MeteredLock)
    assert isinstance(strategy.lock.lock, EtcdLock)
    bare = compose.reboot_strategy(config.load(f), SystemClock())
    assert isinstance(bare, LockStrategy) and isinstance(bare.lock, EtcdLock)
