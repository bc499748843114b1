"""status, mark-good and rollback across reboots of a disk image."""

from __future__ import annotations

from pathlib import Path

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from devtools.repo_server import Fault
from partitions.bootcontrol import SlotFlags
from tests.conftest import Repo, updatectl
from tests.test_cycle import Snapshot


def install(host: Host, repo: Repo, version: str, image: Path) -> None:
    repo.publish(version, image)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err


def status(host: Host) -> dict[str, object]:
    doc: dict[str, object] = updatectl(host, "status", "--json").json()
    return doc


def test_status_of_a_fresh_host(host: Host) -> None:
    s = status(host)
    assert s["state"] == "idle" and s["booted"] == "USR-A" and s["primary"] == "USR-A"
    slots = s["slots"]
    assert isinstance(slots, list)
    assert [
        (x["label"], x["priority"], x["tries"], x["successful"], x["version"]) for x in slots
    ] == [("USR-A", 1, 0, True, "1.0.0"), ("USR-B", 0, 0, False, None)]
    text = updatectl(host, "status").out
    assert "Booted:         USR-A (version 1.0.0)" in text


def test_rollback_refused_without_a_verified_install(host: Host) -> None:
    before = Snapshot.take(host)
    r = updatectl(host, "rollback", "--json")
    assert r.code == 7 and r.json()["error"] == {
        "category": "refused",
        "kind": "rollback_refused",
        "message": "rollback refused: this agent has no record of what the other slot holds",
    }
    assert Snapshot.take(host) == before


def test_rollback_refused_when_the_other_slot_already_boots_next(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    install(host, repo, "1.1.0", usr_images["1.1.0"])  # B staged, A booted
    before = Snapshot.take(host)
    r = updatectl(host, "rollback")
    assert r.code == 7 and "already boots next" in r.err
    assert Snapshot.take(host) == before


def test_rollback_refused_after_a_failed_install(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    repo.server.fault(repo.image_path(), Fault(flip_byte_at=5000))
    assert updatectl(host, "check", "--install").code == 4
    r = updatectl(host, "rollback")
    assert r.code == 7 and "installing" in r.err
    assert not cgpt_flags(host.disk, 2).bootable


def test_rollback_to_the_previous_good_slot(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    install(host, repo, "1.1.0", usr_images["1.1.0"])
    assert host.reboot() == "USR-B"
    assert updatectl(host, "mark-good").code == 0
    r = updatectl(host, "rollback")
    assert r.code == 0, r.err
    assert cgpt_flags(host.disk, 1) == SlotFlags(3, 1, False)  # A next, on trial
    assert host.reboot() == "USR-A"
    s = status(host)
    assert (s["booted"], s["booted_version"], s["state"]) == ("USR-A", "1.0.0", "trial_boot")
    assert updatectl(host, "mark-good").code == 0
    assert status(host)["state"] == "idle"


def test_rollback_verifies_the_slot_bytes(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    """A slot whose bytes changed since it was installed is not a rollback target."""
    install(host, repo, "1.1.0", usr_images["1.1.0"])
    assert host.reboot() == "USR-B"
    assert updatectl(host, "mark-good").code == 0
    install(host, repo, "1.2.0", usr_images["1.2.0"])  # into A, verified, with its hash
    assert host.reboot() == "USR-A"
    assert updatectl(host, "mark-good").code == 0
    assert status(host)["booted_version"] == "1.2.0"

    b = host.layout.by_label("USR-B")
    with host.disk.open("r+b") as fh:  # bit rot in the old slot
        fh.seek(b.offset + 4_000_000)
        byte = fh.read(1)
        fh.seek(b.offset + 4_000_000)
        fh.write(bytes([byte[0] ^ 1]))
    before = Snapshot.take(host)
    r = updatectl(host, "rollback")
    assert r.code == 7 and "no longer match" in r.err
    assert Snapshot.take(host) == before

    with host.disk.open("r+b") as fh:  # repaired: now it may
        fh.seek(b.offset + 4_000_000)
        fh.write(byte)
    assert updatectl(host, "rollback").code == 0
    assert host.reboot() == "USR-B"
    assert status(host)["booted_version"] == "1.1.0"


def test_not_blessed_falls_back(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    """A trial boot that is never marked good: the next boot is the old slot."""
    install(host, repo, "1.1.0", usr_images["1.1.0"])
    assert host.reboot() == "USR-B"
    assert host.reboot() == "USR-A"
    s = status(host)
    assert (s["booted"], s["booted_version"], s["state"]) == ("USR-A", "1.0.0", "idle")
    assert cgpt_flags(host.disk, 2) == SlotFlags(0, 0, False)


def test_mark_good_is_idempotent(host: Host) -> None:
    before = Snapshot.take(host)
    assert updatectl(host, "mark-good").code == 0
    assert updatectl(host, "mark-good", "--json").json() == {"marked_good": "USR-A"}
    after = Snapshot.take(host)
    assert (after.flags_a, after.flags_b, after.bytes_a) == (
        before.flags_a,
        before.flags_b,
        before.bytes_a,
    )
