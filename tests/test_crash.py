"""Crash safety: kill -9 the install at random points across its steps.

After each kill, two things must hold. If the power had gone at that moment
(the firmware emulation boots a copy of the disk), the machine boots the old
slot, or the new one only if it is complete and verified. If the agent is just
started again, a fresh `check --install` completes. The old slot's bytes never
change. The second test does the same on a systemd-boot host whose release
carries a kernel and an initrd, so kills also land while they are written to
the ESP: the new slot boots only with its boot files complete, and the old
slot's boot files and entry never change.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from devtools.gpgkeys import SigningKey
from devtools.host import LABELS, EspHost, Host, esp_files, systemd_boot_choice
from devtools.repo_server import Fault
from partitions.firmware import boot_disk_image
from partitions.mtools import MtoolsStore, fat_partition
from tests.conftest import Repo, updatectl
from tests.test_bootfiles import esp_host_with_boot_files
from tests.test_delta import changed_image

# kills timed against a calibration run: one worker, one at a time (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("serial")

KILLS = 50
DELTA_KILLS = 20
SLOW = Fault(chunk_delay_s=0.01)  # ~0.3 s of download: kills land inside the stream


def install_argv(host: Host) -> list[str]:
    return [
        sys.executable,
        "-m",
        "updater.cli",
        "-v",
        "--config",
        str(host.config),
        "check",
        "--install",
    ]


def calibrate(
    host: Host, events: tuple[str, ...] = ("install_started", "image_written", "update_staged")
) -> dict[str, float]:
    """Seconds from process start to each logged step of one full install (the first of each)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        install_argv(host), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    marks: dict[str, float] = {}
    for line in proc.stderr:
        for event in events:
            if event in line and event not in marks:
                marks[event] = time.monotonic() - started
    assert proc.wait(timeout=60) == 0
    marks["end"] = time.monotonic() - started
    assert {"install_started", "update_staged"} <= set(marks), marks
    return marks


def phase(host: Host) -> str:
    """Where the kill landed, read from what the agent left on disk."""
    state = host.state_dir / "state.json"
    if not state.exists():
        return "before-install"
    text = state.read_text()
    if '"pending": null' not in text:
        return "installing"
    return "staged" if '"installed"' in text else "before-install"


def image_bytes_sent(repo: Repo, since: int) -> int:
    """Bytes of the image the server sent in the requests from number ``since`` on."""
    path = repo.image_path()
    return sum(r.sent for r in repo.server.requests[since:] if r.path == path)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["full", "delta"])
