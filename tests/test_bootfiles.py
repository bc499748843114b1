"""Boot files in the manifest (parsing, bounds) and the ESP writer (crash-safe, never the
booted slot's directory), on a mounted directory and inside a disk image through mtools."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from devtools.espimage import esp_store, make_esp_disk
from devtools.gpgkeys import SigningKey
from devtools.host import EspHost, Host, esp_files, provision_esp_host
from devtools.repo_server import Fault
from partitions.bootcontrol import Slot
from partitions.filestore import StreamingStore
from partitions.firmware import kernel_cmdline
from tests.conftest import HOST_SLOT_SIZE, Repo, updatectl
from tests.omaha_server import Answer, OmahaServer, Release
from updater import config
from updater.bootfiles import EspBootFiles, checked
from updater.compose import boot_files_unused
from updater.errors import DiskError, DownloadError, VerificationError
from updater.manifest import (
    MAX_BOOT_FILE_BYTES,
    MAX_BOOT_FILES,
    BootFileRef,
    Compression,
    ImageRef,
    Manifest,
    parse,
    serialize,
)
from updater.release import Published

T0 = datetime(2026, 11, 28, tzinfo=UTC)
KERNEL = b"\x7fkernel 1.1.0 " * 1000
INITRD = b"initrd 1.1.0 " * 3000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(*boot: BootFileRef) -> Manifest:
    return Manifest(
        channel="stable",
        version="1.1.0",
        created=T0,
        expires=T0.replace(year=2027),
        image=ImageRef("../images/1.1.0/usr.img", 10, "1" * 64, Compression.NONE, 10, "1" * 64),
        boot=boot,
    )


def boot_ref(name: str, data: bytes) -> BootFileRef:
    return BootFileRef(name, f"../images/1.1.0/boot/{name}", len(data), sha(data))


# ---- the manifest ----------------------------------------------------------------------------


def test_boot_files_round_trip() -> None:
    m = manifest(boot_ref("vmlinuz", KERNEL), boot_ref("initrd.img", INITRD))
    doc = json.loads(serialize(m))
    assert doc["boot"][0] == {
        "name": "vmlinuz",
        "url": "../images/1.1.0/boot/vmlinuz",
        "size": len(KERNEL),
        "sha256": sha(KERNEL),
    }
    assert parse(serialize(m)) == m


def test_no_boot_key_without_boot_files() -> None:
    m = manifest()
    assert "boot" not in json.loads(serialize(m))
    assert parse(serialize(m)).boot == ()


def with_boot(boot: Any) -> bytes:
    doc = json.loads(serialize(manifest()))
    doc["boot"] = boot
    return json.dumps(doc).encode()


GOOD = {"name": "vmlinuz", "url": "boot/vmlinuz", "size": 10, "sha256": "a" * 64}


@pytest.mark.parametrize(
    ("boot", "words"),
    [
        ({"name": "vmlinuz"}, "field boot must be list"),
        ([1], "boot[0] must be dict"),
        ([{**GOOD, "name": ".vmlinuz"}], "not a plain file name"),
        ([{**GOOD, "name": "../vmlinuz"}], "not a plain file name"),
        ([{**GOOD, "name": "a/b"}], "not a plain file name"),
        ([{**GOOD, "name": ""}], "not a plain file name"),
        ([{**GOOD, "name": "x" * 65}], "not a plain file name"),
        ([{**GOOD, "name": "vmlinuz*"}], "not a plain file name"),
        ([{**GOOD, "name": "vmlinuz\n"}], "not a plain file name"),
        ([GOOD, {**GOOD, "name": "VMLINUZ"}], "listed twice"),
        ([{**GOOD, "size": 0}], "boot[0].size must be positive"),
        ([{**GOOD, "size": True}], "boot[0].size must be int"),
        ([{**GOOD, "size": MAX_BOOT_FILE_BYTES + 1}], "above the cap"),
        ([{**GOOD, "sha256": "A" * 64}], "lowercase hex"),
        ([{**GOOD, "url": ""}], "boot[0].url is empty"),
        ([{**GOOD, "url": "a b"}], "white space"),
        ([{k: v for k, v in GOOD.items() if k != "sha256"}], "missing field boot[0].sha256"),
        (
            [{**GOOD, "name": f"f{i}"} for i in range(MAX_BOOT_FILES + 1)],
            f"at most {MAX_BOOT_FILES}",
        ),
    ],
)
def test_bad_boot_files_are_malformed(boot: Any, words: str) -> None:
    with pytest.raises(VerificationError) as err:
        parse(with_boot(boot))
    assert err.value.kind == "manifest_malformed"
    assert words in err.value.message


def test_the_cap_and_the_count_are_allowed() -> None:
    boot = [{**GOOD, "name": f"f{i}", "size": MAX_BOOT_FILE_BYTES} for i in range(MAX_BOOT_FILES)]
    assert len(parse(with_boot(boot)).boot) == MAX_BOOT_FILES


def test_unknown_keys_in_a_boot_file_are_ignored() -> None:
    assert parse(with_boot([{**GOOD, "cmdline": "quiet"}])).boot == (
        BootFileRef("vmlinuz", "boot/vmlinuz", 10, "a" * 64),
    )


# ---- the writer, on a mounted ESP and inside a disk image -------------------------------------


@pytest.fixture(params=["dir", "mtools"])
def esp(request: pytest.FixtureRequest, tmp_path: Path) -> StreamingStore:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=1024 * 1024)
    store = esp_store(disk, request.param, tmp_path / "esp")
    assert isinstance(store, StreamingStore)
    return store


A = Slot("USR-A", 2, UUID(int=1), Path("/dev/x"), 0, 1)
B = Slot("USR-B", 3, UUID(int=2), Path("/dev/x"), 0, 1)


def names(store: StreamingStore, directory: str) -> list[str]:
    """As FAT sees them: mtools stores a lower-case 8.3 name as its upper-case short name."""
    return sorted(n.lower() for n in store.list(directory))


def pieces(data: bytes, size: int = 7000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_write_lands_under_the_slot_directory(esp: StreamingStore) -> None:
    files = EspBootFiles(esp)
    ref = boot_ref("vmlinuz", KERNEL)
    assert files.write(B, "vmlinuz", checked(pieces(KERNEL), ref, "u"), booted=A) == len(KERNEL)
    assert esp.read("USR-B/vmlinuz") == KERNEL
    assert names(esp, "USR-B") == ["vmlinuz"]
    assert files.digest(B, "vmlinuz") == (len(KERNEL), sha(KERNEL))
    assert files.digest(B, "initrd.img") is None
    # a second release replaces it
    new = KERNEL[::-1]
    files.write(B, "vmlinuz", checked(pieces(new), boot_ref("vmlinuz", new), "u"), booted=A)
    assert esp.read("USR-B/vmlinuz") == new and names(esp, "USR-B") == ["vmlinuz"]


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (KERNEL[:-1] + b"X", "hash_mismatch"),
        (KERNEL[:-1], "size_mismatch"),
        (KERNEL + b"X", "size_mismatch"),
    ],
)
def test_a_file_that_is_not_the_manifests_never_takes_the_name(
    esp: StreamingStore, data: bytes, kind: str
) -> None:
    files = EspBootFiles(esp)
    esp.makedirs("USR-B")
    esp.write("USR-B/vmlinuz", b"the old kernel")
    with pytest.raises(VerificationError) as err:
        files.write(B, "vmlinuz", checked(pieces(data), boot_ref("vmlinuz", KERNEL), "u"), booted=A)
    assert err.value.kind == kind
    assert esp.read("USR-B/vmlinuz") == b"the old kernel"
    assert names(esp, "USR-B") == ["vmlinuz"]  # no temporary left behind


def test_a_download_that_breaks_leaves_the_old_file(esp: StreamingStore) -> None:
    def broken() -> Iterator[bytes]:
        yield KERNEL[:5000]
        raise DownloadError("connection", "gone")

    esp.makedirs("USR-B")
    esp.write("USR-B/vmlinuz", b"the old kernel")
    with pytest.raises(DownloadError):
        EspBootFiles(esp).write(B, "vmlinuz", broken(), booted=A)
    assert esp.read("USR-B/vmlinuz") == b"the old kernel"


def test_a_leftover_temporary_is_reused(esp: StreamingStore) -> None:
    esp.makedirs("USR-B")
    esp.write("USR-B/.vmlinuz.tmp", b"half a kernel from a crash")
    EspBootFiles(esp).write(B, "vmlinuz", pieces(KERNEL), booted=A)
    assert names(esp, "USR-B") == ["vmlinuz"]


@pytest.mark.parametrize(
    "booted",
    [
        B,
        Slot("usr-b", 9, UUID(int=9), Path("/dev/x"), 0, 1),  # FAT folds case: one directory
        Slot("other", 9, UUID(int=2), Path("/dev/x"), 0, 1),  # the same partition
    ],
)
def test_the_booted_slots_directory_is_refused(esp: StreamingStore, booted: Slot) -> None:
    with pytest.raises(DiskError) as err:
        EspBootFiles(esp).write(B, "vmlinuz", pieces(KERNEL), booted=booted)
    assert err.value.kind == "esp_invalid" and "booted slot" in err.value.message
    assert not esp.exists("USR-B")


# ---- end to end: a release with a kernel and an initrd, a host booted by systemd-boot ----------

OLD_KERNEL = b"\x7fkernel 1.0.0 " * 900
OLD_INITRD = b"initrd 1.0.0 " * 2500


def esp_host_with_boot_files(
    tmp_path: Path, usr_images: dict[str, Path], repo: Repo, release_key: SigningKey
) -> EspHost:
    """A systemd-boot host on 1.0.0 from USR-A, with USR-A's own kernel and initrd."""
    return provision_esp_host(
        tmp_path / "host",
        slot_size=HOST_SLOT_SIZE,
        first_image=usr_images["1.0.0"],
        first_version="1.0.0",
        kernel=OLD_KERNEL,
        initrd=OLD_INITRD,
        repo_url=repo.url,
        keyring=release_key.public_key,
    )


