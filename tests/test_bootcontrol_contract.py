"""One boot-control contract, run against every backend: gpt-prio on a disk image,
systemd-boot and grub-env on an ESP (inside the disk image through mtools, and as a
directory). The firmware's part of a boot is simulated with the boot loader's own
rule and tools (cgpt, a systemd-boot counter rename, grub-editenv), never with the
backend under test; the updater's rules (is_staged, host_state, detect_rollback)
must give the same answers whatever the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from devtools.diskimage import cgpt_flags
from devtools.espimage import esp_store, make_esp_disk
from partitions.bls import EntryTemplate, parse_entry_name
from partitions.bootcontrol import (
    BootControl,
    Slot,
    SlotFlags,
    SlotStatus,
    check_write_target,
    write_target_problem,
)
from partitions.booted import BootedSlotFinder
from partitions.filestore import FileStore
from partitions.gptprio import GptPrioBootControl
from partitions.grubenv import GrubEnvControl, new_env_block
from partitions.sdboot import SdBootControl
from tests.gptcraft import edit_entries, entry_lbas, set_entry
from updater import compose, config
from updater.clock import SystemClock
from updater.decisions import detect_rollback, host_state, is_staged
from updater.errors import DiskError
from updater.hostlock import FlockHostLock
from updater.hostports import OsReleaseFile
from updater.run import run
from updater.slots import Slots
from updater.state import SlotRecord, State, StateStore

MiB = 1024 * 1024
ENTRY = EntryTemplate(
    title="Contract OS ({label})",
    linux="/vmlinuz",
    initrd=("/initrd.img",),
    options="mount.usr=PARTUUID={partuuid} ro",
)


@dataclass
class Rig:
    name: str
    control: BootControl
    cmdline: Path
    firmware_boot: Callable[[Slot], None]  # what the boot loader does to boot this slot
    # RAUC's variables cannot tell a staged slot from a blessed one (OK=1, TRY=0 both)
    staged_reads_successful: bool = False
    # RAUC's GRUB sets TRY=1 on every boot: the old slot, too, waits for mark-good
    every_boot_is_a_trial: bool = False

    def slot(self, label: str) -> Slot:
        return next(s.slot for s in self.control.slots() if s.slot.label == label)

    def status(self, label: str) -> SlotStatus:
        return next(s for s in self.control.slots() if s.slot.label == label)

    def flags(self, label: str) -> SlotFlags:
        return self.status(label).flags

    def boots(self, slot: Slot) -> None:
        """The machine boots ``slot``: the loader's bookkeeping, then the kernel command line."""
        self.firmware_boot(slot)
        self.cmdline.write_text(f"BOOT_IMAGE=/vmlinuz mount.usr=PARTUUID={slot.part_uuid} ro\n")


def gpt_boot(disk: Path) -> Callable[[Slot], None]:
    def boot(slot: Slot) -> None:  # CoreOS GRUB's gptprio.next: spend one try if not successful
        flags = cgpt_flags(disk, slot.index)
        if not flags.successful and flags.tries > 0:
            run(["cgpt", "add", "-i", str(slot.index), "-T", str(flags.tries - 1), str(disk)])

    return boot


def sdboot_boot(store: FileStore) -> Callable[[Slot], None]:
    def boot(slot: Slot) -> None:  # systemd-boot: +LEFT-DONE -> +(LEFT-1)-(DONE+1) before booting
        for name in store.list("loader/entries"):
            parsed = parse_entry_name(name)
            if parsed is None or parsed.stem != f"updater-{slot.label}" or parsed.left is None:
                continue
            new = parsed.renamed(max(parsed.left - 1, 0), (parsed.done or 0) + 1)
            store.rename(f"loader/entries/{name}", f"loader/entries/{new.name}")

    return boot


def grub_boot(store: FileStore, scratch: Path) -> Callable[[Slot], None]:
    def boot(slot: Slot) -> None:  # the fragment: <name>_TRY=1, save_env
        name = {"USR-A": "A", "USR-B": "B"}[slot.label]
        scratch.write_bytes(store.read("grub/grubenv"))
        run(["grub-editenv", str(scratch), "set", f"{name}_TRY=1"])
        store.write("grub/grubenv", scratch.read_bytes())

    return boot


BACKENDS = [
    "gpt-prio",
    "systemd-boot/mtools",
    "systemd-boot/dir",
    "grub-env/mtools",
    "grub-env/dir",
]


