"""How many bytes of a slot its file system uses, from its superblock. Pure, no I/O.

A delta update (:mod:`updater.delta`) reads the booted slot for blocks it can
reuse. When the agent wrote that slot it knows the image's size; a slot that
provisioning wrote is read as far as its file system reaches, not to the end of
the partition (a 1 GiB slot holding a 560 MiB root file system: the rest is
padding no image block comes from). Only ext2/3/4 is recognised; anything else
(or a superblock that does not add up) gives None and the whole slot is read.
"""

from __future__ import annotations

import struct

HEAD = 2048  # bytes of the slot's start that :func:`fs_size` reads

_EXT_SUPER = 1024  # byte offset of the ext2/3/4 superblock
_EXT_MAGIC = 0xEF53
_EXT_INCOMPAT_64BIT = 0x80


def fs_size(head: bytes, slot_size: int) -> int | None:
    """Bytes the file system at the start of ``head`` (the slot's first :data:`HEAD`
    bytes) spans; None when there is none this reads, or it claims more than the
    slot (``slot_size``) holds."""
    if len(head) < _EXT_SUPER + 1024:
        return None
    sb = head[_EXT_SUPER : _EXT_SUPER + 1024]
    (magic,) = struct.unpack_from("<H", sb, 56)
    if magic != _EXT_MAGIC:
        return None
    (blocks_lo,) = struct.unpack_from("<I", sb, 4)
    (log_block,) = struct.unpack_from("<I", sb, 24)
    (incompat,) = struct.unpack_from("<I", sb, 96)
    (desc_size,) = struct.unpack_from("<H", sb, 254)
    blocks_hi = 0
    if incompat & _EXT_INCOMPAT_64BIT and desc_size >= 64:
        (blocks_hi,) = struct.unpack_from("<I", sb, 336)
    if log_block > 6:  # 1 KiB << 6 = 64 KiB, the largest block ext4 knows
        return None
    size: int = ((blocks_hi << 32) | blocks_lo) * (1024 << log_block)
    if size <= 0 or size > slot_size:
        return None
    return size
