"""Boot a disk image for real: QEMU, a real firmware, a real boot loader, a real kernel.

For tests and the demo only. The pieces:

- :func:`cloud_kernel`: ``vmlinuz`` from Debian's ``linux-image-*-cloud-amd64``
  package (the ABI package ``linux-image-cloud-amd64`` depends on today),
  fetched once with ``apt-get download`` and cached by package and version.
  It has ext4 and NVMe built in, so the initramfs needs no modules.
- :func:`make_initramfs`: busybox and an ``/init`` (:data:`INIT_SCRIPT`) that
  mounts the slot the boot loader named on the kernel command line, prints
  ``CMDLINE <its /proc/cmdline>`` and ``BOOTED <GPT label> <version>`` on the
  serial console, and powers off. The archive is newc cpio written here, with
  ``/dev/console`` as an entry (no mknod, no root).
- :func:`make_vm_disk`: a GPT image with an ESP (FAT made with ``mformat``,
  filled with mtools) holding the kernel and initramfs, the A/B slots holding
  real ext4 images, and the boot loader: systemd-boot as the removable-media
  path ``EFI/BOOT/BOOTX64.EFI`` for OVMF, or GRUB's ``boot.img`` in the MBR and
  ``core.img`` in a BIOS boot partition for SeaBIOS.
- :func:`boot`: one power cycle under QEMU (TCG) and ``timeout``, with a fresh
  copy of OVMF's variable store; what the guest printed, parsed as bytes
  (firmware output is full of ANSI escapes).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

import structlog

from devtools.diskimage import (
    COREOS_USR_TYPE,
    DiskLayout,
    PartitionLayout,
    PartitionSpec,
    image_size,
    partition,
    read_layout,
)
from devtools.espimage import EFI_SYSTEM_TYPE, ESP_LABEL, format_fat
from devtools.host import Host, write_config, write_into
from partitions.bls import EntryTemplate
from partitions.bootcontrol import BootControl
from partitions.grubenv import new_env_block
from partitions.mtools import MtoolsStore
from updater import compose, config
from updater.errors import CommandError
from updater.run import Runner, run

log = structlog.get_logger(__name__)

Loader = Literal["systemd-boot", "grub"]
Firmware = Literal["ovmf", "seabios"]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "updater-vm"
CACHE_ENV = "UPDATER_VM_CACHE"  # overrides DEFAULT_CACHE_DIR
# What the initramfs relies on being built into the kernel (no modules are loaded).
REQUIRED_KERNEL_CONFIG = (
    "CONFIG_EXT4_FS=y",
    "CONFIG_BLK_DEV_NVME=y",
    "CONFIG_SERIAL_8250_CONSOLE=y",
)

BUSYBOX = Path("/bin/busybox")
GRUB_FRAGMENT = Path(__file__).resolve().parent.parent / "dist" / "grub" / "updater.cfg"
SYSTEMD_BOOT_EFI = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

BIOS_BOOT_TYPE = UUID("21686148-6449-6e6f-744e-656564454649")
BIOS_BOOT_LABEL = "BIOS-BOOT"
SLOT_LABELS = ("USR-A", "USR-B")
ESP_SIZE = 64 * 1024 * 1024  # bytes; the cloud kernel alone is ~14 MiB
BIOS_BOOT_SIZE = 1024 * 1024  # bytes; GRUB's core.img is ~100 KiB
SECTOR = 512  # bytes

# Where the boot files live on the ESP (what boot entries and grub.cfg name).
KERNEL_PATH = "/vmlinuz"
INITRD_PATH = "/initrd.img"
# Kernel parameters every boot needs here: the console QEMU records, and on a
# panic an immediate reboot, which -no-reboot turns into QEMU exiting.
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet"

# GRUB modules built into core.img: enough to read a GPT and FAT, run our
# grub.cfg (environment block, tests, echo) and boot a Linux kernel.
GRUB_MODULES = (
    "biosdisk",
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "normal",
    "configfile",
    "eval",
    "linux",
    "echo",
    "test",
    "loadenv",
    "cat",
    "search",
    "search_label",
    "search_fs_uuid",
    "regexp",
    "sleep",
    "true",
    "halt",
    "reboot",
    "serial",
    "terminal",
    "terminfo",
)
# Built into core.img and run before grub.cfg: GRUB's own messages (and our
# grub.cfg's echo lines) go to the serial port QEMU records, on lines wider
# than a VT100's 80 columns (a PARTUUID line would wrap).
GRUB_EARLY_CFG = (
    "serial --unit=0 --speed=115200\n"
    "terminal_input serial\n"
    "terminal_output serial\n"
    "terminfo -g 200x50 serial\n"
)
GRUB_KERNEL_SECTOR_OFFSET = 0x5C  # boot.img: u64 LBA of core.img's first sector
GRUB_BOOT_CODE_SIZE = 440  # bytes of boot.img that go into the MBR (the rest is the table)
GRUB_BLOCKLIST_SIZE = 12  # diskboot.img ends in {u64 start, u16 len, u16 segment}


class VmError(RuntimeError):
    """The VM could not be prepared or run (not: the guest booted the wrong slot)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.hint = hint


