"""Crash safety against power cuts: what a flush made durable, and nothing more.

tests/test_crash.py kills the installer, and the page cache outlives a kill: a
missing fsync passes there. Here one real install (``updatectl check
--install`` from a loopback repository) writes to a disk that records every
write and flush (devtools/powercut.py: nbdkit + nbdfuse), with the agent's
state directory on an ext4 partition of that same disk. Then, at every flush
boundary and after every write, the disk is rebuilt as a power cut there
would have left it: everything before the last completed flush, plus none,
all, the newest few or random subsets (torn at 4 KiB sectors) of the writes
in flight. On each such disk:

- the firmware emulation boots the old slot, or the new one only when it is
  complete (its bytes hash to the manifest's);
- the old slot's bytes are those it had (no recorded write touches it);
- the state file is there and whole (the agent reads it, never sets it aside
  as corrupt), and a slot it calls "installed" holds what the record says;
- (at the flush boundaries) the machine boots and the agent carries on: a
  fresh ``check --install`` completes when the old slot booted, ``mark-good``
  leaves an idle, healthy host when the new one did.

A recording with the slot writer's flush left out (``SlotDevice(sync=False)``)
fails these checks: the proof that they catch a missing fsync.

What they found: a cut after the install made the new slot the next boot and
before the state file said "installed" left a pending install behind; the
new slot booted (it was complete) and the host said "install_interrupted"
for ever, even once blessed. The tests at the end pin the fix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.diskimage import PartitionSpec
from devtools.gpgkeys import SigningKey
from devtools.host import LABELS, Host, provision
from devtools.powercut import (
    Cut,
    Rebuilder,
    Recording,
    cut_plans,
    cut_points,
    load,
    make_ext4,
    mounted_ext4,
    recorded_disk,
    write_file,
)
from partitions.bootcontrol import Slot
from partitions.firmware import NoBootableSlotError, boot_disk_image
from partitions.gptprio import GptPrioBootControl
from tests.conftest import HOST_SLOT_SIZE, Repo, updatectl
from updater import slotio, slots
from updater import state as state_module
from updater.clock import SystemClock
from updater.errors import UpdaterError
from updater.fsutil import atomic_write
from updater.hostlock import FlockHostLock
from updater.hostports import OsReleaseFile
from updater.slots import Slots
from updater.state import StateStore

STATE_SIZE = 8 * 1024 * 1024  # bytes: the STATE partition, ext4, holding the state dir
SUBSETS = 8  # random subsets of the writes in flight per cut point
SEED = 20261205
NEW = "1.1.0"  # the version installed


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def state_mounted(host: Host) -> Iterator[Path]:
    part = host.layout.by_label("STATE")
    with mounted_ext4(host.disk, part.offset, part.size, host.state_dir) as where:
        yield where


def set_version(host: Host, version: str) -> None:
    """The os-release of the root that booted (each slot carries its own)."""
    host.os_release.write_text(f"ID=updater-demo\nIMAGE_VERSION={version}\n")


@pytest.fixture
def state_host(
    tmp_path: Path, usr_images: dict[str, Path], repo: Repo, release_key: SigningKey
) -> Host:
    """The ``host`` fixture's machine, with its state dir on a STATE partition of its disk."""
    host = provision(
        tmp_path / "host",
        slot_size=HOST_SLOT_SIZE,
        first_image=usr_images["1.0.0"],
        first_version="1.0.0",
        repo_url=repo.url,
        keyring=release_key.public_key,
        extra_partitions=[PartitionSpec("STATE", STATE_SIZE)],
    )
    part = host.layout.by_label("STATE")
    make_ext4(host.disk, part.offset, part.size, "STATE")
    with state_mounted(host):
        # a state file from before the install: no cut may lose it
        assert updatectl(host, "mark-good").code == 0
        assert (host.state_dir / "state.json").exists()
    return host


def record_install(host: Host, work: Path) -> Recording:
    """One real ``check --install`` onto the recording disk, /var on its STATE partition."""
    with recorded_disk(host.disk, work) as ops_log, state_mounted(host):
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, r.err
        assert updatectl(host, "status", "--json").json()["state"] == "update_staged"
    return load(work / "seed.img", ops_log)


@dataclass(frozen=True)
class StateView:
    problem: str | None
    b_installed: tuple[int, str] | None = None  # raw_size, raw_sha256 the record gives USR-B
    b_version: str | None = None  # the version the record of USR-B names, in any condition
    highest: str | None = None


