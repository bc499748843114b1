"""`make demo-vm`: watch a real firmware and boot loader pick the slot the agent wrote.

QEMU (TCG: no KVM needed) boots a GPT disk image through OVMF and systemd-boot
(``--loader grub``: SeaBIOS and GRUB) into Debian's cloud kernel and a busybox
initramfs that mounts the slot named on its kernel command line and says which
one it got. Between boots `updatectl` runs here against the same disk image,
handed the command line the guest printed, as it would read /proc/cmdline.

The story: 1.0.0 boots from USR-A; 1.1.0 goes into USR-B and boots once, on
trial; nobody blesses it, so the next boot is USR-A again; the fix 1.1.1 boots,
is blessed and stays; 1.2.0 fails its health check, is marked bad, and the
reboot comes back on USR-B. Seven boots of 4-8 s each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from devtools import vm
from devtools.dbusdaemon import PrivateBus
from devtools.fake_logind import FakeLogindProcess
from devtools.fsimage import make_usr_image
from devtools.gpgkeys import SigningKey, signing_key
from devtools.repo_server import RepoServer
from updater import cli
from updater.log import configure

SLOT_SIZE = 32 * 1024 * 1024  # bytes
IMAGE_SIZE = 16 * 1024 * 1024  # bytes
VERSIONS = ("1.0.0", "1.1.0", "1.1.1", "1.2.0")


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def note(text: str) -> None:
    print(f"  {text}", flush=True)


class Demo:
    def __init__(self, work: Path, loader: vm.Loader, machine: vm.VmHost) -> None:
        self.work = work
        self.loader = loader
        self.machine = machine
        self.boots = 0

    def updatectl(self, *args: str) -> int:
        config = [] if args[0] == "release" else ["--config", str(self.machine.host.config)]
        argv = [*config, *args]
        print(f"$ updatectl {' '.join(argv)}", flush=True)
        code = cli.main(argv)
        sys.stdout.flush()
        if code:
            note(f"(exit status {code})")
        return code

    def show_boot_state(self) -> None:
        disk = self.machine.disk
        if self.loader == "systemd-boot":
            names = vm.esp_list(disk, "loader/entries")
            note(f"ESP loader/entries/: {'  '.join(names) or '(empty)'}")
        else:
            text = vm.esp_read(disk, vm.GRUBENV_PATH).decode()
            wanted = ("ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY")
            found = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            note("grub/grubenv: " + "  ".join(f"{k}={found.get(k, '')}" for k in wanted))

    def boot(self) -> vm.Booted:
        self.boots += 1
        chain = (
            "OVMF -> systemd-boot -> Linux -> /init"
            if self.loader == "systemd-boot"
            else "SeaBIOS -> GRUB -> Linux -> /init"
        )
        say(f"Boot {self.boots}: power on ({chain})")
        self.show_boot_state()
        log_path = self.work / f"serial-boot{self.boots}.log"
        result = self.machine.power_cycle(serial_log=log_path)
        print(f"  --- serial console ({log_path.name}) ---")
        for line in result.text().splitlines():
            if line.strip():
                print(f"  | {line}")
        booted = result.expect()
        print(f"  --- powered off after {result.seconds:.1f}s ---")
        note(f"the guest mounted {booted.label} and read version {booted.version}")
        self.show_boot_state()
        return booted


@contextlib.contextmanager
def private_logind(work: Path) -> Iterator[FakeLogindProcess]:
    """A system bus of our own whose logind records reboots: never this machine's."""
    with (
        PrivateBus() as bus,
        FakeLogindProcess(bus.address, work / "logind.jsonl") as logind,
        mock.patch.dict(os.environ, bus.env()),
    ):
        yield logind


def make_images(work: Path) -> dict[str, Path]:
    say("The vendor's builds 1.0.0, 1.1.0, 1.1.1 and 1.2.0: ext4 images that carry their version")
    return {
        v: make_usr_image(work / f"usr-{v}.img", v, size=IMAGE_SIZE, payload=4 * 1024 * 1024)
        for v in VERSIONS
    }


