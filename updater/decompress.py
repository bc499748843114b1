"""Pull-based decompressors whose every read returns a bounded amount.

A decompression bomb is then refused as it arrives: the caller counts raw
bytes chunk by chunk and stops past ``raw_size``, and no single call ever
inflates more than one chunk in memory.
"""

from __future__ import annotations

import lzma
import zlib
from typing import BinaryIO, Protocol, cast

import zstandard

from updater.errors import VerificationError
from updater.manifest import Compression


class Reader(Protocol):
    def read(self, n: int) -> bytes: ...


class _Inflate:
    """gzip (multi-member) and xz (multi-stream) via max_length-bounded decompressors."""

    def __init__(self, source: Reader, compression: Compression, read_size: int) -> None:
        self._source = source
        self._compression = compression
        self._read_size = read_size
        self._dec = self._new()
        self._pending = b""  # input not yet given to the decompressor

    def _new(self) -> zlib._Decompress | lzma.LZMADecompressor:
        if self._compression is Compression.GZIP:
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def _needs_input(self) -> bool:
        if isinstance(self._dec, lzma.LZMADecompressor):
            return self._dec.needs_input and not self._pending
        return not self._pending  # zlib keeps nothing back but unconsumed_tail

    def _step(self, n: int) -> bytes:
        data, self._pending = self._pending, b""
        try:
            if isinstance(self._dec, lzma.LZMADecompressor):
                return self._dec.decompress(data, max_length=n)
            out = self._dec.decompress(data, n)
            self._pending = self._dec.unconsumed_tail
            return out
        except (zlib.error, lzma.LZMAError) as exc:
            raise VerificationError("decompress_failed", f"{self._compression}: {exc}") from None

    def read(self, n: int) -> bytes:
        while True:
            if self._dec.eof:
                # at the end of a member, unused_data holds all input past it
                # (zlib repeats it in unconsumed_tail: do not count it twice)
                rest = self._dec.unused_data
                if not rest:
                    rest = self._source.read(self._read_size)
                if not rest:
                    return b""
                self._dec = self._new()  # the next gzip member or xz stream
                self._pending = rest
            if self._needs_input():
                self._pending = self._source.read(self._read_size)
                if not self._pending:
                    raise VerificationError(
                        "decompress_failed", f"{self._compression}: the stream is truncated"
                    )
            out = self._step(n)
            if out:
                return out


# The decoder allocates the frame's window: cap it so a frame made with
# `zstd --long` or `--ultra -22` cannot take memory past the agent's budget.
# Every level up to 19 (and our publisher's default, 10) stays below it.
ZSTD_MAX_WINDOW = 16 * 1024 * 1024  # bytes


class _Zstd:
    def __init__(self, source: Reader, read_size: int) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._reader = dctx.stream_reader(
            cast(BinaryIO, source), read_size=read_size, read_across_frames=True, closefd=False
        )

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise VerificationError("decompress_failed", f"zstd: {exc}") from None


def decoder(source: Reader, compression: Compression, read_size: int) -> Reader:
    if compression is Compression.NONE:
        return source
    if compression is Compression.ZSTD:
        return _Zstd(source, read_size)
    return _Inflate(source, compression, read_size)
