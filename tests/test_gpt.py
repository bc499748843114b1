"""The pure-Python GPT reader/writer against images made and checked by sfdisk, cgpt, sgdisk."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest

from devtools.diskimage import (
    COREOS_USR_TYPE,
    LINUX_DATA_TYPE,
    DiskLayout,
    PartitionSpec,
    cgpt_show,
    loop_device,
    partition,
    read_layout,
    set_attr_bits,
    sfdisk_attr_bits,
    sfdisk_json,
    sfdisk_partition,
    sfdisk_verify,
    sgdisk_verify,
)
from partitions import gpt, gpttable
from tests.conftest import MakeImage
from tests.gptcraft import edit_entries, entry_guid, entry_lbas, set_entry
from updater.errors import DiskError
from updater.run import run

SECTOR = 512
PRIO_BITS_2_1_1 = (2 << 48) | (1 << 52) | (1 << 56)  # priority 2, tries 1, successful


def assert_tools_happy(disk: Path) -> None:
    assert "No problems found." in sgdisk_verify(disk)
    rc, out = sfdisk_verify(disk)
    assert rc == 0, out
    assert "No errors detected" in out


def raw_sectors(disk: Path, lba: int, count: int = 1) -> bytes:
    with open(disk, "rb") as f:
        f.seek(lba * SECTOR)
        return f.read(count * SECTOR)


def poke(disk: Path, offset: int, data: bytes) -> None:
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def last_lba(disk: Path) -> int:
    return disk.stat().st_size // SECTOR - 1


# ---- reading --------------------------------------------------------------------------------


def test_reads_an_image_made_by_sfdisk(make_image: MakeImage) -> None:
    layout = make_image(
        extra=[PartitionSpec("ROOT", 2 * 1024 * 1024)],
        leading=[PartitionSpec("EFI-SYSTEM", 1024 * 1024)],
    )
    tool = sfdisk_json(layout.path)

    table = gpt.read_table(layout.path)

    assert table.primary_valid and table.backup_valid
    assert table.sector_size == 512
    assert table.disk_guid == UUID(tool["id"])
    assert (table.first_usable_lba, table.last_usable_lba) == (tool["firstlba"], tool["lastlba"])
    assert (table.num_entries, table.entry_size) == (128, 128)
    assert [e.name for e in table.entries] == ["EFI-SYSTEM", "USR-A", "USR-B", "ROOT"]
    assert [e.index for e in table.entries] == [1, 2, 3, 4]
    for entry, part in zip(table.entries, tool["partitions"], strict=True):
        assert entry.part_uuid == UUID(part["uuid"])
        assert entry.type_guid == UUID(part["type"])
        assert entry.first_lba == part["start"]
        assert entry.last_lba - entry.first_lba + 1 == part["size"]
        assert entry.attributes == 0
        assert table.offset(entry) == part["start"] * 512
        assert table.size(entry) == part["size"] * 512
    usr_b = table.named("USR-B")
    assert len(usr_b) == 1
    assert usr_b[0].type_guid == COREOS_USR_TYPE
    assert table.entry(4).type_guid == LINUX_DATA_TYPE
    assert table.offset(usr_b[0]) == layout.by_label("USR-B").offset
    assert table.size(usr_b[0]) == layout.by_label("USR-B").size == 4 * 1024 * 1024


def test_entry_lookup_of_an_unused_index_is_a_typed_error(slot_image: DiskLayout) -> None:
    table = gpt.read_table(slot_image.path)
    with pytest.raises(DiskError) as err:
        table.entry(3)
    assert err.value.kind == "slot_not_found"


def test_reads_attribute_bits_set_by_sfdisk(slot_image: DiskLayout) -> None:
    set_attr_bits(slot_image.path, 2, [0, 48, 49, 53, 56, 60])
    table = gpt.read_table(slot_image.path)
    want = sum(1 << b for b in (0, 48, 49, 53, 56, 60))
    assert table.entry(2).attributes == want
    assert table.entry(1).attributes == 0


def test_reads_unicode_names(make_image: MakeImage) -> None:
    layout = make_image(labels=("USR-A", "système-β"))
    assert [e.name for e in gpt.read_table(layout.path).entries] == ["USR-A", "système-β"]


# ---- writing --------------------------------------------------------------------------------


def test_write_is_read_back_by_cgpt_sfdisk_and_sgdisk(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    prio_3_tries_2 = (3 << 48) | (2 << 52)

    table = gpt.write_attributes(disk, {1: PRIO_BITS_2_1_1, 2: prio_3_tries_2})

    assert table.entry(1).attributes == PRIO_BITS_2_1_1
    assert table.primary_valid and table.backup_valid
    assert [cgpt_show(disk, 1, f) for f in ("P", "T", "S")] == [2, 1, 1]
    assert [cgpt_show(disk, 2, f) for f in ("P", "T", "S")] == [3, 2, 0]
    assert sfdisk_partition(disk, 1)["attrs"] == "GUID:49,52,56"
    assert sfdisk_attr_bits(sfdisk_partition(disk, 2)["attrs"]) == {48, 49, 53}
    assert_tools_happy(disk)
    assert gpt.read_table(disk) == table


def test_write_changes_only_the_attribute_bytes(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    set_attr_bits(disk, 2, [0, 60])
    before = disk.read_bytes()
    first_usable = gpt.read_table(disk).first_usable_lba
    word = (1 << 63) | (7 << 48) | 0xABCD

    gpt.write_attributes(disk, {1: word})

    after = disk.read_bytes()
    changed = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
    primary_entry_1 = range(2 * SECTOR + 48, 2 * SECTOR + 56)
    backup_entries_lba = last_lba(disk) - 32
    backup_entry_1 = range(backup_entries_lba * SECTOR + 48, backup_entries_lba * SECTOR + 56)
    headers = set(range(SECTOR, 2 * SECTOR)) | set(
        range(last_lba(disk) * SECTOR, (last_lba(disk) + 1) * SECTOR)
    )
    assert changed - set(primary_entry_1) - set(backup_entry_1) - headers == set()
    assert all(i < first_usable * SECTOR or i >= backup_entries_lba * SECTOR for i in changed)
    table = gpt.read_table(disk)
    assert table.entry(1).attributes == word
    assert table.entry(2).attributes == (1 << 0) | (1 << 60)
    assert sfdisk_partition(disk, 2)["attrs"] == "RequiredPartition GUID:60"
    assert_tools_happy(disk)


def test_write_to_an_unused_entry_is_refused(slot_image: DiskLayout) -> None:
    before = slot_image.path.read_bytes()
    for index in (0, 3, 129):
        with pytest.raises(DiskError) as err:
            gpt.write_attributes(slot_image.path, {index: 1})
        assert err.value.kind == "slot_not_found"
    assert slot_image.path.read_bytes() == before


def test_write_of_a_word_beyond_64_bits_is_refused(slot_image: DiskLayout) -> None:
    with pytest.raises(ValueError, match="64 bits"):
        gpt.write_attributes(slot_image.path, {1: 1 << 64})


def test_nothing_to_change_writes_nothing(slot_image: DiskLayout) -> None:
    before = slot_image.path.stat().st_mtime_ns
    table = gpt.write_attributes(slot_image.path, {})
    assert table.primary_valid and table.backup_valid
    assert slot_image.path.stat().st_mtime_ns == before


# ---- damaged copies -------------------------------------------------------------------------


def test_corrupt_primary_header_falls_back_to_backup_and_write_repairs(
    slot_image: DiskLayout,
) -> None:
    disk = slot_image.path
    gpt.write_attributes(disk, {2: PRIO_BITS_2_1_1})
    poke(disk, SECTOR + 40, b"\xff")  # inside the primary header: its CRC no longer matches

    table = gpt.read_table(disk)

    assert (table.primary_valid, table.backup_valid) == (False, True)
    assert table.entry(2).attributes == PRIO_BITS_2_1_1
    assert [e.name for e in table.entries] == ["USR-A", "USR-B"]

    repaired = gpt.write_attributes(disk, {1: 1 << 48})

    assert repaired.primary_valid and repaired.backup_valid
    assert repaired.entry(2).attributes == PRIO_BITS_2_1_1
    assert repaired.entry(1).attributes == 1 << 48
    assert cgpt_show(disk, 1, "P") == 1
    assert_tools_happy(disk)


def test_wiped_primary_is_rebuilt_from_backup(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    poke(disk, SECTOR, bytes(33 * SECTOR))  # primary header and entries gone

    table = gpt.read_table(disk)
    assert (table.primary_valid, table.backup_valid) == (False, True)

    repaired = gpt.write_attributes(disk, {})

    assert repaired.primary_valid and repaired.backup_valid
    assert read_layout(disk).partitions == slot_image.partitions
    assert_tools_happy(disk)


def test_corrupt_primary_entries_fall_back_to_backup(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    poke(disk, 2 * SECTOR + 56, "XXXX".encode("utf-16-le"))  # the name of partition 1

    table = gpt.read_table(disk)

    assert (table.primary_valid, table.backup_valid) == (False, True)
    assert table.entry(1).name == "USR-A"


def test_corrupt_backup_is_repaired_by_a_write(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    poke(disk, last_lba(disk) * SECTOR, b"NOT PART")

    table = gpt.read_table(disk)
    assert (table.primary_valid, table.backup_valid) == (True, False)

    repaired = gpt.write_attributes(disk, {2: PRIO_BITS_2_1_1})

    assert repaired.primary_valid and repaired.backup_valid
    assert raw_sectors(disk, last_lba(disk))[:8] == b"EFI PART"
    assert cgpt_show(disk, 2, "S") == 1
    assert_tools_happy(disk)


def test_crash_between_primary_entries_and_header_reads_the_old_state(
    slot_image: DiskLayout,
) -> None:
    disk = slot_image.path
    gpt.write_attributes(disk, {1: PRIO_BITS_2_1_1})
    # What an interrupted write leaves: the new primary entries array, the old header.
    entries = bytearray(raw_sectors(disk, 2, 32))
    entries[48:56] = (15 << 48).to_bytes(8, "little")
    poke(disk, 2 * SECTOR, bytes(entries))

    table = gpt.read_table(disk)

    assert (table.primary_valid, table.backup_valid) == (False, True)
    assert table.entry(1).attributes == PRIO_BITS_2_1_1  # the old state, whole

    after = gpt.write_attributes(disk, {2: 1 << 56})

    assert after.primary_valid and after.backup_valid
    assert after.entry(1).attributes == PRIO_BITS_2_1_1
    assert after.entry(2).attributes == 1 << 56
    assert_tools_happy(disk)


def test_both_copies_corrupt_is_gpt_invalid(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    poke(disk, SECTOR, b"NOT PART")
    poke(disk, last_lba(disk) * SECTOR, b"NOT PART")
    with pytest.raises(DiskError) as err:
        gpt.read_table(disk)
    assert err.value.kind == "gpt_invalid"
    assert "primary" in err.value.message and "backup" in err.value.message
    assert err.value.hint
    with pytest.raises(DiskError):
        gpt.write_attributes(disk, {1: 0})


def test_grown_image_keeps_its_backup_where_the_primary_says(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    old_last = last_lba(disk)
    with open(disk, "r+b") as f:
        f.truncate(disk.stat().st_size + 1024 * 1024)

    table = gpt.read_table(disk)
    assert table.primary_valid and table.backup_valid

    gpt.write_attributes(disk, {1: PRIO_BITS_2_1_1})

    assert raw_sectors(disk, old_last)[:8] == b"EFI PART"
    assert raw_sectors(disk, last_lba(disk)) == bytes(SECTOR)
    assert gpt.read_table(disk).backup_valid


# ---- not a GPT disk -------------------------------------------------------------------------


def test_a_file_of_zeros_is_gpt_invalid(tmp_path: Path) -> None:
    disk = tmp_path / "zeros.img"
    disk.write_bytes(bytes(1024 * 1024))
    with pytest.raises(DiskError) as err:
        gpt.read_table(disk)
    assert err.value.kind == "gpt_invalid"
    assert err.value.hint


def test_an_mbr_disk_is_gpt_invalid(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    run(["sfdisk", "--quiet", str(disk)], input=b"label: dos\nsize=2MiB\n")
    with pytest.raises(DiskError) as err:
        gpt.read_table(disk)
    assert err.value.kind == "gpt_invalid"


@pytest.mark.parametrize("size", [0, 100, 1024])
def test_a_too_small_file_is_not_a_disk(tmp_path: Path, size: int) -> None:
    disk = tmp_path / "tiny.img"
    disk.write_bytes(b"\x01" * size)
    with pytest.raises(DiskError) as err:
        gpt.read_table(disk)
    assert err.value.kind == "not_a_disk"
    assert err.value.hint


def test_a_missing_file_or_a_directory_is_not_a_disk(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.img", tmp_path):
        with pytest.raises(DiskError) as err:
            gpt.read_table(path)
        assert err.value.kind == "not_a_disk"
        with pytest.raises(DiskError):
            gpt.write_attributes(path, {1: 0})


def test_pure_header_round_trip_matches_the_crc_rules(slot_image: DiskLayout) -> None:
    sector = raw_sectors(slot_image.path, 1)
    header_size = struct.unpack_from("<I", sector, 12)[0]
    crc = struct.unpack_from("<I", sector, 16)[0]
    zeroed = sector[:16] + bytes(4) + sector[20:header_size]
    assert zlib.crc32(zeroed) == crc
    entries = raw_sectors(slot_image.path, 2, 32)
    assert gpttable.parse_entries(entries, 128) == gpt.read_table(slot_image.path).entries
    patched = gpttable.set_attributes(entries, 128, {2: 0x1122334455667788})
    assert patched[128 + 48 : 128 + 56] == bytes.fromhex("8877665544332211")
    assert patched[:128] == entries[:128]


# ---- real block devices ---------------------------------------------------------------------


@pytest.mark.root
def test_read_and_write_on_a_loop_device(slot_image: DiskLayout) -> None:
    with loop_device(slot_image.path) as dev:
        assert dev.is_block_device()
        table = gpt.read_table(dev)
        assert [e.name for e in table.entries] == ["USR-A", "USR-B"]
        assert [e.part_uuid for e in table.entries] == [p.part_uuid for p in slot_image.partitions]

        gpt.write_attributes(dev, {2: PRIO_BITS_2_1_1})

        assert [cgpt_show(dev, 2, f) for f in ("P", "T", "S")] == [2, 1, 1]
        assert_tools_happy(dev)
    # written through the device, visible in the file
    assert gpt.read_table(slot_image.path).entry(2).attributes == PRIO_BITS_2_1_1


@pytest.mark.root
def test_4k_sector_loop_device(tmp_path: Path) -> None:
    image = tmp_path / "4k.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    with loop_device(image, sector_size=4096) as dev:
        partition(
            dev,
            [PartitionSpec("USR-A", 4 * 1024 * 1024), PartitionSpec("USR-B", 4 * 1024 * 1024)],
            sector_size=4096,
        )
        table = gpt.read_table(dev)
        assert table.sector_size == 4096
        usr_b = table.named("USR-B")[0]
        assert table.offset(usr_b) == sfdisk_partition(dev, 2)["start"] * 4096
        assert table.size(usr_b) == 4 * 1024 * 1024

        gpt.write_attributes(dev, {1: PRIO_BITS_2_1_1})

        assert [cgpt_show(dev, 1, f) for f in ("P", "T", "S")] == [2, 1, 1]
        assert "No problems found." in sgdisk_verify(dev)
    # read as a file the image has 512-byte sectors and so no GPT where one is looked for
    with pytest.raises(DiskError) as err:
        gpt.read_table(image)
    assert err.value.kind == "gpt_invalid"


# ---- layout sanity: CRC-valid tables that describe no sane disk ------------------------------


def _entry(index: int, first: int, last: int, guid: int | None = None) -> gpttable.GptEntry:
    return gpttable.GptEntry(
        index=index,
        type_guid=LINUX_DATA_TYPE,
        part_uuid=UUID(int=guid if guid is not None else index),
        first_lba=first,
        last_lba=last,
        attributes=0,
        name=f"P{index}",
    )


def _table_of(*entries: gpttable.GptEntry) -> gpttable.GptTable:
    return gpttable.GptTable(
        sector_size=SECTOR,
        disk_guid=UUID(int=99),
        entries=entries,
        first_usable_lba=34,
        last_usable_lba=1000,
        num_entries=128,
        entry_size=128,
        primary_valid=True,
        backup_valid=True,
    )


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ((), []),
        ((_entry(1, 34, 500), _entry(2, 501, 1000)), []),
        ((_entry(1, 34, 34),), []),  # one sector is a partition
        ((_entry(2, 600, 700), _entry(1, 100, 200)), []),  # numbering need not follow order
        ((_entry(1, 34, 500), _entry(2, 500, 900)), [((1, 2), "overlap at LBAs 500..500")]),
        ((_entry(1, 34, 500), _entry(2, 100, 200)), [((1, 2), "overlap")]),  # nested
        ((_entry(2, 34, 500), _entry(1, 100, 600)), [((1, 2), "overlap")]),
        (
            (_entry(1, 34, 900), _entry(2, 100, 200), _entry(3, 300, 400)),
            [((1, 2), "overlap"), ((1, 3), "overlap")],  # both inside the long one
        ),
        ((_entry(1, 34, 500), _entry(2, 501, 1001)), [((2,), "outside the usable")]),
        ((_entry(1, 33, 500),), [((1,), "outside the usable")]),
        ((_entry(1, 0, 0),), [((1,), "outside the usable")]),
        ((_entry(1, 2**64 - 1, 2**64 - 1),), [((1,), "outside the usable")]),
        ((_entry(1, 100, 99),), [((1,), "zero-length")]),
        ((_entry(1, 500, 100),), [((1,), "ends before it starts")]),
        ((_entry(1, 34, 500), _entry(2, 501, 900, guid=1)), [((1, 2), "partition GUID")]),
        (
            (_entry(1, 34, 100, guid=7), _entry(2, 200, 300, guid=7), _entry(3, 400, 500, guid=7)),
            [((1, 2, 3), "partition GUID")],
        ),
    ],
)
def test_layout_problems(
    entries: tuple[gpttable.GptEntry, ...], expected: list[tuple[tuple[int, ...], str]]
) -> None:
    problems = gpttable.layout_problems(_table_of(*entries))
    assert [p.partitions for p in problems] == [parts for parts, _ in expected]
    for problem, (_, reason) in zip(problems, expected, strict=True):
        assert reason in problem.reason
    if expected:
        with pytest.raises(gpttable.UnsafeLayoutError) as err:
            gpttable.check_layout(_table_of(*entries), "disk.img")
        assert err.value.kind == "gpt_invalid"
        assert isinstance(err.value, DiskError)
        assert err.value.partitions == tuple(sorted({i for p, _ in expected for i in p}))
    else:
        assert gpttable.check_layout(_table_of(*entries), "disk.img").entries == entries


def test_layout_problems_of_a_full_entry_array_are_bounded() -> None:
    # 32768 entries all on the same sectors: one problem each, not one per pair
    many = tuple(_entry(i, 100, 200) for i in range(1, 32769))
    problems = gpttable.layout_problems(_table_of(*many))
    assert len(problems) == 32767
    err = gpttable.UnsafeLayoutError("disk.img", problems)
    assert len(err.message) < 2000
    assert "and 32759 more" in err.message


def _sha(disk: Path) -> str:
    return hashlib.sha256(disk.read_bytes()).hexdigest()


def _overlap(entries: bytearray) -> None:
    _, last_a = entry_lbas(entries, 1)
    set_entry(entries, 2, first_lba=last_a - 8)  # USR-B starts in USR-A's last sectors


def _beyond_the_end(entries: bytearray) -> None:
    set_entry(entries, 3, last_lba=entry_lbas(entries, 3)[1] + 10_000)


def _zero_length(entries: bytearray) -> None:
    set_entry(entries, 3, last_lba=entry_lbas(entries, 3)[0] - 1)


def _swapped(entries: bytearray) -> None:
    first, last = entry_lbas(entries, 3)
    set_entry(entries, 3, first_lba=last, last_lba=first)


def _same_guid(entries: bytearray) -> None:
    set_entry(entries, 2, part_guid=entry_guid(entries, 1))


@pytest.mark.parametrize(
    ("edit", "partitions", "reason"),
    [
        (_overlap, (1, 2), "overlap"),
        (_beyond_the_end, (3,), "outside the usable"),
        (_zero_length, (3,), "zero-length"),
        (_swapped, (3,), "ends before it starts"),
        (_same_guid, (1, 2), "share the partition GUID"),
    ],
)
def test_crafted_unsafe_tables_are_gpt_invalid_and_never_written(
    make_image: MakeImage,
    edit: Callable[[bytearray], None],
    partitions: tuple[int, ...],
    reason: str,
) -> None:
    layout = make_image(extra=[PartitionSpec("ROOT", 2 * 1024 * 1024)])
    edit_entries(layout.path, edit)
    # the CRCs are right: only the layout is wrong (sfdisk still reads the table)
    assert len(sfdisk_json(layout.path)["partitions"]) == 3
    before = _sha(layout.path)

    with pytest.raises(gpttable.UnsafeLayoutError) as err:
        gpt.read_table(layout.path)
    assert err.value.kind == "gpt_invalid"
    assert err.value.partitions == partitions
    assert reason in err.value.message
    assert f"partition{'s' if len(partitions) > 1 else ''} " + " and ".join(
        map(str, partitions)
    ) in (err.value.message)

    with pytest.raises(gpttable.UnsafeLayoutError):
        gpt.write_attributes(layout.path, {1: PRIO_BITS_2_1_1})
    assert _sha(layout.path) == before, "an unsafe table was written to"
