"""Partitioned disk images and loop devices, made and inspected with the real tools.

For tests, the demo and benchmarks only: images are partitioned with ``sfdisk``
and what the agent wrote is read back with ``sfdisk --json``, ``cgpt show`` and
``sgdisk -v``, never with our own GPT code.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import structlog

from partitions.bootcontrol import SlotFlags
from updater.errors import CommandError
from updater.run import Runner, run

log = structlog.get_logger(__name__)

COREOS_USR_TYPE = UUID("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6")
LINUX_DATA_TYPE = UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
DEFAULT_LABELS = ("USR-A", "USR-B")
ALIGNMENT = 1024 * 1024  # bytes; partitions start on 1 MiB boundaries
IMAGE_SECTOR_SIZE = 512  # bytes; what sfdisk assumes for a regular file
BACKUP_RESERVE = 1024 * 1024  # bytes at the end for the backup GPT (needs 33 sectors)

# sfdisk's names for attribute bits 0-2; bits 48-63 are printed as GUID:n
_SFDISK_ATTR_NAMES = {"RequiredPartition": 0, "NoBlockIOProtocol": 1, "LegacyBIOSBootable": 2}


@dataclass(frozen=True)
class PartitionSpec:
    label: str
    size: int  # bytes, a multiple of the sector size
    type_guid: UUID = LINUX_DATA_TYPE


@dataclass(frozen=True)
class PartitionLayout:
    index: int  # 1-based GPT partition number
    label: str
    type_guid: UUID
    part_uuid: UUID
    offset: int  # bytes from the start of the disk
    size: int  # bytes


@dataclass(frozen=True)
class DiskLayout:
    path: Path
    size: int  # bytes
    sector_size: int  # bytes
    disk_guid: UUID
    partitions: tuple[PartitionLayout, ...]

    def by_label(self, label: str) -> PartitionLayout:
        for p in self.partitions:
            if p.label == label:
                return p
        raise KeyError(label)


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def image_size(specs: Sequence[PartitionSpec]) -> int:
    """Bytes an image needs for ``specs``: 1 MiB lead-in, aligned partitions, backup GPT."""
    return ALIGNMENT + sum(_align_up(s.size, ALIGNMENT) for s in specs) + BACKUP_RESERVE


def sfdisk_script(specs: Sequence[PartitionSpec], sector_size: int = IMAGE_SECTOR_SIZE) -> str:
    """An sfdisk script creating a GPT with ``specs`` in order, each 1 MiB aligned."""
    lines = ["label: gpt", "unit: sectors"]
    start = ALIGNMENT
    for spec in specs:
        if spec.size <= 0 or spec.size % sector_size:
            raise ValueError(f"{spec.label}: size {spec.size} is not a multiple of {sector_size}")
        if '"' in spec.label:
            raise ValueError(f"{spec.label!r}: a label cannot hold a double quote")
        lines.append(
            f"start={start // sector_size}, size={spec.size // sector_size}, "
            f'type={spec.type_guid}, name="{spec.label}"'
        )
        start += _align_up(spec.size, ALIGNMENT)
    return "\n".join(lines) + "\n"


def partition(
    disk: Path,
    specs: Sequence[PartitionSpec],
    *,
    sector_size: int = IMAGE_SECTOR_SIZE,
    runner: Runner = run,
) -> None:
    """Write a new GPT with ``specs`` to a disk image or a (loop) block device."""
    runner(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "always", str(disk)],
        input=sfdisk_script(specs, sector_size).encode(),
    )


def make_disk_image(
    path: Path,
    slot_size: int,
    labels: Sequence[str] = DEFAULT_LABELS,
    extra: Sequence[PartitionSpec] = (),
    *,
    leading: Sequence[PartitionSpec] = (),
    runner: Runner = run,
) -> DiskLayout:
    """A sparse image: ``leading`` partitions, one CoreOS-usr slot per label, then ``extra``."""
    specs = [
        *leading,
        *(PartitionSpec(label, slot_size, COREOS_USR_TYPE) for label in labels),
        *extra,
    ]
    size = image_size(specs)
    with open(path, "wb") as f:
        f.truncate(size)
    partition(path, specs, runner=runner)
    layout = read_layout(path, runner=runner)
    log.debug("disk_image_made", path=str(path), size=size, partitions=len(specs))
    return layout


# ---- reading back with the real tools -------------------------------------------------------


def sfdisk_json(disk: Path, *, runner: Runner = run) -> dict[str, Any]:
    """``sfdisk --json``'s "partitiontable" object."""
    table: dict[str, Any] = json.loads(runner(["sfdisk", "--json", str(disk)]).text)[
        "partitiontable"
    ]
    return table


