"""Where the ESP or the grubenv lives: a small file-system port.

A boot-control backend that keeps its state in files (Boot Loader Spec entries,
a GRUB environment block) reads and writes them through a :class:`FileStore`,
so the same backend runs on a host with the ESP mounted (:class:`DirStore`) and
against a FAT file system inside a disk image or block device, through mtools,
without root or a vfat driver (:class:`MtoolsStore`): tests, the demo and
offline image building.

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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import structlog

from partitions import gpt
from updater.errors import CommandError, DiskError
from updater.run import Completed, Runner, run

log = structlog.get_logger(__name__)

# Characters we refuse in a path: globbing characters (mtools expands them), NUL,
# backslash (FAT's separator) and control characters.
_BAD_PATH_CHARS = re.compile(r"[*?\[\]\\\x00-\x1f]")

# mtools: skip its FAT sanity checks (a just-made or foreign FAT is fine for
# us) and read no per-user configuration that could remap drives or names.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


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


def check_size(data: bytes, where: str, max_size: int | None) -> bytes:
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


def _parent_and_name(path: str) -> tuple[str, str]:
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
        return check_size(data, self.where(path), max_size)

    def write(self, path: str, data: bytes) -> None:
        parent, name = _parent_and_name(path)
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
        self._sync_dir(_parent_and_name(dst)[0])
        if _parent_and_name(src)[0] != _parent_and_name(dst)[0]:
            self._sync_dir(_parent_and_name(src)[0])

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
        self._sync_dir(_parent_and_name(path)[0])

    def makedirs(self, path: str) -> None:
        try:
            self._path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(path, exc, "create the directory") from exc

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> int:
        parent, name = _parent_and_name(path)
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
                return _hash_file(fh, self.where(path), max_size)
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


# ---- a FAT file system inside an image or device, through mtools ----------------------------


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
        _parent_and_name(path)
        data = self._mtools("mcopy", self._target(path), "-", path=path).stdout
        return check_size(data, self.where(path), max_size)

    def write(self, path: str, data: bytes) -> None:
        parent, name = _parent_and_name(path)
        if not self._is_dir(parent):
            raise DiskError("io", f"{self.where(parent)}: no such directory")
        tmp = f"{parent}/{temp_name(name)}" if parent else temp_name(name)
        with _host_file(data) as source:
            # -D o: a temporary left over by a crash is simply replaced.
            self._mtools("mcopy", "-D", "o", str(source), self._target(tmp))
        # mtools cannot replace atomically: "-D o" deletes the old name, then renames.
        self._mtools("mren", "-D", "o", self._target(tmp), self._target(path))

    def rename(self, src: str, dst: str) -> None:
        src_parent, _ = _parent_and_name(src)
        dst_parent, dst_name = _parent_and_name(dst)
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
        _parent_and_name(path)
        self._mtools("mdel", self._target(path))

    def write_stream(self, path: str, chunks: Iterable[bytes]) -> int:
        """See :class:`StreamingStore`. mtools cannot fsync; the image (or device) file is
        fsynced after the copy and after the rename instead: mtools writes through the
        page cache of that same file, so its writes reach the medium in that order."""
        parent, name = _parent_and_name(path)
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
        _parent_and_name(path)
        if not self.exists(path):
            return None
        with tempfile.TemporaryDirectory(prefix="updater-mtools-") as d:
            copy = Path(d) / "file"
            self._mtools("mcopy", self._target(path), str(copy), path=path)
            with copy.open("rb") as fh:
                return _hash_file(fh, self.where(path), max_size)

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


def _hash_file(fh: BinaryIO, where: str, max_size: int) -> tuple[int, str]:
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
