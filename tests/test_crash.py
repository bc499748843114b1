"""Crash safety: kill -9 the install at random points across its steps.

After each kill, two things must hold. If the power had gone at that moment
(the firmware emulation boots a copy of the disk), the machine boots the old
slot, or the new one only if it is complete and verified. If the agent is just
started again, a fresh `check --install` completes. The old slot's bytes never
change.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from devtools.host import LABELS, Host
from devtools.repo_server import Fault
from partitions.firmware import boot_disk_image
from tests.conftest import Repo, updatectl

KILLS = 50
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


def calibrate(host: Host) -> dict[str, float]:
    """Seconds from process start to each logged step of one full install."""
    started = time.monotonic()
    proc = subprocess.Popen(
        install_argv(host), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    marks: dict[str, float] = {}
    for line in proc.stderr:
        for event in ("install_started", "image_written", "update_staged"):
            if event in line:
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


@pytest.mark.slow
def test_kill_at_random_points(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    raw = usr_images["1.1.0"].read_bytes()
    raw_sha = hashlib.sha256(raw).hexdigest()
    slot_a = host.layout.by_label("USR-A")
    old_a = hashlib.sha256(host.slot_bytes("USR-A")).hexdigest()
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(host.disk, pristine)

    def reset() -> None:
        shutil.copyfile(pristine, host.disk)
        shutil.rmtree(host.state_dir, ignore_errors=True)

    repo.server.fault(repo.image_path(), SLOW)
    marks = calibrate(host)
    reset()

    rng = random.Random(20261128)
    landed: Counter[str] = Counter()
    booted_new = 0
    for i in range(KILLS):
        # Most kills between the start of the install and its end, some anywhere.
        lo = 0.0 if i % 10 == 0 else marks["install_started"] * 0.9
        delay = rng.uniform(lo, marks["end"] * 1.05)
        repo.server.fault(repo.image_path(), SLOW)
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
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, f"kill {i} at {delay:.3f}s: {r.err}"
        assert host.slot_bytes("USR-B", len(raw)) == raw
        assert updatectl(host, "status", "--json").json()["state"] == "update_staged"
        reset()

    # The kills really spread across the steps.
    assert sum(landed.values()) == KILLS
    assert landed["installing"] >= KILLS // 3, landed
    assert landed["before-install"] >= 1, landed
    print(f"\nkill points: {dict(landed)}; firmware booted the new slot {booted_new} times")
