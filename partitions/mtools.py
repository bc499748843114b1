"""A :class:`~partitions.filestore.FileStore` on a FAT file system inside a disk image or
block device, through mtools: no root, no vfat driver. Paths, errors and atomicity
are the port's (see :mod:`partitions.filestore`).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog

from partitions import gpt
from partitions.filestore import (
    check_read_size,
    clean_path,
    hash_file,
    parent_and_name,
    temp_name,
)
from updater.errors import CommandError, DiskError
from updater.run import Completed, Runner, run

log = structlog.get_logger(__name__)

# mtools: skip its FAT sanity checks (a just-made or foreign FAT is fine for
# us) and read no per-user configuration that could remap drives or names.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


class MtoolsStore:
    """A FAT file system at byte ``offset`` of a disk image or block device, through mtools."""

    def __init__(self, image: Path, offset: int, runner: Runner = run) -> None:
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        self.image = image
        self.offset = offset
        self._runner = runner

    def __repr__(self) -> str:
        return f"MtoolsStore({str(self.image)!r}, {self.offset})"

    @property
    def drive(self) -> str:
        """The mtools image argument: ``IMAGE@@OFFSET``."""
        return f"{self.image}@@{self.offset}"

    def where(self, path: str) -> str:
        return f"{self.drive}:/{clean_path(path)}"

    @staticmethod
    def _target(path: str) -> str:
        return "::/" + clean_path(path)

    def _mtools(
        self, tool: str, *args: str, path: str | None = None, check: bool = True
    ) -> Completed:
        """Run an mtools command on this drive; a failure names ``path`` (default: last arg)."""
        argv = [tool, "-i", self.drive, *args]
        try:
            done = self._runner(argv, check=False, env=MTOOLS_ENV)
        except CommandError as exc:
            hint = "install mtools" if exc.kind == "command_missing" else None
            raise DiskError("io", f"{self.drive}: {exc.message}", hint=hint) from exc
        if check and done.returncode != 0:
            raise self._failed(done, path if path is not None else args[-1])
        return done

    def _failed(self, done: Completed, target: str) -> DiskError:
        stderr = done.stderr.decode("utf-8", "replace").strip()
        path = target.removeprefix("::/")
        if "not found" in stderr:
            return DiskError(
                "io",
                f"{self.where(path)}: no such file or directory",
                hint="is this the right partition of the right image?",
            )
        return DiskError(
            "io",
            f"{self.where(path)}: {done.argv[0]} failed (exit {done.returncode}): {stderr}",
            hint="check the FAT file system with `fsck.vfat -n`",
        )

    def read(self, path: str, max_size: int | None = None) -> bytes:
        # mcopy's output is at most the file system's size; the limit is checked after it
        parent_and_name(path)
        data = self._mtools("mcopy", self._target(path), "-", path=path).stdout
        return check_read_size(data, self.where(path), max_size)

    def write(self, path: str, data: bytes) -> None:
        parent, name = parent_and_name(path)
        if not self._is_dir(parent):
            raise DiskError("io", f"{self.where(parent)}: no such directory")
        tmp = f"{parent}/{temp_name(name)}" if parent else temp_name(name)
        with _host_file(data) as source:
            # -D o: a temporary left over by a crash is simply replaced.
            self._mtools("mcopy", "-D", "o", str(source), self._target(tmp))
        # mtools cannot replace atomically: "-D o" deletes the old name, then renames.
        self._mtools("mren", "-D", "o", self._target(tmp), self._target(path))

    def rename(self, src: str, dst: str) -> None:
        src_parent, _ = parent_and_name(src)
        dst_parent, dst_name = parent_and_name(dst)
        if not self.exists(src):
            raise DiskError("io", f"{self.where(src)}: no such file or directory")
        if self.exists(dst):
            raise DiskError("io", f"{self.where(dst)}: cannot rename {src} over it: it exists")
        if src_parent == dst_parent:
            # mren takes the new name in the same directory
            self._mtools("mren", self._target(src), self._target(dst), path=src)
        else:
            self._mtools("mmove", self._target(src), self._target(dst), path=src)
        log.debug("mtools_renamed", drive=self.drive, src=src, dst=dst_name)

    def list(self, directory: str) -> builtins.list[str]:
        cleaned = clean_path(directory)
        target = self._target(cleaned)
        done = self._mtools("mdir", "-b", target if not cleaned else target + "/")
        prefix = "::/" + (cleaned + "/" if cleaned else "")
        names: builtins.list[str] = []
        for line in done.text.splitlines():
            if not line:
                continue
            if not line.startswith(prefix) or line == prefix.rstrip("/"):
                raise DiskError("io", f"{self.where(directory)}: not a directory")
            names.append(line[len(prefix) :].rstrip("/"))
        return sorted(names)

    def exists(self, path: str) -> bool:
        cleaned = clean_path(path)
        if not cleaned:
            return True
        return self._listed(self._target(cleaned), cleaned)

    def _is_dir(self, path: str) -> bool:
        cleaned = clean_path(path)
        if not cleaned:
            return True
        # with a trailing slash, mdir lists a directory and fails on a file
        return self._listed(self._target(cleaned) + "/", cleaned)

    def _listed(self, target: str, path: str) -> bool:
        """Whether mdir finds ``target``: no only when mtools says "not found"; any other
        failure (a killed mdir at shutdown, an unreadable image) is an error, never a
        missing file (a boot entry's kernel reported missing that is there)."""
        done = self._mtools("mdir", "-b", target, check=False)
        if done.returncode == 0:
            return True
        if done.returncode > 0 and b"not found" in done.stderr:
            return False
        raise self._failed(done, path)

    def remove(self, path: str) -> None:
        parent_and_name(path)
        self._mtools("mdel", self._target(path))

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> int:
        """See :class:`StreamingStore`. mtools cannot fsync; the image (or device) file is
        fsynced after the copy and after the rename instead: mtools writes through the
        page cache of that same file, so its writes reach the medium in that order."""
        parent, name = parent_and_name(path)
        if not self._is_dir(parent):
            raise DiskError("io", f"{self.where(parent)}: no such directory")
        tmp = f"{parent}/{temp_name(name)}" if parent else temp_name(name)
        with _spooled(chunks) as (source, written):
            self._mtools("mcopy", "-D", "o", str(source), self._target(tmp))
        self.sync()
        # FAT has no atomic replace: "-D o" deletes the old name, then renames (module doc)
        self._mtools("mren", "-D", "o", self._target(tmp), self._target(path))
        self.sync()
        return written

    def digest(self, path: str, max_size: int) -> tuple[int, str] | None:
        parent_and_name(path)
        if not self.exists(path):
            return None
        with tempfile.TemporaryDirectory(prefix="updater-mtools-") as d:
            copy = Path(d) / "file"
            self._mtools("mcopy", self._target(path), str(copy), path=path)
            with copy.open("rb") as fh:
                return hash_file(fh, self.where(path), max_size)

    def sync(self) -> None:
        """Flush what mtools wrote to the image or device to the medium."""
        try:
            fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError("io", f"{self.image}: cannot open: {exc.strerror}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise DiskError("io", f"{self.image}: cannot sync: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        parts = clean_path(path).split("/") if clean_path(path) else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if self._is_dir(sub):
                continue
            if self.exists(sub):
                raise DiskError("io", f"{self.where(sub)}: exists and is not a directory")
            self._mtools("mmd", self._target(sub))


@contextlib.contextmanager
def _host_file(data: bytes) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="updater-mtools-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


@contextlib.contextmanager
def _spooled(chunks: Iterable[bytes]) -> Iterator[tuple[Path, int]]:
    """``chunks`` in a host temporary file (for mcopy), and their count; removed after."""
    fd, name = tempfile.mkstemp(prefix="updater-mtools-", suffix=".bin")
    try:
        written = 0
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
        yield Path(name), written
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


# ---- finding the FAT partition --------------------------------------------------------------


def fat_partition(disk: Path, label: str) -> tuple[int, int]:
    """Byte offset and size of the GPT partition named ``label`` on ``disk``."""
    table = gpt.read_table(disk)
    found = table.named(label)
    if len(found) != 1:
        names = sorted({e.name for e in table.entries})
        what = "no partition" if not found else f"{len(found)} partitions"
        raise DiskError(
            "esp_invalid",
            f"{disk}: {what} named {label!r} (found: {', '.join(names) or 'none'})",
            hint="set the ESP's partition name in the configuration, or name it (sgdisk -c N:NAME)",
        )
    entry = found[0]
    return table.offset(entry), table.size(entry)
