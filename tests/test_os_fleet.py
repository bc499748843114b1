"""A fleet of real machines rolls out updates under the reboot lock.

Two VMs boot the OS image (devtools/osimage.py, each its own machine id) with
``strategy = "lock"``, one slot, a 3-member etcd cluster on this machine's
loopback (10.0.2.2 in the guests). The first machine takes its slot in etcd;
the second through ``updatectl fleetlock serve`` (run on this side, over the
same semaphore): both paths meet on one set of slots. Each runs a small service; a client on this
side sends requests in a loop, failing over between the machines as a load
balancer would. The machines stay up across both scenarios (every guest
reboot is a fresh QEMU on the same disk):

1. 1.1.0 is published: every agent installs it, reboots only while it holds
   the slot, comes back, blesses the slot and gives it back. From etcd's
   revision history, never more than one holder; every machine ends on 1.1.0,
   blessed; the client saw no failed request; ``updatectl fleet status`` on
   this side showed the rollout while it went on.
2. 1.2.0 ships a health check that fails: the first machine to reboot into it
   marks it bad, falls back to 1.1.0, records 1.2.0 as failed for the group in
   etcd before it gives its slot back, and never takes it again; the other
   machine refuses 1.2.0 and never boots it. (This is also the OS image's own
   rollback scenario: the health check in the guest, systemd-boot's counting,
   the agent's report.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devtools import osfleet, osupdate
from devtools.etcd import EtcdCluster, free_port
from devtools.osupdate import World
from devtools.repo_server import RepoServer
from policies.failed import failed_key

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.xdist_group("serial")]

VERSIONS = ("1.0.0", "1.1.0", "1.2.0")  # 1.2.0 ships a failing health check
ROLLOUT_LIMIT_S = 1200.0
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap --mode=root needs root")
    try:
        with osupdate.test_world(VERSIONS, "os-fleet-", TIMES) as w:
            yield w
    finally:
        print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items()))


@dataclass
class Running:
    world: World
    fleet: osfleet.Fleet
    client: osfleet.Client
    settled: list[str]  # the versions the fleet settled on, in order

    def publish(self, version: str) -> None:
        osupdate.publish(self.fleet.repo, self.world.images[version], self.world.key)


def story(fleet: osfleet.Fleet) -> str:
    lines = sorted((s.at, s.node, s.text) for n in fleet.nodes for s in n.timeline)
    return "\n".join(f"{at:6.0f}s {node}: {text}" for at, node, text in lines)


@pytest.fixture(scope="module")
def running(world: World) -> Iterator[Running]:
    """The machines booted on 1.0.0, their services answering, the client calling them."""
    repo = world.tmp / "repo"
    repo.mkdir()
    with (
        EtcdCluster(3) as cluster,
        RepoServer(repo) as server,
        osfleet.fleetlock_server(cluster.endpoints, world.tmp) as fleetlock_url,
    ):
        ports = [free_port() for _ in range(2)]
        fleet = osfleet.Fleet.create(
            world.tmp,
            world.images["1.0.0"],
            cluster,
            server,
            repo,
            count=2,
            ports=ports,
            fleetlock_url=fleetlock_url,
        )
        assert [n.lock for n in fleet.nodes] == ["etcd", "fleetlock"]
        client = osfleet.Client(ports)
        try:
            for node in fleet.nodes:
                node.start()
            assert client.wait_answering(400), story(fleet)
            client.start()
            yield Running(world, fleet, client, [])
        finally:
            client.stop()
            fleet.stop()
            print(f"\n{story(fleet)}\n{client.summary()}")


def test_1_the_fleet_rolls_out_a_release_one_machine_at_a_time_and_the_service_never_stops(
    running: Running,
) -> None:
    started = time.monotonic()
    fleet, client = running.fleet, running.client
    statuses: list[str] = []
    holders_seen: set[str] = set()

    def watch_rollout() -> None:
        code, text = osfleet.fleet_status(fleet.admin_config)
        assert code == 0, text
        statuses.append(text)
        code, text = osfleet.fleet_status(fleet.admin_config, as_json=True)
        assert code == 0, text
        holders_seen.update(h["id"] for h in json.loads(text)["holders"])

    running.publish("1.1.0")
    settled = osfleet.wait_for(
        lambda: fleet.settled_on("1.1.0"), ROLLOUT_LIMIT_S, tick=watch_rollout
    )
    assert all(n.error is None for n in fleet.nodes), story(fleet)
    assert settled, story(fleet)
    running.settled.append("1.1.0")

    # never more than one holder, by etcd's own history; each machine held it once,
    # the one through the FleetLock server as the one in etcd
    peak, changes = fleet.lock_history()
    assert peak == 1, changes
    held = [h for _, h in changes if h]
    assert sorted(h[0] for h in held) == sorted(str(n.host_id) for n in fleet.nodes), changes
    records = fleet.records()  # the etcd-lock machine's (FleetLock hosts publish none)
    # every machine: the new version, blessed, from the other slot
    for node in fleet.nodes:
        slots = [(b.slot, b.version) for b in node.boots()]
        assert slots == [("ROOT-A", "1.0.0")], (node.name, slots)  # QEMU ended by the reboot
        assert (node.slot, node.version, node.blessed) == ("ROOT-B", "1.1.0", True)
    assert {r.booted_version for r in records.values()} == {"1.1.0"}
    assert list(records) == [fleet.nodes[0].host_id]
    assert fleet.nodes[0].host_id != fleet.nodes[1].host_id  # two machine ids
    # some machine always answered
    assert client.failed == 0, client.failures
    assert client.by_version["1.0.0"] > 0 and client.by_version["1.1.0"] > 0
    # the admin saw the rollout as it went: each machine holding the slot in its turn
    assert any("Holding a reboot slot" in s for s in statuses), statuses
    assert holders_seen == {n.host_id for n in fleet.nodes}, (holders_seen, statuses)
    TIMES["rollout"] = time.monotonic() - started


def test_2_a_bad_release_stops_at_the_first_machine(running: Running) -> None:
    if running.settled != ["1.1.0"]:
        pytest.skip("scenario 1 did not settle the fleet on 1.1.0")
    started = time.monotonic()
    fleet, client = running.fleet, running.client
    _, before = fleet.lock_history()
    running.publish("1.2.0")

    def stopped() -> bool:
        first = [n for n in fleet.nodes if n.saw("booted ROOT-A version 1.2.0")]
        if len(first) != 1:
            return False
        (bad,) = first
        (other,) = [n for n in fleet.nodes if n is not bad]
        return (
            (bad.slot, bad.version, bad.blessed) == ("ROOT-B", "1.1.0", True)
            and bad.saw("failed_version_reported")
            and bad.saw("reboot_lock_released")
            # its first check back on 1.1.0: it looks at 1.2.0 again and leaves it
            and bad.saw("update_checked version=1.2.0 booted_version=1.1.0 available=false")
            and (
                other.saw("reboot_refused_version_blocked")
                or other.saw("install_refused_version_blocked")
            )
            and not fleet.holders()
        )

    assert osfleet.wait_for(stopped, ROLLOUT_LIMIT_S), story(fleet)
    (bad,) = [n for n in fleet.nodes if n.saw("booted ROOT-A version 1.2.0")]
    (other,) = [n for n in fleet.nodes if n is not bad]

    # The first machine: on trial in 1.2.0, its health check failed, marked bad, rebooted
    # itself; back on 1.1.0 it reported the rollback and recorded 1.2.0 for the group.
    trial_line = "booted ROOT-A version 1.2.0"
    trial = [s.text for s in bad.timeline]
    after = trial[trial.index(next(t for t in trial if trial_line in t)) :]
    assert any("health_check_failed check=50-app-answers" in t for t in after), story(fleet)
    assert any("updater-mark-good: marked_bad" in t for t in after), story(fleet)
    assert any("rollback_detected failed_version=1.2.0" in t for t in after), story(fleet)
    assert not any("install_started version=1.2.0" in t for t in after[1:]), story(fleet)
    trial_boot = bad.boots()[-1]  # its last boot that ended: the trial of 1.2.0
    assert (trial_boot.slot, trial_boot.version) == ("ROOT-A", "1.2.0"), trial_boot.summary()
    assert trial_boot.facts["entry"].startswith("updater-root-a+"), trial_boot.facts  # counted
    assert trial_boot.facts["initrd-version"] == "1.2.0"  # ROOT-A's boot files are 1.2.0's
    mark_good = [e.name for e in trial_boot.events if e.unit == "updater-mark-good"]
    assert "marked_bad" in mark_good and "marked_good" not in mark_good, trial_boot.summary()
    assert trial_boot.ended == "reboot", trial_boot.summary()  # the guest rebooted itself
    # back on 1.1.0, the agent looks at 1.2.0 again and knows it failed here
    assert bad.saw("update_checked version=1.2.0 booted_version=1.1.0 available=false"), story(
        fleet
    )

    # etcd: the record names the machine; it was written while that machine still held
    # its slot (the other could not take it before the block was visible)
    client_etcd = fleet.client()
    try:
        kv = client_etcd.range(failed_key(osfleet.GROUP, "1.2.0"))
        assert kv is not None, story(fleet)
        doc = json.loads(kv.value)
        assert [f["host"] for f in doc["failures"]] == [bad.host_id], doc
        assert doc["failures"][0]["kind"] == "check_failed", doc
    finally:
        client_etcd.close()
    peak, changes = fleet.lock_history()
    assert peak == 1, changes
    new = changes[len(before) :]
    held = [h for _, h in new if h]
    assert held == [(bad.host_id,)], changes  # only the first machine ever held it
    took = next(k for k, (_, h) in enumerate(new) if h == (bad.host_id,))
    released_at = new[took + 1][0]  # the next change: nobody holds it
    assert kv.create_revision < released_at, (kv.create_revision, changes)

    # The other machine refused 1.2.0 and never booted it; both answer on 1.1.0.
    assert [(b.slot, b.version) for b in other.boots()] == [("ROOT-A", "1.0.0")]
    assert (other.slot, other.version) == ("ROOT-B", "1.1.0")
    assert not other.saw("booted ROOT-A version 1.2.0")
    if other.saw("update_staged version=1.2.0"):  # it had staged it before the block:
        assert other.saw("update_unstaged version=1.2.0"), story(fleet)  # not the next boot
    code, text = osfleet.fleet_status(fleet.admin_config)
    assert code == 0 and "1.2.0" in text, text
    status = json.loads(osfleet.fleet_status(fleet.admin_config, as_json=True)[1])
    (failed,) = status["failed_versions"]
    assert failed["version"] == "1.2.0" and failed["blocked"], failed
    assert client.failed == 0, client.failures
    TIMES["bad release"] = time.monotonic() - started
