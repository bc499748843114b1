"""Shared fixtures: partitioned disk images made with the real tools."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from devtools.diskimage import DEFAULT_LABELS, DiskLayout, PartitionSpec, make_disk_image

SLOT_SIZE = 4 * 1024 * 1024  # bytes; images are sparse, so size costs nothing

MakeImage = Callable[..., DiskLayout]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")


@pytest.fixture
def make_image(tmp_path: Path) -> MakeImage:
    """Build a fresh sparse GPT image in tmp_path; keywords go to make_disk_image."""
    counter = itertools.count(1)

    def make(
        labels: Sequence[str] = DEFAULT_LABELS,
        extra: Sequence[PartitionSpec] = (),
        *,
        leading: Sequence[PartitionSpec] = (),
        slot_size: int = SLOT_SIZE,
    ) -> DiskLayout:
        path = tmp_path / f"disk{next(counter)}.img"
        return make_disk_image(path, slot_size, labels, extra, leading=leading)

    return make


@pytest.fixture
def slot_image(make_image: MakeImage) -> DiskLayout:
    """An image with USR-A (partition 1) and USR-B (partition 2)."""
    return make_image()
