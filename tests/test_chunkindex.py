"""The chunk index (delta updates): what `updatectl release` publishes, and the
bounded parser that refuses an index that lies about itself or the image."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from devtools.gpgkeys import SigningKey
from updater import chunkindex
from updater.chunkindex import ENTRY, HEADER, ChunkIndex, Entry
from updater.decompress import decoder
from updater.errors import VerificationError
from updater.manifest import Compression, parse, serialize
from updater.release import ReleaseRequest, publish

BLOCK = chunkindex.BLOCK_SIZE


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, release_key: SigningKey
) -> tuple[Path, Path]:
    """A release of a 20.5-block image (text, random, zeros): its raw image and manifest."""
    tmp = tmp_path_factory.mktemp("chunks")
    raw = tmp / "usr.img"
    body = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(20_000))
    raw.write_bytes(body + bytes(20 * BLOCK + BLOCK // 2 - len(body)))
    req = ReleaseRequest(
        image=raw,
        version="3.0.0",
        repo=tmp / "repo",
        gnupghome=release_key.gnupghome,
        key_id=release_key.fingerprint,
    )
    out = publish(req, datetime.now(UTC))
    return raw, out.manifest_path


def _load(published: tuple[Path, Path]) -> tuple[bytes, bytes, bytes, object]:
    raw, manifest_path = published
    m = parse(manifest_path.read_bytes())
    assert m.image.index is not None
    base = manifest_path.parent.parent / "images" / "3.0.0"
    return (
        raw.read_bytes(),
        (base / "usr.img.zst").read_bytes(),
        (base / "usr.img.zst.chunks").read_bytes(),
        m,
    )


def _parse(data: bytes, m: object, **over: object) -> ChunkIndex:
    ref = m.image.index  # type: ignore[attr-defined]
    args: dict[str, object] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "block_size": ref.block_size,
        "count": ref.count,
        "raw_size": m.image.raw_size,  # type: ignore[attr-defined]
        "image_size": m.image.size,  # type: ignore[attr-defined]
    }
    args.update(over)
    return chunkindex.parse(data, **args)  # type: ignore[arg-type]


def test_release_writes_frames_and_index_the_agent_can_use(
    published: tuple[Path, Path],
) -> None:
    raw, image, body, m = _load(published)
    ref = m.image.index  # type: ignore[attr-defined]
    assert (ref.block_size, ref.count) == (BLOCK, 21)
    assert ref.url == "../images/3.0.0/usr.img.zst.chunks"
    assert (ref.size, ref.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    index = _parse(body, m, size=ref.size, sha256=ref.sha256)
    # the whole file is still one zstd stream for the full download
    assert decoder(io.BytesIO(image), Compression.ZSTD, 1 << 20).read(1 << 30) == raw
    # ... and every frame is its block, with the block's digest
    dctx = zstandard.ZstdDecompressor()
    for i, e in enumerate(index.entries):
        start, n = index.block(i)
        block = dctx.decompress(image[e.offset : e.offset + e.length])
        assert block == raw[start : start + n]
        assert e.digest == chunkindex.block_digest(block)
    assert index.block(20) == (20 * BLOCK, BLOCK // 2)
    # the copy beside the image (Omaha) names it relative to itself
    beside = parse((published[1].parent.parent / "images/3.0.0/usr.img.zst.json").read_bytes())
    assert beside.image.index == replace(ref, url="usr.img.zst.chunks")


def test_digest_is_the_hash_of_sub_block_hashes() -> None:
    data = bytes(range(256)) * 256 + b"tail"
    subs = [hashlib.sha256(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
    assert chunkindex.block_digest(data) == hashlib.sha256(b"".join(subs)).digest()


def _entries(body: bytes) -> list[list[object]]:
    return [list(e) for e in ENTRY.iter_unpack(body[HEADER.size :])]


def _rebuild(body: bytes, entries: list[list[object]]) -> bytes:
    return body[: HEADER.size] + b"".join(ENTRY.pack(*e) for e in entries)


def test_hostile_indexes_are_refused(published: tuple[Path, Path]) -> None:
    _, _, body, m = _load(published)
    entries = _entries(body)

    def refused(data: bytes, kind: str, **over: object) -> str:
        with pytest.raises(VerificationError) as e:
            _parse(data, m, **over)
        assert e.value.kind == kind
        return e.value.message

    # overlapping: frame 3 starts inside frame 2
    bad = [e.copy() for e in entries]
    bad[3][1] = int(bad[3][1]) - 10  # type: ignore[call-overload]
    bad[3][2] = int(bad[3][2]) + 10  # type: ignore[call-overload]
    assert "overlaps" in refused(_rebuild(body, bad), "index_malformed")
    # a gap, then frames past the end of the image
    bad = [e.copy() for e in entries]
    bad[5][1] = int(bad[5][1]) + 1  # type: ignore[call-overload]
    assert "gap" in refused(_rebuild(body, bad), "index_malformed")
    bad = [e.copy() for e in entries]
    bad[-1][2] = int(bad[-1][2]) + 1  # type: ignore[call-overload]
    assert "past the image" in refused(_rebuild(body, bad), "index_malformed")
    # a frame bigger than any block's could be
    bad = [e.copy() for e in entries]
    bad[0][2] = BLOCK * 4
    assert "at most" in refused(_rebuild(body, bad), "index_malformed")
    # the header contradicts the manifest (count, block size, raw size), bad magic
    assert "header" in refused(body, "index_malformed", count=22)
    forged = HEADER.pack(b"NOTCHNK1", BLOCK, 4096, 21, m.image.raw_size) + body[HEADER.size :]  # type: ignore[attr-defined]
    assert "magic" in refused(forged, "index_malformed")
    # not the signed bytes: a different hash or size, or above the cap
    assert "sha256" in refused(body, "hash_mismatch", sha256="0" * 64)
    refused(body + b"x", "size_mismatch", size=len(body))
    refused(bytes(chunkindex.MAX_INDEX_BYTES + 1), "size_mismatch")


def test_manifest_bounds_the_index(published: tuple[Path, Path]) -> None:
    doc = json.loads(published[1].read_bytes())

    def refused(**change: object) -> str:
        d = json.loads(json.dumps(doc))
        d["image"]["index"].update(change)
        with pytest.raises(VerificationError) as e:
            parse(json.dumps(d).encode())
        assert e.value.kind == "manifest_malformed"
        return e.value.message

    assert "count" in refused(count=20)
    assert "size" in refused(size=chunkindex.index_size(21) + 1)
    assert "block_size" in refused(block_size=1000)
    d = json.loads(json.dumps(doc))
    d["image"]["compression"] = "xz"
    with pytest.raises(VerificationError, match="zstd"):
        parse(json.dumps(d).encode())
    # it round-trips
    m = parse(published[1].read_bytes())
    assert parse(serialize(m)) == m


def test_index_round_trips() -> None:
    idx = ChunkIndex(BLOCK, 4096, BLOCK + 1, (Entry(b"a" * 32, 0, 100), Entry(b"b" * 32, 100, 9)))
    data = chunkindex.serialize(idx)
    got = chunkindex.parse(
        data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        block_size=BLOCK,
        count=2,
        raw_size=BLOCK + 1,
        image_size=109,
    )
    assert got == idx