def read_layout(disk: Path, *, runner: Runner = run) -> DiskLayout:
    """The layout of ``disk`` as sfdisk sees it."""
    table = sfdisk_json(disk, runner=runner)
    sector = int(table.get("sectorsize", IMAGE_SECTOR_SIZE))
    node_prefix = str(table["device"])
    parts = tuple(
        PartitionLayout(
            index=_index_of(str(p["node"]), node_prefix),
            label=str(p.get("name", "")),
            type_guid=UUID(str(p["type"])),
            part_uuid=UUID(str(p["uuid"])),
            offset=int(p["start"]) * sector,
            size=int(p["size"]) * sector,
        )
        for p in table.get("partitions", [])
    )
    with open(disk, "rb") as f:
        size = f.seek(0, os.SEEK_END)
    return DiskLayout(disk, size, sector, UUID(str(table["id"])), parts)


def _index_of(node: str, device: str) -> int:
    # sfdisk names partition N of /dev/loop0 "/dev/loop0pN" and of disk.img "disk.img N"
    return int(node[len(device) :].lstrip("p"))


def sfdisk_partition(disk: Path, index: int, *, runner: Runner = run) -> dict[str, Any]:
    """sfdisk's JSON object for partition ``index``."""
    table = sfdisk_json(disk, runner=runner)
    for p in table.get("partitions", []):
        part: dict[str, Any] = p
        if _index_of(str(part["node"]), str(table["device"])) == index:
            return part
    raise KeyError(index)


def sfdisk_attr_bits(attrs: str) -> frozenset[int]:
    """Attribute bit numbers from sfdisk's "attrs" text, e.g. "RequiredPartition GUID:48,56"."""
    bits: set[int] = set()
    for word in attrs.split():
        if word in _SFDISK_ATTR_NAMES:
            bits.add(_SFDISK_ATTR_NAMES[word])
        elif word.startswith("GUID:"):
            bits.update(int(n) for n in word[len("GUID:") :].split(",") if n)
        else:
            raise ValueError(f"unknown sfdisk attribute {word!r}")
    return frozenset(bits)


def set_attr_bits(disk: Path, index: int, bits: Sequence[int], *, runner: Runner = run) -> None:
    """Set the attribute word of partition ``index`` with sfdisk (exactly ``bits``)."""
    names = {v: k for k, v in _SFDISK_ATTR_NAMES.items()}
    words = [names.get(b, f"GUID:{b}") for b in sorted(bits)]
    runner(
        [
            "sfdisk",
            "--quiet",
            "--no-reread",
            "--no-tell-kernel",
            "--part-attrs",
            str(disk),
            str(index),
            ",".join(words),
        ]
    )


def cgpt_show(
    disk: Path, index: int, field: Literal["P", "T", "S"], *, runner: Runner = run
) -> int:
    """One gpt-prio field as cgpt reads it: P priority, T tries, S successful."""
    return int(runner(["cgpt", "show", "-i", str(index), f"-{field}", str(disk)]).text.strip())


def cgpt_flags(disk: Path, index: int, *, runner: Runner = run) -> SlotFlags:
    """The gpt-prio flags of partition ``index`` as cgpt reads them."""
    return SlotFlags(
        priority=cgpt_show(disk, index, "P", runner=runner),
        tries=cgpt_show(disk, index, "T", runner=runner),
        successful=bool(cgpt_show(disk, index, "S", runner=runner)),
    )


def sgdisk_verify(disk: Path, *, runner: Runner = run) -> str:
    """``sgdisk -v`` output; it contains "No problems found." for a healthy table."""
    return runner(["sgdisk", "-v", str(disk)], check=False).text


def sfdisk_verify(disk: Path, *, runner: Runner = run) -> tuple[int, str]:
    """``sfdisk --verify`` exit status and output (0 and "No errors detected." when healthy)."""
    done = runner(["sfdisk", "--verify", str(disk)], check=False)
    return done.returncode, done.text + done.stderr.decode("utf-8", "replace")


# ---- loop devices ---------------------------------------------------------------------------


@contextlib.contextmanager
def loop_device(
    image: Path,
    *,
    offset: int | None = None,
    sizelimit: int | None = None,
    sector_size: int | None = None,
    runner: Runner = run,
) -> Iterator[Path]:
    """Attach ``image`` to a free loop device for the block; always detach it afterwards.

    Always ``losetup -f`` (never a fixed number). No ``-P``: this kernel makes no
    partition nodes; attach a partition with ``offset``/``sizelimit`` instead.
    """
    argv = ["losetup", "-f", "--show"]
    if offset is not None:
        argv += ["--offset", str(offset)]
    if sizelimit is not None:
        argv += ["--sizelimit", str(sizelimit)]
    if sector_size is not None:
        argv += ["--sector-size", str(sector_size)]
    device = Path(runner([*argv, str(image)]).text.strip())
    log.debug("loop_attached", device=str(device), image=str(image))
    try:
        yield device
    finally:
        _detach(device, runner)


def _detach(device: Path, runner: Runner) -> None:
    # A just-closed device can be briefly busy (udev probing it); retry a little.
    for attempt in range(10):
        try:
            runner(["losetup", "-d", str(device)])
        except CommandError:
            if attempt == 9:
                raise
            time.sleep(0.1)
        else:
            log.debug("loop_detached", device=str(device))
            return
