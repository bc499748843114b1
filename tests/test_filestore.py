"""The file-store port: the same behaviour on a directory and on a FAT image through mtools."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from devtools.diskimage import PartitionSpec
from devtools.espimage import EFI_SYSTEM_TYPE, fsck_fat, make_esp_disk
from partitions.filestore import DirStore, FileStore, TooLarge, clean_path, describe
from partitions.mtools import MtoolsStore, fat_partition
from tests.conftest import MakeImage
from updater.errors import CommandError, DiskError
from updater.run import Completed, run

MiB = 1024 * 1024


@pytest.fixture(params=["dir", "mtools"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FileStore]:
    if request.param == "dir":
        root = tmp_path / "esp"
        root.mkdir()
        yield DirStore(root)
    else:
        disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
        yield disk.esp
        esp = disk.layout.by_label("EFI-SYSTEM")
        code, out = fsck_fat(disk.path, esp.offset, esp.size)
        assert code == 0, out  # whatever the test did, the FAT is still consistent


def snapshot(store: FileStore, directory: str = "") -> dict[str, bytes | None]:
    """Every path under ``directory`` -> its bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for name in store.list(directory):
        path = f"{directory}/{name}" if directory else name
        try:
            out[path] = store.read(path)
        except DiskError:
            out[path] = None
            out.update(snapshot(store, path))
    return out


def test_write_read_list(store: FileStore) -> None:
    store.makedirs("loader/entries")
    data = bytes(range(256)) * 3
    store.write("loader/entries/a+1-0.conf", data)
    store.write("/loader/entries/b.conf", b"")
    assert store.read("loader/entries/a+1-0.conf") == data
    assert store.read("loader/entries/b.conf") == b""
    assert store.list("loader/entries") == ["a+1-0.conf", "b.conf"]  # no temporaries left
    assert store.list("") == ["loader"]
    assert store.list("loader") == ["entries"]
    assert store.exists("loader") and store.exists("loader/entries/b.conf")
    assert not store.exists("loader/entries/c.conf")
    assert store.exists("")


def test_bounded_read(store: FileStore) -> None:
    store.write("grubenv", b"x" * 1025)
    assert store.read("grubenv", 1025) == b"x" * 1025
    with pytest.raises(TooLarge) as err:
        store.read("grubenv", 1024)
    assert err.value.kind == "io" and err.value.max_size == 1024
    assert "grubenv: larger than 1024 bytes" in err.value.message


def test_write_replaces_whole(store: FileStore) -> None:
    store.write("grubenv", b"x" * 1024)
    store.write("grubenv", b"short")
    assert store.read("grubenv") == b"short"
    # FAT keeps a name that fits 8.3 as its upper-case short name: names compare without case
    assert [n.lower() for n in store.list("")] == ["grubenv"]


def test_rename(store: FileStore) -> None:
    store.makedirs("d/sub")
    store.write("d/old+1-0.conf", b"entry")
    store.rename("d/old+1-0.conf", "d/old+0-1.conf")
    assert store.list("d") == ["old+0-1.conf", "sub"]
    store.rename("d/old+0-1.conf", "d/sub/moved.conf")
    assert store.read("d/sub/moved.conf") == b"entry"
    assert store.list("d") == ["sub"]


def test_rename_never_overwrites(store: FileStore) -> None:
    store.write("a.conf", b"a")
    store.write("b.conf", b"b")
    before = snapshot(store)
    with pytest.raises(DiskError) as err:
        store.rename("a.conf", "b.conf")
    assert err.value.kind == "io"
    assert "b.conf" in err.value.message and "exists" in err.value.message
    assert snapshot(store) == before


def test_remove(store: FileStore) -> None:
    store.write("a.conf", b"a")
    store.remove("a.conf")
    assert store.list("") == []


def test_makedirs_is_idempotent(store: FileStore) -> None:
    store.makedirs("a/b/c")
    store.makedirs("a/b/c")
    store.makedirs("a/b")
    assert store.list("a/b") == ["c"]
    store.write("a/file", b"1")
    with pytest.raises(DiskError) as err:
        store.makedirs("a/file/x")
    assert err.value.kind == "io" and "a/file" in err.value.message


@pytest.mark.parametrize(
    ("verb", "args", "named"),
    [
        ("read", ("missing.conf",), "missing.conf"),
        ("read", ("nodir/x",), "nodir/x"),
        ("write", ("nodir/x", b"1"), "nodir"),
        ("rename", ("missing.conf", "other.conf"), "missing.conf"),
        ("list", ("nodir",), "nodir"),
        ("remove", ("missing.conf",), "missing.conf"),
    ],
)
def test_missing_paths_are_io_errors_naming_the_path(
    store: FileStore, verb: str, args: tuple[object, ...], named: str
) -> None:
    store.write("present", b"1")
    before = snapshot(store)
    with pytest.raises(DiskError) as err:
        getattr(store, verb)(*args)
    assert err.value.kind == "io"
    assert describe(store, named) in err.value.message
    assert snapshot(store) == before


