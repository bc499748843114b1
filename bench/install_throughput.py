"""`make bench`: install throughput against ``curl | tee >(openssl) | dd``, and peak memory.

A random image is served over loopback HTTP by :class:`devtools.repo_server.RepoServer`
(sendfile) and written to a loop block device with fsync, in turns by

- ours: the real install path, ``updater.download.Download`` into
  ``updater.install.write_image`` onto a ``SlotDevice``, in a fresh Python
  process per run (so each run's peak RSS is its own);
- the baseline: ``curl -s URL | tee >(openssl dgst -sha256 >/dev/null) | dd
  of=DEV bs=4M oflag=direct conv=fsync``, same URL, same device.

Ours is timed in the child around the install call (connect to fsync: the
agent is a daemon that imported everything long before); the wall time of the
whole process, interpreter start included, is printed next to it. The
baseline is the wall time of the pipeline. Rounds alternate which goes first;
figures are medians. The source files stay
in the page cache for both (read once before the first run, never dropped),
and one unmeasured run of each comes first, so the loop device's backing file
is allocated before anything is timed. Then, for information: the same with
the zstd-compressed copy, with read-back on, and the peak RSS of an install of
a larger (sparse, all-zero) image. Needs root (losetup), curl, openssl, dd.
Files live in a temporary directory under ``bench-run/``, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard

from bench.install_child import ChildJob, ChildResult
from devtools.diskimage import loop_device
from devtools.repo_server import RepoServer
from updater.config import InstallConfig
from updater.log import configure
from updater.run import run

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MB = 1_000_000  # throughput is in MB/s (10^6 bytes), as dd and curl print it
GOAL_RATIO = 0.90
GOAL_RSS_MIB = 64.0
BASELINE = (
    "curl -s {url} | tee >(openssl dgst -sha256 >/dev/null) | "
    "dd of={dev} bs=4M oflag=direct conv=fsync status=none"
)


# ---- the parent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    path: Path
    url: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Run:
    seconds: float  # what the throughput is computed from
    wall_s: float  # the whole process(es), start to exit
    peak_rss_kib: int = 0
    rss_after_imports_kib: int = 0


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def say(text: str) -> None:
    print(text, flush=True)


def make_random(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``; their sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(4 * MIB, left))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def make_zeros(path: Path, size: int) -> str:
    """A sparse file of ``size`` zero bytes; their sha256."""
    with path.open("wb") as f:
        f.truncate(size)
    h = hashlib.sha256()
    zeros = bytes(4 * MIB)
    left = size
    while left:
        n = min(len(zeros), left)
        h.update(memoryview(zeros)[:n])
        left -= n
    return h.hexdigest()


def compress_zstd(src: Path, dst: Path) -> str:
    with src.open("rb") as fin, dst.open("wb") as fout:
        zstandard.ZstdCompressor(level=3, threads=-1).copy_stream(fin, fout)
    return file_sha256(dst)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read ``path`` once so that it is served from the page cache."""
    with path.open("rb") as f:
        while f.read(4 * MIB):
            pass


def run_ours(
    image: Image, raw: Image, device: Path, *, readback: bool, chunk_size: int
) -> tuple[Run, ChildResult]:
    compression = "zstd" if image.path.suffix == ".zst" else "none"
    job = ChildJob(
        image.url,
        str(device),
        image.size,
        image.sha256,
        compression,
        raw.size,
        raw.sha256,
        readback,
        chunk_size,
    )
    t0 = time.monotonic()
    done = run(
        [sys.executable, "-m", "bench.install_child", json.dumps(asdict(job))],
        timeout=1800,
        env={"PYTHONPATH": str(ROOT)},
    )
    wall = time.monotonic() - t0
    result = ChildResult(**json.loads(done.text.strip().splitlines()[-1]))
    return Run(result.seconds, wall, result.peak_rss_kib, result.rss_after_imports_kib), result


def run_baseline(image: Image, device: Path) -> Run:
    t0 = time.monotonic()
    run(["bash", "-c", BASELINE.format(url=image.url, dev=device)], timeout=1800)
    wall = time.monotonic() - t0
    return Run(wall, wall)


def curl_speed(url: str) -> float:
    """What curl alone reads from the server, in MB/s: the server must not be the limit."""
    done = run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", url], timeout=600)
    return float(done.text) / MB


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- the machine ----------------------------------------------------------------------------


