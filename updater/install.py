"""The streaming install: download -> sha256 -> decompress -> sha256 + count -> slot.

One pass, constant memory (bounded queues of bounded chunks). Three threads
overlap the work, since socket reads, hashlib and file writes all release the
GIL: the fetcher reads the network, the caller's thread hashes (and, for a
compressed image, decompresses and hashes the raw bytes while the fetcher
hashes the download), the writer writes the slot. An uncompressed image from a
:class:`updater.download.Download` never becomes a Python bytes object: the
fetcher reads the socket into a fixed pool of page-aligned buffers, which are
hashed and written (O_DIRECT, see :mod:`updater.slotio`) where they are, then
handed back. docs/benchmarks.md has the measurements behind this shape.
Nothing here touches boot flags; the caller makes the slot bootable only
after :func:`write_image` returned without error.
"""

from __future__ import annotations

import hashlib
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, cast, runtime_checkable

import structlog

from updater.decompress import decoder
from updater.errors import Cancelled, DiskError, UpdaterError, VerificationError
from updater.manifest import Compression, ImageRef
from updater.slotio import SlotDevice, aligned_buffer

log = structlog.get_logger(__name__)

QUEUE_DEPTH = 8  # chunks in flight between two stages
ABANDON_AFTER_S = 3.0  # how long a failed install waits for a fetcher stuck in a read
POOL_BUFFERS = QUEUE_DEPTH  # chunk-sized buffers of the zero-copy path: all its memory

_T = TypeVar("_T")


@dataclass(frozen=True)
class Progress:
    phase: Literal["download", "readback", "finalize"]
    done: int  # bytes
    total: int  # bytes


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class WriteResult:
    sha256: str  # of the downloaded bytes
    raw_sha256: str
    raw_size: int
    seconds: float


@runtime_checkable
class IntoSource(Protocol):
    """A download that can fill the caller's buffers (:class:`updater.download.Download`)."""

    def readinto(self, buf: memoryview) -> int: ...


# A chunk between two stages, and the pool buffer it lives in (None: its own bytes).
_Block = tuple[memoryview, mmap.mmap | None]


class Stopped(Exception):
    """Another stage failed; this one unwinds quietly."""


class Stage:
    """Shared failure slot and stop flag of the pipeline's threads.

    ``cancel`` is the caller's: once set, every stage stops at its next queue
    operation (within 0.1 s) with :class:`Cancelled`.
    """

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.stop = threading.Event()
        self.cancel = cancel
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.fail(Cancelled("cancelled", "the install was stopped"))
            raise Stopped

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue[_T], item: _T) -> None:
        while True:
            self.check_cancel()
            if self.stop.is_set():
                raise Stopped
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[_T]) -> _T:
        while True:
            self.check_cancel()
            if self.stop.is_set():
                raise Stopped
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue


class _QueueReader:
    """A file-like ``read(n)`` over the fetcher's queue, for the decompressors."""

    def __init__(self, stage: Stage, q: queue.Queue[_Block | None]) -> None:
        self._stage = stage
        self._q = q
        self._item = memoryview(b"")
        self._pos = 0
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        if self._pos >= len(self._item):
            if self._eof:
                return b""
            item = self._stage.get(self._q)
            if item is None:
                self._eof = True
                return b""
            self._item, self._pos = item[0], 0
        end = len(self._item) if n < 0 else self._pos + n
        out = self._item[self._pos : end]
        self._pos += len(out)
        if isinstance(out.obj, bytes) and len(out) == len(out.obj):
            return out.obj  # the common case: the fetched chunk itself, no copy
        return out.tobytes()


