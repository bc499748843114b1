"""Delta updates through the installer (issue 14): a real GPT disk image, a signed
release with its chunk index on a loopback repository, the booted slot's blocks
reused and only the changed ones fetched with Range requests; the fallbacks to the
full download; and every lying index or image, each refused with a typed error and
nothing made bootable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import zstandard
from structlog.testing import capture_logs

from devtools.diskimage import cgpt_flags
from devtools.gpgkeys import SigningKey
from devtools.host import Host, write_config
from devtools.repo_server import Fault, Request
from tests.conftest import HOST_SLOT_SIZE, Repo
from tests.omaha_server import Answer, OmahaServer, omaha_release, use_omaha
from tests.test_cycle import B, Snapshot, assert_refused
from updater import chunkindex, compose, config
from updater.chunkindex import ChunkIndex, Entry
from updater.delta import parse_index
from updater.errors import UpdaterError
from updater.manifest import Compression
from updater.release import Published
from updater.state import SlotRecord, StateStore

BLOCK = chunkindex.BLOCK_SIZE
PLACES = 4  # changed 4 KiB pieces, each in its own 64 KiB block of the payload


def changed_image(base: Path, out: Path, places: int = PLACES, seed: int = 1) -> Path:
    """``base`` with ``places`` 4 KiB pieces of its payload rewritten (random bytes)."""
    data = bytearray(base.read_bytes())
    payload = data.find(hashlib.sha256(b"1.0.0/0").digest())
    assert payload > 0
    rng = random.Random(seed)
    for k in range(places):
        at = (payload + k * 4 * BLOCK + 8192) // 4096 * 4096
        data[at : at + 4096] = rng.randbytes(4096)
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def new_image(tmp_path: Path, usr_images: dict[str, Path]) -> Path:
    return changed_image(usr_images["1.0.0"], tmp_path / "usr-1.1.0.img")


def publish(repo: Repo, image: Path) -> Published:
    return repo.publish("1.1.0", image, compression=Compression.ZSTD)


def install(host: Host) -> list[MutableMapping[str, Any]]:
    """Check and install in-process; the log events. Raises the install's UpdaterError."""
    up = compose.updater(config.load(host.config))
    check = up.check()
    assert check.update_available
    with capture_logs() as events:
        up.install(check)
    return events


def refused(host: Host) -> tuple[str, str, list[MutableMapping[str, Any]]]:
    """The install's typed error (category, kind) and the log events."""
    up = compose.updater(config.load(host.config))
    check = up.check()
    with capture_logs() as events, pytest.raises(UpdaterError) as caught:
        up.install(check)
    # pass 2's writer and the whole-slot hash behind it are stopped, not left running
    assert [t.name for t in threading.enumerate() if t.name.startswith("delta-")] == []
    return caught.value.category, caught.value.kind, events


