"""Slot writes: O_DIRECT where the device allows it, exact bytes whatever the
sizes, offsets and memory alignment of the pieces; the buffered fallback."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest

from devtools.diskimage import loop_device
from updater.delta import Watermark
from updater.errors import DiskError
from updater.install import Stopped
from updater.slotio import DIRECT_ALIGN, SlotDevice, aligned_buffer

OFFSET = 1 << 20
SIZE = 3 << 20


def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\xee" * (OFFSET + SIZE + (1 << 20)))
    return p


def pieces(data: bytes, rng: random.Random) -> list[bytes | memoryview]:
    """Cut ``data`` into ragged pieces, some in aligned memory, some not."""
    out: list[bytes | memoryview] = []
    i = 0
    while i < len(data):
        n = rng.choice([1, 511, 512, 4095, 4096, 4097, 65536, 100_003, 1 << 20])
        piece = data[i : i + n]
        if rng.random() < 0.5:
            buf = aligned_buffer(max(len(piece), 1))
            buf[: len(piece)] = piece
            out.append(memoryview(buf)[: len(piece)])
        else:
            out.append(piece)
        i += n
    return out


def check(path: Path, data: bytes) -> None:
    got = path.read_bytes()
    assert got[:OFFSET] == b"\xee" * OFFSET
    assert got[OFFSET : OFFSET + len(data)] == data
    assert got[OFFSET + SIZE :] == b"\xee" * (1 << 20)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("direct", [True, False])
def test_ragged_writes_land_exactly(tmp_path: Path, seed: int, direct: bool) -> None:
    rng = random.Random(seed)
    data = os.urandom(rng.randrange(SIZE // 2, SIZE))
    path = disk(tmp_path)
    with SlotDevice(path, OFFSET, SIZE, direct=direct) as dev:
        assert dev.direct or not direct  # (True needs a file system with O_DIRECT)
        for piece in pieces(data, rng):
            dev.write(piece)
            # every byte accepted is visible to an ordinary reader at once
            assert path.read_bytes()[OFFSET : OFFSET + dev.written] == data[: dev.written]
        dev.sync()
        assert dev.written == len(data)
        assert dev.hash(len(data), 1 << 20) == hashlib.sha256(data).hexdigest()
    check(path, data)


def test_unaligned_slot_offset_falls_back_to_buffered(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8 << 20))
    with SlotDevice(path, 512, 1 << 20) as dev:
        assert not dev.direct
        dev.write(b"x" * 1000)
    assert path.read_bytes()[512:1512] == b"x" * 1000


@pytest.mark.root
def test_direct_writes_on_a_loop_block_device(tmp_path: Path) -> None:
    path = disk(tmp_path)
    data = os.urandom(SIZE - 12345)
    with loop_device(path) as dev_path, SlotDevice(dev_path, OFFSET, SIZE) as dev:
        assert dev.direct
        for piece in pieces(data, random.Random(7)):
            dev.write(piece)
        dev.sync()
        assert dev.hash(len(data), 1 << 20) == hashlib.sha256(data).hexdigest()
    check(path, data)


def test_refuses_past_the_end(tmp_path: Path) -> None:
    path = disk(tmp_path)
    with SlotDevice(path, OFFSET, SIZE) as dev:
        dev.write(bytes(SIZE - DIRECT_ALIGN))
        with pytest.raises(DiskError):
            dev.write(bytes(DIRECT_ALIGN + 1))
        assert dev.written == SIZE - DIRECT_ALIGN
    assert path.read_bytes()[OFFSET + SIZE :] == b"\xee" * (1 << 20)


def test_a_hash_behind_a_writer_reads_only_what_is_final(tmp_path: Path) -> None:
    """``ready`` holds each read of the hash until the writer has made those bytes
    final (the delta install's whole-slot hash follows pass 2 so): the digest is the
    written content's, although the hash started before the first write."""
    path = disk(tmp_path)
    content = random.Random(5).randbytes(SIZE)
    piece = SIZE // 6
    final = Watermark()
    asked: list[int] = []

    def ready(end: int) -> None:
        asked.append(end)
        final.wait(end)

    def write() -> None:
        with SlotDevice(path, OFFSET, SIZE) as w:
            for k in range(0, SIZE, piece):
                time.sleep(0.05)  # the hash, unheld, would long have read the old bytes
                w.seek(k)
                w.write(content[k : k + piece])
                final.advance(k + piece)

    writer = threading.Thread(target=write)
    with SlotDevice(path, OFFSET, SIZE, writable=False) as dev:
        assert dev.direct  # read from the device, not from the writer's pages
        writer.start()
        digest = dev.hash(SIZE, 1 << 19, ready=ready)
    writer.join()
    assert digest == hashlib.sha256(content).hexdigest()
    assert asked == list(range(1 << 19, SIZE + 1, 1 << 19))


def test_a_hash_behind_a_writer_that_fails_stops(tmp_path: Path) -> None:
    path = disk(tmp_path)
    final = Watermark()
    final.advance(1 << 20)
    threading.Timer(0.1, final.fail).start()
    with SlotDevice(path, OFFSET, SIZE, writable=False) as dev, pytest.raises(Stopped):
        dev.hash(SIZE, 1 << 19, ready=final.wait)
    assert [t.name for t in threading.enumerate() if t.name == "slot-hash-read"] == []
