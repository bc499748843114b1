"""What ships in dist/: units pass systemd-analyze verify, the example config loads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from updater import config
from updater.run import run

DIST = Path(__file__).resolve().parent.parent / "dist"
UNITS = sorted(p for p in DIST.iterdir() if p.suffix in (".service", ".timer"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    updatectl = Path(sys.executable).with_name("updatectl")
    for u in UNITS:  # timers need their service beside them
        text = u.read_text().replace("/usr/bin/updatectl", str(updatectl))
        (tmp_path / u.name).write_text(text)
    done = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit.name)], check=False)
    problems = [
        line for line in done.stderr.decode().splitlines() if unit.name in line or "updater" in line
    ]
    assert done.returncode == 0 and not problems, done.stderr.decode()


def test_the_agent_unit() -> None:
    text = (DIST / "updater.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecStart=/usr/bin/updatectl agent"):
        assert line in text
    mark_good = (DIST / "updater-mark-good.service").read_text()
    assert "After=local-fs.target boot-complete.target" in mark_good


def test_the_fleetlock_server_unit() -> None:
    text = (DIST / "updater-fleetlockd.service").read_text()
    for line in (
        "Type=notify",
        "ExecStart=/usr/bin/updatectl fleetlock serve --log=auto $FLEETLOCK_OPTS",
        "Environment=FLEETLOCK_OPTS=--listen=127.0.0.1:3333",
        "EnvironmentFile=-/etc/updater/fleetlockd.env",
        "DynamicUser=yes",
    ):
        assert line in text


def test_dbus_policy_is_well_formed() -> None:
    policy = DIST / "dbus-1" / "system.d" / "org.updater.Agent1.conf"
    root = ElementTree.parse(policy).getroot()  # our own file, not network input
    assert root.tag == "busconfig"


def test_example_config_is_valid() -> None:
    cfg = config.load(DIST / "config.d" / "50-example.toml")
    assert cfg.source.url == "https://updates.example.com/os"
    assert cfg.disk.slots == ("USR-A", "USR-B")


def test_the_fleet_dashboard_unit() -> None:
    text = (DIST / "updater-fleet-serve.service").read_text()
    for line in (
        "Type=notify",
        "ExecStart=/usr/bin/updatectl fleet serve --log=auto $FLEET_SERVE_OPTS",
        "Environment=FLEET_SERVE_OPTS=--listen=127.0.0.1:9477",
        "EnvironmentFile=-/etc/updater/fleet-serve.env",
        "DynamicUser=yes",
    ):
        assert line in text
