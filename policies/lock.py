"""The cluster reboot lock: a counting semaphore per group of hosts.

``acquire`` answers whether this holder has a slot (idempotent: asking again
while holding one is yes); ``release`` gives it back (idempotent: releasing
what is not held is fine). Anything that goes wrong raises LockError, and the
caller treats it as "no": a reboot never happens without the lock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from updater.errors import LockError, UpdaterError
from updater.urls import Url, parse_url

GROUP_RE = re.compile(r"^[a-zA-Z0-9.-]+$")


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
