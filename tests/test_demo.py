"""`make demo` reads cleanly: its narration, the commands it runs and their own
output, and nothing a person cannot read (a raw JSON log line in the middle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from tests.conftest import Repo, updatectl
from updater.errors import ExitCode


def test_a_healthy_mark_good_never_asks_for_the_system_bus(host: Host, tmp_path: Path) -> None:
    """The bus is only for a reboot into the fallback: a healthy boot has no business
    there, and a machine (or a demo) without one should not hear of it."""
    assert host.reboot() == "USR-A"
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={tmp_path / 'no-bus'}"
    try:
        r = updatectl(host, "mark-good")  # its log lines go to r.err
    finally:
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    assert r.code == 0, r.err
    assert "system_bus_unavailable" not in r.err
    assert r.err == ""


def test_a_failed_trial_boot_still_asks_the_bus_and_says_so(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    """Not hidden: when the fallback reboot is needed and no bus answers, it is said."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    assert updatectl(host, "check", "--install").code == 0
    assert host.reboot() == "USR-B"  # the trial boot
    checks = tmp_path / "health.d"
    checks.mkdir()
    (checks / "10-fails").write_text("#!/bin/sh\nexit 1\n")
    (checks / "10-fails").chmod(0o755)
    host.config.write_text(host.config.read_text() + f'\n[health]\nchecks_dir = "{checks}"\n')
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={tmp_path / 'no-bus'}"
    try:
        r = updatectl(host, "mark-good")
    finally:
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    assert r.code == ExitCode.HEALTH
    assert "system_bus_unavailable" in r.err and "fallback_reboot_refused" in r.err
    assert not cgpt_flags(host.disk, 2).bootable  # given up all the same


def test_the_demo_reads_cleanly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        # whatever the machine has: the demo must not depend on a system bus
        "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}",
    }
    env.pop("JOURNAL_STREAM", None)
    # a short work dir: gpg-agent's socket path (<gnupghome>/S.gpg-agent.browser) must fit
    # in 108 bytes, and pytest's tmp_path under xdist is long
    with tempfile.TemporaryDirectory(prefix="demo-") as workdir:
        r = subprocess.run(
            [sys.executable, "-m", "devtools.demo", "--workdir", workdir],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).splitlines()
    raw = [line for line in lines if line.lstrip().startswith("{")]
    for line in raw:
        json.loads(line)  # what they are: log lines rendered for a machine
    assert raw == [], "raw JSON in the demo's output"
    assert not [line for line in lines if "warning" in line or "error" in line.lower()]
    text = "\n".join(lines)
    assert "Installed 1.1.0 into USR-B" in text
    # 1.1.0 is signed by a key the host learned of through the rotation (make demo)
    assert "Published root 1" in text and "Trust root:     1 (threshold 1" in text
    assert "Marked USR-B good" in text
    assert "==> Done in" in text