# ---- the kernel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # the Debian package version, e.g. 6.1.192-2
    vmlinuz: Path


def cache_dir() -> Path:
    """``$UPDATER_VM_CACHE``, else ``~/.cache/updater-vm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE_DIR


def kernel_package(*, runner: Runner = run) -> tuple[str, str]:
    """The current cloud kernel ABI package and its candidate version, as apt sees them."""
    try:
        depends = runner(["apt-cache", "depends", KERNEL_META_PACKAGE]).text
    except CommandError as exc:
        raise VmError(
            f"apt-cache cannot resolve {KERNEL_META_PACKAGE}: {exc.message}",
            hint="run `apt-get update` (Debian's package lists are needed once)",
        ) from None
    found = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", depends)
    if found is None:
        raise VmError(f"{KERNEL_META_PACKAGE} depends on no cloud kernel:\n{depends}")
    package = found.group(1)
    show = runner(["apt-cache", "show", "--no-all-versions", package]).text
    version = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if version is None:
        raise VmError(f"apt-cache show {package} names no version")
    return package, version.group(1)


def cloud_kernel(cache: Path | None = None, *, runner: Runner = run) -> Kernel:
    """Debian's cloud kernel, downloaded once per package version into ``cache``.

    Only ``vmlinuz`` is kept (~14 MiB); the .deb (~27 MiB) and its modules are
    deleted once it is extracted.
    """
    cache = cache or cache_dir()
    package, version = kernel_package(runner=runner)
    entry = cache / f"{package}_{version}"
    vmlinuz = entry / "vmlinuz"
    if vmlinuz.is_file():
        return Kernel(package, version, vmlinuz)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=cache) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user writes the download when we are root
        # apt-get download writes into the working directory; env -C sets it for the child
        runner(["env", "-C", str(work), "apt-get", "download", f"{package}={version}"], timeout=600)
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise VmError(f"apt-get download {package}={version} left {debs}")
        tree = work / "tree"
        runner(["dpkg-deb", "-x", str(debs[0]), str(tree)], timeout=300)
        images = sorted((tree / "boot").glob("vmlinuz-*"))
        configs = sorted((tree / "boot").glob("config-*"))
        if len(images) != 1 or len(configs) != 1:
            raise VmError(f"{debs[0].name} holds {images} and {configs}, not one kernel")
        config = configs[0].read_text().splitlines()
        missing = [c for c in REQUIRED_KERNEL_CONFIG if c not in config]
        if missing:
            raise VmError(
                f"{package} {version} lacks {', '.join(missing)}: the initramfs loads no modules",
                hint="add the modules to devtools/vm.py's initramfs, or pin an older kernel",
            )
        staged = work / "entry"
        staged.mkdir()
        shutil.move(images[0], staged / "vmlinuz")
        shutil.move(configs[0], staged / "config")
        (staged / "package").write_text(f"{debs[0].name}\n")
        try:
            staged.rename(entry)
        except OSError:
            if not vmlinuz.is_file():  # another process cached it meanwhile: fine
                raise
    log.info(
        "kernel_cached",
        package=package,
        version=version,
        path=str(vmlinuz),
        seconds=round(time.monotonic() - started, 1),
    )
    return Kernel(package, version, vmlinuz)


# ---- the initramfs ----------------------------------------------------------------------------

# Runs as PID 1 under busybox sh. Lines it prints that the host parses start
# with CMDLINE, BOOTED or BOOT-FAILED at the start of a line.
INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "BOOT-FAILED $*"
    poweroff -f
}

printf 'CMDLINE '
cat /proc/cmdline

mount_usr= usr= root= slot=
for word in $(cat /proc/cmdline); do
    case "$word" in
        --) break ;;
        mount.usr=*) mount_usr=${word#mount.usr=} ;;
        usr=*) usr=${word#usr=} ;;
        root=*) root=${word#root=} ;;
        updater.slot=*) slot=${word#updater.slot=} ;;
    esac
done
spec=${mount_usr:-${usr:-$root}}
[ -n "$spec" ] || fail "no mount.usr=, usr= or root= on the command line"

lower() { echo "$1" | tr 'A-F' 'a-f'; }

# An unsigned little-endian integer of $3 bytes at byte $2 of device $1.
read_uint() {
    dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null | od -A n -t "u$3" | tr -d ' \n'
}

# The PARTUUID of partition number $2 of disk $1, read from the GPT itself:
# this kernel's uevent names a partition's PARTNAME but not its PARTUUID.
gpt_partuuid() {
    disk=/dev/$1
    sector=$(cat "/sys/block/$1/queue/logical_block_size")
    [ "$(dd if="$disk" bs=1 skip="$sector" count=8 2>/dev/null)" = "EFI PART" ] || return
    entries=$(read_uint "$disk" $((sector + 72)) 8)
    size=$(read_uint "$disk" $((sector + 84)) 4)
    at=$((entries * sector + ($2 - 1) * size + 16))
    h=$(dd if="$disk" bs=1 skip="$at" count=16 2>/dev/null | od -A n -t x1 | tr -d ' \n')
    # the first three fields of a GUID are stored little-endian
    printf '%s-%s-%s-%s-%s\n' "${h:6:2}${h:4:2}${h:2:2}${h:0:2}" "${h:10:2}${h:8:2}" \
        "${h:14:2}${h:12:2}" "${h:16:4}" "${h:20:12}"
}

# $1's value in a uevent file $2 (PARTN, PARTNAME, DEVNAME, ...).
uevent_value() { sed -n "s/^$1=//p" "$2"; }

partuuid_of() {  # $1: a partition's kernel name
    disk=$(basename "$(readlink -f "/sys/class/block/$1/..")")
    gpt_partuuid "$disk" "$(uevent_value PARTN "/sys/class/block/$1/uevent")"
}

# The device of a partition named by PARTUUID or PARTLABEL (or a /dev path).
find_partition() {
    case "$1" in
        PARTUUID=*) key=PARTUUID want=$(lower "${1#PARTUUID=}") ;;
        /dev/disk/by-partuuid/*) key=PARTUUID want=$(lower "${1#/dev/disk/by-partuuid/}") ;;
        PARTLABEL=*) key=PARTNAME want=${1#PARTLABEL=} ;;
        /dev/disk/by-partlabel/*) key=PARTNAME want=${1#/dev/disk/by-partlabel/} ;;
        /dev/*) [ -b "$1" ] && echo "$1"; return ;;
        *) return ;;
    esac
    for uevent in /sys/class/block/*/uevent; do
        [ "$(uevent_value DEVTYPE "$uevent")" = partition ] || continue
        name=$(uevent_value DEVNAME "$uevent")
        if [ "$key" = PARTUUID ]; then
            value=$(partuuid_of "$name")
        else
            value=$(uevent_value PARTNAME "$uevent")
        fi
        if [ -n "$value" ] && [ "$value" = "$want" ]; then
            echo "/dev/$name"
            return
        fi
    done
}

dev=
tries=0
while [ -z "$dev" ] && [ "$tries" -lt 100 ]; do
    dev=$(find_partition "$spec")
    [ -n "$dev" ] || { sleep 0.1; tries=$((tries + 1)); }
done
[ -n "$dev" ] || fail "no partition $spec (block devices: $(ls /sys/class/block | tr '\n' ' '))"

mkdir -p /usr
mount -t ext4 -o ro "$dev" /usr || fail "cannot mount $dev ($spec)"
version=$(sed -n 's/^IMAGE_VERSION=//p' /usr/lib/os-release)
name=${dev#/dev/}
label=$(uevent_value PARTNAME "/sys/class/block/$name/uevent")
partuuid=$(partuuid_of "$name")
echo "BOOTED ${label:-$dev} ${version:-unknown}" \
    "partuuid=${partuuid:-unknown} slot=${slot:--} dev=$dev"
umount /usr
poweroff -f
"""


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading slash
    mode: int  # st_mode: type and permission bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # major, minor of a device node


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio archive in the kernel's "newc" format (SVR4 without CRC); owner root, mtime 0."""
    out = io.BytesIO()

    def pad() -> None:
        out.write(b"\0" * (-out.tell() % 4))

    def member(ino: int, e: CpioEntry) -> None:
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        out.write(e.data)
        pad()

    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(0, CpioEntry("TRAILER!!!", 0))
    return out.getvalue()


