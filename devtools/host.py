"""A simulated host for tests, the demo and benchmarks: a GPT disk image with
USR-A/USR-B, provisioned with a first image in A, "booted" through the
firmware emulation, plus the agent's config, state dir and keyring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.diskimage import DiskLayout, PartitionSpec, make_disk_image
from devtools.espimage import ESP_LABEL, make_esp_disk
from partitions import bls, sdboot
from partitions.bootcontrol import SlotFlags
from partitions.booted import BootedSlotFinder
from partitions.filestore import FileStore
from partitions.firmware import boot_disk_image, kernel_cmdline
from partitions.gptprio import GptPrioBootControl
from partitions.mtools import MtoolsStore, fat_partition

LABELS = ("USR-A", "USR-B")


@dataclass(frozen=True)
class Host:
    root: Path
    disk: Path
    layout: DiskLayout
    cmdline: Path  # what the "firmware" booted, read as /proc/cmdline
    os_release: Path
    state_dir: Path
    config: Path

    def boot_control(self) -> GptPrioBootControl:
        return GptPrioBootControl(self.disk, LABELS, BootedSlotFinder(self.cmdline))

    def reboot(self) -> str:
        """Run the firmware emulation; return the label of the slot it booted."""
        return boot_disk_image(self.disk, LABELS, self.cmdline).slot.label

    def slot_bytes(self, label: str, length: int | None = None) -> bytes:
        part = self.layout.by_label(label)
        with self.disk.open("rb") as fh:
            fh.seek(part.offset)
            return fh.read(part.size if length is None else length)


def write_into(disk: Path, offset: int, image: Path) -> None:
    with disk.open("r+b") as out, image.open("rb") as src:
        out.seek(offset)
        while chunk := src.read(1024 * 1024):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def provision(
    root: Path,
    *,
    slot_size: int,
    first_image: Path,
    first_version: str,
    repo_url: str | None = None,
    keyring: Path | None = None,
    channel: str = "stable",
    extra_config: str = "",
    extra_partitions: Sequence[PartitionSpec] = (),
) -> Host:
    """Lay out a host under ``root`` whose slot A holds ``first_image`` and boots.

    ``extra_partitions`` follow the two slots on the disk, empty.
    """
    root.mkdir(parents=True, exist_ok=True)
    disk = root / "disk.img"
    layout = make_disk_image(disk, slot_size, LABELS, extra_partitions)
    write_into(disk, layout.by_label("USR-A").offset, first_image)
    cmdline = root / "cmdline"
    control = GptPrioBootControl(disk, LABELS, BootedSlotFinder(cmdline))
    a, b = (s.slot for s in control.slots())
    control.set_flags(
        {
            a: SlotFlags(priority=1, tries=0, successful=True),
            b: SlotFlags(priority=0, tries=0, successful=False),
        }
    )
    boot_disk_image(disk, LABELS, cmdline)
    os_release = root / "os-release"
    os_release.write_text(f"ID=updater-demo\nIMAGE_VERSION={first_version}\n")
    state_dir = root / "state"
    config = root / "updater.toml"
    host = Host(root, disk, layout, cmdline, os_release, state_dir, config)
    write_config(host, repo_url=repo_url, keyring=keyring, channel=channel, extra=extra_config)
    return host


def write_config(
    host: Host,
    *,
    repo_url: str | None,
    keyring: Path | None,
    channel: str = "stable",
    disk: str = "",
    extra: str = "",
) -> None:
    """The agent's config for ``host``; ``disk``: more ``[disk]`` keys, ``extra``: sections."""
    lines = ["[source]"]
    if repo_url is not None:
        lines.append(f'url = "{repo_url}"')
    lines.append(f'channel = "{channel}"')
    if keyring is not None:
        lines.append(f'keyring = ["{keyring}"]')
    lines += [
        "",
        "[disk]",
        f'device = "{host.disk}"',
        f'kernel_cmdline = "{host.cmdline}"',
        disk,
        "",
        "[agent]",
        f'state_dir = "{host.state_dir}"',
        f'os_release = "{host.os_release}"',
        f'reboot_sentinel = "{host.root / "reboot-required"}"',
        "",
        extra,
    ]
    host.config.write_text("\n".join(lines))


# ---- a host booted by systemd-boot, each slot with its own kernel on the ESP -------------------

