"""The safety tests: never more hosts rebooting than the group has slots.

``test_real_agents_...`` (root: network namespaces) runs the real agent's
reboot path for 52 hosts under harder faults; see its docstring.

``test_never_more_holders_...``, the quick lock-only one (no root): twenty
agent processes (``devtools.lock_agent``: the real EtcdLock, the
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

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.etcd import EtcdCluster
from devtools.fsimage import make_usr_image
from devtools.host import Host, provision
from devtools.netns import NetLab
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.semaphore import Semaphore, holders_prefix, semaphore_key
from tests.conftest import Repo, updatectl
from tests.test_metrics import Samples, UnixHTTPConnection
from tests.test_metrics import parse as parse_metrics
from tests.test_metrics import value as metric

pytestmark = [
    pytest.mark.slow,
    # 52 agents and etcd members on deadlines: one worker, one at a time (tests/conftest.py)
    pytest.mark.xdist_group("serial"),
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


# ---- the real agent's reboot path, 52 hosts, harder faults -----------------------------------

REAL_AGENTS = 50  # hosts that must all reboot once and end steady
VICTIMS = 2  # hosts killed while holding a slot: as many as there are slots
WORKERS = 5  # processes the 50 agents run in (asyncio tasks, 10 each)
REAL_TIMEOUT_S = 240.0
STALL_S = 3.0  # how long the test watches the rollout wait on the dead holders
FREEZE_S = (10.0, 15.0)
CUT_S = (6.0, 9.0)
SLOT_SIZE = 4 * 1024 * 1024


@dataclass
class Fault:
    kind: str  # "freeze", "cut", "kill"
    member: int
    start: float  # time.time()
    end: float = 0.0


class HarderChaos(threading.Thread):
    """SIGKILL and restart a random member, freeze the leader (SIGSTOP 10-15 s,
    SIGCONT), cut the leader off from the other members (nft in its namespace), then
    SIGKILL and restart random members until told to stop; one fault at a time, the
    cluster healthy again between."""

    def __init__(self, cluster: EtcdCluster, lab: NetLab, seed: int) -> None:
        super().__init__(name="etcd-harder-chaos", daemon=True)
        self.cluster = cluster
        self.lab = lab
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.faults: list[Fault] = []
        self.error: BaseException | None = None

    def _leader(self) -> int:
        deadline = time.monotonic() + 10
        while (leader := self.cluster.leader_index()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no etcd leader for 10 s")
            time.sleep(0.1)
        return leader

    def _kill_one(self) -> None:
        i = self.rng.randrange(len(self.cluster.members))
        fault = Fault("kill", i, time.time())
        self.faults.append(fault)
        self.cluster.kill(i)
        self.stop.wait(self.rng.uniform(0.2, 0.8))
        self.cluster.restart(i, wait=False)
        fault.end = time.time()
        self.cluster.wait_all_healthy(timeout_s=60)

    def run(self) -> None:
        try:
            self._kill_one()
            self.stop.wait(1.0)
            leader = self._leader()
            fault = Fault("freeze", leader, time.time())
            self.faults.append(fault)
            self.cluster.freeze(leader)
            try:
                self.stop.wait(self.rng.uniform(*FREEZE_S))
            finally:
                self.cluster.thaw(leader)
                fault.end = time.time()
            self.cluster.wait_all_healthy(timeout_s=60)
            self.stop.wait(1.0)

            leader = self._leader()
            fault = Fault("cut", leader, time.time())
            self.faults.append(fault)
            self.lab.cut(leader)
            try:
                self.stop.wait(self.rng.uniform(*CUT_S))
            finally:
                self.lab.heal(leader)
                fault.end = time.time()
            self.cluster.wait_all_healthy(timeout_s=60)

            while not self.stop.wait(self.rng.uniform(0.5, 1.5)):
                self._kill_one()
        except BaseException as exc:
            self.error = exc


def host_config(host: Host, repo: Repo, endpoints: list[str], hook: str) -> None:
    """The agent's config: the lock, fast timers, a pre-reboot hook, a health check,
    metrics on a Unix socket."""
    root = host.root
    for d in ("pre-reboot.d", "health.d"):
        (root / d).mkdir()
    (root / "pre-reboot.d" / "10-drain").write_text(hook)
    (root / "health.d" / "10-ok").write_text("#!/bin/sh\nexit 0\n")
    for f in (root / "pre-reboot.d" / "10-drain", root / "health.d" / "10-ok"):
        f.chmod(0o755)
    quoted = ", ".join(f'"{e}"' for e in endpoints)
    host.config.write_text(
        f"""[source]