def initramfs_entries(busybox: Path = BUSYBOX, init: str = INIT_SCRIPT) -> list[CpioEntry]:
    directory = 0o040755
    return [
        *(CpioEntry(d, directory) for d in ("bin", "dev", "proc", "sys", "usr", "tmp")),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("bin/sh", 0o120777, b"busybox"),  # the rest are linked by /init itself
        CpioEntry("init", 0o100755, init.encode()),
    ]


def make_initramfs(path: Path, busybox: Path = BUSYBOX) -> Path:
    """A gzip'd newc initramfs with busybox and :data:`INIT_SCRIPT` (deterministic bytes)."""
    if not busybox.is_file():
        raise VmError(f"{busybox} is missing", hint="apt-get install busybox-static")
    archive = newc_archive(initramfs_entries(busybox))
    path.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
    return path


# ---- the disk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmDisk:
    path: Path
    layout: DiskLayout
    loader: Loader
    esp: PartitionLayout  # the FAT partition with the kernel (and grub/ for GRUB)

    @property
    def firmware(self) -> Firmware:
        return "ovmf" if self.loader == "systemd-boot" else "seabios"

    @property
    def slot_labels(self) -> tuple[str, ...]:
        return tuple(p.label for p in self.layout.partitions if p.type_guid == COREOS_USR_TYPE)

    @property
    def esp_image(self) -> str:
        """mtools' name for the ESP: ``image@@offset``."""
        return f"{self.path}@@{self.esp.offset}"


