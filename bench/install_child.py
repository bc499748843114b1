"""One install in a process of its own, for `bench.install_throughput`.

Its own module so that the process imports the install path and nothing of
the benchmark: what its peak RSS counts is what the agent's install costs.
Prints one JSON line, a :class:`ChildResult`.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildJob:
    url: str
    device: str
    size: int  # bytes as downloaded
    sha256: str
    compression: str
    raw_size: int  # bytes
    raw_sha256: str
    readback: bool
    chunk_size: int  # bytes


@dataclass(frozen=True)
class ChildResult:
    seconds: float  # the install call: connect, download, hash, write, fsync (, read back)
    rss_after_imports_kib: int  # the interpreter with the install path imported, idle
    peak_rss_kib: int  # VmHWM at the end: the whole process at its largest


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux as well


def install(job: ChildJob) -> ChildResult:
    # imported here, after the figure without them could have been taken
    from updater import download  # noqa: PLC0415
    from updater.install import write_image  # noqa: PLC0415
    from updater.log import configure  # noqa: PLC0415
    from updater.manifest import Compression, ImageRef  # noqa: PLC0415
    from updater.slotio import SlotDevice  # noqa: PLC0415
    from updater.transport import HttpTransport  # noqa: PLC0415

    configure(logging.WARNING, sys.stderr)
    image = ImageRef(
        url=job.url,
        size=job.size,
        sha256=job.sha256,
        compression=Compression(job.compression),
        raw_size=job.raw_size,
        raw_sha256=job.raw_sha256,
    )
    after_imports = status_kib("VmRSS")
    started = time.monotonic()
    with SlotDevice(Path(job.device), 0, job.raw_size) as device:
        write_image(
            download.Download(HttpTransport(), job.url, size=job.size, chunk_size=job.chunk_size),
            image,
            device,
            chunk_size=job.chunk_size,
            readback=job.readback,
        )
    seconds = time.monotonic() - started
    return ChildResult(seconds, after_imports, status_kib("VmHWM"))


def main() -> None:
    result = install(ChildJob(**json.loads(sys.argv[1])))
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
