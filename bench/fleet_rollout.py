"""`make bench` (part 3): a fleet rollout through the etcd reboot lock, against real etcd.

N simulated hosts (1,000 by default) share one group of k slots on a real
etcd (a single ``devtools.etcd.EtcdNode``, started here and always stopped).
Each host is a thread running the agent's code path, ``EtcdLock.acquire`` and
``EtcdLock.release``: it asks for a slot as soon as it has the update (at a
random moment within ``--spread-s``, one lock retry interval by default);
while the answer is no it asks again after ``--poll-s``, jittered like the
agent's retries (+-10 %); once granted it "reboots" (sleeps ``--reboot-s``),
releases (its steady-state report) and is done. Times are scaled down about
200-fold (T = 3 s for a 10-minute reboot cycle), so etcd sees ~200 times the
request rate of the real fleet.

The hosts share a small pool of ``EtcdClient`` s (``--clients``): an
EtcdClient serialises its requests, so the pool bounds how many are in flight.
Each host talks through its own ``EtcdClient`` subclass that borrows a pooled
client for each request and counts its requests and failed compare-and-swaps
at that boundary; the lock code is the agent's, untouched. When every pooled
client is busy, a request that continues an operation (a release, or a
compare-and-swap after its read) goes before the first request of a new poll
(see :class:`ClientPool`).

Reported: the wall time from the first host's start to the last release
against the ideal ceil(N/k) x T (goal: ratio <= 1.05), next to the ratio the
same rollout would reach with an instantaneous lock (a discrete-event model:
what polling alone costs); the peak number of concurrent holders from the
recorded intervals (grant returned .. release called, which lies inside the
time etcd counts the holder), from a reader sampling the semaphore every
50 ms, and from etcd's history (every revision of the semaphore, read back
afterwards): k, never more; etcd requests per host and per poll;
compare-and-swap conflicts; how long grants and releases took; and, to show
whether the machine kept up, waits for a pooled client, how late the hosts'
timers fired, request latency and the CPU used by etcd and by the simulation.
Exits non-zero if any measure saw more than k holders or a host did not
finish.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import logging
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.install_throughput import host_description
from devtools.etcd import ETCD, EtcdNode
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.semaphore import Semaphore, semaphore_key
from updater.config import AgentConfig, RebootConfig
from updater.errors import LockError
from updater.log import configure
from updater.run import run

ROOT = Path(__file__).resolve().parent.parent
GROUP = "fleet"
GOAL_RATIO = 1.05
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_LEAD_S = 0.5  # threads are all created before the first host's start
RELEASE_RETRY_S = 0.1  # the agent retries its steady report with backoff; short here
FLOOR_RUNS = 5  # retry-jitter draws averaged for the polling floor


@dataclass(frozen=True)
class Params:
    hosts: int = 1000
    slots: int = 50
    reboot_s: float = 3.0  # T: reboot, boot, health checks, mark good, steady report
    poll_s: float = 0.6  # the agent's lock retry ([reboot] retry_s), scaled like T
    jitter: float = AgentConfig().jitter  # +- this fraction of every retry, as the agent
    spread_s: float = 1.5  # hosts start within this (one lock retry interval)
    clients: int = 8  # pooled EtcdClients: requests in flight at most
    observe_s: float = 0.05  # the semaphore reader's period
    seed: int = 1

    @property
    def ideal_s(self) -> float:
        return math.ceil(self.hosts / self.slots) * self.reboot_s


@dataclass
class HostRecord:
    """One simulated host; written only by its own thread. Times: seconds after t0."""

    id: str
    start_s: float  # when it was scheduled to see the update
    started_s: float | None = None  # its first poll
    granted_s: float | None = None  # acquire returned True
    release_s: float | None = None  # "reboot" over, release called
    released_s: float | None = None  # release returned
    polls: int = 0
    requests: int = 0  # every POST to etcd, counted at the EtcdClient boundary
    ranges: int = 0
    txns: int = 0
    conflicts: int = 0  # compare-and-swap transactions that lost (mod_revision changed)
    release_conflicts: int = 0  # of those, while releasing
    grant_call_s: float | None = None  # how long the granting acquire() took
    errors: int = 0  # LockErrors (treated as "no", as the agent does)


# ---- etcd plumbing: the client pool and the counting boundary ----------------------------------


class ClientPool:
    """``size`` EtcdClients; each request borrows one, so at most ``size`` are in flight.

    When all are busy, requests wait in two queues, each first come, first
    served: *urgent* ones (a release, or the second and later requests of an
    acquire, i.e. a compare-and-swap after its read) go before the first
    request of a new poll. Real hosts each have their own connection, so a
    host's read and its compare-and-swap are one round trip apart whatever
    the others do; a shared first-come queue here would put the whole backlog
    between them, the CAS would almost always lose, and the run collapses
    into conflicts (measured: first 50 grants after 45 s). So when the
    simulation is saturated, only new polls wait, which is like a later poll.
    """

    def __init__(self, settings: EtcdSettings, size: int) -> None:
        self.settings = settings
        self.clients = [EtcdClient(settings) for _ in range(size)]
        self._idle = list(self.clients)
        self._urgent: collections.deque[_Waiter] = collections.deque()
        self._normal: collections.deque[_Waiter] = collections.deque()
        self._mutex = threading.Lock()
        self.waits_s: list[float] = []  # list.append is atomic: no lock needed
        self.latencies_s: list[float] = []

    def _borrow(self, urgent: bool) -> EtcdClient:
        with self._mutex:
            if self._idle:  # nobody waits while a client is idle
                return self._idle.pop()
            waiter = _Waiter()
            (self._urgent if urgent else self._normal).append(waiter)
        waiter.ready.wait()
        assert waiter.client is not None
        return waiter.client

    def _give_back(self, client: EtcdClient) -> None:
        with self._mutex:
            if self._urgent:
                waiter = self._urgent.popleft()
            elif self._normal:
                waiter = self._normal.popleft()
            else:
                self._idle.append(client)
                return
        waiter.client = client
        waiter.ready.set()

    def call(self, method: str, body: Mapping[str, Any], *, urgent: bool) -> dict[str, Any]:
        t0 = time.monotonic()
        client = self._borrow(urgent)
        t1 = time.monotonic()
        try:
            return client.call(method, body)
        finally:
            self._give_back(client)
            self.waits_s.append(t1 - t0)
            self.latencies_s.append(time.monotonic() - t1)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class _Waiter:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.client: EtcdClient | None = None


def _compares_mod_revision(body: Mapping[str, Any]) -> bool:
    compare = body.get("compare")
    return isinstance(compare, list) and any(
        isinstance(c, dict) and c.get("target") == "MOD" for c in compare
    )


class CountingClient(EtcdClient):
    """One host's connection to etcd: a pooled client per request, every request counted."""

    def __init__(self, pool: ClientPool, record: HostRecord) -> None:
        super().__init__(pool.settings)  # its own endpoints stay unused: no connection is made
        self._pool = pool
        self._record = record
        self._under_way = False

    def begin(self, *, urgent: bool = False) -> None:
        """A new acquire() or release() starts: its first request waits its turn unless urgent."""
        self._under_way = urgent

    def call(self, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        rec = self._record
        rec.requests += 1
        if method == "kv/range":
            rec.ranges += 1
        elif method == "kv/txn":
            rec.txns += 1
        answer = self._pool.call(method, body, urgent=self._under_way)
        self._under_way = True
        if method == "kv/txn" and not answer.get("succeeded") and _compares_mod_revision(body):
            rec.conflicts += 1
            if rec.release_s is not None:
                rec.release_conflicts += 1
        return answer

    def close(self) -> None:
        pass  # the pool's clients are closed by the pool


# ---- the simulated hosts -----------------------------------------------------------------------


class Fleet:
    """N host threads, a semaphore reader, and the lateness of every timer the hosts set."""

    def __init__(self, p: Params, pool: ClientPool) -> None:
        self.p = p
        self.pool = pool
        self.stop = threading.Event()
        rng = random.Random(p.seed)
        self.records = [
            # 32 hex digits, like the agent's app-specific ids: a realistic semaphore size
            HostRecord(id=f"{rng.getrandbits(128):032x}", start_s=rng.uniform(0, p.spread_s))
            for _ in range(p.hosts)
        ]
        self.seeds = [rng.getrandbits(64) for _ in range(p.hosts)]
        self.lateness_s: list[float] = []  # list.append is atomic: no lock needed
        self.t0 = 0.0
        self.observed: collections.Counter[int] = collections.Counter()  # holders seen -> samples
        self.observed_slots: set[int] = set()
        self.observer_errors = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _sleep_until(self, at: float) -> bool:
        """Sleep until ``at`` (seconds after t0); False if the run was stopped."""
        if self.stop.wait(max(0.0, at - self.now())):
            return False
        self.lateness_s.append(self.now() - at)
        return True

    def host(self, index: int) -> None:
        """One host: poll until granted, "reboot", release (its steady-state report)."""
        rec, p = self.records[index], self.p
        rng = random.Random(self.seeds[index])
        connection = CountingClient(self.pool, rec)
        lock = EtcdLock(connection, GROUP, p.slots, rng=rng)
        if not self._sleep_until(rec.start_s):
            return
        rec.started_s = self.now()
        while True:
            rec.polls += 1
            asked = self.now()
            connection.begin()
            try:
                granted = lock.acquire(rec.id)
            except LockError:
                rec.errors += 1  # fail closed: no reboot, ask again later
                granted = False
            if granted:
                break
            if not self._sleep_until(self.now() + retry_delay(p, rng)):
                return
        rec.granted_s = self.now()
        rec.grant_call_s = rec.granted_s - asked
        if not self._sleep_until(rec.granted_s + p.reboot_s):
            return
        rec.release_s = self.now()
        while True:
            connection.begin(urgent=True)
            try:
                lock.release(rec.id)
                break
            except LockError:
                rec.errors += 1  # the agent retries its steady report with backoff
                if self.stop.wait(RELEASE_RETRY_S):
                    return
        rec.released_s = self.now()

    def observe(self, client: EtcdClient, done: threading.Event) -> None:
        """Read the semaphore every ``observe_s`` until ``done``; count holders seen."""
        key = semaphore_key(GROUP)
        while not done.wait(self.p.observe_s):
            try:
                kv = client.range(key)
            except LockError:
                self.observer_errors += 1
                continue
            if kv is not None:
                sem = Semaphore.decode(kv.value, key)
                self.observed[len(sem.holders)] += 1
                self.observed_slots.add(sem.total_slots)

    def run(self, deadline_s: float, progress_s: float = 10.0) -> bool:
        """Run every host to its release; False if the deadline passed first."""
        threads = [
            threading.Thread(target=self.host, args=(i,), name=f"host-{i}", daemon=True)
            for i in range(self.p.hosts)
        ]
        self.t0 = time.monotonic() + START_LEAD_S  # every thread is up before the first start
        for t in threads:
            t.start()
        next_report = progress_s
        try:
            while any(t.is_alive() for t in threads) and self.now() < deadline_s:
                time.sleep(0.1)
                if self.now() >= next_report:
                    next_report += progress_s
                    done = sum(r.released_s is not None for r in self.records)
                    holding = sum(
                        r.granted_s is not None and r.released_s is None for r in self.records
                    )
                    say(f"  {self.now():5.0f} s: {done} hosts done, {holding} holding")
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=5.0)
        return all(r.released_s is not None for r in self.records)


