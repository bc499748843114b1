"""Raw access to a slot's bytes: a partition's byte range on a disk or image file.

The range is a hard bound: nothing is ever written outside [offset,
offset+size) of the disk, whatever the caller asks.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from updater.errors import DiskError

_DROP_CACHE = getattr(os, "POSIX_FADV_DONTNEED", 4)


def _io_error(path: Path, what: str, exc: OSError) -> DiskError:
    return DiskError("io", f"{path}: {what} failed: {exc.strerror or exc}")


class SlotDevice:
    """An open slot for sequential writing, then syncing and reading back."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.path = path
        self.offset = offset
        self.size = size
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
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

    def _device_size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def write(self, data: bytes | memoryview) -> None:
        if self.written + len(data) > self.size:
            raise DiskError("io", f"{self.path}: refusing to write past the slot's end")
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self._fd, view, self.offset + self.written)
            except OSError as exc:
                raise _io_error(self.path, "write", exc) from None
            self.written += n
            view = view[n:]

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _io_error(self.path, "fsync", exc) from None

    def drop_cache(self) -> None:
        """Forget cached pages so a read-back comes from the device itself."""
        os.posix_fadvise(self._fd, self.offset, self.size, _DROP_CACHE)

    def hash(
        self, length: int, chunk_size: int, progress: Callable[[int], None] | None = None
    ) -> str:
        """SHA-256 of the first ``length`` bytes of the slot, read from the device."""
        h = hashlib.sha256()
        buf = bytearray(chunk_size)
        view = memoryview(buf)
        done = 0
        while done < length:
            want = min(chunk_size, length - done)
            try:
                n = os.preadv(self._fd, [view[:want]], self.offset + done)
            except OSError as exc:
                raise _io_error(self.path, "read", exc) from None
            if n == 0:
                raise DiskError("io", f"{self.path}: unexpected end of device")
            h.update(view[:n])
            done += n
            if progress is not None:
                progress(done)
        return h.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SlotDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
