"""The chunk index of a release image (delta updates, issue 14): format, building, parsing.

The raw image is cut into fixed blocks (64 KiB; the last one may be short),
and the published zstd image is written as one zstd frame per block, so that
it is still one valid zstd stream (a full download reads it unchanged) and
any run of blocks is one byte range of it. The index lists, per block, its
digest and its frame's offset and length in the image file.

A block's digest is the sha256 of the concatenated sha256s of its 4 KiB
sub-blocks (the file system's block size). The agent then hashes the booted
slot once per 4 KiB and has the digest of the 64 KiB window at every 4 KiB
offset for 512 bytes of hashing each, so a block is found even where a file
system moved it by whole file-system blocks. docs/benchmarks.md ("Delta
updates") has the measurements behind this choice (against plain 64 KiB and
4 KiB blocks and content-defined chunks) and behind serving the missing blocks
as Range requests into the image rather than a raw copy or a chunk store.

Format (all integers big-endian)::

    header  8s magic "UPDCHNK1", u32 block_size, u32 sub_block, u64 count, u64 raw_size
    entry   32s digest, u64 frame offset, u32 frame length        (count times)

The signed manifest names the index's URL, size, sha256, block size and
count (:class:`updater.manifest.IndexRef`); :func:`parse` accepts only bytes
that match it, and an index whose frames are not exactly the image file, in
order, without gap or overlap, is refused (``index_malformed``). The index
is a hint for which bytes to fetch or copy: whatever it says, the slot must
still hash to the manifest's raw sha256 before it may boot.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zstandard

from updater.errors import VerificationError

MAGIC = b"UPDCHNK1"
HEADER = struct.Struct(">8sIIQQ")
ENTRY = struct.Struct(">32sQI")
BLOCK_SIZE = 64 * 1024  # bytes; what `updatectl release` writes
SUB_BLOCK = 4096  # bytes; the only sub-block size this agent reads
MIN_BLOCK = SUB_BLOCK
MAX_BLOCK = 16 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024  # ~1.5 million blocks: a 95 GiB image at 64 KiB
FRAME_SLACK = 1024  # bytes a zstd frame of one block may exceed the block by (headers)


@dataclass(frozen=True)
class Entry:
    digest: bytes  # 32 bytes, :func:`block_digest` of the raw block
    offset: int  # of its zstd frame in the image file
    length: int  # of that frame


@dataclass(frozen=True)
class ChunkIndex:
    block_size: int
    sub_block: int
    raw_size: int
    entries: tuple[Entry, ...]

    def block(self, i: int) -> tuple[int, int]:
        """Raw offset and length of block ``i``."""
        start = i * self.block_size
        return start, min(self.block_size, self.raw_size - start)


def block_count(raw_size: int, block_size: int) -> int:
    return -(-raw_size // block_size)


def index_size(count: int) -> int:
    """The exact byte size of an index of ``count`` blocks."""
    return HEADER.size + count * ENTRY.size


def sub_digests(data: bytes | memoryview, sub_block: int = SUB_BLOCK) -> list[bytes]:
    view = memoryview(data)
    step = range(0, len(view), sub_block)
    return [hashlib.sha256(view[i : i + sub_block]).digest() for i in step]


def combine(subs: list[bytes] | tuple[bytes, ...]) -> bytes:
    """A block's digest from its sub-blocks' sha256s, in order."""
    return hashlib.sha256(b"".join(subs)).digest()


def block_digest(data: bytes | memoryview, sub_block: int = SUB_BLOCK) -> bytes:
    return combine(sub_digests(data, sub_block))


def serialize(index: ChunkIndex) -> bytes:
    n = len(index.entries)
    out = [HEADER.pack(MAGIC, index.block_size, index.sub_block, n, index.raw_size)]
    out.extend(ENTRY.pack(e.digest, e.offset, e.length) for e in index.entries)
    return b"".join(out)


def _bad(message: str) -> VerificationError:
    return VerificationError(
        "index_malformed",
        f"chunk index: {message}",
        hint="the publisher must fix the release (a lying index refuses it, as a "
        "lying image would)",
    )


def parse(
    data: bytes,
    *,
    size: int,
    sha256: str,
    block_size: int,
    count: int,
    raw_size: int,
    image_size: int,
) -> ChunkIndex:
    """The index in ``data``, checked against what the signed manifest says of it
    (``size``, ``sha256``, ``block_size``, ``count``) and of the image (``raw_size``,
    ``image_size``: the compressed file the frames cut up).

    Raises VerificationError: ``size_mismatch``/``hash_mismatch`` for bytes that are
    not the signed index, ``index_malformed`` for a signed index that lies.
    """
    if len(data) > MAX_INDEX_BYTES:
        raise VerificationError(
            "size_mismatch", f"chunk index: {len(data)} bytes, above the cap of {MAX_INDEX_BYTES}"
        )
    if len(data) != size:
        raise VerificationError(
            "size_mismatch", f"chunk index: {len(data)} bytes, the manifest says {size}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise VerificationError(
            "hash_mismatch", f"chunk index: sha256 {digest}, the manifest says {sha256}"
        )
    if len(data) < HEADER.size:
        raise _bad("shorter than its header")
    magic, bsize, sub, n, raw = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _bad(f"magic {magic!r} is not {MAGIC!r}")
    if bsize != block_size or n != count or raw != raw_size:
        raise _bad(
            f"header says block {bsize}, count {n}, raw size {raw}; the manifest "
            f"{block_size}, {count}, {raw_size}"
        )
    if sub != SUB_BLOCK or bsize % sub or not MIN_BLOCK <= bsize <= MAX_BLOCK:
        raise _bad(f"block size {bsize} / sub-block {sub} is not supported")
    if n != block_count(raw, bsize):
        raise _bad(f"{n} blocks do not cover {raw} bytes in blocks of {bsize}")
    if len(data) != index_size(n):
        raise _bad(f"{len(data)} bytes for {n} entries")
    entries: list[Entry] = []
    expect = 0
    for i, (dig, off, length) in enumerate(ENTRY.iter_unpack(memoryview(data)[HEADER.size :])):
        if off != expect:
            what = "overlaps the one before" if off < expect else "leaves a gap"
            raise _bad(f"frame {i} at {off} {what} (expected {expect})")
        if not 0 < length <= bsize + FRAME_SLACK:
            raise _bad(f"frame {i} has {length} bytes; a block of {bsize} has at most that + slack")
        expect = off + length
        if expect > image_size:
            raise _bad(f"frame {i} ends at {expect}, past the image's {image_size} bytes")
        entries.append(Entry(bytes(dig), off, length))
    if expect != image_size:
        raise _bad(f"the frames end at {expect}, the image has {image_size} bytes")
    return ChunkIndex(bsize, sub, raw, tuple(entries))


def parse_own(data: bytes, *, sha256: str, raw_size: int) -> ChunkIndex:
    """An index this agent kept (:mod:`updater.slotindex`): its bytes must hash to
    ``sha256`` and describe ``raw_size`` bytes; the rest is checked as :func:`parse`
    checks a fetched one, against the numbers in its own header."""
    if len(data) < HEADER.size + ENTRY.size:
        raise _bad("shorter than a header and one entry")
    _, bsize, _, n, _ = HEADER.unpack_from(data)
    _, last_offset, last_length = ENTRY.unpack_from(data, len(data) - ENTRY.size)
    return parse(
        data,
        size=len(data),
        sha256=sha256,
        block_size=bsize,
        count=n,
        raw_size=raw_size,
        image_size=last_offset + last_length,
    )


class FrameWriter:
    """Publisher side: compress raw blocks as one zstd frame each and record the index.

    ``write`` takes a list of whole blocks (the last block of the image may be
    short) and hands each frame to ``out``; zstandard compresses a batch on all
    cores (``multi_compress_to_buffer``).
    """

    def __init__(
        self, out: Callable[[bytes], object], level: int, block_size: int = BLOCK_SIZE
    ) -> None:
        self._out = out
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self.block_size = block_size
        self.entries: list[Entry] = []
        self.raw_size = 0
        self.size = 0

    def write(self, blocks: list[bytes]) -> None:
        if not blocks:
            return
        batch: list[bytes | bytearray | memoryview] = list(blocks)
        frames = self._cctx.multi_compress_to_buffer(batch, threads=-1)
        for i, block in enumerate(blocks):
            data = frames[i].tobytes()
            self.entries.append(Entry(block_digest(block), self.size, len(data)))
            self._out(data)
            self.size += len(data)
            self.raw_size += len(block)

    def index(self) -> ChunkIndex:
        return ChunkIndex(self.block_size, SUB_BLOCK, self.raw_size, tuple(self.entries))


def read_blocks(read: Callable[[int], bytes], block_size: int, batch: int) -> Iterator[list[bytes]]:
    """Lists of up to ``batch`` whole blocks from ``read`` (the last block may be short)."""
    while True:
        blocks: list[bytes] = []
        while len(blocks) < batch:
            b = read(block_size)
            if not b:
                break
            while len(b) < block_size:
                more = read(block_size - len(b))
                if not more:
                    break
                b += more
            blocks.append(b)
            if len(b) < block_size:
                break
        if not blocks:
            return
        yield blocks
        if len(blocks[-1]) < block_size:
            return