class Checker:
    """The invariants every disk a power cut can leave must hold.

    What the checks read is cached by which writes reached that part of the
    disk (:meth:`Cut.region`): many cuts leave the same partition tables or
    the same STATE file system. The old slot is not compared per cut: the
    recording shows that no write touched it (test below), and a rebuilt disk
    holds only the recorded writes.
    """

    def __init__(self, host: Host, rec: Recording, raw: bytes, work: Path) -> None:
        self.rec = rec
        self.raw = raw
        self.raw_sha = sha(raw)
        self.b = host.layout.by_label("USR-B")
        self.state = host.layout.by_label("STATE")
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        # The firmware reads the partition tables only, at both ends of the disk:
        # a sparse copy gets those and nothing else (much faster than whole disks).
        self.boot_copy = work / "boot.img"
        with self.boot_copy.open("wb") as fh:
            fh.truncate(len(rec.base))
        parts = host.layout.partitions
        self.gpt_ends = (
            (0, min(p.offset for p in parts)),
            (max(p.offset + p.size for p in parts), len(rec.base)),
        )
        self.booted: dict[tuple[object, ...], str | None] = {}
        self.b_hashes: dict[tuple[object, ...], str] = {}
        self.states: dict[tuple[object, ...], StateView] = {}
        self.booted_new = 0

    def violations(self, cut: Cut, disk: bytearray, *, state: bool = True) -> list[str]:
        out = []
        booted = self.boot(cut, disk)
        if booted is None:
            out.append("no slot is bootable")
        elif booted == "USR-B":
            self.booted_new += 1
            if self.b_hash(cut, disk, len(self.raw)) != self.raw_sha:
                out.append("a partial USR-B is bootable")
        elif booted != "USR-A":
            out.append(f"the firmware said: {booted}")
        if not state:
            return out
        st = self.read_state(cut, disk)
        if st.problem is not None:
            out.append(st.problem)
            return out
        if booted == "USR-B" and (st.b_version, st.highest) != (NEW, NEW):
            # a failed trial would go unnoticed (no rollback recorded, the version
            # tried again), and the rollback floor would be lower than what booted
            out.append(
                f"USR-B boots, and the state file knows nothing of it (record of "
                f"{st.b_version}, highest version {st.highest})"
            )
        if st.b_installed is not None:
            size, want = st.b_installed
            if self.b_hash(cut, disk, size) != want:
                out.append("the state file calls USR-B installed, and it holds something else")
        return out

    def b_hash(self, cut: Cut, disk: bytearray, size: int) -> str:
        key = (size, cut.region(self.rec, self.b.offset, size))
        if key not in self.b_hashes:
            self.b_hashes[key] = sha(memoryview(disk)[self.b.offset : self.b.offset + size])
        return self.b_hashes[key]

    def boot(self, cut: Cut, disk: bytearray) -> str | None:
        key = tuple(cut.region(self.rec, lo, hi - lo) for lo, hi in self.gpt_ends)
        if key not in self.booted:
            self.booted[key] = self._boot(disk)
        return self.booted[key]

    def _boot(self, disk: bytearray) -> str | None:
        with self.boot_copy.open("r+b") as fh:
            for lo, hi in self.gpt_ends:
                fh.seek(lo)
                fh.write(disk[lo:hi])
        try:
            return boot_disk_image(self.boot_copy, LABELS, self.work / "cmdline").slot.label
        except NoBootableSlotError:
            return None
        except UpdaterError as exc:
            return f"{exc.kind}: {exc.message}"

    def read_state(self, cut: Cut, disk: bytearray) -> StateView:
        key = cut.region(self.rec, self.state.offset, self.state.size)
        if key not in self.states:
            end = self.state.offset + self.state.size
            self.states[key] = self._read_state(disk[self.state.offset : end])
        return self.states[key]

    def _read_state(self, part: bytearray) -> StateView:
        image, mnt, copy = self.work / "state.img", self.work / "mnt", self.work / "var"
        write_file(image, part)
        shutil.rmtree(copy, ignore_errors=True)
        try:
            with mounted_ext4(image, 0, len(part), mnt):  # replays the journal, as a boot does
                shutil.copytree(mnt, copy)
        except UpdaterError as exc:
            return StateView(f"the STATE file system does not mount: {exc.message}")
        if not (copy / "state.json").exists():
            return StateView("state.json is gone")
        with capture_logs() as logs:
            state = StateStore(copy).load()
        if any(e["event"] == "state_corrupt_set_aside" for e in logs):
            return StateView("state.json is not whole: the agent sets it aside")
        rec = state.slots.get(str(self.b.part_uuid))
        version = rec.version if rec is not None else None
        if rec is not None and rec.condition == "installed":
            if rec.raw_size is None or rec.raw_sha256 is None:
                return StateView("USR-B is installed without a size and hash")
            return StateView(None, (rec.raw_size, rec.raw_sha256), version, state.highest_version)
        return StateView(None, None, version, state.highest_version)


@dataclass
class Sweep:
    points: int = 0
    cuts: int = 0
    checked: int = 0  # distinct disks
    violations: list[str] = field(default_factory=list)