# mtools: no sanity checks of a partition's geometry, no per-user configuration.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def mtools(argv: Sequence[str], *, runner: Runner = run) -> None:
    runner(argv, env=MTOOLS_ENV)


def esp_put(disk: VmDisk, files: Mapping[str, bytes | Path], *, runner: Runner = run) -> None:
    """Copy files onto the ESP (paths like ``/EFI/BOOT/BOOTX64.EFI``), creating directories."""
    made: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="esp-") as tmp:
        for n, (dest, content) in enumerate(sorted(files.items())):
            parts = dest.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    if not _esp_exists(disk, d, runner):
                        mtools(["mmd", "-i", disk.esp_image, f"::/{d}"], runner=runner)
            if isinstance(content, Path):
                source = content
            else:
                source = Path(tmp) / f"f{n}"
                source.write_bytes(content)
            mtools(
                ["mcopy", "-o", "-i", disk.esp_image, str(source), "::/" + "/".join(parts)],
                runner=runner,
            )


def _esp_exists(disk: VmDisk, path: str, runner: Runner) -> bool:
    done = runner(
        ["mdir", "-b", "-i", disk.esp_image, f"::/{path}"],
        check=False,
        env=MTOOLS_ENV,
    )
    return done.returncode == 0


def esp_read(disk: VmDisk, path: str, *, runner: Runner = run) -> bytes:
    """A file's bytes from the ESP (``mtype`` would translate line ends; ``mcopy`` to stdout)."""
    return runner(
        ["mcopy", "-n", "-i", disk.esp_image, "::/" + path.strip("/"), "-"],
        env=MTOOLS_ENV,
    ).stdout


def esp_list(disk: VmDisk, directory: str, *, runner: Runner = run) -> list[str]:
    """File names (long names) in an ESP directory."""
    out = runner(
        ["mdir", "-b", "-i", disk.esp_image, "::/" + directory.strip("/")],
        env=MTOOLS_ENV,
    ).text
    return sorted(line.rstrip("/").rsplit("/", 1)[-1] for line in out.splitlines() if line.strip())