def path_event(events: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    (event,) = [e for e in events if e["event"] == "install_path"]
    return event


def image_requests(repo: Repo) -> list[Request]:
    return [r for r in repo.server.requests if r.path == repo.image_path()]


def load_index(published: Published) -> ChunkIndex:
    assert published.index_path is not None
    return parse_index(published.index_path.read_bytes(), published.manifest.image)


def changed_blocks(base: Path, new: Path) -> list[int]:
    a, b = base.read_bytes(), new.read_bytes()
    return [i for i in range(0, len(b), BLOCK) if a[i : i + BLOCK] != b[i : i + BLOCK]]


def sign_index(repo: Repo, published: Published, body: bytes) -> None:
    """Publish ``body`` as the release's chunk index, validly signed in the manifest."""
    assert published.index_path is not None
    published.index_path.write_bytes(body)
    doc = repo.manifest()
    image = doc["image"]
    assert isinstance(image, dict)
    image["index"]["size"] = len(body)
    image["index"]["sha256"] = hashlib.sha256(body).hexdigest()
    repo.sign_manifest(json.dumps(doc).encode())


def edited(index: ChunkIndex, edit: Callable[[list[Entry]], None]) -> bytes:
    entries = list(index.entries)
    edit(entries)
    return chunkindex.serialize(
        ChunkIndex(index.block_size, index.sub_block, index.raw_size, tuple(entries))
    )


# ---- the good paths ----------------------------------------------------------------------------


def test_only_the_changed_blocks_are_downloaded(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    published = publish(repo, new_image)
    assert len(changed_blocks(usr_images["1.0.0"], new_image)) == PLACES
    events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert cgpt_flags(host.disk, B).bootable
    got = image_requests(repo)
    assert got and all(r.status == 206 and r.headers["Range"].count("-") == 1 for r in got)
    assert all(not r.headers["Range"].endswith("-") for r in got)  # bounded: bytes=a-b
    sent = sum(r.sent for r in got)
    assert sent <= PLACES * (BLOCK + chunkindex.FRAME_SLACK)
    event = path_event(events)
    index_size = published.manifest.image.index.size  # type: ignore[union-attr]
    assert event["path"] == "delta"
    assert event["downloaded_bytes"] == sent + index_size == event["planned_bytes"]
    assert sent < published.manifest.image.size * 0.2
    assert host.reboot() == "USR-B"
    # provisioning wrote the booted slot (no record of its size): read as far as its
    # ext4 file system reaches, not to the slot's end
    planned = next(e for e in events if e["event"] == "delta_planned")
    assert planned["booted_bytes"] == usr_images["1.0.0"].stat().st_size < HOST_SLOT_SIZE


def test_blocks_moved_by_4_kib_are_copied_not_fetched(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    """4 KiB inserted at the payload's start moves the rest of it by 4 KiB: no block
    of it is in place, each is found at its 4 KiB offset in the booted slot."""
    base = usr_images["1.0.0"].read_bytes()
    at = base.find(hashlib.sha256(b"1.0.0/0").digest()) // 4096 * 4096
    data = base[:at] + random.Random(3).randbytes(4096) + base[at:-4096]
    new_image = tmp_path / "usr-1.1.0.img"
    new_image.write_bytes(data)
    moved = len(changed_blocks(usr_images["1.0.0"], new_image))
    assert moved >= 30  # the 2 MiB payload's blocks, all moved
    publish(repo, new_image)
    events = install(host)
    assert host.slot_bytes("USR-B", len(data)) == data
    planned = next(e for e in events if e["event"] == "delta_planned")
    assert planned["blocks_copied"] >= moved - 3
    sent = sum(r.sent for r in image_requests(repo))
    assert sent <= 3 * (BLOCK + chunkindex.FRAME_SLACK)  # the block with the insert, its edges


def test_a_resumed_install_keeps_what_the_target_already_holds(
    host: Host, repo: Repo, new_image: Path
) -> None:
    """An earlier install (cut short: the state says so) left the new blocks in the
    target: nothing is downloaded but the index, and the slot is verified whole."""
    published = publish(repo, new_image)
    raw = new_image.read_bytes()
    part = host.layout.by_label("USR-B")
    with host.disk.open("r+b") as fh:
        fh.seek(part.offset)
        fh.write(raw[: len(raw) // 2])  # the payload's changes lie in the first half
    uuid = next(
        str(s.slot.part_uuid) for s in host.boot_control().slots() if s.slot.label == "USR-B"
    )
    StateStore(host.state_dir).update(
        lambda st: st.with_slot(uuid, SlotRecord("USR-B", "installing", "1.1.0"))
    )
    events = install(host)
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert image_requests(repo) == []
    event = path_event(events)
    assert event["path"] == "delta"
    assert event["downloaded_bytes"] == published.manifest.image.index.size  # type: ignore[union-attr]
    planned = next(e for e in events if e["event"] == "delta_planned")
    assert planned["blocks_kept"] >= len(raw) // 2 // BLOCK and planned["planned_bytes"] == 0


def hold_previous(host: Host, image: Path) -> None:
    """USR-B holds ``image``, written by the agent (the release before the booted one:
    a host's second update onwards)."""
    raw = image.read_bytes()
    part = host.layout.by_label("USR-B")
    with host.disk.open("r+b") as fh:
        fh.seek(part.offset)
        fh.write(raw)
    uuid = next(
        str(s.slot.part_uuid) for s in host.boot_control().slots() if s.slot.label == "USR-B"
    )
    record = SlotRecord("USR-B", "good", "0.9.0", len(raw), hashlib.sha256(raw).hexdigest())
    StateStore(host.state_dir).update(lambda st: st.with_slot(uuid, record))


@pytest.mark.parametrize("moved", [False, True], ids=["changed", "moved-by-4-KiB"])
def test_the_target_holding_the_release_before_spares_the_booted_reads(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path, moved: bool
) -> None:
    """From a host's second update on, the target holds the release before the booted
    one: the blocks it holds at their place are kept (not read from the booted slot,
    not written); the booted slot is read only around the blocks it lacks, and a
    block moved there is still found and copied."""
    base = usr_images["1.0.0"]
    hold_previous(host, changed_image(base, tmp_path / "usr-0.9.0.img", seed=5))
    if moved:  # 4 KiB inserted in the payload: the blocks after it move (all of them)
        data = base.read_bytes()
        at = data.find(hashlib.sha256(b"1.0.0/0").digest()) // 4096 * 4096
        at += 8 * BLOCK  # the payload's first 8 blocks stay in place
        new = data[:at] + random.Random(3).randbytes(4096) + data[at:-4096]
        new_image = tmp_path / "usr-1.1.0.img"
        new_image.write_bytes(new)
    else:
        new_image = changed_image(base, tmp_path / "usr-1.1.0.img", seed=1)
    publish(repo, new_image)
    events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    planned = next(e for e in events if e["event"] == "delta_planned")
    sent = sum(r.sent for r in image_requests(repo))
    if moved:
        assert planned["blocks_copied"] >= 20, planned
        assert sent <= 3 * (BLOCK + chunkindex.FRAME_SLACK)
        # the payload after the insert is read from the booted slot: its blocks moved
        assert planned["booted_bytes"] < len(raw) * 0.6, planned
    else:
        assert planned["blocks_kept"] >= len(raw) // BLOCK - 2 * PLACES - 1, planned
        assert sent <= PLACES * (BLOCK + chunkindex.FRAME_SLACK)
        # only around the blocks the target lacks (the changed ones), with their neighbours
        assert planned["booted_bytes"] <= 2 * PLACES * 3 * BLOCK, planned
    assert host.reboot() == "USR-B"


def release_chain(base: Path, tmp_path: Path) -> list[Path]:
    """1.1.0, 1.2.0 and 1.3.0, each a few 4 KiB pieces away from the one before (1.3.0
    keeps two of the pieces 1.2.0 changed: blocks the booted slot has, the target not)."""
    out, prev = [], base
    for k, places in ((1, 2), (2, 4), (3, 2)):
        prev = changed_image(prev, tmp_path / f"usr-1.{k}.0.img", places=places, seed=10 + k)
        out.append(prev)
    return out


def update_to(host: Host, repo: Repo, version: str, image: Path) -> list[MutableMapping[str, Any]]:
    """Publish, install and boot ``image`` as ``version``, blessed; the install's events."""
    repo.publish(version, image, compression=Compression.ZSTD)
    events = install(host)
    host.reboot()
    asyncio.run(compose.mark_good(config.load(host.config)))
    return events


def planned_event(events: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    return next(e for e in events if e["event"] == "delta_planned")


def test_the_kept_indexes_spare_reading_the_slots(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    """From a host's third update on, the agent has kept the index of what each slot
    holds (it wrote both): it reads neither slot to plan, only the booted slot around
    the blocks neither has; the slot is verified whole as always."""
    v11, v12, v13 = release_chain(usr_images["1.0.0"], tmp_path)
    first = planned_event(update_to(host, repo, "1.1.0", v11))
    assert first["from_kept_indexes"] is False  # provisioning wrote USR-A: no index
    second = planned_event(update_to(host, repo, "1.2.0", v12))
    assert second["from_kept_indexes"] is False  # USR-A has a record, no index: read
    before = len(image_requests(repo))
    events = update_to(host, repo, "1.3.0", v13)
    third = planned_event(events)
    assert third["from_kept_indexes"] is True, third
    raw = v13.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert path_event(events)["path"] == "delta"
    # the target (1.1.0) lacks 4 blocks: 2 the booted slot (1.2.0) has in place,
    # copied; 2 new ones, fetched; the booted slot is read around those 2 only
    assert third["blocks_kept"] == len(raw) // BLOCK - 4, third
    assert (third["blocks_copied"], third["blocks_fetched"]) == (2, 2), third
    assert 0 < third["booted_bytes"] <= 2 * 3 * BLOCK, third
    sent = sum(r.sent for r in image_requests(repo)[before:])
    assert sent <= 2 * (BLOCK + chunkindex.FRAME_SLACK)
    # each slot's record names its kept index
    slots = StateStore(host.state_dir).load().slots
    assert all(r.index_sha256 for r in slots.values()), slots


@pytest.mark.parametrize("where", ["target", "booted"])
def test_a_slot_changed_behind_the_agents_back_falls_back_to_the_full_download(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path, where: str
) -> None:
    """A kept index that no longer tells the truth (the slot was written by someone
    else) costs a full download, never a wrong slot: a block the target was said to
    hold fails the whole-slot hash; a block copied from the booted slot fails its
    own digest before it is written."""
    v11, v12, v13 = release_chain(usr_images["1.0.0"], tmp_path)
    update_to(host, repo, "1.1.0", v11)
    update_to(host, repo, "1.2.0", v12)  # booted: USR-A (1.2.0); target: USR-B (1.1.0)
    label = "USR-B" if where == "target" else "USR-A"
    part = host.layout.by_label(label)
    raw = v13.read_bytes()
    if where == "target":
        at = len(raw) - 3 * BLOCK  # a block 1.1.0 and 1.3.0 share: kept on the index's word
    else:
        # a block the target (1.1.0) lacks, the booted slot (1.2.0) has in place: copied
        at = changed_blocks(v11, v12)[-1] // BLOCK * BLOCK
        assert v12.read_bytes()[at : at + BLOCK] == raw[at : at + BLOCK]
    with host.disk.open("r+b") as fh:
        fh.seek(part.offset + at)
        fh.write(b"\x5a" * 4096)
    repo.publish("1.3.0", v13, compression=Compression.ZSTD)
    events = install(host)
    assert planned_event(events)["from_kept_indexes"] is True
    assert (path_event(events)["path"], path_event(events)["reason"]) == (
        "full",
        "slot_index_stale",
    )
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert host.reboot() == "USR-B"


def test_a_server_that_ignores_range_gets_the_full_download(
    host: Host, repo: Repo, new_image: Path
) -> None:
    publish(repo, new_image)
    repo.server.fault(repo.image_path(), Fault(ignore_range=True))
    events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert cgpt_flags(host.disk, B).bootable
    got = image_requests(repo)
    assert [("Range" in r.headers, r.status) for r in got] == [(True, 200), (False, 200)]
    event = path_event(events)
    assert (event["path"], event["reason"]) == ("full", "range_ignored")


def test_a_small_saving_takes_the_full_download(
    host: Host, repo: Repo, release_key: SigningKey, new_image: Path
) -> None:
    write_config(
        host,
        repo_url=repo.url,
        keyring=release_key.public_key,
        extra="[install]\ndelta_min_saving = 0.99\n",
    )
    publish(repo, new_image)
    events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    got = image_requests(repo)
    assert [("Range" in r.headers, r.status) for r in got] == [(False, 200)]
    event = path_event(events)
    assert (event["path"], event["reason"]) == ("full", "saving_too_small")
    assert 0 < event["planned_bytes"] < event["image_bytes"]


def test_delta_off_takes_the_full_download_without_reading_the_index(
    host: Host, repo: Repo, release_key: SigningKey, new_image: Path
) -> None:
    write_config(
        host, repo_url=repo.url, keyring=release_key.public_key, extra="[install]\ndelta = false\n"
    )
    published = publish(repo, new_image)
    events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert [("Range" in r.headers, r.status) for r in image_requests(repo)] == [(False, 200)]
    assert published.index_path is not None
    index = "/" + str(published.index_path.relative_to(repo.root))
    assert [r for r in repo.server.requests if r.path == index] == []
    assert (path_event(events)["path"], path_event(events)["reason"]) == ("full", "disabled")
    assert [e for e in events if e["event"] == "delta_planned"] == []


def test_an_image_without_an_index_takes_the_full_download(
    host: Host, repo: Repo, new_image: Path
) -> None:
    repo.publish("1.1.0", new_image, compression=Compression.XZ)
    events = install(host)
    assert (path_event(events)["path"], path_event(events)["reason"]) == ("full", "no_index")


def test_through_an_omaha_server_only_the_changed_blocks_are_downloaded(
    host: Host, repo: Repo, new_image: Path
) -> None:
    """The Omaha server names the package; the chunk index lies beside it, named in
    the signed manifest beside the package: the same delta path as the static one."""
    published = publish(repo, new_image)
    with OmahaServer(release=omaha_release(repo.url, published), answer=Answer.UPDATE) as server:
        use_omaha(host.config, server.url)
        events = install(host)
    raw = new_image.read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert cgpt_flags(host.disk, B).bootable
    paths = [r.path for r in repo.server.requests]
    package = f"/images/1.1.0/{published.image_path.name}"
    assert f"{package}.json" in paths and f"{package}.json.asc" in paths  # beside the package
    assert f"{package}.chunks" in paths
    got = [r for r in repo.server.requests if r.path == package]
    assert got and all(r.status == 206 and not r.headers["Range"].endswith("-") for r in got)
    sent = sum(r.sent for r in got)
    assert sent <= PLACES * (BLOCK + chunkindex.FRAME_SLACK)
    event = path_event(events)
    assert event["path"] == "delta"
    assert event["downloaded_bytes"] == sent + published.manifest.image.index.size  # type: ignore[union-attr]


# ---- an index that is not the signed one, or lies: refused before anything changes ------------


def test_an_index_that_is_not_the_signed_one(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    other = changed_image(usr_images["1.0.0"], new_image.with_name("other.img"), seed=2)
    published = publish(repo, new_image)
    elsewhere = repo.publish("1.0.1", other, channel="beta")
    assert published.index_path is not None and elsewhere.index_path is not None
    published.index_path.write_bytes(elsewhere.index_path.read_bytes())  # same size
    before = Snapshot.take(host)
    assert refused(host)[:2] == ("verification", "hash_mismatch")
    assert_refused(host, before)
    assert image_requests(repo) == []


def test_an_index_longer_than_the_signed_one(host: Host, repo: Repo, new_image: Path) -> None:
    published = publish(repo, new_image)
    assert published.index_path is not None
    with published.index_path.open("ab") as fh:
        fh.write(bytes(chunkindex.ENTRY.size))
    before = Snapshot.take(host)
    assert refused(host)[:2] == ("verification", "size_mismatch")
    assert_refused(host, before)


def test_an_index_larger_than_its_cap_is_refused_with_the_manifest(
    host: Host, repo: Repo, new_image: Path
) -> None:
    publish(repo, new_image)
    doc = repo.manifest()
    image = doc["image"]
    assert isinstance(image, dict)
    image["index"]["size"] = chunkindex.MAX_INDEX_BYTES + chunkindex.ENTRY.size
    repo.sign_manifest(json.dumps(doc).encode())
    before = Snapshot.take(host)
    up = compose.updater(config.load(host.config))
    with pytest.raises(UpdaterError) as caught:
        up.check()
    assert caught.value.kind == "manifest_malformed"
    assert_refused(host, before)


def _overlap(entries: list[Entry]) -> None:
    e = entries[1]
    entries[1] = Entry(e.digest, e.offset - 1, e.length + 1)


def _past_the_end(entries: list[Entry]) -> None:
    e = entries[-1]
    entries[-1] = Entry(e.digest, e.offset, e.length + 100)


@pytest.mark.parametrize("lie", [_overlap, _past_the_end], ids=["overlapping", "out_of_range"])
def test_a_signed_index_whose_frames_do_not_cut_the_image(
    host: Host, repo: Repo, new_image: Path, lie: Callable[[list[Entry]], None]
) -> None:
    published = publish(repo, new_image)
    sign_index(repo, published, edited(load_index(published), lie))
    before = Snapshot.take(host)
    assert refused(host)[:2] == ("verification", "index_malformed")
    assert_refused(host, before)
    assert image_requests(repo) == []


# ---- an index or image that lies about a block: caught before the slot may boot ---------------


def test_a_block_digest_that_belongs_elsewhere_is_caught_by_the_raw_sha256(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    """The signed index names, for a changed block, the digest of a block the booted
    slot holds: the agent copies that one there, and the whole-slot hash refuses it."""
    published = publish(repo, new_image)
    changed = changed_blocks(usr_images["1.0.0"], new_image)[0] // BLOCK

    def lie(entries: list[Entry]) -> None:
        e = entries[changed]
        entries[changed] = Entry(entries[changed - 1].digest, e.offset, e.length)

    sign_index(repo, published, edited(load_index(published), lie))
    before = Snapshot.take(host)
    category, kind, events = refused(host)
    assert (category, kind) == ("verification", "hash_mismatch")
    failed = next(e for e in events if e["event"] == "install_failed")
    assert "hashes to" in failed["error"]  # the whole-slot check, not a frame's
    assert_refused(host, before, state_unchanged=False)


def test_a_frame_that_is_not_its_block_is_caught_by_the_block_digest(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    """The signed index gives a changed block the digest of another changed block:
    its frame inflates to other bytes than the index names, refused before the write."""
    published = publish(repo, new_image)
    first, second = (i // BLOCK for i in changed_blocks(usr_images["1.0.0"], new_image)[:2])

    def lie(entries: list[Entry]) -> None:
        e = entries[first]
        entries[first] = Entry(entries[second].digest, e.offset, e.length)

    sign_index(repo, published, edited(load_index(published), lie))
    before = Snapshot.take(host)
    category, kind, events = refused(host)
    assert (category, kind) == ("verification", "hash_mismatch")
    failed = next(e for e in events if e["event"] == "install_failed")
    assert f"block {first}" in failed["error"]
    assert_refused(host, before, state_unchanged=False)


def test_a_served_frame_that_inflates_to_the_wrong_bytes(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    """The server swaps a changed block's frame for a valid frame of other bytes, of
    the same length: only the block digest from the signed index can tell."""
    published = publish(repo, new_image)
    index = load_index(published)
    block = changed_blocks(usr_images["1.0.0"], new_image)[1] // BLOCK  # all payload
    e = index.entries[block]
    wrong = zstandard.ZstdCompressor(level=10, write_checksum=True).compress(
        random.Random(9).randbytes(BLOCK)
    )
    assert len(wrong) == e.length  # incompressible blocks are stored raw: same length
    body = bytearray(published.image_path.read_bytes())
    body[e.offset : e.offset + e.length] = wrong
    repo.server.fault(repo.image_path(), Fault(body=bytes(body)))
    before = Snapshot.take(host)
    assert refused(host)[:2] == ("verification", "hash_mismatch")
    assert_refused(host, before, state_unchanged=False)


def test_a_corrupted_frame_fails_to_decompress(
    host: Host, repo: Repo, usr_images: dict[str, Path], new_image: Path
) -> None:
    published = publish(repo, new_image)
    index = load_index(published)
    e = index.entries[changed_blocks(usr_images["1.0.0"], new_image)[0] // BLOCK]
    repo.server.fault(repo.image_path(), Fault(flip_byte_at=e.offset + e.length // 2))
    before = Snapshot.take(host)
    assert refused(host)[:2] == ("verification", "decompress_failed")
    assert_refused(host, before, state_unchanged=False)