def test_every_configurable_backend_is_built_and_under_this_contract() -> None:
    assert set(compose.BOOT_BACKENDS) == set(config.BACKENDS)
    assert {b.partition("/")[0] for b in BACKENDS} == set(config.BACKENDS)


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """A machine whose USR-A is provisioned good and boots; USR-B empty and unbootable."""
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    cmdline = tmp_path / "cmdline"
    finder = BootedSlotFinder(cmdline, tmp_path / "proc", tmp_path / "sys", tmp_path)
    kind, _, medium = str(request.param).partition("/")
    store = esp_store(disk, medium or "mtools", tmp_path / "esp")
    if kind == "gpt-prio":
        control: BootControl = GptPrioBootControl(disk.path, finder=finder)
        rig = Rig(request.param, control, cmdline, gpt_boot(disk.path))
    elif kind == "systemd-boot":
        store.makedirs("loader/entries")
        store.write("vmlinuz", b"kernel")
        store.write("initrd.img", b"initrd")
        control = SdBootControl(
            store,
            disk.path,
            finder=finder,
            entry=ENTRY,
            efivars=tmp_path / "efivars",
        )
        rig = Rig(request.param, control, cmdline, sdboot_boot(store))
    else:
        store.makedirs("grub")
        store.write("grub/grubenv", new_env_block())
        control = GrubEnvControl(store, disk.path, finder=finder)
        rig = Rig(
            request.param,
            control,
            cmdline,
            grub_boot(store, tmp_path / "grubenv.copy"),
            staged_reads_successful=True,
            every_boot_is_a_trial=True,
        )
    a = rig.slot("USR-A")
    rig.control.mark_good(a)  # the image builder's (or installer's) word: A is good
    rig.cmdline.write_text(f"mount.usr=PARTUUID={a.part_uuid} ro\n")
    yield rig


def records(rig: Rig, b_condition: str = "installed") -> State:
    a, b = rig.slot("USR-A"), rig.slot("USR-B")
    return State(
        "1.1.0",
        {
            str(a.part_uuid): SlotRecord("USR-A", "good", "1.0.0"),
            str(b.part_uuid): SlotRecord("USR-B", b_condition, "1.1.0"),  # type: ignore[arg-type]
        },
    )


def test_update_blessed(rig: Rig) -> None:
    control = rig.control
    a, b = rig.slot("USR-A"), rig.slot("USR-B")

    # provisioned: A boots and is good; B cannot be booted
    assert control.booted() == a
    assert control.primary() == a
    assert rig.flags("USR-A").bootable and rig.flags("USR-A").successful
    assert not rig.flags("USR-B").bootable
    assert host_state(State(), rig.status("USR-A"), control.primary(), busy=False) == "idle"

    # install: B marked bad while written, then made the next boot, once, on trial
    control.mark_bad(b)
    assert not rig.flags("USR-B").bootable and control.primary() == a
    a_before = rig.flags("USR-A")
    control.make_primary(b)
    assert control.primary() == b
    assert rig.flags("USR-B").bootable
    assert rig.flags("USR-B").successful is rig.staged_reads_successful
    assert rig.flags("USR-A") == a_before
    state = records(rig)
    assert is_staged(state, rig.status("USR-B"), control.primary(), "1.1.0")
    assert host_state(state, rig.status("USR-A"), control.primary(), False) == "update_staged"
    assert detect_rollback(state, rig.status("USR-B")) is None

    # the boot loader picks B and boots it: a trial boot, not yet blessed
    rig.boots(b)
    assert control.booted() == b
    assert not rig.flags("USR-B").successful  # the updater refuses to install now
    assert not rig.flags("USR-B").bootable  # no try left: an unblessed B is not booted again
    assert control.primary() == a  # the next boot falls back
    assert rig.flags("USR-A").bootable  # so failed health checks may mark B bad
    assert host_state(state, rig.status("USR-B"), control.primary(), False) == "trial_boot"

    # healthy: blessed
    control.mark_good(b)
    assert rig.flags("USR-B").successful and rig.flags("USR-B").bootable
    assert control.primary() == b
    assert host_state(state, rig.status("USR-B"), control.primary(), False) == "idle"

    # and marked bad (say, by an admin): never booted again, A is next
    control.mark_bad(b)
    assert not rig.flags("USR-B").bootable and not rig.flags("USR-B").successful
    assert control.primary() == a
    assert not is_staged(state, rig.status("USR-B"), control.primary(), "1.1.0")
    assert detect_rollback(records(rig, "bad"), rig.status("USR-B")) == "1.1.0"


def test_update_not_blessed_falls_back(rig: Rig) -> None:
    control = rig.control
    a, b = rig.slot("USR-A"), rig.slot("USR-B")
    control.mark_bad(b)
    control.make_primary(b)
    rig.boots(b)  # B's trial boot never gets blessed (it hangs, the watchdog resets)
    assert control.primary() == a
    rig.boots(a)  # the next boot: the boot loader falls back to A
    assert control.booted() == a
    state = records(rig)
    a_status = rig.status("USR-A")
    expected = "trial_boot" if rig.every_boot_is_a_trial else "idle"
    assert host_state(state, a_status, control.primary(), False) == expected
    control.mark_good(a)  # updater-mark-good.service, on every boot: healthy again
    assert host_state(state, rig.status("USR-A"), control.primary(), False) == "idle"
    assert detect_rollback(state, rig.status("USR-B")) == "1.1.0"
    assert control.primary() == a


