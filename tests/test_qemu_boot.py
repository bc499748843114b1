"""A real firmware and a real boot loader boot the slot the agent wrote.

QEMU (TCG) boots a GPT disk image: OVMF + systemd-boot, or SeaBIOS + GRUB;
Debian's cloud kernel; a busybox initramfs that mounts the slot named on the
kernel command line and prints ``CMDLINE ...`` and ``BOOTED <slot> <version>``
on the serial console. Between boots the agent runs on this side against the
same disk image through `updatectl`, handed the command line the guest printed
as its ``kernel_cmdline``, as it would read ``/proc/cmdline``. Every assertion
about which slot booted is about what the guest printed.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools import vm
from devtools.dbusdaemon import PrivateBus
from devtools.fake_logind import FakeLogindProcess
from devtools.fsimage import make_usr_image
from devtools.gpgkeys import SigningKey
from tests.conftest import HOST_SLOT_SIZE, USR_IMAGE_SIZE, CliResult, Repo, updatectl
from updater.errors import ExitCode

pytestmark = pytest.mark.xdist_group("serial")  # one worker, one at a time: tests/conftest.py

# ---- the pieces, without QEMU -------------------------------------------------------------------


def test_initramfs_is_a_newc_archive_cpio_reads(tmp_path: Path) -> None:
    initrd = vm.make_initramfs(tmp_path / "initrd.img")
    assert vm.make_initramfs(tmp_path / "again.img").read_bytes() == initrd.read_bytes()
    listing = subprocess.run(
        ["cpio", "-itv"],
        input=gzip.decompress(initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    lines = {line.split()[-1]: line for line in listing.splitlines() if "->" not in line}
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert "bin/sh -> busybox" in listing
    assert vm.BUSYBOX.stat().st_size == int(lines["bin/busybox"].split()[4])


def test_serial_log_is_parsed_as_bytes() -> None:
    serial = (
        b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: starting Boot0001\r\n"
        b"\x1b[H\x1b[Jgrub says hi\n\rCMDLINE initrd=\\initrd.img console=ttyS0 "
        b"mount.usr=PARTUUID=0a1b2c3d-0000-4000-8000-000000000001\r\n"
        b"[    2.1] some kernel line\r\n"
        b"BOOTED USR-B 1.1.0 partuuid=0a1b2c3d-0000-4000-8000-000000000001 slot=- "
        b"dev=/dev/nvme0n1p3\r\n"
        b"[    2.4] reboot: Power down\r\n\xff"
    )
    cmdline, booted, failure = vm.parse_serial(serial)
    assert cmdline == (
        "initrd=\\initrd.img console=ttyS0 mount.usr=PARTUUID=0a1b2c3d-0000-4000-8000-000000000001"
    )
    assert booted == vm.Booted("USR-B", "1.1.0", "0a1b2c3d-0000-4000-8000-000000000001", None)
    assert failure is None
    assert vm.parse_serial(b"CMDLINE x\r\nBOOT-FAILED no partition PARTUUID=y\r\n") == (
        "x",
        None,
        "no partition PARTUUID=y",
    )
    # The kernel echoes its own command line; only ours, at the start of a line, counts.
    assert vm.parse_serial(b"[0.0] Command line: CMDLINE x BOOTED A 1\r\n") == (None, None, None)


# ---- the machine ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vm_kernel() -> vm.Kernel:
    """Debian's cloud kernel: downloaded once per version into ~/.cache/updater-vm."""
    return vm.cloud_kernel()


@pytest.fixture(scope="session")
def vm_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vm.make_initramfs(tmp_path_factory.mktemp("vm") / "initrd.img")


