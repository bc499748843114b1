"""The update core's settings: one frozen dataclass, units in the comments, given to
:class:`updater.update.Updater` (as python-tuf's ``Updater(config=UpdaterConfig)``).
:func:`updater.compose.updater` builds it from the agent's configuration (updater.settings
is the configuration's own model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateSettings:
    channel: str = "stable"  # the channel a signed manifest must name
    readback: bool = True  # read the slot back and hash it after the write
    chunk_size: int = 1024 * 1024  # bytes: each download read, slot write and re-hash
    resume_attempts: int = 5  # times a broken download is resumed before it fails
    # a delta update is used when it downloads at least this share less than the full image
    delta_min_saving: float = 0.2
    delta: bool = True  # [install] delta = false: the full download, always
    pin: str | None = None  # [source] pin: only versions of this line (updater.hostpolicy)
