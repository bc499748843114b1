"""The boot-control port: five verbs, one backend per bootloader (RAUC's shape), and the
slots every backend finds the same way: GPT partitions named by label."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from updater.errors import DiskError

if TYPE_CHECKING:
    from partitions.gpttable import GptTable

MAX_TRIES = 15  # what SlotFlags.tries can carry (gpt-prio's 4 bits)
MAX_PRIORITY = 15  # and SlotFlags.priority
DEFAULT_LABELS = ("USR-A", "USR-B")  # the slots' GPT partition names

# The boot loader backends' defaults, kept here (in the small port module) so the
# configuration can name them without loading the backends themselves.
SDBOOT_TRIES = 1  # boots a new slot's entry gets
SDBOOT_EFIVARS = Path("/sys/firmware/efi/efivars")
GRUBENV_PATH = "grub/grubenv"  # relative to the file system holding it
GRUBENV_NAMES = ("A", "B")  # RAUC's slot names in ORDER, A_OK, ...


@dataclass(frozen=True)
class Slot:
    """One A/B slot: a partition found by its GPT label."""

    label: str
    index: int  # 1-based GPT partition number
    part_uuid: UUID
    disk: Path  # the whole disk (block device or image file) holding it
    offset: int  # bytes from the start of the disk
    size: int  # bytes


@dataclass(frozen=True)
class SlotFlags:
    """The boot-selection flags of one slot (gpt-prio bits, or a backend's equivalent)."""

    priority: int  # 0..15; 0 = never boot
    tries: int  # 0..15; boot attempts left while not successful
    successful: bool

    @property
    def bootable(self) -> bool:
        return self.priority > 0 and (self.successful or self.tries > 0)


BAD = SlotFlags(priority=0, tries=0, successful=False)  # never boot


@dataclass(frozen=True)
class SlotStatus:
    slot: Slot
    flags: SlotFlags


class BootControl(Protocol):
    """Which slot boots next, and how a boot is judged."""

    def slots(self) -> tuple[SlotStatus, ...]:
        """Every configured slot with its current flags, in configured order."""
        ...

    def booted(self) -> Slot:
        """The slot the running system booted from (raises DiskError booted_unknown)."""
        ...

    def primary(self) -> Slot | None:
        """The slot the firmware would pick next boot, or None if none is bootable."""
        ...

    def mark_good(self, slot: Slot) -> None:
        """The slot booted and passed its health checks: keep booting it."""
        ...

    def mark_bad(self, slot: Slot) -> None:
        """Never boot this slot (priority 0, tries 0, not successful)."""
        ...

    def make_primary(self, slot: Slot) -> None:
        """Boot this slot next, once, on trial (highest priority, tries 1, not successful)."""
        ...


def find_slots(table: GptTable, disk: Path, labels: Sequence[str]) -> tuple[Slot, ...]:
    """The slots named ``labels`` in ``table``, in the order of ``labels``."""
    out: list[Slot] = []
    for label in labels:
        found = table.named(label)
        if not found:
            names = sorted({e.name for e in table.entries})
            raise DiskError(
                "slot_not_found",
                f"{disk}: no partition named {label!r} (found: {', '.join(names) or 'none'})",
                hint="set [disk] slots to the partition names of the A/B slots",
            )
        if len(found) > 1:
            raise DiskError(
                "gpt_invalid",
                f"{disk}: partitions {', '.join(str(e.index) for e in found)} "
                f"are all named {label!r}: which one is the slot?",
                hint="give each slot partition a unique name (sgdisk -c N:NAME); "
                "nothing was written",
            )
        e = found[0]
        out.append(
            Slot(
                label=label,
                index=e.index,
                part_uuid=e.part_uuid,
                disk=disk,
                offset=table.offset(e),
                size=table.size(e),
            )
        )
    sizes = {slot.size for slot in out}
    if len(sizes) > 1:
        raise DiskError(
            "gpt_invalid",
            f"{disk}: the slots differ in size: "
            + ", ".join(f"partition {s.index} ({s.label}) {s.size} bytes" for s in out),
            hint="A/B slots must be the same size so that every image fits either; "
            "nothing was written",
        )
    return tuple(out)


def same_slot(a: Slot, b: Slot) -> bool:
    """The same partition: number and PARTUUID (labels can be renamed)."""
    return a.index == b.index and a.part_uuid == b.part_uuid


def flags_of(statuses: Iterable[SlotStatus], slot: Slot, disk: Path) -> SlotFlags:
    """``slot``'s flags among ``statuses`` (a backend's ``slots()``), or slot_not_found."""
    for status in statuses:
        if same_slot(status.slot, slot):
            return status.flags
    raise not_a_slot_of(disk, slot)


def not_a_slot_of(disk: Path, slot: Slot) -> DiskError:
    """A verb was handed a slot that is not (any more) one of ``disk``'s."""
    return DiskError(
        "slot_not_found",
        f"{disk}: slot {slot.label} (partition {slot.index}, {slot.part_uuid}) "
        "is not one of this disk's slots",
        hint="the disk was repartitioned? restart the agent",
    )


def write_target_problem(booted: Slot, target: Slot) -> str | None:
    """Why writing an image into ``target`` would hit the running system, or None.

    The target must be another partition than the booted slot (number and
    PARTUUID) and, on the same disk, share none of its bytes.
    """
    if target.index == booted.index:
        return f"partition {target.index} is the booted slot"
    if target.part_uuid == booted.part_uuid:
        return f"partitions {booted.index} and {target.index} share the PARTUUID {booted.part_uuid}"
    if target.disk == booted.disk and (
        target.offset < booted.offset + booted.size and booted.offset < target.offset + target.size
    ):
        return (
            f"partition {target.index} (bytes {target.offset}+{target.size}) overlaps the "
            f"booted partition {booted.index} (bytes {booted.offset}+{booted.size})"
        )
    return None


def check_write_target(booted: Slot, target: Slot) -> None:
    """Raise ``gpt_invalid`` if writing ``target`` would overwrite the booted slot."""
    why = write_target_problem(booted, target)
    if why is not None:
        raise DiskError(
            "gpt_invalid",
            f"{target.disk}: refusing to write slot {target.label}: {why}",
            hint="inspect and repair the partition table (`sgdisk -v`); nothing was written",
        )
