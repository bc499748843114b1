"""The delta planner (pure): per block keep / copy / fetch, fetches merged into ranges."""

from __future__ import annotations

import pytest

from updater.chunkindex import ChunkIndex, Entry
from updater.deltaplan import Copy, FetchRange, plan

B = 64 * 1024
F = 1000  # every frame 1000 bytes: block i's frame is at i * F


def _index(n: int) -> ChunkIndex:
    return ChunkIndex(B, 4096, n * B, tuple(Entry(bytes([i]) * 32, i * F, F) for i in range(n)))


def d(i: int) -> bytes:
    return bytes([i]) * 32


@pytest.mark.parametrize(
    ("booted", "target", "max_gap", "keep", "copy", "fetch"),
    [
        # fresh: nothing anywhere, one range of everything
        ({}, [], 0, (), (), [(0, 5)]),
        # all in the booted slot, wherever it is there
        (
            {d(i): (5 - i) * B for i in range(6)},
            [],
            0,
            (),
            [(i, (5 - i) * B) for i in range(6)],
            [],
        ),
        # the target already holds 0-2 (a broken install): kept, not copied
        (
            {d(i): i * B for i in range(6)},
            [d(0), d(1), d(2), None],
            0,
            (0, 1, 2),
            [(3, 3 * B), (4, 4 * B), (5, 5 * B)],
            [],
        ),
        # a target block at the wrong place is not kept
        ({}, [d(1), d(0)], 0, (), (), [(0, 5)]),
        # two changed blocks apart: two ranges without gap merging ...
        (
            {d(i): i * B for i in (0, 2, 3, 5)},
            [],
            0,
            (),
            [(0, 0), (2, 2 * B), (3, 3 * B), (5, 5 * B)],
            [(1, 1), (4, 4)],
        ),
        # ... one range when the gap (2 frames = 2000 bytes) is small enough: 2 and 3 fetched
        ({d(i): i * B for i in (0, 2, 3, 5)}, [], 2000, (), [(0, 0), (5, 5 * B)], [(1, 4)]),
        (
            {d(i): i * B for i in (0, 2, 3, 5)},
            [],
            1999,
            (),
            [(0, 0), (2, 2 * B), (3, 3 * B), (5, 5 * B)],
            [(1, 1), (4, 4)],
        ),
    ],
)
def test_plan_table(
    booted: dict[bytes, int],
    target: list[bytes | None],
    max_gap: int,
    keep: tuple[int, ...],
    copy: list[tuple[int, int]],
    fetch: list[tuple[int, int]],
) -> None:
    p = plan(_index(6), booted, target, max_gap=max_gap)
    assert p.keep == keep
    assert p.copy == tuple(Copy(b, s) for b, s in copy)
    assert p.fetch == tuple(FetchRange(a, z, a * F, (z - a + 1) * F) for a, z in fetch)
    assert p.fetch_bytes == sum((z - a + 1) * F for a, z in fetch)
    assert p.image_bytes == 6 * F
    # every block has exactly one fate
    fated = list(p.keep) + [c.block for c in p.copy]
    fated += [i for r in p.fetch for i in range(r.first, r.last + 1)]
    assert sorted(fated) == list(range(6))


def test_ranges_are_capped() -> None:
    p = plan(_index(10), {}, [], max_range=3 * F)
    assert [(r.first, r.last) for r in p.fetch] == [(0, 2), (3, 5), (6, 8), (9, 9)]
    assert p.saving == 0.0
    assert plan(_index(10), {d(i): 0 for i in range(10)}, []).saving == 1.0
