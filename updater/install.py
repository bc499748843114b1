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


class _Stop(Exception):
    """Another stage failed; this one unwinds quietly."""


class _Stage:
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
            raise _Stop

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue[_T], item: _T) -> None:
        while True:
            self.check_cancel()
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[_T]) -> _T:
        while True:
            self.check_cancel()
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue


class _QueueReader:
    """A file-like ``read(n)`` over the fetcher's queue, for the decompressors."""

    def __init__(self, stage: _Stage, q: queue.Queue[_Block | None]) -> None:
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
    """
    started = time.monotonic()
    stage = _Stage(cancel)
    passthrough = image.compression is Compression.NONE
    pooled = passthrough and isinstance(chunks, IntoSource)
    fetched: queue.Queue[_Block | None] = queue.Queue(QUEUE_DEPTH)
    to_write: queue.Queue[_Block | None] = queue.Queue(QUEUE_DEPTH)
    free: queue.Queue[mmap.mmap] = queue.Queue()
    if pooled:
        for _ in range(POOL_BUFFERS):
            free.put(aligned_buffer(chunk_size))
    download_hash = hashlib.sha256()
    downloaded = 0

    def fetch_into(source: IntoSource) -> None:
        nonlocal downloaded
        while True:
            buf = stage.get(free)
            view = memoryview(buf)
            n = _fill(source, view)
            if not n:
                free.put(buf)
                break
            downloaded += n
            stage.put(fetched, (view[:n], buf))

    def fetch() -> None:
        nonlocal downloaded
        try:
            if pooled:
                fetch_into(cast(IntoSource, chunks))
            else:
                for chunk in chunks:
                    if not passthrough:
                        download_hash.update(chunk)
                    downloaded += len(chunk)
                    stage.put(fetched, (memoryview(chunk), None))
            stage.put(fetched, None)
        except _Stop:
            pass
        except BaseException as exc:
            stage.fail(exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def write() -> None:
        try:
            while (item := stage.get(to_write)) is not None:
                view, buf = item
                device.write(view)
                if buf is not None:
                    free.put(buf)
            device.sync()
        except _Stop:
            pass
        except BaseException as exc:
            stage.fail(exc)

    threads = [
        threading.Thread(target=fetch, name="install-fetch", daemon=True),
        threading.Thread(target=write, name="install-write", daemon=True),
    ]
    for t in threads:
        t.start()

    raw_hash = hashlib.sha256()
    raw_size = 0
    last_report = 0.0

    def count(n: int) -> None:
        nonlocal raw_size, last_report
        stage.check_cancel()
        raw_size += n
        if raw_size > image.raw_size:
            raise VerificationError(
                "size_mismatch",
                f"the image inflates past its raw_size of {image.raw_size} bytes",
                hint="a decompression bomb or a wrong manifest",
            )
        now = time.monotonic()
        if progress is not None and now - last_report >= 0.2:
            last_report = now
            progress(Progress("download", downloaded, image.size))

    try:
        if passthrough:
            # the raw bytes are the downloaded ones: hashed here, not by the
            # fetcher, so that reading the socket, hashing and writing overlap
            while (item := stage.get(fetched)) is not None:
                count(len(item[0]))
                download_hash.update(item[0])
                stage.put(to_write, item)
        else:
            source = decoder(_QueueReader(stage, fetched), image.compression, chunk_size)
            while data := source.read(chunk_size):
                count(len(data))
                raw_hash.update(data)
                stage.put(to_write, (memoryview(data), None))
        stage.put(to_write, None)
    except _Stop:
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
            raise DiskError("io", f"{device.path}: {err}") from err
        raise err

    if progress is not None:
        progress(Progress("download", downloaded, image.size))
    sha256 = download_hash.hexdigest()
    raw_sha256 = sha256 if passthrough else raw_hash.hexdigest()
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
    if readback:

        def read_progress(n: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled", "the install was stopped")
            if progress is not None:
                progress(Progress("readback", n, raw_size))

        device.drop_cache()
        on_disk = device.hash(image.raw_size, chunk_size, read_progress)
        if on_disk != image.raw_sha256:
            raise DiskError(
                "readback_mismatch",
                f"the slot reads back as {on_disk}, {image.raw_sha256} was written",
                hint="the disk may be failing",
            )
    seconds = time.monotonic() - started
    log.info(
        "image_written",
        raw_size=raw_size,
        downloaded=downloaded,
        seconds=round(seconds, 3),
        readback=readback,
    )
    return WriteResult(sha256, raw_sha256, raw_size, seconds)
