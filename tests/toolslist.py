"""scripts/tools.list: every external program (and file) the project uses,
with the Debian package that provides it; scripts/bootstrap.sh installs them."""

from __future__ import annotations

from pathlib import Path

TOOLS_LIST = Path(__file__).resolve().parent.parent / "scripts" / "tools.list"


def listed() -> tuple[set[str], set[str]]:
    """The commands and the files (absolute paths) that tools.list installs."""
    commands: set[str] = set()
    files: set[str] = set()
    for raw in TOOLS_LIST.read_text().splitlines():
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        assert len(line) == 2, f"tools.list: {raw!r}: want 'command package'"
        (files if line[0].startswith("/") else commands).add(line[0])
    return commands, files
