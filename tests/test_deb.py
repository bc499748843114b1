"""The agent as a Debian package (devtools/deb.py, `make deb`).

Quick: the .deb built here holds every module file, the entry script, the
units, D-Bus policy, tmpfiles.d and the conffile in Debian's places, with
control fields dpkg reads back and executable maintainer scripts.

Slow (root): the .deb installed with apt into a bookworm root made by
mmdebstrap, so its Depends come from Debian at exactly bookworm's versions;
there `updatectl` verifies and installs a signed release into a disk image
(file:// repository), and `dpkg -r` / `dpkg --purge` leave nothing running and
nothing behind but the conffile (and the state, until purge).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import completion, deb, manpage
from devtools.fsimage import make_usr_image
from devtools.gpgkeys import SigningKey
from devtools.host import provision
from updater.clock import SystemClock
from updater.release import ReleaseRequest, publish
from updater.run import run

pytestmark = pytest.mark.xdist_group("serial")  # one worker, one at a time: tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deb.build_deb(tmp_path_factory.mktemp("deb"))


def contents(path: Path) -> dict[str, str]:
    """Path in the package -> its ``ls -l`` mode string."""
    out: dict[str, str] = {}
    for line in run(["dpkg-deb", "--contents", str(path)]).text.splitlines():
        fields = line.split(None, 5)
        name = fields[5].split(" -> ")[0]
        out[name.removeprefix(".").rstrip("/") or "/"] = fields[0]
    return out


def field(path: Path, name: str) -> str:
    return run(["dpkg-deb", "--field", str(path), name]).text.strip()


def test_name_and_control_fields(built: Path) -> None:
    ver = deb.version()
    assert built.name == f"updater_{ver}_all.deb"
    assert field(built, "Package") == "updater"
    assert field(built, "Version") == ver
    assert field(built, "Architecture") == "all"
    depends = [d.strip() for d in field(built, "Depends").split(",")]
    for want in (
        "python3-requests",
        "python3-gnupg",
        "python3-structlog",
        "python3-zstandard",
        "python3-prometheus-client",
        "python3-defusedxml",
        "python3-dbus-fast",
        "python3-etcd3gw",
        "gnupg",
    ):
        assert any(d.split()[0] == want for d in depends), f"Depends lacks {want}: {depends}"
    for d in depends:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]+( \(>= [0-9][0-9A-Za-z.+~-]*\))?", d), d
    assert int(field(built, "Installed-Size")) > 100  # KiB


def test_every_module_and_dist_file_is_in_place(built: Path) -> None:
    listing = contents(built)
    for rel in deb.module_files():
        where = f"/{deb.DIST_PACKAGES}/{rel}"
        assert listing.get(where) == "-rw-r--r--", (where, listing.get(where))
    assert not [p for p in listing if "__pycache__" in p or p.endswith(".pyc")]
    assert listing["/usr/bin/updatectl"] == "-rwxr-xr-x"
    for unit in deb.UNITS:
        assert f"/lib/systemd/system/{unit}" in listing
    for place in (deb.DBUS_POLICY, deb.TMPFILES, deb.SITE_CONFIG, f"{deb.DOC_DIR}/README.md"):
        assert f"/{place}" in listing, place
    # every module of the three packages is shipped (as the source tree has them), nothing else
    sources = {
        f"/{deb.DIST_PACKAGES}/{path.relative_to(deb.ROOT)}"
        for pkg in ("updater", "partitions", "policies")
        for path in (deb.ROOT / pkg).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert {p for p in listing if p.endswith(".py")} == sources
    assert any(p.endswith("/updater/compose.py") for p in listing)


def test_man_page_and_completions_are_shipped(built: Path, tmp_path: Path) -> None:
    """updatectl(8), gzipped as Debian wants, and both completions where man-db, bash-
    completion and zsh look; generated from this tree's parser at build time."""
    listing = contents(built)
    for place in (deb.MAN_PAGE, deb.BASH_COMPLETION, deb.ZSH_COMPLETION):
        assert listing.get(f"/{place}") == "-rw-r--r--", place
    run(["dpkg-deb", "--extract", str(built), str(tmp_path / "x")])
    page = gzip.decompress((tmp_path / "x" / deb.MAN_PAGE).read_bytes()).decode()
    assert page == manpage.render(deb.version())
    assert (tmp_path / "x" / deb.BASH_COMPLETION).read_text() == completion.bash()
    assert (tmp_path / "x" / deb.ZSH_COMPLETION).read_text() == completion.zsh()
    shown = run(
        ["man", "-l", str(tmp_path / "x" / deb.MAN_PAGE)], env={**os.environ, "MANWIDTH": "80"}
    )
    assert "updatectl lock status" in shown.text


