"""gpt-prio: the pure bit and decision functions (table tests) and the backend on images."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.diskimage import (
    COREOS_USR_TYPE,
    DiskLayout,
    PartitionSpec,
    cgpt_flags,
    set_attr_bits,
    sfdisk_attr_bits,
    sfdisk_partition,
    sgdisk_verify,
)
from partitions import gpt, gptprio
from partitions.bootcontrol import BootControl, Slot, SlotFlags
from partitions.booted import BootedSlotFinder
from partitions.gptprio import GptPrioBootControl
from tests.conftest import MakeImage
from tests.gptcraft import edit_entries, set_entry
from updater.errors import DiskError


def F(priority: int, tries: int, successful: int) -> SlotFlags:
    return SlotFlags(priority=priority, tries=tries, successful=bool(successful))


def flagmap(*flags: SlotFlags) -> dict[int, SlotFlags]:
    """{1: first, 2: second, ...}: GPT index -> flags."""
    return {i: f for i, f in enumerate(flags, start=1)}


# ---- bits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "flags"),
    [
        (0, F(0, 0, 0)),
        (1 << 48, F(1, 0, 0)),
        (0xF << 48, F(15, 0, 0)),
        (1 << 52, F(0, 1, 0)),
        (0xF << 52, F(0, 15, 0)),
        (1 << 56, F(0, 0, 1)),
        ((2 << 48) | (1 << 52) | (1 << 56), F(2, 1, 1)),
        ((1 << 0) | (1 << 60) | (1 << 47) | (1 << 57) | (3 << 48), F(3, 0, 0)),
        ((1 << 64) - 1, F(15, 15, 1)),
    ],
)
def test_decode_flags(word: int, flags: SlotFlags) -> None:
    assert gptprio.decode_flags(word) == flags


@pytest.mark.parametrize(
    ("word", "flags", "expected"),
    [
        (0, F(2, 1, 1), (2 << 48) | (1 << 52) | (1 << 56)),
        ((0xF << 48) | (0xF << 52) | (1 << 56), F(0, 0, 0), 0),
        ((1 << 0) | (1 << 60), F(1, 0, 1), (1 << 0) | (1 << 60) | (1 << 48) | (1 << 56)),
        ((1 << 64) - 1, F(0, 0, 0), ((1 << 64) - 1) & ~(0x1FF << 48)),
        ((1 << 47) | (1 << 57), F(15, 15, 1), (1 << 47) | (1 << 57) | (0x1FF << 48)),
    ],
)
def test_encode_flags_keeps_every_other_bit(word: int, flags: SlotFlags, expected: int) -> None:
    assert gptprio.encode_flags(word, flags) == expected
    assert gptprio.decode_flags(expected) == flags


@pytest.mark.parametrize("flags", [F(16, 0, 0), F(0, 16, 0), F(-1, 0, 0), F(0, -1, 0)])
def test_encode_flags_refuses_values_that_do_not_fit(flags: SlotFlags) -> None:
    with pytest.raises(ValueError):
        gptprio.encode_flags(0, flags)


# ---- decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (flagmap(F(1, 0, 1), F(2, 1, 0)), 2),
        (flagmap(F(2, 0, 1), F(1, 1, 0)), 1),
        (flagmap(F(2, 0, 1), F(2, 1, 0)), 1),  # tie: lower index
        (flagmap(F(0, 0, 0), F(1, 0, 1)), 2),
        (flagmap(F(1, 0, 1), F(2, 0, 0)), 1),  # B: no tries, not successful
        (flagmap(F(1, 0, 1), F(0, 5, 1)), 1),  # B: priority 0
        (flagmap(F(0, 0, 0), F(0, 0, 0)), None),  # both unbootable
        (flagmap(F(3, 0, 0), F(5, 0, 0)), None),  # both out of tries
        ({}, None),
        ({4: F(7, 0, 1), 3: F(7, 0, 1)}, 3),  # tie: lower index whatever the order
        ({9: F(1, 0, 1), 3: F(0, 3, 0), 4: F(15, 2, 0)}, 4),
    ],
)
def test_primary(flags: dict[int, SlotFlags], expected: int | None) -> None:
    assert gptprio.primary_index(flags) == expected


@pytest.mark.parametrize(
    ("before", "target", "after"),
    [
        (flagmap(F(1, 0, 1), F(2, 1, 0)), 2, flagmap(F(1, 0, 1), F(0, 0, 0))),
        (flagmap(F(1, 0, 1), F(15, 15, 1)), 2, flagmap(F(1, 0, 1), F(0, 0, 0))),
        (flagmap(F(1, 0, 1), F(0, 0, 0)), 2, flagmap(F(1, 0, 1), F(0, 0, 0))),
        (flagmap(F(2, 0, 1), F(1, 0, 1)), 1, flagmap(F(0, 0, 0), F(1, 0, 1))),
    ],
)
def test_mark_bad(before: dict[int, SlotFlags], target: int, after: dict[int, SlotFlags]) -> None:
    assert gptprio.decide_mark_bad(before, target) == after


@pytest.mark.parametrize(
    ("before", "target", "after"),
    [
        # the new slot passed its trial boot
        (flagmap(F(1, 0, 1), F(2, 0, 0)), 2, flagmap(F(1, 0, 1), F(2, 0, 1))),
        (flagmap(F(1, 0, 1), F(2, 1, 0)), 2, flagmap(F(1, 0, 1), F(2, 0, 1))),
        # already good: unchanged
        (flagmap(F(1, 0, 1), F(2, 0, 1)), 2, flagmap(F(1, 0, 1), F(2, 0, 1))),
        # a lower priority is kept (only priority 0 is raised)
        (flagmap(F(3, 0, 1), F(2, 0, 0)), 2, flagmap(F(3, 0, 1), F(2, 0, 1))),
        # priority 0 (the firmware spent its last try) is raised above the others
        (flagmap(F(1, 0, 1), F(0, 0, 0)), 2, flagmap(F(1, 0, 1), F(2, 0, 1))),
        (flagmap(F(0, 0, 0), F(0, 0, 0)), 1, flagmap(F(1, 0, 1), F(0, 0, 0))),
        # ... and at saturation the others are lowered, keeping order, never to 0
        (flagmap(F(0, 0, 0), F(15, 0, 1)), 1, flagmap(F(15, 0, 1), F(14, 0, 1))),
        (
            {1: F(0, 2, 0), 2: F(15, 0, 1), 3: F(14, 1, 0), 4: F(3, 0, 1)},
            1,
            {1: F(15, 0, 1), 2: F(14, 0, 1), 3: F(13, 1, 0), 4: F(3, 0, 1)},
        ),
    ],
)
def test_mark_good(before: dict[int, SlotFlags], target: int, after: dict[int, SlotFlags]) -> None:
    assert gptprio.decide_mark_good(before, target) == after


@pytest.mark.parametrize(
    ("before", "target", "after"),
    [
        # the usual update: A good at 1, B becomes 2 on trial
        (flagmap(F(1, 0, 1), F(0, 0, 0)), 2, flagmap(F(1, 0, 1), F(2, 1, 0))),
        (flagmap(F(1, 0, 1), F(1, 0, 1)), 2, flagmap(F(1, 0, 1), F(2, 1, 0))),
        (flagmap(F(0, 0, 0), F(0, 0, 0)), 1, flagmap(F(1, 1, 0), F(0, 0, 0))),
        # the target's own priority does not count: max(others) + 1
        (flagmap(F(1, 0, 1), F(9, 0, 1)), 2, flagmap(F(1, 0, 1), F(2, 1, 0))),
        (flagmap(F(1, 0, 1), F(2, 0, 1)), 1, flagmap(F(3, 1, 0), F(2, 0, 1))),
        (flagmap(F(14, 0, 1), F(0, 0, 0)), 2, flagmap(F(14, 0, 1), F(15, 1, 0))),
        # saturation: the other slot at 15 is lowered below the target
        (flagmap(F(15, 0, 1), F(0, 0, 0)), 2, flagmap(F(14, 0, 1), F(15, 1, 0))),
        (flagmap(F(15, 0, 1), F(15, 2, 0)), 2, flagmap(F(14, 0, 1), F(15, 1, 0))),
        # ... keeping the relative order of the others, lowering only what must move
        (
            {1: F(15, 0, 1), 2: F(14, 0, 1), 3: F(5, 0, 1), 4: F(0, 0, 0)},
            4,
            {1: F(14, 0, 1), 2: F(13, 0, 1), 3: F(5, 0, 1), 4: F(15, 1, 0)},
        ),
        # ... ties stay ties, and priority 0 stays 0
        (
            {1: F(15, 0, 1), 2: F(15, 0, 0), 3: F(0, 0, 0), 4: F(1, 1, 0)},
            3,
            {1: F(14, 0, 1), 2: F(14, 0, 0), 3: F(15, 1, 0), 4: F(1, 1, 0)},
        ),
        # ... with many slots: 14 distinct priorities still fit strictly below 15
        (
            {i: F(min(i, 15), 0, 1) for i in range(1, 18)},
            1,
            {1: F(15, 1, 0), **{i: F(i - 1, 0, 1) for i in range(2, 16)}}
            | {16: F(14, 0, 1), 17: F(14, 0, 1)},
        ),
        # ... 15 distinct do not: the lowest two merge at 1 rather than one becoming 0
        (
            {1: F(0, 0, 0), **{i: F(i - 1, 0, 1) for i in range(2, 17)}},
            1,
            {1: F(15, 1, 0), 2: F(1, 0, 1), **{i: F(i - 2, 0, 1) for i in range(3, 17)}},
        ),
    ],
)
def test_make_primary(
    before: dict[int, SlotFlags], target: int, after: dict[int, SlotFlags]
) -> None:
    result = gptprio.decide_make_primary(before, target)
    assert result == after
    assert gptprio.primary_index(result) == target
    others = [f.priority for i, f in result.items() if i != target]
    assert all(result[target].priority > p for p in others)
    assert all(result[i].priority > 0 for i, f in before.items() if f.priority > 0)


def test_make_primary_keeps_order_of_others_at_saturation() -> None:
    before = {1: F(15, 0, 1), 2: F(12, 0, 1), 3: F(13, 0, 1), 4: F(1, 0, 1), 5: F(2, 0, 1)}
    after = gptprio.decide_make_primary(before, 4)
    rank = sorted((i for i in before if i != 4), key=lambda i: before[i].priority)
    assert sorted(rank, key=lambda i: after[i].priority) == rank
    assert len({after[i].priority for i in rank}) == len(rank)  # strict order kept


@pytest.mark.parametrize(
    "verb", [gptprio.decide_mark_bad, gptprio.decide_mark_good, gptprio.decide_make_primary]
)
def test_decisions_refuse_an_unknown_target(verb: object) -> None:
    assert callable(verb)
    with pytest.raises(DiskError) as err:
        verb(flagmap(F(1, 0, 1), F(0, 0, 0)), 3)
    assert err.value.kind == "slot_not_found"


def test_changed() -> None:
    before = flagmap(F(1, 0, 1), F(0, 0, 0))
    after = flagmap(F(1, 0, 1), F(2, 1, 0))
    assert gptprio.changed(before, after) == {2: F(2, 1, 0)}
    assert gptprio.changed(before, before) == {}


# ---- the backend on disk images -------------------------------------------------------------


def backend(layout: DiskLayout, **kwargs: object) -> GptPrioBootControl:
    return GptPrioBootControl(layout.path, **kwargs)  # type: ignore[arg-type]


def test_implements_the_boot_control_port(slot_image: DiskLayout) -> None:
    control: BootControl = backend(slot_image)
    assert [s.slot.label for s in control.slots()] == ["USR-A", "USR-B"]


def test_slots_are_found_by_label(make_image: MakeImage) -> None:
    layout = make_image(
        leading=[PartitionSpec("EFI-SYSTEM", 1024 * 1024), PartitionSpec("BIOS-BOOT", 1024 * 1024)],
        extra=[PartitionSpec("ROOT", 1024 * 1024)],
    )
    statuses = backend(layout).slots()
    assert [s.slot for s in statuses] == [
        Slot(
            label=p.label,
            index=p.index,
            part_uuid=p.part_uuid,
            disk=layout.path,
            offset=p.offset,
            size=p.size,
        )
        for p in (layout.by_label("USR-A"), layout.by_label("USR-B"))
    ]
    assert [s.slot.index for s in statuses] == [3, 4]
    assert all(s.flags == F(0, 0, 0) for s in statuses)


def test_configured_labels_and_order(make_image: MakeImage) -> None:
    layout = make_image(labels=("usr-b", "usr-a"))
    control = backend(layout, labels=("usr-a", "usr-b"))
    assert [(s.slot.label, s.slot.index) for s in control.slots()] == [("usr-a", 2), ("usr-b", 1)]


def test_missing_label_names_what_was_found(make_image: MakeImage) -> None:
    layout = make_image(labels=("USR-A", "ROOT"))
    with pytest.raises(DiskError) as err:
        backend(layout).slots()
    assert err.value.kind == "slot_not_found"
    assert "'USR-B'" in err.value.message
    assert "ROOT, USR-A" in err.value.message
    assert err.value.hint and "[disk] slots" in err.value.hint


def test_duplicate_label_is_an_error(make_image: MakeImage) -> None:
    layout = make_image(labels=("USR-A", "USR-B", "USR-B"))
    with pytest.raises(DiskError) as err:
        backend(layout).slots()
    assert err.value.kind == "gpt_invalid"
    assert "2, 3" in err.value.message
    assert err.value.hint


def test_a_label_renamed_to_the_other_slots_is_gpt_invalid_and_nothing_is_written(
    slot_image: DiskLayout,
) -> None:
    edit_entries(slot_image.path, lambda entries: set_entry(entries, 2, name="USR-A"))
    before = slot_image.path.read_bytes()
    control = backend(slot_image)
    with pytest.raises(DiskError) as err:
        control.slots()
    assert err.value.kind == "gpt_invalid"
    assert "partitions 1, 2 are all named 'USR-A'" in err.value.message
    slot = Slot("USR-A", 1, slot_image.by_label("USR-A").part_uuid, slot_image.path, 0, 1)
    for verb in (control.mark_bad, control.mark_good, control.make_primary):
        with pytest.raises(DiskError) as err:
            verb(slot)
        assert err.value.kind == "gpt_invalid"
    assert slot_image.path.read_bytes() == before


def test_slots_of_different_sizes_are_gpt_invalid(make_image: MakeImage) -> None:
    layout = make_image(
        labels=("USR-A",), extra=[PartitionSpec("USR-B", 2 * 1024 * 1024, COREOS_USR_TYPE)]
    )
    with pytest.raises(DiskError) as err:
        backend(layout).slots()
    assert err.value.kind == "gpt_invalid"
    assert "partition 1 (USR-A) 4194304 bytes" in err.value.message
    assert "partition 2 (USR-B) 2097152 bytes" in err.value.message


def test_labels_must_be_unique(slot_image: DiskLayout) -> None:
    with pytest.raises(ValueError):
        backend(slot_image, labels=("USR-A", "USR-A"))
    with pytest.raises(ValueError):
        backend(slot_image, labels=())


def test_update_cycle_flags_agree_with_cgpt(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    control = backend(slot_image)
    a, b = (s.slot for s in control.slots())

    control.mark_good(a)
    assert cgpt_flags(disk, 1) == control.flags(a) == F(1, 0, 1)
    assert control.primary() == a

    control.mark_bad(b)  # before writing the image
    assert cgpt_flags(disk, 2) == control.flags(b) == F(0, 0, 0)

    control.make_primary(b)  # after writing it
    assert cgpt_flags(disk, 1) == F(1, 0, 1)
    assert cgpt_flags(disk, 2) == control.flags(b) == F(2, 1, 0)
    assert control.primary() == b
    assert sfdisk_partition(disk, 2)["attrs"] == "GUID:49,52"
    assert sfdisk_partition(disk, 1)["attrs"] == "GUID:48,56"

    control.mark_good(b)  # the trial boot passed
    assert cgpt_flags(disk, 2) == F(2, 0, 1)
    assert control.primary() == b
    assert "No problems found." in sgdisk_verify(disk)


def test_verbs_keep_other_attribute_bits(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    set_attr_bits(disk, 1, [0, 60])
    set_attr_bits(disk, 2, [0, 2, 48, 56, 63])  # B: priority 1, successful
    control = backend(slot_image)
    a, b = (s.slot for s in control.slots())

    control.make_primary(a)
    control.mark_bad(b)

    assert sfdisk_attr_bits(sfdisk_partition(disk, 1)["attrs"]) == {0, 60, 49, 52}  # P2 T1
    assert sfdisk_attr_bits(sfdisk_partition(disk, 2)["attrs"]) == {0, 2, 63}
    assert cgpt_flags(disk, 1) == F(2, 1, 0)
    assert cgpt_flags(disk, 2) == F(0, 0, 0)


def test_each_verb_writes_once_and_only_what_changes(slot_image: DiskLayout) -> None:
    control = backend(slot_image)
    a, b = (s.slot for s in control.slots())
    control.mark_good(a)

    with capture_logs() as logs:
        control.make_primary(b)
        control.mark_good(a)  # already good: nothing to write

    writes = [e for e in logs if e["event"] == "gpt_attributes_written"]
    assert len(writes) == 1
    assert list(writes[0]["changes"]) == [2]
    made = [e for e in logs if e["event"] == "slot_made_primary"]
    assert made[0]["changed"] == {"USR-B": "priority=2 tries=1 successful=0"}
    assert next(e for e in logs if e["event"] == "slot_marked_good")["changed"] == {}


def test_set_flags(slot_image: DiskLayout) -> None:
    control = backend(slot_image)
    a, b = (s.slot for s in control.slots())
    control.set_flags({a: F(5, 0, 1), b: F(3, 7, 0)})
    assert cgpt_flags(slot_image.path, 1) == F(5, 0, 1)
    assert cgpt_flags(slot_image.path, 2) == F(3, 7, 0)


def test_a_slot_of_another_disk_is_refused(slot_image: DiskLayout, make_image: MakeImage) -> None:
    other = backend(make_image()).slots()[1].slot
    control = backend(slot_image)
    before = slot_image.path.read_bytes()
    for verb in (control.mark_good, control.mark_bad, control.make_primary, control.flags):
        with pytest.raises(DiskError) as err:
            verb(other)
        assert err.value.kind == "slot_not_found"
    assert slot_image.path.read_bytes() == before


def test_a_damaged_copy_is_repaired_by_the_next_verb(slot_image: DiskLayout) -> None:
    disk = slot_image.path
    with open(disk, "r+b") as f:
        f.seek(512 + 30)
        f.write(b"\xff")
    control = backend(slot_image)
    a = control.slots()[0].slot
    control.mark_good(a)
    table = gpt.read_table(disk)
    assert table.primary_valid and table.backup_valid
    assert cgpt_flags(disk, 1) == F(1, 0, 1)


def test_booted_from_the_kernel_command_line(slot_image: DiskLayout, tmp_path: Path) -> None:
    b = slot_image.by_label("USR-B")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"BOOT_IMAGE=/vmlinuz mount.usr=PARTUUID={b.part_uuid} ro\n")
    control = backend(
        slot_image, finder=BootedSlotFinder(cmdline, tmp_path / "proc", tmp_path / "sys")
    )
    assert control.booted().label == "USR-B"
