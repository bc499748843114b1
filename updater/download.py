"""A download of known size that resumes with Range after a dropped connection.

The size comes from the signed manifest and is a hard cap: a server that
announces or sends more is refused as soon as it does (endless-data attack).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import structlog

from updater.errors import DownloadError
from updater.transport import ByteStream, IntoStream, Transport

log = structlog.get_logger(__name__)

RESUMABLE = frozenset({"connection", "timeout"})

_Piece = TypeVar("_Piece")


class Download(Iterator[bytes]):
    """The ``size`` bytes at ``url`` in order, resuming where a transfer broke.

    Iterate it for chunks of at most ``chunk_size`` bytes, or call
    :meth:`readinto` to have the bytes land in a buffer of your own (no new
    bytes object per read, which is what the installer does). Nothing is
    opened before the first read. The checks are the same either way.
    """

    def __init__(
        self,
        transport: Transport,
        url: str,
        *,
        size: int,
        chunk_size: int = 1024 * 1024,
        resume_attempts: int = 5,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.transport = transport
        self.url = url
        self.size = size
        self.chunk_size = chunk_size
        self.resume_attempts = resume_attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self.got = 0  # bytes handed out
        self._resumes = 0
        self._validator: str | None = None
        self._stream: ByteStream | None = None
        self._skip = 0  # bytes the current response repeats (a Range the server ignored)
        self._finished = False

    def __iter__(self) -> Download:
        return self

    def __next__(self) -> bytes:
        chunk = self._pull(self._read_chunk, len, _drop_front)
        if chunk is None:
            raise StopIteration
        return chunk

    def _read_chunk(self, s: ByteStream) -> bytes:
        return s.read(self.chunk_size)

    def readinto(self, buf: memoryview) -> int:
        """Put the next bytes at the start of ``buf``; their count, 0 at the end."""

        def fill(s: ByteStream) -> int:
            if isinstance(s, IntoStream):
                return s.readinto(buf)
            data = s.read(len(buf))
            buf[: len(data)] = data
            return len(data)

        def drop(n: int, k: int) -> int:
            buf[: n - k] = bytes(buf[k:n])  # rare: only after a server ignored our Range
            return n - k

        n = self._pull(fill, int, drop)
        return 0 if n is None else n

    def close(self) -> None:
        self._finished = True
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _open(self) -> ByteStream:
        s = self.transport.open_stream(self.url, start=self.got, if_range=self._validator)
        self._stream = s
        if self._validator is None:
            self._validator = s.validator
        if s.length is not None and s.start + s.length > self.size:
            raise DownloadError(
                "too_much_data",
                f"{self.url}: the server announces {s.start + s.length} bytes, "
                f"the manifest {self.size}",
            )
        self._skip = self.got - s.start  # the server ignored our Range: drop what we have
        return s

    def _pull(
        self,
        read: Callable[[ByteStream], _Piece],
        size_of: Callable[[_Piece], int],
        drop: Callable[[_Piece, int], _Piece],
    ) -> _Piece | None:
        """The next piece ``read`` gets, past any repeated bytes; None at the end."""
        while not self._finished:
            try:
                try:
                    s = self._stream if self._stream is not None else self._open()
                    piece = read(s)
                    n = size_of(piece)
                    if not n:
                        self._close_stream()
                        if self.got == self.size:
                            self._finished = True
                            return None
                        raise DownloadError(
                            "connection",
                            f"{self.url}: the transfer ended at byte {self.got} of {self.size}",
                        )
                    if self._skip:
                        if n <= self._skip:
                            self._skip -= n
                            continue
                        piece, n = drop(piece, self._skip), n - self._skip
                        self._skip = 0
                    if self.got + n > self.size:
                        raise DownloadError(
                            "too_much_data",
                            f"{self.url}: the server sends more than {self.size} bytes",
                        )
                    self.got += n
                    return piece
                except BaseException:
                    self._close_stream()
                    raise
            except DownloadError as exc:
                if exc.kind not in RESUMABLE or self._resumes >= self.resume_attempts:
                    self._finished = True
                    raise
                self._resumes += 1
                log.warning(
                    "download_resume",
                    url=self.url,
                    offset=self.got,
                    attempt=self._resumes,
                    error_kind=exc.kind,
                    error=exc.message,
                )
                self._sleep(min(self.backoff_s * 2 ** (self._resumes - 1), 30.0))
            except BaseException:
                self._finished = True
                raise
        return None


def _drop_front(chunk: bytes, n: int) -> bytes:
    return chunk[n:]
