"""A stand-in host for the lock safety test: the real EtcdLock, a fake reboot.

``python -m devtools.lock_agent --id ID --out FILE --endpoints URL,... --group G``
runs ``--rounds`` times: acquire (retrying with jittered backoff while the
answer is "no" or an error), "reboot" by sleeping a random ``--hold-ms``
interval, and release (retrying until it succeeds). Each hold is recorded in
FILE as ``<start_ns> <end_ns>`` (``time.time_ns()``: every agent on the
machine shares that clock), taken after the grant and before the release, so
a recorded interval always lies inside the time etcd counts the holder.
The last line is ``done <rounds>``. Past ``--deadline`` (unix seconds) the
agent gives up with exit code 3; it also dies with its parent.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from policies.etcdclient import EtcdSettings
from policies.etcdlock import EtcdLock
from updater.errors import LockError

EXIT_DEADLINE = 3
PR_SET_PDEATHSIG = 1


class DeadlineExceeded(Exception):
    pass


def die_with_parent() -> None:
    """Linux only: SIGKILL us when the test process goes away, however it dies."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def retry(what: Callable[[], bool], deadline: float, rng: random.Random, cap_s: float = 0.4) -> int:
    """Call ``what`` until it returns True; returns how many LockErrors it raised."""
    delay, errors = 0.02, 0
    while True:
        try:
            if what():
                return errors
        except LockError:
            errors += 1
        if time.time() > deadline:
            raise DeadlineExceeded
        time.sleep(rng.uniform(0, delay))
        delay = min(cap_s, delay * 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.lock_agent")
    p.add_argument("--id", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--endpoints", required=True, help="comma-separated etcd client URLs")
    p.add_argument("--group", default="default")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hold-ms", type=int, nargs=2, default=(50, 300), metavar=("MIN", "MAX"))
    p.add_argument("--timeout-s", type=float, default=1.0, help="per etcd request")
    p.add_argument("--deadline", type=float, default=time.time() + 300)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    die_with_parent()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rng = random.Random(args.seed)  # timing jitter, not secrets
    settings = EtcdSettings(endpoints=tuple(args.endpoints.split(",")), timeout_s=args.timeout_s)
    lock = EtcdLock.from_settings(settings, args.group, args.slots)
    errors = 0

    def release() -> bool:
        lock.release(args.id)
        return True

    with open(args.out, "w", buffering=1) as out:
        try:
            for _ in range(args.rounds):
                errors += retry(lambda: lock.acquire(args.id), args.deadline, rng)
                start = time.time_ns()
                time.sleep(rng.uniform(*args.hold_ms) / 1000)
                end = time.time_ns()
                out.write(f"{start} {end}\n")
                errors += retry(release, args.deadline, rng)
        except DeadlineExceeded:
            print(f"{args.id}: deadline passed", file=sys.stderr)
            return EXIT_DEADLINE
        out.write(f"done {args.rounds}\n")
    print(f"{args.id}: {args.rounds} rounds, {errors} lock errors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
