"""A bootable minimal OS disk image with the agent inside, built from Debian packages.

``python -m devtools.osimage`` (``make image``). Nothing is mounted and no
device-mapper is used; every file system is made from a directory tree with
``mkfs.ext4 -d`` or filled with mtools.

- :func:`build_base`: the root file system tree, ``mmdebstrap --variant=minbase``
  of Debian bookworm (systemd, dbus, udev, the cloud kernel, initramfs-tools
  with ``virtio_pci``/``virtio_blk``, python3, gnupg, systemd-boot's EFI
  binary and the agent's Debian dependencies). Cached under
  ``<cache>/osimage/base-<hash>`` by the hash of the mmdebstrap command line
  (package list, apt sources, hooks): a cold build takes a minute or two.
- :func:`install_agent`: the agent into a copy of that tree (the one step the
  agent's ``.deb`` will replace).
- :func:`configure_tree`: what makes the tree an image: read-only root,
  ``/var`` on ``STATE`` (fstab, by PARTLABEL), ``/tmp`` on tmpfs, an empty
  ``/etc/machine-id`` (systemd then takes QEMU's ``-uuid`` and overmounts it
  from ``/run``), ``IMAGE_VERSION`` in ``/usr/lib/os-release``, the agent's
  vendor configuration in ``/usr/lib/updater/config.d``.
- :func:`build_image`: the GPT disk, cached by the hash of every input (the
  base, the agent's sources, this recipe, the settings): a second build with
  the same inputs is a copy of a sparse file.

The disk (see :data:`LAYOUT_DOC`)::

    1 EFI-SYSTEM  FAT   systemd-boot; /ROOT-A/vmlinuz, /ROOT-A/initrd.img, ...;
                        loader/entries/ written by the agent's own backend
    2 ROOT-A      ext4  a whole root file system, mounted read-only (no journal)
    3 ROOT-B      -     empty until the agent installs the next version
    4 STATE       ext4  /var (the agent's state in /var/lib/updater, the journal)

Each slot's kernel and initrd live on the ESP under the slot's name, so a
slot's boot entry (``root=PARTUUID=<slot> ro``) boots the kernel that came with
that slot's root file system.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import structlog

from devtools import deb
from devtools.diskimage import (
    LINUX_DATA_TYPE,
    DiskLayout,
    PartitionSpec,
    image_size,
    partition,
    read_layout,
)
from devtools.espimage import EFI_SYSTEM_TYPE, ESP_LABEL, format_fat
from devtools.vm import OVMF_CODE, OVMF_VARS, VmDisk, cache_dir, esp_put, mtools
from updater import compose, config
from updater.run import Runner, run

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIB = 1024 * 1024

# What the root file system is made of (mmdebstrap --include, on top of minbase).
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "python3",
    "gnupg",
    "systemd-boot-efi",  # the boot loader the ESP gets is the image's own
    "fdisk",  # sfdisk, for a person at the console
)
# The agent's package's Depends: and Recommends:, installed with the base.
AGENT_DEPENDS = tuple(d.package for d in deb.DEPENDS) + deb.RECOMMENDS
# Debian's initrd must find the root on a virtio disk: load these early.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
# Run in the tree once every package is in: the initrd is rebuilt with only the
# listed modules (MODULES=list keeps it small; the cloud kernel has ext4 built in).
CUSTOMIZE_HOOK = (
    "printf '%s\\n' " + " ".join(INITRAMFS_MODULES) + ' >> "$1/etc/initramfs-tools/modules"'
    ' && printf "MODULES=list\\n" > "$1/etc/initramfs-tools/conf.d/updater-image"'
    ' && chroot "$1" update-initramfs -u -k all'
)

# Each image's initrd is its own build and says so: a hook stores IMAGE_VERSION
# in it, and a script leaves it in /run/image-initrd-version (/run survives
# the switch to the root file system), so a booted machine shows which build's
# boot files it runs, not only which root file system.
INITRD_VERSION_FILE = "/run/image-initrd-version"
INITRD_HOOK = r"""#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
mkdir -p "$DESTDIR/etc"
sed -n 's/^IMAGE_VERSION=//p' /usr/lib/os-release > "$DESTDIR/etc/image-version"
"""
INITRD_SCRIPT = r"""#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
# shell built-ins only: without busybox in the image, the initrd has klibc's few tools
read -r version < /etc/image-version
echo "$version" > /run/image-initrd-version
"""

SLOT_LABELS = ("ROOT-A", "ROOT-B")
STATE_LABEL = "STATE"
# The Discoverable Partitions Specification's "root (x86-64)" type.
ROOT_X86_64_TYPE = UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
ESP_SIZE = 128 * MIB  # two slots' kernel (~14 MiB) and initrd (~6 MiB), and room to grow
SLOT_SIZE = 1024 * MIB  # the root file system is ~500 MiB
STATE_SIZE = 256 * MIB
ROOT_FS_MARGIN = 64 * MIB  # free space in the root file system beyond its files

VENDOR_CONFIG = "usr/lib/updater/config.d/10-image.toml"
KEYRING_PATH = "/usr/share/updater/release-keys.asc"
# Where each slot's boot files live on the ESP, and the kernel command line of its entry.
BOOT_LINUX = "/{label}/vmlinuz"
BOOT_INITRD = "/{label}/initrd.img"
CMDLINE = "root=PARTUUID={partuuid} ro console=ttyS0 panic=-1 quiet"
ENTRY_TITLE = "Updater OS ({label})"
# Bump when the recipe changes in a way the hashed inputs do not show.
RECIPE_VERSION = "1"
KEEP_IMAGES = 6  # cached images kept (each ~1 GiB): make image's, the tests' three versions
KEEP_BASES = 2  # cached bootstrapped trees kept

LAYOUT_DOC = __doc__


class ImageError(RuntimeError):
    """The image could not be built."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.hint = hint