def test_list_of_a_file_is_an_error(store: FileStore) -> None:
    store.write("file", b"1")
    with pytest.raises(DiskError) as err:
        store.list("file")
    assert err.value.kind == "io"


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("", ""),
        ("/", ""),
        ("/a/b/", "a/b"),
        ("loader/entries/x+1-0.conf", "loader/entries/x+1-0.conf"),
    ],
)
def test_clean_path(path: str, clean: str) -> None:
    assert clean_path(path) == clean


@pytest.mark.parametrize("path", ["a/../b", "./a", "a//b", "a/*.conf", "a?", "a\\b", "a\nb"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        clean_path(path)


def test_describe(tmp_path: Path) -> None:
    assert describe(DirStore(tmp_path), "loader/entries") == str(tmp_path / "loader/entries")
    assert describe(MtoolsStore(Path("/x/d.img"), 1048576), "/grub/grubenv") == (
        "/x/d.img@@1048576:/grub/grubenv"
    )


# ---- mtools specifics -----------------------------------------------------------------------


class RecordingRunner:
    """The real runner, recording each call's argv and environment."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Mapping[str, str] | None]] = []

    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        self.calls.append((list(argv), env))
        return run(argv, input=input, check=check, timeout=timeout, env=env)


def test_mtools_calls(tmp_path: Path) -> None:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    runner = RecordingRunner()
    store = MtoolsStore(disk.path, disk.esp.offset, runner=runner)
    store.makedirs("loader/entries")
    store.write("loader/entries/a.conf", b"x")
    store.rename("loader/entries/a.conf", "loader/entries/a+1-0.conf")
    drive = f"{disk.path}@@{disk.esp.offset}"
    tools = [argv[0] for argv, _ in runner.calls]
    assert {"mmd", "mcopy", "mren", "mdir"} <= set(tools)
    for argv, env in runner.calls:
        assert argv[1:3] == ["-i", drive]
        assert env is not None and env["MTOOLS_SKIP_CHECK"] == "1"
    # the write went through a hidden temporary, renamed into place
    copies = [argv for argv, _ in runner.calls if argv[0] == "mcopy"]
    assert copies[0][-1] == "::/loader/entries/.a.conf.tmp"
    renames = [argv for argv, _ in runner.calls if argv[0] == "mren"]
    assert renames[0][-2:] == ["::/loader/entries/.a.conf.tmp", "::/loader/entries/a.conf"]


def test_missing_mtools_is_an_io_error_with_a_hint(tmp_path: Path) -> None:
    def missing(argv: Sequence[str], **_kwargs: object) -> Completed:
        raise CommandError(
            "command_missing", f"{argv[0]}: not installed", argv=list(argv), returncode=None
        )

    store = MtoolsStore(tmp_path / "d.img", 0, runner=missing)
    with pytest.raises(DiskError) as err:
        store.read("x")
    assert err.value.kind == "io" and err.value.hint == "install mtools"


def test_an_mdir_that_fails_is_no_missing_file(tmp_path: Path) -> None:
    """Only mtools' "not found" means absent: an mdir killed by a signal (the service
    stopping at shutdown) or an image it cannot open is an io error, not a boot entry's
    kernel reported missing."""
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    real = MtoolsStore(disk.path, disk.esp.offset)
    real.makedirs("USR-A")
    real.write("USR-A/vmlinuz", b"k")
    assert real.exists("USR-A/vmlinuz") and not real.exists("USR-A/initrd.img")

    def killed(argv: Sequence[str], **kwargs: Any) -> Completed:
        if argv[0] == "mdir":
            return Completed(tuple(argv), -15, b"", b"")
        return run(argv, **kwargs)

    store = MtoolsStore(disk.path, disk.esp.offset, runner=killed)
    with pytest.raises(DiskError) as err:
        store.exists("USR-A/vmlinuz")
    assert err.value.kind == "io" and "USR-A/vmlinuz" in err.value.message
    gone = MtoolsStore(tmp_path / "no-such.img", 0)
    with pytest.raises(DiskError):
        gone.exists("USR-A/vmlinuz")


def test_fat_partition(make_image: MakeImage) -> None:
    layout = make_image(leading=[PartitionSpec("EFI-SYSTEM", 2 * MiB, EFI_SYSTEM_TYPE)])
    esp = layout.by_label("EFI-SYSTEM")
    assert fat_partition(layout.path, "EFI-SYSTEM") == (esp.offset, esp.size)
    with pytest.raises(DiskError) as err:
        fat_partition(layout.path, "ESP")
    assert err.value.kind == "esp_invalid"
    assert str(layout.path) in err.value.message
    assert "EFI-SYSTEM, USR-A, USR-B" in err.value.message


def test_dir_store_keeps_the_mode_of_what_it_replaces(tmp_path: Path) -> None:
    store = DirStore(tmp_path)
    store.write("new", b"1")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644
    (tmp_path / "new").chmod(0o600)
    store.write("new", b"2")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600
