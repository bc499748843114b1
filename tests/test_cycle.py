"""End to end through `updatectl`: a signed release from a loopback HTTP
repository into the inactive slot of a real GPT disk image, and every hostile
or broken input the issue names, each leaving the slots as they were."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import zstandard

from devtools.diskimage import cgpt_flags, sfdisk_partition
from devtools.gpgkeys import SigningKey
from devtools.host import Host, write_config
from devtools.repo_server import Fault
from partitions.bootcontrol import Slot, SlotFlags
from partitions.gptprio import GptPrioBootControl
from tests.conftest import Repo, updatectl
from tests.gptcraft import edit_entries, entry_lbas, set_entry
from updater.errors import ExitCode
from updater.hostlock import is_held
from updater.manifest import Compression
from updater.state import StateStore

A, B = 1, 2  # GPT partition numbers of USR-A and USR-B
T = TypeVar("T")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """What must not change when an update is refused."""

    flags_a: SlotFlags
    flags_b: SlotFlags
    bytes_a: str  # sha256 of the whole booted slot
    state: bytes | None

    @classmethod
    def take(cls, host: Host) -> Snapshot:
        state = host.state_dir / "state.json"
        return cls(
            cgpt_flags(host.disk, A),
            cgpt_flags(host.disk, B),
            sha(host.slot_bytes("USR-A")),
            state.read_bytes() if state.exists() else None,
        )


def assert_refused(host: Host, before: Snapshot, *, state_unchanged: bool = True) -> None:
    after = Snapshot.take(host)
    assert after.flags_a == before.flags_a, "the booted slot's flags changed"
    assert after.bytes_a == before.bytes_a, "the booted slot's bytes changed"
    assert not after.flags_b.bootable, f"the target slot is bootable: {after.flags_b}"
    if state_unchanged:
        assert after.state == before.state, "the agent state changed"
    assert host.reboot() == "USR-A"


def within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, which must return or raise within ``seconds`` (it runs in a thread,
    abandoned if it hangs, so that a hang fails the test instead of holding it)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {time.monotonic() - started:.1f} s"
    if error:
        raise error[0]
    return result[0]


def check_install(host: Host, *extra: str) -> tuple[int, dict[str, object]]:
    r = updatectl(host, "check", "--install", "--json", *extra)
    return r.code, r.json()


def error_of(doc: dict[str, object]) -> tuple[str, str]:
    err = doc["error"]
    assert isinstance(err, dict)
    return err["category"], err["kind"]


# ---- the good path -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(Compression))
def test_full_cycle(
    host: Host, repo: Repo, usr_images: dict[str, Path], compression: Compression
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=compression)
    status = updatectl(host, "status", "--json").json()
    assert (status["booted"], status["booted_version"], status["state"]) == (
        "USR-A",
        "1.0.0",
        "idle",
    )

    check = updatectl(host, "check", "--json").json()
    assert check["update_available"] is True and check["version"] == "1.1.0"
    assert cgpt_flags(host.disk, B) == SlotFlags(0, 0, False)  # check alone changes nothing

    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    # The target boots next, once, on trial; the old slot stays good as a fallback.
    assert cgpt_flags(host.disk, B) == SlotFlags(2, 1, False)
    assert cgpt_flags(host.disk, A) == SlotFlags(1, 0, True)
    b = sfdisk_partition(host.disk, B)
    assert "GUID:49,52" in b.get("attrs", "")  # priority 2 = bit 49, tries 1 = bit 52
    assert (host.root / "reboot-required").exists()
    status = updatectl(host, "status", "--json").json()
    assert (status["state"], status["primary"]) == ("update_staged", "USR-B")

    # Asking again is a no-op, not a second download.
    image_gets = len([r for r in repo.server.requests if "/images/" in r.path])
    code, doc = check_install(host)
    assert code == 0 and doc["staged"] is True and doc["installed"] is False
    assert len([r for r in repo.server.requests if "/images/" in r.path]) == image_gets

    assert host.reboot() == "USR-B"
    status = updatectl(host, "status", "--json").json()
    assert (status["booted"], status["booted_version"], status["state"]) == (
        "USR-B",
        "1.1.0",
        "trial_boot",
    )
    assert updatectl(host, "mark-good").code == 0
    assert cgpt_flags(host.disk, B) == SlotFlags(2, 0, True)
    status = updatectl(host, "status", "--json").json()
    assert (status["booted"], status["booted_version"], status["state"]) == (
        "USR-B",
        "1.1.0",
        "idle",
    )
    assert host.reboot() == "USR-B"
    up_to_date = updatectl(host, "check", "--json").json()
    assert up_to_date["update_available"] is False


def test_conditional_get_caches_the_manifest(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    assert updatectl(host, "check").code == 0
    assert updatectl(host, "check").code == 0
    manifests = [r for r in repo.server.requests if r.path == "/stable/release.json"]
    assert [r.status for r in manifests] == [200, 304]
    assert manifests[1].headers.get("If-None-Match")


def test_install_refused_on_a_trial_boot(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    """Installing while the booted slot is unproven would overwrite the only good slot."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    assert check_install(host)[0] == 0
    assert host.reboot() == "USR-B"
    repo.publish("1.2.0", usr_images["1.2.0"])
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.REFUSED and error_of(doc) == ("refused", "booted_not_good")
    assert Snapshot.take(host) == before


