"""The agent as a Debian package: ``updater_<version>_all.deb``, built with ``dpkg-deb``.

``build_deb(out_dir) -> Path`` is the stable entry point (the OS image build
calls it); ``python -m devtools.deb [--out DIR]`` (``make deb``) prints the
path it wrote. No debhelper: the tree is staged here and packed as is.

What goes where (Debian's places, bookworm):

- the Python packages ``updater``, ``partitions`` and ``policies`` (sources and
  ``py.typed``) in ``/usr/lib/python3/dist-packages``, byte-compiled by the
  postinst with ``py3compile -p updater`` and cleaned by the prerm with
  ``py3clean -p updater`` (what dh_python3 generates), so that removing the
  package leaves no ``__pycache__`` behind;
- ``/usr/bin/updatectl``, the console script;
- the units in ``/lib/systemd/system``, the D-Bus policy in
  ``/usr/share/dbus-1/system.d``, tmpfiles.d in ``/usr/lib/tmpfiles.d``;
- one conffile, ``/etc/updater/config.d/50-site.toml``: the example from
  ``dist/config.d`` with every setting commented out (the admin's file; the
  agent needs at least ``[source] url`` and a keyring, which no package can
  know); the example itself and GRUB's fragment under ``/usr/share/doc/updater``
  and ``/usr/share/updater``;
- updatectl(8) and its bash and zsh completions, generated from the parser
  (devtools/manpage.py, devtools/completion.py) at build time, in
  ``/usr/share/man/man8`` (gzip -9n, as Debian wants), ``/usr/share/bash-completion/
  completions`` and ``/usr/share/zsh/vendor-completions``.

``Depends:`` are Debian's own packages (:data:`DEPENDS`): the Python
libraries at the floors ``setup.cfg`` asks for (bookworm's versions, which the
code is tested on: tests/test_deb.py installs the package into a bookworm root
with apt and runs it there), and the programs the agent itself runs.

The maintainer scripts (:data:`POSTINST`, :data:`PRERM`, :data:`POSTRM`) enable
the units with ``deb-systemd-helper`` (Essential in bookworm, and it works in a
chroot or image build where systemd is not running), create the tmpfiles.d
directories (when /proc is there; else systemd does at boot), and on remove
stop and disable the units; purge deletes the state. Nothing is started on a
fresh install: the agent runs from the next boot, once configured; an upgrade
restarts a running agent.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools import completion, manpage
from devtools.vm import cache_dir
from updater.run import run

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
PACKAGE = "updater"
PYTHON_PACKAGES = ("updater", "partitions", "policies")
DEFAULT_OUT = ROOT / "build" / "deb"

DIST_PACKAGES = "usr/lib/python3/dist-packages"
UNIT_DIR = "lib/systemd/system"
UNITS = ("updater.service", "updater-mark-good.service")
DBUS_POLICY = "usr/share/dbus-1/system.d/org.updater.Agent1.conf"
TMPFILES = "usr/lib/tmpfiles.d/updater.conf"
SITE_CONFIG = "etc/updater/config.d/50-site.toml"
DOC_DIR = "usr/share/doc/updater"
MAN_PAGE = "usr/share/man/man8/updatectl.8.gz"
BASH_COMPLETION = "usr/share/bash-completion/completions/updatectl"
ZSH_COMPLETION = "usr/share/zsh/vendor-completions/_updatectl"
CONFFILES = (SITE_CONFIG,)


@dataclass(frozen=True)
class Dependency:
    package: str  # Debian package
    floor: str | None  # lowest Debian version, or None
    why: str

    def control(self) -> str:
        return self.package if self.floor is None else f"{self.package} (>= {self.floor})"


# What the agent imports and runs, as Debian's packages. The Python floors are
# bookworm's versions (setup.cfg's install_requires match them).
DEPENDS: tuple[Dependency, ...] = (
    Dependency("python3", "3.11", "tomllib, datetime.UTC, typing"),
    Dependency("python3-requests", "2.28", "http(s) downloads"),
    Dependency("python3-urllib3", "1.26", "retries and the FleetLock client"),
    Dependency("python3-idna", "3.3", "host names in URLs"),
    Dependency("python3-gnupg", "0.4.9", "verifying signed manifests"),
    Dependency("python3-dbus-fast", "1.84", "logind, systemd, the agent's own D-Bus API"),
    Dependency("python3-etcd3gw", "2.0", "the etcd reboot lock"),
    Dependency("python3-structlog", "22.3", "structured events"),
    Dependency("python3-zstandard", "0.20", "zstd-compressed images"),
    Dependency("python3-prometheus-client", "0.16", "metrics"),
    Dependency("python3-defusedxml", "0.7", "Omaha answers"),
    Dependency("gnupg", None, "gpg and gpgconf, run by python-gnupg and updater/gpg.py"),
    Dependency("mtools", None, "the ESP as a partition ([disk] esp_partition)"),
)
RECOMMENDS = ("dbus", "systemd")  # the bus and logind the agent talks to
SUGGESTS = ("grub-common",)  # grub-editenv, for [disk] backend = "grub-env"

MAINTAINER = "updater developers <updater@localhost>"
DESCRIPTION = """\
Self-updating A/B host OS agent
 Installs signed OS images into the inactive slot of an A/B disk, verifies
 them, switches the boot loader (GPT priority attributes, systemd-boot or
 GRUB) and reboots when the fleet policy allows; a trial boot is blessed by
 health checks or rolled back by the firmware.