def _fill(source: IntoSource, view: memoryview) -> int:
    """Read into ``view`` until it is full or the source ends; the count."""
    done = 0
    while done < len(view):
        n = source.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def write_image(
    chunks: Iterator[bytes],
    image: ImageRef,
    device: SlotDevice,
    *,
    chunk_size: int = 1024 * 1024,
    readback: bool = True,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> WriteResult:
    """Stream ``chunks`` (the download) into ``device`` and check every byte.

    Setting ``cancel`` stops the install within a fraction of a second
    (Cancelled); a fetcher stuck in a read is left behind (a daemon thread,
    it ends at its read timeout), never waited for more than a few seconds.

    When ``chunks`` can ``readinto`` (a :class:`updater.download.Download`)
    and the image is not compressed, the bytes go from the socket into a pool
    of page-aligned buffers, are hashed there and written from there (with
    O_DIRECT where the device allows): no copy in Python, and memory is the
    pool, whatever the image size.

    Raises VerificationError (hash or size mismatch, bad compression),
    DownloadError (from ``chunks``) or DiskError. On any error the slot holds
    garbage and must stay unbootable.

    The stages: stream (:class:`_Pipeline`), check what streamed against the
    manifest (:func:`_check_stream`), read the slot back (:func:`_read_back`).
    """
    started = time.monotonic()
    pipeline = _Pipeline(
        chunks, image, device, chunk_size=chunk_size, progress=progress, cancel=cancel
    )
    pipeline.run()
    if progress is not None:
        progress(Progress("download", pipeline.downloaded, image.size))
    sha256, raw_sha256 = pipeline.digests()
    _check_stream(image, pipeline.downloaded, sha256, pipeline.raw_size, raw_sha256)
    if readback:
        _read_back(device, image, chunk_size, progress, cancel)
    seconds = time.monotonic() - started
    log.info(
        "image_written",
        raw_size=pipeline.raw_size,
        downloaded=pipeline.downloaded,
        seconds=round(seconds, 3),
        readback=readback,
    )
    return WriteResult(sha256, raw_sha256, pipeline.raw_size, seconds)


class _Pipeline:
    """Stage 1, the stream: a fetcher thread reads the download, the caller's thread
    hashes (and decompresses) and counts, a writer thread writes the slot.

    A compressed image's download is hashed by the fetcher, its raw bytes by the
    caller's thread; an uncompressed one's bytes are both, hashed once by the
    caller's thread so that reading the socket, hashing and writing overlap.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        image: ImageRef,
        device: SlotDevice,
        *,
        chunk_size: int,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> None:
        self.chunks = chunks
        self.image = image
        self.device = device
        self.chunk_size = chunk_size
        self.progress = progress
        self.stage = Stage(cancel)
        self.passthrough = image.compression is Compression.NONE
        self.pooled = self.passthrough and isinstance(chunks, IntoSource)
        self.fetched: queue.Queue[_Block | None] = queue.Queue(QUEUE_DEPTH)
        self.to_write: queue.Queue[_Block | None] = queue.Queue(QUEUE_DEPTH)
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        if self.pooled:
            for _ in range(POOL_BUFFERS):
                self.free.put(aligned_buffer(chunk_size))
        self.download_hash = hashlib.sha256()
        self.downloaded = 0  # bytes
        self.raw_hash = hashlib.sha256()
        self.raw_size = 0  # bytes
        self._last_report = 0.0

    def run(self) -> None:
        """Stream every byte into the slot, or raise the first stage's error."""
        stage = self.stage
        threads = [
            threading.Thread(target=self._fetch, name="install-fetch", daemon=True),
            threading.Thread(target=self._write, name="install-write", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._transform()
        except Stopped:
            pass
        except BaseException as exc:
            stage.fail(exc)
        finally:
            if stage.error is not None:
                stage.stop.set()
            for t in threads:
                # after a failure, a fetcher blocked on the network is not waited for
                t.join(timeout=None if stage.error is None else ABANDON_AFTER_S)
        if stage.error is not None:
            err = stage.error
            if isinstance(err, UpdaterError):
                raise err
            if isinstance(err, OSError):
                raise DiskError("io", f"{self.device.path}: {err}") from err
            raise err

    def digests(self) -> tuple[str, str]:
        """The sha256 of the download and of the raw image."""
        sha256 = self.download_hash.hexdigest()
        return sha256, sha256 if self.passthrough else self.raw_hash.hexdigest()

    def _fetch_into(self, source: IntoSource) -> None:
        stage = self.stage
        while True:
            buf = stage.get(self.free)
            view = memoryview(buf)
            n = _fill(source, view)
            if not n:
                self.free.put(buf)
                break
            self.downloaded += n
            stage.put(self.fetched, (view[:n], buf))

    def _fetch(self) -> None:
        stage = self.stage
        try:
            if self.pooled:
                self._fetch_into(cast(IntoSource, self.chunks))
            else:
                for chunk in self.chunks:
                    if not self.passthrough:
                        self.download_hash.update(chunk)
                    self.downloaded += len(chunk)
                    stage.put(self.fetched, (memoryview(chunk), None))
            stage.put(self.fetched, None)
        except Stopped:
            pass
        except BaseException as exc:
            stage.fail(exc)
        finally:
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()

    def _write(self) -> None:
        stage = self.stage
        try:
            while (item := stage.get(self.to_write)) is not None:
                view, buf = item
                self.device.write(view)
                if buf is not None:
                    self.free.put(buf)
            self.device.sync()
        except Stopped:
            pass
        except BaseException as exc:
            stage.fail(exc)

    def _transform(self) -> None:
        """The caller's thread: hash, decompress and count between fetcher and writer."""
        stage = self.stage
        if self.passthrough:
            # the raw bytes are the downloaded ones: hashed here, not by the
            # fetcher, so that reading the socket, hashing and writing overlap
            while (item := stage.get(self.fetched)) is not None:
                self._count(len(item[0]))
                self.download_hash.update(item[0])
                stage.put(self.to_write, item)
        else:
            reader = _QueueReader(stage, self.fetched)
            source = decoder(reader, self.image.compression, self.chunk_size)
            while data := source.read(self.chunk_size):
                self._count(len(data))
                self.raw_hash.update(data)
                stage.put(self.to_write, (memoryview(data), None))
        stage.put(self.to_write, None)

    def _count(self, n: int) -> None:
        self.stage.check_cancel()
        self.raw_size += n
        if self.raw_size > self.image.raw_size:
            raise VerificationError(
                "size_mismatch",
                f"the image inflates past its raw_size of {self.image.raw_size} bytes",
                hint="a decompression bomb or a wrong manifest",
            )
        now = time.monotonic()
        if self.progress is not None and now - self._last_report >= 0.2:
            self._last_report = now
            self.progress(Progress("download", self.downloaded, self.image.size))


def _check_stream(
    image: ImageRef, downloaded: int, sha256: str, raw_size: int, raw_sha256: str
) -> None:
    """Stage 2: what streamed is the manifest's image, byte for byte."""
    if downloaded != image.size:
        raise VerificationError(
            "size_mismatch", f"downloaded {downloaded} bytes, the manifest says {image.size}"
        )
    if sha256 != image.sha256:
        raise VerificationError(
            "hash_mismatch", f"the download's sha256 is {sha256}, the manifest says {image.sha256}"
        )
    if raw_size != image.raw_size:
        raise VerificationError(
            "size_mismatch", f"the image has {raw_size} bytes, the manifest says {image.raw_size}"
        )
    if raw_sha256 != image.raw_sha256:
        raise VerificationError(
            "hash_mismatch",
            f"the image's sha256 is {raw_sha256}, the manifest says {image.raw_sha256}",
        )


def hash_slot(
    device: SlotDevice,
    image: ImageRef,
    chunk_size: int,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    *,
    ready: Callable[[int], None] | None = None,
) -> str:
    """The sha256 of the slot's first ``image.raw_size`` bytes, read past the page cache
    (progress as ``readback``; stoppable); ``ready``: see :meth:`SlotDevice.hash`."""

    def read_progress(n: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled", "the install was stopped")
        if progress is not None:
            progress(Progress("readback", n, image.raw_size))

    device.drop_cache()
    return device.hash(image.raw_size, chunk_size, read_progress, ready)


def _read_back(
    device: SlotDevice,
    image: ImageRef,
    chunk_size: int,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
) -> None:
    """Stage 3: the slot, read past the page cache, holds what was written."""
    on_disk = hash_slot(device, image, chunk_size, progress, cancel)
    if on_disk != image.raw_sha256:
        raise DiskError(
            "readback_mismatch",
            f"the slot reads back as {on_disk}, {image.raw_sha256} was written",
            hint="the disk may be failing",
        )
