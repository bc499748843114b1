"""The delta install (issue 14): build the new image in the target slot from the
blocks the host already has, and download only the rest.

Before anything changes: fetch the chunk index the signed manifest names
(:mod:`updater.chunkindex`, checked against the manifest's size and sha256),
hash the target slot per block at its own place (what an earlier, broken or
older install left there) and the booted slot per 4 KiB (the digest of the
64 KiB window at every 4 KiB offset), and plan (:mod:`updater.deltaplan`).
Then, in block order: skip the blocks the target holds, copy those the booted
slot holds, and fetch the others as Range requests into the published image,
each frame decompressed (bounded) and checked against its block digest before
it is written. Last, the whole slot is hashed from the device, past the page
cache: nothing may boot unless it is the manifest's raw sha256, whatever the
index said.

Rules (the caller, :class:`updater.installer.Installer`, applies them):

- **fall back to the full download** when there is nothing to use: no index in
  the manifest (or the source has none), the index cannot be fetched (404, a
  network error), the server ignores Range (a 200 to a Range request, at any
  point: the full download then rewrites the whole slot), or the plan saves
  less than ``[install] delta_min_saving`` of the download;
- **refuse the update** (a typed error, nothing bootable) when something lies:
  index bytes that are not the signed ones (``size_mismatch``,
  ``hash_mismatch``), a signed index that does not cut the image into frames
  in order (``index_malformed``), a frame that does not inflate to its block
  (``decompress_failed``, ``hash_mismatch``), a slot that does not hash to the
  manifest's raw sha256 at the end (``hash_mismatch``). Exactly as a full
  download refuses an image that is not the signed one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import structlog
import zstandard

from updater import chunkindex
from updater.chunkindex import ChunkIndex
from updater.decompress import ZSTD_MAX_WINDOW
from updater.deltaplan import Plan, plan
from updater.errors import Cancelled, DiskError, DownloadError, VerificationError
from updater.install import Progress, ProgressFn, hash_slot
from updater.manifest import ImageRef
from updater.slotio import SlotDevice, aligned_buffer
from updater.transport import ByteStream, Transport

log = structlog.get_logger(__name__)

DIGEST = 32  # bytes of a sha256


class RangeIgnored(Exception):
    """The server answered a Range request with the whole file: fall back."""


@dataclass(frozen=True)
class Prepared:
    """A delta install worth doing: the index and the plan."""

    index: ChunkIndex
    plan: Plan
    index_bytes: int  # downloaded for the index
    scan_seconds: float  # reading and hashing both slots


@dataclass(frozen=True)
class Declined:
    """No delta install: why, and what it would have downloaded (if planned)."""

    reason: str  # no_index | index_unavailable | saving_too_small | range_ignored
    planned_bytes: int | None = None
    index_bytes: int = 0


@dataclass(frozen=True)
class DeltaWritten:
    downloaded: int  # bytes of frames
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
    return chunkindex.parse(
        result.body,
        size=ref.size,
        sha256=ref.sha256,
        block_size=ref.block_size,
        count=ref.count,
        raw_size=image.raw_size,
        image_size=image.size,
    )


def booted_windows(
    device: SlotDevice,
    length: int,
    wanted: set[bytes],
    *,
    block_size: int,
    chunk_size: int,
    cancel: threading.Event | None = None,
) -> dict[bytes, int]:
    """Where in the first ``length`` bytes of ``device`` each of ``wanted`` (block
    digests) starts, at any sub-block offset; stops once all are found."""
    sub = chunkindex.SUB_BLOCK
    per = block_size // sub  # sub-blocks a window
    step = max(sub, chunk_size - chunk_size % sub)
    buf = memoryview(aligned_buffer(step))
    found: dict[bytes, int] = {}
    tail = b""  # sub-digests of the last per-1 sub-blocks before this chunk
    pos = 0
    length -= length % sub
    while pos < length and len(found) < len(wanted):
        _check_cancel(cancel)
        n = device.read_at(buf[: min(step, length - pos)], pos)
        n -= n % sub
        if not n:
            break
        subs = tail + b"".join(hashlib.sha256(buf[i : i + sub]).digest() for i in range(0, n, sub))
        view = memoryview(subs)
        first = pos // sub - len(tail) // DIGEST  # sub-block index of subs[0]
        for j in range(len(subs) // DIGEST - per + 1):
            d = hashlib.sha256(view[j * DIGEST : (j + per) * DIGEST]).digest()
            if d in wanted and d not in found:
                found[d] = (first + j) * sub
        tail = subs[-(per - 1) * DIGEST :] if per > 1 else b""
        pos += n
    return found


def target_blocks(
    device: SlotDevice,
    index: ChunkIndex,
    *,
    chunk_size: int,
    cancel: threading.Event | None = None,
) -> list[bytes | None]:
    """The digest of what ``device`` holds at each block's own place (None past its end)."""
    count = len(index.entries)
    per_read = max(1, chunk_size // index.block_size)
    buf = memoryview(aligned_buffer(per_read * index.block_size))
    out: list[bytes | None] = []
    i = 0
    while i < count:
        _check_cancel(cancel)
        start, _ = index.block(i)
        k = min(per_read, count - i)
        last_start, last_len = index.block(i + k - 1)
        want = last_start + last_len - start
        n = device.read_at(buf[:want], start)
        for j in range(k):
            s, blen = index.block(i + j)
            rel = s - start
            out.append(chunkindex.block_digest(buf[rel : rel + blen]) if rel + blen <= n else None)
        i += k
    return out


def prepare(
    transport: Transport,
    index_url: str | None,
    image: ImageRef,
    *,
    booted: SlotDevice,
    booted_length: int,
    target: SlotDevice | None,
    min_saving: float,
    chunk_size: int,
    cancel: threading.Event | None = None,
) -> Prepared | Declined:
    """Read the index and both slots and plan; Declined when the full download it is.
    ``target`` None: the target slot holds nothing the agent wrote; not read.

    Raises VerificationError for an index that is not the signed one or lies."""
    if image.index is None or index_url is None:
        return Declined("no_index")
    index = fetch_index(transport, index_url, image)
    if index is None:
        return Declined("index_unavailable")
    index_bytes = image.index.size
    started = time.monotonic()
    # Both slots at once (reads and sha256 release the GIL); the booted slot is
    # searched for every block, as what the target holds is not known yet.
    held: list[bytes | None] = []
    failed: list[BaseException] = []

    def scan_target() -> None:
        assert target is not None
        try:
            held.extend(target_blocks(target, index, chunk_size=chunk_size, cancel=cancel))
        except BaseException as exc:
            failed.append(exc)

    scan = threading.Thread(target=scan_target, name="delta-scan-target", daemon=True)
    if target is not None:
        scan.start()
    try:
        windows = booted_windows(
            booted,
            booted_length,
            {e.digest for e in index.entries},
            block_size=index.block_size,
            chunk_size=chunk_size,
            cancel=cancel,
        )
    finally:
        if target is not None:
            scan.join()
    if failed:
        raise failed[0]
    p = plan(index, windows, held)
    seconds = time.monotonic() - started
    log.info(
        "delta_planned",
        planned_bytes=p.fetch_bytes,
        image_bytes=p.image_bytes,
        saving=round(p.saving, 4),
        blocks_kept=len(p.keep),
        blocks_copied=len(p.copy),
        blocks_fetched=len(index.entries) - len(p.keep) - len(p.copy),
        ranges=len(p.fetch),
        scan_seconds=round(seconds, 3),
    )
    if p.saving < min_saving:
        return Declined("saving_too_small", p.fetch_bytes, index_bytes)
    return Prepared(index, p, index_bytes, seconds)


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


class _Writer:
    """Writes the plan into the target slot, in block order."""

    def __init__(
        self,
        transport: Transport,
        url: str,
        prepared: Prepared,
        *,
        booted: SlotDevice,
        device: SlotDevice,
        chunk_size: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> None:
        self.transport = transport
        self.url = url
        self.index = prepared.index
        self.plan = prepared.plan
        self.booted = booted
        self.device = device
        self.progress = progress
        self.cancel = cancel
        self.buf = memoryview(aligned_buffer(max(chunk_size, self.index.block_size)))
        self.dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self.validator: str | None = None
        self.downloaded = 0
        self._reported = 0.0

    def run(self) -> None:
        index, p = self.index, self.plan
        count = len(index.entries)
        kept = set(p.keep)
        sources = {c.block: c.source for c in p.copy}
        ranges = {r.first: r for r in p.fetch}
        i = 0
        while i < count:
            _check_cancel(self.cancel)
            if i in ranges:
                r = ranges[i]
                self._fetch(r.first, r.last, r.offset, r.length)
                i = r.last + 1
            elif i in kept:
                while i < count and i in kept:
                    i += 1
                self.device.seek(index.block(i)[0] if i < count else index.raw_size)
            elif i in sources:
                i = self._copy(i, sources)
            else:  # the planner gives every block one of the three
                raise AssertionError(f"block {i} has no plan")

    def _copy(self, i: int, sources: dict[int, int]) -> int:
        """Copy the run of blocks from ``i`` whose sources follow each other in the
        booted slot, up to a buffer's worth; the next block."""
        length = self.index.block(i)[1]
        src = sources[i]
        j = i + 1
        while (
            j in sources
            and sources[j] == src + (j - i) * self.index.block_size
            and length + self.index.block(j)[1] <= len(self.buf)
        ):
            length += self.index.block(j)[1]
            j += 1
        view = self.buf[:length]
        if self.booted.read_at(view, src) != length:
            raise DiskError("io", f"the booted slot ends before {src + length} (block {i})")
        self.device.write(view)
        return j

    def _fetch(self, first: int, last: int, offset: int, length: int) -> None:
        stream = self.transport.open_range(
            self.url, start=offset, length=length, if_range=self.validator
        )
        if stream is None:
            raise RangeIgnored
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
                self.device.write(data)
                self._report()
        finally:
            stream.close()

    def _report(self) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._reported >= 0.2:
            self._reported = now
            self.progress(Progress("download", self.downloaded, self.plan.fetch_bytes))


def write_delta(
    transport: Transport,
    url: str,
    prepared: Prepared,
    image: ImageRef,
    *,
    booted: SlotDevice,
    device: SlotDevice,
    chunk_size: int,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> DeltaWritten:
    """Carry out ``prepared`` into ``device``, then hash the whole slot from the device.

    Raises RangeIgnored (fall back: the slot holds garbage, still unbootable),
    VerificationError, DownloadError or DiskError."""
    started = time.monotonic()
    writer = _Writer(
        transport,
        url,
        prepared,
        booted=booted,
        device=device,
        chunk_size=chunk_size,
        progress=progress,
        cancel=cancel,
    )
    writer.run()
    device.sync()
    on_disk = hash_slot(device, image, chunk_size, progress, cancel)
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
        readback=True,
        delta=True,
    )
    return DeltaWritten(writer.downloaded, seconds)