# ---- analysis (pure) ---------------------------------------------------------------------------


def retry_delay(p: Params, rng: random.Random) -> float:
    """The lock retry interval, jittered as the agent jitters its delays."""
    return p.poll_s * (1.0 - p.jitter + 2.0 * p.jitter * rng.random())


def polling_floor(p: Params, starts: Sequence[float], seed: int) -> float:
    """wall / ideal of the same rollout with an instantaneous lock: what polling alone costs.

    Same start times and retry intervals; every answer takes no time, a slot
    is free again the instant its holder's T is over, and nobody conflicts.
    """
    rng = random.Random(seed)
    release, poll = 0, 1  # at equal times a release comes first
    events = [(s, poll, i) for i, s in enumerate(starts)]
    heapq.heapify(events)
    free, last = p.slots, 0.0
    while events:
        t, kind, i = heapq.heappop(events)
        if kind == release:
            free, last = free + 1, t
        elif free:
            free -= 1
            heapq.heappush(events, (t + p.reboot_s, release, i))
        else:
            heapq.heappush(events, (t + retry_delay(p, rng), poll, i))
    return (last - min(starts, default=0.0)) / p.ideal_s


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant; touching ends count as overlapping."""
    events = sorted([(a, 0) for a, _ in intervals] + [(b, 1) for _, b in intervals])
    peak = open_now = 0
    for _, kind in events:
        open_now += 1 if kind == 0 else -1
        peak = max(peak, open_now)
    return peak


def handoff_gaps(grants: Sequence[float], frees: Sequence[float], slots: int) -> list[float]:
    """Seconds each slot stood idle before its next grant.

    The j-th grant (in time order, j >= slots) takes the slot of the
    (j - slots)-th release: holders are conserved, so that many must be gone.
    """
    g, f = sorted(grants), sorted(frees)
    return [g[j] - f[j - slots] for j in range(slots, len(g)) if j - slots < len(f)]


@dataclass(frozen=True)
class HistoryCheck:
    revisions: int  # values of the semaphore in etcd's history
    peak_holders: int
    slots_seen: tuple[int, ...]
    added: int  # holder additions over the history
    added_twice: int  # hosts added more than once
    never_added: int
    final_holders: int


def check_history(values: Sequence[Semaphore], ids: Sequence[str]) -> HistoryCheck:
    """Every stored value of the semaphore, oldest first: who was added, and the peak."""
    adds: collections.Counter[str] = collections.Counter()
    prev: set[str] = set()
    for sem in values:
        now = set(sem.holders)
        adds.update(now - prev)
        prev = now
    return HistoryCheck(
        revisions=len(values),
        peak_holders=max((len(s.holders) for s in values), default=0),
        slots_seen=tuple(sorted({s.total_slots for s in values})),
        added=sum(adds.values()),
        added_twice=sum(1 for n in adds.values() if n > 1),
        never_added=sum(1 for i in ids if adds[i] == 0),
        final_holders=len(values[-1].holders) if values else 0,
    )


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def timing(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * quantile(values, 0.5),
        "p99_ms": 1000 * quantile(values, 0.99),
        "max_ms": 1000 * max(values, default=0.0),
    }


def summarise(
    p: Params,
    records: Sequence[HostRecord],
    history: HistoryCheck,
    observed: Mapping[int, int],
) -> dict[str, Any]:
    done = [r for r in records if r.released_s is not None]
    starts = [r.started_s for r in records if r.started_s is not None]
    holds = [
        (r.granted_s, r.release_s)
        for r in records
        if r.granted_s is not None and r.release_s is not None
    ]
    first_start = min(starts, default=0.0)
    last_release = max((r.released_s for r in done if r.released_s is not None), default=0.0)
    wall = last_release - first_start
    grants = sorted(g for g, _ in holds)
    gaps = handoff_gaps(grants, [e for _, e in holds], p.slots)
    polls = sum(r.polls for r in records)
    requests = sum(r.requests for r in records)
    release_calls = [
        r.released_s - r.release_s
        for r in done
        if r.released_s is not None and r.release_s is not None
    ]
    grant_calls = [r.grant_call_s for r in records if r.grant_call_s is not None]
    busy = sum(e - g for g, e in holds)
    return {
        "hosts_done": len(done),
        "wall_s": wall,
        "ideal_s": p.ideal_s,
        "ratio": wall / p.ideal_s,
        "slot_utilisation": busy / (p.slots * wall) if wall > 0 else 0.0,
        "all_slots_taken_after_s": grants[p.slots - 1] - first_start
        if len(grants) >= p.slots
        else None,
        "last_grant_s": grants[-1] - first_start if grants else None,
        "handoff_gap_s": {
            "mean": statistics.fmean(gaps) if gaps else 0.0,
            "p50": quantile(gaps, 0.5),
            "p90": quantile(gaps, 0.9),
            "max": max(gaps, default=0.0),
        },
        "peak_holders_intervals": peak_overlap(holds),
        "peak_holders_observed": max(observed, default=0),
        "observer_samples": sum(observed.values()),
        "peak_holders_history": history.peak_holders,
        "history": asdict(history),
        "polls": polls,
        "polls_per_host": {
            "mean": polls / len(records),
            "max": max(r.polls for r in records),
        },
        "requests": requests,
        "requests_per_host": {
            "mean": requests / len(records),
            "max": max(r.requests for r in records),
        },
        "requests_per_poll": requests / polls if polls else 0.0,
        "ranges": sum(r.ranges for r in records),
        "txns": sum(r.txns for r in records),
        "conflicts": sum(r.conflicts for r in records),
        "release_conflicts": sum(r.release_conflicts for r in records),
        "hosts_with_conflicts": sum(1 for r in records if r.conflicts),
        "release_call": timing(release_calls),
        "releases_over_1s": sum(1 for d in release_calls if d > 1.0),
        "grant_call": timing(grant_calls),
        "errors": sum(r.errors for r in records),
        "request_rate_per_s": requests / wall if wall > 0 else 0.0,
    }


# ---- the machine -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine() -> dict[str, str]:
    try:
        etcd = run([ETCD, "--version"]).text.splitlines()[0]
    except Exception:  # a description only: never fail the benchmark over it
        etcd = "?"
    return {**host_description(), "etcd": etcd}


# ---- orchestration -----------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def read_history(client: EtcdClient) -> list[Semaphore]:
    """Every value the semaphore key ever had, oldest first (the node never compacts)."""
    key = semaphore_key(GROUP)
    final = client.range(key)
    if final is None:
        return []
    values = []
    for revision in range(final.create_revision, final.mod_revision + 1):
        kv = client.range(key, revision=revision)
        if kv is not None and kv.mod_revision == revision:
            values.append(Semaphore.decode(kv.value, key))
    return values


def bench(p: Params, deadline_s: float) -> dict[str, Any]:
    (ROOT / "bench-run").mkdir(exist_ok=True)
    with EtcdNode(base_dir=ROOT / "bench-run") as node:
        settings = EtcdSettings(endpoints=node.endpoints)
        pool = ClientPool(settings, p.clients)
        fleet = Fleet(p, pool)
        admin = EtcdClient(settings)
        observer_done = threading.Event()
        observer = threading.Thread(
            target=fleet.observe, args=(admin, observer_done), name="observer", daemon=True
        )
        etcd_proc = node.members[0].proc
        assert etcd_proc is not None
        say(
            f"bench: {p.hosts} hosts, {p.slots} slots, reboot {p.reboot_s:g} s, "
            f"lock retry {p.poll_s:g} s (+-{p.jitter:.0%}), start spread {p.spread_s:g} s, "
            f"{p.clients} clients; ideal {p.ideal_s:g} s"
        )
        try:
            etcd_cpu0, our_cpu0 = cpu_seconds(etcd_proc.pid), time.process_time()
            t0 = time.monotonic()
            observer.start()
            finished = fleet.run(deadline_s)
            observer_done.set()
            observer.join(timeout=5.0)
            elapsed = time.monotonic() - t0
            etcd_cpu = cpu_seconds(etcd_proc.pid) - etcd_cpu0
            our_cpu = time.process_time() - our_cpu0
            values = read_history(admin)
        finally:
            observer_done.set()
            admin.close()
            pool.close()
    ids = [r.id for r in fleet.records]
    results = summarise(p, fleet.records, check_history(values, ids), fleet.observed)
    starts = [r.start_s for r in fleet.records]
    floors = [polling_floor(p, starts, p.seed + n) for n in range(FLOOR_RUNS)]
    results.update(
        finished=finished,
        polling_floor_ratio=statistics.fmean(floors),
        observed_slots=sorted(fleet.observed_slots),
        observer_errors=fleet.observer_errors,
        timer_lateness=timing(fleet.lateness_s),
        request_latency=timing(pool.latencies_s),
        pool_wait=timing(pool.waits_s),
        cpu_etcd_percent=100 * etcd_cpu / elapsed,
        cpu_simulation_percent=100 * our_cpu / elapsed,
        params=asdict(p),
        poll_to_reboot=p.poll_s / p.reboot_s,
        machine=machine(),
        hosts=[asdict(r) for r in fleet.records],
    )
    return results


def peaks(r: Mapping[str, Any]) -> tuple[int, int, int]:
    """Peak holders from the intervals, the periodic reader and etcd's history."""
    return (
        r["peak_holders_intervals"],
        r["peak_holders_observed"],
        r["history"]["peak_holders"],
    )


