"""The streaming install: download -> sha256 -> decompress -> sha256 + count -> slot.

One pass, constant memory (bounded queues of bounded chunks). Three threads
overlap the work, since socket reads, hashlib and file writes all release the
GIL: the fetcher reads the network and hashes the download, the caller's
thread decompresses and hashes the raw bytes, the writer writes the slot.
Nothing here touches boot flags; the caller makes the slot bootable only
after :func:`write_image` returned without error.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import structlog

from updater.decode import decoder
from updater.errors import DiskError, UpdaterError, VerificationError
from updater.manifest import Compression, ImageRef
from updater.slotio import SlotDevice

log = structlog.get_logger(__name__)

QUEUE_DEPTH = 8  # chunks in flight between two stages


@dataclass(frozen=True)
class Progress:
    phase: Literal["download", "readback"]
    done: int  # bytes
    total: int  # bytes


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class WriteResult:
    sha256: str  # of the downloaded bytes
    raw_sha256: str
    raw_size: int
    seconds: float


class _Stop(Exception):
    """Another stage failed; this one unwinds quietly."""


class _Stage:
    """Shared failure slot and stop flag of the pipeline's threads."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue[bytes | None], item: bytes | None) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[bytes | None]) -> bytes | None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue


class _QueueReader:
    """A file-like ``read(n)`` over the fetcher's queue, for the decompressors."""

    def __init__(self, stage: _Stage, q: queue.Queue[bytes | None]) -> None:
        self._stage = stage
        self._q = q
        self._item = b""
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
            self._item, self._pos = item, 0
        if self._pos == 0 and (n < 0 or n >= len(self._item)):
            self._pos = len(self._item)
            return self._item  # the common case: no copy
        end = len(self._item) if n < 0 else self._pos + n
        out = self._item[self._pos : end]
        self._pos += len(out)
        return out


def write_image(
    chunks: Iterator[bytes],
    image: ImageRef,
    device: SlotDevice,
    *,
    chunk_size: int = 1024 * 1024,
    readback: bool = True,
    progress: ProgressFn | None = None,
) -> WriteResult:
    """Stream ``chunks`` (the download) into ``device`` and check every byte.

    Raises VerificationError (hash or size mismatch, bad compression),
    DownloadError (from ``chunks``) or DiskError. On any error the slot holds
    garbage and must stay unbootable.
    """
    started = time.monotonic()
    stage = _Stage()
    fetched: queue.Queue[bytes | None] = queue.Queue(QUEUE_DEPTH)
    to_write: queue.Queue[bytes | None] = queue.Queue(QUEUE_DEPTH)
    download_hash = hashlib.sha256()
    downloaded = 0

    def fetch() -> None:
        nonlocal downloaded
        try:
            for chunk in chunks:
                download_hash.update(chunk)
                downloaded += len(chunk)
                stage.put(fetched, chunk)
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
                device.write(item)
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

    passthrough = image.compression is Compression.NONE
    raw_hash = hashlib.sha256()
    raw_size = 0
    last_report = 0.0
    try:
        source = decoder(_QueueReader(stage, fetched), image.compression, chunk_size)
        while data := source.read(chunk_size):
            raw_size += len(data)
            if raw_size > image.raw_size:
                raise VerificationError(
                    "size_mismatch",
                    f"the image inflates past its raw_size of {image.raw_size} bytes",
                    hint="a decompression bomb or a wrong manifest",
                )
            if not passthrough:
                raw_hash.update(data)
            stage.put(to_write, data)
            now = time.monotonic()
            if progress is not None and now - last_report >= 0.2:
                last_report = now
                progress(Progress("download", downloaded, image.size))
        stage.put(to_write, None)
    except _Stop:
        pass
    except BaseException as exc:
        stage.fail(exc)
    finally:
        if stage.error is not None:
            stage.stop.set()
        for t in threads:
            t.join()
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
        device.drop_cache()
        on_disk = device.hash(
            image.raw_size,
            chunk_size,
            None if progress is None else lambda n: progress(Progress("readback", n, raw_size)),
        )
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