url = "{repo.url}"
channel = "stable"
keyring = ["{repo.key.public_key}"]

[disk]
device = "{host.disk}"
kernel_cmdline = "{host.cmdline}"

[agent]
state_dir = "{host.state_dir}"
os_release = "{host.os_release}"
reboot_sentinel = "{root / "reboot-required"}"
first_check_delay_s = 0
retry_base_s = 1
retry_cap_s = 4

[reboot]
strategy = "lock"
lock = "etcd"
group = "{GROUP}"
retry_s = 1
pre_reboot_dir = "{root / "pre-reboot.d"}"

[etcd]
endpoints = [{quoted}]
slots = {SLOTS}
timeout_s = 1

[health]
checks_dir = "{root / "health.d"}"

[metrics]
listen = "unix:{root / "metrics.sock"}"
"""
    )


def events(root: Path) -> list[dict[str, Any]]:
    path = root / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def first(evs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in evs if e["event"] == name), None)


def spawn_agents(
    roots: list[Path], log: Path, deadline: float, seed: int
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "devtools.reboot_agent", "--deadline", str(deadline),
        "--seed", str(seed), "--down-ms", "500", "1500", *map(str, roots),
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,  # a victim is killed with its whole process group
        )


def scrape(socket_path: Path) -> Samples:
    conn = UnixHTTPConnection(socket_path)
    try:
        conn.request("GET", "/metrics")
        return parse_metrics(conn.getresponse().read().decode())
    finally:
        conn.close()


def during(fault: Fault, down: list[tuple[int, int]]) -> int:
    """How many hosts were down (rebooting) at some moment of ``fault``."""
    start, end = fault.start * 1e9, fault.end * 1e9
    return sum(1 for s, e in down if s < end and e > start)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: the agents' unix sockets live under it, and a
    socket path must fit in 108 bytes (pytest's tmp_path under xdist does not)."""
    path = Path(tempfile.mkdtemp(prefix="lock-safety-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.root
@pytest.mark.skipif(
    shutil.which("ip") is None or shutil.which("nft") is None, reason="needs ip and nft"
)
def test_real_agents_never_exceed_the_slots_under_harder_faults(
    short_tmp: Path, repo: Repo
) -> None:
    """52 real agents (the composition root's Agent: update source, install, the etcd
    lock strategy, pre-reboot hooks, bless, the steady step; only the reboot emulated,
    see devtools/reboot_agent.py) update from 1.0.0 to 1.1.0 on a group with 2 slots,
    on a 3-member etcd cluster whose members live in network namespaces of their own.

    1. Two hosts take both slots and are SIGKILLed while their pre-reboot hook runs.
       The other 50 install and then wait: nobody reboots, `updatectl lock status`
       shows the dead holders with their ages, so do the waiting agents' metrics.
    2. An admin frees the slots (`updatectl lock unlock`); the rollout goes on while
       the leader is frozen (SIGSTOP 10-15 s), then the leader is cut off from the
       other members (nft drop), then members are SIGKILLed and restarted.
    3. The observer checks etcd's history (never more than 2 holders; the first
       change after the two dead holders is an admin's unlock), every host's own
       record (one reboot each, into USR-B; down intervals never overlap by more
       than 2; blessed, steady on 1.1.0, the slot given back) and the disks.
    """
    tmp_path = short_tmp
    seed = int(os.environ.get("LOCK_SAFETY_SEED", random.randrange(1 << 30)))
    print(f"LOCK_SAFETY_SEED={seed}")
    t_start = time.monotonic()
    images = tmp_path / "images"
    images.mkdir()
    old = make_usr_image(images / "1.0.0.img", "1.0.0", size=2 << 20, payload=256 << 10)
    new = make_usr_image(images / "1.1.0.img", "1.1.0", size=2 << 20, payload=256 << 10)
    repo.publish("1.1.0", new)
    procs: list[subprocess.Popen[bytes]] = []
    hook_pids: list[Path] = []
    chaos: HarderChaos | None = None
    with NetLab(3) as lab, EtcdCluster(3, hosts=lab.addresses, netns=lab.netns) as cluster:
        try:
            # ---- the hosts
            victims = [f"host-v{i}" for i in range(VICTIMS)]
            workers = [f"host-{i:02d}" for i in range(REAL_AGENTS)]
            roots: dict[str, Path] = {}
            hosts: dict[str, Host] = {}
            for n, hid in enumerate(victims + workers):
                host = provision(
                    tmp_path / "hosts" / hid,
                    slot_size=SLOT_SIZE,
                    first_image=old,
                    first_version="1.0.0",
                )
                eps = list(cluster.endpoints)
                eps = eps[n % 3 :] + eps[: n % 3]  # spread the first choice
                if hid in victims:
                    pid_file = host.root / "hook.pid"
                    hook_pids.append(pid_file)
                    # a drain that takes a while: the host is killed while it runs
                    hook = (
                        f"#!{sys.executable}\nimport os, time\n"
                        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                        "time.sleep(5)\n"
                    )
                else:
                    hook = f'#!/bin/sh\necho ran >> "{host.root / "hooks.log"}"\n'
                host_config(host, repo, eps, hook)
                roots[hid], hosts[hid] = host.root, host
            t_hosts = time.monotonic()
            deadline = time.time() + REAL_TIMEOUT_S
            lock = EtcdLock(
                EtcdClient(EtcdSettings(endpoints=cluster.endpoints, timeout_s=2)), GROUP, SLOTS
            )

            # ---- 1. two hosts die holding both slots
            victim_procs = {
                hid: spawn_agents([roots[hid]], tmp_path / f"{hid}.log", deadline, seed)
                for hid in victims
            }
            procs += victim_procs.values()
            killed_at: dict[str, float] = {}
            until_s = time.monotonic() + 180  # a liveness guard: a loaded machine is slow
            while len(killed_at) < VICTIMS:
                assert time.monotonic() < until_s, "the victims never held the slots"
                st = lock.status()
                for h in st.holders if st is not None else ():
                    if h.id in victim_procs and h.id not in killed_at:
                        kill_group(victim_procs[h.id])
                        killed_at[h.id] = time.time()
                time.sleep(0.05)
            t_killed = time.monotonic()

            chunks = [workers[i::WORKERS] for i in range(WORKERS)]
            worker_procs = [
                spawn_agents(
                    [roots[h] for h in chunk],
                    tmp_path / f"worker-{w}.log",
                    deadline,
                    seed + 1000 * (w + 1),
                )
                for w, chunk in enumerate(chunks)
            ]
            procs += worker_procs
            until_s = time.monotonic() + 120
            while not all(first(events(roots[h]), "staged") for h in workers):
                assert time.monotonic() < until_s, "the hosts did not all stage the update"
                assert all(p.poll() is None for p in worker_procs), "a worker died"
                time.sleep(0.2)
            t_staged = time.monotonic()
            time.sleep(STALL_S)  # they keep asking for a slot; nobody gets one

            # the rollout waits: nobody rebooted, the dead still hold both slots
            assert not any(first(events(roots[h]), "reboot") for h in workers + victims)
            # a holder's age is measured when the status is read: it is at least
            # the time from the kill to the moment we asked (not to the answer,
            # which comes a process start-up later)
            asked = time.time()
            shown = updatectl(hosts[workers[0]], "lock", "status", "--json")
            assert shown.code == 0, shown.err
            doc = shown.json()
            assert [h["id"] for h in doc["holders"]] == sorted(victims)
            waited = asked - max(killed_at.values())
            assert all(h["age_s"] >= waited for h in doc["holders"]), (doc, waited)
            text = updatectl(hosts[workers[0]], "lock", "status").out
            assert all(f"{v}  held for " in text for v in victims), text
            samples = scrape(roots[workers[0]] / "metrics.sock")
            oldest = metric(samples, "updater_lock_oldest_holder_age_seconds", group=GROUP)
            assert oldest >= waited, (oldest, waited)
            assert metric(samples, "updater_lock_holders", group=GROUP) == SLOTS
            assert metric(samples, "updater_lock_slots", group=GROUP) == SLOTS
            stalled_s = time.time() - max(killed_at.values())

            # ---- 2. an admin frees the slots; the rollout goes on through the faults
            chaos = HarderChaos(cluster, lab, seed)
            chaos.start()
            for v in victims:
                freed = updatectl(hosts[workers[0]], "lock", "unlock", v, "--json")
                assert freed.code == 0 and freed.json()["was_holder"] is True, freed.err
            t_unlocked = time.monotonic()
            for p in worker_procs:
                p.wait(timeout=max(1.0, deadline - time.time() + 10))
            t_done = time.monotonic()
            chaos.stop.set()
            chaos.join(90)
            assert not chaos.is_alive(), "the chaos thread did not stop"
            assert chaos.error is None, f"chaos thread failed: {chaos.error!r}"
            cluster.wait_all_healthy()
            logs = {
                p: (tmp_path / f"worker-{w}.log").read_text(errors="replace")
                for w, p in enumerate(worker_procs)
            }
            for w, p in enumerate(worker_procs):
                assert p.returncode == 0, f"worker {w} exited {p.returncode}:\n{logs[p][-5000:]}"
        finally:
            if chaos is not None:  # before the cluster goes: it would restart members
                chaos.stop.set()
                chaos.join(90)
            for p in procs:
                if p.poll() is None:
                    kill_group(p)
            for pid_file in hook_pids:  # the victims' orphaned drain hooks
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)

        # ---- 3. the observer
        # (c) every host's own record
        down: list[tuple[int, int]] = []
        for hid in workers:
            evs = events(roots[hid])
            names = [e["event"] for e in evs]
            assert names.count("reboot") == 1, (hid, names)
            assert names.count("booted") == 1 and names.count("blessed") == 1, (hid, names)
            reboot, booted, steady = (
                first(evs, "reboot"),
                first(evs, "booted"),
                first(evs, "steady"),
            )
            assert reboot is not None and booted is not None and steady is not None, (hid, names)
            assert reboot["next"] == "USR-B" and booted["slot"] == "USR-B", hid
            assert steady["state"] == "IDLE" and steady["booted_slot"] == "USR-B", steady
            assert steady["booted_version"] == "1.1.0", steady
            assert (roots[hid] / "hooks.log").read_text() == "ran\n", hid  # the hook ran once
            down.append((reboot["t"], booted["t"]))
            slots = {s.slot.label: s.flags for s in hosts[hid].boot_control().slots()}
            assert slots["USR-B"].successful and slots["USR-B"].priority > slots["USR-A"].priority
        for hid in victims:
            assert first(events(roots[hid]), "reboot") is None, hid  # died before it
        # (a) never more than SLOTS hosts down at once, by their own records
        assert max_overlap(down) == SLOTS

        # (b) etcd's history
        client = EtcdClient(EtcdSettings(endpoints=cluster.endpoints, timeout_s=5))
        key, prefix = semaphore_key(GROUP), holders_prefix(GROUP)
        final = client.range(key)
        assert final is not None
        values: list[Semaphore] = []
        for revision in range(final.create_revision, final.mod_revision + 1):
            kv = client.range(key, revision=revision)
            assert kv is not None
            if kv.mod_revision != revision:
                continue  # this revision changed another key (a fleet record, say)
            sem = Semaphore.decode(kv.value, key)
            assert sem.total_slots == SLOTS, revision
            assert len(sem.holders) <= SLOTS, f"revision {revision}: {sem.holders}"
            since_ids = {
                urllib.parse.unquote(k.key[len(prefix) :])
                for k in client.range_prefix(prefix, revision=revision)
            }
            assert since_ids == set(sem.holders), revision
            values.append(sem)
        added: Counter[str] = Counter()
        for before, after in itertools.pairwise(values):
            added.update(set(after.holders) - set(before.holders))
        assert added == Counter({h: 1 for h in victims + workers})
        assert len(values) == 1 + 2 * (REAL_AGENTS + VICTIMS)
        # the dead held both slots, and the next change was an admin freeing one
        both = next(i for i, s in enumerate(values) if set(s.holders) == set(victims))
        assert len(values[both + 1].holders) == 1 and set(values[both + 1].holders) < set(victims)
        assert Semaphore.decode(final.value, key).holders == ()
        assert client.range_prefix(prefix) == []
        client.close()

    failovers = sum(text.count("etcd_endpoint_failed") for text in logs.values())
    print(
        f"{REAL_AGENTS}+{VICTIMS} agents, {SLOTS} slots: hosts ready {t_hosts - t_start:.1f}s,"
        f" victims killed {t_killed - t_hosts:.1f}s, staged {t_staged - t_killed:.1f}s,"
        f" stalled {stalled_s:.1f}s, rollout {t_done - t_unlocked:.1f}s,"
        f" total {time.monotonic() - t_start:.1f}s; faults: "
        + ", ".join(
            f"{f.kind} m{f.member} {f.end - f.start:.1f}s ({during(f, down)} reboots during)"
            for f in chaos.faults
        )
        + f"; failovers {failovers}; max down at once {max_overlap(down)};"
        f" revisions checked {final.mod_revision - final.create_revision + 1}"
        f" ({len(values)} of the semaphore)"
    )

    # the faults hit the rollout
    kinds = Counter(f.kind for f in chaos.faults)
    assert kinds["freeze"] == 1 and kinds["cut"] == 1 and kinds["kill"] >= 1, chaos.faults
    assert all(during(f, down) > 0 for f in chaos.faults if f.kind != "kill"), chaos.faults
    assert any(during(f, down) > 0 for f in chaos.faults if f.kind == "kill"), chaos.faults
    assert failovers > 0
