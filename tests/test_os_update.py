"""The OS updates itself: the image of devtools/osimage.py booted under QEMU
(TCG, OVMF + systemd-boot), a real systemd, logind and journald inside, its
agent polling a repository served from this machine's loopback (10.0.2.2 in
the guest, given to it as the system credential ``updater.config``).

Every boot is a fresh QEMU with -no-reboot on the same disk and OVMF variables
(the guest's reboot ends QEMU). What is asserted comes from the guest's serial
console (devtools/osupdate.py): each boot's facts, the agent's journal events
as they are logged, ``updatectl status --json`` from a pre-reboot hook while an
update is staged and from a report unit once the agent has settled.

Scenario 1 is one machine's update (1.0.0 -> 1.1.0); scenario 3 is a second
machine whose power is cut mid-install. Scenario 2 (a release whose health
check fails, rolled back in the guest and never taken again) is the second
scenario of tests/test_os_fleet.py, where the rollback also stops the fleet.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import osimage, osupdate
from devtools.osupdate import World
from devtools.repo_server import RepoServer
from updater import config

pytestmark = pytest.mark.xdist_group("serial")  # one worker, one at a time: tests/conftest.py

VERSIONS = ("1.0.0", "1.1.0")
TIMES: dict[str, float] = {}  # what each scenario took, printed at the end


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap --mode=root needs root")
    try:
        with osupdate.test_world(VERSIONS, "os-update-", TIMES) as w:
            yield w
    finally:
        print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items()))


@dataclass
class Fleet:
    """A repository on loopback and a machine polling it."""

    repo: Path
    server: RepoServer
    machine: osupdate.Machine

    def publish(self, world: World, version: str) -> None:
        osupdate.publish(self.repo, world.images[version], world.key)


@contextlib.contextmanager
def fleet(world: World, name: str) -> Iterator[Fleet]:
    repo = world.tmp / name / "repo"
    repo.mkdir(parents=True)
    with RepoServer(repo) as server:
        port = server.url.rsplit(":", 1)[1]
        url = f"http://{osupdate.GUEST_HOST}:{port}"
        machine = osupdate.Machine.create(world.tmp / name, world.images["1.0.0"], url)
        yield Fleet(repo, server, machine)


@pytest.fixture(scope="module")
def life(world: World) -> Iterator[Fleet]:
    """Scenario 1: one machine, from 1.0.0 on."""
    with fleet(world, "life") as f:
        yield f


def booted(machine: osupdate.Machine, watch: osimage.Watcher | None = None) -> osupdate.Boot:
    boot = machine.boot(watch=watch)
    print(f"\n{machine.workdir.name} {boot.summary(brief=True)}")  # pytest -s shows it
    return boot


def agent_events(boot: osupdate.Boot, unit: str = "updater") -> list[osupdate.Event]:
    return [e for e in boot.events if e.unit == unit]


def in_order(names: list[str], wanted: list[str]) -> bool:
    """``wanted`` is a subsequence of ``names``."""
    it = iter(names)
    return all(any(n == w for n in it) for w in wanted)


def why(boot: osupdate.Boot) -> str:
    return f"\n{boot.summary()}\n--- console tail:\n{boot.log.tail(40)}"


def assert_installs_and_reboots(boot: osupdate.Boot, version: str, slot: str) -> None:
    """The agent checked, installed ``version`` into ``slot``, staged it and rebooted."""
    names = [e.name for e in agent_events(boot)]
    assert in_order(
        names,
        ["agent_started", "update_checked", "install_started", "image_written",
         "update_staged", "reboot_requested"],
    ), why(boot)  # fmt: skip
    started = next(e for e in agent_events(boot) if e.name == "install_started")
    assert (started.field("version"), started.field("slot")) == (version, slot)
    # through the guest's logind (the kernel's restart ended QEMU: -no-reboot)
    assert any(
        e.name == "reboot_requested" and e.field("method") == "RebootWithFlags"
        for e in agent_events(boot)
    ), why(boot)
    assert boot.ended == "reboot", why(boot)
    # The pre-reboot hook, while the update was staged:
    assert boot.staged.get("reboot-required") == "yes", why(boot)
    # Type=notify and active: READY=1 reached systemd
    assert sorted(boot.staged.get("updater", "").split()) == ["active", "notify", "running"]
    staged = boot.staged_status()
    assert staged["state"] == "update_staged", staged
    agent = staged["agent"]
    assert isinstance(agent, dict)
    assert (agent["state"], agent["staged_version"]) == ("UPDATED_NEED_REBOOT", version)
    assert staged["primary"] == slot
    assert "reboot" in boot.staged.get("status-text", "").lower(), boot.staged


def assert_settled(boot: osupdate.Boot) -> dict[str, object]:
    assert boot.report.get("settled") == "yes", why(boot)
    assert boot.ended == "poweroff", why(boot)
    assert boot.report["failed"] == "", why(boot)
    return boot.status()


@pytest.mark.slow
@pytest.mark.root
def test_1_the_agent_installs_the_release_reboots_and_blesses_the_new_slot(
    world: World, life: Fleet
) -> None:
    started = time.monotonic()
    life.publish(world, "1.1.0")
    first = booted(life.machine)
    assert (first.slot, first.version) == ("ROOT-A", "1.0.0"), why(first)
    # systemd-boot's choice (it lowercases entry ids): the good entry, no counter
    assert first.facts["entry"] == "updater-root-a.conf", first.facts
    assert_installs_and_reboots(first, "1.1.0", "ROOT-B")
    image = world.images["1.1.0"]
    assert any(r.path == "/images/1.1.0/root.ext4.zst" for r in life.server.requests)

    second = booted(life.machine)
    assert (second.slot, second.version) == ("ROOT-B", "1.1.0"), why(second)
    assert second.facts["entry"].startswith("updater-root-b+"), second.facts  # on trial
    assert "initrd=\\ROOT-B\\initrd.img" in second.facts["cmdline"]  # the slot's own files
    assert second.facts["kernel"] == image.kernel_release
    assert second.facts["initrd-version"] == "1.1.0"  # the release's own boot files ran
    assert first.facts["initrd-version"] == "1.0.0"
    # updater-mark-good.service: after boot-complete.target, health checks, blessed
    r = second.report
    assert 0 < int(r["boot-complete-at"]) <= int(r["mark-good-at"]), r
    assert "marked_good" in [e.name for e in agent_events(second, "updater-mark-good")], why(second)
    status = assert_settled(second)
    assert status["booted"] == "ROOT-B" and status["booted_version"] == "1.1.0", status
    slots = {s["label"]: s for s in status["slots"]}  # type: ignore[attr-defined]
    assert slots["ROOT-B"]["condition"] == "good" and slots["ROOT-B"]["primary"], slots
    assert slots["ROOT-A"]["version"] == "1.0.0", slots  # the fallback, untouched
    agent = status["agent"]
    assert isinstance(agent, dict)
    assert agent["state"] == "IDLE" and agent["booted_version"] == "1.1.0", agent
    assert_inside_the_guest(second)
    TIMES["scenario 1"] = time.monotonic() - started


def assert_inside_the_guest(boot: osupdate.Boot) -> None:
    """Scenario 4: what a person on the machine sees, as the report unit saw it."""
    r = boot.report
    # journalctl -u updater EVENT=update_checked: the agent's structured events
    assert int(r["journal-update-checked"]) >= 1, r
    # systemctl show -p StatusText updater: the state in the agent's own words
    assert r["status-text"].startswith("Idle, booted "), r
    # busctl as user nobody: State is readable, CheckNow refused by the bus policy
    assert r["nobody-state"] == '0 s "IDLE"', r
    rc, _, message = r["nobody-checknow"].partition(" ")
    assert rc != "0" and "Access denied" in message, r
    # the watchdog: pinged since READY (WatchdogSec=30s in the test image)
    assert r["watchdog-usec"] == "30s"
    assert int(r["watchdog-at"]) > int(r["ready-at"]) > 0, r
    # coreos_compat = true (in the credential): update_engine's GetStatus answers
    rc, _, answer = r["coreos-getstatus"].partition(" ")
    assert rc == "0" and "UPDATE_STATUS_IDLE" in answer, r


@pytest.mark.slow
@pytest.mark.root
def test_3_a_power_cut_mid_install_boots_the_old_slot_and_the_install_completes(
    world: World,
) -> None:
    started = time.monotonic()
    with fleet(world, "power-cut") as f:
        f.publish(world, "1.1.0")
        # ~8 s into a ~25 s download and write (two virtual CPUs under TCG)
        cut = booted(f.machine, watch=osupdate.cut_power_after("state=DOWNLOADING", 8.0))
        assert cut.ended == "power cut", why(cut)
        names = [e.name for e in agent_events(cut)]
        assert "install_started" in names and "image_written" not in names, why(cut)

        after = booted(f.machine)
        assert (after.slot, after.version) == ("ROOT-A", "1.0.0"), why(after)
        assert after.facts["entry"] == "updater-root-a.conf", after.facts
        agent = next(e for e in agent_events(after) if e.name == "agent_started")
        assert agent.field("resume") == "work_interrupted", why(after)  # it knew
        assert_installs_and_reboots(after, "1.1.0", "ROOT-B")
    TIMES["scenario 3"] = time.monotonic() - started


def test_the_console_parser() -> None:
    """The host's reading of a console (no VM): BOOT, EVENT, STAGED and REPORT lines."""
    console = (
        b"\x1b[0m[  OK  ] Started x.\r\n"
        b"BOOT slot=ROOT-B\r\nBOOT version=1.1.0\n"
        b'EVENT updater update_checked version=1.2.0 failed_before=true note="a b=c"\n'
        b"EVENT updater-mark-good marked_good slot=ROOT-B\n"
        b'STAGED status={"state":"update_staged"}\n'
        b"REPORT settled=yes\n[  123.4] reboot: Power down\n"
    )
    boot = osupdate.parse_boot(1, osimage.BootLog(console, 1.0, 0))
    assert (boot.slot, boot.version, boot.ended) == ("ROOT-B", "1.1.0", "poweroff")
    assert [(e.unit, e.name) for e in boot.events] == [
        ("updater", "update_checked"),
        ("updater-mark-good", "marked_good"),
    ]
    checked = boot.events[0]
    assert checked.field("version") == "1.2.0" and checked.field("note") == "a b=c"
    assert checked.field("missing") is None
    assert boot.staged_status() == {"state": "update_staged"}
    assert boot.report == {"settled": "yes"}