# ---- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """What a build may vary; every field is part of the image's cache key."""

    version: str = "1.0.0"  # IMAGE_VERSION
    repo_url: str | None = None  # the release repository; unset: updater.service not enabled
    keyring: bytes | None = None  # the release signing key(s), ASCII-armoured
    # Extra files (path in the root file system -> bytes, mode) and units to
    # enable: what a test image adds (e.g. a unit reporting on the console).
    extra_files: tuple[tuple[str, bytes, int], ...] = ()
    enable: tuple[str, ...] = ()
    slot_size: int = SLOT_SIZE  # bytes
    state_size: int = STATE_SIZE  # bytes
    esp_size: int = ESP_SIZE  # bytes

    def key(self) -> dict[str, object]:
        return {
            "version": self.version,
            "repo_url": self.repo_url,
            "keyring": None if self.keyring is None else _sha256(self.keyring),
            "extra_files": [(p, _sha256(b), m) for p, b, m in self.extra_files],
            "enable": list(self.enable),
            "sizes": [self.slot_size, self.state_size, self.esp_size],
        }


@dataclass(frozen=True)
class OsImage:
    """A built image and the files a release of the same version would publish."""

    disk: Path  # the whole GPT disk image (sparse)
    root_fs: Path  # the slot's file system image (what the agent writes into a slot)
    vmlinuz: Path  # the slot's kernel
    initrd: Path  # and initrd
    version: str
    kernel_release: str  # uname -r of the kernel, e.g. 6.1.0-50-cloud-amd64
    layout: DiskLayout
    build_seconds: float  # how long this call took (a cached build: seconds)
    cached: bool  # True when the disk came from the cache


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- apt sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        """The one-line form mmdebstrap takes as a mirror argument."""
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def parse_sources_list(text: str) -> list[AptSource]:
    """``deb URI SUITE COMPONENT...`` lines (options in brackets are dropped)."""
    found = []
    for raw in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            found.append(AptSource(line[1], line[2], tuple(line[3:])))
    return found


