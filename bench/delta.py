"""Delta updates against the full download: bytes on the wire and wall time.

``python -m bench.delta --size-mib 1024`` builds a base ext4 image and one
changed image per kind (:mod:`devtools.deltaimages`: 1 % in 100 places, 10 %,
an appended file, files that grow, a fresh image), publishes each with its
chunk index on a loopback repository (:class:`devtools.repo_server.RepoServer`),
and installs each twice onto a simulated host whose booted slot holds the base
image (the target slot empty): once as the agent does it (the delta path when
it saves at least ``[install] delta_min_saving``), once as a full download
(the index answered 404: today's path). Bytes are what the server sent for the
image and the index; the wall time is the agent's check + install, with the
disk file's pages dropped from the cache before each run; "scan" is the part of
it that read both slots and wrote the blocks found in place (the delta_planned
event's scan_seconds).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from structlog.testing import capture_logs

from bench.install_throughput import host_description
from devtools.deltaimages import PREVIOUS, make_pair_set
from devtools.gpgkeys import SigningKey, signing_key
from devtools.host import Host, provision, write_into
from devtools.repo_server import Fault, RepoServer
from updater import compose, config, slotindex
from updater.chunkindex import ChunkIndex
from updater.clock import SystemClock
from updater.delta import parse_index
from updater.log import configure
from updater.release import Published, ReleaseRequest, publish
from updater.state import SlotRecord, State, StateStore

MIB = 1024 * 1024
BOOTED, TARGET = "USR-A", "USR-B"  # a host provisioned on USR-A installs into USR-B
KINDS = ("one_pct", "ten_pct", "appended", "grown", "fresh")


@dataclass(frozen=True)
class Run:
    path: str  # delta | full (what the agent did)
    reason: str
    sent: int  # bytes the server sent: image + index
    seconds: float
    scan_seconds: float  # of those: the scan (both slots read, blocks in place written)
    pass2_seconds: float  # the rest of the plan: copies and Range requests
    hash_seconds: float  # the whole slot hashed from the device


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Setup:
    work: Path
    repo: Path
    server: RepoServer
    key: SigningKey
    base: Path  # the booted slot's image
    previous: Path | None  # the target slot's, as the agent wrote it (None: never written)
    # the releases of the booted and the target slot's images, whose indexes the agent
    # kept when it wrote them (None: it kept none)
    kept: tuple[Published, Published] | None = None


def _install(setup: Setup, pub: Published, *, full: bool) -> Run:
    work, server, base, key = setup.work, setup.server, setup.base, setup.key
    channel = pub.manifest.channel
    root = work / f"host-{channel}-{'full' if full else 'delta'}"
    host = provision(
        root,
        slot_size=base.stat().st_size + 4 * MIB,
        first_image=base,
        first_version="1.0.0",
        repo_url=server.url,
        keyring=key.public_key,
        channel=channel,
    )
    if setup.previous is not None:
        _hold_previous(host, setup)
    assert pub.index_path is not None
    index_path = "/" + str(pub.index_path.relative_to(setup.repo))
    server.clear_faults()
    if full:
        server.fault(index_path, Fault(status=404))
    _drop_cache(host.disk)
    before = len(server.requests)
    started = time.monotonic()
    up = compose.updater(config.load(host.config))
    check = up.check()
    assert check.update_available
    with capture_logs() as events:
        up.install(check)
    seconds = time.monotonic() - started
    (event,) = [e for e in events if e["event"] == "install_path"]
    planned = [e for e in events if e["event"] == "delta_planned"]
    scan = planned[0]["scan_seconds"] if planned else 0.0
    written = [e for e in events if e["event"] == "image_written" and e.get("delta")]
    pass2 = written[0]["pass2_seconds"] if written else 0.0
    hashed = written[0]["hash_seconds"] if written else 0.0
    sent = sum(r.sent for r in server.requests[before:] if r.path.startswith("/images/"))
    shutil.rmtree(root)
    return Run(event["path"], event.get("reason", ""), sent, seconds, scan, pass2, hashed)


def _hold_previous(host: Host, setup: Setup) -> None:
    """The target slot holds the release before the booted one, written by the agent
    (a host's second update onwards: A/B slots alternate); with ``setup.kept``, the
    agent wrote the booted slot too and kept both releases' indexes (its third update
    onwards)."""
    assert setup.previous is not None
    write_into(host.disk, host.layout.by_label(TARGET).offset, setup.previous)
    uuids = {s.slot.label: str(s.slot.part_uuid) for s in host.boot_control().slots()}
    kept = setup.kept
    slots = [(TARGET, setup.previous, "0.9.0", kept[1] if kept else None)]
    if kept is not None:
        slots.append((BOOTED, setup.base, "1.0.0", kept[0]))
    store = StateStore(host.state_dir)
    for label, image, version, pub in slots:
        raw = image.read_bytes()
        sha = None if pub is None else slotindex.save(host.state_dir, uuids[label], _index(pub))
        record = SlotRecord(
            label,
            "good",
            version,
            raw_size=len(raw),
            raw_sha256=hashlib.sha256(raw).hexdigest(),
            index_sha256=sha,
        )
        store.update(functools.partial(_with_slot, uuids[label], record))


def _with_slot(part_uuid: str, record: SlotRecord, state: State) -> State:
    return state.with_slot(part_uuid, record)


def _index(pub: Published) -> ChunkIndex:
    """The chunk index ``pub`` published (as the agent fetched and kept it)."""
    assert pub.index_path is not None
    return parse_index(pub.index_path.read_bytes(), pub.manifest.image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each install (median)")
    ap.add_argument(
        "--images",
        type=Path,
        help="build the images here once and reuse them (default: a temp dir)",
    )
    ap.add_argument(
        "--steady",
        action="store_true",
        help="the target slot holds the release before the booted one (as from a host's "
        "second update on), not bytes the agent never wrote",
    )
    ap.add_argument(
        "--kept",
        action="store_true",
        help="with --steady: the agent wrote both slots and kept their releases' chunk "
        "indexes (a host's third update on)",
    )
    args = ap.parse_args()
    kinds = tuple(args.kinds.split(","))
    # the agent's own log is not what this prints (capture_logs reads its events)
    configure(logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
    print("machine:", ", ".join(f"{k} {v}" for k, v in host_description().items()))
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        built = kinds + ((PREVIOUS,) if args.steady else ())
        images = _images(args.images or work / "images", args.size_mib * MIB, built)
        print(
            "target slot:",
            "holds the release before the booted one" if args.steady else "never written",
            "(both slots' indexes kept)" if args.steady and args.kept else "",
        )
        print(f"images ready in {time.monotonic() - t0:.0f} s ({args.size_mib} MiB each)")
        repo = work / "repo"
        with signing_key(work / "gnupg") as key, RepoServer(repo) as server:
            kept = None
            if args.steady and args.kept:  # their releases: the indexes the agent kept
                kept = (
                    _publish(repo, images["base"], key, "kept-base", "1.0.0"),
                    _publish(repo, images[PREVIOUS], key, "kept-previous", "0.9.0"),
                )
            for i, kind in enumerate(kinds):
                pub = _publish(repo, images[kind], key, kind, f"1.1.{i}")
                image = pub.manifest.image
                previous = images[PREVIOUS] if args.steady else None
                setup = Setup(work, repo, server, key, images["base"], previous, kept)
                fulls: list[Run] = []
                deltas: list[Run] = []
                for r in range(args.repeat):  # alternating, so a drift hits both alike
                    for is_full in (True, False) if r % 2 == 0 else (False, True):
                        (fulls if is_full else deltas).append(_install(setup, pub, full=is_full))
                full, delta = _median(fulls), _median(deltas)
                ratios = [d.seconds / f.seconds for f, d in zip(fulls, deltas, strict=True)]
                print(
                    f"{kind:9s} image {image.size / MIB:8.2f} MiB | "
                    f"full: {full.sent / MIB:8.2f} MiB {full.seconds:6.2f} s | "
                    f"agent ({delta.path}{', ' + delta.reason if delta.reason else ''}): "
                    f"{delta.sent / MIB:8.2f} MiB ({100 * delta.sent / full.sent:5.1f} %) "
                    f"{delta.seconds:6.2f} s (scan {delta.scan_seconds:.2f} s, "
                    f"rest of the plan {delta.pass2_seconds:.2f} s, "
                    f"slot hash {delta.hash_seconds:.2f} s) | "
                    f"agent / full {delta.seconds / full.seconds:.2f}"
                    + (
                        f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})"
                        if len(ratios) > 1
                        else ""
                    ),
                    flush=True,
                )


def _median(runs: list[Run]) -> Run:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def _images(where: Path, size: int, kinds: tuple[str, ...]) -> dict[str, Path]:
    """The base image and one per kind in ``where``, built unless all are there."""
    names = {"base": where / "base.img", **{k: where / f"{k}.img" for k in kinds}}
    marker = where / f"built-{size}"
    if marker.exists() and all(p.exists() for p in names.values()):
        return names
    shutil.rmtree(where, ignore_errors=True)
    images = make_pair_set(where, size, kinds)
    marker.touch()
    return images


def _publish(repo: Path, image: Path, key: SigningKey, channel: str, version: str) -> Published:
    # each kind in its own channel and version (image directory): all stay served
    return publish(
        ReleaseRequest(
            image=image,
            version=version,
            repo=repo,
            gnupghome=key.gnupghome,
            key_id=key.fingerprint,
            channel=channel,
        ),
        SystemClock().now(),
    )


if __name__ == "__main__":
    main()
