"""The booted image's version from os-release(5), when the agent has no record.

The parser also reads Flatcar's update.conf (``updater.flatcar``): both are
shell-style ``KEY=value`` files written by someone else, so it takes what a
shell assignment would mean and skips every line it cannot read that way (as
systemd's parser does): a key that is no variable name, unbalanced quotes,
invalid UTF-8, a value with control characters. Files are read bounded.
"""

from __future__ import annotations

import errno
import re
import shlex
from pathlib import Path

import structlog

from updater.fsutil import read_bounded

log = structlog.get_logger(__name__)

MAX_FILE_BYTES = 64 * 1024  # os-release and update.conf are a few hundred bytes
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# C0 controls, DEL and C1 controls: no version, URL or name holds one
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def parse(text: str | bytes, *, inline_comments: bool = False) -> dict[str, str]:
    """Shell-style ``KEY=value`` lines (os-release(5), Flatcar's update.conf).

    ``inline_comments``: a ``#`` after the value starts a comment, as update.conf
    allows; os-release has whole-line comments only. Bytes are decoded line by
    line, and a line that is not UTF-8 is skipped.
    """
    fields: dict[str, str] = {}
    lines = text.split(b"\n") if isinstance(text, bytes) else text.split("\n")
    for raw in lines:
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
        else:
            line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not _KEY.fullmatch(key):
            continue
        try:
            words = shlex.split(value, comments=inline_comments)
        except ValueError:  # unbalanced quotes, a trailing backslash
            continue
        word = words[0] if words else ""
        if _CONTROL.search(word):
            continue
        fields[key] = word
    return fields


def read_file(path: Path) -> bytes:
    """``path``'s bytes, bounded (OSError as :func:`~updater.fsutil.read_bounded`)."""
    return read_bounded(path, MAX_FILE_BYTES)


def parse_file(path: Path) -> dict[str, str]:
    """The fields of an os-release file; empty when it cannot be read."""
    try:
        return parse(read_file(path))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("os_release_unreadable", path=str(path), error=exc.strerror or str(exc))
        return {}


def image_version(path: Path) -> str | None:
    """IMAGE_VERSION, else VERSION_ID, else None (also when the file is missing)."""
    fields = parse_file(path)
    for key in ("IMAGE_VERSION", "VERSION_ID"):
        if fields.get(key):
            return fields[key]
    return None
