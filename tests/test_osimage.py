"""The OS image: built from Debian packages, booted for real under QEMU with a real systemd.

The fast tests check the recipe's pieces without building anything. The slow
one builds the image (cached by the hash of its inputs: the first build
bootstraps Debian with mmdebstrap, later ones take seconds), boots a copy of
its disk under QEMU (TCG, OVMF + systemd-boot, its own ``-uuid``) and asserts on
what a report unit inside the guest printed on the serial console.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from devtools import osimage, vm
from updater import config
from updater.run import Completed

pytestmark = pytest.mark.xdist_group("serial")  # one worker, one at a time: tests/conftest.py

# ---- the recipe, without building -------------------------------------------------------------


def test_apt_sources_are_read_from_both_formats(tmp_path: Path) -> None:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
        "deb http://mirror.example/debian bullseye main\n"
    )
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://src.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm-updates\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (etc / "sources.list.d" / "other.list").write_text(
        "deb http://vendor.example/apt stable main\n"
    )
    assert [s.line() for s in osimage.host_sources("bookworm", etc)] == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]
    with pytest.raises(osimage.ImageError, match="no apt source for Debian trixie"):
        osimage.host_sources("trixie", etc)


def test_the_image_config_is_one_the_agent_accepts(tmp_path: Path) -> None:
    settings = osimage.ImageConfig(repo_url="http://10.0.2.2:8080/os", keyring=b"key")
    path = tmp_path / "10-image.toml"
    path.write_text(osimage.vendor_config(settings))
    cfg = config.load(path)
    assert cfg.disk.slots == osimage.SLOT_LABELS
    assert cfg.disk.backend == "systemd-boot"
    assert cfg.disk.esp_partition == "EFI-SYSTEM"
    assert cfg.source.url == "http://10.0.2.2:8080/os"
    assert cfg.source.keyring == (Path(osimage.KEYRING_PATH),)
    template = config.entry_template(cfg.systemd_boot)
    assert template.linux == "/{label}/vmlinuz"
    assert template.initrd == ("/{label}/initrd.img",)
    assert template.options.startswith("root=PARTUUID={partuuid} ro ")


def test_settings_key_the_cache() -> None:
    base = osimage.ImageConfig()
    keys = {
        osimage.image_key("b", s)
        for s in (
            base,
            osimage.ImageConfig(version="1.1.0"),
            osimage.ImageConfig(repo_url="http://x/"),
            osimage.ImageConfig(extra_files=(("/etc/x", b"1", 0o644),)),
        )
    }
    assert len(keys) == 4
    assert osimage.image_key("b", base) == osimage.image_key("b", osimage.ImageConfig())
    assert osimage.image_key("b", base) != osimage.image_key("c", base)


def test_configure_tree_makes_a_read_only_root_with_var_on_state(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("etc/systemd/system/timers.target.wants", "usr/lib"):
        (tree / d).mkdir(parents=True)
    for timer in ("apt-daily.timer", "fstrim.timer"):
        (tree / "etc/systemd/system/timers.target.wants" / timer).symlink_to(f"/lib/{timer}")
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    (tree / "usr/lib/os-release").write_text('ID=debian\nIMAGE_VERSION=0.9\nVERSION_ID="12"\n')
    settings = osimage.ImageConfig(
        version="1.2.3",
        repo_url="http://10.0.2.2:8080/os",
        keyring=b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n",
        extra_files=(("/usr/libexec/x", b"#!/bin/sh\n", 0o755),),
    )
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], **_: object) -> Completed:
        calls.append(list(argv))
        return Completed(tuple(argv), 0, b"", b"")

    osimage.configure_tree(tree, settings, runner=runner)
    # the package enabled the agent; the image adds the network and the credential
    enable = ["chroot", str(tree), "systemctl", "enable", "systemd-networkd.service"]
    assert calls == [[*enable, osimage.CREDENTIAL_UNIT_NAME]]
    assert (tree / osimage.NETWORK_FILE).read_text().startswith("[Match]\nType=ether\n")
    assert not (tree / osimage.AGENT_DROPIN).exists()  # a repository is baked in
    assert (tree / "etc/machine-id").read_bytes() == b""
    assert not (tree / "etc/resolv.conf").exists()
    assert os.readlink(tree / "etc/systemd/system/systemd-firstboot.service") == "/dev/null"
    timers = tree / "etc/systemd/system/timers.target.wants"
    assert sorted(p.name for p in timers.iterdir()) == ["fstrim.timer"]  # no apt on a schedule
    fstab = [line.split() for line in (tree / "etc/fstab").read_text().splitlines()]
    mounts = {f[1]: f for f in fstab if f and not f[0].startswith("#")}
    assert mounts["/var"][:3] == ["PARTLABEL=STATE", "/var", "ext4"]
    assert mounts["/tmp"][:3] == ["tmpfs", "/tmp", "tmpfs"]
    assert "/" not in mounts  # the boot entry's root=PARTUUID= ro decides
    release = (tree / "usr/lib/os-release").read_text().splitlines()
    assert "IMAGE_VERSION=1.2.3" in release and "IMAGE_VERSION=0.9" not in release
    assert 'VERSION_ID="12"' in release
    assert config.load(tree / osimage.VENDOR_CONFIG).source.url == "http://10.0.2.2:8080/os"
    assert (tree / osimage.KEYRING_PATH.lstrip("/")).read_bytes() == settings.keyring
    assert (tree / "usr/libexec/x").stat().st_mode & 0o777 == 0o755

    calls.clear()
    osimage.configure_tree(tree, osimage.ImageConfig(enable=("x.service",)), runner=runner)
    assert calls == [[*enable, osimage.CREDENTIAL_UNIT_NAME, "x.service"]]
    # no repository baked in: the agent runs when the credential gave it one
    assert (
        "ConditionPathExists=" + osimage.CREDENTIAL_DROPIN
        in (tree / osimage.AGENT_DROPIN).read_text()
    )
    unit = (tree / "usr/lib/systemd/system" / osimage.CREDENTIAL_UNIT_NAME).read_text()
    assert f"/run/credentials/@system/{osimage.CREDENTIAL} {osimage.CREDENTIAL_DROPIN}" in unit
    assert "[source]" not in (tree / osimage.VENDOR_CONFIG).read_text()
    assert config.load(tree / osimage.VENDOR_CONFIG).source.url is None


def test_copy_sparse_keeps_holes_and_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as f:
        f.truncate(64 * osimage.MIB)
        f.seek(3 * osimage.MIB)
        f.write(b"a" * 4096)
        f.seek(40 * osimage.MIB)
        f.write(b"b" * 8192)
    dst = tmp_path / "dst"
    with dst.open("wb") as f:
        f.truncate(128 * osimage.MIB)
    osimage.copy_sparse(src, dst, offset=osimage.MIB)
    with dst.open("rb") as f:
        f.seek(4 * osimage.MIB)
        assert f.read(4097) == b"a" * 4096 + b"\0"
        f.seek(41 * osimage.MIB)
        assert f.read(8192) == b"b" * 8192
    assert dst.stat().st_size == 128 * osimage.MIB
    assert dst.stat().st_blocks * 512 < osimage.MIB  # only the data was written


# ---- built and booted -------------------------------------------------------------------------

# Runs once multi-user.target is reached (and the agent is up): prints what the
# test asserts on to the console, then powers the machine off.
REPORT_SCRIPT = r"""#!/bin/sh
part() {
    dev=$(findmnt -n -o SOURCE "$1")
    name=${dev#/dev/}
    label=$(sed -n 's/^PARTNAME=//p' "/sys/class/block/$name/uevent")
    echo "$label $dev $(findmnt -n -o FSTYPE,OPTIONS "$1" | tr -s ' ' ',')"
}
echo  # off the line a getty's login prompt may have left open
echo "REPORT multi-user=$(systemctl is-active multi-user.target)"
failed=$(systemctl list-units --state=failed --plain --no-legend | cut -d' ' -f1)
echo "REPORT failed=$(echo $failed)"
echo "REPORT machine-id=$(cat /etc/machine-id)"
echo "REPORT root=$(part /)"
echo "REPORT var=$(part /var)"
echo "REPORT tmp=$(findmnt -n -o FSTYPE /tmp)"
echo "REPORT version=$(sed -n 's/^IMAGE_VERSION=//p' /usr/lib/os-release)"
echo "REPORT kernel=$(uname -r)"
echo "REPORT cmdline=$(cat /proc/cmdline)"
echo "REPORT updater=$(systemctl is-active updater.service)"
echo "REPORT uptime=$(cut -d' ' -f1 /proc/uptime)"
updatectl status --json > /tmp/status.json 2> /tmp/status.err
echo "REPORT status-rc=$?"
echo "REPORT status=$(python3 -m json.tool --compact < /tmp/status.json 2>&1)"
echo "REPORT status-err=$(tr '\n' ' ' < /tmp/status.err)"
echo "REPORT end=yes"
systemctl poweroff --no-block
"""
REPORT_UNIT = """[Unit]
Description=Report this boot on the console, then power off (test image only)
After=multi-user.target updater.service updater-mark-good.service

[Service]
Type=oneshot
ExecStart=/usr/libexec/osimage-test-report
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
"""
TEST_SETTINGS = osimage.ImageConfig(
    version="1.0.0",
    # nothing answers there: the agent starts, and would poll after its first delay
    repo_url="http://10.0.2.2:9/os",
    extra_files=(
        ("/usr/libexec/osimage-test-report", REPORT_SCRIPT.encode(), 0o755),
        ("/usr/lib/systemd/system/osimage-test-report.service", REPORT_UNIT.encode(), 0o644),
    ),
    enable=("osimage-test-report.service",),
)


@pytest.mark.slow
@pytest.mark.root
def test_the_image_boots_read_only_root_a_with_state_and_the_agent() -> None:
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap --mode=root needs root")
    image = osimage.build_image(TEST_SETTINGS)
    again = osimage.build_image(TEST_SETTINGS)
    assert again.cached and again.disk == image.disk
    assert again.build_seconds < 30, f"a cached build took {again.build_seconds:.1f}s"
    assert image.layout.by_label("ROOT-A").size == osimage.SLOT_SIZE
    esp = vm.VmDisk(image.disk, image.layout, "systemd-boot", image.layout.by_label("EFI-SYSTEM"))
    assert vm.esp_list(esp, "/ROOT-A") == ["initrd.img", "vmlinuz"]
    assert vm.esp_list(esp, "/loader/entries") == ["updater-ROOT-A.conf"]  # good: no counter
    assert vm.esp_read(esp, "/ROOT-A/vmlinuz") == image.vmlinuz.read_bytes()

    machine = uuid.uuid4()
    with tempfile.TemporaryDirectory(prefix="osimage-test-") as tmp:  # ~1 GiB: gone pass or fail
        disk = Path(tmp) / "disk.img"
        osimage.copy_sparse(image.disk, disk)  # a boot writes to the disk; the cache stays clean
        booted = osimage.boot(disk, uuid=machine, timeout_s=400)
    report = booted.reports()
    assert "end" in report, f"no report (QEMU {booted.returncode}); console:\n{booted.tail()}"
    assert not booted.timed_out, booted.tail()  # it powered itself off

    assert report["multi-user"] == "active"
    assert report["failed"] == "", booted.tail()
    assert report["machine-id"] == machine.hex
    root_label, _, root_mount = report["root"].split()
    assert root_label == "ROOT-A"
    assert root_mount.startswith("ext4,ro,")
    var_label, _, var_mount = report["var"].split()
    assert var_label == "STATE"
    assert var_mount.startswith("ext4,rw,")
    assert report["tmp"] == "tmpfs"
    assert report["version"] == "1.0.0"
    assert report["kernel"] == image.kernel_release
    assert "initrd=\\ROOT-A\\initrd.img" in report["cmdline"]  # the slot's own boot files
    assert report["updater"] == "active"

    assert report["status-rc"] == "0", report["status-err"]
    status = json.loads(report["status"])
    assert status["booted"] == "ROOT-A"
    assert status["booted_version"] == "1.0.0"
    assert [s["condition"] for s in status["slots"]] == ["good", None]
    assert status["agent"]["state"] == "IDLE", status  # the agent answered on D-Bus
    print(
        f"\nimage build {image.build_seconds:.1f}s (cached: {image.cached}), "
        f"cached build {again.build_seconds:.1f}s, boot to report {report['uptime']}s "
        f"guest uptime, QEMU {booted.seconds:.1f}s"
    )