@pytest.fixture
def esp_host(
    tmp_path: Path, usr_images: dict[str, Path], repo: Repo, release_key: SigningKey
) -> EspHost:
    return esp_host_with_boot_files(tmp_path, usr_images, repo, release_key)


def publish_with_boot_files(repo: Repo, image: Path, tmp_path: Path) -> Published:
    kernel, initrd = tmp_path / "vmlinuz-new", tmp_path / "initrd-new"
    kernel.write_bytes(KERNEL)
    initrd.write_bytes(INITRD)
    return repo.publish("1.1.0", image, boot_files=(("vmlinuz", kernel), ("initrd.img", initrd)))


def booted_side(m: EspHost) -> tuple[dict[str, bytes], dict[str, bytes], bytes]:
    """Everything of the booted slot USR-A: its boot files, its entry, its bytes."""
    entries = {n: b for n, b in esp_files(m.esp, "loader/entries").items() if "USR-A" in n}
    return esp_files(m.esp, "USR-A"), entries, m.host.slot_bytes("USR-A")


def test_a_release_with_boot_files_installs_them_for_the_target_slot(
    esp_host: EspHost, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    before = booted_side(esp_host)
    r = updatectl(esp_host.host, "-v", "check", "--install", "--json")
    assert r.code == 0, r.err
    esp = esp_host.esp
    assert esp.read("USR-B/vmlinuz") == KERNEL
    assert esp.read("USR-B/initrd.img") == INITRD
    assert names(esp, "USR-B") == ["initrd.img", "vmlinuz"]  # no temporary left
    assert booted_side(esp_host) == before  # USR-A's files, entry and bytes: unchanged
    # the boot files were in place before the entry that points at them was written
    lines = r.err.splitlines()
    written = [i for i, line in enumerate(lines) if "boot_file_written" in line]
    made_primary = [i for i, line in enumerate(lines) if "slot_made_primary" in line]
    assert len(written) == 2 and len(made_primary) == 1 and max(written) < made_primary[0], r.err
    # systemd-boot now boots USR-B on trial, from its own files
    (entry,) = [n for n in esp.list("loader/entries") if "USR-B" in n]
    assert entry == "updater-USR-B+1-0.conf"  # one trial boot
    text = esp.read(f"loader/entries/{entry}").decode()
    assert "linux /USR-B/vmlinuz\n" in text and "initrd /USR-B/initrd.img\n" in text
    assert esp_host.next_boot() == "USR-B"
    assert updatectl(esp_host.host, "status", "--json").json()["state"] == "update_staged"
    # the slot record keeps what was installed, for rollback to check again
    state = json.loads((esp_host.host.state_dir / "state.json").read_text())
    (record,) = [s for s in state["slots"].values() if s["label"] == "USR-B"]
    assert record["boot"] == [
        {"name": "vmlinuz", "size": len(KERNEL), "sha256": sha(KERNEL)},
        {"name": "initrd.img", "size": len(INITRD), "sha256": sha(INITRD)},
    ]


def test_boot_files_travel_through_the_omaha_source(
    esp_host: EspHost, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    """Omaha offers the package; the signed manifest beside it names the boot files, which
    the agent fetches from beside the manifest and checks exactly as from the repository."""
    package = publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path).image_path
    data = package.read_bytes()
    release = Release(
        version="1.1.0",
        codebase=f"{repo.url}/images/1.1.0/",
        package=package.name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    before = booted_side(esp_host)
    with OmahaServer(release=release, answer=Answer.UPDATE) as server:
        host = esp_host.host
        host.config.write_text(
            host.config.read_text().replace("[source]\n", '[source]\nkind = "omaha"\n')
            + f'\n[omaha]\nserver = "{server.url}"\ngroup = "stable"\nflatcar_conf = false\n'
        )
        r = updatectl(host, "-v", "check", "--install", "--json")
    assert r.code == 0, r.err
    assert esp_host.esp.read("USR-B/vmlinuz") == KERNEL
    assert esp_host.esp.read("USR-B/initrd.img") == INITRD
    assert booted_side(esp_host) == before
    assert esp_host.next_boot() == "USR-B"
    fetched = {req.path for req in repo.server.requests}
    assert {"/images/1.1.0/boot/vmlinuz", "/images/1.1.0/boot/initrd.img"} <= fetched, fetched


def flip_first_byte(repo: Repo, path: str) -> None:
    repo.server.fault(path, Fault(flip_byte_at=0))


def extra_bytes(repo: Repo, path: str) -> None:
    repo.server.fault(path, Fault(extra_bytes=4096))


def not_found(repo: Repo, path: str) -> None:
    (repo.root / path.lstrip("/")).unlink()


def unavailable(repo: Repo, path: str) -> None:
    repo.server.fault(path, Fault(status=503))


@pytest.mark.parametrize(
    ("which", "break_it", "kind"),
    [
        ("vmlinuz", flip_first_byte, "hash_mismatch"),
        ("initrd.img", flip_first_byte, "hash_mismatch"),
        ("initrd.img", extra_bytes, "too_much_data"),
        ("vmlinuz", not_found, "http_status"),
        ("initrd.img", unavailable, "http_status"),
    ],
)
def test_a_bad_boot_file_fails_the_install_and_the_slot_never_boots(
    esp_host: EspHost,
    repo: Repo,
    usr_images: dict[str, Path],
    tmp_path: Path,
    which: str,
    break_it: Callable[[Repo, str], None],
    kind: str,
) -> None:
    publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    before = booted_side(esp_host)
    break_it(repo, repo.boot_path(which))
    r = updatectl(esp_host.host, "check", "--install", "--json")
    assert r.code != 0
    assert r.json()["error"]["kind"] == kind, r.err
    assert esp_host.next_boot() == "USR-A"  # USR-B was never made the next boot
    assert not [n for n in esp_host.esp.list("loader/entries") if "USR-B" in n]
    assert booted_side(esp_host) == before
    status = updatectl(esp_host.host, "status", "--json").json()
    assert status["state"] == "idle" and status["pending_version"] is None
    # the broken file never took its name
    assert which not in names(esp_host.esp, "USR-B") or esp_host.esp.read(f"USR-B/{which}") == (
        KERNEL if which == "vmlinuz" else INITRD
    )
    # the server mends it: the next check installs the release
    repo.server.clear_faults()
    if break_it is not_found:
        publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    assert updatectl(esp_host.host, "check", "--install").code == 0
    assert esp_host.esp.read(f"USR-B/{which}") == (KERNEL if which == "vmlinuz" else INITRD)
    assert esp_host.next_boot() == "USR-B"


def test_gpt_prio_without_an_esp_refuses_a_release_with_boot_files(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    disk_before = host.disk.read_bytes()
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 3, r.err
    error = r.json()["error"]
    assert (error["category"], error["kind"]) == ("config", "missing")
    assert "boot files" in error["message"] and "[disk] esp" in error["hint"]
    assert host.disk.read_bytes() == disk_before  # nothing marked, nothing written


def boot_into(m: EspHost, label: str, version: str) -> None:
    """What systemd-boot and the booted OS tell the agent after booting ``label``."""
    slot = next(s.slot for s in m.boot_control().slots() if s.slot.label == label)
    m.host.cmdline.write_text(kernel_cmdline(slot) + "\n")
    m.host.os_release.write_text(f"ID=updater-demo\nIMAGE_VERSION={version}\n")


def test_rollback_checks_the_other_slots_boot_files(
    esp_host: EspHost, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    assert updatectl(esp_host.host, "check", "--install").code == 0
    boot_into(esp_host, "USR-B", "1.1.0")
    assert updatectl(esp_host.host, "mark-good").code == 0
    # 1.2.0 goes to USR-A, with its own kernel; USR-B's 1.1.0 files stay as they are
    new_kernel = tmp_path / "k2"
    new_kernel.write_bytes(b"kernel 1.2.0" * 100)
    repo.publish("1.2.0", usr_images["1.2.0"], boot_files=(("vmlinuz", new_kernel),))
    assert updatectl(esp_host.host, "check", "--install").code == 0
    assert esp_host.esp.read("USR-A/vmlinuz") == new_kernel.read_bytes()
    assert esp_host.esp.read("USR-B/vmlinuz") == KERNEL
    boot_into(esp_host, "USR-A", "1.2.0")
    assert updatectl(esp_host.host, "mark-good").code == 0

    # Back to 1.1.0 in USR-B: only while its boot files are the ones installed with it.
    esp_host.esp.write("USR-B/initrd.img", b"not what was installed")
    r = updatectl(esp_host.host, "rollback", "--json")
    assert r.code == 7, r.err  # refused
    assert r.json()["error"]["kind"] == "rollback_refused"
    assert "boot file initrd.img" in r.json()["error"]["message"]
    assert esp_host.next_boot() == "USR-A"
    esp_host.esp.write("USR-B/initrd.img", INITRD)
    assert updatectl(esp_host.host, "rollback").code == 0
    assert esp_host.next_boot() == "USR-B"


def test_entries_that_do_not_read_the_slots_own_files_refuse_a_release_with_boot_files(
    esp_host: EspHost, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    """With linux = "/vmlinuz" for every slot the new slot would boot the old kernel
    (a new root without its modules): refused before anything is marked or written."""
    config = esp_host.host.config
    config.write_text(config.read_text().replace('"/{label}/vmlinuz"', '"/vmlinuz"'))
    publish_with_boot_files(repo, usr_images["1.1.0"], tmp_path)
    disk_before = esp_host.host.disk.read_bytes()
    r = updatectl(esp_host.host, "check", "--install", "--json")
    assert r.code == 3, r.err
    error = r.json()["error"]
    assert (error["category"], error["kind"]) == ("config", "invalid")
    assert "systemd-boot.linux" in error["message"] and "/{label}/vmlinuz" in error["hint"]
    assert esp_host.host.disk.read_bytes() == disk_before


def test_boot_files_unused_by_backend(tmp_path: Path) -> None:
    def cfg(text: str) -> config.Config:
        (tmp_path / "t.toml").write_text(text)
        return config.load(tmp_path / "t.toml")

    per_slot = '[systemd-boot]\nlinux = "/{label}/vmlinuz"\ninitrd = ["/{label}/initrd.img"]\n'
    assert boot_files_unused(cfg('[disk]\nbackend = "gpt-prio"\n')) is None
    assert boot_files_unused(cfg('[disk]\nbackend = "systemd-boot"\n' + per_slot)) is None
    shared_initrd = per_slot.replace('"/{label}/initrd.img"', '"/initrd.img"')
    for text in (
        '[disk]\nbackend = "systemd-boot"\n',
        '[disk]\nbackend = "systemd-boot"\n' + shared_initrd,
        '[disk]\nbackend = "grub-env"\n',
    ):
        problem = boot_files_unused(cfg(text))
        assert problem is not None and problem.kind == "invalid", text