def test_health_check_failure_marks_the_trial_slot_bad(rig: Rig) -> None:
    control = rig.control
    a, b = rig.slot("USR-A"), rig.slot("USR-B")
    control.mark_bad(b)
    control.make_primary(b)
    rig.boots(b)
    booted, other = rig.status("USR-B"), rig.status("USR-A")
    # Slots.mark_booted_bad's precondition: the booted slot is on trial, the other bootable
    assert not booted.flags.successful and other.flags.bootable
    control.mark_bad(b)
    assert control.primary() == a
    rig.boots(a)
    control.mark_good(a)
    assert detect_rollback(records(rig, "bad"), rig.status("USR-B")) == "1.1.0"
    assert control.primary() == a and control.booted() == a


def test_a_failed_health_check_never_gives_up_the_known_good_slot(rig: Rig, tmp_path: Path) -> None:
    """B was blessed, A holds the release before it: a plain reboot of B whose checks
    fail keeps B (there is nothing newer to give up), whatever the boot loader."""
    os_release = tmp_path / "os-release"
    os_release.write_text("IMAGE_VERSION=1.0.0\n")
    updater = Slots(
        boot=rig.control,
        store=StateStore(tmp_path / "state"),
        clock=SystemClock(),
        os_release=OsReleaseFile(os_release),
        lock=FlockHostLock(tmp_path / "state"),
    )
    control = rig.control
    a, b = rig.slot("USR-A"), rig.slot("USR-B")
    updater.mark_good()  # A, 1.0.0
    control.make_primary(b)  # (its install)
    rig.boots(b)
    os_release.write_text("IMAGE_VERSION=1.1.0\n")
    assert updater.mark_good() == b
    assert rig.flags("USR-A").bootable  # the release before, to roll back to by hand
    rig.boots(control.primary() or a)  # a plain reboot
    assert control.booted() == b
    assert updater.mark_booted_bad() is None  # the health checks failed
    assert control.primary() == b
    assert rig.flags("USR-B").bootable and rig.flags("USR-A").bootable
    rig.boots(control.primary() or a)  # and the next boot is B again
    assert control.booted() == b


# ---- a partition table that is not a sane disk ----------------------------------------------


def test_every_backend_refuses_an_overlapping_table_and_writes_nothing(rig: Rig) -> None:
    a, b = rig.slot("USR-A"), rig.slot("USR-B")

    def b_over_a(entries: bytearray) -> None:
        _, last_a = entry_lbas(entries, a.index)
        first_b, last_b = entry_lbas(entries, b.index)
        shift = first_b - (last_a - 3)
        set_entry(entries, b.index, first_lba=first_b - shift, last_lba=last_b - shift)

    edit_entries(a.disk, b_over_a)
    esp = [p for p in rig.cmdline.parent.rglob("*") if p.is_file() and "esp" in p.parts]
    before = {p: p.read_bytes() for p in [a.disk, *esp]}
    for read in (rig.control.slots, rig.control.primary, rig.control.booted):
        with pytest.raises(DiskError) as err:
            read()
        assert err.value.kind == "gpt_invalid"
        assert f"partitions {a.index} and {b.index}: overlap" in err.value.message
    for verb in (rig.control.mark_bad, rig.control.make_primary, rig.control.mark_good):
        with pytest.raises(DiskError) as err:
            verb(b)
        assert err.value.kind == "gpt_invalid"
    assert {p: p.read_bytes() for p in before} == before


def _slot(index: int, offset: int, size: int, uuid: int | None = None, disk: str = "d") -> Slot:
    return Slot(f"S{index}", index, UUID(int=uuid or index), Path(disk), offset, size)


@pytest.mark.parametrize(
    ("booted", "target", "problem"),
    [
        (_slot(1, 0, 100), _slot(2, 100, 100), None),
        (_slot(2, 100, 100), _slot(1, 0, 100), None),
        (_slot(1, 0, 100), _slot(2, 0, 100, disk="other"), None),  # another disk
        (_slot(1, 0, 100), _slot(1, 100, 100, uuid=9), "is the booted slot"),
        (_slot(1, 0, 100), _slot(2, 100, 100, uuid=1), "share the PARTUUID"),
        (_slot(1, 0, 100), _slot(2, 99, 100), "overlaps the booted partition 1"),
        (_slot(1, 100, 100), _slot(2, 1, 100), "overlaps the booted partition 1"),
        (_slot(1, 0, 300), _slot(2, 100, 100), "overlaps"),  # inside it
        (_slot(1, 100, 100), _slot(2, 0, 300), "overlaps"),  # around it
    ],
)
def test_write_target_problem(booted: Slot, target: Slot, problem: str | None) -> None:
    found = write_target_problem(booted, target)
    if problem is None:
        assert found is None
        check_write_target(booted, target)
    else:
        assert found is not None and problem in found
        with pytest.raises(DiskError) as err:
            check_write_target(booted, target)
        assert err.value.kind == "gpt_invalid"