def test_kill_at_random_points(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path, path: str
) -> None:
    """``full``: 1.1.0 shares too little with 1.0.0 for a delta (the full download);
    ``delta``: 1.0.0 with 16 places changed, built from the booted slot's blocks and
    16 fetched ones (a slower link: kills land among the fetches), and a resumed
    install fetches no more than a whole one, fewer when the kill came after a fetch."""
    image = usr_images["1.1.0"]
    slow, kills = SLOW, KILLS
    if path == "delta":
        image = changed_image(usr_images["1.0.0"], tmp_path / "usr-1.1.0.img", places=16)
        slow, kills = Fault(chunk_delay_s=0.1), DELTA_KILLS
    repo.publish("1.1.0", image)
    raw = image.read_bytes()
    raw_sha = hashlib.sha256(raw).hexdigest()
    slot_a = host.layout.by_label("USR-A")
    old_a = hashlib.sha256(host.slot_bytes("USR-A")).hexdigest()
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(host.disk, pristine)

    def reset() -> None:
        shutil.copyfile(pristine, host.disk)
        shutil.rmtree(host.state_dir, ignore_errors=True)

    repo.server.fault(repo.image_path(), slow)
    marks = calibrate(host)
    whole = image_bytes_sent(repo, 0)  # what an install from scratch downloads
    assert (whole < len(raw) // 4) == (path == "delta"), whole
    reset()
    resumed: list[int] = []

    rng = random.Random(20261128)
    landed: Counter[str] = Counter()
    booted_new = 0
    for i in range(kills):
        # Most kills between the start of the install and its end, some anywhere.
        lo = 0.0 if i % 10 == 0 else marks["install_started"] * 0.9
        delay = rng.uniform(lo, marks["end"] * 1.05)
        repo.server.fault(repo.image_path(), slow)
        proc = subprocess.Popen(
            install_argv(host), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        landed[phase(host)] += 1

        # Power lost now: the firmware boots the old slot, or a complete new one.
        copy = tmp_path / "after-kill.img"
        shutil.copyfile(host.disk, copy)
        booted = boot_disk_image(copy, LABELS, tmp_path / "cmdline").slot.label
        if booted == "USR-B":
            booted_new += 1
            b = host.layout.by_label("USR-B")
            with copy.open("rb") as fh:
                fh.seek(b.offset)
                assert hashlib.sha256(fh.read(len(raw))).hexdigest() == raw_sha, (
                    f"kill {i} at {delay:.3f}s: a partial USR-B is bootable"
                )
        else:
            assert booted == "USR-A", f"kill {i}: booted {booted}"
        with host.disk.open("rb") as fh:
            fh.seek(slot_a.offset)
            assert hashlib.sha256(fh.read(slot_a.size)).hexdigest() == old_a, (
                f"kill {i} at {delay:.3f}s changed the booted slot"
            )

        # The agent starts again: a fresh install completes.
        repo.server.clear_faults()
        since = len(repo.server.requests)
        where = phase(host)
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, f"kill {i} at {delay:.3f}s: {r.err}"
        assert host.slot_bytes("USR-B", len(raw)) == raw
        assert updatectl(host, "status", "--json").json()["state"] == "update_staged"
        if where == "installing":
            resumed.append(image_bytes_sent(repo, since))
        reset()

    # The kills really spread across the steps.
    assert sum(landed.values()) == kills
    # (the delays come from one calibration run: a machine whose load changes
    # moves them, so the bar is a spread, not a share)
    assert landed["installing"] >= kills // 10, landed
    assert landed["before-install"] >= 1, landed
    if path == "delta":
        # a resumed delta keeps the blocks the killed one wrote: never more, often less
        assert all(n <= whole for n in resumed), (whole, resumed)
        assert sum(n < whole for n in resumed) >= 2, (whole, resumed)
    print(f"\nkill points: {dict(landed)}; firmware booted the new slot {booted_new} times")
    if path == "delta":
        print(f"image bytes of a whole delta install {whole}, of each resumed one {resumed}")


KERNEL = b"\x7fkernel 1.1.0 " * 40_000  # ~0.6 MiB: kills land inside its download and copy
INITRD = b"initrd 1.1.0 " * 80_000
ESP_KILLS = 30


def esp_phase(host: Host) -> str:
    """Like :func:`phase`, telling the boot files' step (image written, not yet staged)."""
    where = phase(host)
    log = host.root / "agent.log"
    if where == "installing" and "image_written" in log.read_text():
        return "boot-files"
    return where


def old_side(disk: Path, efivars: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """USR-A's boot files and entry on ``disk``'s ESP."""
    esp = MtoolsStore(disk, fat_partition(disk, "EFI-SYSTEM")[0])
    entries = {n: b for n, b in esp_files(esp, "loader/entries").items() if "USR-A" in n}
    return esp_files(esp, "USR-A"), entries


@pytest.mark.slow
def test_kill_at_random_points_while_boot_files_are_written(
    repo: Repo,
    usr_images: dict[str, Path],
    release_key: SigningKey,
    tmp_path: Path,
) -> None:
    m: EspHost = esp_host_with_boot_files(tmp_path, usr_images, repo, release_key)
    host, efivars = m.host, m.host.root / "efivars"
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(INITRD)
    repo.publish(
        "1.1.0", usr_images["1.1.0"], boot_files=(("vmlinuz", kernel), ("initrd.img", initrd))
    )
    raw = usr_images["1.1.0"].read_bytes()
    old_a = hashlib.sha256(host.slot_bytes("USR-A")).hexdigest()
    old_esp = old_side(host.disk, efivars)
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(host.disk, pristine)
    paths = (repo.image_path(), repo.boot_path("vmlinuz"), repo.boot_path("initrd.img"))

    def slow() -> None:
        repo.server.fault(paths[0], SLOW)
        for path in paths[1:]:  # ~0.3 s each: the boot files' step is as long as the image's
            repo.server.fault(path, Fault(chunk_delay_s=0.03))

    def reset() -> None:
        shutil.copyfile(pristine, host.disk)
        shutil.rmtree(host.state_dir, ignore_errors=True)

    slow()
    marks = calibrate(
        host, ("install_started", "image_written", "boot_file_written", "update_staged")
    )
    reset()
    assert marks["image_written"] < marks["end"], marks

    rng = random.Random(20261129)
    landed: Counter[str] = Counter()
    booted_new = 0
    for i in range(ESP_KILLS):
        # Half the kills after the image is written: in the boot files' download and copy.
        lo = marks["image_written"] if i % 2 else marks["install_started"] * 0.9
        delay = rng.uniform(lo, marks["end"] * 1.05)
        slow()
        with (host.root / "agent.log").open("w") as agent_log:
            # its own process group: kill -9 takes mcopy and mren with it, as stopping
            # the service's cgroup does, and nothing keeps writing after the "power cut"
            proc = subprocess.Popen(
                install_argv(host),
                stdout=subprocess.DEVNULL,
                stderr=agent_log,
                start_new_session=True,
            )
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        landed[esp_phase(host)] += 1

        # Power lost now: systemd-boot boots the old slot, or a complete new one.
        copy = tmp_path / "after-kill.img"
        shutil.copyfile(host.disk, copy)
        booted = systemd_boot_choice(copy, efivars)
        if booted == "USR-B":
            booted_new += 1
            b = host.layout.by_label("USR-B")
            with copy.open("rb") as fh:
                fh.seek(b.offset)
                assert fh.read(len(raw)) == raw, f"kill {i} at {delay:.3f}s: a partial USR-B boots"
            esp = MtoolsStore(copy, fat_partition(copy, "EFI-SYSTEM")[0])
            assert esp.read("USR-B/vmlinuz") == KERNEL, f"kill {i}: USR-B boots a partial kernel"
            assert esp.read("USR-B/initrd.img") == INITRD, f"kill {i}: a partial initrd"
        else:
            assert booted == "USR-A", f"kill {i} at {delay:.3f}s: booted {booted}"
        assert old_side(copy, efivars) == old_esp, f"kill {i} at {delay:.3f}s changed USR-A's ESP"
        assert hashlib.sha256(host.slot_bytes("USR-A")).hexdigest() == old_a

        # The agent starts again: a fresh install completes, boot files and all.
        repo.server.clear_faults()
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, f"kill {i} at {delay:.3f}s: {r.err}"
        assert m.esp.read("USR-B/vmlinuz") == KERNEL and m.esp.read("USR-B/initrd.img") == INITRD
        assert m.next_boot() == "USR-B"
        assert old_side(host.disk, efivars) == old_esp
        reset()

    assert sum(landed.values()) == ESP_KILLS
    assert landed["boot-files"] >= ESP_KILLS // 10, landed  # a spread (see above)
    print(f"\nkill points: {dict(landed)}; systemd-boot booted the new slot {booted_new} times")
