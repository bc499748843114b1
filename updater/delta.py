"""The delta install (issue 14): build the new image in the target slot from the
blocks the host already has, and download only the rest.

Before anything changes, :func:`fetch_index` fetches the chunk index the signed
manifest names (:mod:`updater.chunkindex`, checked against the manifest's size
and sha256). Then, once the target is unbootable, :func:`write_delta`:

1. **scans** the slots in one pass of large reads (a reader thread, the
   caller's thread and a helper hashing, a writer thread writing): the booted
   slot is hashed per 4 KiB, and a block that the booted slot holds at its own
   place (most blocks of an updated image stay where they were) is written into
   the target from the buffer just read, at once. When the agent wrote the
   target before (the release before the booted one, or an earlier, broken
   install), the target is read first and hashed at each block's own place: a
   block it already holds is kept, not written, and the booted slot is read
   only around the blocks it lacks. Only around blocks that are not in place is
   the digest of the 64 KiB window at every 4 KiB offset computed, to find
   blocks a file system moved;
2. **plans** the rest (:mod:`updater.deltaplan`): the blocks found elsewhere in
   the booted slot are copied, the others fetched as Range requests into the
   published image, each frame decompressed (bounded) and checked against its
   block digest before it is written;
3. hashes the **whole slot from the device**, past the page cache (O_DIRECT),
   in a thread that reads behind step 2 (:class:`Watermark`): nothing may boot
   unless it is the manifest's raw sha256, whatever the index said.

Rules (:class:`updater.installer.Installer` applies them):

- **fall back to the full download** when there is nothing to use: no index in
  the manifest (or the source has none), the index cannot be fetched (404, a
  network error), the plan saves less than ``[install] delta_min_saving`` of
  the download, or the server ignores Range (a 200 to a Range request, at any
  point). The target is unbootable from before the scan: the full download
  then rewrites the whole slot;
- **refuse the update** (a typed error, nothing bootable) when something lies:
  index bytes that are not the signed ones (``size_mismatch``,
  ``hash_mismatch``), a signed index that does not cut the image into frames
  in order (``index_malformed``): both before anything changes; a frame that
  does not inflate to its block (``decompress_failed``, ``hash_mismatch``), a
  slot that does not hash to the manifest's raw sha256 at the end
  (``hash_mismatch``). Exactly as a full download refuses an image that is not
  the signed one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import mmap
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
import zstandard

from updater import chunkindex
from updater.chunkindex import ChunkIndex
from updater.decompress import ZSTD_MAX_WINDOW
from updater.deltaplan import Plan, plan
from updater.errors import Cancelled, DiskError, DownloadError, UpdaterError, VerificationError
from updater.install import Progress, ProgressFn, Stage, Stopped, hash_slot
from updater.manifest import ImageRef
from updater.slotio import SlotDevice, aligned_buffer
from updater.transport import ByteStream, Transport

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

DIGEST = 32  # bytes of a sha256
SCAN_BUFFERS = 3  # chunk buffers in flight between the scan's reader, hasher and writer
SCAN_READ = 4 * 1024 * 1024  # bytes a scan read (at least): large reads, fewer syscalls
_LAZY = -1  # a scan chunk's booted bytes: read only where the target lacks a block


class RangeIgnored(Exception):
    """The server answered a Range request with the whole file: fall back."""


class StaleSlot(Exception):
    """A block copied on a kept index's word is not that block: fall back."""


@dataclass(frozen=True)
class Declined:
    """No delta install: why, and what it would have downloaded (if planned)."""

    # disabled | no_index | index_unavailable | saving_too_small | range_ignored |
    # slot_index_stale
    reason: str
    planned_bytes: int | None = None
    index_bytes: int = 0


@dataclass(frozen=True)
class DeltaWritten:
    downloaded: int  # bytes of frames
    planned_bytes: int  # bytes of frames the plan fetches
    seconds: float


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled", "the install was stopped")


def fetch_index(transport: Transport, url: str, image: ImageRef) -> ChunkIndex | None:
    """The image's chunk index, exactly the signed one; None when it cannot be had."""
    ref = image.index
    assert ref is not None
    try:
        result = transport.get(url, max_bytes=ref.size)
    except DownloadError as exc:
        if exc.kind == "too_much_data":
            raise VerificationError(
                "size_mismatch", f"chunk index {url}: more than the signed {ref.size} bytes"
            ) from None
        log.warning("delta_index_unavailable", url=url, error_kind=exc.kind, error=exc.message)
        return None
    assert result.body is not None  # no ETag was sent: never Not Modified
    return parse_index(result.body, image)


