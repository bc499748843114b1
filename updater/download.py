"""A download of known size that resumes with Range after a dropped connection.

The size comes from the signed manifest and is a hard cap: a server that
announces or sends more is refused as soon as it does (endless-data attack).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import structlog

from updater.errors import DownloadError
from updater.transport import Transport, opened

log = structlog.get_logger(__name__)

RESUMABLE = frozenset({"connection", "timeout"})


def stream(
    transport: Transport,
    url: str,
    *,
    size: int,
    chunk_size: int = 1024 * 1024,
    resume_attempts: int = 5,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """Yield the ``size`` bytes at ``url`` in order, resuming where a transfer broke."""
    got = 0
    resumes = 0
    validator: str | None = None
    while True:
        try:
            with opened(transport.open_stream(url, start=got, if_range=validator)) as s:
                if validator is None:
                    validator = s.validator
                if s.length is not None and s.start + s.length > size:
                    raise DownloadError(
                        "too_much_data",
                        f"{url}: the server announces {s.start + s.length} bytes, "
                        f"the manifest {size}",
                    )
                skip = got - s.start  # the server ignored our Range: drop what we have
                while True:
                    chunk = s.read(chunk_size)
                    if not chunk:
                        break
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    if got + len(chunk) > size:
                        raise DownloadError(
                            "too_much_data", f"{url}: the server sends more than {size} bytes"
                        )
                    got += len(chunk)
                    yield chunk
            if got == size:
                return
            raise DownloadError("connection", f"{url}: the transfer ended at byte {got} of {size}")
        except DownloadError as exc:
            if exc.kind not in RESUMABLE or resumes >= resume_attempts:
                raise
            resumes += 1
            log.warning(
                "download_resume",
                url=url,
                offset=got,
                attempt=resumes,
                error_kind=exc.kind,
                error=exc.message,
            )
            sleep(min(backoff_s * 2 ** (resumes - 1), 30.0))