"""

_SYSTEMD_UP = "[ -d /run/systemd/system ]"
_UNITS = " ".join(UNITS)

POSTINST = f"""#!/bin/sh
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] \\
        || [ "$1" = abort-remove ]; then
    if command -v py3compile >/dev/null 2>&1; then
        py3compile -p {PACKAGE}
    fi
    for unit in {_UNITS}; do
        deb-systemd-helper unmask "$unit" >/dev/null || true
        # was-enabled is true on a first install: enable; on an upgrade keep the admin's choice
        if deb-systemd-helper --quiet was-enabled "$unit"; then
            deb-systemd-helper enable "$unit" >/dev/null || true
        else
            deb-systemd-helper update-state "$unit" >/dev/null || true
        fi
    done
    # in a chroot without /proc (an image build) systemd-tmpfiles-setup does it at boot
    if command -v systemd-tmpfiles >/dev/null 2>&1 && [ -e /proc/self ]; then
        systemd-tmpfiles --create /{TMPFILES} || true
    fi
    if {_SYSTEMD_UP}; then
        systemctl --system daemon-reload >/dev/null || true
        # an upgrade restarts a running agent; a fresh install starts it at the next boot
        systemctl try-restart updater.service >/dev/null || true
    fi
fi
exit 0
"""

PRERM = f"""#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = deconfigure ]; then
    if {_SYSTEMD_UP}; then
        systemctl stop {_UNITS} >/dev/null 2>&1 || true
    fi
    deb-systemd-helper purge {_UNITS} >/dev/null || true
fi
if command -v py3clean >/dev/null 2>&1; then
    py3clean -p {PACKAGE}
fi
exit 0
"""

POSTRM = f"""#!/bin/sh
set -e
case "$1" in
remove)
    rm -rf /run/updater
    for dir in /etc/updater/health.d /etc/updater/pre-reboot.d /var/lib/updater/cache; do
        rmdir --ignore-fail-on-non-empty "$dir" 2>/dev/null || true
    done
    if {_SYSTEMD_UP}; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    ;;
purge)
    deb-systemd-helper purge {_UNITS} >/dev/null || true
    rm -rf /var/lib/updater /run/updater
    for dir in /etc/updater/health.d /etc/updater/pre-reboot.d /etc/updater/config.d \
            /etc/updater; do
        rmdir --ignore-fail-on-non-empty "$dir" 2>/dev/null || true
    done
    ;;
