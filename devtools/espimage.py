"""Disk images with a FAT ESP beside the A/B slots, made with sfdisk and mformat.

For tests, the demo and the boot tests: the ESP is formatted in place inside
the image (``mformat -i IMAGE@@OFFSET``), so neither root nor a vfat driver is
needed, and the boot-control backends reach it through
:class:`partitions.mtools.MtoolsStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from devtools.diskimage import DEFAULT_LABELS, DiskLayout, PartitionSpec, make_disk_image
from partitions.filestore import DirStore, FileStore
from partitions.mtools import MTOOLS_ENV, MtoolsStore
from updater.run import Runner, run

EFI_SYSTEM_TYPE = UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
ESP_LABEL = "EFI-SYSTEM"
FAT_SECTOR = 512  # bytes; mformat's sector size


@dataclass(frozen=True)
class EspDisk:
    layout: DiskLayout  # the whole disk: the ESP first, then the slots
    esp: MtoolsStore  # the ESP's FAT file system, through mtools

    @property
    def path(self) -> Path:
        return self.layout.path


def format_fat(
    image: Path, offset: int, size: int, *, volume: str = "ESP", runner: Runner = run
) -> MtoolsStore:
    """Make a FAT file system of ``size`` bytes at ``offset`` of ``image``."""
    if size % FAT_SECTOR or offset % FAT_SECTOR:
        raise ValueError(f"offset {offset} and size {size} must be whole {FAT_SECTOR}-byte sectors")
    drive = f"{image}@@{offset}"
    runner(
        ["mformat", "-i", drive, "-T", str(size // FAT_SECTOR), "-v", volume, "::"], env=MTOOLS_ENV
    )
    return MtoolsStore(image, offset, runner=runner)


def make_esp_disk(
    path: Path,
    slot_size: int,
    esp_size: int = 8 * 1024 * 1024,
    labels: Sequence[str] = DEFAULT_LABELS,
    *,
    esp_label: str = ESP_LABEL,
    runner: Runner = run,
) -> EspDisk:
    """A sparse GPT image: a FAT-formatted ESP (partition 1), then one slot per label."""
    layout = make_disk_image(
        path,
        slot_size,
        labels,
        leading=[PartitionSpec(esp_label, esp_size, EFI_SYSTEM_TYPE)],
        runner=runner,
    )
    esp = layout.by_label(esp_label)
    return EspDisk(layout, format_fat(path, esp.offset, esp.size, runner=runner))


def esp_store(disk: EspDisk, medium: str, mount_point: Path) -> FileStore:
    """The ESP of a test: ``mtools`` (inside the image) or ``dir`` (``mount_point``, made empty).

    The same backend code runs over both; a test parametrized over them shows it.
    """
    if medium == "mtools":
        return disk.esp
    if medium != "dir":
        raise ValueError(f"medium {medium!r}: mtools or dir")
    mount_point.mkdir()
    return DirStore(mount_point)


def fsck_fat(image: Path, offset: int, size: int, *, runner: Runner = run) -> tuple[int, str]:
    """``fsck.fat -n`` on a copy of the FAT at ``offset``: exit status and output."""
    copy = image.with_name(image.name + ".fat")
    with open(image, "rb") as src, open(copy, "wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
    try:
        done = runner(["fsck.fat", "-n", str(copy)], check=False)
        return done.returncode, done.text + done.stderr.decode("utf-8", "replace")
    finally:
        copy.unlink()
