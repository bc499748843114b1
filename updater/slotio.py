"""Raw access to a slot's bytes: a partition's byte range on a disk or image file.

The range is a hard bound: nothing is ever written outside [offset,
offset+size) of the disk, whatever the caller asks.

Writes bypass the page cache (``O_DIRECT``) where the device allows it, as
``dd oflag=direct`` does: buffered writes to a block device ran at a fraction
of its speed in the benchmark (docs/benchmarks.md), and a whole image would
otherwise sit in memory as dirty pages until the final fsync. O_DIRECT needs
the position, the length and the memory aligned to the logical block size:
data in aligned memory (:func:`aligned_buffer`) goes straight from the
caller's buffer, other data is copied through an aligned staging buffer, and a
ragged end (a partial block) is written through the page cache, then once more
directly when the next write completes its block. Every byte ``write``
accepted is with the kernel when it returns, as with plain writes. Where
O_DIRECT is refused, writes go through the page cache and are synced every
:data:`SYNC_EVERY` bytes, which keeps dirty memory bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from updater.errors import DiskError

_DROP_CACHE = getattr(os, "POSIX_FADV_DONTNEED", 4)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096  # bytes; a multiple of every logical block size in use (512, 4096)
STAGING_SIZE = 1024 * 1024  # bytes; where data that is not itself aligned is copied to
HASH_BUFFERS = 2  # chunk buffers of a slot's hash: one read while the other is hashed
SYNC_EVERY = 32 * 1024 * 1024  # bytes; without O_DIRECT, fdatasync and drop after this many


def _io_error(path: Path, what: str, exc: OSError) -> DiskError:
    return DiskError("io", f"{path}: {what} failed: {exc.strerror or exc}")


def aligned_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of page-aligned anonymous memory, fit for O_DIRECT writes."""
    return mmap.mmap(-1, size)


def _aligned(view: memoryview) -> bool:
    """Whether ``view``'s memory starts on a DIRECT_ALIGN boundary.

    Only a writable buffer can be asked for its address (ctypes'
    ``from_buffer``); a read-only one (bytes) counts as unaligned: it is copied.
    """
    if view.readonly or not view.c_contiguous or not view.nbytes:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


