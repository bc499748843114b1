"""Which slot is booted: kernel command line forms and precedence, the sysfs fallback."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from devtools.diskimage import DiskLayout, loop_device
from partitions import booted
from partitions.bootcontrol import Slot
from tests.fuzzing import parse_or_typed_error
from updater.errors import DiskError

UUID_A = UUID("0b6c0a2e-7d3b-4e9f-9a51-6f0e6b1c2a11")
UUID_B = UUID("c3f1e5d2-1a2b-4c3d-8e9f-aabbccddeeff")
UUID_OTHER = UUID("11111111-2222-3333-4444-555555555555")


@dataclass(frozen=True)
class Tree:
    """A fake /proc, /sys and /dev: disk sda with slots at partitions 3 and 4."""

    root: Path
    slots: tuple[Slot, Slot]

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    def cmdline(self, text: str) -> Path:
        path = self.root / "cmdline"
        path.write_text(text + "\n")
        return path

    def mounts(self, *lines: tuple[str, str]) -> None:
        """(major:minor, mount point) pairs, as /proc/self/mountinfo lines."""
        text = "".join(
            f"{20 + i} 1 {dev} / {point} rw,relatime shared:1 - ext4 /dev/x rw\n"
            for i, (dev, point) in enumerate(lines)
        )
        (self.proc / "self" / "mountinfo").write_text(text)

    def finder(self, kernel_cmdline: Path | None = None) -> booted.BootedSlotFinder:
        cmdline = kernel_cmdline or self.root / "cmdline"
        return booted.BootedSlotFinder(cmdline, self.proc, self.sys, self.dev)

    def booted(self, cmdline: str = "") -> Slot:
        return self.finder(self.cmdline(cmdline)).slot(self.slots)


def _block(sys: Path, devpath: str, dev: str, partition: int | None = None) -> Path:
    node = sys / "devices" / devpath
    node.mkdir(parents=True)
    (node / "dev").write_text(dev + "\n")
    if partition is not None:
        (node / "partition").write_text(f"{partition}\n")
    link = sys / "dev" / "block" / dev
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(node, link.parent))
    return node


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    sys = tmp_path / "sys"
    _block(sys, "pci0000:00/block/sda", "8:0")
    _block(sys, "pci0000:00/block/sda/sda3", "8:3", partition=3)
    sda4 = _block(sys, "pci0000:00/block/sda/sda4", "8:4", partition=4)
    _block(sys, "pci0000:00/block/sdb", "8:16")
    _block(sys, "pci0000:00/block/sdb/sdb3", "8:19", partition=3)
    _block(sys, "virtual/block/loop0", "7:0")  # a whole disk, no partitions
    dm = _block(sys, "virtual/block/dm-0", "253:0")  # dm-verity /usr over sda4
    (dm / "slaves").mkdir()
    (dm / "slaves" / "sda4").symlink_to(os.path.relpath(sda4, dm / "slaves"))
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    disk = tmp_path / "dev" / "sda"
    disk.write_bytes(b"")
    (tmp_path / "dev" / "sdb").write_bytes(b"")
    slots = (
        Slot("USR-A", 3, UUID_A, disk, 1 << 20, 1 << 20),
        Slot("USR-B", 4, UUID_B, disk, 2 << 20, 1 << 20),
    )
    return Tree(tmp_path, slots)


# ---- the kernel command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "label"),
    [
        (f"mount.usr=PARTUUID={UUID_B}", "USR-B"),
        (f"mount.usr=PARTUUID={str(UUID_B).upper()}", "USR-B"),
        (f"usr=PARTUUID={UUID_A}", "USR-A"),
        (f"root=PARTUUID={UUID_B}", "USR-B"),
        (f"mount.usr=/dev/disk/by-partuuid/{UUID_A}", "USR-A"),
        (f"root=/dev/disk/by-partuuid/{str(UUID_B).upper()}", "USR-B"),
        ("mount.usr=PARTLABEL=USR-B", "USR-B"),
        ("usr=/dev/disk/by-partlabel/USR-A", "USR-A"),
        (f'BOOT_IMAGE=/vmlinuz "mount.usr=PARTUUID={UUID_B}" quiet', "USR-B"),
        (f'mount.usr="PARTUUID={UUID_B}"', "USR-B"),
        # Flatcar: /usr is dm-verity, the slot is named by verity.usr=
        (
            f"mount.usr=/dev/mapper/usr verity.usr=PARTUUID={UUID_A} rootflags=rw "
            "mount.usrflags=ro root=LABEL=ROOT console=ttyS0",
            "USR-A",
        ),
    ],
)
def test_cmdline_forms(tree: Tree, cmdline: str, label: str) -> None:
    assert tree.booted(cmdline).label == label


@pytest.mark.parametrize(
    ("cmdline", "label"),
    [
        (f"root=PARTUUID={UUID_B} usr=PARTUUID={UUID_B} mount.usr=PARTUUID={UUID_A}", "USR-A"),
        (f"root=PARTUUID={UUID_A} usr=PARTUUID={UUID_B}", "USR-B"),
        ("usr=PARTLABEL=USR-A mount.usr=PARTLABEL=USR-B root=PARTLABEL=USR-A", "USR-B"),
        # mount.usr names something that is not a slot: the next parameter that does wins
        (f"mount.usr=PARTUUID={UUID_OTHER} root=PARTUUID={UUID_A}", "USR-A"),
        # the last occurrence of a parameter counts, as for the kernel
        (f"root=PARTUUID={UUID_A} root=PARTUUID={UUID_B}", "USR-B"),
        # what follows "--" is for init, not the kernel
        (f"root=PARTUUID={UUID_A} -- root=PARTUUID={UUID_B}", "USR-A"),
    ],
)
def test_cmdline_precedence(tree: Tree, cmdline: str, label: str) -> None:
    assert tree.booted(cmdline).label == label


def test_udev_escapes_in_by_partlabel(tree: Tree) -> None:
    slot = Slot("USR B/1", 3, UUID_A, tree.slots[0].disk, 0, 1)
    text = r"mount.usr=/dev/disk/by-partlabel/USR\x20B\x2f1"
    assert booted.slot_from_cmdline(text, [slot]) == slot
    quoted = 'mount.usr="PARTLABEL=USR B/1"'
    assert booted.slot_from_cmdline(quoted, [slot]) == slot


@pytest.mark.parametrize(
    "value",
    [
        "LABEL=ROOT",
        "/dev/sda3",
        "PARTUUID=00112233-01",
        f"PARTUUID={UUID_A}/PARTNROFF=1",
        "PARTUUID=",
        "PARTLABEL=",
        "/dev/disk/by-partuuid/not-a-uuid",
    ],
)
def test_forms_that_name_no_slot(value: str) -> None:
    assert booted.parse_partition_ref("root", value) is None


def test_partition_refs_in_precedence_order() -> None:
    refs = booted.partition_refs(
        f"root=PARTLABEL=R usr=PARTUUID={UUID_A} quiet mount.usr=/dev/mapper/usr"
    )
    assert refs == (
        booted.PartitionRef("usr", part_uuid=UUID_A),
        booted.PartitionRef("root", part_label="R"),
    )


def test_split_cmdline() -> None:
    assert booted.split_cmdline('a=1  b="x y" "c=d e"\tf\n') == ["a=1", "b=x y", "c=d e", "f"]
    assert booted.cmdline_params("ro quiet a=1 a=2 b= c=x=y") == {"a": "2", "b": "", "c": "x=y"}


# ---- the mounts fallback --------------------------------------------------------------------


def test_usr_mount_traced_through_sysfs(tree: Tree) -> None:
    tree.mounts(("8:1", "/"), ("8:3", "/usr"))
    assert tree.booted("root=LABEL=ROOT ro").label == "USR-A"


def test_usr_on_dm_verity_is_traced_to_its_partition(tree: Tree) -> None:
    tree.mounts(("8:9", "/"), ("253:0", "/usr"))
    assert tree.booted("mount.usr=/dev/mapper/usr").label == "USR-B"


def test_root_mount_when_usr_is_not_separate(tree: Tree) -> None:
    tree.mounts(("0:22", "/proc"), ("8:4", "/"))
    assert tree.booted("").label == "USR-B"


def test_later_mount_over_usr_wins(tree: Tree) -> None:
    tree.mounts(("8:3", "/usr"), ("8:4", "/usr"))
    assert tree.booted("").label == "USR-B"


def test_cmdline_wins_over_mounts(tree: Tree) -> None:
    tree.mounts(("8:3", "/usr"))
    assert tree.booted(f"mount.usr=PARTUUID={UUID_B}").label == "USR-B"


def test_missing_cmdline_file_falls_back_to_mounts(tree: Tree) -> None:
    tree.mounts(("8:4", "/"))
    slot = tree.finder(tree.root / "missing").slot(tree.slots)
    assert slot.label == "USR-B"


@pytest.mark.parametrize(
    "mounts",
    [
        [],
        [("8:19", "/usr")],  # partition 3, but of sdb
        [("7:0", "/")],  # a whole disk
        [("0:30", "/"), ("0:31", "/usr")],  # overlayfs, btrfs: no block device
        [("8:99", "/")],  # not in sysfs
    ],
)
def test_unknown_is_a_typed_error(tree: Tree, mounts: list[tuple[str, str]]) -> None:
    tree.mounts(*mounts)
    with pytest.raises(DiskError) as err:
        tree.booted(f"root=LABEL=ROOT mount.usr=PARTUUID={UUID_OTHER}")
    assert err.value.kind == "booted_unknown"
    assert str(UUID_OTHER) in err.value.message
    assert err.value.hint and "kernel_cmdline" in err.value.hint


def test_mountinfo_parsing() -> None:
    text = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "30 1 8:3 / /usr ro,relatime shared:5 - ext4 /dev/sda3 ro\n"
        "31 1 8:5 / /mnt/with\\040space rw - ext4 /dev/sda5 rw\n"
        "garbage\n"
        "32 1 8:6 / /usr ro - ext4 /dev/sda6 ro\n"
    )
    assert booted.mount_devices(text) == {
        "/proc": (0, 21),
        "/usr": (8, 6),
        "/mnt/with space": (8, 5),
    }


def test_booted_disk(tree: Tree) -> None:
    tree.mounts(("8:4", "/"), ("253:0", "/usr"))
    disk = tree.finder().disk()
    assert disk == tree.dev / "sda"
    tree.mounts(("8:19", "/"))
    disk = tree.finder().disk()
    assert disk == tree.dev / "sdb"


def test_booted_disk_unknown(tree: Tree) -> None:
    tree.mounts(("0:30", "/"))
    with pytest.raises(DiskError) as err:
        tree.finder().disk()
    assert err.value.kind == "booted_unknown"
    assert err.value.hint


@pytest.mark.root
def test_block_device_disk_is_matched_by_device_number(tree: Tree, slot_image: DiskLayout) -> None:
    with loop_device(slot_image.path) as dev:
        rdev = os.stat(dev).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        # a sysfs where the loop device is a disk with partitions, /usr on its partition 2
        sys = tree.root / "sys-loop"
        _block(sys, "virtual/block/fake", f"{major}:{minor}")
        _block(sys, "virtual/block/fake/fake2", "259:77", partition=2)
        tree.mounts(("259:77", "/usr"))
        slots = [
            Slot(p.label, p.index, p.part_uuid, dev, p.offset, p.size)
            for p in slot_image.partitions
        ]
        found = booted.slot_from_mounts(slots, proc_root=tree.proc, sys_root=sys, dev_root=tree.dev)
        assert found is not None and found.label == "USR-B"
        # the same partition number on another disk is not a match
        _block(sys, "virtual/block/other", f"{major}:{minor + 1000}")
        _block(sys, "virtual/block/other/other2", "259:78", partition=2)
        tree.mounts(("259:78", "/usr"))
        assert booted.slot_from_mounts(slots, proc_root=tree.proc, sys_root=sys) is None


# ---- hostile kernel files: bounded, and never anything but the typed error -----------------


def test_mountinfo_with_digits_int_refuses() -> None:
    text = (
        "30 1 ²:3 / /usr ro - ext4 /dev/sda3 ro\n31 1 8:٣ / / ro - ext4 x ro\n32 1 8:4 / /boot rw\n"
    )
    assert booted.mount_devices(text) == {"/boot": (8, 4)}


@pytest.mark.parametrize("number", ["²", "٣", "3²", "", "-3", "0x3"])
def test_a_sysfs_partition_number_that_is_no_number(tree: Tree, number: str) -> None:
    (tree.sys / "devices" / "pci0000:00" / "block" / "sda" / "sda3" / "partition").write_text(
        number + "\n"
    )
    (tree.sys / "devices" / "pci0000:00" / "block" / "sda" / "dev").write_text("8:²\n")
    tree.mounts(("8:3", "/usr"))
    with pytest.raises(DiskError) as err:
        tree.booted("")
    assert err.value.kind == "booted_unknown"


def test_an_oversized_cmdline_is_not_read(tree: Tree) -> None:
    tree.mounts(("8:4", "/"))
    big = f"mount.usr=PARTUUID={UUID_A} " + "x" * booted.MAX_CMDLINE_BYTES
    result = parse_or_typed_error(lambda: tree.booted(big), max_bytes=1024 * 1024)
    assert isinstance(result, Slot) and result.label == "USR-B"  # from the mounts


def test_a_cmdline_that_is_a_fifo_does_not_hang(tree: Tree) -> None:
    fifo = tree.root / "cmdline.fifo"
    os.mkfifo(fifo)
    tree.mounts(("8:4", "/"))

    def read() -> Slot:
        return tree.finder(fifo).slot(tree.slots)

    result = parse_or_typed_error(read, timeout_s=2.0)
    assert isinstance(result, Slot) and result.label == "USR-B"


def test_a_huge_mountinfo_is_not_read(tree: Tree) -> None:
    with (tree.proc / "self" / "mountinfo").open("wb") as fh:
        fh.truncate(booted.MAX_MOUNTINFO_BYTES + 1)
    result = parse_or_typed_error(
        lambda: tree.booted(""), max_bytes=booted.MAX_MOUNTINFO_BYTES + 1024 * 1024
    )
    assert isinstance(result, DiskError) and result.kind == "booted_unknown"
