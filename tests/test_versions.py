"""UAPI version ordering (systemd strverscmp_improved), table-tested."""

import itertools

import pytest

from updater import versions

# Oldest to newest, as the UAPI Version Format Specification orders them.
ORDERED = [
    "",
    "~1",
    "ab",
    "abb",
    "abc",
    "0001",
    "002",
    "12",
    "122",
    "122.9",
    "123~rc1",
    "123",
    "123-a",
    "123-a.1",
    "123-a1",
    "123-a1.1",
    "123-3",
    "123-3.1",
    "123^patch1",
    "123^1",
    "123.a-1",
    "123.1-1",
    "123a-1",
    "124",
]


@pytest.mark.parametrize(("older", "newer"), list(itertools.combinations(ORDERED, 2)))
def test_total_order(older: str, newer: str) -> None:
    assert versions.compare(older, newer) == -1
    assert versions.compare(newer, older) == 1
    assert versions.compare(newer, newer) == 0


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0.0", "1.1.0", -1),
        ("1.10.0", "1.9.0", 1),
        ("1.0.0", "1.0.0", 0),
        ("01.0", "1.0", 0),  # leading zeros do not count
        ("1.0~rc1", "1.0", -1),  # pre-release before the release
        ("1.0~rc1", "1.0~rc2", -1),
        ("1.0", "1.0.1", -1),  # more segments are newer
        ("1.0^1", "1.0.1", -1),  # a patched release sits between
        ("1.0", "1.0^1", -1),
        ("1.0.0-rc1", "1.0.0", 1),  # semver's '-' is a release suffix here
        ("2024.11.1", "2024.2.9", 1),
        ("1.0_beta", "1.0beta", 0),  # characters outside the set are ignored
        ("123.45-67.89", "123.45-67.88", 1),
        ("123.45-67.89a", "123.45-67.89", 1),
    ],
)
def test_pairs(a: str, b: str, expected: int) -> None:
    assert versions.compare(a, b) == expected
    assert versions.compare(b, a) == -expected


def test_sort_key() -> None:
    shuffled = sorted(ORDERED, key=len)
    assert sorted(shuffled, key=versions.sort_key) == ORDERED


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("1.0.0", True),
        ("1.0~rc1", True),
        ("2024.11.1-3", True),
        ("", False),
        ("-1", False),
        ("1.0 ", False),
        ("1/0", False),
        ("1" * 65, False),
        ("1.0+build", False),
    ],
)
def test_is_valid(version: str, ok: bool) -> None:
    assert versions.is_valid(version) is ok
