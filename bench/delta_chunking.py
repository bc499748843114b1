"""How to cut a file-system image into chunks for delta updates, measured.

``python -m bench.delta_chunking [--size-mib 64]`` builds a base ext4 image and
one image per kind of change (:mod:`devtools.deltaimages`), then for each way
of cutting reports the share of the new image's bytes whose chunk the old
image already holds (by sha256; anywhere in it), and for 64 KiB blocks what
the missing ones cost to download when each block is its own zstd frame
against the whole image as one zstd stream. The cutters:

- ``fixed-64k``: 64 KiB blocks at multiples of 64 KiB (and of the new image);
- ``fixed-4k``: 4 KiB blocks, the file system's own block size;
- ``64k@4k``: 64 KiB blocks of the new image, found in the old one at any
  4 KiB-aligned offset (a block's digest is the sha256 of its 16 sub-block
  sha256s, so the old image is hashed once per 4 KiB, not 16 times);
- ``cdc-64k``: content-defined chunks (a gear rolling hash as FastCDC/desync
  use, 16 KiB min, 64 KiB average, 256 KiB max), pure Python, so slow.

The results are in docs/benchmarks.md ("Delta updates: chunking").
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

from devtools.deltaimages import KINDS, make_pair_set

MIB = 1024 * 1024
_GEAR = [random.Random(7).getrandbits(64) for _ in range(256)]


def fixed(size: int) -> Callable[[bytes], Iterator[tuple[int, int]]]:
    def cut(data: bytes) -> Iterator[tuple[int, int]]:
        for off in range(0, len(data), size):
            yield off, min(size, len(data) - off)

    return cut


def cdc(
    data: bytes, lo: int = 16 * 1024, avg: int = 64 * 1024, hi: int = 256 * 1024
) -> Iterator[tuple[int, int]]:
    """Gear-hash content-defined chunks (offset, length)."""
    mask = (1 << (avg.bit_length() - 1)) - 1
    gear = _GEAR
    m64 = (1 << 64) - 1
    start = 0
    n = len(data)
    while start < n:
        end = min(start + hi, n)
        i = start + lo
        h = 0
        cut_at = end
        while i < end:
            h = ((h << 1) + gear[data[i]]) & m64
            if not (h >> 40) & mask:
                cut_at = i + 1
                break
            i += 1
        yield start, min(cut_at, n) - start
        start = cut_at


def hashes(
    data: bytes, cutter: Callable[[bytes], Iterator[tuple[int, int]]]
) -> list[tuple[int, int, bytes]]:
    return [(o, n, hashlib.sha256(data[o : o + n]).digest()) for o, n in cutter(data)]


def listed(block: bytes, sub: int = 4096) -> bytes:
    """sha256 of the sha256s of ``block``'s ``sub``-byte pieces."""
    return hashlib.sha256(
        b"".join(hashlib.sha256(block[i : i + sub]).digest() for i in range(0, len(block), sub))
    ).digest()


def sliding(data: bytes, block: int = 64 * 1024, sub: int = 4096) -> Iterator[bytes]:
    """:func:`listed` digests of every ``block`` window at every ``sub``-aligned offset."""
    subs = [hashlib.sha256(data[i : i + sub]).digest() for i in range(0, len(data), sub)]
    k = block // sub
    for i in range(len(subs) - k + 1):
        yield hashlib.sha256(b"".join(subs[i : i + k])).digest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--no-cdc", action="store_true")
    args = ap.parse_args()
    size = args.size_mib * MIB
    cutters: dict[str, Callable[[bytes], Iterator[tuple[int, int]]]] = {
        "fixed-64k": fixed(64 * 1024),
        "fixed-4k": fixed(4096),
    }
    if not args.no_cdc:
        cutters["cdc-64k"] = cdc
    with tempfile.TemporaryDirectory(prefix="delta-chunking-") as tmp:
        t0 = time.monotonic()
        images = make_pair_set(Path(tmp), size)
        print(f"images built in {time.monotonic() - t0:.1f} s ({args.size_mib} MiB each)")
        base = images["base"].read_bytes()
        base_sets: dict[str, set[bytes]] = {}
        t0 = time.monotonic()
        base_sets["64k@4k"] = set(sliding(base))
        print(f"64k@4k: {len(base_sets['64k@4k'])} windows, {time.monotonic() - t0:.1f} s")
        for name, cutter in cutters.items():
            t0 = time.monotonic()
            base_sets[name] = {h for _, _, h in hashes(base, cutter)}
            print(f"{name}: {len(base_sets[name])} chunks, {time.monotonic() - t0:.1f} s")
        cctx = zstandard.ZstdCompressor(level=10)
        whole = len(cctx.compress(base))
        frames = sum(len(cctx.compress(base[o : o + n])) for o, n in fixed(64 * 1024)(base))
        print(
            f"base zstd -10 one stream: {whole} bytes; 64 KiB frames: {frames} bytes "
            f"(+{100 * (frames - whole) / whole:.1f} %)"
        )
        print(
            "kind       cutter      reused%   missing raw MiB   missing zstd-frames MiB  "
            "(whole image zstd MiB)"
        )
        for kind in KINDS:
            new = images[kind].read_bytes()
            new_whole = len(cctx.compress(new))
            for name, cutter in [*cutters.items(), ("64k@4k", fixed(64 * 1024))]:
                if name == "64k@4k":
                    chunks = [(o, n, listed(new[o : o + n])) for o, n in cutter(new)]
                else:
                    chunks = hashes(new, cutter)
                miss = [(o, n) for o, n, h in chunks if h not in base_sets[name]]
                miss_raw = sum(n for _, n in miss)
                cost = ""
                if name == "fixed-64k":
                    z = sum(len(cctx.compress(new[o : o + n])) for o, n in miss)
                    cost = f"{z / MIB:10.2f}"
                print(
                    f"{kind:10s} {name:10s} {100 - 100 * miss_raw / len(new):7.2f} "
                    f"{miss_raw / MIB:12.2f} {cost:>20s} {new_whole / MIB:18.2f}"
                )


if __name__ == "__main__":
    main()
