"""The cluster reboot lock: a counting semaphore per group of hosts, so only so
many of them reboot at once. (Not the host update lock of ``updater``, which
keeps two update runs on one host apart.)

``acquire`` answers whether this holder has a slot (idempotent: asking again
while holding one is yes); ``release`` gives it back (idempotent: releasing
what is not held is fine). Anything that goes wrong raises LockError, and the
caller treats it as "no": a reboot never happens without the lock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from updater.errors import LockError, UpdaterError
from updater.urls import Url, parse_url

GROUP_RE = re.compile(r"^[a-zA-Z0-9.-]+$")
FAILURE_KIND_RE = re.compile(r"[a-z0-9_]{1,64}")  # what a lock service takes as failure_kind


def check_group(group: str) -> str:
    if not GROUP_RE.fullmatch(group):
        raise LockError("bad_argument", f"invalid group {group!r}: use [a-zA-Z0-9.-]+")
    return group


def parse_etcd_endpoint(text: str, error: Callable[[str], UpdaterError]) -> Url:
    """An etcd endpoint as its client takes one: ``http(s)://HOST[:PORT]``, or ``error(why)``.

    The client is built from the scheme, host and port alone, so user info, a path,
    a query or a fragment would be dropped without a word: they are refused.
    """
    url = parse_url(text, error)
    if "@" in urlsplit(text).netloc:
        raise error(f"{text!r}: credentials go in username and password_file, not the URL")
    if url.path not in ("", "/") or url.query or url.fragment or text.endswith(("?", "#")):
        raise error(f"{text!r}: an etcd endpoint has no path, query or fragment")
    return url


@dataclass(frozen=True)
class FailureReport:
    """A version this host rolled back from, handed to the lock with the release
    (policies.failed records it for the group before the slot is free)."""

    version: str
    kind: str  # "rolled_back", or the health check's error kind

    @property
    def sent_kind(self) -> str:
        """The kind as a lock service takes it: a state file's odd value is "rolled_back"
        (a refused report would keep the slot held for good)."""
        return self.kind if FAILURE_KIND_RE.fullmatch(self.kind) else "rolled_back"


class RebootLock(Protocol):
    name: str

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        """Take a slot for ``holder``; True if it holds one now, False if none is free.

        ``version``: the staged version the slot is for; a lock service that knows
        the group's failed versions refuses a blocked one (RefusedError
        ``version_blocked``). Locks that do not check ignore it.
        """
        ...

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        """Give ``holder``'s slot back (nothing to do if it holds none).

        ``failed``: a rollback to record for the group before the slot is given
        back, in the same request. True if the lock took it along; False if it
        has nowhere to record it (the caller records it some other way).
        """
        ...


class NoLock:
    """A single machine: there is always a slot."""

    name = "none"

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        return True

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        return False