esac
exit 0
"""

ENTRY_SCRIPT = """#!/usr/bin/python3
import sys

from updater.cli import main

sys.exit(main())
"""


def version() -> str:
    """The package version: setup.cfg's ``[metadata] version``."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def module_files() -> Iterator[Path]:
    """Every file of the Python packages that goes into the .deb (relative to ROOT)."""
    for pkg in PYTHON_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if (
                path.is_file()
                and path.suffix in (".py", ".typed")
                and "__pycache__" not in path.parts
            ):
                yield path.relative_to(ROOT)


def site_config(example: str) -> str:
    """The example config with every setting commented out (sections stay)."""
    lines = [
        "# The site's configuration of the update agent: uncomment and set at least",
        "# [source] url and keyring. Drop-ins beside this file are merged in name order;",
        "# every key and its default: /usr/share/doc/updater/README.md (Configuration).",
        "",
    ]
    body = example.splitlines()
    while body and (body[0].startswith("#") or not body[0].strip()):  # the example's header
        body.pop(0)
    for line in body:
        text = line.strip()
        setting = text and not text.startswith("#") and not text.startswith("[")
        lines.append("# " + line if setting else line)
    return "\n".join(lines).strip("\n") + "\n"


def _put(stage: Path, rel: str, data: bytes, mode: int = 0o644) -> None:
    path = stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def control(ver: str, installed_kib: int) -> str:
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {ver}\n"
        "Architecture: all\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {', '.join(d.control() for d in DEPENDS)}\n"
        f"Recommends: {', '.join(RECOMMENDS)}\n"
        f"Suggests: {', '.join(SUGGESTS)}\n"
        "Section: admin\n"
        "Priority: optional\n"
        "Homepage: https://example.invalid/updater\n"
        f"Description: {DESCRIPTION}"
    )