def safe(p: Params, r: Mapping[str, Any]) -> bool:
    """Never more than k holders by any measure; every host granted once, done, no slot left."""
    h = r["history"]
    return bool(
        r["finished"]
        and r["hosts_done"] == p.hosts
        and max(peaks(r)) <= p.slots
        and tuple(h["slots_seen"]) == (p.slots,)
        and h["added"] == p.hosts
        and h["added_twice"] == 0
        and h["never_added"] == 0
        and h["final_holders"] == 0
    )


def line(label: str, value: str) -> None:
    say(f"  {label:<46} {value}")


def ms(t: Mapping[str, float]) -> str:
    return f"p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f}, max {t['max_ms']:.1f}"


def report(p: Params, r: Mapping[str, Any]) -> None:
    h, g, m = r["history"], r["handoff_gap_s"], r["machine"]
    retry = RebootConfig().retry_s
    say(
        f"\nresults ({p.hosts} hosts, k = {p.slots}, T = {p.reboot_s:g} s, "
        f"lock retry {p.poll_s:g} s = {r['poll_to_reboot']:.2f} T, {p.clients} clients):"
    )
    line("hosts done", f"{r['hosts_done']} / {p.hosts}")
    line("wall, first start to last release", f"{r['wall_s']:8.2f} s")
    line(f"ideal ceil({p.hosts}/{p.slots}) x T", f"{r['ideal_s']:8.2f} s")
    verdict = "meets" if r["ratio"] <= GOAL_RATIO else "MISSES"
    line("ratio wall / ideal", f"{r['ratio']:8.3f}   ({verdict} the goal <= {GOAL_RATIO})")
    line("  polling alone (an instant lock, modelled)", f"{r['polling_floor_ratio']:8.3f}")
    line("slot utilisation (held / k x wall)", f"{r['slot_utilisation']:8.3f}")
    line("all k slots taken after", f"{r['all_slots_taken_after_s']:8.2f} s")
    line("last grant after", f"{r['last_grant_s']:8.2f} s")
    line(
        "handoff gap, release to next grant",
        f"mean {1000 * g['mean']:.0f} ms, p50 {1000 * g['p50']:.0f}, "
        f"p90 {1000 * g['p90']:.0f}, max {1000 * g['max']:.0f}",
    )
    line("granting acquire() call", ms(r["grant_call"]))
    line(
        "release() call",
        f"{ms(r['release_call'])}; {r['releases_over_1s']} over 1 s",
    )
    top = max(peaks(r))
    if not safe(p, r):
        peak_verdict = "VIOLATED"
    elif min(peaks(r)) == top == p.slots:
        peak_verdict = "= k, never more"
    else:
        peak_verdict = "never more than k"
    line(
        "peak holders: intervals / reader / history",
        " / ".join(str(n) for n in peaks(r)) + f"   (k = {p.slots}: {peak_verdict})",
    )
    line(
        "etcd history",
        f"{h['revisions']} values, slots {list(h['slots_seen'])}, {h['added']} grants, "
        f"{h['added_twice']} twice, {h['never_added']} never, {h['final_holders']} left",
    )
    line("reader samples", f"{r['observer_samples']} (errors {r['observer_errors']})")
    line(
        "polls per host",
        f"{r['polls_per_host']['mean']:.1f} mean, {r['polls_per_host']['max']} max "
        f"({r['polls']} in all)",
    )
    line(
        "etcd requests",
        f"{r['requests']} ({r['ranges']} ranges, {r['txns']} txns), "
        f"{r['request_rate_per_s']:.0f} /s",
    )
    line(
        "etcd requests per host",
        f"{r['requests_per_host']['mean']:.1f} mean, {r['requests_per_host']['max']} max",
    )
    line("etcd requests per poll", f"{r['requests_per_poll']:.3f}")
    line(
        "CAS conflicts",
        f"{r['conflicts']} on {r['hosts_with_conflicts']} hosts "
        f"({r['release_conflicts']} while releasing); lock errors {r['errors']}",
    )
    line("request latency", ms(r["request_latency"]))
    line("wait for a pooled client", ms(r["pool_wait"]))
    line("host timers late (retries, reboots)", ms(r["timer_lateness"]))
    line(
        "CPU (100 % = one core)",
        f"etcd {r['cpu_etcd_percent']:.0f} %, simulation {r['cpu_simulation_percent']:.0f} %",
    )
    line(
        "in agent terms",
        f"[reboot] retry_s = {retry:g} s (the default) with a "
        f"{retry * p.reboot_s / p.poll_s:g} s reboot cycle",
    )
    say(
        f"  machine: {m['cpu']}, {m['cores']} cores, {m['ram']}, kernel {m['kernel']}, "
        f"Python {m['python']}, {m['etcd']}"
    )