# ---- hostile and broken input -------------------------------------------------------------------


def test_image_byte_flipped(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    repo.server.fault(repo.image_path(), Fault(flip_byte_at=123_456))
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "hash_mismatch")
    assert_refused(host, before, state_unchanged=False)
    state = json.loads((host.state_dir / "state.json").read_bytes())
    assert state["pending"] is None  # the failed install is not left "in progress"
    target = [s for s in state["slots"].values() if s["label"] == "USR-B"]
    assert target[0]["condition"] == "installing"  # i.e. incomplete, never booted


def test_compressed_image_byte_flipped(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.ZSTD)
    repo.server.fault(repo.image_path(), Fault(flip_byte_at=2000))
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc)[1] in ("hash_mismatch", "decompress_failed")
    assert_refused(host, before, state_unchanged=False)


def test_manifest_edited_after_signing(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    edited = repo.manifest_path().read_bytes().replace(b'"1.1.0"', b'"9.9.9"')
    repo.manifest_path().write_bytes(edited)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "signature_invalid")
    assert_refused(host, before)


def test_signed_by_an_untrusted_key(
    host: Host, repo: Repo, usr_images: dict[str, Path], rogue_key: SigningKey
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], key=rogue_key)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "signature_invalid")
    assert_refused(host, before)


def test_signature_file_missing(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    (repo.root / "stable" / "release.json.asc").unlink()
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "signature_missing")
    assert_refused(host, before)


@pytest.mark.parametrize("keyring", ["missing", "empty", "unset", "not-a-key"])
def test_keyring_missing_or_empty(
    host: Host, repo: Repo, usr_images: dict[str, Path], keyring: str
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    path = host.root / "keyring.asc"
    if keyring == "empty":
        path.write_bytes(b"")
    elif keyring == "not-a-key":
        path.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnonsense\n")
    write_config(host, repo_url=repo.url, keyring=None if keyring == "unset" else path)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "no_keyring")
    assert_refused(host, before)