def parse_index(data: bytes, image: ImageRef) -> ChunkIndex:
    """``data`` as the chunk index the signed manifest names for ``image``."""
    ref = image.index
    assert ref is not None
    return chunkindex.parse(
        data,
        size=ref.size,
        sha256=ref.sha256,
        block_size=ref.block_size,
        count=ref.count,
        raw_size=image.raw_size,
        image_size=image.size,
    )


@dataclass(frozen=True)
class Scanned:
    """What the scan found, and what it already wrote."""

    held: list[bytes | None]  # per block: its digest where the target now holds it
    found: dict[bytes, int]  # block digest -> a raw offset in the booted slot holding it
    kept: int  # blocks the target held already
    in_place: int  # blocks written from the booted slot's same place
    seconds: float
    booted_bytes: int  # of the booted slot, read (the target held the rest)


# A chunk read by the scan: its slot position, its buffer, bytes of the booted slot
# and of the target in it (the target's from ``step`` on).
_Chunk = tuple[int, mmap.mmap, int, int]
# The runs of a chunk to write (slot position, start in the buffer, length), and it.
_Runs = tuple[list[tuple[int, int, int]], mmap.mmap]


class _Scan:
    """Pass 1: a reader thread reads both slots a chunk at a time, the caller's thread
    hashes and decides, a writer thread writes the blocks found in place."""

    def __init__(
        self,
        index: ChunkIndex,
        *,
        booted: SlotDevice,
        booted_length: int,
        held: SlotDevice | None,
        device: SlotDevice,
        chunk_size: int,
        cancel: threading.Event | None,
    ) -> None:
        bs = index.block_size
        self.index = index
        self.booted = booted
        self.held_device = held
        self.device = device
        size = max(chunk_size, SCAN_READ)
        self.step = max(bs, size - size % bs)  # whole blocks a read
        length = min(booted_length, booted.size)
        self.booted_end = length - length % chunkindex.SUB_BLOCK
        self.end = self.booted_end if held is None else max(self.booted_end, index.raw_size)
        self.stage = Stage(cancel)
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(SCAN_BUFFERS):
            self.free.put(aligned_buffer(self.step * (2 if held is not None else 1)))
        self.chunks: queue.Queue[_Chunk | None] = queue.Queue(SCAN_BUFFERS)
        self.to_write: queue.Queue[_Runs | None] = queue.Queue(SCAN_BUFFERS)
        self.digests = [e.digest for e in index.entries]
        self.wanted = set(self.digests)
        self.held: list[bytes | None] = [None] * len(self.digests)
        self.found: dict[bytes, int] = {}
        self.kept = 0
        self.in_place = 0
        # the last booted block: number, sub-digests, whether it is in place
        self._prev: tuple[int, list[bytes], bool] | None = None
        self.helper: concurrent.futures.Executor  # a second hashing thread, while run() runs
        self._first = 0  # the block the chunk being decided starts with
        self.booted_read = 0  # bytes of the booted slot read

    def run(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="delta-scan-hash") as h:
            self.helper = h
            self._run()

    def _run(self) -> None:
        stage = self.stage
        threads = [
            threading.Thread(target=self._guard, args=(self._read,), name="delta-scan-read"),
            threading.Thread(target=self._guard, args=(self._write,), name="delta-scan-write"),
        ]
        for t in threads:
            t.daemon = True
            t.start()
        try:
            self._guard(self._hash)
        finally:
            for t in threads:
                t.join()
        if stage.error is not None:
            err = stage.error
            if isinstance(err, UpdaterError):
                raise err
            if isinstance(err, OSError):
                raise DiskError("io", f"{self.device.path}: {err}") from err
            raise err

    def _guard(self, work: object) -> None:
        assert callable(work)
        try:
            work()
        except Stopped:
            pass
        except BaseException as exc:
            self.stage.fail(exc)

    def _read(self) -> None:
        stage, step, raw_size = self.stage, self.step, self.index.raw_size
        for pos in range(0, self.end, step):
            buf = stage.get(self.free)
            view = memoryview(buf)
            bn = tn = 0
            if self.held_device is not None and pos < raw_size:
                # the target first: the booted slot is read only where it lacks a block
                tn = self.held_device.read_at(view[step : step + min(step, raw_size - pos)], pos)
                bn = _LAZY
            elif pos < self.booted_end:
                bn = self.booted.read_at(view[: min(step, self.booted_end - pos)], pos)
                bn -= bn % chunkindex.SUB_BLOCK
                self.booted_read += bn
            stage.put(self.chunks, (pos, buf, bn, tn))
        stage.put(self.chunks, None)

    def _write(self) -> None:
        stage = self.stage
        while (item := stage.get(self.to_write)) is not None:
            runs, buf = item
            view = memoryview(buf)
            for pos, start, length in runs:
                self.device.seek(pos)
                self.device.write(view[start : start + length])
            self.free.put(buf)

    def _hash(self) -> None:
        stage = self.stage
        while (item := stage.get(self.chunks)) is not None:
            pos, buf, bn, tn = item
            stage.put(self.to_write, (self._chunk(pos, memoryview(buf), bn, tn), buf))
        stage.put(self.to_write, None)

    def _chunk(self, pos: int, view: memoryview, bn: int, tn: int) -> list[tuple[int, int, int]]:
        """Decide the blocks of the chunk at ``pos``; the runs to write from it."""
        bs, sub = self.index.block_size, chunkindex.SUB_BLOCK
        per = bs // sub
        self._first = pos // bs
        if bn == _LAZY:
            held = self._held_blocks(view, tn)
            booted = self._read_booted_around(pos, view, held)
        else:
            # the 4 KiB digests on both cores (hashlib lets go of the GIL while hashing)
            half = bn // 2 - (bn // 2) % sub
            theirs = self.helper.submit(_sub_digests, view[half:bn])
            subs = _sub_digests(view[:half]) + theirs.result()
            n = -(-bn // bs)
            held = [False] * n
            booted = [(subs[b * per : (b + 1) * per], min(bs, bn - b * bs)) for b in range(n)]
        runs = self._decide(pos, view, held, booted)
        self.stage.check_cancel()
        return runs

    def _held_blocks(self, view: memoryview, tn: int) -> list[bool]:
        """Per block of the chunk: whether the target holds it at its place already."""
        index, bs, step = self.index, self.index.block_size, self.step
        per = bs // chunkindex.SUB_BLOCK
        whole = tn - tn % bs
        half = whole // 2 - (whole // 2) % bs
        theirs = self.helper.submit(_sub_digests, view[step + half : step + whole])
        t_subs = _sub_digests(view[step : step + half]) + theirs.result()
        first, count = self._first, len(self.digests)
        held = []
        for b in range(-(-tn // bs)):
            i, rel = first + b, b * bs
            if i >= count:
                held.append(False)
                continue
            _, blen = index.block(i)
            if rel + bs <= whole:
                digest = chunkindex.combine(t_subs[b * per : (b + 1) * per])
            elif rel + blen <= tn:
                digest = chunkindex.block_digest(view[step + rel : step + rel + blen])
            else:
                digest = None
            held.append(digest == self.digests[i])
        return held

    def _read_booted_around(
        self, pos: int, view: memoryview, held: list[bool]
    ) -> list[tuple[list[bytes], int]]:
        """Read the booted slot's blocks of the chunk where the target lacks one, and
        their neighbours (the windows of moved blocks span two blocks); per block, its
        4 KiB digests and the bytes read (none where the target holds it and its
        neighbours: those blocks are kept, nothing needs the booted bytes)."""
        bs, sub = self.index.block_size, chunkindex.SUB_BLOCK
        limit = max(0, min(self.step, self.booted_end - pos))  # booted bytes of the chunk
        n = max(len(held), -(-limit // bs))
        need = [False] * n
        for b in range(n):
            if b >= len(held) or not held[b]:
                for k in (b - 1, b, b + 1):
                    if 0 <= k < n:
                        need[k] = True
        out: list[tuple[list[bytes], int]] = [([], 0)] * n
        b = 0
        while b < n:
            if not need[b]:
                b += 1
                continue
            e = b
            while e < n and need[e]:
                e += 1
            start, end = b * bs, min(e * bs, limit)
            got = self.booted.read_at(view[start:end], pos + start) if start < end else 0
            got -= got % sub
            self.booted_read += got
            for k in range(b, e):
                avail = max(0, min(bs, got - (k - b) * bs))
                out[k] = (_sub_digests(view[k * bs : k * bs + avail]), avail)
            b = e
        return out

    def _decide(
        self,
        pos: int,
        view: memoryview,
        held: list[bool],
        booted: list[tuple[list[bytes], int]],
    ) -> list[tuple[int, int, int]]:
        """Per block: held by the target (kept), in place in the booted slot (written
        from ``view``), found elsewhere (remembered); the runs to write."""
        index, bs = self.index, self.index.block_size
        per = bs // chunkindex.SUB_BLOCK
        first, count = self._first, len(self.digests)
        runs: list[tuple[int, int, int]] = []
        for b in range(max(len(held), len(booted))):
            i, rel = first + b, b * bs
            block_subs, avail = booted[b] if b < len(booted) else ([], 0)
            d = chunkindex.combine(block_subs) if len(block_subs) == per else None
            if d is not None and d in self.wanted and d not in self.found:
                self.found[d] = pos + rel
            in_place = False
            if i < count:
                want = self.digests[i]
                _, blen = index.block(i)
                if blen == bs:
                    in_place = d == want
                elif blen <= avail:
                    in_place = chunkindex.block_digest(view[rel : rel + blen]) == want
                if b < len(held) and held[b]:
                    self.held[i] = want
                    self.kept += 1
                elif in_place:
                    self.held[i] = want
                    self.in_place += 1
                    if runs and runs[-1][1] + runs[-1][2] == rel:
                        p, s, n = runs[-1]
                        runs[-1] = (p, s, n + blen)
                    else:
                        runs.append((pos + rel, rel, blen))
            self._windows(i, block_subs, in_place)
        return runs

    def _windows(self, i: int, block_subs: list[bytes], in_place: bool) -> None:
        """The 64 KiB windows at the 4 KiB offsets inside booted block i - 1, where
        either it or block i is not in place (whole blocks: found by :meth:`_chunk`)."""
        prev = self._prev
        per = self.index.block_size // chunkindex.SUB_BLOCK
        self._prev = (i, block_subs, in_place) if len(block_subs) == per else None
        if prev is None or prev[0] != i - 1 or (prev[2] and in_place) or not block_subs:
            return
        if len(self.found) == len(self.wanted):
            return
        joined = memoryview(b"".join(prev[1] + block_subs))
        base = (i - 1) * self.index.block_size
        sha, found, wanted = hashlib.sha256, self.found, self.wanted
        for k in range(1, min(per, len(joined) // DIGEST - per + 1)):
            w = sha(joined[k * DIGEST : (k + per) * DIGEST]).digest()
            if w in wanted and w not in found:
                found[w] = base + k * chunkindex.SUB_BLOCK


def scan(
    index: ChunkIndex,
    *,
    booted: SlotDevice,
    booted_length: int,
    held: SlotDevice | None,
    device: SlotDevice,
    chunk_size: int,
    cancel: threading.Event | None = None,
) -> Scanned:
    """Pass 1 (see the module's text): ``device`` is the target, written; ``held`` the
    target read-only when the agent wrote it before (else None: not read)."""
    started = time.monotonic()
    s = _Scan(
        index,
        booted=booted,
        booted_length=booted_length,
        held=held,
        device=device,
        chunk_size=chunk_size,
        cancel=cancel,
    )
    s.run()
    return Scanned(s.held, s.found, s.kept, s.in_place, time.monotonic() - started, s.booted_read)


def _sub_digests(view: memoryview) -> list[bytes]:
    """The sha256 of each 4 KiB of ``view`` (a whole number of them)."""
    sha, sub = hashlib.sha256, chunkindex.SUB_BLOCK
    return [sha(view[k : k + sub]).digest() for k in range(0, len(view), sub)]


def _read_exact(stream: ByteStream, n: int, url: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = stream.read(n - got)
        if not piece:
            raise DownloadError("connection", f"{url}: a range ended {n - got} bytes early")
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _inflate(dctx: zstandard.ZstdDecompressor, frame: bytes, size: int, block: int) -> bytes:
    """Frame ``block``'s bytes, at most ``size`` + 1 of them (a frame that claims a
    huge content size never gets that memory)."""
    try:
        reader = dctx.stream_reader(frame, read_across_frames=False)
        parts: list[bytes] = []
        got = 0
        while got <= size:
            piece = reader.read(size + 1 - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
    except zstandard.ZstdError as exc:
        raise VerificationError(
            "decompress_failed", f"zstd frame of block {block}: {exc}"
        ) from None
    return b"".join(parts)


class Watermark:
    """How far the target slot holds its final bytes: pass 2 advances it as its
    writes land (in block order), the whole-slot hash waits on it."""

    def __init__(self) -> None:
        self._until = 0
        self._failed = False
        self._cond = threading.Condition()

    def advance(self, pos: int) -> None:
        with self._cond:
            if pos > self._until:
                self._until = pos
                self._cond.notify_all()

    def fail(self) -> None:
        """Pass 2 stopped: whoever waits stops too."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def wait(self, pos: int) -> None:
        """Return once the bytes before ``pos`` are final; Stopped if pass 2 failed."""
        with self._cond:
            while self._until < pos:
                if self._failed:
                    raise Stopped
                self._cond.wait()


class _WriteBehind:
    """A writer thread for pass 2: the caller fills pooled buffers (reads the booted
    slot, inflates frames) while the previous ones are written. It advances
    ``final`` past each write, and to each position :meth:`mark` names, in order."""

    def __init__(
        self, device: SlotDevice, size: int, cancel: threading.Event | None, final: Watermark
    ) -> None:
        self.device = device
        self.size = size  # bytes a buffer
        self.final = final
        self.stage = Stage(cancel)
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(SCAN_BUFFERS):
            self.free.put(aligned_buffer(size))
        # (slot position, buffer or None for a mark, bytes of it)
        self.queue: queue.Queue[tuple[int, mmap.mmap | None, int] | None] = queue.Queue(
            SCAN_BUFFERS + 1
        )
        self.thread = threading.Thread(target=self._write, name="delta-write", daemon=True)
        self.thread.start()

    def buffer(self) -> memoryview:
        return memoryview(self._call(self.stage.get, self.free))

    def write(self, pos: int, buf: memoryview, length: int) -> None:
        """Write ``buf[:length]`` (a buffer from :meth:`buffer`) at slot position ``pos``."""
        assert isinstance(buf.obj, mmap.mmap)
        self._call(self.stage.put, self.queue, (pos, buf.obj, length))

    def mark(self, pos: int) -> None:
        """Every byte before ``pos`` is final once the writes queued so far land."""
        self._call(self.stage.put, self.queue, (pos, None, 0))

    def close(self) -> None:
        """Wait for every write; raise the writer's error, if any."""
        try:
            self._call(self.stage.put, self.queue, None)
        finally:
            if self.stage.error is None:
                self.thread.join()
            else:
                self.stage.stop.set()
                self.thread.join()
        self._raise()

    def abandon(self) -> None:
        self.stage.stop.set()
        self.thread.join()

    def _call(self, f: Callable[..., _T], *args: object) -> _T:
        try:
            return f(*args)
        except Stopped:
            self._raise()
            raise

    def _raise(self) -> None:
        err = self.stage.error
        if err is None:
            return
        if isinstance(err, OSError):
            raise DiskError("io", f"{self.device.path}: {err}") from err
        raise err

    def _write(self) -> None:
        stage = self.stage
        try:
            while (item := stage.get(self.queue)) is not None:
                pos, buf, length = item
                if buf is not None:
                    self.device.seek(pos)
                    self.device.write(memoryview(buf)[:length])
                    self.free.put(buf)
                self.final.advance(pos + length)
        except Stopped:
            pass
        except BaseException as exc:
            stage.fail(exc)


class _Writer:
    """Pass 2: writes the rest of the plan into the target slot, in block order."""

    def __init__(
        self,
        transport: Transport,
        url: str,
        index: ChunkIndex,
        p: Plan,
        *,
        booted: SlotDevice,
        device: SlotDevice,
        chunk_size: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        final: Watermark,
        check_copies: bool = False,
    ) -> None:
        self.check_copies = check_copies  # copies on a kept index's word: check each block
        self.transport = transport
        self.url = url
        self.index = index
        self.plan = p
        self.booted = booted
        self.device = device
        self.progress = progress
        self.cancel = cancel
        self.writes = _WriteBehind(device, max(chunk_size, index.block_size), cancel, final)
        self.dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self.validator: str | None = None
        self.downloaded = 0
        self._reported = 0.0

    def run(self) -> None:
        try:
            self._run()
        except BaseException:
            self.writes.abandon()
            raise
        self.writes.close()

    def _run(self) -> None:
        index, p = self.index, self.plan
        count = len(index.entries)
        kept = set(p.keep)
        sources = {c.block: c.source for c in p.copy}
        ranges = {r.first: r for r in p.fetch}
        i = 0
        while i < count:
            _check_cancel(self.cancel)
            if i in kept:
                while i < count and i in kept:
                    i += 1
                continue
            self.writes.mark(index.block(i)[0])  # all before block i is final
            if i in ranges:
                r = ranges[i]
                self._fetch(r.first, r.last, r.offset, r.length)
                i = r.last + 1
            elif i in sources:
                i = self._copy(i, sources)
            else:  # the planner gives every block one of the three
                raise AssertionError(f"block {i} has no plan")
        self.writes.mark(index.raw_size)

    def _copy(self, i: int, sources: dict[int, int]) -> int:
        """Copy the run of blocks from ``i`` whose sources follow each other in the
        booted slot, up to a buffer's worth; the next block."""
        length = self.index.block(i)[1]
        src = sources[i]
        j = i + 1
        while (
            j in sources
            and sources[j] == src + (j - i) * self.index.block_size
            and length + self.index.block(j)[1] <= self.writes.size
        ):
            length += self.index.block(j)[1]
            j += 1
        buf = self.writes.buffer()
        if self.booted.read_at(buf[:length], src) != length:
            raise DiskError("io", f"the booted slot ends before {src + length} (block {i})")
        if self.check_copies:
            at = 0
            for k in range(i, j):
                _, size = self.index.block(k)
                if chunkindex.block_digest(buf[at : at + size]) != self.index.entries[k].digest:
                    raise StaleSlot(f"block {k}, read at {src + at} of the booted slot")
                at += size
        self.writes.write(self.index.block(i)[0], buf, length)
        return j

    def _fetch(self, first: int, last: int, offset: int, length: int) -> None:
        stream = self.transport.open_range(
            self.url, start=offset, length=length, if_range=self.validator
        )
        if stream is None:
            raise RangeIgnored
        pos = self.index.block(first)[0]
        buf = self.writes.buffer()
        filled = 0  # bytes of inflated blocks in buf, written together
        try:
            if self.validator is None:
                self.validator = stream.validator
            for i in range(first, last + 1):
                _check_cancel(self.cancel)
                e = self.index.entries[i]
                frame = _read_exact(stream, e.length, self.url)
                self.downloaded += e.length
                _, size = self.index.block(i)
                data = _inflate(self.dctx, frame, size, i)
                if len(data) != size or chunkindex.block_digest(data) != e.digest:
                    raise VerificationError(
                        "hash_mismatch",
                        f"block {i}: its frame at {e.offset}+{e.length} does not inflate "
                        "to the block the signed index names",
                        hint="the image on the server is not the one the index cuts up",
                    )
                if filled + size > len(buf):
                    self.writes.write(pos, buf, filled)
                    pos, buf, filled = pos + filled, self.writes.buffer(), 0
                buf[filled : filled + size] = data
                filled += size
                self._report()
            self.writes.write(pos, buf, filled)
        finally:
            stream.close()

    def _report(self) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._reported >= 0.2:
            self._reported = now
            self.progress(Progress("download", self.downloaded, self.plan.fetch_bytes))


@dataclass(frozen=True)
class Known:
    """What the agent's kept indexes (:mod:`updater.slotindex`) say the slots hold."""

    booted: ChunkIndex
    target: ChunkIndex | None  # None: the agent never wrote the target (not read)


def usable(index: ChunkIndex, known: Known) -> bool:
    """Whether the kept indexes cut their slots as ``index`` cuts the image."""
    return all(
        k.block_size == index.block_size and k.sub_block == index.sub_block
        for k in (known.booted, known.target)
        if k is not None
    )


def known_scan(
    index: ChunkIndex,
    known: Known,
    *,
    booted: SlotDevice,
    booted_length: int,
    cancel: threading.Event | None = None,
) -> Scanned:
    """Pass 1 from the kept indexes: a block the target's index has at its place is
    kept, a block the booted slot's index has anywhere (at a block boundary) is
    copied from there; the booted slot is read only around the blocks neither has,
    for the 64 KiB windows at 4 KiB offsets (blocks a file system moved)."""
    started = time.monotonic()
    digests = [e.digest for e in index.entries]
    wanted = set(digests)
    held: list[bytes | None] = [None] * len(digests)
    if known.target is not None:
        theirs = known.target.entries
        for i, d in enumerate(digests):
            if i < len(theirs) and theirs[i].digest == d:
                held[i] = d
    found: dict[bytes, int] = {}
    for j, e in enumerate(known.booted.entries):
        start, length = known.booted.block(j)
        if e.digest in wanted and e.digest not in found and start + length <= booted_length:
            found[e.digest] = start
    lacking = [i for i, d in enumerate(digests) if held[i] is None and d not in found]
    read = _windows_around(
        index, lacking, booted=booted, booted_length=booted_length, found=found, cancel=cancel
    )
    kept = sum(1 for h in held if h is not None)
    return Scanned(held, found, kept, 0, time.monotonic() - started, read)


def _windows_around(
    index: ChunkIndex,
    lacking: list[int],
    *,
    booted: SlotDevice,
    booted_length: int,
    found: dict[bytes, int],
    cancel: threading.Event | None,
) -> int:
    """Read the booted slot around each lacking block (it and its two neighbours)
    and add to ``found`` each wanted 64 KiB window at a 4 KiB offset there; the
    bytes read."""
    bs, sub = index.block_size, chunkindex.SUB_BLOCK
    per = bs // sub
    wanted = {e.digest for e in index.entries}
    limit = booted_length - booted_length % sub
    runs: list[tuple[int, int]] = []  # booted byte ranges, merged
    for i in lacking:
        a, b = max(0, (i - 1) * bs), min(limit, (i + 2) * bs)
        if a >= b:
            continue
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
        else:
            runs.append((a, b))
    read = 0
    buf = aligned_buffer(SCAN_READ + bs)
    for a, b in runs:
        pos = a
        while True:  # pieces of at most SCAN_READ + a block, overlapping by a block
            _check_cancel(cancel)
            end = min(b, pos + SCAN_READ + bs)
            view = memoryview(buf)[: end - pos]
            got = booted.read_at(view, pos)
            got -= got % sub
            read += got
            subs = _sub_digests(view[:got])
            for k in range(len(subs) - per + 1):
                w = chunkindex.combine(subs[k : k + per])
                if w in wanted and w not in found:
                    found[w] = pos + k * sub
            if end >= b or got < end - pos:
                break
            pos = end - bs
    return read


def _first_unfinished(index: ChunkIndex, p: Plan) -> int:
    """The slot position of the first block pass 2 writes (the raw size if none)."""
    todo = [r.first for r in p.fetch] + [c.block for c in p.copy]
    return index.block(min(todo))[0] if todo else index.raw_size


class _HashBehind:
    """The whole-slot hash (:func:`updater.install.hash_slot`) in its own thread, each
    read waiting until pass 2 has made those bytes final. Its progress is reported
    once ``reporting`` is set (pass 2 reports its own until then)."""

    def __init__(
        self,
        device: SlotDevice,
        image: ImageRef,
        chunk_size: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        *,
        final: Watermark,
    ) -> None:
        self.reporting = False
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._final = final

        def report(p: Progress) -> None:
            if self.reporting and progress is not None:
                progress(p)

        def run() -> None:
            try:
                self._digest = hash_slot(
                    device, image, chunk_size, report, cancel, ready=final.wait
                )
            except BaseException as exc:  # handed to the caller by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="delta-hash", daemon=True)
        self._thread.start()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def abandon(self) -> None:
        """Pass 2 failed (``final`` failed too): wait for the thread to stop."""
        self._final.fail()
        self._thread.join()


def write_delta(
    transport: Transport,
    url: str,
    index: ChunkIndex,
    image: ImageRef,
    *,
    index_bytes: int,
    booted: SlotDevice,
    booted_length: int,
    held: SlotDevice | None,
    device: SlotDevice,
    min_saving: float,
    chunk_size: int,
    known: Known | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> DeltaWritten | Declined:
    """Build the image in ``device`` from ``booted`` (its first ``booted_length``
    bytes), what ``held`` (the target, read-only; None: not read) holds and Range
    requests to ``url``; then hash the whole slot from the device. With ``known``
    (the agent's kept indexes of the slots), neither slot is scanned
    (:func:`known_scan`).

    Declined (fall back: the slot holds garbage, still unbootable) when the saving
    is below ``min_saving``, the server ignores Range, or a slot does not hold what
    its kept index says (``slot_index_stale``). Raises VerificationError,
    DownloadError or DiskError."""
    started = time.monotonic()
    if known is not None:
        found = known_scan(index, known, booted=booted, booted_length=booted_length, cancel=cancel)
    else:
        found = scan(
            index,
            booted=booted,
            booted_length=booted_length,
            held=held,
            device=device,
            chunk_size=chunk_size,
            cancel=cancel,
        )
    p = plan(index, found.found, found.held)
    fetched = sum(r.last - r.first + 1 for r in p.fetch)
    log.info(
        "delta_planned",
        planned_bytes=p.fetch_bytes,
        image_bytes=p.image_bytes,
        saving=round(p.saving, 4),
        blocks_kept=found.kept,
        blocks_in_place=found.in_place,
        blocks_copied=len(p.copy),
        blocks_fetched=fetched,
        ranges=len(p.fetch),
        booted_bytes=found.booted_bytes,
        from_kept_indexes=known is not None,
        scan_seconds=round(found.seconds, 3),
    )
    if p.saving < min_saving:
        return Declined("saving_too_small", p.fetch_bytes, index_bytes)
    final = Watermark()
    final.advance(_first_unfinished(index, p))  # the scan wrote or kept all before it
    writer = _Writer(
        transport,
        url,
        index,
        p,
        booted=booted,
        device=device,
        chunk_size=chunk_size,
        progress=progress,
        cancel=cancel,
        final=final,
        check_copies=known is not None,
    )
    pass2_started = time.monotonic()
    # 3. The whole-slot hash reads behind pass 2 (the bytes before its position are
    # final), past the page cache: only where the device is read with O_DIRECT (else
    # the reads would come from the pages pass 2 just wrote: it follows the sync).
    behind = (
        _HashBehind(device, image, chunk_size, progress, cancel, final=final)
        if device.direct
        else None
    )
    try:
        writer.run()
    except BaseException as exc:
        final.fail()
        if behind is not None:
            behind.abandon()
        if isinstance(exc, RangeIgnored):
            log.warning("delta_range_ignored", url=url)
            return Declined("range_ignored", p.fetch_bytes, index_bytes)
        if isinstance(exc, StaleSlot):
            log.warning("slot_index_stale", error=str(exc))
            return Declined("slot_index_stale", p.fetch_bytes, index_bytes)
        raise
    device.sync()
    pass2_seconds = time.monotonic() - pass2_started
    if behind is not None:
        behind.reporting = True
        on_disk = behind.result()
    else:
        on_disk = hash_slot(device, image, chunk_size, progress, cancel)
    hash_seconds = time.monotonic() - pass2_started - pass2_seconds
    if on_disk != image.raw_sha256 and known is not None:
        # a kept index (of a slot the agent wrote) or the release's: the full
        # download, verified on its own, tells them apart
        log.warning("slot_index_stale", error=f"the slot hashes to {on_disk}")
        return Declined("slot_index_stale", p.fetch_bytes, index_bytes)
    if on_disk != image.raw_sha256:
        raise VerificationError(
            "hash_mismatch",
            f"the slot built from the chunk index hashes to {on_disk}, the manifest says "
            f"{image.raw_sha256}",
            hint="the chunk index or the image on the server lies; nothing was made bootable",
        )
    seconds = time.monotonic() - started
    log.info(
        "image_written",
        raw_size=image.raw_size,
        downloaded=writer.downloaded,
        seconds=round(seconds, 3),
        scan_seconds=round(found.seconds, 3),
        pass2_seconds=round(pass2_seconds, 3),
        hash_seconds=round(hash_seconds, 3),  # the part of it after pass 2
        readback=True,
        delta=True,
    )
    return DeltaWritten(writer.downloaded, p.fetch_bytes, seconds)