def test_maintainer_scripts_and_conffiles(built: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    run(["dpkg-deb", "--control", str(built), str(control)])
    for script in ("postinst", "prerm", "postrm"):
        path = control / script
        assert path.stat().st_mode & 0o111 == 0o111, f"{script} is not executable"
        assert path.read_text().startswith("#!/bin/sh\nset -e\n")
        run(["bash", "-n", str(path)])  # parses (dash's syntax is a subset)
    assert (control / "conffiles").read_text().split() == [f"/{c}" for c in deb.CONFFILES]
    postinst = (control / "postinst").read_text()
    for unit in deb.UNITS:
        assert unit in postinst
    assert "deb-systemd-helper enable" in postinst
    assert "deb-systemd-helper purge" in (control / "prerm").read_text()
    # md5sums name every shipped file but the conffile
    listing = contents(built)
    files = {p for p, mode in listing.items() if mode.startswith("-")}
    summed = {
        "/" + line.split(None, 1)[1] for line in (control / "md5sums").read_text().splitlines()
    }
    assert summed == files - {f"/{c}" for c in deb.CONFFILES}


def test_site_config_is_the_example_with_every_setting_commented(
    built: Path, tmp_path: Path
) -> None:
    run(["dpkg-deb", "--extract", str(built), str(tmp_path / "x")])
    site = (tmp_path / "x" / deb.SITE_CONFIG).read_text()
    assert all(v == {} for v in tomllib.loads(site).values())  # sections only
    example = (deb.DIST / "config.d" / "50-example.toml").read_text()
    assert tomllib.loads(example)["source"]["url"]  # the example does set keys
    assert '# url = "https://updates.example.com/os"' in site


# ---- on bookworm -----------------------------------------------------------------------------


def processes_in(root: Path) -> list[int]:
    """Processes whose root directory is ``root`` (started inside the chroot)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(root):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


IGNORED = (  # what apt and dpkg keep about their own work
    "/var/lib/dpkg",
    "/var/lib/apt",
    "/var/cache/apt",
    "/var/cache/debconf",
    "/var/log",
    "/tmp",
    "/srv",
    "/proc",
    "/dev",
)


def tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = "/" + str(Path(dirpath, name).relative_to(root))
            if not rel.startswith(IGNORED):
                out.add(rel)
    return out


@pytest.fixture
def bookworm(tmp_path: Path) -> Iterator[Path]:
    base = deb.bookworm_root()
    root = tmp_path / "bookworm"
    root.mkdir()
    run(["tar", "-x", "-f", str(base), "-C", str(root), "--numeric-owner"], timeout=600)
    try:
        yield root
    finally:
        for pid in processes_in(root):
            os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)


def chroot(root: Path, *argv: str, timeout: float = 300) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return run(["chroot", str(root), *argv], env=env, timeout=timeout).text


@pytest.mark.slow
@pytest.mark.root
def test_installs_runs_and_removes_cleanly_on_bookworm(
    bookworm: Path, built: Path, release_key: SigningKey, tmp_path: Path
) -> None:
    root = bookworm
    before = tree(root)
    shutil.copy(built, root / "tmp" / built.name)
    # the Depends are met by bookworm's own packages (no download: they are all in the root)
    chroot(root, "apt-get", "install", "-y", f"/tmp/{built.name}", timeout=600)
    installed = dict(
        line.split("\t")
        for line in chroot(root, "dpkg-query", "-W", *(d.package for d in deb.DEPENDS)).splitlines()
    )
    assert installed["python3-dbus-fast"].startswith("1.84"), installed  # bookworm's, not PyPI's
    listing = chroot(root, "dpkg", "-L", "updater")
    assert "/usr/lib/python3/dist-packages/updater/compose.py" in listing
    # the units are enabled (no systemd runs in a chroot: deb-systemd-helper's links)
    for unit in deb.UNITS:
        assert (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink(), unit

    assert "updatectl" in chroot(root, "updatectl", "--help")
    chroot(root, "python3", "-c", "import updater.compose, updater.dbus_api, policies.etcdlock")

    # a real check and install: a signed release (file://) into a GPT disk image
    srv = root / "srv"
    images = tmp_path / "images"
    images.mkdir()
    first = make_usr_image(images / "1.0.0.img", "1.0.0", size=16 << 20, payload=1 << 20)
    second = make_usr_image(images / "1.1.0.img", "1.1.0", size=16 << 20, payload=1 << 20)
    host = provision(srv / "host", slot_size=32 << 20, first_image=first, first_version="1.0.0")
    shutil.copy(release_key.public_key, srv / "release-key.asc")
    publish(
        ReleaseRequest(
            image=second,
            version="1.1.0",
            repo=srv / "repo",
            gnupghome=release_key.gnupghome,
            key_id=release_key.fingerprint,
        ),
        SystemClock().now(),
    )
    config = srv / "updater.toml"
    config.write_text(
        "\n".join(
            [
                "[source]",
                'url = "file:///srv/repo"',
                'keyring = ["/srv/release-key.asc"]',
                "[disk]",
                'device = "/srv/host/disk.img"',
                'kernel_cmdline = "/srv/host/cmdline"',
                "[agent]",
                'state_dir = "/srv/host/state"',
                'os_release = "/srv/host/os-release"',
                'reboot_sentinel = "/srv/host/reboot-required"',
                "",
            ]
        )
    )
    out = chroot(root, "updatectl", "--config", "/srv/updater.toml", "check", "--install", "--json")
    assert '"1.1.0"' in out, out
    flags = {s.slot.label: s.flags for s in host.boot_control().slots()}
    assert flags["USR-B"].bootable and flags["USR-B"].priority > flags["USR-A"].priority, flags
    assert host.slot_bytes("USR-B", second.stat().st_size) == second.read_bytes()
    assert host.reboot() == "USR-B"
    assert not processes_in(root), "the check left processes running (gpg-agent?)"

    # remove: nothing running, nothing left but the conffile and the state
    chroot(root, "dpkg", "-r", "updater")
    assert not processes_in(root)
    left = tree(root) - before
    assert left <= {"/etc/updater", "/etc/updater/config.d", f"/{deb.SITE_CONFIG}"} | {
        p for p in left if p.startswith("/var/lib/updater")
    }, sorted(left)
    assert f"/{deb.SITE_CONFIG}" in left
    chroot(root, "dpkg", "--purge", "updater")
    assert tree(root) - before == set()