def test_expired_manifest(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    doc = repo.manifest()
    doc["expires"] = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    repo.sign_manifest(json.dumps(doc).encode())
    before = Snapshot.take(host)
    code, out = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(out) == ("verification", "expired")
    assert_refused(host, before)


def test_older_than_booted(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("0.9.0", usr_images["1.1.0"])
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "older_than_booted")
    assert_refused(host, before)


def test_replayed_older_signed_manifest(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    """After 1.2.0 was accepted, a replay of the genuine 1.1.0 release is refused."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    old_manifest = repo.manifest_path().read_bytes()
    old_signature = (repo.root / "stable" / "release.json.asc").read_bytes()
    repo.publish("1.2.0", usr_images["1.2.0"])
    assert check_install(host)[0] == 0
    repo.manifest_path().write_bytes(old_manifest)
    (repo.root / "stable" / "release.json.asc").write_bytes(old_signature)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "below_highest_accepted")
    after = Snapshot.take(host)
    assert after == before  # the staged 1.2.0 stays staged, nothing else moves
    assert after.flags_b == SlotFlags(2, 1, False)


def test_raw_size_larger_than_the_slot(host: Host, repo: Repo, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(b"\0" * (host.layout.by_label("USR-B").size + 4096))
    repo.publish("1.1.0", big)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "image_too_large")
    assert_refused(host, before)


def test_server_sends_more_than_the_manifest_says(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    repo.server.fault(repo.image_path(), Fault(extra_bytes=1_000_000))
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.DOWNLOAD
    assert error_of(doc) == ("download", "too_much_data")
    assert_refused(host, before, state_unchanged=False)


def test_connection_dropped_mid_download_resumes(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    path = repo.image_path()
    repo.server.fault(path, Fault(drop_after=3_000_000, drop_times=2))
    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True
    gets = [r for r in repo.server.requests if r.path == path]
    assert [r.headers.get("Range") for r in gets] == [None, "bytes=3000000-", "bytes=3000000-"]
    assert [r.status for r in gets] == [200, 206, 206]
    # Resumes are conditional on the same file (If-Range = the first answer's ETag).
    assert gets[1].headers.get("If-Range") == gets[2].headers.get("If-Range")
    assert gets[1].headers.get("If-Range", "").startswith('"')
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw


def test_connection_dropped_for_good_fails_cleanly(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    repo.server.fault(repo.image_path(), Fault(drop_after=3_000_000, drop_times=1000))
    text = host.config.read_text().replace(
        'channel = "stable"', 'channel = "stable"\nresume_attempts = 2'
    )
    host.config.write_text(text)
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.DOWNLOAD
    assert error_of(doc) == ("download", "connection")
    assert_refused(host, before, state_unchanged=False)
    assert len([r for r in repo.server.requests if r.path == repo.image_path()]) == 3


def test_server_stops_sending(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    repo.server.fault(repo.image_path(), Fault(stall_after=1_000_000, stall_s=60))
    text = host.config.read_text().replace(
        'channel = "stable"', 'channel = "stable"\nread_timeout_s = 0.5\nresume_attempts = 1'
    )
    host.config.write_text(text)
    before = Snapshot.take(host)
    started = time.monotonic()
    code, doc = check_install(host)
    elapsed = time.monotonic() - started
    assert code == ExitCode.DOWNLOAD
    assert error_of(doc) == ("download", "timeout")
    assert elapsed < 15, f"the command hung for {elapsed:.1f}s"
    assert_refused(host, before, state_unchanged=False)


@pytest.mark.parametrize("what", ["image", "manifest", "signature"])
def test_a_trickling_server_ends_as_a_timeout(
    host: Host, repo: Repo, usr_images: dict[str, Path], what: str
) -> None:
    """One byte every 0.1 s: each read is far under the read timeout, so before the
    speed floor the install never ended and held the host's update lock for good."""
    repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.NONE)
    path, after = {
        "image": (repo.image_path(), 1_000_000),
        "manifest": ("/stable/release.json", 10),
        "signature": ("/stable/release.json.asc", 10),
    }[what]
    repo.server.fault(path, Fault(trickle_s=0.1, trickle_after=after))
    text = host.config.read_text().replace(
        'channel = "stable"',
        'channel = "stable"\nmin_speed_bytes_s = 1000\nmin_speed_window_s = 0.5\n'
        "resume_attempts = 1\nretries = 0",
    )
    host.config.write_text(text)
    before = Snapshot.take(host)
    started = time.monotonic()
    code, doc = within(30, lambda: check_install(host))
    elapsed = time.monotonic() - started
    assert code == ExitCode.DOWNLOAD
    assert error_of(doc) == ("download", "timeout")
    assert elapsed < 10, f"the command took {elapsed:.1f}s"
    # nothing written (manifest) or the target left unbootable (image); lock released
    assert_refused(host, before, state_unchanged=what != "image")
    assert not is_held(host.state_dir)
    assert updatectl(host, "status", "--json").json()["state"] == "idle"
    if what == "image":
        resumes = [r for r in repo.server.begun if r == path]
        assert len(resumes) == 2  # abandoned, resumed once, abandoned: the typed timeout


def test_zstd_bomb_is_refused_as_it_arrives(host: Host, repo: Repo, tmp_path: Path) -> None:
    """512 MiB of zeros in a few KiB of zstd, announced as a 1 MiB image."""
    bomb = tmp_path / "bomb.zst"
    cctx = zstandard.ZstdCompressor(level=19)
    with bomb.open("wb") as out, cctx.stream_writer(out) as w:
        zero = bytes(1 << 20)
        for _ in range(512):
            w.write(zero)
    data = bomb.read_bytes()
    images = repo.root / "images" / "1.1.0"
    images.mkdir(parents=True)
    (images / "bomb.zst").write_bytes(data)
    claimed = 1 << 20
    repo.sign_manifest(
        json.dumps(
            {
                "schema": 1,
                "channel": "stable",
                "version": "1.1.0",
                "created": "2026-01-01T00:00:00Z",
                "expires": (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "image": {
                    "url": "../images/1.1.0/bomb.zst",
                    "size": len(data),
                    "sha256": sha(data),
                    "compression": "zstd",
                    "raw_size": claimed,
                    "raw_sha256": sha(bytes(claimed)),
                },
            }
        ).encode()
    )
    slot_b = host.layout.by_label("USR-B")
    marker = b"\x5a" * 4096
    with host.disk.open("r+b") as fh:  # something to see if the bomb spills past raw_size
        fh.seek(slot_b.offset + 2 * claimed)
        fh.write(marker)
    before = Snapshot.take(host)
    started = time.monotonic()
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "size_mismatch")
    assert time.monotonic() - started < 10
    with host.disk.open("rb") as disk:
        disk.seek(slot_b.offset + 2 * claimed)
        assert disk.read(4096) == marker, "bytes beyond raw_size were written"
    assert_refused(host, before, state_unchanged=False)


def test_malformed_json_after_a_valid_signature(host: Host, repo: Repo) -> None:
    repo.sign_manifest(b'{"schema": 1, "channel": "stable", "version": ')
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "manifest_malformed")
    assert_refused(host, before)