def sweep(
    rec: Recording,
    checker: Checker,
    rng: random.Random,
    sampled_writes: int | None,  # cut points after writes, besides the flushes; None: all
    subsets: int,
    *,
    state: bool = True,
) -> Sweep:
    out = Sweep()
    rebuild = Rebuilder(rec)
    seen: set[tuple[object, ...]] = set()
    for at in cut_points(rec, rng, sampled_writes):
        out.points += 1
        for cut in cut_plans(rec, at, rng, subsets):
            out.cuts += 1
            key = cut.outcome(rec)
            if key in seen:
                continue
            seen.add(key)
            out.checked += 1
            with rebuild.disk(cut) as disk:
                found = checker.violations(cut, disk, state=state)
            out.violations += [f"{cut.describe(rec)}: {v}" for v in found]
    return out


def boot_and_carry_on(host: Host, disk: bytearray, raw: bytes) -> str:
    """Power back: the firmware boots ``disk``, the agent runs; what it found
    ("A" or "B", the slot that booted, with ", install pending" when the state
    file held an unfinished install), or what went wrong."""
    write_file(host.disk, disk)
    try:
        booted = host.reboot()
    except NoBootableSlotError:
        return "no slot boots"
    with state_mounted(host):
        pending = ", install pending" if StateStore(host.state_dir).load().pending else ""
        if booted == "USR-A":
            set_version(host, "1.0.0")
            r = updatectl(host, "check", "--install", "--json")
            if r.code != 0:
                return f"booted USR-A; a fresh install failed: {r.err.strip()[-400:]}"
            if host.slot_bytes("USR-B", len(raw)) != raw:
                return "booted USR-A; the fresh install left USR-B incomplete"
            status = updatectl(host, "status", "--json").json()
            if status["state"] != "update_staged":
                return f"booted USR-A; after a fresh install the host is {status['state']}"
            return "A" + pending
        set_version(host, "1.1.0")
        r = updatectl(host, "mark-good")
        if r.code != 0:
            return f"booted USR-B; mark-good failed: {r.err.strip()[-400:]}"
        status = updatectl(host, "status", "--json").json()
        if (status["state"], status["booted_version"]) != ("idle", "1.1.0"):
            return (
                f"booted USR-B and marked it good; the host is {status['state']} "
                f"with {status['booted_version']} booted"
            )
        return "B" + pending