@pytest.fixture(scope="session")
def usr_1_1_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fix for 1.1.0 (which rolled back, so the agent never installs it again)."""
    d = tmp_path_factory.mktemp("usr-1.1.1")
    return make_usr_image(d / "usr-1.1.1.img", "1.1.1", size=USR_IMAGE_SIZE, payload=2 << 20)


@pytest.fixture
def logind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLogindProcess]:
    """A private system bus with a logind that records reboots instead of doing them."""
    with (
        PrivateBus() as bus,
        FakeLogindProcess(bus.address, tmp_path / "logind.jsonl") as fake,
    ):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        yield fake


class Machine:
    """The scenario's view of a VmHost: boot it, run updatectl on it, read its ESP."""

    def __init__(self, vmhost: vm.VmHost, logs: Path, checks: Path) -> None:
        self.vm = vmhost
        self.host = vmhost.host
        self.logs = logs
        self.checks = checks  # [health] checks_dir
        self.boots: list[vm.BootLog] = []

    def boot(self) -> tuple[str, str]:
        """Power cycle; the (GPT label, version) the guest says it mounted."""
        n = len(self.boots) + 1
        result = self.vm.power_cycle(serial_log=self.logs / f"boot{n}.log")
        self.boots.append(result)
        booted = result.expect()
        # The boot loader named the partition the guest mounted, by PARTUUID.
        part = self.vm.disk.layout.by_label(booted.label)
        assert booted.part_uuid == str(part.part_uuid)
        assert result.cmdline is not None
        assert f"mount.usr=PARTUUID={part.part_uuid}" in result.cmdline.split()
        return booted.label, booted.version

    def updatectl(self, *args: str) -> CliResult:
        return updatectl(self.host, *args)

    def status(self) -> dict[str, Any]:
        r = self.updatectl("status", "--json")
        assert r.code == 0, r.err
        doc: dict[str, Any] = r.json()
        return doc

    def install(self, repo: Repo, version: str, image: Path) -> None:
        repo.publish(version, image)
        r = self.updatectl("check", "--install", "--json")
        assert r.code == 0, r.err
        assert r.json()["installed"] is True, r.out
        raw = image.read_bytes()
        assert self.host.slot_bytes(self.status()["primary"], len(raw)) == raw

    def failed_versions(self) -> list[str]:
        state = json.loads((self.host.state_dir / "state.json").read_bytes())
        return list(state["failed_versions"])

    def entries(self) -> list[str]:
        return vm.esp_list(self.vm.disk, "loader/entries")

    def grubenv(self) -> dict[str, str]:
        """The environment block as grub-editenv lists it (GRUB itself wrote part of it)."""
        block = self.vm.disk.path.with_name("grubenv.copy")
        block.write_bytes(vm.esp_read(self.vm.disk, vm.GRUBENV_PATH))
        out = subprocess.run(
            ["grub-editenv", str(block), "list"], capture_output=True, check=True, text=True
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture
def machine_factory(
    tmp_path: Path,
    repo: Repo,
    release_key: SigningKey,
    usr_images: dict[str, Path],
    vm_kernel: vm.Kernel,
    vm_initramfs: Path,
) -> Callable[[vm.Loader], Machine]:
    def make(loader: vm.Loader) -> Machine:
        checks = tmp_path / "health.d"
        checks.mkdir()
        vm.app_health_check(checks, tmp_path / "machine" / "os-release", broken="1.2.0")
        vmhost = vm.provision_vm_host(
            tmp_path / "machine",
            loader,
            kernel=vm_kernel.vmlinuz,
            initramfs=vm_initramfs,
            first_image=usr_images["1.0.0"],
            slot_size=HOST_SLOT_SIZE,
            repo_url=repo.url,
            keyring=release_key.public_key,
            extra_config=f'[health]\nchecks_dir = "{checks}"\n',
        )
        logs = tmp_path / "serial"
        logs.mkdir()
        return Machine(vmhost, logs, checks)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["systemd-boot", "grub"])