def stage_tree(stage: Path) -> None:
    """Lay out the package's files and its DEBIAN/ control directory under ``stage``."""
    for rel in module_files():
        _put(stage, f"{DIST_PACKAGES}/{rel}", (ROOT / rel).read_bytes())
    _put(stage, "usr/bin/updatectl", ENTRY_SCRIPT.encode(), 0o755)
    for unit in UNITS:
        _put(stage, f"{UNIT_DIR}/{unit}", (DIST / unit).read_bytes())
    _put(
        stage, DBUS_POLICY, (DIST / "dbus-1" / "system.d" / "org.updater.Agent1.conf").read_bytes()
    )
    _put(stage, TMPFILES, (DIST / "tmpfiles.d" / "updater.conf").read_bytes())
    example = (DIST / "config.d" / "50-example.toml").read_text()
    _put(stage, SITE_CONFIG, site_config(example).encode())
    _put(stage, f"{DOC_DIR}/examples/50-example.toml", example.encode())
    _put(stage, "usr/share/updater/grub/updater.cfg", (DIST / "grub" / "updater.cfg").read_bytes())
    _put(stage, f"{DOC_DIR}/README.md", (ROOT / "README.md").read_bytes())
    _put(stage, f"{DOC_DIR}/copyright", _copyright().encode())
    page = manpage.render(version()).encode()
    _put(stage, MAN_PAGE, gzip.compress(page, compresslevel=9, mtime=0))
    _put(stage, BASH_COMPLETION, completion.bash().encode())
    _put(stage, ZSH_COMPLETION, completion.zsh().encode())

    size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    files = sorted(
        p for p in stage.rglob("*") if p.is_file() and p.parts[len(stage.parts)] != "DEBIAN"
    )
    md5sums = "".join(
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(stage)}\n"
        for p in files
        if str(p.relative_to(stage)) not in CONFFILES
    )
    _put(stage, "DEBIAN/control", control(version(), (size + 1023) // 1024).encode())
    _put(stage, "DEBIAN/conffiles", "".join(f"/{c}\n" for c in CONFFILES).encode())
    _put(stage, "DEBIAN/md5sums", md5sums.encode())
    _put(stage, "DEBIAN/postinst", POSTINST.encode(), 0o755)
    _put(stage, "DEBIAN/prerm", PRERM.encode(), 0o755)
    _put(stage, "DEBIAN/postrm", POSTRM.encode(), 0o755)
    for d in [stage, *(p for p in stage.rglob("*") if p.is_dir())]:
        d.chmod(0o755)


def _copyright() -> str:
    return (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: updater\n\n"
        "Files: *\n"
        "License: Apache-2.0\n"
        " On Debian systems, the full text of the Apache License version 2.0 can be\n"
        " found in /usr/share/common-licenses/Apache-2.0.\n"
    )


def deb_name(ver: str | None = None) -> str:
    return f"{PACKAGE}_{ver or version()}_all.deb"


def build_deb(out_dir: Path) -> Path:
    """Build ``out_dir/updater_<version>_all.deb`` and return its path (replacing an old one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / deb_name()
    with tempfile.TemporaryDirectory(prefix="deb-", dir=out_dir) as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        stage_tree(stage)
        partial = Path(tmp) / target.name
        run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage), str(partial)],
            env={**os.environ, "SOURCE_DATE_EPOCH": _source_date()},
            timeout=300,
        )
        shutil.move(partial, target)
    return target


def _source_date() -> str:
    """The newest mtime of the packaged sources (unchanged sources: the same file times)."""
    newest = max((ROOT / rel).stat().st_mtime for rel in module_files())
    return str(int(newest))


# ---- a bookworm root to install it into (tests, the image build) ----------------------------

SUITE = "bookworm"
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
MMDEBSTRAP_OPTS = (
    "--variant=minbase",
    "--format=tar",
    # the machine's clock may be past a snapshot's Valid-Until; the packages are still signed
    '--aptopt=Acquire::Check-Valid-Until "false"',
)


def apt_mirror(sources: Sequence[Path] = SOURCES, suite: str = SUITE) -> str:
    """The first mirror apt's own sources name for ``suite`` (one-line or deb822 format)."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for path in files:
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.MULTILINE))
            suites, types = fields.get("Suites", "").split(), fields.get("Types", "").split()
            if suite in suites and "deb" in types and "URIs" in fields:
                return str(fields["URIs"].split()[0])
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return str(words[1])
    raise RuntimeError(f"apt's sources name no mirror for {suite} ({', '.join(map(str, sources))})")


def root_packages() -> tuple[str, ...]:
    """What the bookworm root holds besides minbase: the .deb's Depends and Recommends."""
    return tuple(sorted({d.package for d in DEPENDS} | set(RECOMMENDS)))


def bookworm_root(cache: Path | None = None, packages: Sequence[str] | None = None) -> Path:
    """A tarball of a bookworm root (``mmdebstrap --variant=minbase``) with ``packages``
    (default :func:`root_packages`) installed from the mirror apt uses here.

    Cached under ``cache`` (default: devtools.vm's cache dir) by the hash of its
    inputs (suite, mirror, options, packages): a second call returns at once.
    """
    cache = cache or cache_dir()
    pkgs = sorted(packages if packages is not None else root_packages())
    mirror = apt_mirror()
    key = hashlib.sha256("\n".join([SUITE, mirror, *MMDEBSTRAP_OPTS, *pkgs]).encode()).hexdigest()[
        :16
    ]
    target = cache / f"{SUITE}-root-{key}.tar"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # the name ends in .tar and the format is named: mmdebstrap picks a directory
    # for a name it does not know
    partial = cache / f"{SUITE}-root-{key}.partial-{os.getpid()}.tar"
    try:
        run(
            [
                "mmdebstrap",
                *MMDEBSTRAP_OPTS,
                f"--include={','.join(pkgs)}",
                SUITE,
                str(partial),
                mirror,
            ],
            timeout=1800,
        )
        partial.rename(target)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = p.parse_args()
    print(build_deb(args.out))


if __name__ == "__main__":
    main()