def test_wrong_channel(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], channel="beta")
    (repo.root / "stable").mkdir()
    for name in ("release.json", "release.json.asc"):  # beta's signed release on stable
        (repo.root / "stable" / name).write_bytes((repo.root / "beta" / name).read_bytes())
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "channel_mismatch")
    assert_refused(host, before)


def test_disk_without_the_named_labels(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    text = host.config.read_text().replace("[disk]\n", '[disk]\nslots = ["ROOT-A", "ROOT-B"]\n')
    host.config.write_text(text)
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.DISK
    assert error_of(r.json()) == ("disk", "slot_not_found")
    assert "ROOT-A" in r.err and "USR-A" in r.err
    assert_refused(host, before)
    assert not [r for r in repo.server.requests if "/images/" in r.path]


def test_manifest_too_large(host: Host, repo: Repo) -> None:
    repo.sign_manifest(b" " * (64 * 1024 + 1))
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.VERIFICATION
    assert error_of(doc) == ("verification", "manifest_too_large")
    assert_refused(host, before)


def test_server_error_status(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    repo.server.fault("/stable/release.json", Fault(status=403))
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert code == ExitCode.DOWNLOAD
    assert error_of(doc) == ("download", "http_status")
    assert_refused(host, before)


# ---- a partition table that would put the new image over the running system ---------------


def _usr_b_over_usr_a(entries: bytearray) -> None:
    first_a, last_a = entry_lbas(entries, A)
    first_b, last_b = entry_lbas(entries, B)
    shift = first_b - (first_a + (last_a - first_a) // 2)  # B starts in the middle of A
    set_entry(entries, B, first_lba=first_b - shift, last_lba=last_b - shift)


def test_an_overlapping_table_is_refused_before_anything_is_written(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    """CRC-valid, same-sized slots, but USR-B's range holds half of the booted USR-A:
    installing would overwrite the running system."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    edit_entries(host.disk, _usr_b_over_usr_a)
    disk_before = sha(host.disk.read_bytes())
    state = host.state_dir / "state.json"
    state_before = state.read_bytes() if state.exists() else None

    code, doc = check_install(host)

    assert code == ExitCode.DISK
    assert error_of(doc) == ("disk", "gpt_invalid")
    err = doc["error"]
    assert isinstance(err, dict)
    assert "partitions 1 and 2: overlap" in err["message"]
    assert sha(host.disk.read_bytes()) == disk_before, "the disk image changed"
    assert (state.read_bytes() if state.exists() else None) == state_before
    assert not [r for r in repo.server.requests if "/images/" in r.path]
    assert not is_held(host.state_dir)
    status = updatectl(host, "status", "--json")
    assert status.code == ExitCode.DISK and "gpt_invalid" in status.out


def test_a_table_changed_during_the_install_is_refused_before_the_write(
    host: Host, repo: Repo, usr_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table was sane when the install was planned; the disk is repartitioned after
    the target was marked bad: the slot write re-reads it first and stops."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    original = GptPrioBootControl.mark_bad
    after_repartition: list[str] = []

    def mark_bad_then_repartition(self: GptPrioBootControl, slot: Slot) -> None:
        original(self, slot)
        edit_entries(host.disk, _usr_b_over_usr_a)
        after_repartition.append(sha(host.disk.read_bytes()))

    monkeypatch.setattr(GptPrioBootControl, "mark_bad", mark_bad_then_repartition)
    code, doc = check_install(host)

    assert code == ExitCode.DISK
    assert error_of(doc) == ("disk", "gpt_invalid")
    assert after_repartition and sha(host.disk.read_bytes()) == after_repartition[0]
    # (the chunk index is read while planning, before the target is marked bad)
    images = [r for r in repo.server.requests if "/images/" in r.path]
    assert not [r for r in images if not r.path.endswith(".chunks")]
    assert StateStore(host.state_dir).load().pending is None
