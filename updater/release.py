"""Publisher side: turn a raw image into a signed release in a static repository.

Layout written (DESIGN.md, "Release repository")::

    <repo>/<channel>/release.json       manifest, schema 1
    <repo>/<channel>/release.json.asc   detached armored OpenPGP signature
    <repo>/images/<version>/<name>      the image, maybe compressed
    <repo>/images/<version>/<name>.json the same manifest, image URL relative to it,
    <repo>/images/<version>/<name>.json.asc   and its signature (for an Omaha
                                        server whose package codebase is that directory)

Every file is written to a temporary name first and renamed into place, the
image before the manifest that names it. A client that polls in the instant
between the signature's rename and the manifest's sees a mismatched pair:
verification fails closed for that one poll and the next one succeeds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

import structlog
import zstandard

from updater import versions
from updater.errors import ConfigError
from updater.fsutil import atomic_write
from updater.gpg import sign_detached
from updater.manifest import Compression, ImageRef, Manifest, serialize, valid_channel

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = structlog.get_logger(__name__)

CHUNK = 1024 * 1024
DEFAULT_EXPIRY = timedelta(days=30)


@dataclass(frozen=True)
class ReleaseRequest:
    image: Path
    version: str
    repo: Path
    gnupghome: Path
    key_id: str
    channel: str = "stable"
    compression: Compression = Compression.ZSTD
    expires_in: timedelta = DEFAULT_EXPIRY
    passphrase: str | None = None
    zstd_level: int = 10


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    manifest_path: Path
    signature_path: Path
    image_path: Path


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what the compressor writes, passing it on to the file."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fh = fh
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        self.fh.write(view)
        return len(view)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


def _compressor(out: _HashingWriter, compression: Compression, level: int) -> _Sink:
    sink = cast(BinaryIO, out)
    if compression is Compression.ZSTD:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
        return cctx.stream_writer(sink, closefd=False)
    if compression is Compression.XZ:
        return lzma.LZMAFile(sink, "wb", preset=6)
    if compression is Compression.GZIP:
        return gzip.GzipFile(fileobj=sink, mode="wb", mtime=0)
    return out


def _compress(
    src: Path, dst: BinaryIO, compression: Compression, level: int
) -> tuple[int, str, int, str]:
    """Write ``src`` compressed to ``dst``; return raw size/sha256 and output size/sha256."""
    out = _HashingWriter(dst)
    raw_hash = hashlib.sha256()
    raw_size = 0
    writer = _compressor(out, compression, level)
    with src.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            raw_hash.update(chunk)
            raw_size += len(chunk)
            writer.write(chunk)
    writer.close()  # flushes the compressor's tail; closing ``out`` closes nothing real
    return raw_size, raw_hash.hexdigest(), out.size, out.hash.hexdigest()


def _write_signed(req: ReleaseRequest, path: Path, body: bytes) -> None:
    """``path`` and ``path.asc``, the signature renamed into place first."""
    staging = Path(tempfile.mkdtemp(prefix=".release-", dir=path.parent))
    try:
        (staging / "doc").write_bytes(body)
        sign_detached(
            staging / "doc",
            staging / "doc.asc",
            gnupghome=req.gnupghome,
            key_id=req.key_id,
            passphrase=req.passphrase,
        )
        atomic_write(path.with_name(path.name + ".asc"), (staging / "doc.asc").read_bytes())
        atomic_write(path, body)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(req: ReleaseRequest, now: datetime) -> Published:
    if not versions.is_valid(req.version):
        raise ConfigError(
            "invalid",
            f"invalid version {req.version!r}",
            key="--version",
            hint="use the UAPI version format, e.g. 1.2.0 or 1.2.0~rc1",
        )
    if not valid_channel(req.channel):
        raise ConfigError("invalid", f"invalid channel {req.channel!r}", key="--channel")
    if not req.image.is_file():
        raise ConfigError("missing", f"no image file at {req.image}", key="--image")
    if req.expires_in <= timedelta(0):
        raise ConfigError("invalid", "the expiry must lie in the future", key="--expires")

    name = req.image.name + req.compression.suffix
    image_dir = req.repo / "images" / req.version
    image_dir.mkdir(parents=True, exist_ok=True)
    image_path = image_dir / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=image_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            raw_size, raw_sha, size, sha = _compress(req.image, fh, req.compression, req.zstd_level)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, image_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    manifest = Manifest(
        channel=req.channel,
        version=req.version,
        created=now,
        expires=now + req.expires_in,
        image=ImageRef(
            url=f"../images/{req.version}/{name}",
            size=size,
            sha256=sha,
            compression=req.compression,
            raw_size=raw_size,
            raw_sha256=raw_sha,
        ),
    )
    channel_dir = req.repo / req.channel
    channel_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = channel_dir / "release.json"
    signature_path = channel_dir / "release.json.asc"
    # Beside the image, for an Omaha server whose codebase is images/<version>/:
    # the same manifest with the image URL relative to it.
    beside = replace(manifest, image=replace(manifest.image, url=name))
    _write_signed(req, image_dir / f"{name}.json", serialize(beside))
    _write_signed(req, manifest_path, serialize(manifest))
    log.info(
        "release_published",
        version=req.version,
        channel=req.channel,
        compression=req.compression.value,
        raw_size=raw_size,
        size=size,
    )
    return Published(manifest, manifest_path, signature_path, image_path)