def release(demo: Demo, repo: Path, key: SigningKey, version: str, image: Path) -> None:
    say(f"The vendor publishes {version}")
    demo.updatectl(
        "release",
        "--image", str(image),
        "--version", version,
        "--repo", str(repo),
        "--gnupghome", str(key.gnupghome),
        "--key", key.fingerprint,
    )  # fmt: skip


def run_demo(work: Path, loader: vm.Loader) -> None:
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    say("Debian's cloud kernel (downloaded once, then cached)")
    kernel = vm.cloud_kernel()
    note(f"{kernel.package} {kernel.version}: {kernel.vmlinuz}")
    initramfs = vm.make_initramfs(work / "initrd.img")
    note(
        f"initramfs {initramfs.name}: busybox and an /init that mounts the slot named by "
        "mount.usr=PARTUUID=..., prints CMDLINE and BOOTED lines, and powers off"
    )
    images = make_images(work)
    repo = work / "repo"
    repo.mkdir()
    with (
        signing_key(work / "publisher-gnupg", "updater demo <release@localhost>") as key,
        RepoServer(repo) as server,
        private_logind(work) as logind,
    ):
        note(f"release signing key {key.fingerprint} (throwaway); repository {server.url}")
        checks = work / "health.d"
        checks.mkdir()
        check = vm.app_health_check(checks, work / "machine" / "os-release", broken="1.2.0")
        note(f"health check {check.name}: the app answers (except on 1.2.0, which broke it)")
        say(f"A machine: a GPT disk with an ESP, USR-A (1.0.0) and an empty USR-B ({loader})")
        machine = vm.provision_vm_host(
            work / "machine",
            loader,
            kernel=kernel.vmlinuz,
            initramfs=initramfs,
            first_image=images["1.0.0"],
            slot_size=SLOT_SIZE,
            repo_url=server.url,
            keyring=key.public_key,
            extra_config=f'[health]\nchecks_dir = "{checks}"\n',
        )
        for p in machine.disk.layout.partitions:
            note(f"partition {p.index} {p.label:10} {p.size >> 20:3} MiB  PARTUUID {p.part_uuid}")
        if loader == "systemd-boot":
            entry = vm.esp_read(machine.disk, "loader/entries/updater-USR-A.conf").decode()
            note("loader/entries/updater-USR-A.conf:")
            for line in entry.splitlines():
                note(f"  {line}")
        demo = Demo(work, loader, machine)
        demo.boot()
        say("Healthy: updater-mark-good.service runs `updatectl mark-good` on every boot")
        demo.updatectl("mark-good")
        demo.updatectl("status")

        release(demo, repo, key, "1.1.0", images["1.1.0"])
        say("The agent installs it into USR-B and makes it the next boot, on trial")
        demo.updatectl("check", "--install")
        demo.show_boot_state()
        demo.boot()
        demo.updatectl("status")
        say("Nobody blesses 1.1.0 (it hangs before mark-good): power-cycle")
        demo.boot()
        demo.updatectl("mark-good")
        say("The agent notices the rollback and never offers 1.1.0 again")
        demo.updatectl("check")

        release(demo, repo, key, "1.1.1", images["1.1.1"])
        demo.updatectl("check", "--install")
        demo.boot()
        say("1.1.1 is healthy: mark-good keeps it")
        demo.updatectl("mark-good")
        demo.boot()
        demo.updatectl("mark-good")
        demo.updatectl("status")

        release(demo, repo, key, "1.2.0", images["1.2.0"])
        demo.updatectl("check", "--install")
        demo.boot()
        say("1.2.0's health check fails: mark-good marks it bad and asks for a reboot")
        demo.updatectl("mark-good")
        note(f"logind was asked to reboot {len(logind.reboots())} time(s) (a fake one)")
        demo.boot()
        say("Back on USR-B with 1.1.1, healthy; 1.2.0 is never offered again")
        demo.updatectl("mark-good")
        demo.updatectl("check")
        demo.updatectl("status")
    say(f"Done in {time.monotonic() - t0:.0f}s, {demo.boots} boots. Everything is under {work}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("demo-run") / "vm")
    p.add_argument("--loader", choices=["systemd-boot", "grub"], default="systemd-boot")
    args = p.parse_args()
    configure()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    run_demo(args.workdir.resolve(), args.loader)


if __name__ == "__main__":
    main()
