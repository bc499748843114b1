"""Where the ESP or the grubenv lives: a small file-system port.

A boot-control backend that keeps its state in files (Boot Loader Spec entries,
a GRUB environment block) reads and writes them through a :class:`FileStore`,
so the same backend runs on a host with the ESP mounted (:class:`DirStore`) and
against a FAT file system inside a disk image or block device, through mtools,
without root or a vfat driver (:class:`partitions.mtools.MtoolsStore`): tests,
the demo and offline image building.

Paths are POSIX, relative to the root of the file system ("loader/entries").
A missing file or directory, or any failure of the medium, is a
``DiskError("io")`` that names the path.

Atomicity. ``write`` replaces a file through a temporary name and a rename, so
a reader never sees half a file. On a directory that is rename(2) and fsync; on
FAT there is no atomic replace at all (a rename over an existing name is a
delete then a rename, by the kernel's vfat as by mtools), so a crash can at
worst leave the old name missing and the new content under a hidden temporary
name (``.<name>.*``), which every boot loader here ignores.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import structlog

from updater.errors import DiskError

log = structlog.get_logger(__name__)

# Characters we refuse in a path: globbing characters (mtools expands them), NUL,
# backslash (FAT's separator) and control characters.
_BAD_PATH_CHARS = re.compile(r"[*?\[\]\\\x00-\x1f]")


class FileStore(Protocol):
    """A file system holding boot-loader state (an ESP, a /boot, a FAT image)."""

    def read(self, path: str, max_size: int | None = None) -> bytes:
        """The whole content of the file ``path``; :class:`TooLarge` beyond ``max_size`` bytes."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Create or replace ``path`` (its directory must exist): temp name, then rename."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst``; ``dst`` must not exist."""
        ...

    def list(self, directory: str) -> builtins.list[str]:
        """The names (not paths) in ``directory``, sorted."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a file or directory ``path`` exists."""
        ...

    def remove(self, path: str) -> None:
        """Delete the file ``path``."""
        ...

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents; existing ones are fine."""
        ...


@runtime_checkable
class StreamingStore(FileStore, Protocol):
    """A store that also takes and hashes large files (boot files) without holding them whole."""

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> int:
        """Create or replace ``path`` with the bytes of ``chunks``; their count.

        Crash-safe: the bytes go to the hidden temporary name :func:`temp_name`
        beside ``path`` (a fixed name, so a crash's leftover is reused, never
        piled up on a small ESP), are flushed to the medium, and only then
        renamed over ``path``, the rename flushed too. If ``chunks`` raises (a
        failed download, a hash that does not match), ``path`` is untouched and
        the exception propagates.
        """
        ...

    def digest(self, path: str, max_size: int) -> tuple[int, str] | None:
        """Size and sha256 of the file ``path`` (None if missing); TooLarge beyond ``max_size``."""
        ...


class TooLarge(DiskError):
    """``io``: a file is larger than its reader allows (a bounded read)."""

    def __init__(self, where: str, max_size: int) -> None:
        super().__init__("io", f"{where}: larger than {max_size} bytes")
        self.max_size = max_size


def check_read_size(data: bytes, where: str, max_size: int | None) -> bytes:
    if max_size is not None and len(data) > max_size:
        raise TooLarge(where, max_size)
    return data


def is_clean_name(name: str) -> bool:
    """Whether a name read from a directory listing can be used as a store path component."""
    try:
        return clean_path(name) == name and "/" not in name
    except ValueError:
        return False


@runtime_checkable
class Locates(Protocol):
    """A store that can say where a path is, for messages a person reads."""

    def where(self, path: str) -> str: ...


def describe(store: FileStore, path: str) -> str:
    """``path`` as a person can find it: a host path, or ``image@@offset:/path``."""
    if isinstance(store, Locates):
        return store.where(path)
    return f"{store!r}:/{clean_path(path)}"


def clean_path(path: str) -> str:
    """``path`` normalized to ``a/b/c`` (no leading slash); "" is the root.

    Refuses ``..``, empty components inside the path and characters that a FAT
    tool would glob or misread, rather than guess what was meant.
    """
    if _BAD_PATH_CHARS.search(path):
        raise ValueError(f"{path!r}: a store path cannot hold wildcards, backslashes or controls")
    parts = [p for p in path.strip("/").split("/")] if path.strip("/") else []
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"{path!r}: a store path is plain names separated by '/'")
    return "/".join(parts)


def parent_and_name(path: str) -> tuple[str, str]:
    cleaned = clean_path(path)
    if not cleaned:
        raise ValueError("the root directory is not a file")
    parent, _, name = cleaned.rpartition("/")
    return parent, name


def temp_name(name: str) -> str:
    """The hidden name a store writes ``name`` under before renaming it into place."""
    return f".{name}.tmp"


# ---- a mounted directory --------------------------------------------------------------------


class DirStore:
    """A mounted ESP or boot directory on the running host."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"DirStore({str(self.root)!r})"

    def where(self, path: str) -> str:
        return str(self._path(path))

    def _path(self, path: str) -> Path:
        cleaned = clean_path(path)
        return self.root / cleaned if cleaned else self.root

    def _error(self, path: str, exc: OSError, doing: str) -> DiskError:
        if isinstance(exc, FileNotFoundError):
            return DiskError(
                "io",
                f"{self.where(path)}: no such file or directory",
                hint="is the ESP mounted where [disk] says?",
            )
        return DiskError("io", f"{self.where(path)}: cannot {doing}: {exc.strerror or exc}")

    def read(self, path: str, max_size: int | None = None) -> bytes:
        try:
            with self._path(path).open("rb") as fh:
                data = fh.read(-1 if max_size is None else max_size + 1)
        except OSError as exc:
            raise self._error(path, exc, "read") from exc
        return check_read_size(data, self.where(path), max_size)

    def write(self, path: str, data: bytes) -> None:
        parent, name = parent_and_name(path)
        directory = self._path(parent)
        if not directory.is_dir():
            raise self._error(parent, FileNotFoundError(), "write")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise self._error(path, exc, "create a temporary file beside") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                _keep_mode(fh.fileno(), directory / name)
                os.fsync(fh.fileno())
            os.replace(tmp, directory / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(path, exc, "write") from exc
        self._sync_dir(parent)

    def rename(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        if not source.exists():
            raise self._error(src, FileNotFoundError(), "rename")
        if os.path.lexists(target):
            raise DiskError("io", f"{self.where(dst)}: cannot rename {src} over it: it exists")
        try:
            os.rename(source, target)
        except OSError as exc:
            raise self._error(src, exc, f"rename to {dst}") from exc
        self._sync_dir(parent_and_name(dst)[0])
        if parent_and_name(src)[0] != parent_and_name(dst)[0]:
            self._sync_dir(parent_and_name(src)[0])

    def list(self, directory: str) -> builtins.list[str]:
        try:
            return sorted(os.listdir(self._path(directory)))
        except OSError as exc:
            raise self._error(directory, exc, "list") from exc

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._path(path))

    def remove(self, path: str) -> None:
        try:
            os.unlink(self._path(path))
        except OSError as exc:
            raise self._error(path, exc, "remove") from exc
        self._sync_dir(parent_and_name(path)[0])

    def makedirs(self, path: str) -> None:
        try:
            self._path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(path, exc, "create the directory") from exc

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> int:
        parent, name = parent_and_name(path)
        directory = self._path(parent)
        if not directory.is_dir():
            raise self._error(parent, FileNotFoundError(), "write")
        tmp = directory / temp_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o644)
        except OSError as exc:
            raise self._error(path, exc, "create a temporary file beside") from exc
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:  # may raise: a download error, a hash mismatch
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise self._error(path, exc, "write") from exc
                    written += len(chunk)
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError as exc:
                    raise self._error(path, exc, "write") from exc
            try:
                os.replace(tmp, directory / name)
            except OSError as exc:
                raise self._error(path, exc, "rename into place") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._sync_dir(parent)
        return written

    def digest(self, path: str, max_size: int) -> tuple[int, str] | None:
        try:
            with self._path(path).open("rb") as fh:
                return hash_file(fh, self.where(path), max_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(path, exc, "read") from exc

    def _sync_dir(self, directory: str) -> None:
        try:
            fd = os.open(self._path(directory), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise self._error(directory, exc, "open the directory") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some file systems (and FUSE) refuse fsync on a directory; the data is
            # synced already, the rename is as durable as the medium makes it.
            log.debug("directory_fsync_unsupported", path=self.where(directory), error=str(exc))
        finally:
            os.close(fd)


def _keep_mode(fd: int, target: Path) -> None:
    """Give the new file the permissions of the one it replaces (mkstemp makes 0600)."""
    try:
        mode = os.stat(target).st_mode & 0o7777
    except OSError:
        mode = 0o644
    with contextlib.suppress(OSError):  # vfat cannot store permissions: EPERM
        os.fchmod(fd, mode)


def hash_file(fh: BinaryIO, where: str, max_size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := fh.read(1024 * 1024):
        size += len(chunk)
        if size > max_size:
            raise TooLarge(where, max_size)
        digest.update(chunk)
    return size, digest.hexdigest()


# ---- finding the boot files ------------------------------------------------------------------


def find_mounted(candidates: Sequence[Path], marker: str) -> Path:
    """The first of ``candidates`` (mount points) holding ``marker`` (``loader/entries``)."""
    for root in candidates:
        if (root / clean_path(marker)).exists():
            return root
    raise DiskError(
        "esp_invalid",
        f"none of {', '.join(str(c) for c in candidates)} holds {clean_path(marker)}: "
        "the ESP (or /boot) is not mounted, or the boot loader is not installed",
        hint="mount it, or set [disk] esp to its mount point (or esp_partition to its "
        "GPT partition name)",
    )
