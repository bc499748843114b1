"""A simulated host for tests, the demo and benchmarks: a GPT disk image with
USR-A/USR-B, provisioned with a first image in A, "booted" through the
firmware emulation, plus the agent's config, state dir and keyring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.diskimage import DiskLayout, PartitionSpec, make_disk_image
from partitions.bootcontrol import SlotFlags
from partitions.firmware import boot_disk_image
from partitions.gptprio import GptPrioBootControl

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
        return GptPrioBootControl(self.disk, LABELS, self.cmdline)

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
    control = GptPrioBootControl(disk, LABELS, cmdline)
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
