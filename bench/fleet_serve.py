"""What `updatectl fleet serve` costs: one read of etcd (rendered) and the answers.

``python -m bench.fleet_serve [--hosts 200 1000 5000] [--clients 8] [--seconds 5]``
starts a real etcd (:mod:`devtools.etcd`), writes N simulated host records
(:mod:`devtools.fleetsim`) with two reboot slots held and a failed version, and
for each N prints: the time of the first read (every record decoded) and of
the next ones (the median of 9: records unchanged since are not decoded
again), each with the etcd transaction, the views and ``/metrics`` rendered;
the size of ``/api/v1/fleet``; and how many
``GET /api/v1/fleet`` per second the server answers to ``--clients`` keep-alive
clients over loopback (and the 95th percentile latency).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import requests

from devtools.etcd import EtcdNode
from devtools.fleetsim import FleetWriter, fleet, host_id
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.fleetserve import EtcdReads, FleetCache, FleetServer, ServeSettings, serving


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[200, 1000, 5000])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    print(
        f"{'hosts':>6} {'first ms':>9} {'refresh ms':>11} {'fleet KiB':>10} "
        f"{'req/s':>8} {'p95 ms':>7}"
    )
    for n in args.hosts:
        with EtcdNode() as node:
            client = EtcdClient(EtcdSettings(endpoints=node.endpoints, timeout_s=30))
            now = time.time()
            w = FleetWriter(client)
            w.put_all(fleet(n, now))
            w.take_slot("db", host_id(3), since=now - 7200)
            w.take_slot("db", host_id(7), since=now - 60)
            w.fail("web", "1.2.0", host_id(0), "check_failed", now - 100)
            cache = FleetCache(EtcdReads(client, 1), refresh_s=2.0, stale_after_s=3600)
            refresh = []
            for _ in range(10):
                t = time.perf_counter()
                cache.refresh()
                refresh.append(time.perf_counter() - t)
            size = len(cache.rendered.bodies["/api/v1/fleet"])
            srv = FleetServer(ServeSettings(port=0), cache)
            with serving(srv):
                rate, p95 = _load(srv.url + "/api/v1/fleet", args.clients, args.seconds)
            client.close()
        print(
            f"{n:>6} {1000 * refresh[0]:>9.1f} {1000 * statistics.median(refresh[1:]):>11.1f} "
            f"{size / 1024:>10.1f} "
            f"{rate:>8.0f} {1000 * p95:>7.1f}"
        )


def _load(url: str, clients: int, seconds: float) -> tuple[float, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        mine = []
        with requests.Session() as s:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = s.get(url, timeout=30)
                r.raise_for_status()
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies.sort()
    return len(latencies) / elapsed, latencies[int(0.95 * (len(latencies) - 1))]


if __name__ == "__main__":
    main()
