"""Version comparison: the UAPI Version Format Specification.

This is systemd's ``strverscmp_improved()`` (used by systemd-boot,
systemd-sysupdate and bootctl), so the agent orders versions exactly as the
boot loader and sysupdate do. Versions are split into segments: runs of
digits compare numerically (leading zeros ignored), runs of letters compare
lexically, ``~`` marks a pre-release (older than anything else at that
position, so ``1.0~rc1 < 1.0``), ``-`` separates version from release,
``^`` marks a patched release (``1.0 < 1.0^1 < 1.0.1``), ``.`` separates point
releases. Characters outside ``[A-Za-z0-9.~^-]`` are ignored. Semver
pre-releases written ``1.0.0-rc1`` are *newer* than ``1.0.0`` under these
rules; publish them as ``1.0.0~rc1``. Where the specification's text and
systemd 252 differ (``~`` against the empty string), this follows systemd,
checked against ``systemd-analyze compare-versions`` in the tests.
"""

from __future__ import annotations

import functools
import re

_VALID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.~^-")

# What the agent accepts as a version in a manifest: starts with an alphanumeric
# character, only characters the comparison uses, bounded length.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.~^-]{0,63}$")


def _cmp(x: int | str, y: int | str) -> int:
    return (x > y) - (x < y)  # type: ignore[operator]


def compare(a: str, b: str) -> int:
    """Return -1, 0 or 1 as ``a`` is older than, equal to or newer than ``b``."""
    i = j = 0
    la, lb = len(a), len(b)
    while True:
        while i < la and a[i] not in _VALID:
            i += 1
        while j < lb and b[j] not in _VALID:
            j += 1
        ca = a[i] if i < la else ""
        cb = b[j] if j < lb else ""

        if ca == "~" or cb == "~":
            r = _cmp(ca != "~", cb != "~")
            if r:
                return r
            i += 1
            j += 1
            ca = a[i] if i < la else ""
            cb = b[j] if j < lb else ""

        if not ca or not cb:
            return _cmp(a[i:], b[j:])

        for sep in "-^.":
            if sep in (ca, cb):
                r = _cmp(ca != sep, cb != sep)
                if r:
                    return r
                i += 1
                j += 1
                ca = a[i] if i < la else ""
                cb = b[j] if j < lb else ""

        if (ca.isdigit() and ca.isascii()) or (cb.isdigit() and cb.isascii()):
            ei, ej = i, j
            while ei < la and a[ei] in "0123456789":
                ei += 1
            while ej < lb and b[ej] in "0123456789":
                ej += 1
            r = _cmp(ei != i, ej != j)
            if r:
                return r
            while i < ei and a[i] == "0":
                i += 1
            while j < ej and b[j] == "0":
                j += 1
            r = _cmp(ei - i, ej - j)
            if r:
                return r
            r = _cmp(a[i:ei], b[j:ej])
            if r:
                return r
        else:
            ei, ej = i, j
            while ei < la and a[ei].isascii() and a[ei].isalpha():
                ei += 1
            while ej < lb and b[ej].isascii() and b[ej].isalpha():
                ej += 1
            n = min(ei - i, ej - j)
            r = _cmp(a[i : i + n], b[j : j + n])
            if r:
                return r
            r = _cmp(ei - i, ej - j)
            if r:
                return r
        i, j = ei, ej


def is_valid(version: str) -> bool:
    return VERSION_RE.fullmatch(version) is not None


sort_key = functools.cmp_to_key(compare)


# Semantic Versioning 2.0.0, ASCII digits only: what Nebraska (blang/semver's
# Make) accepts when a host registers; anything else is
# error-instanceRegistrationFailed. Build metadata (+...) is not in VERSION_RE.
SEMVER_RE = re.compile(
    r"(?P<core>(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*))"
    r"(?:-(?P<pre>(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)


def is_semver(version: str) -> bool:
    """``version`` is a Semantic Versioning 2.0.0 version (what Nebraska accepts)."""
    return SEMVER_RE.fullmatch(version) is not None


def omaha_warnings(version: str) -> tuple[str, ...]:
    """Why ``version`` would not work on an Omaha server (Nebraska); empty if it would."""
    match = SEMVER_RE.fullmatch(version)
    if match is None:
        return (
            f"{version!r} is not a semver version (MAJOR.MINOR.PATCH[-pre]): Nebraska refuses "
            "to register hosts running it (error-instanceRegistrationFailed); fine for a "
            "static repository",
        )
    if match["pre"] is not None:
        return (
            f"{version!r} is a semver pre-release: Nebraska orders it before "
            f"{match['core']!r}, this agent (UAPI version order) after it; on an Omaha "
            "channel publish plain MAJOR.MINOR.PATCH versions",
        )
    return ()
