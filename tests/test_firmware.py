"""Firmware emulation: ChromeOS/CoreOS slot selection, and "rebooting" a disk image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from devtools.diskimage import DiskLayout, cgpt_flags, sgdisk_verify
from partitions import firmware
from partitions.bootcontrol import SlotFlags
from partitions.booted import BootedSlotFinder
from partitions.firmware import NoBootableSlotError
from partitions.gptprio import GptPrioBootControl
from updater.run import run

LABELS = ("USR-A", "USR-B")


def F(priority: int, tries: int, successful: int) -> SlotFlags:
    return SlotFlags(priority=priority, tries=tries, successful=bool(successful))


# ---- the pure selection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "chosen", "after"),
    [
        # a successful slot boots and nothing changes
        ({1: F(1, 0, 1), 2: F(0, 0, 0)}, 1, {1: F(1, 0, 1), 2: F(0, 0, 0)}),
        # a slot on trial loses a try ...
        ({1: F(1, 0, 1), 2: F(2, 3, 0)}, 2, {1: F(1, 0, 1), 2: F(2, 2, 0)}),
        # ... and its last try marks it bad, yet it boots this time
        ({1: F(1, 0, 1), 2: F(2, 1, 0)}, 2, {1: F(1, 0, 1), 2: F(0, 0, 0)}),
        # a slot with no tries left that is not successful is skipped
        ({1: F(1, 0, 1), 2: F(2, 0, 0)}, 1, {1: F(1, 0, 1), 2: F(2, 0, 0)}),
        # priority 0 is never booted, even when successful
        ({1: F(0, 0, 1), 2: F(1, 0, 1)}, 2, {1: F(0, 0, 1), 2: F(1, 0, 1)}),
        # a tie goes to the lower GPT index
        ({4: F(3, 0, 1), 3: F(3, 2, 0)}, 3, {4: F(3, 0, 1), 3: F(3, 1, 0)}),
        # a successful slot with tries left keeps them (vboot only counts unsuccessful ones)
        ({1: F(5, 4, 1)}, 1, {1: F(5, 4, 1)}),
        ({1: F(15, 15, 0), 2: F(14, 0, 1)}, 1, {1: F(15, 14, 0), 2: F(14, 0, 1)}),
    ],
)
def test_select_boot(
    before: dict[int, SlotFlags], chosen: int, after: dict[int, SlotFlags]
) -> None:
    assert firmware.select_boot(before) == (chosen, after)


@pytest.mark.parametrize(
    "flags",
    [{}, {1: F(0, 0, 0), 2: F(0, 0, 0)}, {1: F(3, 0, 0), 2: F(0, 5, 1)}],
)
def test_select_boot_with_nothing_bootable(flags: dict[int, SlotFlags]) -> None:
    with pytest.raises(NoBootableSlotError):
        firmware.select_boot(flags)


# ---- rebooting a disk image -----------------------------------------------------------------


def reboot(image: DiskLayout, cmdline: Path) -> str:
    return firmware.boot_disk_image(image.path, LABELS, cmdline).slot.label


def updated_image(image: DiskLayout, cmdline: Path) -> GptPrioBootControl:
    """A running on A (good), B written and made primary: the state before a reboot."""
    control = GptPrioBootControl(
        image.path, LABELS, BootedSlotFinder(cmdline, proc_root=cmdline.parent / "none")
    )
    a, b = (s.slot for s in control.slots())
    control.mark_good(a)
    control.mark_bad(b)
    control.make_primary(b)
    assert cgpt_flags(image.path, 1) == F(1, 0, 1)
    assert cgpt_flags(image.path, 2) == F(2, 1, 0)
    return control


def test_trial_boot_that_is_never_marked_good_falls_back(
    slot_image: DiskLayout, tmp_path: Path
) -> None:
    cmdline = tmp_path / "cmdline"
    control = updated_image(slot_image, cmdline)
    b = slot_image.by_label("USR-B")

    assert reboot(slot_image, cmdline) == "USR-B"

    assert cmdline.read_text() == f"mount.usr=PARTUUID={b.part_uuid} ro\n"
    assert control.booted().label == "USR-B"
    assert cgpt_flags(slot_image.path, 2) == F(0, 0, 0)  # last try spent
    assert cgpt_flags(slot_image.path, 1) == F(1, 0, 1)

    assert reboot(slot_image, cmdline) == "USR-A"  # no health check passed: back to A

    assert control.booted().label == "USR-A"
    assert cgpt_flags(slot_image.path, 1) == F(1, 0, 1)
    assert cgpt_flags(slot_image.path, 2) == F(0, 0, 0)
    assert reboot(slot_image, cmdline) == "USR-A"
    assert "No problems found." in sgdisk_verify(slot_image.path)


def test_trial_boot_marked_good_stays(slot_image: DiskLayout, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    control = updated_image(slot_image, cmdline)

    assert reboot(slot_image, cmdline) == "USR-B"
    booted = control.booted()
    assert booted.label == "USR-B"

    control.mark_good(booted)  # health checks passed on B

    assert cgpt_flags(slot_image.path, 2) == control.flags(booted) == F(2, 0, 1)
    assert cgpt_flags(slot_image.path, 1) == F(1, 0, 1)
    for _ in range(3):
        assert reboot(slot_image, cmdline) == "USR-B"
        assert cgpt_flags(slot_image.path, 2) == F(2, 0, 1)
        assert control.booted().label == "USR-B"


def test_several_tries(slot_image: DiskLayout, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    control = updated_image(slot_image, cmdline)
    a, b = (s.slot for s in control.slots())
    control.set_flags({b: F(2, 3, 0)})

    assert [reboot(slot_image, cmdline) for _ in range(4)] == ["USR-B"] * 3 + ["USR-A"]
    assert cgpt_flags(slot_image.path, 2) == F(0, 0, 0)
    assert control.primary() == a


def test_extra_args_and_no_bootable_slot(slot_image: DiskLayout, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    a = slot_image.by_label("USR-A")
    control = GptPrioBootControl(slot_image.path, LABELS, BootedSlotFinder(cmdline))
    control.mark_good(control.slots()[0].slot)

    result = firmware.boot_disk_image(slot_image.path, LABELS, cmdline, "rw console=ttyS0")

    assert result.cmdline == f"mount.usr=PARTUUID={a.part_uuid} rw console=ttyS0"
    assert (result.before, result.after) == (F(1, 0, 1), F(1, 0, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cmdline", slot_image.path.name])

    control.mark_bad(control.slots()[0].slot)
    with pytest.raises(NoBootableSlotError):
        firmware.boot_disk_image(slot_image.path, LABELS, cmdline)
    assert cmdline.read_text() == result.cmdline + "\n"  # left as it was


# ---- the command line -----------------------------------------------------------------------


def firmware_cli(*args: str) -> tuple[int, str, str]:
    done = run([sys.executable, "-m", "partitions.firmware", *args], check=False)
    return done.returncode, done.text, done.stderr.decode()


def test_cli(slot_image: DiskLayout, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    updated_image(slot_image, cmdline)
    b = slot_image.by_label("USR-B")
    disk = str(slot_image.path)

    rc, out, _ = firmware_cli("--disk", disk, "--cmdline-out", str(cmdline))

    assert rc == 0
    assert out == f"booted USR-B (partition 2, PARTUUID={b.part_uuid})\n"
    assert cmdline.read_text() == f"mount.usr=PARTUUID={b.part_uuid} ro\n"

    rc, out, _ = firmware_cli(
        "--disk", disk, "--cmdline-out", str(cmdline), "--labels", "USR-A,USR-B", "--json"
    )

    assert rc == 0
    assert json.loads(out)["slot"] == "USR-A"
    assert json.loads(out)["after"] == {"priority": 1, "tries": 0, "successful": True}


def test_cli_errors(slot_image: DiskLayout, tmp_path: Path) -> None:
    cmdline = str(tmp_path / "cmdline")
    disk = str(slot_image.path)

    rc, out, err = firmware_cli("--disk", disk, "--cmdline-out", cmdline)
    assert (rc, out) == (1, "")
    assert "no bootable slot" in err

    rc, out, err = firmware_cli("--disk", disk, "--cmdline-out", cmdline, "--labels", "X,Y")
    assert (rc, out) == (6, "")
    assert "no partition named 'X'" in err
