"""The booted image's version from os-release(5), when the agent has no record."""

from __future__ import annotations

import shlex
from pathlib import Path


def parse(text: str, *, inline_comments: bool = False) -> dict[str, str]:
    """Shell-style ``KEY=value`` lines (os-release(5), Flatcar's update.conf).

    ``inline_comments``: a ``#`` after the value starts a comment, as update.conf
    allows; os-release has whole-line comments only.
    """
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value, comments=inline_comments)
        except ValueError:
            continue
        fields[key.strip()] = words[0] if words else ""
    return fields


def parse_file(path: Path) -> dict[str, str]:
    """The fields of an os-release file; empty when it cannot be read."""
    try:
        return parse(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {}


def image_version(path: Path) -> str | None:
    """IMAGE_VERSION, else VERSION_ID, else None (also when the file is missing)."""
    fields = parse_file(path)
    for key in ("IMAGE_VERSION", "VERSION_ID"):
        if fields.get(key):
            return fields[key]
    return None
