"""The booted slot's file system size, read from what mkfs really wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from updater.fssize import HEAD, fs_size

MIB = 1024 * 1024


def mkfs(tmp_path: Path, size: int, *args: str) -> bytes:
    image = tmp_path / "fs.img"
    image.unlink(missing_ok=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", *args, str(image), f"{size // 1024}k"],
        check=True,
        capture_output=True,
    )
    with image.open("rb") as f:
        return f.read(HEAD)


@pytest.mark.parametrize(
    ("size", "args"),
    [
        (64 * MIB, ()),
        (64 * MIB, ("-b", "1024")),
        (33 * MIB + 4096 * 3, ("-b", "4096")),
        (96 * MIB, ("-O", "64bit", "-b", "4096")),
        (80 * MIB, ("-O", "^64bit", "-t", "ext2")),
    ],
)
def test_the_size_mkfs_gave_the_file_system(
    tmp_path: Path, size: int, args: tuple[str, ...]
) -> None:
    assert fs_size(mkfs(tmp_path, size, *args), 1024 * MIB) == size


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\0" * HEAD,  # zeros: no file system
        b"\xff" * HEAD,
        b"hsqs" + b"\0" * (HEAD - 4),  # another file system: not read
    ],
)
def test_no_file_system_it_reads_is_none(head: bytes) -> None:
    assert fs_size(head, 1024 * MIB) is None


def test_a_superblock_that_claims_more_than_the_slot_is_none(tmp_path: Path) -> None:
    head = mkfs(tmp_path, 64 * MIB)
    assert fs_size(head, 64 * MIB) == 64 * MIB
    assert fs_size(head, 64 * MIB - 1) is None


def test_a_block_size_ext4_does_not_know_is_none(tmp_path: Path) -> None:
    head = bytearray(mkfs(tmp_path, 64 * MIB))
    head[1024 + 24 : 1024 + 28] = (30).to_bytes(4, "little")
    assert fs_size(bytes(head), 1 << 62) is None
