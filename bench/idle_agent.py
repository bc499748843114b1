"""`make bench` (part 2): what the agent costs while it waits between polls.

The real daemon (`updatectl agent`) runs against a loopback repository and a
GPT disk image, with its D-Bus API on a private dbus-daemon and metrics on a
Unix socket, as on a host. Once its first check has completed (it is IDLE,
the next poll an hour away), its resident memory and CPU time are sampled
from /proc for the measured period. Goals: RSS <= 40 MiB, CPU ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.dbusdaemon import PrivateBus
from devtools.fsimage import make_usr_image
from devtools.gpgkeys import signing_key
from devtools.host import provision
from devtools.repo_server import RepoServer
from updater.clock import SystemClock
from updater.log import configure
from updater.release import ReleaseRequest, publish

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "dist" / "dbus-1" / "system.d" / "org.updater.Agent1.conf"
GOAL_RSS_MIB = 40.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def measure(seconds: float, work: Path) -> dict[str, float]:
    with signing_key(work / "gnupg") as key:
        image = make_usr_image(work / "usr.img", "1.0.0", size=8 << 20)
        repo = work / "repo"
        publish(
            ReleaseRequest(
                image=image,
                version="1.0.0",
                repo=repo,
                gnupghome=key.gnupghome,
                key_id=key.fingerprint,
            ),
            SystemClock().now(),
        )
        with RepoServer(repo) as server, PrivateBus(policy_files=(POLICY,)) as bus:
            host = provision(
                work / "host",
                slot_size=16 << 20,
                first_image=image,
                first_version="1.0.0",
                repo_url=server.url,
                keyring=key.public_key,
                extra_config=f'[metrics]\nlisten = "unix:{work}/metrics.sock"\n',
            )
            text = host.config.read_text().replace(
                "[agent]\n", "[agent]\nfirst_check_delay_s = 0.5\n"
            )
            host.config.write_text(text)
            log = work / "agent.log"
            env = {**os.environ, **bus.env()}
            updatectl = str(Path(sys.executable).with_name("updatectl"))
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [updatectl, "--config", str(host.config), "agent", "--log", "json"],
                    stdout=out,
                    stderr=out,
                    env=env,
                )
            try:
                deadline = time.monotonic() + 60
                while '"update_checked"' not in log.read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the agent did not check:\n{log.read_text()}")
                    time.sleep(0.1)
                time.sleep(1.0)  # settle after the check
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                samples = []
                while time.monotonic() - t0 < seconds:
                    samples.append(rss_mib(proc.pid))
                    time.sleep(min(1.0, seconds / 10))
                cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
                checks = log.read_text().count('"update_checked"')
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
    return {
        "seconds": round(t1 - t0, 1),
        "rss_mib_max": round(max(samples), 1),
        "rss_mib_min": round(min(samples), 1),
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
        "checks": checks,
    }


def report(r: dict[str, float]) -> None:
    print(f"idle agent over {r['seconds']} s (after its first check, next poll in ~1 h):")
    print(
        f"  RSS                                 {r['rss_mib_max']:.1f} MiB "
        f"(min {r['rss_mib_min']:.1f})  goal <= {GOAL_RSS_MIB:.0f} MiB: "
        f"{'meets' if r['rss_mib_max'] <= GOAL_RSS_MIB else 'MISSES'}"
    )
    print(
        f"  CPU                                 {r['cpu_seconds']:.3f} s ({r['cpu_percent']:.3f} %)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    configure()
    (ROOT / "bench-run").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="idle-agent-", dir=ROOT / "bench-run"))
    try:
        r = measure(args.seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
