"""A Flatcar admin's existing settings: GROUP= and SERVER= in update.conf.

update_engine reads ``/usr/share/flatcar/update.conf`` (the vendor's) and
``/etc/flatcar/update.conf`` (the admin's, winning key by key), shell-style
``KEY=value`` lines. ``SERVER=disabled`` turns update checks off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from updater import osrelease

FILES = (Path("/usr/share/flatcar/update.conf"), Path("/etc/flatcar/update.conf"))
DISABLED = "disabled"


@dataclass(frozen=True)
class FlatcarSettings:
    server: str | None = None
    group: str | None = None
    files: tuple[Path, ...] = ()  # the files that were read, in order

    @property
    def disabled(self) -> bool:
        return self.server == DISABLED


def parse(text: str) -> dict[str, str]:
    return osrelease.parse(text, inline_comments=True)


def read(files: tuple[Path, ...] = FILES) -> FlatcarSettings:
    """The merged settings of ``files`` (later files win); missing files are fine."""
    merged: dict[str, str] = {}
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found.append(path)
        merged.update(parse(text))
    return FlatcarSettings(
        server=merged.get("SERVER") or None, group=merged.get("GROUP") or None, files=tuple(found)
    )
