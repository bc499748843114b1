"""A Flatcar admin's existing settings: GROUP= and SERVER= in update.conf.

update_engine reads ``/usr/share/flatcar/update.conf`` (the vendor's) and
``/etc/flatcar/update.conf`` (the admin's, winning key by key), shell-style
``KEY=value`` lines. ``SERVER=disabled`` turns update checks off.

Lines the parser cannot read as shell assignments are skipped
(:func:`updater.osrelease.parse`); a file that exists but cannot be read (or is
larger than ``osrelease.MAX_FILE_BYTES``, or no regular file) is a ConfigError.
A ``SERVER=`` that is not an http(s) URL, or a ``GROUP=`` that is not a channel
name, is a :class:`~updater.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from updater import osrelease
from updater.errors import ConfigError
from updater.manifest import valid_channel
from updater.urls import parse_url

FILES = (Path("/usr/share/flatcar/update.conf"), Path("/etc/flatcar/update.conf"))
DISABLED = "disabled"
READ_HINT = "make it a readable file of KEY=value lines, or set [omaha] flatcar_conf = false"


@dataclass(frozen=True)
class FlatcarSettings:
    server: str | None = None
    group: str | None = None
    files: tuple[Path, ...] = ()  # the files that were read, in order

    @property
    def disabled(self) -> bool:
        return self.server == DISABLED


def parse(text: str | bytes) -> dict[str, str]:
    return osrelease.parse(text, inline_comments=True)


def read(files: tuple[Path, ...] | None = None) -> FlatcarSettings:
    """The merged settings of ``files`` (later files win); missing files are fine."""
    merged: dict[str, tuple[str, Path]] = {}
    found = []
    for path in FILES if files is None else files:
        try:
            data = osrelease.read_file(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            # not silently: SERVER=disabled in it may be what keeps this host from updating
            raise ConfigError(
                "unreadable", exc.strerror or str(exc), file=str(path), hint=READ_HINT
            ) from None
        found.append(path)
        merged.update((key, (value, path)) for key, value in parse(data).items())
    server, server_file = merged.get("SERVER", ("", None))
    group, group_file = merged.get("GROUP", ("", None))
    if server and server != DISABLED:
        parse_url(
            server,
            lambda why: ConfigError(
                "invalid",
                why,
                file=str(server_file),
                key="SERVER",
                hint=f"an http(s) URL of an Omaha server, or {DISABLED}",
            ),
        )
    if group and not valid_channel(group):
        raise ConfigError(
            "invalid",
            f"invalid group {group!r}",
            file=str(group_file),
            key="GROUP",
            hint="letters, digits, '.', '_' and '-', at most 64",
        )
    return FlatcarSettings(server=server or None, group=group or None, files=tuple(found))
