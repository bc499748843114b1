"""A recording RAM disk: an nbdkit plugin (nbdkit-plugin-python) and its log's reader.

    nbdkit python devtools/nbdrecord.py disk=SEED.img log=OPS.log

The disk starts as a copy of SEED, read whole into memory (the test disks are
tens of MiB), and lives only there: SEED is never written. Every request that
changes what a disk holds or makes it durable is appended to LOG in the order
nbdkit served it: writes (with their data and the FUA flag), zeroes (as writes
of zeroes) and flushes. Requests are serialized (one at a time), so that order
is the only one there is, and a flush covers exactly the writes logged before
it. :mod:`devtools.powercut` rebuilds the disk as a power cut at any point of
the log would have left it.

nbdkit runs this file in its own embedded interpreter (the system Python), so
it imports only the standard library, and ``nbdkit`` itself only when nbdkit
calls in: the project imports this module for :func:`read_log` alone.

Log format: records of a header (:data:`HEADER`: kind, flags, offset, length)
followed, for a write, by ``length`` bytes of data.
"""

from __future__ import annotations

import importlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<cIQQ")  # kind, flags, offset, length
WRITE = b"W"
FLUSH = b"F"
FUA = 1  # in a record's flags: the write came with FUA

API_VERSION = 2


@dataclass(frozen=True)
class Op:
    """One logged request; ``index`` is its place in the log."""

    index: int
    kind: bytes  # WRITE or FLUSH
    offset: int
    data: bytes  # a write's bytes; empty for a flush
    fua: bool  # a write the server made durable before answering


def read_log(path: Path) -> list[Op]:
    """Every request in ``path``, in the order the server handled them."""
    raw = path.read_bytes()
    ops: list[Op] = []
    pos = 0
    while pos < len(raw):
        kind, flags, offset, length = HEADER.unpack_from(raw, pos)
        pos += HEADER.size
        data = b""
        if kind == WRITE:
            data = raw[pos : pos + length]
            if len(data) != length:
                raise ValueError(f"{path}: the log ends inside write {len(ops)}")
            pos += length
        elif kind != FLUSH:
            raise ValueError(f"{path}: unknown record {kind!r} at byte {pos - HEADER.size}")
        ops.append(Op(len(ops), kind, offset, data, bool(flags & FUA)))
    return ops


# ---- the plugin: nbdkit calls these by name ---------------------------------------------------


class _Disk:
    def __init__(self) -> None:
        self.config: dict[str, str] = {}
        self.data = bytearray()
        self.log = -1

    def record(self, kind: bytes, flags: int, offset: int, data: bytes | memoryview = b"") -> None:
        # one write(2) per record: a reader after the server's exit sees whole records
        header = HEADER.pack(kind, flags, offset, len(data))
        view = memoryview(header + bytes(data))
        while view:
            view = view[os.write(self.log, view) :]


_disk = _Disk()


def _nbdkit() -> Any:
    return importlib.import_module("nbdkit")  # only inside nbdkit's interpreter


def config(key: str, value: str) -> None:
    _disk.config[key] = value


def config_complete() -> None:
    for key in ("disk", "log"):
        if key not in _disk.config:
            raise RuntimeError(f"nbdrecord: {key}=PATH is required")
    _disk.data = bytearray(Path(_disk.config["disk"]).read_bytes())
    _disk.log = os.open(_disk.config["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def cleanup() -> None:
    if _disk.log >= 0:
        os.close(_disk.log)
        _disk.log = -1


def thread_model() -> int:
    # One request at a time: the log's order is the order the disk saw.
    return int(_nbdkit().THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def open(readonly: bool) -> int:  # the name nbdkit looks up (it shadows the builtin here)
    return 1


def get_size(h: int) -> int:
    return len(_disk.data)


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return int(_nbdkit().FUA_NATIVE)  # FUA writes reach us flagged, and are logged so


def can_multi_conn(h: int) -> bool:
    return False  # one connection: one order


def can_trim(h: int) -> bool:
    return False  # a trim would be a write of unknown contents


def can_zero(h: int) -> bool:
    return True


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = _disk.data[offset : offset + len(buf)]


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    end = offset + len(buf)
    if end > len(_disk.data):
        raise OSError(f"write past the end: {offset}+{len(buf)}")
    _disk.data[offset:end] = buf
    _disk.record(WRITE, FUA if flags & _nbdkit().FLAG_FUA else 0, offset, buf)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    pwrite(h, bytes(count), offset, flags)


def flush(h: int, flags: int) -> None:
    _disk.record(FLUSH, 0, 0)