def make_vm_disk(
    path: Path,
    loader: Loader,
    *,
    kernel: Path,
    initramfs: Path,
    slots: Mapping[str, Path | None],
    slot_size: int,
    esp_size: int = ESP_SIZE,
    grub_cfg: str | None = None,
    runner: Runner = run,
) -> VmDisk:
    """A bootable GPT image: [BIOS boot,] ESP, then one CoreOS-usr slot per key of ``slots``.

    ``slots`` maps each slot label to the file system image written into it
    (None: left empty). For ``systemd-boot`` the ESP gets ``BOOTX64.EFI``, a
    ``loader.conf`` with no ``default`` (it would defeat boot counting) and an
    empty ``loader/entries/``; for ``grub`` it gets ``grub/grub.cfg`` (``grub_cfg``)
    (default: :func:`updater_grub_cfg`) and GRUB goes into the MBR and the BIOS
    boot partition. Boot entries and the GRUB environment are the boot-control
    backend's to write.
    """
    specs = []
    if loader == "grub":
        specs.append(PartitionSpec(BIOS_BOOT_LABEL, BIOS_BOOT_SIZE, BIOS_BOOT_TYPE))
    specs.append(PartitionSpec(ESP_LABEL, esp_size, EFI_SYSTEM_TYPE))
    specs += [PartitionSpec(label, slot_size, COREOS_USR_TYPE) for label in slots]
    with open(path, "wb") as f:
        f.truncate(image_size(specs))
    partition(path, specs, runner=runner)
    layout = read_layout(path, runner=runner)
    disk = VmDisk(path, layout, loader, layout.by_label(ESP_LABEL))
    for label, image in slots.items():
        if image is not None:
            if image.stat().st_size > slot_size:
                raise VmError(f"{image} does not fit a {slot_size}-byte slot")
            write_into(path, layout.by_label(label).offset, image)
    format_fat(path, disk.esp.offset, disk.esp.size, runner=runner)
    files: dict[str, bytes | Path] = {KERNEL_PATH: kernel, INITRD_PATH: initramfs}
    if loader == "systemd-boot":
        files["/EFI/BOOT/BOOTX64.EFI"] = SYSTEMD_BOOT_EFI
        # No `default`: systemd-boot then orders entries by sort-key and version
        # and tries a counted entry first; `default` kept booting an exhausted one.
        files["/loader/loader.conf"] = b"timeout 0\nconsole-mode keep\neditor no\n"
    else:
        files["/grub/grub.cfg"] = (
            grub_cfg if grub_cfg is not None else updater_grub_cfg()
        ).encode()
    esp_put(disk, files, runner=runner)
    if loader == "systemd-boot":
        mtools(["mmd", "-i", disk.esp_image, "::/loader/entries"], runner=runner)
    else:
        install_grub(disk, runner=runner)
    log.debug("vm_disk_made", path=str(path), loader=loader, slots=list(slots))
    return disk


def updater_grub_cfg(fragment: Path = GRUB_FRAGMENT, cmdline: str = BASE_CMDLINE) -> str:
    """Our ``dist/grub/updater.cfg`` as the whole grub.cfg, told this VM's kernel parameters."""
    settings = (
        "# the settings dist/grub/updater.cfg reads; the kernel and initrd are its defaults\n"
        f'set updater_cmdline="ro {cmdline}"\n'
        f'set updater_linux="{KERNEL_PATH}"\n'
        f'set updater_initrd="{INITRD_PATH}"\n'
    )
    return settings + fragment.read_text()


