"""Property-based fuzzing of the parsers of outside input (hypothesis).

The rule every parser keeps: a bad input is one of the project's typed errors
(an :class:`~updater.errors.UpdaterError`), never another exception, never a
hang, never unbounded memory. :func:`parse_or_typed_error` runs one parse and
fails the example if it breaks that rule.

Two hypothesis profiles: ``ci`` (the default; a bounded number of examples per
parser so ``make test`` stays fast) and ``fuzz`` (``make fuzz``: many more
examples, for a longer run). Fuzz tests carry the ``fuzz`` marker.
"""

from __future__ import annotations

import os
import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

from hypothesis import HealthCheck, settings

from updater.errors import UpdaterError

T = TypeVar("T")

CI_EXAMPLES = 150  # per parser, in make test
FUZZ_EXAMPLES = 20_000  # per parser, in make fuzz

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,  # time is bounded by parse_or_typed_error, not by hypothesis' timer
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Hang(AssertionError):
    """A parse took longer than its time bound."""


class MemoryHog(AssertionError):
    """A parse allocated more than its memory bound."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_or_typed_error(
    parse: Callable[[], T],
    *,
    timeout_s: float = 5.0,
    max_bytes: int = 64 * 1024 * 1024,
) -> T | UpdaterError:
    """Run ``parse``; return its result or the typed error it raised.

    Any other exception propagates (hypothesis reports and shrinks it), as do
    :class:`Hang` (over ``timeout_s``) and :class:`MemoryHog` (a peak of more
    than ``max_bytes`` allocated by Python while parsing).
    """
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        with _time_limit(timeout_s):
            try:
                result: T | UpdaterError = parse()
            except UpdaterError as exc:
                result = exc
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if not tracing:
            tracemalloc.stop()
    if peak > max_bytes:
        raise MemoryHog(f"peak {peak} bytes > {max_bytes}")
    return result


def fewer_examples(divisor: int, floor: int = 10) -> int:
    """A fraction of the loaded profile's examples, for a test whose inputs are big."""
    current = settings.default.max_examples if settings.default is not None else CI_EXAMPLES
    return max(floor, current // divisor)