def parse_deb822(text: str) -> list[AptSource]:
    """The ``Types: deb`` stanzas of a ``.sources`` file, one source per URI and suite."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                found.append(AptSource(uri, suite, tuple(fields.get("components", "").split())))
    return found


def host_sources(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> tuple[AptSource, ...]:
    """The host's apt sources for ``suite`` and its -updates and -security suites, main only.

    The image is built from the mirror this machine's apt already uses.
    """
    found: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        found += parse_sources_list(main_list.read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                found += parse_sources_list(f.read_text())
            elif f.suffix == ".sources":
                found += parse_deb822(f.read_text())
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    picked: list[AptSource] = []
    for s in found:
        if s.suite in wanted and "main" in s.components and "debian" in s.uri:
            source = AptSource(s.uri.rstrip("/"), s.suite, ("main",))
            if source not in picked:
                picked.append(source)
    if not any(s.suite == suite for s in picked):
        raise ImageError(
            f"no apt source for Debian {suite} main in {etc_apt}",
            hint=f"add a 'deb <mirror> {suite} main' line to /etc/apt/sources.list",
        )
    return tuple(picked)


# ---- the base tree ----------------------------------------------------------------------------


def mmdebstrap_argv(target: Path, sources: Sequence[AptSource]) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        # a snapshot mirror's Release files are past their Valid-Until
        '--aptopt=Acquire::Check-Valid-Until "false"',
        "--include=" + ",".join((*BASE_PACKAGES, *AGENT_DEPENDS)),
        f"--customize-hook={CUSTOMIZE_HOOK}",
        SUITE,
        str(target),
        *(s.line() for s in sources),
    ]


def base_key(sources: Sequence[AptSource]) -> str:
    argv = mmdebstrap_argv(Path("TARGET"), sources)
    return _sha256(json.dumps(argv).encode())[:16]


def osimage_cache(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "osimage"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One build at a time per cache (two would both bootstrap the same tree)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_base(
    cache: Path, sources: Sequence[AptSource] | None = None, *, runner: Runner = run
) -> Path:
    """The bootstrapped root tree (no agent yet), built once per :func:`base_key`."""
    sources = tuple(sources) if sources is not None else host_sources()
    entry = cache / f"base-{base_key(sources)}"
    tree = entry / "tree"
    if (entry / "done").is_file():
        (entry / "done").touch()  # most recently used: kept by _prune
        return tree
    if entry.exists():
        shutil.rmtree(entry)  # an interrupted build
    if os.geteuid() != 0:
        raise ImageError("mmdebstrap --mode=root needs root", hint="run make image as root")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="base-", dir=cache))
    try:
        runner(mmdebstrap_argv(work / "tree", sources), timeout=1800)
        (work / "argv.json").write_text(json.dumps(mmdebstrap_argv(tree, sources), indent=1))
        (work / "done").write_text("")
        work.rename(entry)
    finally:
        if work.exists():
            shutil.rmtree(work)
    log.info("osimage_base_built", path=str(tree), seconds=round(time.monotonic() - started, 1))
    return tree


def kernel_release(tree: Path) -> str:
    """The ``uname -r`` of the one kernel in the tree's /boot."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"{tree}/boot holds {len(kernels)} kernels, not one")
    release = kernels[0].name.removeprefix("vmlinuz-")
    if not (tree / "boot" / f"initrd.img-{release}").is_file():
        raise ImageError(f"{tree}/boot has no initrd for {release}")
    return release


# ---- the agent --------------------------------------------------------------------------------