def test_the_credential_is_a_config_drop_in_the_agent_accepts(tmp_path: Path) -> None:
    dropin = tmp_path / "60-credential.toml"
    dropin.write_bytes(osupdate.agent_config("http://10.0.2.2:8080"))
    vendor = tmp_path / "10-image.toml"
    vendor.write_text(osimage.vendor_config(osimage.ImageConfig(keyring=b"k")))
    cfg = config.load(None, dirs=[tmp_path])
    assert cfg.source.url == "http://10.0.2.2:8080"
    assert cfg.agent.coreos_compat and cfg.agent.first_check_delay_s < 10
    assert cfg.disk.slots == osimage.SLOT_LABELS  # the image's own settings still hold
    argv = osimage.qemu_argv(
        Path("d"), serial="file:s", vars_file=Path("v"), uuid=uuid.UUID(int=1),
        credentials={"updater.config": b"[a]\nb = 1,2\n"},
    )  # fmt: skip
    smbios = argv[argv.index("-smbios") + 1]
    assert smbios == "type=11,value=io.systemd.credential.binary:updater.config=W2FdCmIgPSAxLDIK"


def test_a_watcher_sees_each_console_line_then_a_tick(tmp_path: Path) -> None:
    serial = tmp_path / "serial"
    serial.write_bytes(b"\x1b[0mone\r\nEVENT updater state_changed state=DOWNLOADING\npart")
    seen: list[str] = []

    def watch(line: str) -> bool:
        seen.append(line)
        return False

    feed = osimage.LineFeed(serial, watch)
    assert not feed.poll()
    assert seen == ["one", "EVENT updater state_changed state=DOWNLOADING", ""]
    with serial.open("ab") as fh:
        fh.write(b"ial\n")
    feed.poll(final=True)
    assert seen[-1] == "partial"
    # the plug is pulled on a tick once the delay has passed, with no new line
    cut = osupdate.cut_power_after("state=DOWNLOADING", 0.3)
    timed = osimage.LineFeed(serial, cut)
    assert not timed.poll()
    time.sleep(0.35)
    assert timed.poll()
