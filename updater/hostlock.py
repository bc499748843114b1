"""The host update lock: one updater at a time per host, an advisory flock on
``<state_dir>/lock``. (The reboot lock a fleet shares is policies.lock.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from updater.errors import RefusedError, StateError


@contextlib.contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the host's update lock, or raise RefusedError(busy) at once."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateError("unwritable", f"{state_dir}/lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefusedError(
                "busy",
                "another update is running on this host",
                hint="wait for it, or see `updatectl status`",
            ) from None
        yield
    finally:
        os.close(fd)


def is_held(state_dir: Path) -> bool:
    """True when another process holds the update lock right now."""
    try:
        fd = os.open(state_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class FlockHostLock:
    """The host update lock of ``state_dir`` (a :class:`updater.hostports.HostLock`)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return exclusive(self.state_dir)

    def is_held(self) -> bool:
        return is_held(self.state_dir)
