"""The chunk index of what each slot holds, kept beside the state (issue 14).

When the agent installs an image whose release has a chunk index
(:mod:`updater.chunkindex`), it keeps that index as
``<state_dir>/slot-index/<part-uuid>.chunks`` and names its sha256 in the
slot's record (``index_sha256``). A later delta update then knows, without
reading either slot, which block each slot holds at each place: it reads the
booted slot only around the blocks neither slot has, and never reads the
target to find what it holds. Whatever it assumes, the whole slot is hashed
from the device at the end; a slot that no longer holds what its index says
(changed behind the agent's back) fails that hash, and the agent then takes
the full download (:mod:`updater.delta`).

An index is trusted only while its record says the slot holds a verified image
(``installed`` or ``good``) of the index's raw size, and its bytes hash to the
record's ``index_sha256``. Its file is written (and synced) before the record
names it, and a record that starts an install forgets it first, so a crash at
any point leaves at worst a file nobody names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import structlog

from updater import chunkindex
from updater.chunkindex import ChunkIndex
from updater.errors import UpdaterError
from updater.fsutil import atomic_write, read_bounded
from updater.state import SlotRecord

log = structlog.get_logger(__name__)

DIR = "slot-index"
TRUSTED = ("installed", "good")  # record conditions whose slot holds a verified image


def path(state_dir: Path, part_uuid: str) -> Path:
    return state_dir / DIR / f"{part_uuid}.chunks"


def save(state_dir: Path, part_uuid: str, index: ChunkIndex) -> str:
    """Keep ``index`` for the slot; its sha256 (for the slot's record)."""
    data = chunkindex.serialize(index)
    target = path(state_dir, part_uuid)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(target, data)
    return hashlib.sha256(data).hexdigest()


def drop(state_dir: Path, part_uuid: str) -> None:
    path(state_dir, part_uuid).unlink(missing_ok=True)


def load(state_dir: Path, part_uuid: str, record: SlotRecord | None) -> ChunkIndex | None:
    """The index of what the slot holds, or None when there is none to trust."""
    if (
        record is None
        or record.condition not in TRUSTED
        or record.index_sha256 is None
        or record.raw_size is None
    ):
        return None
    try:
        data = read_bounded(path(state_dir, part_uuid), chunkindex.MAX_INDEX_BYTES)
        return chunkindex.parse_own(data, sha256=record.index_sha256, raw_size=record.raw_size)
    except (OSError, UpdaterError) as exc:
        # not fatal: the delta reads the slot instead
        log.warning("slot_index_unusable", part_uuid=part_uuid, error=str(exc))
        return None