def install_grub(disk: VmDisk, *, runner: Runner = run) -> None:
    """GRUB for BIOS: boot.img in the MBR, core.img in the BIOS boot partition.

    What ``grub-bios-setup`` does, without its device probing: boot.img's
    pointer to core.img's first sector and diskboot.img's block list (the last
    12 bytes of core.img's first sector) name where core.img was written.
    """
    bios_boot = disk.layout.by_label(BIOS_BOOT_LABEL)
    prefix = f"(hd0,gpt{disk.esp.index})/grub"
    with tempfile.TemporaryDirectory(prefix="grub-") as tmp:
        core_path = Path(tmp) / "core.img"
        early = Path(tmp) / "early.cfg"
        early.write_text(GRUB_EARLY_CFG)
        runner(
            ["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_PC_DIR), "-p", prefix,
             "-c", str(early), "-o", str(core_path), *GRUB_MODULES],
        )  # fmt: skip
        core = bytearray(core_path.read_bytes())
    if len(core) > bios_boot.size:
        raise VmError(f"core.img ({len(core)} bytes) does not fit {BIOS_BOOT_LABEL}")
    first_lba = bios_boot.offset // SECTOR
    at = SECTOR - GRUB_BLOCKLIST_SIZE
    _start, length, segment = struct.unpack_from("<QHH", core, at)
    if length != -(-len(core) // SECTOR) - 1:
        raise VmError(f"core.img's block list says {length} sectors; this GRUB is unexpected")
    struct.pack_into("<QHH", core, at, first_lba + 1, length, segment)
    boot = bytearray((GRUB_PC_DIR / "boot.img").read_bytes())
    struct.pack_into("<Q", boot, GRUB_KERNEL_SECTOR_OFFSET, first_lba)
    with disk.path.open("r+b") as f:
        f.seek(0)
        f.write(boot[:GRUB_BOOT_CODE_SIZE])
        f.seek(bios_boot.offset)
        f.write(core)
        f.flush()
        os.fsync(f.fileno())


# ---- booting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Booted:
    """What the initramfs reported after mounting the slot."""

    label: str  # the GPT partition name (the device name if it has none)
    version: str  # IMAGE_VERSION of the slot's os-release
    part_uuid: str | None
    slot: str | None  # updater.slot= from the command line, if any


@dataclass(frozen=True)
class BootLog:
    serial: bytes  # everything on the serial console, ANSI escapes and all
    cmdline: str | None  # the guest's /proc/cmdline (without the newline)
    booted: Booted | None
    failure: str | None  # BOOT-FAILED's reason from the initramfs
    seconds: float
    returncode: int  # QEMU's (124: killed by timeout)
    firmware: Firmware

    @property
    def timed_out(self) -> bool:
        return self.returncode in (124, 137)

    def text(self) -> str:
        """The serial console without escape sequences and carriage returns, for people."""
        plain = _ANSI_RE.sub(b"", self.serial).replace(b"\r", b"")
        return plain.decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def expect(self) -> Booted:
        """The slot that booted; VmError with the console's tail if none did."""
        if self.booted is None:
            why = (
                f"timed out after {self.seconds:.0f}s"
                if self.timed_out
                else (self.failure or f"QEMU exited {self.returncode}")
            )
            raise VmError(f"the guest booted no slot ({why}); serial console:\n{self.tail()}")
        return self.booted


_ANSI_RE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78c])")
_CMDLINE_RE = re.compile(rb"^CMDLINE (.*)$", re.MULTILINE)
_BOOTED_RE = re.compile(rb"^BOOTED (\S+) (\S+)((?: \S+=\S*)*)$", re.MULTILINE)
_FAILED_RE = re.compile(rb"^BOOT-FAILED (.*)$", re.MULTILINE)


def parse_serial(serial: bytes) -> tuple[str | None, Booted | None, str | None]:
    """The command line, the BOOTED report and a BOOT-FAILED reason in a serial log."""
    # A console line may start or end with a carriage return (GRUB ends its lines "\n\r").
    plain = _ANSI_RE.sub(b"", serial).replace(b"\r", b"")
    cmdline = _CMDLINE_RE.findall(plain)
    booted = _BOOTED_RE.findall(plain)
    failed = _FAILED_RE.findall(plain)
    report = None
    if booted:
        label, version, rest = booted[-1]
        fields = dict(f.split(b"=", 1) for f in rest.split())

        def field(key: bytes) -> str | None:
            value = fields.get(key, b"").decode()
            return None if value in ("", "-", "unknown") else value

        report = Booted(label.decode(), version.decode(), field(b"partuuid"), field(b"slot"))
    return (
        cmdline[-1].decode() if cmdline else None,
        report,
        failed[-1].decode() if failed else None,
    )


