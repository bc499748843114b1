"""The cluster reboot lock: a counting semaphore per group of hosts.

``acquire`` answers whether this holder has a slot (idempotent: asking again
while holding one is yes); ``release`` gives it back (idempotent: releasing
what is not held is fine). Anything that goes wrong raises LockError, and the
caller treats it as "no": a reboot never happens without the lock.
"""

from __future__ import annotations

import re
from typing import Protocol

from updater.errors import LockError

GROUP_RE = re.compile(r"^[a-zA-Z0-9.-]+$")


def check_group(group: str) -> str:
    if not GROUP_RE.fullmatch(group):
        raise LockError("bad_argument", f"invalid group {group!r}: use [a-zA-Z0-9.-]+")
    return group


class RebootLock(Protocol):
    name: str

    def acquire(self, holder: str) -> bool:
        """Take a slot for ``holder``; True if it holds one now, False if none is free."""
        ...

    def release(self, holder: str) -> None:
        """Give ``holder``'s slot back (nothing to do if it holds none)."""
        ...


class NoLock:
    """A single machine: there is always a slot."""

    name = "none"

    def acquire(self, holder: str) -> bool:
        return True

    def release(self, holder: str) -> None:
        return None
