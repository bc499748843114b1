"""os-release(5) parsing: shell quoting, and whatever else a file may hold is a
field, a skipped line or no version; reads are bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from updater import osrelease


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('NAME="Fleet OS"\n', {"NAME": "Fleet OS"}),
        ("NAME='Fleet OS'\n", {"NAME": "Fleet OS"}),
        ('NAME="a \\"quoted\\" word"\n', {"NAME": 'a "quoted" word'}),
        ("NAME=a\\ b\n", {"NAME": "a b"}),
        ("NAME=\n", {"NAME": ""}),
        ('NAME=""\n', {"NAME": ""}),
        ("IMAGE_VERSION=1.2.3\r\n", {"IMAGE_VERSION": "1.2.3"}),  # CRLF
        ("  ID = fleet  \n", {"ID": "fleet"}),
        ("ID=fleet # not a comment in os-release\n", {"ID": "fleet"}),
        ("PRETTY_NAME=a\u2028b\n", {"PRETTY_NAME": "a\u2028b"}),  # one line, not two
        ("ID=x\nID=y\n", {"ID": "y"}),
        ("VERSION=$(reboot)\n", {"VERSION": "$(reboot)"}),  # words, never run
        # skipped: unbalanced quotes, trailing backslash, not a variable name, controls
        ('NAME="unterminated\nID=ok\n', {"ID": "ok"}),
        ("NAME=x\\\nID=ok\n", {"ID": "ok"}),
        ("=x\n1A=x\nA-B=x\nexport A=x\nÄ=x\n", {}),
        ("IMAGE_VERSION=1.0\x00evil\nID=ok\n", {"ID": "ok"}),
        ('IMAGE_VERSION="1.0\x1b[31m"\n', {}),
        ("IMAGE_VERSION=1.0\x85x\n", {}),  # a C1 control inside a value
        ("# comment\n\n   \n#A=b\nnoequals\n", {}),
    ],
)
def test_parse(text: str, expected: dict[str, str]) -> None:
    assert osrelease.parse(text) == expected


def test_invalid_utf8_lines_are_skipped_not_replaced() -> None:
    data = b"NAME=caf\xe9\nIMAGE_VERSION=1.2.3\nID=\xff\xfe\n"
    assert osrelease.parse(data) == {"IMAGE_VERSION": "1.2.3"}


def test_image_version_falls_back_past_a_bad_line(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_bytes(b"IMAGE_VERSION=1.2.3\x00\nVERSION_ID=1.2.0\n")
    assert osrelease.image_version(f) == "1.2.0"
    f.write_bytes(b"IMAGE_VERSION=\xff1.2.3\n")
    assert osrelease.image_version(f) is None


def test_reads_are_bounded(tmp_path: Path) -> None:
    f = tmp_path / "os-release"
    f.write_text("IMAGE_VERSION=1.2.3\n" + "# padding\n" * (osrelease.MAX_FILE_BYTES // 10))
    with capture_logs() as logs:
        assert osrelease.image_version(f) is None
    assert [e["event"] for e in logs] == ["os_release_unreadable"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: reading it would block for ever
    assert osrelease.image_version(fifo) is None
    assert osrelease.image_version(tmp_path) is None  # a directory
    with capture_logs() as logs:
        assert osrelease.image_version(tmp_path / "missing") is None
        assert osrelease.image_version(f / "below-a-file") is None
    assert logs == []  # a missing file is normal: no warning