class SlotDevice:
    """An open slot for sequential writing, then syncing and reading back."""

    def __init__(
        self,
        path: Path,
        offset: int,
        size: int,
        *,
        direct: bool = True,
        sync: bool = True,
        writable: bool = True,
    ) -> None:
        """``sync=False`` leaves out every flush to the device: a defect on purpose,
        for tests/test_powercut.py to show that it catches one. Nothing else
        passes it, and no configuration reaches it. ``writable=False`` opens the
        slot read-only (the booted slot, read for a delta update)."""
        self.path = path
        self._flush = sync
        self.offset = offset
        self.size = size
        self.writable = writable
        mode = os.O_RDWR if writable else os.O_RDONLY
        try:
            self._fd = os.open(path, mode | os.O_CLOEXEC)
        except OSError as exc:
            raise _io_error(path, "open", exc) from None
        st = os.fstat(self._fd)
        end = self._device_size() if stat.S_ISBLK(st.st_mode) else st.st_size
        if offset < 0 or size <= 0 or offset + size > end:
            os.close(self._fd)
            raise DiskError(
                "io", f"{path}: the slot range {offset}+{size} lies outside the disk ({end} bytes)"
            )
        self.written = 0
        self._direct_fd = -1
        if direct and _O_DIRECT and offset % DIRECT_ALIGN == 0:
            # no O_DIRECT here (some file systems): the page cache it is
            with contextlib.suppress(OSError):
                self._direct_fd = os.open(path, mode | os.O_CLOEXEC | _O_DIRECT)
        self._staging: mmap.mmap | None = None
        self._tail = 0  # bytes of a partial block at the end, written buffered, kept in staging
        self._unsynced = 0  # bytes written buffered since the last periodic sync

    @property
    def direct(self) -> bool:
        """Whether writes (still) bypass the page cache."""
        return self._direct_fd >= 0

    def _device_size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def seek(self, pos: int) -> None:
        """Continue writing at slot position ``pos`` (a delta update skips the blocks
        the slot already holds). With O_DIRECT, ``pos`` must be DIRECT_ALIGN-aligned.
        A partial block written last is with the kernel already (buffered)."""
        if not 0 <= pos <= self.size:
            raise DiskError("io", f"{self.path}: position {pos} lies outside the slot")
        if self.direct and pos % DIRECT_ALIGN:
            raise DiskError("io", f"{self.path}: position {pos} is not {DIRECT_ALIGN}-aligned")
        self._tail = 0
        self.written = pos

    def write(self, data: bytes | memoryview) -> None:
        if not self.writable:
            raise DiskError("io", f"{self.path}: the slot was opened read-only")
        view = memoryview(data).cast("B")
        if self.written + len(view) > self.size:
            raise DiskError("io", f"{self.path}: refusing to write past the slot's end")
        if self.direct:
            self._write_direct(view, self.written)
        else:
            self._pwrite(self._fd, view, self.written)
            self._unsynced += len(view)
            if self._unsynced >= SYNC_EVERY:
                self._sync_and_drop()
        self.written += len(view)

    def _write_direct(self, view: memoryview, pos: int) -> None:
        """Write ``view`` at slot position ``pos``; ``pos - self._tail`` is block-aligned."""
        staging = self._staging_view()
        if self._tail:
            start, t = pos - self._tail, self._tail
            k = min(DIRECT_ALIGN - t, len(view))
            staging[t : t + k] = view[:k]
            view, pos, self._tail = view[k:], pos + k, 0
            if t + k < DIRECT_ALIGN:  # still partial: through the page cache for now
                self._pwrite(self._fd, staging[t : t + k], start + t)
                self._tail = t + k
                return
            self._pwrite_direct(staging[:DIRECT_ALIGN], start)
        whole = len(view) - len(view) % DIRECT_ALIGN
        if _aligned(view):
            self._pwrite_direct(view[:whole], pos)
        else:
            for i in range(0, whole, len(staging)):
                n = min(len(staging), whole - i)
                staging[:n] = view[i : i + n]
                self._pwrite_direct(staging[:n], pos + i)
        rest = view[whole:]
        if rest:
            staging[: len(rest)] = rest
            self._pwrite(self._fd, rest, pos + whole)
            self._tail = len(rest)

    def _staging_view(self) -> memoryview:
        if self._staging is None:
            self._staging = aligned_buffer(STAGING_SIZE)
        return memoryview(self._staging)

    def _pwrite_direct(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view) and self.direct:
            try:
                done += os.pwrite(self._direct_fd, view[done:], self.offset + pos + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise _io_error(self.path, "write", exc) from None
                self._stop_direct()  # an alignment the device did not tell us about
            if done % DIRECT_ALIGN:
                self._stop_direct()  # a short write left a ragged rest
        if done < len(view):
            self._pwrite(self._fd, view[done:], pos + done)

    def _pwrite(self, fd: int, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], self.offset + pos + done)
            except OSError as exc:
                raise _io_error(self.path, "write", exc) from None

    def _stop_direct(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1

    def _sync_and_drop(self) -> None:
        """Bound the dirty pages of buffered writes: flush them, then forget them."""
        self._unsynced = 0
        if self._flush:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise _io_error(self.path, "fsync", exc) from None
        with contextlib.suppress(OSError):  # only advice
            os.posix_fadvise(self._fd, self.offset, self.written, _DROP_CACHE)

    def sync(self) -> None:
        """Make every byte written so far durable (a flush of the device's cache too)."""
        if not self._flush:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _io_error(self.path, "fsync", exc) from None

    def drop_cache(self) -> None:
        """Forget cached pages so a read-back comes from the device itself."""
        os.posix_fadvise(self._fd, self.offset, self.size, _DROP_CACHE)

    def hash(
        self,
        length: int,
        chunk_size: int,
        progress: Callable[[int], None] | None = None,
        ready: Callable[[int], None] | None = None,
    ) -> str:
        """SHA-256 of the first ``length`` bytes of the slot, read from the device.

        With O_DIRECT where it works (whole blocks), so not even a page the
        cache kept can stand in for what the device holds. A reader thread reads
        the next chunk while this one is hashed (both release the GIL).
        ``progress`` gets the bytes hashed; an exception it raises stops the read.
        ``ready(end)``, if given, is called before each read and returns once the
        slot's bytes before ``end`` are final (a hash that follows a writer); an
        exception it raises stops the hash.
        """
        h = hashlib.sha256()
        free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(HASH_BUFFERS):
            free.put(memoryview(aligned_buffer(chunk_size)))
        filled: queue.Queue[tuple[memoryview, int] | BaseException] = queue.Queue()
        stop = threading.Event()

        def read() -> None:
            done = 0
            try:
                while done < length:
                    view = free.get()
                    if stop.is_set():
                        return
                    want = min(chunk_size, length - done)
                    if ready is not None:
                        ready(done + want)
                    n = self._read(view[:want], done)
                    if n == 0:
                        raise DiskError("io", f"{self.path}: unexpected end of device")
                    filled.put((view, n))
                    done += n
            except BaseException as exc:
                filled.put(exc)

        reader = threading.Thread(target=read, name="slot-hash-read", daemon=True)
        reader.start()
        done = 0
        try:
            while done < length:
                item = filled.get()
                if isinstance(item, BaseException):
                    raise item
                view, n = item
                h.update(view[:n])
                done += n
                free.put(view)
                if progress is not None:
                    progress(done)
        finally:
            stop.set()
            free.put(memoryview(b""))  # wakes a reader waiting for a buffer
            reader.join()
        return h.hexdigest()

    def read_at(self, view: memoryview, pos: int) -> int:
        """Fill ``view`` from slot position ``pos`` (less only at the slot's end)."""
        end = min(len(view), self.size - pos) if pos < self.size else 0
        done = 0
        while done < end:
            n = self._read(view[done:end], pos + done)
            if n == 0:
                break
            done += n
        return done

    def _read(self, view: memoryview, pos: int) -> int:
        """Read into ``view`` from slot position ``pos``, directly if the sizes allow."""
        whole = len(view) - len(view) % DIRECT_ALIGN
        if self.direct and whole and pos % DIRECT_ALIGN == 0:
            try:
                return os.preadv(self._direct_fd, [view[:whole]], self.offset + pos)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise _io_error(self.path, "read", exc) from None
                self._stop_direct()
        try:
            return os.preadv(self._fd, [view], self.offset + pos)
        except OSError as exc:
            raise _io_error(self.path, "read", exc) from None

    def close(self) -> None:
        self._stop_direct()
        self._staging = None  # unmapped once the last view of it is gone
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SlotDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