def qemu_argv(disk: Path, firmware: Firmware, serial: Path, vars_copy: Path) -> list[str]:
    argv = [
        "qemu-system-x86_64",
        "-machine", "q35" if firmware == "ovmf" else "pc",
        "-accel", "tcg",
        "-m", "512",
        "-smp", "1",
        # no default devices: no NIC, so a firmware that finds nothing to boot
        # does not spend the timeout on PXE; no VGA; the serial port goes to a file
        "-nodefaults",
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{serial}",
        "-no-reboot",
        "-drive", f"if=none,id=disk0,format=raw,file={disk}",
        # NVMe: the cloud kernel has it built in (virtio-blk and ATA are modules)
        "-device", "nvme,drive=disk0,serial=updater0,bootindex=0",
    ]  # fmt: skip
    if firmware == "ovmf":
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip
    return argv


def boot(
    disk: Path | VmDisk,
    firmware: Firmware | None = None,
    *,
    timeout_s: float = 60.0,
    serial_log: Path | None = None,
    runner: Runner = run,
) -> BootLog:
    """Power the disk on once under QEMU and return what its serial console showed.

    The firmware defaults to the one ``disk``'s loader needs. OVMF gets a fresh
    copy of its variable store each time (a reused one can drop into the EFI
    shell after the device set changed). QEMU runs under ``timeout`` and is
    killed when it outlives ``timeout_s``; the guest powers itself off.
    ``serial_log`` keeps a copy of the console.
    """
    if isinstance(disk, VmDisk):
        firmware = firmware or disk.firmware
        path = disk.path
    else:
        path = disk
    if firmware is None:
        raise ValueError("which firmware boots a plain disk path?")
    with tempfile.TemporaryDirectory(prefix="vm-boot-") as tmp:
        serial = Path(tmp) / "serial.log"
        vars_copy = Path(tmp) / "OVMF_VARS.fd"
        if firmware == "ovmf":
            shutil.copyfile(OVMF_VARS, vars_copy)
        argv = [
            "timeout",
            "--kill-after=5",
            str(timeout_s),
            *qemu_argv(path, firmware, serial, vars_copy),
        ]
        started = time.monotonic()
        # The runner's own timeout is only a backstop behind `timeout`.
        done = runner(argv, check=False, timeout=timeout_s + 30)
        seconds = time.monotonic() - started
        output = serial.read_bytes() if serial.exists() else b""
    if serial_log is not None:
        serial_log.write_bytes(output)
    if done.returncode not in (0, 124, 137):
        stderr = done.stderr.decode("utf-8", "replace").strip()
        raise VmError(f"qemu-system-x86_64 exited {done.returncode}: {stderr}")
    cmdline, booted, failure = parse_serial(output)
    result = BootLog(output, cmdline, booted, failure, seconds, done.returncode, firmware)
    log.info(
        "vm_booted",
        firmware=firmware,
        slot=booted.label if booted else None,
        version=booted.version if booted else None,
        seconds=round(seconds, 1),
        returncode=done.returncode,
    )
    return result


# ---- a machine: the disk QEMU boots, and the agent's side of it --------------------------------

# The systemd-boot entry of each slot: the slot's partition on the command line.
SDBOOT_ENTRY = EntryTemplate(
    title="Updater Demo OS ({label})",
    linux=KERNEL_PATH,
    initrd=(INITRD_PATH,),
    options=f"mount.usr=PARTUUID={{partuuid}} ro {BASE_CMDLINE}",
)
GRUBENV_PATH = "grub/grubenv"  # beside grub.cfg: the fragment's ${prefix}/grubenv


def backend_config(loader: Loader, efivars: Path) -> tuple[str, str]:
    """The agent's settings for a machine booted by ``loader``: ([disk] keys, sections).

    The ESP is the disk image's ``EFI-SYSTEM`` partition, edited with mtools,
    as an image builder would; ``efivars`` is a private directory, never this
    machine's own LoaderEntry* variables.
    """
    if loader == "systemd-boot":
        initrd = ", ".join(f'"{i}"' for i in SDBOOT_ENTRY.initrd)
        return (
            f'backend = "systemd-boot"\nesp_partition = "{ESP_LABEL}"\n',
            "[systemd-boot]\n"
            f'title = "{SDBOOT_ENTRY.title}"\n'
            f'linux = "{SDBOOT_ENTRY.linux}"\n'
            f"initrd = [{initrd}]\n"
            f'options = "{SDBOOT_ENTRY.options}"\n'
            f'efivars = "{efivars}"\n',
        )
    return (
        f'backend = "grub-env"\nesp_partition = "{ESP_LABEL}"\n',
        f'[grub-env]\npath = "{GRUBENV_PATH}"\n',
    )


