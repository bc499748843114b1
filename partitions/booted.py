"""Which slot the running system booted from, and which disk holds it.

First the kernel command line (what the boot loader chose): ``mount.usr=``,
``verity.usr=``, ``usr=`` then ``root=``, each naming a partition as
``PARTUUID=<uuid>``, ``PARTLABEL=<label>``, ``/dev/disk/by-partuuid/<uuid>`` or
``/dev/disk/by-partlabel/<label>``. If it names none of the slots, the device
mounted at ``/usr`` (then ``/``) is traced through sysfs to a partition number
on a disk. A boot loader that also names what it picked (systemd-boot, the GRUB
fragment) is asked in between. The parsing is pure; :class:`BootedSlotFinder`
holds the roots of /proc, /sys and /dev, so tests can build a small tree.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import structlog

from partitions.bootcontrol import Slot
from updater.errors import DiskError

log = structlog.get_logger(__name__)

DEFAULT_CMDLINE = Path("/proc/cmdline")
DEFAULT_PROC = Path("/proc")
DEFAULT_SYS = Path("/sys")
DEFAULT_DEV = Path("/dev")

# Most specific first: /usr is where the A/B slot lives on CoreOS-like systems
# (verity.usr= when /usr is dm-verity and mount.usr= names /dev/mapper/usr).
CMDLINE_KEYS = ("mount.usr", "verity.usr", "usr", "root")
MOUNT_POINTS = ("/usr", "/")
_MAX_STACK_DEPTH = 4  # dm on dm on ... before giving up
MAX_CMDLINE_BYTES = 64 * 1024  # the kernel's COMMAND_LINE_SIZE is 2-4 KiB on most arches
MAX_MOUNTINFO_BYTES = 16 * 1024 * 1024  # ~100k mounts
MAX_SYSFS_BYTES = 4096  # one sysfs attribute is at most a page
_READ_CHUNK = 64 * 1024  # bytes per read(2): os.read allocates what it is asked for

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_UDEV_ESCAPE_RE = re.compile(r"\\x([0-9a-fA-F]{2})")
_MOUNTINFO_ESCAPE_RE = re.compile(r"\\([0-7]{3})")

_BOOTED_HINT = (
    "set [disk] kernel_cmdline to a file holding mount.usr=PARTUUID=<uuid of the booted "
    "slot>, or boot with that kernel parameter"
)


@dataclass(frozen=True)
class PartitionRef:
    """A partition named by a kernel parameter."""

    key: str  # the parameter, e.g. "mount.usr"
    part_uuid: UUID | None = None
    part_label: str | None = None

    def describe(self) -> str:
        if self.part_uuid is not None:
            return f"{self.key}=PARTUUID={self.part_uuid}"
        return f"{self.key}=PARTLABEL={self.part_label}"

    def matches(self, slot: Slot) -> bool:
        if self.part_uuid is not None:
            return self.part_uuid == slot.part_uuid
        return self.part_label == slot.label


@dataclass(frozen=True)
class BlockPartition:
    """A partition as sysfs describes it."""

    disk_name: str  # kernel name of the whole disk, e.g. "sda"
    disk_dev: tuple[int, int] | None  # major, minor of the whole disk
    number: int  # 1-based partition number


# ---- pure -----------------------------------------------------------------------------------


def split_cmdline(text: str) -> list[str]:
    """Split a kernel command line the way the kernel does (double quotes group)."""
    words: list[str] = []
    current: list[str] = []
    in_word = in_quotes = False
    for ch in text:
        if ch == '"':
            in_quotes = not in_quotes
            in_word = True
        elif ch.isspace() and not in_quotes:
            if in_word:
                words.append("".join(current))
            current, in_word = [], False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))
    return words


def cmdline_params(text: str) -> dict[str, str]:
    """``key=value`` parameters for the kernel (not those after ``--``); the last one wins."""
    params: dict[str, str] = {}
    for word in split_cmdline(text):
        if word == "--":
            break
        key, sep, value = word.partition("=")
        if sep:
            params[key] = value
    return params


def parse_partition_ref(key: str, value: str) -> PartitionRef | None:
    """The partition ``value`` names, or None for any other form (LABEL=, /dev/sda3, ...)."""
    for prefix in ("PARTUUID=", "/dev/disk/by-partuuid/"):
        if value.startswith(prefix):
            text = value[len(prefix) :]
            return PartitionRef(key, part_uuid=UUID(text)) if _UUID_RE.fullmatch(text) else None
    if value.startswith("PARTLABEL="):
        label = value[len("PARTLABEL=") :]
        return PartitionRef(key, part_label=label) if label else None
    if value.startswith("/dev/disk/by-partlabel/"):
        # udev escapes unsafe characters of a label in its symlink name as \xNN
        raw = value[len("/dev/disk/by-partlabel/") :]
        label = _UDEV_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), raw)
        return PartitionRef(key, part_label=label) if label else None
    return None


def partition_refs(text: str) -> tuple[PartitionRef, ...]:
    """The partitions the command line names, most specific parameter first."""
    params = cmdline_params(text)
    refs = (parse_partition_ref(k, params[k]) for k in CMDLINE_KEYS if k in params)
    return tuple(r for r in refs if r is not None)


def slot_from_cmdline(text: str, slots: Sequence[Slot]) -> Slot | None:
    """The slot named by the most specific parameter that names one of ``slots``."""
    for ref in partition_refs(text):
        for slot in slots:
            if ref.matches(slot):
                return slot
    return None


def mount_devices(mountinfo: str) -> dict[str, tuple[int, int]]:
    """Mount point -> (major, minor) from /proc/self/mountinfo text; later mounts win."""
    out: dict[str, tuple[int, int]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        major, sep, minor = fields[2].partition(":")
        if not (sep and is_number(major) and is_number(minor)):
            continue
        point = _MOUNTINFO_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        out[point] = (int(major), int(minor))
    return out


# ---- sysfs and /dev -------------------------------------------------------------------------


def read_text(path: Path, max_bytes: int) -> str | None:
    """A small kernel-provided text file, or None if unreadable, not UTF-8 or too large.

    Bounded: a file that is not what it should be (a huge regular file where
    /proc/cmdline was configured, /dev/zero) never costs more than ``max_bytes``,
    and a FIFO without a writer reads as empty instead of blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    if size > max_bytes:
        log.warning("kernel_file_too_large", path=str(path), max_bytes=max_bytes)
        return None
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text(path: Path) -> str | None:
    return read_text(path, MAX_SYSFS_BYTES)


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _parse_dev(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    major, sep, minor = text.strip().partition(":")
    if sep and is_number(major) and is_number(minor):
        return int(major), int(minor)
    return None


def _partition_at(node: Path, depth: int) -> BlockPartition | None:
    number = _read_text(node / "partition")
    if number is not None and is_number(number.strip()):
        disk = node.parent
        return BlockPartition(disk.name, _parse_dev(_read_text(disk / "dev")), int(number.strip()))
    # A device-mapper target (dm-verity for /usr) stacked on exactly one partition.
    try:
        slaves = sorted((node / "slaves").iterdir())
    except OSError:
        return None
    if len(slaves) != 1 or depth >= _MAX_STACK_DEPTH:
        return None
    return _partition_at(slaves[0].resolve(), depth + 1)


def partition_of(sys_root: Path, dev: tuple[int, int]) -> BlockPartition | None:
    """The partition under block device ``dev`` (following device-mapper stacking)."""
    node = sys_root / "dev" / "block" / f"{dev[0]}:{dev[1]}"
    if not node.exists():
        return None
    return _partition_at(node.resolve(), 0)


def _is_disk(candidate: Path, part: BlockPartition, dev_root: Path) -> bool:
    try:
        st = os.stat(candidate)
    except OSError:
        return False
    if stat.S_ISBLK(st.st_mode) and part.disk_dev is not None:
        return (os.major(st.st_rdev), os.minor(st.st_rdev)) == part.disk_dev
    node = dev_root / part.disk_name
    try:
        return os.path.samefile(node, candidate)
    except OSError:
        return False


def _mounted_partitions(proc_root: Path, sys_root: Path) -> list[tuple[str, BlockPartition]]:
    text = read_text(proc_root / "self" / "mountinfo", MAX_MOUNTINFO_BYTES)
    if text is None:
        return []
    mounts = mount_devices(text)
    out: list[tuple[str, BlockPartition]] = []
    for point in MOUNT_POINTS:
        if point in mounts:
            part = partition_of(sys_root, mounts[point])
            if part is not None:
                out.append((point, part))
    return out


def slot_from_mounts(
    slots: Sequence[Slot],
    *,
    proc_root: Path = DEFAULT_PROC,
    sys_root: Path = DEFAULT_SYS,
    dev_root: Path = DEFAULT_DEV,
) -> Slot | None:
    """The slot mounted at /usr, else at / (None if neither is a slot)."""
    for _point, part in _mounted_partitions(proc_root, sys_root):
        for slot in slots:
            if slot.index == part.number and _is_disk(slot.disk, part, dev_root):
                return slot
    return None


# ---- the answers ----------------------------------------------------------------------------


LoaderHint = Callable[[str | None], Slot | None]  # kernel command line text -> slot


@dataclass(frozen=True)
class BootedSlotFinder:
    """Where the running system says what it booted; one is injected into each backend.

    The defaults are the running system's; tests point them at a small tree.
    """

    kernel_cmdline: Path = DEFAULT_CMDLINE
    proc_root: Path = DEFAULT_PROC
    sys_root: Path = DEFAULT_SYS
    dev_root: Path = DEFAULT_DEV

    def cmdline(self) -> str | None:
        """The kernel command line's text, or None if unreadable."""
        return read_text(self.kernel_cmdline, MAX_CMDLINE_BYTES)

    def slot(
        self,
        slots: Sequence[Slot],
        loader_hint: LoaderHint | None = None,
        hint_source: str = "the boot loader",
    ) -> Slot:
        """The booted slot: kernel command line, else ``loader_hint``, else the mounts.

        systemd-boot (``LoaderEntrySelected``) and a GRUB fragment
        (``updater.slot=A``) also name what they booted; that is a second
        opinion, asked between the two: the partition on the kernel command line
        is what the kernel really mounts, so it wins; the loader's word comes
        before guessing from the mounts. DiskError booted_unknown if none names
        one of ``slots``.
        """
        text = self.cmdline()
        from_cmdline = slot_from_cmdline(text, slots) if text is not None else None
        hinted = loader_hint(text) if loader_hint is not None else None
        if from_cmdline is not None:
            if hinted is not None and hinted != from_cmdline:
                log.warning(
                    "booted_sources_disagree",
                    kernel_cmdline=from_cmdline.label,
                    loader=hinted.label,
                    loader_source=hint_source,
                )
            log.debug("booted_slot_found", slot=from_cmdline.label, source="kernel_cmdline")
            return from_cmdline
        if hinted is not None:
            log.debug("booted_slot_found", slot=hinted.label, source=hint_source)
            return hinted
        if text is None:
            log.warning("kernel_cmdline_unreadable", path=str(self.kernel_cmdline))
        slot = slot_from_mounts(
            slots, proc_root=self.proc_root, sys_root=self.sys_root, dev_root=self.dev_root
        )
        if slot is not None:
            log.debug("booted_slot_found", slot=slot.label, source="mountinfo")
            return slot
        named = ", ".join(r.describe() for r in partition_refs(text or ""))
        also = f"; {hint_source} names none of them either" if loader_hint is not None else ""
        raise DiskError(
            "booted_unknown",
            f"cannot tell which of {', '.join(s.label for s in slots)} is booted: "
            f"{self.kernel_cmdline} names {named or 'no partition'} and neither /usr nor / "
            f"is mounted from one of them{also}",
            hint=_BOOTED_HINT,
        )

    def disk(self) -> Path:
        """The whole disk holding the partition mounted at /usr, else at /."""
        for point, part in _mounted_partitions(self.proc_root, self.sys_root):
            disk = self.dev_root / part.disk_name
            log.debug("booted_disk_found", disk=str(disk), mount_point=point)
            return disk
        raise DiskError(
            "booted_unknown",
            "cannot tell which disk holds /usr or /: neither is mounted from a disk partition",
            hint="set [disk] device to the whole disk holding the A/B slots",
        )


RUNNING_SYSTEM = BootedSlotFinder()  # /proc/cmdline, /proc, /sys and /dev of this machine
