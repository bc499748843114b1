"""Small real filesystem images that carry their version (tests, demo, benchmarks)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from updater.run import run


def make_usr_image(
    path: Path, version: str, size: int = 16 * 1024 * 1024, payload: int = 1024 * 1024
) -> Path:
    """An ext4 image whose /lib/os-release names ``version``, plus some payload bytes.

    Built with ``mkfs.ext4 -d`` from a directory tree: no mount, no root needed.
    """
    with tempfile.TemporaryDirectory(prefix="usr-tree-") as tree:
        root = Path(tree)
        (root / "lib").mkdir()
        (root / "lib" / "os-release").write_text(
            f'NAME="Updater Demo OS"\nID=updater-demo\nIMAGE_ID=usr\nIMAGE_VERSION={version}\n'
            f"VERSION_ID={version}\n"
        )
        (root / "share").mkdir()
        # Incompressible but deterministic per version: two versions differ throughout.
        blob = bytearray()
        counter = 0
        while len(blob) < payload:
            blob += hashlib.sha256(f"{version}/{counter}".encode()).digest()
            counter += 1
        (root / "share" / "payload.bin").write_bytes(bytes(blob[:payload]))
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
                "-E",
                "root_owner=0:0",
                "-U",
                "clear",
                "-d",
                str(root),
                str(path),
            ],
            env={"E2FSPROGS_FAKE_TIME": "1700000000"},
        )
    os.chmod(path, 0o644)
    return path


def read_version(image: Path) -> str | None:
    """IMAGE_VERSION from an ext4 image's /lib/os-release, read with debugfs (no mount)."""
    out = run(["debugfs", "-R", "cat /lib/os-release", str(image)], check=False).text
    for line in out.splitlines():
        if line.startswith("IMAGE_VERSION="):
            return line.split("=", 1)[1].strip()
    return None