# The entry of each slot points at that slot's own boot files: /USR-A/vmlinuz, /USR-B/vmlinuz.
SDBOOT_ENTRY = bls.EntryTemplate(
    title="Test OS ({label})",
    linux="/{label}/vmlinuz",
    initrd=("/{label}/initrd.img",),
    options="mount.usr=PARTUUID={partuuid} ro",
)


@dataclass(frozen=True)
class EspHost:
    """A :class:`Host` whose disk has an ESP (``EFI-SYSTEM``, FAT via mtools) and systemd-boot
    entries; USR-A holds the first image and its kernel and initrd are ``/USR-A/...``."""

    host: Host
    esp: MtoolsStore

    def boot_control(self) -> sdboot.SdBootControl:
        return sdboot.SdBootControl(
            self.esp,
            self.host.disk,
            LABELS,
            BootedSlotFinder(self.host.cmdline),
            entry=SDBOOT_ENTRY,
            efivars=self.host.root / "efivars",
        )

    def next_boot(self, disk: Path | None = None) -> str | None:
        """The slot systemd-boot would boot from ``disk`` (default: this host's) now."""
        return systemd_boot_choice(disk or self.host.disk, self.host.root / "efivars")


def systemd_boot_choice(disk: Path, efivars: Path) -> str | None:
    """What systemd-boot boots on ``disk``: the first entry it lists (one whose kernel
    exists) in its order, the label of its slot (None: no entry, or not a slot's)."""
    offset, _size = fat_partition(disk, ESP_LABEL)
    control = sdboot.SdBootControl(
        MtoolsStore(disk, offset), disk, LABELS, entry=SDBOOT_ENTRY, efivars=efivars
    )
    order = bls.boot_order(control.read_state().entries)
    return order[0].label if order else None


def provision_esp_host(
    root: Path,
    *,
    slot_size: int,
    first_image: Path,
    first_version: str,
    kernel: bytes,
    initrd: bytes,
    repo_url: str | None = None,
    keyring: Path | None = None,
    esp_size: int = 16 * 1024 * 1024,
) -> EspHost:
    """Lay out a systemd-boot host under ``root``: USR-A holds ``first_image``, boots
    ``/USR-A/vmlinuz`` + ``/USR-A/initrd.img`` (``kernel``, ``initrd``) and is good."""
    root.mkdir(parents=True, exist_ok=True)
    disk_path = root / "disk.img"
    disk = make_esp_disk(disk_path, slot_size, esp_size, LABELS)
    write_into(disk_path, disk.layout.by_label("USR-A").offset, first_image)
    esp = disk.esp
    esp.makedirs(bls.ENTRIES_DIR)
    esp.makedirs("USR-A")
    esp.write("USR-A/vmlinuz", kernel)
    esp.write("USR-A/initrd.img", initrd)
    (root / "efivars").mkdir()
    cmdline = root / "cmdline"
    os_release = root / "os-release"
    os_release.write_text(f"ID=updater-demo\nIMAGE_VERSION={first_version}\n")
    host = Host(
        root, disk_path, disk.layout, cmdline, os_release, root / "state", root / "updater.toml"
    )
    machine = EspHost(host, esp)
    a = machine.boot_control().slots()[0].slot
    cmdline.write_text(kernel_cmdline(a) + "\n")  # what systemd-boot's entry for A passes
    machine.boot_control().mark_good(a)
    initrds = ", ".join(f'"{i}"' for i in SDBOOT_ENTRY.initrd)
    write_config(
        host,
        repo_url=repo_url,
        keyring=keyring,
        disk=f'backend = "systemd-boot"\nesp_partition = "{ESP_LABEL}"\n',
        extra=(
            "[systemd-boot]\n"
            f'title = "{SDBOOT_ENTRY.title}"\n'
            f'linux = "{SDBOOT_ENTRY.linux}"\n'
            f"initrd = [{initrds}]\n"
            f'options = "{SDBOOT_ENTRY.options}"\n'
            f'efivars = "{root / "efivars"}"\n'
        ),
    )
    return machine


def esp_files(esp: FileStore, directory: str) -> dict[str, bytes]:
    """Every file in ``directory`` of the ESP and its bytes (hidden temporaries included)."""
    if not esp.exists(directory):
        return {}
    return {name: esp.read(f"{directory}/{name}") for name in esp.list(directory)}
