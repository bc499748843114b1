"""The streaming install pipeline on its own: every compression, the checks,
progress, the slot bounds; and a full cycle onto a real loop block device."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from devtools.diskimage import cgpt_flags, loop_device
from devtools.host import Host, write_config
from tests.conftest import Repo, updatectl
from updater import compose, config
from updater.errors import DiskError, UpdaterError, VerificationError
from updater.hostlock import is_held
from updater.install import Progress, write_image
from updater.manifest import Compression, ImageRef
from updater.slotio import SlotDevice

RAW = os.urandom(700_000) + bytes(2_000_000) + os.urandom(300_001)
CHUNK = 64 * 1024


def compress(data: bytes, how: Compression) -> bytes:
    """Multi-member / multi-frame where the format allows, as real tools may produce."""
    half = len(data) // 2
    if how is Compression.ZSTD:
        c = zstandard.ZstdCompressor()
        return c.compress(data[:half]) + c.compress(data[half:])
    if how is Compression.XZ:
        return lzma.compress(data[:half]) + lzma.compress(data[half:])
    if how is Compression.GZIP:
        return gzip.compress(data[:half]) + gzip.compress(data[half:])
    return data


def ref(blob: bytes, how: Compression, raw: bytes = RAW, **over: object) -> ImageRef:
    fields: dict[str, object] = {
        "url": "x",
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "compression": how,
        "raw_size": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
    }
    fields.update(over)
    return ImageRef(**fields)  # type: ignore[arg-type]


def chunks(blob: bytes, n: int = 100_003) -> Iterator[bytes]:
    for i in range(0, len(blob), n):
        yield blob[i : i + n]


@pytest.fixture
def slot_file(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\xee" * (1 << 20) + bytes(4 << 20) + b"\xee" * (1 << 20))
    return p


def device(path: Path) -> SlotDevice:
    return SlotDevice(path, 1 << 20, 4 << 20)


@pytest.mark.parametrize("how", list(Compression))
@pytest.mark.parametrize("readback", [True, False])
def test_every_compression(slot_file: Path, how: Compression, readback: bool) -> None:
    blob = compress(RAW, how)
    seen: list[Progress] = []
    with device(slot_file) as dev:
        result = write_image(
            chunks(blob),
            ref(blob, how),
            dev,
            chunk_size=CHUNK,
            readback=readback,
            progress=seen.append,
        )
    data = slot_file.read_bytes()
    assert data[1 << 20 : (1 << 20) + len(RAW)] == RAW
    assert data[: 1 << 20] == b"\xee" * (1 << 20)  # nothing outside the slot
    assert data[-(1 << 20) :] == b"\xee" * (1 << 20)
    assert result.raw_size == len(RAW) and result.raw_sha256 == hashlib.sha256(RAW).hexdigest()
    downloads = [p for p in seen if p.phase == "download"]
    assert downloads[-1] == Progress("download", len(blob), len(blob))
    assert [p.done for p in downloads] == sorted(p.done for p in downloads)
    assert any(p.phase == "readback" for p in seen) is readback


@pytest.mark.parametrize(
    ("how", "over", "kind"),
    [
        (Compression.NONE, {"sha256": "0" * 64, "raw_sha256": "0" * 64}, "hash_mismatch"),
        (Compression.ZSTD, {"raw_sha256": "0" * 64}, "hash_mismatch"),
        (Compression.ZSTD, {"sha256": "0" * 64}, "hash_mismatch"),
        (Compression.ZSTD, {"raw_size": len(RAW) + 1}, "size_mismatch"),
        (Compression.ZSTD, {"raw_size": len(RAW) - 1}, "size_mismatch"),  # inflates past it
        (Compression.GZIP, {"compression": Compression.XZ}, "decompress_failed"),
    ],
)
def test_mismatches(slot_file: Path, how: Compression, over: dict[str, Any], kind: str) -> None:
    blob = compress(RAW, how)
    with device(slot_file) as dev, pytest.raises(VerificationError) as err:
        write_image(chunks(blob), ref(blob, how, **over), dev, chunk_size=CHUNK)
    assert err.value.kind == kind


def test_short_download(slot_file: Path) -> None:
    blob = compress(RAW, Compression.NONE)
    with device(slot_file) as dev, pytest.raises(VerificationError) as err:
        write_image(chunks(blob[:-5]), ref(blob, Compression.NONE), dev, chunk_size=CHUNK)
    assert err.value.kind == "size_mismatch"


def test_truncated_compressed_stream(slot_file: Path) -> None:
    blob = compress(RAW, Compression.XZ)
    with device(slot_file) as dev, pytest.raises(VerificationError) as err:
        write_image(chunks(blob[:-100]), ref(blob, Compression.XZ), dev, chunk_size=CHUNK)
    assert err.value.kind in ("decompress_failed", "size_mismatch")


def test_an_error_in_the_download_stops_everything(slot_file: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield RAW[:100_000]
        raise VerificationError("hash_mismatch", "boom")

    with device(slot_file) as dev, pytest.raises(VerificationError, match="boom"):
        write_image(failing(), ref(RAW, Compression.NONE), dev, chunk_size=CHUNK)


class CorruptingDevice(SlotDevice):
    """A disk that silently flips a bit in what it stores (bit rot, a bad cable)."""

    def write(self, data: bytes | memoryview) -> None:
        if self.written == 0:
            buf = bytearray(data)
            buf[10] ^= 1
            data = bytes(buf)
        super().write(data)


def test_readback_catches_a_lying_disk(slot_file: Path) -> None:
    blob = compress(RAW, Compression.ZSTD)
    with CorruptingDevice(slot_file, 1 << 20, 4 << 20) as dev:
        with pytest.raises(DiskError) as err:
            write_image(chunks(blob), ref(blob, Compression.ZSTD), dev, chunk_size=CHUNK)
        assert err.value.kind == "readback_mismatch"
    with CorruptingDevice(slot_file, 1 << 20, 4 << 20) as dev:  # read-back off: not noticed
        write_image(
            chunks(blob), ref(blob, Compression.ZSTD), dev, chunk_size=CHUNK, readback=False
        )


def test_slot_bounds(slot_file: Path) -> None:
    with pytest.raises(DiskError):
        SlotDevice(slot_file, 3 << 20, 4 << 20)  # runs past the end of the disk
    with device(slot_file) as dev:
        dev.write(bytes(4 << 20))
        with pytest.raises(DiskError):
            dev.write(b"x")
    assert slot_file.read_bytes()[-(1 << 20) :] == b"\xee" * (1 << 20)


def test_image_larger_than_the_slot_never_spills(slot_file: Path) -> None:
    raw = os.urandom((4 << 20) + 4096)
    with device(slot_file) as dev, pytest.raises((DiskError, VerificationError)):
        write_image(chunks(raw), ref(raw, Compression.NONE, raw=raw), dev, chunk_size=CHUNK)
    assert slot_file.read_bytes()[-(1 << 20) :] == b"\xee" * (1 << 20)


@pytest.mark.root
def test_full_cycle_on_a_loop_block_device(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    """The disk is a real block device: GPT, slot writes and fsync go through /dev/loopN."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    with loop_device(host.disk) as dev:
        write_config(host, repo_url=repo.url, keyring=repo.key.public_key)
        host.config.write_text(
            host.config.read_text().replace(f'device = "{host.disk}"', f'device = "{dev}"')
        )
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, r.err
        s = updatectl(host, "status", "--json").json()
        assert (s["state"], s["primary"]) == ("update_staged", "USR-B")
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert host.reboot() == "USR-B"


@pytest.mark.parametrize("where", ["download", "write"])
def test_an_exception_not_ours_ends_the_install_like_a_typed_error(
    host: Host, repo: Repo, usr_images: dict[str, Path], where: str
) -> None:
    """A bug or a library breaking its contract mid-install: the typed `internal` error,
    nothing left pending, the target unbootable, the update lock released."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    up = compose.updater(config.load(host.config))
    check = up.check()
    assert check.update_available
    crash = RuntimeError("boom")

    def raise_crash(*_args: object, **_kw: object) -> Any:
        raise crash

    if where == "download":
        up.transport.open_stream = raise_crash  # type: ignore[method-assign]
    else:
        up.slots.open_slot = raise_crash
    with pytest.raises(UpdaterError) as caught:
        up.install(check)
    assert (caught.value.kind, caught.value.__cause__) == ("internal", crash)
    assert "RuntimeError: boom" in caught.value.message
    assert up.store.load().pending is None
    assert updatectl(host, "status", "--json").json()["state"] == "idle"
    assert not cgpt_flags(host.disk, 2).bootable
    assert not is_held(host.state_dir)