def agent_sources(source: Path = REPO_ROOT) -> list[Path]:
    """Every file the agent's package is built from (their bytes key the image's cache)."""
    files = [
        p
        for pkg in deb.PYTHON_PACKAGES
        for p in sorted((source / pkg).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    files += sorted(p for p in (source / "dist").rglob("*") if p.is_file())
    return [*files, source / "README.md", Path(deb.__file__).resolve()]


def install_agent(tree: Path, *, runner: Runner = run) -> None:
    """Install the agent's Debian package (``make deb``) into the root tree with dpkg.

    Its ``Depends:`` are in the tree already (:data:`AGENT_DEPENDS` went to
    mmdebstrap); its maintainer scripts byte-compile the modules, enable the
    units and create the tmpfiles.d directories, as on any Debian system.
    """
    with tempfile.TemporaryDirectory(prefix="osimage-deb-") as tmp:
        package = deb.build_deb(Path(tmp))
        inside = tree / "tmp" / package.name
        shutil.copy(package, inside)
        try:
            runner(["chroot", str(tree), "dpkg", "-i", f"/tmp/{package.name}"], timeout=600)
        finally:
            inside.unlink()


# ---- the image's own configuration ------------------------------------------------------------


def sdboot_settings(efivars: Path | None = None) -> str:
    """The ``[systemd-boot]`` table the agent in the image and the builder share."""
    lines = [
        "[systemd-boot]",
        f'title = "{ENTRY_TITLE}"',
        f'linux = "{BOOT_LINUX}"',
        f'initrd = ["{BOOT_INITRD}"]',
        f'options = "{CMDLINE}"',
    ]
    if efivars is not None:
        lines.append(f'efivars = "{efivars}"')
    return "\n".join(lines) + "\n"


def disk_settings(device: Path | None = None) -> str:
    lines = [
        "[disk]",
        f'slots = ["{SLOT_LABELS[0]}", "{SLOT_LABELS[1]}"]',
        'backend = "systemd-boot"',
        f'esp_partition = "{ESP_LABEL}"',
    ]
    if device is not None:
        lines.append(f'device = "{device}"')
    return "\n".join(lines) + "\n"


def vendor_config(settings: ImageConfig) -> str:
    """``/usr/lib/updater/config.d/10-image.toml``: this image's layout and release source."""
    source = []
    if settings.repo_url is not None:
        source.append(f'url = "{settings.repo_url}"')
    if settings.keyring is not None:
        source.append(f'keyring = ["{KEYRING_PATH}"]')
    return (
        "# The image's own settings (devtools/osimage.py); /etc/updater/config.d overrides them.\n"
        + ("\n".join(["[source]", *source]) + "\n\n" if source else "")
        + disk_settings()
        + "\n"
        + sdboot_settings()
    )


APT_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")  # disabled in the image

# The network: every Ethernet link by DHCP (QEMU's user networking, a cloud's
# VPC), systemd-networkd with its wait-online, so network-online.target (which
# updater.service waits for) means an address.
NETWORK_FILE = "etc/systemd/network/50-dhcp.network"
NETWORK = "[Match]\nType=ether\n\n[Network]\nDHCP=ipv4\n"

# Settings given to the machine at boot rather than baked into the image: the
# system credential ``updater.config`` (a TOML drop-in; QEMU's
# ``-smbios type=11,value=io.systemd.credential:updater.config=...``, a cloud's
# SMBIOS, or ``systemd.set_credential=`` on the kernel command line) becomes
# /run/updater/config.d/60-credential.toml before the agent reads its
# configuration. One image then serves every repository, channel or fleet.
CREDENTIAL = "updater.config"
CREDENTIAL_DROPIN = "/run/updater/config.d/60-credential.toml"
CREDENTIAL_UNIT_NAME = "updater-config-credential.service"
CREDENTIAL_UNIT = f"""[Unit]
Description=Agent settings from the system credential {CREDENTIAL}
DefaultDependencies=no
After=systemd-tmpfiles-setup.service
Before=sysinit.target updater.service updater-mark-good.service
ConditionPathExists=/run/credentials/@system/{CREDENTIAL}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/install -D -m 0644 /run/credentials/@system/{CREDENTIAL} {CREDENTIAL_DROPIN}

[Install]
WantedBy=sysinit.target
"""
# Without a repository baked in, the agent runs only when a credential gave it one.
AGENT_NEEDS_CREDENTIAL = f"""[Unit]
ConditionPathExists={CREDENTIAL_DROPIN}
"""
AGENT_DROPIN = "usr/lib/systemd/system/updater.service.d/10-credential.conf"
FSTAB = (
    "# / is the slot the boot entry names (root=PARTUUID=...), mounted read-only.\n"
    f"PARTLABEL={STATE_LABEL}  /var  ext4   defaults,noatime          0  2\n"
    "tmpfs           /tmp  tmpfs  nosuid,nodev,mode=1777    0  0\n"
)


def configure_tree(tree: Path, settings: ImageConfig, *, runner: Runner = run) -> None:
    """Make the bootstrapped tree this image: read-only root, /var on STATE, no machine id."""
    etc = tree / "etc"
    (etc / "fstab").write_text(FSTAB)
    # Empty, not absent: systemd generates the id at boot (a VM's SMBIOS UUID,
    # i.e. QEMU's -uuid) and, / being read-only, bind-mounts it from /run.
    (etc / "machine-id").write_text("")
    (etc / "hostname").write_text("updater-os\n")
    (etc / "locale.conf").write_text("LANG=C.UTF-8\n")
    (etc / "resolv.conf").unlink(missing_ok=True)  # the build machine's, copied by mmdebstrap
    # Every boot is a "first boot" (the id is never committed to a read-only
    # /etc); the image is configured already, so nothing may prompt on the console.
    mask = etc / "systemd/system/systemd-firstboot.service"
    mask.unlink(missing_ok=True)
    mask.symlink_to("/dev/null")
    # The OS is updated as a whole image: apt has nothing to fetch on a schedule.
    for timer in APT_TIMERS:
        (etc / "systemd/system/timers.target.wants" / timer).unlink(missing_ok=True)
    # The directories the agent's tmpfiles.d would create: / is read-only at boot.
    for d in ("config.d", "health.d", "pre-reboot.d"):
        (etc / "updater" / d).mkdir(parents=True, exist_ok=True)
    os_release = tree / "usr/lib/os-release"
    kept = [
        line
        for line in os_release.read_text().splitlines()
        if not line.startswith(("IMAGE_ID=", "IMAGE_VERSION="))
    ]
    os_release.write_text(
        "\n".join([*kept, "IMAGE_ID=updater-os", f"IMAGE_VERSION={settings.version}"]) + "\n"
    )
    vendor = tree / VENDOR_CONFIG
    vendor.parent.mkdir(parents=True, exist_ok=True)
    vendor.write_text(vendor_config(settings))
    if settings.keyring is not None:
        key = tree / KEYRING_PATH.lstrip("/")
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(settings.keyring)
    for path, data, mode in settings.extra_files:
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    network = tree / NETWORK_FILE
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(NETWORK)
    unit = tree / "usr/lib/systemd/system" / CREDENTIAL_UNIT_NAME
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(CREDENTIAL_UNIT)
    dropin = tree / AGENT_DROPIN
    if settings.repo_url is None:
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(AGENT_NEEDS_CREDENTIAL)
    else:
        dropin.unlink(missing_ok=True)
    # networkd's [Install] brings its socket and wait-online along.
    enable = ("systemd-networkd.service", CREDENTIAL_UNIT_NAME, *settings.enable)
    runner(["chroot", str(tree), "systemctl", "enable", *enable], timeout=120)


def rebuild_initrd(tree: Path, *, runner: Runner = run) -> None:
    """This image's own initrd, recording its IMAGE_VERSION (:data:`INITRD_HOOK`)."""
    hooks = tree / "etc/initramfs-tools"
    for path, text in (
        (hooks / "hooks/image-version", INITRD_HOOK),
        (hooks / "scripts/init-bottom/image-version", INITRD_SCRIPT),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    runner(["chroot", str(tree), "update-initramfs", "-u", "-k", "all"], timeout=600)


# ---- file systems and the disk ----------------------------------------------------------------


def tree_bytes(tree: Path) -> int:
    """Bytes the files under ``tree`` take, in 4 KiB blocks (what ext4 will need for them)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            total += -(-st.st_size // 4096) * 4096
    return total


def make_ext4(
    tree: Path, path: Path, size: int, *, label: str, journal: bool, runner: Runner = run
) -> None:
    """An ext4 image of ``size`` bytes holding ``tree`` (``mkfs.ext4 -d``)."""
    path.unlink(missing_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)
    features = "^has_journal" if not journal else "has_journal"
    runner(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-O", features, "-m", "0", "-i", "8192",
         "-E", "root_owner=0:0", "-d", str(tree), str(path)],
        timeout=600,
    )  # fmt: skip


def copy_sparse(src: Path, dst: Path, *, offset: int = 0) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping ``src``'s holes (``dst`` stays sparse)."""
    with open(src, "rb") as fin, open(dst, "r+b" if dst.exists() else "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            left = hole - data
            src_off, dst_off = data, offset + data
            while left:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), left, src_off, dst_off)
                if n == 0:
                    raise ImageError(f"copying {src}: short read at {src_off}")
                src_off += n
                dst_off += n
                left -= n
            pos = hole
        if os.fstat(fout.fileno()).st_size < offset + size:
            fout.truncate(offset + size)
        fout.flush()
        os.fsync(fout.fileno())


def disk_specs(settings: ImageConfig) -> list[PartitionSpec]:
    return [
        PartitionSpec(ESP_LABEL, settings.esp_size, EFI_SYSTEM_TYPE),
        *(PartitionSpec(label, settings.slot_size, ROOT_X86_64_TYPE) for label in SLOT_LABELS),
        PartitionSpec(STATE_LABEL, settings.state_size, LINUX_DATA_TYPE),
    ]


def assemble_disk(
    path: Path,
    settings: ImageConfig,
    *,
    root_fs: Path,
    state_fs: Path,
    vmlinuz: Path,
    initrd: Path,
    boot_loader: Path,
    runner: Runner = run,
) -> DiskLayout:
    """The GPT disk: ESP with systemd-boot, ROOT-A holding ``root_fs``, ROOT-B empty, STATE.

    ROOT-A's boot entry is written by the agent's own systemd-boot backend
    (``mark_good``), as the image's agent will read it.
    """
    specs = disk_specs(settings)
    path.unlink(missing_ok=True)
    with path.open("wb") as fh:
        fh.truncate(image_size(specs))
    partition(path, specs, runner=runner)
    layout = read_layout(path, runner=runner)
    first = layout.by_label(SLOT_LABELS[0])
    if root_fs.stat().st_size > first.size:
        raise ImageError(
            f"the root file system ({root_fs.stat().st_size} bytes) does not fit "
            f"a {first.size}-byte slot",
            hint="raise ImageConfig.slot_size",
        )
    copy_sparse(root_fs, path, offset=first.offset)
    copy_sparse(state_fs, path, offset=layout.by_label(STATE_LABEL).offset)
    esp = layout.by_label(ESP_LABEL)
    format_fat(path, esp.offset, esp.size, volume="ESP", runner=runner)
    disk = VmDisk(path, layout, "systemd-boot", esp)
    label = SLOT_LABELS[0]
    files: dict[str, Path | bytes] = {
        "/EFI/BOOT/BOOTX64.EFI": boot_loader,
        # No `default`: it would defeat boot counting (see partitions/sdboot.py).
        "/loader/loader.conf": b"timeout 0\nconsole-mode keep\neditor no\n",
    }
    # ROOT-A's boot files; ROOT-B gets its own with the release the agent
    # installs there (``updatectl release --kernel --initrd``).
    files[BOOT_LINUX.format(label=label)] = vmlinuz
    files[BOOT_INITRD.format(label=label)] = initrd
    esp_put(disk, files, runner=runner)
    mtools(["mmd", "-i", disk.esp_image, "::/loader/entries"], runner=runner)
    with tempfile.TemporaryDirectory(prefix="osimage-cfg-") as tmp:
        efivars = Path(tmp) / "efivars"  # never this machine's own EFI variables
        efivars.mkdir()
        cfg_file = Path(tmp) / "updater.toml"
        cfg_file.write_text(disk_settings(path) + "\n" + sdboot_settings(efivars))
        control = compose.boot_control(config.load(cfg_file))
        slot = next(s.slot for s in control.slots() if s.slot.label == label)
        control.mark_good(slot)
    return layout


# ---- the build --------------------------------------------------------------------------------


def image_key(base: str, settings: ImageConfig, source: Path = REPO_ROOT) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"base": base, "recipe": RECIPE_VERSION, **settings.key()}).encode())
    for f in [*agent_sources(source), Path(__file__).resolve()]:
        h.update(str(f.relative_to(source) if f.is_relative_to(source) else f).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_image(
    settings: ImageConfig = ImageConfig(),
    *,
    cache: Path | None = None,
    sources: Sequence[AptSource] | None = None,
    runner: Runner = run,
) -> OsImage:
    """The image for ``settings``, from the cache when its inputs are unchanged.

    The files returned live in the cache: copy the disk before booting it
    (:func:`copy_sparse`), since a boot writes to it.
    """
    started = time.monotonic()
    root = osimage_cache(cache)
    sources = tuple(sources) if sources is not None else host_sources()
    with _locked(root):
        bkey = base_key(sources)
        entry = root / f"image-{image_key(bkey, settings)}"
        cached = (entry / "done").is_file()
        if not cached:
            base = build_base(root, sources, runner=runner)
            _build_entry(entry, base, settings, runner=runner)
        (entry / "done").touch()  # most recently used: kept by _prune
        _prune(root, "image-", KEEP_IMAGES)
        _prune(root, "base-", KEEP_BASES)
    meta = json.loads((entry / "image.json").read_text())
    disk = entry / "disk.img"
    image = OsImage(
        disk=disk,
        root_fs=entry / "root.ext4",
        vmlinuz=entry / "vmlinuz",
        initrd=entry / "initrd.img",
        version=settings.version,
        kernel_release=meta["kernel_release"],
        layout=read_layout(disk, runner=runner),
        build_seconds=time.monotonic() - started,
        cached=cached,
    )
    log.info(
        "osimage_built",
        disk=str(disk),
        version=image.version,
        cached=cached,
        seconds=round(image.build_seconds, 1),
    )
    return image


def _prune(root: Path, prefix: str, keep: int) -> None:
    """Remove all but the ``keep`` most recently used cache entries named ``prefix*``."""
    entries = sorted(
        (e for e in root.glob(f"{prefix}*") if (e / "done").is_file()),
        key=lambda e: (e / "done").stat().st_mtime,
        reverse=True,
    )
    for stale in entries[keep:]:
        shutil.rmtree(stale)


def _build_entry(entry: Path, base: Path, settings: ImageConfig, *, runner: Runner) -> None:
    if entry.exists():
        shutil.rmtree(entry)  # an interrupted build
    work = Path(tempfile.mkdtemp(prefix="image-", dir=entry.parent))
    try:
        tree = work / "tree"
        # A copy of the base (reflinked where the file system can): the cached
        # base stays pristine for the next build.
        runner(["cp", "-a", "--reflink=auto", str(base), str(tree)], timeout=600)
        install_agent(tree, runner=runner)
        configure_tree(tree, settings, runner=runner)
        rebuild_initrd(tree, runner=runner)
        release = kernel_release(tree)
        shutil.copy(tree / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
        shutil.copy(tree / "boot" / f"initrd.img-{release}", work / "initrd.img")
        boot_loader = work / "BOOTX64.EFI"
        shutil.copy(tree / "usr/lib/systemd/boot/efi/systemd-bootx64.efi", boot_loader)
        # /var goes to STATE; the slot keeps an empty /var to mount it on.
        var = work / "var"
        (tree / "var").rename(var)
        (tree / "var").mkdir(mode=0o755)
        need = tree_bytes(tree)
        root_size = -(-(need + need // 8 + ROOT_FS_MARGIN) // MIB) * MIB
        make_ext4(tree, work / "root.ext4", root_size, label="root", journal=False, runner=runner)
        make_ext4(var, work / "state.ext4", settings.state_size, label="state", journal=True,
                  runner=runner)  # fmt: skip
        assemble_disk(
            work / "disk.img",
            settings,
            root_fs=work / "root.ext4",
            state_fs=work / "state.ext4",
            vmlinuz=work / "vmlinuz",
            initrd=work / "initrd.img",
            boot_loader=boot_loader,
            runner=runner,
        )
        shutil.rmtree(tree)
        shutil.rmtree(var)
        (work / "state.ext4").unlink()
        boot_loader.unlink()
        meta = {"version": settings.version, "kernel_release": release, **settings.key()}
        (work / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
        (work / "done").write_text("")
        work.rename(entry)
    finally:
        if work.exists():
            shutil.rmtree(work)


# ---- booting ----------------------------------------------------------------------------------

GUEST_MEMORY_MIB = 1024
POWER_CUT = -9  # BootLog.returncode when the watcher pulled the plug
_CREDENTIAL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def smbios_credentials(credentials: Mapping[str, bytes]) -> list[str]:
    """QEMU options passing system credentials to systemd (SMBIOS type 11 OEM strings).

    Base64 (``io.systemd.credential.binary:``) so that any bytes, newlines and
    the commas QEMU's option parser would split on, get through.
    """
    argv: list[str] = []
    for name, value in sorted(credentials.items()):
        if not _CREDENTIAL_NAME_RE.fullmatch(name):
            raise ImageError(f"bad credential name {name!r}")
        encoded = base64.b64encode(value).decode()
        argv += ["-smbios", f"type=11,value=io.systemd.credential.binary:{name}={encoded}"]
    return argv


def qemu_argv(
    disk: Path,
    *,
    serial: str,
    vars_file: Path,
    uuid: UUID,
    credentials: Mapping[str, bytes] | None = None,
    cpus: int = 1,
    forwards: Sequence[tuple[int, int]] = (),
) -> list[str]:
    """QEMU (TCG) with OVMF: the disk on virtio-blk, a NIC on QEMU's user network.

    ``serial`` is QEMU's character device for the console (``file:<path>``,
    ``mon:stdio``). The guest reaches this machine's loopback as 10.0.2.2;
    ``forwards`` (host port, guest port) pairs make guest TCP services reachable
    on this machine's 127.0.0.1.
    """
    netdev = "user,id=net0" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards
    )
    return [
        "qemu-system-x86_64",
        "-machine", "q35",
        "-accel", "tcg",
        "-m", str(GUEST_MEMORY_MIB),
        "-smp", str(cpus),
        # systemd takes the SMBIOS system UUID as the machine id when /etc/machine-id is empty
        "-uuid", str(uuid),
        "-nodefaults",
        "-display", "none",
        "-serial", serial,
        # a reboot ends QEMU: the next boot is a fresh QEMU (warm resets are slow under TCG)
        "-no-reboot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        "-drive", f"if=none,id=disk0,format=raw,file={disk}",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
        *smbios_credentials(credentials or {}),
    ]  # fmt: skip


@dataclass(frozen=True)
class BootLog:
    serial: bytes  # everything on the serial console
    seconds: float  # QEMU's wall time
    returncode: int  # QEMU's (124: killed when the boot's time was up; POWER_CUT)

    @property
    def timed_out(self) -> bool:
        return self.returncode == 124

    @property
    def power_cut(self) -> bool:
        return self.returncode == POWER_CUT

    def text(self) -> str:
        """The console without escape sequences and carriage returns."""
        return clean_console(self.serial)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def reports(self, prefix: str = "REPORT") -> dict[str, str]:
        """``<prefix> key=value`` lines the guest printed at the start of a line (last wins)."""
        found: dict[str, str] = {}
        for line in self.text().splitlines():
            if line.startswith(prefix + " ") and "=" in line:
                key, _, value = line[len(prefix) + 1 :].partition("=")
                found[key.strip()] = value.strip()
        return found

    def lines(self, prefix: str) -> list[str]:
        """What follows ``<prefix> `` on every console line that starts with it."""
        return [
            line[len(prefix) + 1 :]
            for line in self.text().splitlines()
            if line.startswith(prefix + " ")
        ]


_ANSI_RE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78c])")


def clean_console(data: bytes) -> str:
    plain = _ANSI_RE.sub(b"", data).replace(b"\r", b"")
    return plain.decode("utf-8", "replace")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
# A console line -> True: cut the power now. Also called with "" about five
# times a second, so that it can act on time alone.
Watcher = Callable[[str], bool]


class LineFeed:
    """The console file as it grows, handed to a watcher one complete line at a time."""

    def __init__(self, path: Path, watch: Watcher | None) -> None:
        self.path = path
        self.watch = watch
        self.offset = 0
        self.partial = b""

    def poll(self, *, final: bool = False) -> bool:
        if self.watch is None or not self.path.exists():
            return False
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        if final and self.partial:
            complete.append(self.partial)
            self.partial = b""
        if final:
            for raw in complete:
                self.watch(clean_console(raw))
            return False
        # then "" as a tick: a watcher can act on time alone, between lines
        return any(self.watch(clean_console(raw)) for raw in complete) or self.watch("")


def boot(
    disk: Path,
    *,
    uuid: UUID,
    timeout_s: float = 300.0,
    vars_file: Path | None = None,
    serial_log: Path | None = None,
    credentials: Mapping[str, bytes] | None = None,
    watch: Watcher | None = None,
    cpus: int = 1,
    forwards: Sequence[tuple[int, int]] = (),
) -> BootLog:
    """Power ``disk`` on once under QEMU until the guest powers off or reboots (QEMU
    runs with -no-reboot), or ``timeout_s`` passes.

    ``vars_file`` is the machine's OVMF variable store, kept across boots (made
    from OVMF's template when missing); None: a fresh one for this boot.
    ``credentials`` go to the guest's systemd (:func:`smbios_credentials`).
    ``watch`` sees every console line as it is printed; when it returns True,
    QEMU is killed on the spot (a power cut: ``returncode`` is POWER_CUT).
    QEMU never outlives the call: it runs in its own process group, killed on
    the way out whatever happens, and dies with this process (PR_SET_PDEATHSIG)
    if this one is killed.
    """
    with tempfile.TemporaryDirectory(prefix="osimage-boot-") as tmp:
        serial = Path(tmp) / "serial.log"
        if vars_file is None:
            vars_file = Path(tmp) / "OVMF_VARS.fd"
        if not vars_file.exists():
            shutil.copyfile(OVMF_VARS, vars_file)
        argv = qemu_argv(
            disk,
            serial=f"file:{serial}",
            vars_file=vars_file,
            uuid=uuid,
            credentials=credentials,
            cpus=cpus,
            forwards=forwards,
        )
        feed = LineFeed(serial, watch)
        started = time.monotonic()
        with open(Path(tmp) / "stderr", "w+b") as stderr:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, before exec
            )
            try:
                while True:
                    try:
                        returncode = proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if feed.poll():
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        returncode = POWER_CUT
                        break
                    if time.monotonic() - started > timeout_s:
                        returncode = 124
                        break
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            stderr.seek(0)
            errors = stderr.read().decode("utf-8", "replace").strip()
        seconds = time.monotonic() - started
        feed.poll(final=True)
        output = serial.read_bytes() if serial.exists() else b""
    if serial_log is not None:
        serial_log.write_bytes(output)
    if returncode not in (0, 124, POWER_CUT):
        raise ImageError(f"qemu-system-x86_64 exited {returncode}: {errors}")
    log.info("osimage_booted", seconds=round(seconds, 1), returncode=returncode)
    return BootLog(output, seconds, returncode)


def boot_interactive(
    disk: Path,
    *,
    uuid: UUID,
    vars_file: Path,
    credentials: Mapping[str, bytes] | None = None,
    cpus: int = 1,
) -> int:
    """Boot ``disk`` with the serial console on this terminal (Ctrl-A X quits QEMU)."""
    if not vars_file.exists():
        shutil.copyfile(OVMF_VARS, vars_file)
    argv = qemu_argv(
        disk,
        serial="mon:stdio",
        vars_file=vars_file,
        uuid=uuid,
        credentials=credentials,
        cpus=cpus,
    )
    proc = subprocess.Popen(argv, start_new_session=False, preexec_fn=_die_with_parent)  # noqa: PLW1509
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the command ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.osimage", description="Build the OS disk image (make image)."
    )
    parser.add_argument("--version", default=ImageConfig.version, help="IMAGE_VERSION")
    parser.add_argument("--repo-url", help="the release repository the image's agent polls")
    parser.add_argument("--keyring", type=Path, help="the release signing key (armoured)")
    parser.add_argument(
        "--out", type=Path, default=Path("build/os-image"), help="where the image is copied"
    )
    args = parser.parse_args(argv)
    settings = ImageConfig(
        version=args.version,
        repo_url=args.repo_url,
        keyring=args.keyring.read_bytes() if args.keyring else None,
    )
    try:
        image = build_image(settings)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for f in (image.disk, image.root_fs, image.vmlinuz, image.initrd):
        (out / f.name).unlink(missing_ok=True)
        copy_sparse(f, out / f.name)
    print(
        f"{out / image.disk.name}: Updater OS {image.version} (kernel {image.kernel_release}), "
        f"{'cached, ' if image.cached else ''}built in {image.build_seconds:.1f}s\n"
        f"{out / image.root_fs.name}, {out / image.vmlinuz.name}, {out / image.initrd.name}: "
        "the slot's files a release publishes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
