"""The composition root builds the boot-control backend the configuration names, over
the ESP it names (a mounted directory, a partition edited with mtools, or found)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.espimage import ESP_LABEL, EspDisk, make_esp_disk
from partitions.filestore import DirStore
from partitions.gptprio import GptPrioBootControl
from partitions.grubenv import GrubEnvControl, new_env_block
from partitions.mtools import MtoolsStore
from partitions.sdboot import SdBootControl
from updater import compose, config
from updater.errors import DiskError

MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> EspDisk:
    return make_esp_disk(tmp_path / "disk.img", slot_size=MiB)


def load(tmp_path: Path, disk: EspDisk, text: str) -> config.Config:
    path = tmp_path / "updater.toml"
    path.write_text(
        f'[disk]\ndevice = "{disk.path}"\nkernel_cmdline = "{tmp_path / "cmdline"}"\n{text}'
    )
    return config.load(path)


def test_gpt_prio_is_the_default(tmp_path: Path, disk: EspDisk) -> None:
    assert isinstance(compose.boot_control(load(tmp_path, disk, "")), GptPrioBootControl)


def test_systemd_boot_on_the_esp_partition_through_mtools(tmp_path: Path, disk: EspDisk) -> None:
    disk.esp.makedirs("loader/entries")
    disk.esp.makedirs("os/USR-A")
    disk.esp.write("os/USR-A/linux", b"kernel")
    cfg = load(
        tmp_path,
        disk,
        f'backend = "systemd-boot"\nesp_partition = "{ESP_LABEL}"\n'
        '[systemd-boot]\nlinux = "/os/{label}/linux"\ninitrd = []\ntries = 3\n'
        'options = "root=PARTUUID={partuuid} rw"\n'
        f'efivars = "{tmp_path / "efivars"}"\n',
    )
    control = compose.boot_control(cfg)
    assert isinstance(control, SdBootControl)
    assert isinstance(control.store, MtoolsStore)
    assert control.store.offset == disk.layout.by_label(ESP_LABEL).offset
    assert control.tries == 3
    a = control.slots()[0].slot
    control.make_primary(a)
    assert disk.esp.list("loader/entries") == ["updater-USR-A+3-0.conf"]
    text = disk.esp.read("loader/entries/updater-USR-A+3-0.conf").decode()
    assert "linux /os/USR-A/linux\n" in text
    assert f"options root=PARTUUID={a.part_uuid} rw\n" in text
    assert control.primary() == a


def test_grub_env_in_a_mounted_directory(tmp_path: Path, disk: EspDisk) -> None:
    boot = tmp_path / "boot"
    (boot / "grub2").mkdir(parents=True)
    (boot / "grub2" / "grubenv").write_bytes(new_env_block())
    cfg = load(
        tmp_path,
        disk,
        f'backend = "grub-env"\nesp = "{boot}"\n'
        '[grub-env]\npath = "grub2/grubenv"\nnames = ["usr_a", "usr_b"]\n',
    )
    control = compose.boot_control(cfg)
    assert isinstance(control, GrubEnvControl) and isinstance(control.store, DirStore)
    control.mark_good(control.slots()[1].slot)
    block = (boot / "grub2" / "grubenv").read_bytes()
    assert len(block) == 1024
    assert b"usr_b_OK=1\n" in block and b"ORDER=usr_a usr_b\n" in block


@pytest.mark.parametrize(
    ("backend", "marker"), [("systemd-boot", "loader/entries"), ("grub-env", "grub/grubenv")]
)
def test_the_esp_is_found_among_the_usual_mount_points(
    tmp_path: Path, disk: EspDisk, monkeypatch: pytest.MonkeyPatch, backend: str, marker: str
) -> None:
    candidates = (tmp_path / "efi", tmp_path / "boot" / "efi", tmp_path / "boot")
    for c in candidates:
        c.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(compose, "ESP_CANDIDATES", candidates)
    cfg = load(tmp_path, disk, f'backend = "{backend}"\n')
    with pytest.raises(DiskError) as err:
        compose.boot_control(cfg)
    assert err.value.kind == "esp_invalid"
    assert all(str(c) in err.value.message for c in candidates) and marker in err.value.message
    assert err.value.hint and "[disk] esp" in err.value.hint
    # Nothing was made while looking.
    assert [sorted(c.rglob("*")) for c in candidates[:2]] == [[], []]
    (candidates[1] / marker).parent.mkdir(parents=True)
    if backend == "grub-env":
        (candidates[1] / marker).write_bytes(new_env_block())
    else:
        (candidates[1] / marker).mkdir()
    control = compose.boot_control(cfg)
    assert isinstance(control, SdBootControl | GrubEnvControl)
    assert isinstance(control.store, DirStore) and control.store.root == candidates[1]


def test_an_esp_partition_that_is_not_there(tmp_path: Path, disk: EspDisk) -> None:
    cfg = load(tmp_path, disk, 'backend = "systemd-boot"\nesp_partition = "BOOT"\n')
    before = disk.path.read_bytes()
    with pytest.raises(DiskError) as err:
        compose.boot_control(cfg)
    assert err.value.kind == "esp_invalid"
    assert str(disk.path) in err.value.message and "'BOOT'" in err.value.message
    assert ESP_LABEL in err.value.message  # what there is
    assert disk.path.read_bytes() == before
