"""Ports of the update core to the host around it: the booted image's os-release,
the host update lock, and the reboot sentinel kured watches.

The real ones are :class:`OsReleaseFile`, :class:`updater.hostlock.FlockHostLock`
and :class:`KuredSentinel` (built in :mod:`updater.compose`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

from updater import osrelease
from updater.fsutil import atomic_write


class OsRelease(Protocol):
    """What the booted image says about itself (os-release(5))."""

    def image_version(self) -> str | None:
        """IMAGE_VERSION, else VERSION_ID, else None."""
        ...

    def os_id(self) -> str | None:
        """ID, or None."""
        ...


class HostLock(Protocol):
    """One updater at a time per host."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the lock for the ``with`` block, or raise RefusedError(busy) at once."""
        ...

    def is_held(self) -> bool:
        """Another process holds the lock right now."""
        ...


class RebootSentinel(Protocol):
    """Tells the host's reboot manager that a staged update needs a reboot."""

    def write(self, version: str) -> None:
        """``version`` is staged: a reboot is required (best effort)."""
        ...

    def clear(self) -> None:
        """The reboot happened, or the staged update is gone (best effort)."""
        ...


class OsReleaseFile:
    """An os-release file, read on every call (the booted image may change under a test)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def image_version(self) -> str | None:
        return osrelease.image_version(self.path)

    def os_id(self) -> str | None:
        return osrelease.parse_file(self.path).get("ID")


class KuredSentinel:
    """kured's /run/reboot-required, and ``.pkgs`` naming what needs it: the OS."""

    def __init__(self, path: Path, os_release: OsRelease) -> None:
        self.path = path
        self.os_release = os_release

    def _pkgs(self) -> Path:
        return self.path.with_name(self.path.name + ".pkgs")

    def write(self, version: str) -> None:
        os_id = self.os_release.os_id() or "os"
        with contextlib.suppress(OSError):
            atomic_write(self.path, b"")
            atomic_write(self._pkgs(), f"{os_id} {version}\n".encode())

    def clear(self) -> None:
        for path in (self.path, self._pkgs()):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


class NoRebootSentinel:
    """No reboot manager to tell (``[agent] reboot_sentinel = ""``)."""

    def write(self, version: str) -> None:
        pass

    def clear(self) -> None:
        pass
