"""Power cuts: record every write and flush a disk receives, then rebuild the disk
as a power cut at any point would have left it.

Killing a process tests less: the page cache survives the kill, so a missing
fsync passes. Here the disk is an nbdkit RAM disk (:mod:`devtools.nbdrecord`)
mounted as a plain file with nbdfuse, in place of a host's disk image, so the
code under test writes to it as it would to any file or block device; every
request is logged in the order the disk saw it.

What this kernel does with such a file (measured, nbdfuse 1.14, FUSE without
writeback caching): every ``write(2)``, buffered or ``O_DIRECT`` (opening with
``O_DIRECT`` works), reaches the disk as an NBD write when the call is made
(FUSE passes writes through, it does not hold them back); ``fsync`` and
``fdatasync`` become an NBD flush, even with nothing dirty; FUA is never
sent. A loop device on the file (for a file system on one of its partitions)
turns the file system's cache flushes into flushes of the file, so an ext4
journal commit is a flush in the log too.

The model of the disk (that of any disk with a volatile write cache, and of
NBD itself): a write is durable once a flush that started after it completed,
or at once when it came with FUA. At a cut, everything before the last
completed flush is on the media; of the writes after it, any subset may be,
in any order, and each may be torn between sectors (:data:`SECTOR` bytes are
written whole, as a 4 KiB-sector disk does). :func:`cut_points` and
:func:`cut_plans` choose the cuts.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from devtools import nbdrecord
from devtools.diskimage import loop_device
from devtools.nbdrecord import FLUSH, WRITE, Op, read_log
from updater.run import minimal_env, run

log = structlog.get_logger(__name__)

PLUGIN = Path(nbdrecord.__file__).resolve()
# Bytes a disk writes whole: the physical sector of current disks (4Kn and 512e
# alike). A cut may tear a larger write at these boundaries. (At 512 bytes,
# ext4's own superblock tears on a file system with 1 KiB blocks and the
# kernel refuses to mount it: a limit of ext4 on such disks, not of ours.)
SECTOR = 4096
READY_TIMEOUT_S = 15.0


# ---- recording ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """The disk as it was when recording began, and every request it got after."""

    base: bytes
    ops: tuple[Op, ...]

    @property
    def writes(self) -> int:
        return sum(op.kind == WRITE for op in self.ops)

    @property
    def flushes(self) -> int:
        return sum(op.kind == FLUSH for op in self.ops)

    @property
    def written_bytes(self) -> int:
        return sum(len(op.data) for op in self.ops)

    def flush_indices(self) -> list[int]:
        return [op.index for op in self.ops if op.kind == FLUSH]

    def last_flush(self, at: int) -> int:
        """Index of the last flush among ``ops[:at]``; -1 if there is none."""
        for op in reversed(self.ops[:at]):
            if op.kind == FLUSH:
                return op.index
        return -1

    def in_flight(self, at: int) -> list[Op]:
        """The writes among ``ops[:at]`` that a cut at ``at`` may have lost."""
        return [
            op for op in self.ops[self.last_flush(at) + 1 : at] if op.kind == WRITE and not op.fua
        ]

    def touching(self, offset: int, size: int) -> list[Op]:
        """The writes that changed any byte of ``[offset, offset + size)``."""
        return [
            op
            for op in self.ops
            if op.kind == WRITE and op.offset < offset + size and offset < op.offset + len(op.data)
        ]


def _is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)


@contextlib.contextmanager
def recorded_disk(disk: Path, workdir: Path) -> Iterator[Path]:
    """Mount a recording RAM disk over the file ``disk``, seeded with its bytes.

    In the block, ``disk`` is the nbdfuse file: what is written to it goes to
    the RAM disk and into the log, and the file underneath is not touched.
    Yields the log's path; read it (:func:`load`) after the block, once the
    server has exited. nbdfuse is unmounted and its processes gone afterwards,
    whatever happened in the block.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    seed = workdir / "seed.img"
    ops_log = workdir / "ops.log"
    pidfile = workdir / "nbdfuse.pid"
    errors = workdir / "nbdfuse.err"
    shutil.copyfile(disk, seed)
    with errors.open("wb") as err:
        proc = subprocess.Popen(
            [
                "nbdfuse",
                "-P",
                str(pidfile),
                str(disk),
                "--command",
                "nbdkit",
                "-s",
                "--exit-with-parent",
                "python",
                str(PLUGIN),
                f"disk={seed}",
                f"log={ops_log}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=minimal_env(),
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (pidfile.exists() and _is_mounted(disk)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"nbdfuse did not come up (exit {proc.poll()}): {errors.read_text().strip()}"
                )
            time.sleep(0.02)
        log.debug("recorded_disk_mounted", disk=str(disk), log=str(ops_log))
        yield ops_log
    finally:
        _unmount(disk, proc)


def _unmount(disk: Path, proc: subprocess.Popen[bytes]) -> None:
    for attempt in range(20):
        if not _is_mounted(disk):
            break
        # lazily on the last tries: something still holding the file must not leave
        # the mount (and its server) behind
        lazy = ["-z"] if attempt >= 15 else []
        if run(["fusermount3", "-u", *lazy, str(disk)], check=False).returncode == 0:
            break
        time.sleep(0.1)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()  # nbdkit runs --exit-with-parent: it goes too
        proc.wait(timeout=10)


@contextlib.contextmanager
def mounted_ext4(image: Path, offset: int, size: int, where: Path) -> Iterator[Path]:
    """The ext4 file system at ``offset`` of ``image`` mounted on ``where`` (a loop
    device); unmounted and detached afterwards. Mounting replays its journal, as
    a boot after a power cut would."""
    where.mkdir(parents=True, exist_ok=True)
    with loop_device(image, offset=offset, sizelimit=size) as device:
        run(["mount", "-t", "ext4", str(device), str(where)])
        try:
            yield where
        finally:
            run(["umount", str(where)])


def make_ext4(image: Path, offset: int, size: int, label: str) -> None:
    """Format ``size`` bytes at ``offset`` of ``image`` as an empty ext4 file system."""
    with tempfile.TemporaryDirectory(prefix="ext4-") as tmp:
        fs = Path(tmp) / "fs.img"
        with fs.open("wb") as fh:
            fh.truncate(size)
        # 4 KiB blocks, as on any /var of real size (mkfs picks 1 KiB for a small one)
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", label, "-E", "root_owner=0:0", str(fs)])
        with image.open("r+b") as out, fs.open("rb") as src:
            out.seek(offset)
            shutil.copyfileobj(src, out)


def load(base_image: Path, ops_log: Path) -> Recording:
    """The recording made by :func:`recorded_disk` (``base_image``: its seed.img)."""
    return Recording(base_image.read_bytes(), tuple(read_log(ops_log)))


# ---- cuts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Power lost after ``ops[:at]``; of the writes in flight, ``kept`` reached the media.

    ``kept`` maps a write's index to the sectors of it that were written (the
    disk's sector numbers), or None for all of it; a write not named was lost.
    """

    at: int
    kept: Mapping[int, frozenset[int] | None] = field(default_factory=dict)
    how: str = "flushed"

    def outcome(self, rec: Recording) -> tuple[object, ...]:
        """Equal for two cuts that leave the same disk (cheap: no bytes compared)."""
        last = rec.last_flush(self.at)
        fua = tuple(op.index for op in rec.ops[last + 1 : self.at] if op.kind == WRITE and op.fua)
        return (last, fua, tuple(sorted(self.kept.items(), key=lambda kv: kv[0])))

    def region(self, rec: Recording, offset: int, size: int) -> tuple[object, ...]:
        """Equal for two cuts that leave the same bytes in ``[offset, offset + size)``."""
        last = rec.last_flush(self.at)
        ops = rec.touching(offset, size)
        flushed = sum(1 for op in ops if op.index < last)  # a prefix: all of them landed
        flight = tuple(
            (op.index, None if op.fua else self.kept[op.index])
            for op in ops
            if last < op.index < self.at and (op.fua or op.index in self.kept)
        )
        return (flushed, flight)

    def describe(self, rec: Recording) -> str:
        return (
            f"cut after op {self.at}/{len(rec.ops)} (last flush: op {rec.last_flush(self.at)}),"
            f" {self.how}: {len(self.kept)} of {len(rec.in_flight(self.at))} writes in flight kept"
        )


def _sectors(op: Op) -> range:
    return range(op.offset // SECTOR, -(-(op.offset + len(op.data)) // SECTOR))


def _apply(disk: bytearray, op: Op, sectors: frozenset[int] | None = None) -> None:
    if sectors is None:
        disk[op.offset : op.offset + len(op.data)] = op.data
        return
    end = op.offset + len(op.data)
    for s in sectors:
        lo, hi = max(op.offset, s * SECTOR), min(end, (s + 1) * SECTOR)
        if lo < hi:
            disk[lo:hi] = op.data[lo - op.offset : hi - op.offset]


class Rebuilder:
    """Disks as cuts left them, built in place: one buffer, no copy of a whole disk
    per cut. Cheapest when asked in increasing ``at`` order."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self._disk = bytearray(rec.base)
        self._applied = 0  # ops[:_applied] (up to a flush) are in _disk

    @contextlib.contextmanager
    def disk(self, cut: Cut) -> Iterator[bytearray]:
        """The disk ``cut`` leaves, valid inside the block only (it is then undone)."""
        upto = self.rec.last_flush(cut.at) + 1
        if upto < self._applied:
            self._disk, self._applied = bytearray(self.rec.base), 0
        for op in self.rec.ops[self._applied : upto]:
            if op.kind == WRITE:
                _apply(self._disk, op)
        self._applied = upto
        undo: list[tuple[int, bytes]] = []
        for op in self.rec.ops[upto : cut.at]:
            if op.kind == WRITE and (op.fua or op.index in cut.kept):
                undo.append((op.offset, bytes(self._disk[op.offset : op.offset + len(op.data)])))
                _apply(self._disk, op, None if op.fua else cut.kept[op.index])
        try:
            yield self._disk
        finally:
            for offset, old in reversed(undo):
                self._disk[offset : offset + len(old)] = old


def cut_points(rec: Recording, rng: random.Random, sampled_writes: int | None = None) -> list[int]:
    """Every flush boundary (just before a flush completes and just after), the
    start and the end, and right after each write (``sampled_writes`` of them,
    chosen at random; None: all)."""
    points = {0, len(rec.ops)}
    for i in rec.flush_indices():
        points.update((i, i + 1))
    writes = [op.index + 1 for op in rec.ops if op.kind == WRITE]
    if sampled_writes is not None:
        writes = rng.sample(writes, min(sampled_writes, len(writes)))
    points.update(writes)
    return sorted(points)


def cut_plans(rec: Recording, at: int, rng: random.Random, subsets: int) -> Iterable[Cut]:
    """The ways a cut at ``at`` can leave the writes in flight.

    None of them (only what a flush made durable); all of them; only the
    newest few (a disk may write its cache in any order, the latest first);
    and ``subsets`` random choices where each write is lost, kept or torn.
    """
    flight = rec.in_flight(at)
    yield Cut(at, {}, "flushed only")
    if not flight:
        return
    yield Cut(at, {op.index: None for op in flight}, "all issued")
    for n in sorted({1, 2, 3, len(flight) // 2}):
        if 0 < n < len(flight):
            yield Cut(at, {op.index: None for op in flight[-n:]}, f"newest {n} only")
    for k in range(subsets):
        kept: dict[int, frozenset[int] | None] = {}
        for op in flight:
            roll = rng.random()
            if roll < 0.4:
                kept[op.index] = None
            elif roll < 0.6:
                sectors = _sectors(op)
                kept[op.index] = frozenset(s for s in sectors if rng.random() < 0.5)
        yield Cut(at, kept, f"random subset {k}")


def write_file(path: Path, data: bytes | bytearray) -> None:
    """``data`` into ``path`` (a plain file), replacing what it held."""
    with path.open("wb") as fh:
        fh.write(data)
