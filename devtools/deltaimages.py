"""Pairs of ext4 images that differ the way OS releases do (delta benchmarks, tests).

:func:`build_tree` writes a deterministic tree of files (half compressible
text-like data, half random, sizes from 4 KiB to 1 MiB) filling about 80 % of
the image; :func:`variant` changes a copy of it, and :func:`make_image` turns
a tree into an ext4 image with ``mkfs.ext4 -b 4096 -d`` (4 KiB blocks as a
real /usr has: mke2fs would pick 1 KiB for a small image; no mount, no root).
The kinds of change:

- ``one_pct``: 1 % of the data bytes rewritten in place, in 100 places spread
  over the files (sizes unchanged);
- ``ten_pct``: 10 % of the bytes: whole files rewritten (sizes unchanged);
- ``appended``: a new file of 2 % of the data added;
- ``grown``: 10 files each grow by 1 % of themselves in their middle, so
  that the files ``mkfs.ext4 -d`` lays out after them move (what a package
  update whose files change size does to a rebuilt image);
- ``fresh``: every file rewritten (nothing in common but the metadata layout).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from updater.run import run

KINDS = ("one_pct", "ten_pct", "appended", "grown", "fresh")
_WORDS = [f"w{i:x}" for i in range(4096)] + ["usr", "lib", "share", "the", "of", "and"]


def _content(rng: random.Random, size: int, compressible: bool) -> bytes:
    if not compressible:
        return rng.randbytes(size)
    out: list[str] = []
    n = 0
    while n < size:
        word = rng.choice(_WORDS)
        out.append(word)
        n += len(word) + 1
    return " ".join(out).encode()[:size]


def build_tree(root: Path, data_bytes: int, seed: int = 1) -> list[Path]:
    """Files totalling about ``data_bytes`` under ``root``; the list, in creation order."""
    rng = random.Random(seed)
    files: list[Path] = []
    total = 0
    i = 0
    while total < data_bytes:
        size = min(int(4096 * 2 ** rng.uniform(0, 8)), data_bytes - total)
        size = max(size, 1)
        path = root / f"d{i % 16:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(rng, size, compressible=i % 2 == 0))
        files.append(path)
        total += size
        i += 1
    return files


def variant(src: Path, dst: Path, kind: str, seed: int = 2) -> None:
    """Copy the tree ``src`` to ``dst`` and change it as ``kind`` says (see the module)."""
    if kind not in KINDS:
        raise ValueError(f"unknown change kind {kind!r}")
    shutil.copytree(src, dst)
    rng = random.Random(seed)
    files = sorted(p for p in dst.rglob("*.bin"))
    sizes = {p: p.stat().st_size for p in files}
    total = sum(sizes.values())
    if kind == "one_pct":
        each = total // 100 // 100
        # (at 1 GiB a place is ~86 KiB: only files larger than that can take one)
        big = [p for p in files if sizes[p] >= 64 * 1024 and sizes[p] > each]
        for p in rng.sample(big, min(100, len(big))):
            with p.open("r+b") as fh:
                at = rng.randrange(0, sizes[p] - each)
                fh.seek(at)
                fh.write(rng.randbytes(each))
    elif kind == "ten_pct":
        changed = 0
        for p in rng.sample(files, len(files)):
            if changed >= total // 10:
                break
            p.write_bytes(_content(rng, sizes[p], compressible=rng.random() < 0.5))
            changed += sizes[p]
    elif kind == "appended":
        (dst / "zz-appended.bin").write_bytes(rng.randbytes(total // 50))
    elif kind == "grown":
        big = [p for p in files if sizes[p] >= 64 * 1024]
        for p in rng.sample(big, min(10, len(big))):
            data = p.read_bytes()
            mid = len(data) // 2
            p.write_bytes(data[:mid] + rng.randbytes(len(data) // 100) + data[mid:])
    else:
        for p in files:
            p.write_bytes(_content(rng, sizes[p], compressible=rng.random() < 0.5))


def make_image(tree: Path, path: Path, size: int) -> Path:
    """An ext4 image of ``size`` bytes holding ``tree`` (``mkfs.ext4 -d``, fixed UUID/time)."""
    path.unlink(missing_ok=True)
    with path.open("wb") as fh:
        fh.truncate(size)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "usr",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0,hash_seed=00000000-0000-0000-0000-000000000001",
            "-U",
            "clear",
            "-d",
            str(tree),
            str(path),
        ],
        env={"E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return path


PREVIOUS = "previous"  # a kind make_pair_set builds: the release before the base


def make_pair_set(work: Path, size: int, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """``{"base": image, kind: image, ...}`` under ``work``: images of ``size`` bytes
    (``previous``: the base's own predecessor, 1 % of it different)."""
    base_tree = work / "tree-base"
    build_tree(base_tree, int(size * 0.8))
    images = {"base": make_image(base_tree, work / "base.img", size)}
    for kind in kinds:
        tree = work / f"tree-{kind}"
        if kind == PREVIOUS:  # as if the base were a 1 % update of it
            variant(base_tree, tree, "one_pct", seed=7)
        else:
            variant(base_tree, tree, kind)
        images[kind] = make_image(tree, work / f"{kind}.img", size)
        shutil.rmtree(tree)
    shutil.rmtree(base_tree)
    return images
