"""The safety test: never more hosts rebooting than the group has slots.

Twenty agent processes (``devtools.lock_agent``: the real EtcdLock, the
reboot replaced by holding for 50-300 ms and recording the interval) contend
for a group with 2 slots on a 3-member etcd cluster, every agent given all
three endpoints, while a chaos thread SIGKILLs and restarts members at random
moments, one at a time. Then an observer that trusts neither the agents nor
the lock code checks:

(a) from the recorded intervals, that no instant had more than 2 holders;
(b) from etcd's history (every revision of the semaphore, read back with
    ``Range(revision=R)``), that no stored value ever listed more than 2
    holders of 2 slots, that the holders' start-time keys always matched the
    holders, and that each agent was added exactly once per round;
(c) that every agent finished all its rounds;
(d) that no slot is held at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.etcd import EtcdCluster
from policies.etcdlock import (
    EtcdClient,
    EtcdSettings,
    Semaphore,
    holders_prefix,
    semaphore_key,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd"),
]

ROOT = Path(__file__).resolve().parent.parent
AGENTS = 20
ROUNDS = 5
SLOTS = 2
GROUP = "safety"
HOLD_MS = (50, 300)
RUN_TIMEOUT_S = 150.0  # the whole contention phase; normally 20-40 s
MIN_KILLS = 3


@dataclass(frozen=True)
class AgentRun:
    id: str
    returncode: int
    intervals: list[tuple[int, int]]
    done: bool
    log: str


class Chaos(threading.Thread):
    """SIGKILL a random member, leave it down a moment, restart it, wait until it is healthy."""

    def __init__(self, cluster: EtcdCluster, seed: int) -> None:
        super().__init__(name="etcd-chaos", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.2, 1.0)):
                i = self.rng.randrange(len(self.cluster.members))
                self.cluster.kill(i)
                self.kills.append(i)
                self.stop.wait(self.rng.uniform(0.1, 0.6))
                self.cluster.restart(i, wait=False)
                self.cluster.wait_all_healthy(timeout_s=30)  # never two down at once
        except BaseException as exc:
            self.error = exc


def start_agent(
    cluster: EtcdCluster, index: int, out_dir: Path, seed: int
) -> tuple[str, subprocess.Popen[bytes], Path, Path]:
    agent_id = f"host-{index:02d}"
    endpoints = list(cluster.endpoints)
    endpoints = endpoints[index % 3 :] + endpoints[: index % 3]  # spread the first choice
    out, log = out_dir / f"{agent_id}.intervals", out_dir / f"{agent_id}.log"
    argv = [
        sys.executable, "-m", "devtools.lock_agent",
        "--id", agent_id, "--out", str(out), "--endpoints", ",".join(endpoints),
        "--group", GROUP, "--slots", str(SLOTS), "--rounds", str(ROUNDS),
        "--hold-ms", str(HOLD_MS[0]), str(HOLD_MS[1]), "--timeout-s", "1",
        "--deadline", str(time.time() + RUN_TIMEOUT_S), "--seed", str(seed + index),
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return agent_id, proc, out, log


def read_run(agent_id: str, returncode: int, out: Path, log: Path) -> AgentRun:
    intervals, done = [], False
    for line in out.read_text().splitlines() if out.exists() else []:
        if line.startswith("done"):
            done = True
        else:
            start, end = line.split()
            intervals.append((int(start), int(end)))
    return AgentRun(agent_id, returncode, intervals, done, log.read_text(errors="replace"))


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    """The most intervals that share one instant (touching ends do not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = current = 0
    for _, delta in events:  # at equal times -1 sorts first: an end before a start
        current += delta
        peak = max(peak, current)
    return peak


def test_never_more_holders_than_slots_while_etcd_members_die(tmp_path: Path) -> None:
    seed = int(os.environ.get("LOCK_SAFETY_SEED", random.randrange(1 << 30)))
    print(f"LOCK_SAFETY_SEED={seed}")
    with EtcdCluster(3) as cluster:
        chaos = Chaos(cluster, seed)
        agents: list[tuple[str, subprocess.Popen[bytes], Path, Path]] = []
        t0 = time.monotonic()
        try:
            agents = [start_agent(cluster, i, tmp_path, seed) for i in range(AGENTS)]
            chaos.start()
            for _, proc, _, _ in agents:
                left = RUN_TIMEOUT_S + 10 - (time.monotonic() - t0)
                try:
                    proc.wait(timeout=max(0.1, left))
                except subprocess.TimeoutExpired:
                    break  # the rest are killed below and reported as unfinished
        finally:
            chaos.stop.set()
            chaos.join(60)
            for _, proc, _, _ in agents:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        elapsed = time.monotonic() - t0
        runs = [read_run(a, proc.returncode, out, log) for a, proc, out, log in agents]
        assert chaos.error is None, f"chaos thread failed: {chaos.error}"
        cluster.wait_all_healthy()

        # ---- (c) every agent finished all its rounds
        for run in runs:
            assert run.returncode == 0 and run.done, f"{run.id} did not finish:\n{run.log}"
            assert len(run.intervals) == ROUNDS, run.id

        # ---- (a) at most SLOTS holders at any instant, by the agents' own records
        all_intervals = [iv for run in runs for iv in run.intervals]
        assert all(start < end for start, end in all_intervals)
        assert max_overlap(all_intervals) == SLOTS  # never more; and the slots were contended

        # ---- (b) etcd's history of the semaphore and its start-time keys
        client = EtcdClient(EtcdSettings(endpoints=cluster.endpoints, timeout_s=5))
        key, prefix = semaphore_key(GROUP), holders_prefix(GROUP)
        final = client.range(key)
        assert final is not None
        values: list[Semaphore] = []
        for revision in range(final.create_revision, final.mod_revision + 1):
            kv = client.range(key, revision=revision)
            assert kv is not None
            if kv.mod_revision != revision:
                continue  # this revision changed another key (none here, but be exact)
            sem = Semaphore.decode(kv.value, key)
            assert sem.total_slots == SLOTS, revision
            assert len(sem.holders) <= SLOTS, f"revision {revision}: {sem.holders}"
            since_ids = {
                urllib.parse.unquote(k.key[len(prefix) :])
                for k in client.range_prefix(prefix, revision=revision)
            }
            assert since_ids == set(sem.holders), revision
            values.append(sem)
        assert max(len(s.holders) for s in values) == SLOTS
        added: Counter[str] = Counter()
        for before, after in itertools.pairwise(values):
            added.update(set(after.holders) - set(before.holders))
        assert added == Counter({run.id: ROUNDS for run in runs})
        assert len(values) == 1 + 2 * AGENTS * ROUNDS  # created, then one add and one remove each

        # ---- (d) nothing left held
        assert Semaphore.decode(final.value, key).holders == ()
        assert client.range_prefix(prefix) == []
        client.close()

    assert len(chaos.kills) >= MIN_KILLS, f"only {len(chaos.kills)} kills in {elapsed:.0f}s"
    # The kills reached the agents: some of them had to fail over.
    failovers = sum(run.log.count("etcd_endpoint_failed") for run in runs)
    assert failovers > 0
    print(
        f"{AGENTS} agents x {ROUNDS} rounds in {elapsed:.1f}s, members killed: {chaos.kills},"
        f" failovers: {failovers}, revisions checked: {len(values)}"
    )
