"""Logging modes. Journal mode is tested against a datagram socket bound here and
parsed with the native protocol's rules (no journald needed)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from updater import log as updater_log
from updater.log import configure, encode_entry, field_name, is_journal_stream


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the native protocol."""
    fields = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        eq = data.find(b"=", i, nl)
        if eq != -1:
            fields.append((data[i:eq].decode(), data[eq + 1 : nl]))
            i = nl + 1
        else:  # KEY \n u64le length, value, \n
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            fields.append((data[i:nl].decode(), data[start : start + size]))
            assert data[start + size : start + size + 1] == b"\n"
            i = start + size + 1
    return fields


class Journal:
    """A stand-in for journald's /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2)
        self.memfd_seals: list[int] = []

    def entry(self) -> dict[str, str]:
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        if fds:  # the large-entry form: empty payload, one sealed memfd
            assert data == b""
            [fd] = fds
            try:
                self.memfd_seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
                os.lseek(fd, 0, os.SEEK_SET)
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                data = b"".join(chunks)
            finally:
                os.close(fd)
        fields = parse_native(data)
        names = [k for k, _ in fields]
        assert len(names) == len(set(names)), names
        return {k: v.decode() for k, v in fields}

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture(autouse=True)
def _close_journal_connection() -> Iterator[None]:
    yield
    updater_log.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.socket")
    try:
        yield j
    finally:
        j.sock.close()


def test_journal_entries_carry_fields(journal: Journal) -> None:
    out = io.StringIO()
    mode = configure(logging.DEBUG, out, "journal", journal_socket=journal.path)
    assert mode == "journal"
    log = structlog.get_logger("updater.install")
    log.info("install_finished", version="1.2.0", slot="USR-B", bytes=1048576, seconds=2.5)
    e = journal.entry()
    assert e["MESSAGE"] == ("install_finished version=1.2.0 slot=USR-B bytes=1048576 seconds=2.5")
    assert e["EVENT"] == "install_finished"
    assert e["PRIORITY"] == "6"
    assert e["SYSLOG_IDENTIFIER"] == "updater"
    assert (e["VERSION"], e["SLOT"], e["BYTES"], e["SECONDS"]) == (
        "1.2.0",
        "USR-B",
        "1048576",
        "2.5",
    )
    assert "TIMESTAMP" not in e  # journald stamps entries itself
    assert out.getvalue() == ""

    for method, priority in [("debug", "7"), ("warning", "4"), ("error", "3"), ("critical", "2")]:
        getattr(log, method)("something_happened")
        assert journal.entry()["PRIORITY"] == priority


def test_journal_values_with_newlines_use_the_binary_safe_form(journal: Journal) -> None:
    configure(logging.INFO, io.StringIO(), "journal", journal_socket=journal.path)
    output = "checking /var\n/var is read-only\n"
    structlog.get_logger().warning(
        "health_check_failed", check="20-disk", output=output, failed=["a", "b"], ok=False
    )
    e = journal.entry()
    assert e["OUTPUT"] == output
    assert e["FAILED"] == '["a", "b"]' and e["OK"] == "false"
    assert "\n" not in e["MESSAGE"]  # quoted in the message: one line
    assert 'output="checking /var\\n/var is read-only\\n"' in e["MESSAGE"]


def test_journal_exception_is_a_field_and_follows_the_message(journal: Journal) -> None:
    configure(logging.INFO, io.StringIO(), "journal", journal_socket=journal.path)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        structlog.get_logger().exception("install_crashed", version="1.2.0")
    e = journal.entry()
    assert e["PRIORITY"] == "3"
    assert e["EXCEPTION"].startswith("Traceback") and "RuntimeError: disk on fire" in e["EXCEPTION"]
    first, rest = e["MESSAGE"].split("\n", 1)
    assert first == "install_crashed version=1.2.0"
    assert rest.startswith("Traceback")


def test_journal_field_names_are_sanitised(journal: Journal) -> None:
    configure(logging.INFO, io.StringIO(), "journal", journal_socket=journal.path)
    structlog.get_logger().info(
        "odd_keys", message="hi", _pid=1, **{"2fa": "x", "dotted.key": "y", "ümlaut": "z"}
    )
    e = journal.entry()
    assert e["UPDATER_MESSAGE"] == "hi"  # MESSAGE is ours
    assert e["PID"] == "1"  # _PID is journald's trusted field
    assert e["F_2FA"] == "x" and e["DOTTED_KEY"] == "y" and e["MLAUT"] == "z"
    assert e["MESSAGE"].startswith("odd_keys ")
    assert field_name("x" * 100) == "X" * 64


def test_journal_context_vars_and_bound_values(journal: Journal) -> None:
    configure(logging.INFO, io.StringIO(), "journal", journal_socket=journal.path)
    structlog.contextvars.bind_contextvars(boot_id="abc")
    try:
        structlog.get_logger().bind(slot="USR-A").info("marked_good")
    finally:
        structlog.contextvars.clear_contextvars()
    e = journal.entry()
    assert (e["BOOT_ID"], e["SLOT"]) == ("abc", "USR-A")


def test_journal_level_filter(journal: Journal) -> None:
    configure(logging.WARNING, io.StringIO(), "journal", journal_socket=journal.path)
    structlog.get_logger().info("not_sent")
    structlog.get_logger().warning("sent")
    assert journal.entry()["EVENT"] == "sent"
    assert journal.empty()


def test_journal_large_entry_goes_through_a_sealed_memfd(journal: Journal) -> None:
    configure(logging.INFO, io.StringIO(), "journal", journal_socket=journal.path)
    big = "x" * (4 * 1024 * 1024)  # beyond any datagram size
    structlog.get_logger().info("big_output", output=big)
    e = journal.entry()
    assert e["OUTPUT"] == big
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert journal.memfd_seals == [seals]


def test_journal_unreachable_falls_back_to_json_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    configure(logging.INFO, out, "journal", journal_socket=tmp_path / "no-journald")
    structlog.get_logger().info("install_finished", version="1.2.0")
    doc = json.loads(out.getvalue())
    assert (doc["event"], doc["level"], doc["version"]) == ("install_finished", "info", "1.2.0")
    assert list(doc)[:3] == ["timestamp", "level", "event"]


def test_json_mode_is_one_object_per_line() -> None:
    out = io.StringIO()
    assert configure(logging.INFO, out, "json") == "json"
    log = structlog.get_logger()
    log.info("check_finished", version="1.2.0", path=Path("/var/lib/updater"))
    log.debug("hidden")
    log.warning("check_failed", kind="connection", message="multi\nline")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert first["path"] == "/var/lib/updater" and first["timestamp"].endswith("Z")
    assert second["message"] == "multi\nline" and second["level"] == "warning"


def test_console_mode_is_readable() -> None:
    out = io.StringIO()
    assert configure(logging.INFO, out, "console") == "console"
    structlog.get_logger().info("check_finished", version="1.2.0")
    line = out.getvalue()
    assert "check_finished" in line and "version=1.2.0" in line and "[info" in line
    assert "\x1b[" not in line  # no colours into something that is not a terminal


def test_auto_picks_console_on_a_terminal() -> None:
    leader, follower = os.openpty()
    with open(follower, "w", closefd=True) as tty:
        try:
            assert configure(logging.INFO, tty, "auto", env={}) == "console"
            assert configure(logging.INFO, tty, "auto", env={"NO_COLOR": "1"}) == "console"
        finally:
            os.close(leader)


def test_auto_picks_json_otherwise() -> None:
    assert configure(logging.INFO, io.StringIO(), "auto", env={}) == "json"


def test_auto_picks_the_journal_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, journal: Journal
) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal_stream(stream, env)
        assert configure(logging.INFO, stream, env=env, journal_socket=journal.path) == "journal"
        structlog.get_logger().info("started")
        assert journal.entry()["EVENT"] == "started"
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}  # stderr was redirected
        assert configure(logging.INFO, stream, env=other) == "json"
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": "garbage"})
        # isdigit() takes "\u00b2" and int() refuses it: not a ValueError at start-up
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": f"\u00b2:{st.st_ino}"})
    assert not is_journal_stream(io.StringIO(), env)


def test_existing_callers_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    configure(logging.WARNING, sys.stderr)  # positional stream, as bench/ does
    structlog.get_logger().warning("still_works", n=1)
    configure()
    structlog.get_logger().warning("default_stream")
    err = capsys.readouterr().err
    assert "still_works" in err and "default_stream" in err


def test_encode_entry_forms() -> None:
    assert encode_entry([("FOO", b"BAR")]) == b"FOO=BAR\n"
    assert encode_entry([("FOO", b"B\nR")]) == b"FOO\n\x03\x00\x00\x00\x00\x00\x00\x00B\nR\n"
    assert parse_native(encode_entry([("A", b""), ("B", b"x=y\n")])) == [
        ("A", b""),
        ("B", b"x=y\n"),
    ]
