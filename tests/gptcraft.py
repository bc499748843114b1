"""Crafting GPTs the partitioning tools refuse to make: edit the raw entry array of a
disk image (one made by sfdisk) and recompute both copies' CRCs, so that only the
layout is wrong. Independent of partitions.gpt: plain struct offsets from the UEFI spec.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

SECTOR = 512  # bytes; what sfdisk uses for image files
ENTRY_FIRST_LBA = 32  # byte offsets inside a 128-byte entry
ENTRY_LAST_LBA = 40
ENTRY_PART_GUID = 16
ENTRY_NAME = 56
NAME_SIZE = 72


def _u32(buf: bytes | bytearray, at: int) -> int:
    return int(struct.unpack_from("<I", buf, at)[0])


def _u64(buf: bytes | bytearray, at: int) -> int:
    return int(struct.unpack_from("<Q", buf, at)[0])


def _header_geometry(image: bytes | bytearray, lba: int) -> tuple[int, int, int, int, int]:
    """(header_size, alternate_lba, entries_lba, num_entries, entry_size) of the header at lba."""
    h = lba * SECTOR
    return (
        _u32(image, h + 12),
        _u64(image, h + 32),
        _u64(image, h + 72),
        _u32(image, h + 80),
        _u32(image, h + 84),
    )


def _fix_header(image: bytearray, lba: int) -> None:
    """Recompute the entries CRC and the header CRC of the header at ``lba`` (if it fits)."""
    h = lba * SECTOR
    if h + 92 > len(image):
        return
    header_size, _alt, entries_lba, num, size = _header_geometry(image, lba)
    start, length = entries_lba * SECTOR, num * size
    if start + length <= len(image) and length <= 4 * 1024 * 1024:
        struct.pack_into("<I", image, h + 88, zlib.crc32(image[start : start + length]))
    header_size = min(max(header_size, 92), SECTOR)
    struct.pack_into("<I", image, h + 16, 0)
    struct.pack_into("<I", image, h + 16, zlib.crc32(image[h : h + header_size]))


def fix_crcs(image: bytearray) -> None:
    """Both copies' CRCs recomputed in place: the primary at LBA 1, the backup where
    the primary says (else the last sector). Tolerates garbage (for fuzzing)."""
    _fix_header(image, 1)
    sectors = len(image) // SECTOR
    alt = _header_geometry(image, 1)[1]
    backup = alt if 1 < alt < sectors else sectors - 1
    _fix_header(image, backup)


def edit_entries(disk: Path, edit: Callable[[bytearray], None]) -> None:
    """Apply ``edit`` to the primary's entry array, store it in both copies, fix the CRCs."""
    image = bytearray(disk.read_bytes())
    _, alt, entries_lba, num, size = _header_geometry(image, 1)
    start = entries_lba * SECTOR
    entries = bytearray(image[start : start + num * size])
    edit(entries)
    image[start : start + len(entries)] = entries
    backup_entries = _header_geometry(image, alt)[2] * SECTOR
    image[backup_entries : backup_entries + len(entries)] = entries
    fix_crcs(image)
    with disk.open("r+b") as f:
        f.write(image)


def set_entry(
    entries: bytearray,
    index: int,
    *,
    first_lba: int | None = None,
    last_lba: int | None = None,
    part_guid: UUID | None = None,
    name: str | None = None,
    entry_size: int = 128,
) -> None:
    """Change fields of the 1-based entry ``index`` of a raw entry array."""
    at = (index - 1) * entry_size
    if first_lba is not None:
        struct.pack_into("<Q", entries, at + ENTRY_FIRST_LBA, first_lba)
    if last_lba is not None:
        struct.pack_into("<Q", entries, at + ENTRY_LAST_LBA, last_lba)
    if part_guid is not None:
        entries[at + ENTRY_PART_GUID : at + ENTRY_PART_GUID + 16] = part_guid.bytes_le
    if name is not None:
        raw = name.encode("utf-16-le")[:NAME_SIZE]
        entries[at + ENTRY_NAME : at + ENTRY_NAME + NAME_SIZE] = raw + bytes(NAME_SIZE - len(raw))


def entry_lbas(entries: bytes | bytearray, index: int, entry_size: int = 128) -> tuple[int, int]:
    at = (index - 1) * entry_size
    return _u64(entries, at + ENTRY_FIRST_LBA), _u64(entries, at + ENTRY_LAST_LBA)


def entry_guid(entries: bytes | bytearray, index: int, entry_size: int = 128) -> UUID:
    at = (index - 1) * entry_size + ENTRY_PART_GUID
    return UUID(bytes_le=bytes(entries[at : at + 16]))
