"""What the chunk index costs `updatectl release`: time and image size, framed vs one stream.

``python -m bench.release_index [--size-mib 256]`` builds an ext4 image
(:mod:`devtools.deltaimages`) and publishes it twice with a throwaway key:
as today's single zstd stream (``delta_index=False``) and as one frame per
64 KiB block plus the index. Prints both wall times and sizes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from devtools.deltaimages import build_tree, make_image
from devtools.gpgkeys import SigningKey, signing_key
from updater.release import ReleaseRequest, publish

MIB = 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="release-index-") as tmp:
        work = Path(tmp)
        build_tree(work / "tree", int(args.size_mib * MIB * 0.8))
        image = make_image(work / "tree", work / "usr.img", args.size_mib * MIB)
        with signing_key(work / "gnupg") as key:
            _run(work, image, key)


def _run(work: Path, image: Path, key: SigningKey) -> None:
    for delta in (False, True):
        req = ReleaseRequest(
            image=image,
            version="1.0.0" if not delta else "1.0.1",
            repo=work / "repo",
            gnupghome=key.gnupghome,
            key_id=key.fingerprint,
            delta_index=delta,
        )
        t0 = time.monotonic()
        out = publish(req, datetime.now(UTC))
        seconds = time.monotonic() - t0
        idx = out.index_path.stat().st_size if out.index_path else 0
        print(
            f"{'framed + index' if delta else 'one stream':15s} {seconds:6.2f} s  "
            f"image {out.manifest.image.size / MIB:8.2f} MiB  index {idx / 1024:7.1f} KiB"
        )


if __name__ == "__main__":
    main()
