"""UAPI version ordering (systemd strverscmp_improved), table-tested and checked against
`systemd-analyze compare-versions`."""

import itertools
import shutil

import pytest

from updater import versions
from updater.run import run

# Oldest to newest, as the UAPI Version Format Specification orders them.
ORDERED = [
    "~1",  # systemd 252 puts "~" below even the empty string (the spec's text: above)
    "",
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


# ---- as systemd 252 compares (systemd-boot's entry order, `systemd-analyze compare-versions`)

SPEC_EXAMPLES = [  # the Version Format Specification's own examples: (a, relation, b)
    ("11", "==", "11"),
    ("systemd-123", "==", "systemd-123"),
    ("bar-123", "<", "foo-123"),
    ("123a", ">", "123"),
    ("123.a", ">", "123"),
    ("123.a", "<", "123.b"),
    ("123a", ">", "123.a"),
    ("11\u03b1", "==", "11\u03b2"),  # non-ASCII letters are skipped
    ("A", "<", "a"),
    ("", "<", "0"),
    ("0.", ">", "0"),
    ("0.0", ">", "0"),
    # The spec also lists `0` < `~` and '' < `~`; systemd 252's systemd-boot (and
    # `systemd-analyze compare-versions`) order both the other way, "~" below anything:
    ("0", ">", "~"),
    ("", ">", "~"),
    ("1_", "==", "1"),
    ("_1", "==", "1"),
    ("1_", "<", "1.2"),
    ("1_2_3", ">", "1.3.3"),
    ("1+", "==", "1"),
    ("+1", "==", "1"),
    ("1+", "<", "1.2"),
    ("1+2+3", ">", "1.3.3"),
]
# systemd's own example order, oldest first (src/fundamental/string-util-fundamental.c)
SYSTEMD_ORDER = [
    "122.1",
    "123~rc1-1",
    "123",
    "123-a",
    "123-a.1",
    "123-1",
    "123-1.1",
    "123^post1",
    "123.a-1",
    "123.1-1",
    "123a-1",
    "124-1",
]
MORE = [
    ("2", ">", "1"),
    ("10", ">", "9"),
    ("010", "==", "10"),
    ("1.0~rc1", "<", "1.0"),
    ("1.0^post", ">", "1.0"),
    ("1.0-1", "<", "1.0.1"),
    ("abc", "<", "abd"),
    ("ab", "<", "abc"),
    ("0", ">", "a"),  # systemd 252: a number above letters (the spec would read "a" as 0)
    ("", "<", "a"),
    ("6.1.0-13-amd64", "<", "6.1.0-17-amd64"),
    ("updater-usr-b+1-0.conf", ">", "updater-usr-a.conf"),
    *((older, "<", newer) for older, newer in itertools.pairwise(SYSTEMD_ORDER)),
]
RELATION = {"<": -1, "==": 0, ">": 1}


@pytest.mark.parametrize(("a", "rel", "b"), SPEC_EXAMPLES + MORE)
def test_compare_versions(a: str, rel: str, b: str) -> None:
    assert versions.compare(a, b) == RELATION[rel]
    assert versions.compare(b, a) == -RELATION[rel]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_compare_versions_agrees_with_systemd() -> None:
    # `systemd-analyze compare-versions A B` answers in its exit status: learn which is which
    codes = {
        run(["systemd-analyze", "compare-versions", a, b], check=False).returncode: rel
        for a, rel, b in (("1", "<", "2"), ("2", "==", "2"), ("3", ">", "2"))
    }
    pairs = [(a, b) for a, _, b in SPEC_EXAMPLES + MORE if a.isascii() and b.isascii()]
    pairs += [("1.2.3-4", "1.2.3.4"), ("v1~a", "v1"), ("x-1", "x.1"), ("7", "12"), ("a1", "a01")]
    pairs += [("", "^"), ("0", "^"), ("1^", "1"), ("1^a", "1.a"), ("1-", "1"), ("~", "~~")]
    for a, b in pairs:
        done = run(["systemd-analyze", "compare-versions", a, b], check=False)
        assert RELATION[codes[done.returncode]] == versions.compare(a, b), (a, b)


@pytest.mark.parametrize(
    ("version", "semver"),
    [
        ("1.0.0", True),
        ("0.0.0", True),
        ("10.20.30", True),
        ("1.0.0-alpha", True),
        ("1.0.0-alpha.1", True),
        ("1.0.0-0.3.7", True),
        ("1.0.0-x-y-z.--", True),
        ("1.0.0+build.1", True),
        ("1.0.0-rc.1+build.1", True),
        ("1.0", False),
        ("1", False),
        ("01.0.0", False),
        ("1.00.0", False),
        ("1.0.0-01", False),  # numeric pre-release identifiers: no leading zero
        ("1.0.0-", False),
        ("1.0.0-a..b", False),
        ("1.0.0~rc1", False),
        ("1.0.0^1", False),
        ("v1.0.0", False),
        ("1.0.0 ", False),
        ("\u0661.\u0660.\u0660", False),  # Arabic-Indic digits: \d would take them
    ],
)
def test_semver_as_nebraska_reads_it(version: str, semver: bool) -> None:
    assert versions.is_semver(version) is semver
