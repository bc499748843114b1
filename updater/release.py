"""Publisher side: turn a raw image into a signed release in a static repository.

Layout written (DESIGN.md, "Release repository")::

    <repo>/<channel>/release.json       manifest, schema 1
    <repo>/<channel>/release.json.asc   detached armored OpenPGP signature
    <repo>/images/<version>/<name>      the image, maybe compressed
    <repo>/images/<version>/boot/<file> boot files (kernel, initrd, UKI), as they are
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
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

import structlog
import zstandard

from updater import chunkindex, versions
from updater.errors import ConfigError
from updater.fsutil import atomic_write
from updater.gpg import sign_detached
from updater.manifest import (
    INITRD_NAME,
    KERNEL_NAME,
    MAX_BOOT_FILE_BYTES,
    MAX_BOOT_FILES,
    UKI_NAME,
    BootFileRef,
    Compression,
    ImageRef,
    IndexRef,
    Manifest,
    serialize,
    valid_boot_name,
    valid_channel,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = structlog.get_logger(__name__)

CHUNK = 1024 * 1024
FRAME_BATCH = 128  # blocks compressed at once, on all cores (8 MiB of 64 KiB blocks)
DEFAULT_EXPIRY = timedelta(days=30)


@dataclass(frozen=True)
class ReleaseRequest:
    image: Path
    version: str
    repo: Path
    gnupghome: Path
    key_id: str | tuple[str, ...]  # one key, or one signature per key (a threshold)
    channel: str = "stable"
    compression: Compression = Compression.ZSTD
    expires_in: timedelta = DEFAULT_EXPIRY
    passphrase: str | None = None
    zstd_level: int = 10
    boot_files: tuple[tuple[str, Path], ...] = ()  # (name on the ESP, file), see boot_files()
    # zstd only: write the image as one frame per block and publish its chunk index
    # beside it (<name>.chunks), named in the manifest, for delta updates
    delta_index: bool = True


def boot_files(
    kernel: Path | None = None, initrd: Path | None = None, uki: Path | None = None
) -> tuple[tuple[str, Path], ...]:
    """`--kernel`/`--initrd` or `--uki` as named boot files (vmlinuz, initrd.img, uki.efi)."""
    if uki is not None and (kernel is not None or initrd is not None):
        raise ConfigError(
            "invalid",
            "a unified kernel image carries its own initrd: give --uki, or --kernel and --initrd",
            key="--uki",
        )
    if initrd is not None and kernel is None:
        raise ConfigError("invalid", "an initrd needs a kernel", key="--initrd")
    named = ((KERNEL_NAME, kernel), (INITRD_NAME, initrd), (UKI_NAME, uki))
    return tuple((name, path) for name, path in named if path is not None)


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    manifest_path: Path
    signature_path: Path
    image_path: Path
    index_path: Path | None = None
    index_seconds: float = 0.0  # what building the chunk index and its frames took


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


def _compress_framed(
    src: Path, dst: BinaryIO, level: int
) -> tuple[int, str, int, str, chunkindex.ChunkIndex]:
    """``src`` as one zstd frame per block (:mod:`updater.chunkindex`) into ``dst``: still
    one valid zstd stream. Raw size/sha256, output size/sha256 and the index."""
    out = _HashingWriter(dst)
    raw_hash = hashlib.sha256()
    writer = chunkindex.FrameWriter(out.write, level)
    with src.open("rb") as fh:
        for blocks in chunkindex.read_blocks(fh.read, writer.block_size, FRAME_BATCH):
            for b in blocks:
                raw_hash.update(b)
            writer.write(blocks)
    return writer.raw_size, raw_hash.hexdigest(), out.size, out.hash.hexdigest(), writer.index()


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
    _check_boot_files(req.boot_files)

    name = req.image.name + req.compression.suffix
    image_dir = req.repo / "images" / req.version
    image_dir.mkdir(parents=True, exist_ok=True)
    image_path = image_dir / name
    framed = req.delta_index and req.compression is Compression.ZSTD
    started = time.monotonic()
    index: chunkindex.ChunkIndex | None = None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=image_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            if framed:
                raw_size, raw_sha, size, sha, index = _compress_framed(
                    req.image, fh, req.zstd_level
                )
            else:
                raw_size, raw_sha, size, sha = _compress(
                    req.image, fh, req.compression, req.zstd_level
                )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, image_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    index_ref: IndexRef | None = None
    index_path: Path | None = None
    if index is not None:
        body = chunkindex.serialize(index)
        index_path = image_dir / f"{name}.chunks"
        atomic_write(index_path, body, mode=0o644)
        index_ref = IndexRef(
            url=f"../images/{req.version}/{index_path.name}",
            size=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            block_size=index.block_size,
            count=len(index.entries),
        )
    index_seconds = time.monotonic() - started if framed else 0.0

    boot = tuple(_publish_boot_file(image_dir, name, path) for name, path in req.boot_files)
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
            index=index_ref,
        ),
        boot=tuple(replace(b, url=f"../images/{req.version}/{b.url}") for b in boot),
    )
    channel_dir = req.repo / req.channel
    channel_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = channel_dir / "release.json"
    signature_path = channel_dir / "release.json.asc"
    # Beside the image, for an Omaha server whose codebase is images/<version>/:
    # the same manifest with the image URL relative to it.
    beside_index = None if index_ref is None else replace(index_ref, url=f"{name}.chunks")
    beside = replace(
        manifest, image=replace(manifest.image, url=name, index=beside_index), boot=boot
    )
    _link_keys(image_dir)
    _write_signed(req, image_dir / f"{name}.json", serialize(beside))
    _write_signed(req, manifest_path, serialize(manifest))
    log.info(
        "release_published",
        version=req.version,
        channel=req.channel,
        compression=req.compression.value,
        raw_size=raw_size,
        size=size,
        boot_files=[b.name for b in boot],
        chunk_index=index_ref is not None,
        seconds=round(time.monotonic() - started, 3),
    )
    return Published(manifest, manifest_path, signature_path, image_path, index_path, index_seconds)


def _link_keys(image_dir: Path) -> None:
    """``images/<version>/keys`` -> ``../../keys``: an Omaha server's codebase is the image
    directory, and agents look for the trust roots beside the package."""
    link = image_dir / "keys"
    if not link.is_symlink() and not link.exists():
        link.symlink_to(Path("..", "..", "keys"), target_is_directory=True)


def _check_boot_files(files: tuple[tuple[str, Path], ...]) -> None:
    """What the agent's manifest parser would refuse, refused before anything is written."""
    if len(files) > MAX_BOOT_FILES:
        raise ConfigError("invalid", f"{len(files)} boot files; at most {MAX_BOOT_FILES}")
    seen: set[str] = set()
    for name, path in files:
        if not valid_boot_name(name) or name.lower() in seen:
            raise ConfigError("invalid", f"boot file name {name!r} is not plain or is repeated")
        seen.add(name.lower())
        if not path.is_file():
            raise ConfigError("missing", f"no boot file at {path}", key=f"boot file {name}")
        size = path.stat().st_size
        if not 0 < size <= MAX_BOOT_FILE_BYTES:
            raise ConfigError(
                "invalid",
                f"{path}: {size} bytes; a boot file has 1 to {MAX_BOOT_FILE_BYTES}",
                key=f"boot file {name}",
            )


def _publish_boot_file(image_dir: Path, name: str, src: Path) -> BootFileRef:
    """Copy ``src`` to ``<image_dir>/boot/<name>`` (temporary name, fsync, rename)."""
    boot_dir = image_dir / "boot"
    boot_dir.mkdir(exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=boot_dir)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, boot_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BootFileRef(name=name, url=f"boot/{name}", size=size, sha256=digest.hexdigest())