def main(argv: list[str] | None = None) -> None:
    d = Params()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hosts", type=int, default=d.hosts, help=f"(default {d.hosts})")
    p.add_argument("--slots", type=int, default=d.slots, help=f"k (default {d.slots})")
    p.add_argument("--reboot-s", type=float, default=d.reboot_s, help=f"T (default {d.reboot_s})")
    p.add_argument(
        "--poll-s", type=float, default=d.poll_s, help=f"lock retry (default {d.poll_s})"
    )
    p.add_argument("--jitter", type=float, default=d.jitter, help=f"(default {d.jitter})")
    p.add_argument("--spread-s", type=float, help="start spread (default: --poll-s)")
    p.add_argument(
        "--clients", type=int, default=d.clients, help=f"pooled EtcdClients (default {d.clients})"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, help="also write the figures (and every host) here")
    args = p.parse_args(argv)
    if args.hosts < 1 or args.slots < 1 or args.clients < 1:
        sys.exit("bench: --hosts, --slots and --clients must be >= 1")
    if args.reboot_s <= 0 or args.poll_s <= 0 or not 0 <= args.jitter < 1:
        sys.exit("bench: --reboot-s and --poll-s must be > 0, --jitter in [0, 1)")
    params = Params(
        hosts=args.hosts,
        slots=args.slots,
        reboot_s=args.reboot_s,
        poll_s=args.poll_s,
        jitter=args.jitter,
        spread_s=args.poll_s if args.spread_s is None else args.spread_s,
        clients=args.clients,
        seed=args.seed,
    )
    configure(logging.WARNING)
    # A plain SIGTERM would end the process without unwinding, leaving etcd running
    # and its temp dir behind; as SystemExit, the `with EtcdNode` below cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    results = bench(params, deadline_s=3 * params.ideal_s + 60)
    report(params, results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not safe(params, results):
        sys.exit("bench: the rollout was not safe or did not finish (see above)")


if __name__ == "__main__":
    main()