@dataclass(frozen=True)
class VmHost:
    """A disk image that QEMU boots, and what the agent on that machine would see.

    ``host`` holds the agent's side (config, state dir, os-release); its
    ``cmdline`` file is rewritten after every boot with what the guest printed
    as its /proc/cmdline, and its ``os_release`` with the version the guest read
    from the booted slot. Its config names the boot loader's backend, so
    ``updatectl`` on it drives that backend. (Host's own ``reboot`` and
    ``boot_control`` are gpt-prio's: use :meth:`power_cycle` and
    :meth:`boot_control` here.)
    """

    disk: VmDisk
    host: Host

    @property
    def esp(self) -> MtoolsStore:
        return MtoolsStore(self.disk.path, self.disk.esp.offset)

    def boot_control(self) -> BootControl:
        """The backend the disk's boot loader reads, built as the agent builds it."""
        return compose.boot_control(config.load(self.host.config))

    def power_cycle(self, *, timeout_s: float = 60.0, serial_log: Path | None = None) -> BootLog:
        """Boot once; hand the agent the guest's /proc/cmdline and os-release version."""
        result = boot(self.disk, timeout_s=timeout_s, serial_log=serial_log)
        booted = result.expect()
        if result.cmdline is None:
            raise VmError(f"the guest printed no CMDLINE line:\n{result.tail()}")
        self.host.cmdline.write_text(result.cmdline + "\n")  # as /proc/cmdline reads
        self.host.os_release.write_text(f"ID=updater-demo\nIMAGE_VERSION={booted.version}\n")
        return result


def app_health_check(checks_dir: Path, os_release: Path, *, broken: str) -> Path:
    """A health check (for ``[health] checks_dir``) that fails on version ``broken`` only.

    It stands for "the application answers": what a release can break. It reads
    the version the agent reads, ``os_release``, which :meth:`VmHost.power_cycle`
    writes from what the guest found in the booted slot.
    """
    check = checks_dir / "10-app-responds"
    check.write_text(
        "#!/bin/sh\n"
        f"if grep -qx 'IMAGE_VERSION={broken}' '{os_release}'; then\n"
        "    echo 'the app does not answer on :8080' >&2\n"
        "    exit 1\n"
        "fi\n"
    )
    check.chmod(0o755)
    return check


def provision_vm_host(
    root: Path,
    loader: Loader,
    *,
    kernel: Path,
    initramfs: Path,
    first_image: Path,
    slot_size: int,
    repo_url: str | None = None,
    keyring: Path | None = None,
    extra_config: str = "",
    runner: Runner = run,
) -> VmHost:
    """A machine under ``root`` whose USR-A holds ``first_image`` and is the good slot.

    USR-B is empty and unbootable (no entry; ``B_OK`` unset). The boot state is
    written by the backend's own verbs (``mark_good``), as an image builder would.
    """
    root.mkdir(parents=True, exist_ok=True)
    disk = make_vm_disk(
        root / "disk.img",
        loader,
        kernel=kernel,
        initramfs=initramfs,
        slots={"USR-A": first_image, "USR-B": None},
        slot_size=slot_size,
        runner=runner,
    )
    host = Host(
        root=root,
        disk=disk.path,
        layout=disk.layout,
        cmdline=root / "cmdline",
        os_release=root / "os-release",
        state_dir=root / "state",
        config=root / "updater.toml",
    )
    (root / "efivars").mkdir(exist_ok=True)
    disk_keys, sections = backend_config(loader, root / "efivars")
    write_config(
        host,
        repo_url=repo_url,
        keyring=keyring,
        disk=disk_keys,
        extra=sections + "\n" + extra_config,
    )
    machine = VmHost(disk, host)
    if loader == "grub":
        machine.esp.write(GRUBENV_PATH, new_env_block())
    control = machine.boot_control()
    first = control.slots()[0].slot
    control.mark_good(first)
    return machine