def _read(path: str, default: str = "?") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo", "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def ram_gib() -> float:
    for line in _read("/proc/meminfo", "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / MIB
    return 0.0


def disk_backing(path: Path) -> str:
    """The file system and block device under ``path``, e.g. "ext4 on /dev/vda (virtio_blk)"."""
    try:
        source, fstype = run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(path)]).text.split()
    except Exception:  # a description only: never fail the benchmark over it
        return "?"
    name = Path(source).name
    sys_dir = Path("/sys/class/block") / name
    if (sys_dir / "partition").exists():
        sys_dir = sys_dir.resolve().parent
    details = []
    with contextlib.suppress(OSError):
        details.append(Path(os.readlink(sys_dir / "device" / "driver")).name)
    rotational = _read(str(sys_dir / "queue" / "rotational"), "")
    if rotational:
        details.append("rotational" if rotational == "1" else "non-rotational")
    extra = f" ({', '.join(details)})" if details else ""
    return f"{fstype} on {source}{extra}"


def host_description() -> dict[str, str]:
    """CPU, cores, RAM, kernel, Python: what every benchmark records of its machine."""
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{ram_gib():.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine(workdir: Path, device: Path) -> dict[str, str]:
    dio = _read(f"/sys/block/{device.name}/loop/dio", "?")
    return {
        **host_description(),
        "disk": disk_backing(workdir),
        "target": f"{device} (loop, direct-io {'on' if dio == '1' else 'off'}) over a file",
    }


# ---- orchestration --------------------------------------------------------------------------


def check_prerequisites(workdir: Path, needed: int) -> None:
    if os.geteuid() != 0:
        sys.exit("bench: needs root (losetup); run `sudo make bench`")
    missing = [t for t in ("curl", "openssl", "dd", "bash", "losetup") if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing tools: {', '.join(missing)}")
    free = shutil.disk_usage(workdir).free
    if free < needed:
        sys.exit(
            f"bench: needs {needed / 2**30:.1f} GiB free under {workdir}, has "
            f"{free / 2**30:.1f} GiB (try --skip-4g or a smaller --size-mib)"
        )


@contextlib.contextmanager
def loop_over(path: Path, size: int) -> Iterator[Path]:
    with path.open("wb") as f:
        f.truncate(size)  # sparse: blocks are allocated as the runs write them
    with loop_device(path) as dev:
        yield dev


def alternate(rounds: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    for r in range(rounds):
        for step in (first, second) if r % 2 == 0 else (second, first):
            step()


def line(label: str, value: str) -> None:
    say(f"  {label:<44} {value}")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MIB
    big = args.big_mib * MIB
    chunk_size = args.chunk_size
    (ROOT / "bench-run").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="install-throughput-", dir=ROOT / "bench-run"))
    results: dict[str, Any] = {}
    try:
        # image + zstd copy + the backing file written in full; the big run's backing file
        needed = 3 * size + (0 if args.skip_4g else big) + 512 * MIB
        check_prerequisites(work, needed)
        www = work / "www"
        www.mkdir()
        t0 = time.monotonic()
        say(f"bench: {args.size_mib} MiB random image, zstd copy; in {work}")
        raw_sha = make_random(www / "image.raw", size)
        zst_sha = compress_zstd(www / "image.raw", www / "image.raw.zst")
        for f in www.iterdir():
            warm(f)
        say(f"  made in {time.monotonic() - t0:.1f} s")

        with RepoServer(www) as server, loop_over(work / "target.img", size) as dev:
            raw = Image(www / "image.raw", f"{server.url}/image.raw", size, raw_sha)
            zst_size = (www / "image.raw.zst").stat().st_size
            zst = Image(www / "image.raw.zst", f"{server.url}/image.raw.zst", zst_size, zst_sha)
            results["machine"] = machine(work, dev)
            say("machine:")
            for k, v in results["machine"].items():
                line(k, v)
            say(f"settings: chunk_size {chunk_size} bytes, {args.rounds} rounds, medians")

            server_speed = median([curl_speed(raw.url) for _ in range(3)])
            results["server_mbps"] = server_speed
            line("server alone (curl -o /dev/null)", f"{server_speed:8.0f} MB/s")

            ours: list[Run] = []
            base: list[Run] = []
            say("warm-up: one unmeasured run of each")
            run_baseline(raw, dev)
            run_ours(raw, raw, dev, readback=False, chunk_size=chunk_size)

            def one_ours() -> None:
                r, _ = run_ours(raw, raw, dev, readback=False, chunk_size=chunk_size)
                ours.append(r)
                say(
                    f"    ours      {mbps(size, r.seconds):8.0f} MB/s  (peak RSS "
                    f"{r.peak_rss_kib / 1024:.1f} MiB)"
                )

            def one_base() -> None:
                r = run_baseline(raw, dev)
                base.append(r)
                say(f"    baseline  {mbps(size, r.seconds):8.0f} MB/s")

            say("ours vs baseline, alternating:")
            alternate(args.rounds, one_ours, one_base)

            zstd_runs = [
                run_ours(zst, raw, dev, readback=False, chunk_size=chunk_size)[0]
                for _ in range(args.rounds)
            ]
            readback_runs = [
                run_ours(raw, raw, dev, readback=True, chunk_size=chunk_size)[0]
                for _ in range(args.rounds)
            ]

        ours_mbps = median([mbps(size, r.seconds) for r in ours])
        ours_wall_mbps = median([mbps(size, r.wall_s) for r in ours])
        base_mbps = median([mbps(size, r.seconds) for r in base])
        ratio = ours_mbps / base_mbps
        peak_1g = max(r.peak_rss_kib for r in ours) / 1024
        imports = median([r.rss_after_imports_kib for r in ours]) / 1024
        results.update(
            size_bytes=size,
            ours_runs_mbps=[mbps(size, r.seconds) for r in ours],
            baseline_runs_mbps=[mbps(size, r.seconds) for r in base],
            ours_mbps=ours_mbps,
            ours_wall_mbps=ours_wall_mbps,
            baseline_mbps=base_mbps,
            ratio=ratio,
            ratio_wall=ours_wall_mbps / base_mbps,
            zstd_mbps=median([mbps(size, r.seconds) for r in zstd_runs]),
            zstd_peak_rss_mib=max(r.peak_rss_kib for r in zstd_runs) / 1024,
            readback_mbps=median([mbps(size, r.seconds) for r in readback_runs]),
            peak_rss_mib=peak_1g,
            rss_after_imports_mib=imports,
        )

        if not args.skip_4g:
            say(f"peak RSS of one {args.big_mib} MiB install (sparse all-zero image):")
            big_sha = make_zeros(www / "big.raw", big)
            with RepoServer(www) as server, loop_over(work / "big-target.img", big) as dev:
                big_image = Image(www / "big.raw", f"{server.url}/big.raw", big, big_sha)
                r, _ = run_ours(big_image, big_image, dev, readback=False, chunk_size=chunk_size)
            results["big_size_bytes"] = big
            results["big_peak_rss_mib"] = r.peak_rss_kib / 1024
            results["big_mbps"] = mbps(big, r.seconds)

        report(args, results)
        results["seconds_total"] = time.monotonic() - t0
        say(f"bench: done in {results['seconds_total']:.0f} s")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    size_mib = r["size_bytes"] // MIB
    say(f"\nresults ({size_mib} MiB image over loopback HTTP onto a loop device, fsync):")
    line("ours, read-back off (install call)", f"{r['ours_mbps']:8.0f} MB/s")
    line("  the same, timing the whole process", f"{r['ours_wall_mbps']:8.0f} MB/s")
    line("baseline curl | tee >(openssl) | dd", f"{r['baseline_mbps']:8.0f} MB/s")
    verdict = "meets" if r["ratio"] >= GOAL_RATIO else "MISSES"
    line("ratio ours / baseline", f"{r['ratio']:8.2f}   ({verdict} the goal >= {GOAL_RATIO})")
    line("  the same, timing the whole process", f"{r['ratio_wall']:8.2f}")
    line("ours, zstd (random data: stored blocks)", f"{r['zstd_mbps']:8.0f} MB/s")
    line("ours, read-back on", f"{r['readback_mbps']:8.0f} MB/s")
    line("interpreter + install path imports", f"{r['rss_after_imports_mib']:8.1f} MiB")
    peak = r["peak_rss_mib"]
    line(f"peak RSS, {size_mib} MiB image", f"{peak:8.1f} MiB")
    line(f"peak RSS, {size_mib} MiB zstd image", f"{r['zstd_peak_rss_mib']:8.1f} MiB")
    if "big_peak_rss_mib" in r:
        big_mib = r["big_size_bytes"] // MIB
        big = r["big_peak_rss_mib"]
        line(f"peak RSS, {big_mib} MiB image", f"{big:8.1f} MiB  ({r['big_mbps']:.0f} MB/s)")
        worst = max(peak, big)
        verdict = "meets" if worst <= GOAL_RSS_MIB else "MISSES"
        line(
            "RSS goal (<= 64 MiB, flat)",
            f"{verdict}: {worst:.1f} MiB, {big - peak:+.1f} MiB from {size_mib} to {big_mib} MiB",
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs of each (default 3)")
    p.add_argument("--big-mib", type=int, default=4096, help="the RSS run's image (default 4096)")
    p.add_argument("--skip-4g", action="store_true", help="skip the large-image RSS run")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=InstallConfig().chunk_size,
        help="bytes per read/write (default: the agent's default)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    configure(logging.WARNING)
    results = bench(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
