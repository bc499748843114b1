"""What trust roots cost a check: verifying a manifest with and without roots, and
walking N roots at once (a host that slept through N rotations).

``python -m bench.trust_walk [--roots 30] [--rounds 5]`` makes a throwaway key,
publishes a signed manifest-sized document and ``--roots`` roots (each a
renewal signed by the key, `updatectl keys rotate`'s code) into a repository
served over loopback HTTP, and times the agent's own
:class:`updater.trustchain.ChainVerifier` (real gpg): a check on the keyring
alone (no roots published), a check from the floor (the newest root is
already trusted: one 404 for the next root, then the manifest), and the walk
of every root from root 0. Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from devtools.gpgkeys import SigningKey, signing_key
from devtools.repo_server import RepoServer
from updater.clock import SystemClock
from updater.gpg import sign_detached
from updater.keyrotation import RotateRequest, rotate
from updater.transport import HttpSettings, HttpTransport, SchemeTransport
from updater.trustchain import ChainVerifier, TrustChain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trust-walk-") as tmp:
        work = Path(tmp)
        with signing_key(work / "gnupg") as key:
            _run(work, key, args.roots, args.rounds)


def _median(rounds: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def _run(work: Path, key: SigningKey, roots: int, rounds: int) -> None:
    repo = work / "repo"
    repo.mkdir()
    doc = repo / "release.json"
    doc.write_bytes(b'{"schema": 1}' + b" " * 1024)
    sign_detached(doc, repo / "release.json.asc", gnupghome=key.gnupghome, key_id=key.fingerprint)
    body, signature = doc.read_bytes(), (repo / "release.json.asc").read_bytes()
    transport = SchemeTransport(http=HttpTransport(HttpSettings()))
    with RepoServer(repo) as server:
        url = server.url

        def check(state: Path) -> None:
            chain = TrustChain(
                state_dir=state,
                transport=transport,
                clock=SystemClock(),
                keyring=(key.public_key,),
            )
            verdict = ChainVerifier(chain, lambda n: f"{url}/keys/root.{n}.json").verify(
                body, signature
            )
            assert verdict.valid, verdict

        floor = work / "state-floor"
        keyring_only = _median(rounds, lambda: check(floor))
        t0 = time.monotonic()
        for _ in range(roots):
            rotate(
                RotateRequest(repo=repo, gnupghome=key.gnupghome, sign_with=(key.fingerprint,)),
                datetime.now(UTC),
            )
        publish_s = time.monotonic() - t0
        check(floor)  # walk once: from here on the host starts from root N
        from_floor = _median(rounds, lambda: check(floor))
        n = 0

        def walk_all() -> None:
            nonlocal n
            n += 1
            check(work / f"state-fresh-{n}")

        walk = _median(rounds, walk_all)
    print(f"check, keyring only (no roots)      {keyring_only * 1000:7.1f} ms")
    print(f"check from the floor (root {roots})     {from_floor * 1000:7.1f} ms")
    print(
        f"check walking {roots} roots from root 0  {walk * 1000:7.1f} ms "
        f"({(walk - from_floor) / roots * 1000:.1f} ms per root)"
    )
    print(f"publishing {roots} roots (keys rotate)  {publish_s:7.2f} s")


if __name__ == "__main__":
    main()
