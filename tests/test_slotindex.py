"""The kept chunk index of a slot: trusted only while its record names exactly it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from updater import chunkindex, slotindex
from updater.chunkindex import ChunkIndex, Entry
from updater.state import SlotRecord

UUID = "34b4f9ed-423d-0e4c-a788-23aa4c7f7bac"


def an_index(blocks: int = 5) -> ChunkIndex:
    bs = chunkindex.BLOCK_SIZE
    entries = tuple(Entry(bytes([i]) * 32, i * 100, 100) for i in range(blocks))
    return ChunkIndex(bs, chunkindex.SUB_BLOCK, blocks * bs - 1000, entries)


def kept(tmp_path: Path) -> tuple[ChunkIndex, SlotRecord]:
    index = an_index()
    sha = slotindex.save(tmp_path, UUID, index)
    return index, SlotRecord("USR-B", "good", "1.1.0", index.raw_size, "ab" * 32, index_sha256=sha)


def test_a_kept_index_comes_back_as_it_was_kept(tmp_path: Path) -> None:
    index, record = kept(tmp_path)
    assert slotindex.load(tmp_path, UUID, record) == index
    assert slotindex.load(tmp_path, UUID, replace(record, condition="installed")) == index


@pytest.mark.parametrize(
    "change",
    [
        {"condition": "installing"},  # being written: its blocks are changing
        {"condition": "bad"},
        {"index_sha256": None},
        {"index_sha256": "00" * 32},
        {"raw_size": None},
        {"raw_size": 12345},
    ],
    ids=["installing", "bad", "no-index", "other-sha", "no-size", "other-size"],
)
def test_a_record_that_does_not_name_it_is_not_trusted(
    tmp_path: Path, change: dict[str, object]
) -> None:
    _, record = kept(tmp_path)
    assert slotindex.load(tmp_path, UUID, replace(record, **change)) is None  # type: ignore[arg-type]
    assert slotindex.load(tmp_path, UUID, None) is None


def test_broken_files_are_not_trusted(tmp_path: Path) -> None:
    _, record = kept(tmp_path)
    path = slotindex.path(tmp_path, UUID)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert slotindex.load(tmp_path, UUID, record) is None
    path.write_bytes(data[: len(data) // 2])
    assert slotindex.load(tmp_path, UUID, record) is None
    with path.open("wb") as fh:  # far above the cap: not read
        fh.truncate(chunkindex.MAX_INDEX_BYTES + 1)
    assert slotindex.load(tmp_path, UUID, record) is None
    path.unlink()
    os.mkfifo(path)  # would block a plain read forever
    assert slotindex.load(tmp_path, UUID, record) is None
    path.unlink()
    assert slotindex.load(tmp_path, UUID, record) is None
    slotindex.drop(tmp_path, UUID)  # nothing there: fine
