"""The delta planner: which blocks of the new image to keep, copy or fetch. Pure, no I/O.

Given the chunk index (:mod:`updater.chunkindex`), where the booted slot holds
each block digest (any 4 KiB-aligned offset), and the digests of the blocks
the target slot already holds at their own place (what an earlier, broken or
older install left), decide per block:

- ``keep``: the target already holds it where it belongs (nothing to do);
- ``copy``: the booted slot holds it at ``source`` (read there, write here);
- ``fetch``: download its zstd frame.

Fetches of neighbouring blocks merge into one byte range of the image file
(their frames are adjacent), and a gap of a few kept or copied blocks between
two fetches is fetched too when its frames are at most ``max_gap`` bytes (a
request costs more than a few KiB on any link), up to ``max_range`` bytes a
range. The plan is a hint: the slot is verified whole afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from updater.chunkindex import ChunkIndex

MAX_GAP = 64 * 1024  # bytes of frames fetched rather than split a range
MAX_RANGE = 16 * 1024 * 1024  # bytes a single Range request asks for


@dataclass(frozen=True)
class Copy:
    block: int
    source: int  # raw offset in the booted slot


@dataclass(frozen=True)
class FetchRange:
    first: int  # block
    last: int  # block, inclusive
    offset: int  # in the image file
    length: int  # bytes of frames


@dataclass(frozen=True)
class Plan:
    keep: tuple[int, ...]
    copy: tuple[Copy, ...]
    fetch: tuple[FetchRange, ...]
    fetch_bytes: int  # to download, frames
    image_bytes: int  # the full download, for comparison

    @property
    def saving(self) -> float:
        """The share of the full download the plan does not download (0..1)."""
        return 1.0 - self.fetch_bytes / self.image_bytes if self.image_bytes else 0.0


Choice = Literal["keep", "copy", "fetch"]


def plan(
    index: ChunkIndex,
    booted: Mapping[bytes, int],
    target: Sequence[bytes | None],
    *,
    max_gap: int = MAX_GAP,
    max_range: int = MAX_RANGE,
) -> Plan:
    """The plan for ``index``; ``booted`` maps a block digest to a raw offset in the
    booted slot, ``target[i]`` is the digest of what the target holds at block i
    (None: unknown or past its end)."""
    choice: list[Choice] = []
    sources: dict[int, int] = {}
    for i, e in enumerate(index.entries):
        if i < len(target) and target[i] == e.digest:
            choice.append("keep")
        elif e.digest in booted:
            choice.append("copy")
            sources[i] = booted[e.digest]
        else:
            choice.append("fetch")
    entries = index.entries
    ranges: list[tuple[int, int]] = []  # first, last block
    for i, c in enumerate(choice):
        if c != "fetch":
            continue
        if ranges:
            first, last = ranges[-1]
            gap = entries[i].offset - (entries[last].offset + entries[last].length)
            span = entries[i].offset + entries[i].length - entries[first].offset
            if gap <= max_gap and span <= max_range:
                for j in range(last + 1, i):
                    choice[j] = "fetch"  # inside the range: fetched, not copied
                ranges[-1] = (first, i)
                continue
        ranges.append((i, i))
    fetch = tuple(
        FetchRange(
            first,
            last,
            entries[first].offset,
            entries[last].offset + entries[last].length - entries[first].offset,
        )
        for first, last in ranges
    )
    return Plan(
        keep=tuple(i for i, c in enumerate(choice) if c == "keep"),
        copy=tuple(Copy(i, sources[i]) for i, c in enumerate(choice) if c == "copy"),
        fetch=fetch,
        fetch_bytes=sum(r.length for r in fetch),
        image_bytes=(entries[-1].offset + entries[-1].length) if entries else 0,
    )