def test_the_boot_loader_boots_what_the_agent_wrote(
    loader: vm.Loader,
    machine_factory: Callable[[vm.Loader], Machine],
    repo: Repo,
    usr_images: dict[str, Path],
    usr_1_1_1: Path,
    logind: FakeLogindProcess,
) -> None:
    m = machine_factory(loader)
    started = time.monotonic()

    # A with 1.0.0 boots. (updater-mark-good.service runs on every healthy boot:
    # with grub-env the booted slot is on trial, TRY=1, until it does.)
    assert m.boot() == ("USR-A", "1.0.0")
    assert m.updatectl("mark-good").code == 0
    assert m.status()["state"] == "idle"

    # 1.1.0 into B, through the normal install path: B boots, once, on trial.
    m.install(repo, "1.1.0", usr_images["1.1.0"])
    assert m.status()["state"] == "update_staged"
    assert m.boot() == ("USR-B", "1.1.0")
    s = m.status()
    assert (s["booted"], s["booted_version"], s["state"]) == ("USR-B", "1.1.0", "trial_boot")
    if loader == "systemd-boot":
        # systemd-boot itself counted the try before booting: +1-0 became +0-1.
        assert "updater-USR-B+0-1.conf" in m.entries()
    else:
        # GRUB's save_env marked the try.
        env = m.grubenv()
        assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "1")

    # Not blessed: the next boot falls back to A, and the agent notices.
    assert m.boot() == ("USR-A", "1.0.0")
    assert m.updatectl("mark-good").code == 0
    check = m.updatectl("check", "--json").json()
    assert (check["version"], check["update_available"]) == ("1.1.0", False)
    assert m.failed_versions() == ["1.1.0"]

    # The fix, 1.1.1: boots on trial, is blessed, and keeps booting.
    m.install(repo, "1.1.1", usr_1_1_1)
    assert m.boot() == ("USR-B", "1.1.1")
    r = m.updatectl("mark-good", "--json")
    assert (r.code, r.json()) == (0, {"marked_good": "USR-B"})
    assert m.boot() == ("USR-B", "1.1.1")
    assert m.updatectl("mark-good").code == 0
    s = m.status()
    assert (s["booted"], s["booted_version"], s["state"]) == ("USR-B", "1.1.1", "idle")
    if loader == "systemd-boot":
        assert "updater-USR-B.conf" in m.entries()  # blessed: no counter

    # 1.2.0 into A; its health check fails: marked bad, a reboot is asked for,
    # and that reboot comes back on B.
    m.install(repo, "1.2.0", usr_images["1.2.0"])
    assert logind.reboots() == []
    assert m.boot() == ("USR-A", "1.2.0")
    r = m.updatectl("mark-good")
    assert r.code == ExitCode.HEALTH, r.err
    assert "10-app-responds" in r.err
    assert len(logind.reboots()) == 1
    if loader == "systemd-boot":
        assert "updater-USR-A+0-1.conf" in m.entries()  # spent by systemd-boot, left bad
    else:
        assert m.grubenv()["A_OK"] == "0"  # marked bad by the agent
    assert m.boot() == ("USR-B", "1.1.1")
    assert m.updatectl("mark-good").code == 0
    check = m.updatectl("check", "--json").json()
    assert (check["version"], check["update_available"]) == ("1.2.0", False)
    assert m.failed_versions() == ["1.1.0", "1.2.0"]
    s = m.status()
    assert (s["booted"], s["booted_version"], s["state"]) == ("USR-B", "1.1.1", "idle")

    seconds = [round(b.seconds, 1) for b in m.boots]
    print(f"{loader}: {len(seconds)} boots {seconds}, {time.monotonic() - started:.0f}s in all")


@pytest.mark.slow
def test_a_guest_that_hangs_is_killed_at_the_timeout(
    tmp_path: Path, vm_kernel: vm.Kernel, vm_initramfs: Path, usr_images: dict[str, Path]
) -> None:
    """No grubenv: no slot has OK=1, so GRUB stops at its prompt and waits for a person."""
    disk = vm.make_vm_disk(
        tmp_path / "disk.img",
        "grub",
        kernel=vm_kernel.vmlinuz,
        initramfs=vm_initramfs,
        slots={"USR-A": usr_images["1.0.0"], "USR-B": None},
        slot_size=HOST_SLOT_SIZE,
    )
    result = vm.boot(disk, timeout_s=6)
    assert result.timed_out and result.booted is None
    assert 6 <= result.seconds < 20
    assert "nothing to boot" in result.text() and "grub>" in result.text()
    with pytest.raises(vm.VmError, match="booted no slot"):
        result.expect()
    # QEMU is gone: nothing has the disk image open any more.
    holders = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(disk.path).encode() in _read(p / "cmdline")
    ]
    assert holders == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