@pytest.mark.root
@pytest.mark.slow
def test_power_cut_during_an_install(
    state_host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    host = state_host
    repo.publish("1.1.0", usr_images["1.1.0"])
    raw = usr_images["1.1.0"].read_bytes()
    t0 = time.monotonic()
    rec = record_install(host, tmp_path / "rec")
    t_record = time.monotonic() - t0

    # The install never wrote into the booted slot, not even the bytes it holds.
    a = host.layout.by_label("USR-A")
    assert not rec.touching(a.offset, a.size)
    assert rec.flushes >= 4, f"only {rec.flushes} flushes: is the disk really recorded?"

    checker = Checker(host, rec, raw, tmp_path / "check")
    result = sweep(rec, checker, random.Random(SEED), None, SUBSETS)
    t_sweep = time.monotonic() - t0 - t_record
    assert not result.violations, "\n".join(result.violations[:20])
    assert checker.booted_new > 0, "no cut left the new slot bootable: the sweep missed the end"

    # At every flush, the machine that lost power there boots, and the agent carries on.
    rebuild = Rebuilder(rec)
    booted: dict[str, int] = {}
    problems = []
    seen: set[tuple[object, ...]] = set()
    for at in sorted({i + 1 for i in rec.flush_indices()} | {len(rec.ops)}):
        cut = Cut(at)  # what the flushes kept
        if cut.outcome(rec) in seen:
            continue
        seen.add(cut.outcome(rec))
        with rebuild.disk(cut) as disk:
            outcome = boot_and_carry_on(host, disk, raw)
        if outcome.startswith(("A", "B")):
            booted[outcome] = booted.get(outcome, 0) + 1
        else:
            problems.append(f"{cut.describe(rec)}: {outcome}")
    t_agent = time.monotonic() - t0 - t_record - t_sweep
    assert not problems, "\n".join(problems)
    # every window was there: before the install, during it, between the new slot
    # becoming the next boot and the state file saying so, and after
    assert set(booted) == {"A", "A, install pending", "B, install pending", "B"}, booted
    print(
        f"\npower cut: {rec.writes} writes ({rec.written_bytes} bytes) and {rec.flushes} flushes "
        f"recorded in {t_record:.1f}s; {result.points} cut points, {result.cuts} cuts, "
        f"{result.checked} distinct disks checked ({len(checker.states)} state file systems "
        f"mounted) in {t_sweep:.1f}s; the agent ran again after {sum(booted.values())} of them "
        f"(booted {booted}) in {t_agent:.1f}s"
    )


@pytest.mark.root
def test_a_missing_flush_is_caught(
    state_host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = state_host
    repo.publish("1.1.0", usr_images["1.1.0"])
    raw = usr_images["1.1.0"].read_bytes()
    monkeypatch.setattr(slots, "SlotDevice", functools.partial(slotio.SlotDevice, sync=False))
    rec = record_install(host, tmp_path / "rec")

    checker = Checker(host, rec, raw, tmp_path / "check")
    # the flush boundaries suffice; the state file is not what this is about
    result = sweep(rec, checker, random.Random(SEED), 0, SUBSETS, state=False)
    assert any("a partial USR-B is bootable" in v for v in result.violations), (
        f"{result.checked} disks checked, no violation found: {result.violations}"
    )
    print(
        f"\nwithout the slot's flush: {rec.writes} writes, {rec.flushes} flushes; "
        f"{len(result.violations)} of {result.checked} distinct disks violate, e.g. "
        f"{result.violations[0]}"
    )


@pytest.mark.root
def test_a_missing_state_flush_is_caught(
    state_host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for the state file: saved without fsync (ext4 still orders the
    rename behind the data, so it is never torn), it is not on the disk yet
    when the new slot already boots."""
    host = state_host
    repo.publish(NEW, usr_images[NEW])
    raw = usr_images[NEW].read_bytes()
    monkeypatch.setattr(state_module, "atomic_write", functools.partial(atomic_write, sync=False))
    rec = record_install(host, tmp_path / "rec")

    checker = Checker(host, rec, raw, tmp_path / "check")
    result = sweep(rec, checker, random.Random(SEED), 0, SUBSETS)
    assert any("the state file knows nothing of it" in v for v in result.violations), (
        f"{result.checked} disks checked, no violation found: {result.violations}"
    )
    print(
        f"\nwithout the state file's fsync: {rec.writes} writes, {rec.flushes} flushes; "
        f"{len(result.violations)} of {result.checked} distinct disks violate, e.g. "
        f"{result.violations[0]}"
    )


# ---- what the power cuts found ------------------------------------------------------------


def install_cut_after_make_primary(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install that loses power once the new slot is the next boot (flushed), before
    the state file says "installed": what the state file holds then is put back."""
    before: list[bytes] = []
    real = GptPrioBootControl.make_primary

    def make_primary(self: GptPrioBootControl, slot: Slot) -> None:
        before.append((host.state_dir / "state.json").read_bytes())
        real(self, slot)

    with monkeypatch.context() as m:
        m.setattr(GptPrioBootControl, "make_primary", make_primary)
        assert updatectl(host, "check", "--install").code == 0
    (host.state_dir / "state.json").write_bytes(before[0])
    assert StateStore(host.state_dir).load().pending is not None


def test_a_blessed_boot_settles_the_install_a_power_cut_interrupted(
    host: Host, repo: Repo, usr_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The firmware boots a slot only once its install made it the next boot, after
    writing and verifying it: the install was complete, and once the boot is blessed
    the host is idle on the new version, not "install_interrupted" for ever."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    install_cut_after_make_primary(host, monkeypatch)
    assert host.reboot() == "USR-B"
    set_version(host, "1.1.0")
    assert updatectl(host, "status", "--json").json()["state"] == "trial_boot"
    assert updatectl(host, "mark-good").code == 0
    status = updatectl(host, "status", "--json").json()
    assert (status["state"], status["booted_version"], status["pending_version"]) == (
        "idle",
        "1.1.0",
        None,
    )
    b = next(s for s in status["slots"] if s["label"] == "USR-B")
    assert (b["condition"], b["version"]) == ("good", "1.1.0")


def test_a_failed_trial_after_such_a_cut_is_a_rollback(
    host: Host, repo: Repo, usr_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its health checks fail instead: the slot is given up, and back on the old slot
    the version counts as rolled back (never installed again), the host idle."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    install_cut_after_make_primary(host, monkeypatch)
    assert host.reboot() == "USR-B"
    set_version(host, "1.1.0")
    updater = Slots(
        boot=host.boot_control(),
        store=StateStore(host.state_dir),
        clock=SystemClock(),
        os_release=OsReleaseFile(host.os_release),
        lock=FlockHostLock(host.state_dir),
    )
    assert updater.mark_booted_bad() is not None
    assert host.reboot() == "USR-A"
    set_version(host, "1.0.0")
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    status = updatectl(host, "status", "--json").json()
    assert (status["state"], status["pending_version"]) == ("idle", None)
    assert StateStore(host.state_dir).load().failed_versions == ("1.1.0",)
