"""A fleet of real machines rolls out an update under the reboot lock.

Two VMs boot the OS image (devtools/osimage.py, each its own machine id) with
``strategy = "lock"``, one slot, a 3-member etcd cluster on this machine's
loopback (10.0.2.2 in the guests). Each runs a small service; a client on this
side sends requests in a loop, failing over between the machines as a load
balancer would. A release is published: every agent installs it, reboots only
while it holds the slot, comes back, blesses the slot, and gives it back.

Asserted: from etcd's revision history, never more than one holder; every
machine ends on the new version, blessed; the client saw no failed request;
``updatectl fleet status`` on this side showed the rollout while it went on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import osfleet, osimage, osupdate
from devtools.etcd import EtcdCluster, free_port
from devtools.gpgkeys import SigningKey
from devtools.repo_server import RepoServer

pytestmark = [pytest.mark.slow, pytest.mark.root]

VERSIONS = ("1.0.0", "1.1.0")
ROLLOUT_LIMIT_S = 1200.0


@dataclass
class World:
    key: SigningKey
    images: dict[str, osimage.OsImage]
    tmp: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap --mode=root needs root")
    with osupdate.cached_signing_key() as key:
        keyring = key.public_key.read_bytes()
        images = {
            v: osimage.build_image(osupdate.test_settings(v, keyring=keyring)) for v in VERSIONS
        }
        tmp = Path(tempfile.mkdtemp(prefix="os-fleet-"))
        try:
            yield World(key, images, tmp)
        finally:
            shutil.rmtree(tmp)


def story(fleet: osfleet.Fleet) -> str:
    lines = sorted((s.at, s.node, s.text) for n in fleet.nodes for s in n.timeline)
    return "\n".join(f"{at:6.0f}s {node}: {text}" for at, node, text in lines)


def test_a_fleet_rolls_out_a_release_one_machine_at_a_time_and_the_service_never_stops(
    world: World,
) -> None:
    started = time.monotonic()
    repo = world.tmp / "repo"
    repo.mkdir()
    with EtcdCluster(3) as cluster, RepoServer(repo) as server:
        ports = [free_port() for _ in range(2)]
        fleet = osfleet.Fleet.create(
            world.tmp, world.images["1.0.0"], cluster, server, repo, count=2, ports=ports
        )
        client = osfleet.Client(ports)
        statuses: list[str] = []

        def watch_rollout() -> None:
            code, text = osfleet.fleet_status(fleet.admin_config)
            assert code == 0, text
            statuses.append(text)

        try:
            for node in fleet.nodes:
                node.start()
            assert client.wait_answering(400), story(fleet)
            client.start()
            osupdate.publish(repo, world.images["1.1.0"], world.key)
            settled = osfleet.wait_for(
                lambda: fleet.settled_on("1.1.0"), ROLLOUT_LIMIT_S, tick=watch_rollout
            )
        finally:
            client.stop()
            fleet.stop()
        print(f"\n{story(fleet)}\n{client.summary()}")
        assert all(n.error is None for n in fleet.nodes), story(fleet)
        assert settled, story(fleet)

        # never more than one holder, by etcd's own history; each machine held it once
        peak, changes = fleet.lock_history()
        assert peak == 1, changes
        held = [h for _, h in changes if h]
        records = fleet.records()
        assert sorted(h[0] for h in held) == sorted(records), changes
        # every machine: the new version, blessed, from the other slot; no reboot out of turn
        for node in fleet.nodes:
            slots = [(b.slot, b.version) for b in node.boots()]
            assert slots[-1] == ("ROOT-B", "1.1.0"), (node.name, slots)
            assert ("ROOT-A", "1.0.0") in slots, (node.name, slots)
        assert {r.booted_version for r in records.values()} == {"1.1.0"}
        assert len({r.id for r in records.values()}) == 2  # two machine ids
        # some machine always answered
        assert client.failed == 0, client.failures
        assert client.by_version["1.0.0"] > 0 and client.by_version["1.1.0"] > 0
        # the admin saw the rollout as it went: a holder, a host waiting with 1.1.0 staged
        assert any("Holding a reboot slot" in s for s in statuses), statuses
        assert any("Staged, waiting to reboot" in s for s in statuses), statuses
    print(f"fleet rollout: {time.monotonic() - started:.0f}s")
