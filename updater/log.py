"""structlog, configured once per process, in one of three modes:

- ``journal``: every event is one entry sent to journald over its native
  protocol (an ``AF_UNIX`` datagram to ``/run/systemd/journal/socket``), with
  each key-value as its own journal field, so ``journalctl -u updater
  VERSION=1.2.0`` and ``-o json`` work. Chosen by ``auto`` when our stderr *is*
  the journal stream that systemd handed us (``JOURNAL_STREAM``).
- ``console``: readable lines, for a person at a terminal.
- ``json``: one JSON object per line, for anything else (pipes, files, CI).

The journal sender is ours, not libsystemd's ``sd_journal_send`` (which
systemd-python wraps): that one always writes to the fixed socket path, so it
cannot be pointed at a test's socket; the native protocol is small and
documented (systemd's docs/JOURNAL_NATIVE_PROTOCOL.md).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog

LogMode = Literal["auto", "journal", "console", "json"]

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER = "updater"

# syslog priorities, as journald expects them in PRIORITY=
_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}
# fields this module sets itself; an event key with the same name is prefixed
_OWN_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"})
_SNDBUF = 8 * 1024 * 1024  # bytes; as libsystemd does, to block less often

_sender: JournalSender | None = None  # the journal connection of the current configuration


def configure(
    level: int = logging.WARNING,
    stream: TextIO | None = None,
    mode: LogMode = "auto",
    *,
    journal_socket: str | Path = JOURNAL_SOCKET,
    env: Mapping[str, str] | None = None,
) -> Literal["journal", "console", "json"]:
    """Configure structlog for this process; returns the mode chosen.

    ``stream`` (default stderr) gets the console or JSON lines, and in journal
    mode the lines that could not be sent to the journal."""
    out = stream or sys.stderr
    environ = os.environ if env is None else env
    chosen = choose_mode(mode, out, environ)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    processors: list[structlog.typing.Processor]
    logger_factory: Any
    close()
    if chosen == "journal":
        global _sender  # noqa: PLW0603 one journal connection per process, like libsystemd's
        _sender = JournalSender(journal_socket)
        journal = JournalLogger(_sender, fallback=out)
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),  # for the fallback only
            structlog.processors.format_exc_info,
        ]
        logger_factory = lambda *_args: journal  # noqa: E731 one logger for all names
    else:
        renderer: structlog.typing.Processor
        if chosen == "console":
            colors = out.isatty() and "NO_COLOR" not in environ
            renderer = structlog.dev.ConsoleRenderer(colors=colors)
        else:
            renderer = structlog.processors.JSONRenderer(default=str)
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _leading_keys,
            renderer,
        ]
        logger_factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    return chosen


def close() -> None:
    """Close the journal connection, if any (structlog keeps its configuration)."""
    global _sender  # noqa: PLW0603
    if _sender is not None:
        _sender.close()
        _sender = None


def choose_mode(
    mode: LogMode, stream: TextIO, env: Mapping[str, str]
) -> Literal["journal", "console", "json"]:
    if mode != "auto":
        return mode
    if is_journal_stream(stream, env):
        return "journal"
    return "console" if stream.isatty() else "json"


def is_journal_stream(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal connection systemd gave this service:
    ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of it. A redirected stderr (a shell
    pipe in ExecStart=, a test's buffer) keeps the variable but not the file."""
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not (dev + ino).isascii() or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO has no fileno
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _leading_keys(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    """timestamp, level, event first: what a reader scans for."""
    head = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
    return {**head, **event}


# ---- the journal ---------------------------------------------------------------------------------


def field_name(key: str) -> str:
    """A journal field name for an event key: upper case, ``[A-Z0-9_]`` only, not
    starting with ``_`` (journald's trusted fields) or a digit, at most 64 bytes."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _OWN_FIELDS:
        name = "UPDATER_" + name
    return name[:64]


def field_value(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    if value is None or isinstance(value, bool | int | float | list | tuple | dict):
        return json.dumps(value, default=str).encode()
    return str(value).encode("utf-8", "replace")


def _logfmt_value(value: Any) -> str:
    text = field_value(value).decode("utf-8", "replace")
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def journal_fields(event: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The journal entry of a structlog event: MESSAGE is the event name followed by
    its key-values (``install_finished version=1.2.0 bytes=42``; a traceback on the
    following lines), EVENT the bare name, PRIORITY from the level, and every key
    as its own field."""
    data = dict(event)
    name = str(data.pop("event", ""))
    level = str(data.pop("level", "info"))
    exception = data.pop("exception", None)
    data.pop("timestamp", None)
    message = " ".join([name, *(f"{k}={_logfmt_value(v)}" for k, v in data.items())])
    if exception:
        message += "\n" + str(exception).rstrip("\n")
    fields = [
        ("MESSAGE", message.encode("utf-8", "replace")),
        ("PRIORITY", str(_PRIORITY.get(level, 6)).encode()),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.encode()),
        ("EVENT", name.encode("utf-8", "replace")),
    ]
    fields += [(field_name(k), field_value(v)) for k, v in data.items()]
    if exception:
        fields.append(("EXCEPTION", str(exception).encode("utf-8", "replace")))
    return fields


def encode_entry(fields: list[tuple[str, bytes]]) -> bytes:
    """The native protocol's serialization: ``KEY=value\\n``, or, for a value that
    holds a newline, ``KEY\\n`` + little-endian u64 length + value + ``\\n``."""
    out = bytearray()
    for key, value in fields:
        out += key.encode()
        if b"\n" in value:
            out += b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += b"=" + value + b"\n"
    return bytes(out)


class JournalSender:
    """Datagrams to journald's native socket; an entry too large for one datagram
    goes as a sealed memfd, as sd_journal_sendv does. ``send`` raises OSError."""

    def __init__(self, path: str | Path = JOURNAL_SOCKET) -> None:
        self.path = str(path)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
                self._sock = sock
            return self._sock

    def send(self, entry: bytes) -> None:
        sock = self._socket()
        try:
            sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(sock, entry)

    def _send_memfd(self, sock: socket.socket, entry: bytes) -> None:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = array.array("i", [fd])
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class JournalLogger:
    """structlog's logger for journal mode: gets the processed event as keywords.
    When journald cannot be reached the event is written to ``fallback`` as a JSON
    line, so nothing is lost (a service's stderr ends up in the journal anyway)."""

    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self.sender = sender
        self.fallback = fallback

    def msg(self, **event: Any) -> None:
        try:
            self.sender.send(encode_entry(journal_fields(event)))
        except OSError:
            self.fallback.write(json.dumps(_leading_keys(None, "", dict(event)), default=str))
            self.fallback.write("\n")
            self.fallback.flush()

    debug = info = warning = warn = error = critical = exception = fatal = failure = log = msg
