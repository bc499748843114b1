"""The release manifest (schema 1): parsing and serialising, no I/O.

Parsing happens only after the signature over the exact bytes was verified;
it is strict (unknown compression, missing or mistyped fields, bad hashes are
all ``manifest_malformed``) but ignores unknown top-level keys, so a newer
publisher can add fields without breaking older agents.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from updater import chunkindex, jsonutil, versions
from updater.errors import VerificationError

SCHEMA = 1
MAX_MANIFEST_BYTES = 64 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A boot file's name on the ESP, under the slot's directory: one plain FAT-safe
# component, never hidden (a leading "." is the writer's temporary name).
_BOOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BOOT_FILES = 8  # a kernel, an initrd or two, a UKI, a device tree: a handful
MAX_BOOT_FILE_BYTES = 512 * 1024 * 1024  # each; a UKI of a big initrd fits, an ESP rarely more
# The names `updatectl release` gives them (--kernel, --initrd, --uki)
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
UKI_NAME = "uki.efi"


class Compression(enum.StrEnum):
    ZSTD = "zstd"
    XZ = "xz"
    GZIP = "gzip"
    NONE = "none"

    @property
    def suffix(self) -> str:
        return {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}[self.value]


@dataclass(frozen=True)
class IndexRef:
    """The image's chunk index (:mod:`updater.chunkindex`), for delta updates: signed here
    so that it is as trusted as the image. Optional key ``image.index``; older agents
    ignore it and download the whole image, which stays one valid zstd stream."""

    url: str  # relative to the manifest's URL, or absolute
    size: int  # bytes; exactly chunkindex.index_size(count)
    sha256: str
    block_size: int  # bytes of raw image per block
    count: int  # blocks: ceil(raw_size / block_size)


@dataclass(frozen=True)
class ImageRef:
    url: str  # relative to the manifest's URL, or absolute
    size: int  # bytes as downloaded
    sha256: str  # of the bytes as downloaded
    compression: Compression
    raw_size: int  # bytes after decompression, written to the slot
    raw_sha256: str
    index: IndexRef | None = None  # its chunk index (zstd images only), if published


@dataclass(frozen=True)
class BootFileRef:
    """A file the boot loader reads (kernel, initrd, UKI), written to the ESP as
    ``/<slot label>/<name>`` before the slot may boot."""

    name: str  # matches _BOOT_NAME_RE; unique (case-insensitively: FAT) in the manifest
    url: str  # relative to the manifest's URL, or absolute
    size: int  # bytes, as downloaded and as written (boot files are not compressed)
    sha256: str


@dataclass(frozen=True)
class Manifest:
    channel: str
    version: str
    created: datetime
    expires: datetime
    image: ImageRef
    schema: int = SCHEMA
    boot: tuple[BootFileRef, ...] = ()  # optional key "boot"; older agents ignore it


def valid_channel(channel: str) -> bool:
    return _CHANNEL_RE.fullmatch(channel) is not None


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bad(message: str) -> VerificationError:
    return VerificationError(
        "manifest_malformed", f"manifest: {message}", hint="the publisher must fix the release"
    )


def _field(obj: dict[str, Any], key: str, typ: type, where: str = "") -> Any:
    return jsonutil.field(obj, key, typ, _bad, where)


def _time(obj: dict[str, Any], key: str) -> datetime:
    return jsonutil.utc_time(_field(obj, key, str), key, _bad)


def _size(obj: dict[str, Any], key: str, where: str = "image.") -> int:
    value: int = _field(obj, key, int, where)
    if value <= 0:
        raise _bad(f"field {where}{key} must be positive")
    return value


def _sha(obj: dict[str, Any], key: str, where: str = "image.") -> str:
    value: str = _field(obj, key, str, where)
    if not _SHA256_RE.fullmatch(value):
        raise _bad(f"field {where}{key} is not a lowercase hex SHA-256")
    return value


def _url(obj: dict[str, Any], where: str) -> str:
    url: str = _field(obj, "url", str, where)
    if not url or any(c.isspace() for c in url):
        raise _bad(f"field {where}url is empty or contains white space")
    return url


def valid_boot_name(name: str) -> bool:
    return _BOOT_NAME_RE.fullmatch(name) is not None


def _boot_files(obj: dict[str, Any]) -> tuple[BootFileRef, ...]:
    """The optional ``boot`` list: at most MAX_BOOT_FILES, each bounded, names unique."""
    if "boot" not in obj:
        return ()
    items = _field(obj, "boot", list)
    if len(items) > MAX_BOOT_FILES:
        raise _bad(f"field boot lists {len(items)} files; at most {MAX_BOOT_FILES}")
    refs: list[BootFileRef] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"boot[{i}]."
        if not isinstance(item, dict):
            raise _bad(f"field boot[{i}] must be dict, not {type(item).__name__}")
        name: str = _field(item, "name", str, where)
        if not valid_boot_name(name):
            raise _bad(
                f"field {where}name {name[:64]!r} is not a plain file name "
                "(letters, digits, '.', '_', '-'; not starting with '.')"
            )
        if name.lower() in seen:  # FAT folds case: VMLINUZ is vmlinuz
            raise _bad(f"field {where}name {name!r} is listed twice")
        seen.add(name.lower())
        size = _size(item, "size", where)
        if size > MAX_BOOT_FILE_BYTES:
            raise _bad(f"field {where}size {size} is above the cap of {MAX_BOOT_FILE_BYTES} bytes")
        refs.append(BootFileRef(name, _url(item, where), size, _sha(item, "sha256", where)))
    return tuple(refs)


def _index(image: dict[str, Any], compression: Compression, raw_size: int) -> IndexRef | None:
    """The optional ``image.index``: bounded, and consistent with the image it cuts up."""
    if "index" not in image:
        return None
    where = "image.index."
    obj = _field(image, "index", dict, "image.")
    ref = IndexRef(
        url=_url(obj, where),
        size=_size(obj, "size", where),
        sha256=_sha(obj, "sha256", where),
        block_size=_size(obj, "block_size", where),
        count=_size(obj, "count", where),
    )
    if compression is not Compression.ZSTD:
        raise _bad("a chunk index needs a zstd image (one frame per block)")
    b = ref.block_size
    if b % chunkindex.SUB_BLOCK or not chunkindex.MIN_BLOCK <= b <= chunkindex.MAX_BLOCK:
        raise _bad(f"field {where}block_size {b} is not a supported block size")
    if ref.count != chunkindex.block_count(raw_size, b):
        raise _bad(f"field {where}count {ref.count} does not cover raw_size in blocks of {b}")
    if ref.size != chunkindex.index_size(ref.count) or ref.size > chunkindex.MAX_INDEX_BYTES:
        raise _bad(f"field {where}size {ref.size} is not that of {ref.count} entries (or too big)")
    return ref


def parse(data: bytes, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Parse verified manifest bytes; raises VerificationError(manifest_malformed).

    Bounded: at most ``max_bytes`` and :data:`updater.jsonutil.MAX_DEPTH` levels
    of nesting; ``NaN`` and ``Infinity`` are not JSON.
    """
    obj = jsonutil.loads(data, _bad, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise _bad("top level must be an object")
    schema = _field(obj, "schema", int)
    if schema != SCHEMA:
        raise _bad(f"schema {schema} is not supported (this agent reads schema {SCHEMA})")
    channel = _field(obj, "channel", str)
    if not valid_channel(channel):
        raise _bad(f"invalid channel {channel[:64]!r}")
    version = _field(obj, "version", str)
    if not versions.is_valid(version):
        raise _bad(f"invalid version {version[:64]!r}")
    image = _field(obj, "image", dict)
    url = _url(image, "image.")
    try:
        compression = Compression(_field(image, "compression", str, "image."))
    except ValueError:
        raise _bad(f"unknown compression {image['compression'][:64]!r}") from None
    ref = ImageRef(
        url=url,
        size=_size(image, "size"),
        sha256=_sha(image, "sha256"),
        compression=compression,
        raw_size=_size(image, "raw_size"),
        raw_sha256=_sha(image, "raw_sha256"),
    )
    ref = replace(ref, index=_index(image, compression, ref.raw_size))
    if compression is Compression.NONE and (ref.size, ref.sha256) != (ref.raw_size, ref.raw_sha256):
        raise _bad("an uncompressed image must have size == raw_size and sha256 == raw_sha256")
    return Manifest(
        schema=schema,
        channel=channel,
        version=version,
        created=_time(obj, "created"),
        expires=_time(obj, "expires"),
        image=ref,
        boot=_boot_files(obj),
    )


def serialize(m: Manifest) -> bytes:
    doc: dict[str, Any] = {
        "schema": m.schema,
        "channel": m.channel,
        "version": m.version,
        "created": format_time(m.created),
        "expires": format_time(m.expires),
        "image": {
            "url": m.image.url,
            "size": m.image.size,
            "sha256": m.image.sha256,
            "compression": m.image.compression.value,
            "raw_size": m.image.raw_size,
            "raw_sha256": m.image.raw_sha256,
        },
    }
    if m.image.index is not None:
        i = m.image.index
        doc["image"]["index"] = {
            "url": i.url,
            "size": i.size,
            "sha256": i.sha256,
            "block_size": i.block_size,
            "count": i.count,
        }
    if m.boot:
        doc["boot"] = [
            {"name": b.name, "url": b.url, "size": b.size, "sha256": b.sha256} for b in m.boot
        ]
    return (json.dumps(doc, indent=2) + "\n").encode()
