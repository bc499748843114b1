"""Blocking work off the event loop: in daemon threads, so a stopping agent is never
held by a thread stuck in a read; and the heap an install used handed back."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def run_blocking(fn: Callable[[], T]) -> Awaitable[T]:
    """Run ``fn`` in a daemon thread; its result or exception as an awaitable.

    Not the default executor: its threads are joined at interpreter exit, and
    one stuck in a read would hold a stopping agent for the whole timeout.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)

    def work() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as exc:
            result, ok = _awaitable_error(exc), False
        with contextlib.suppress(RuntimeError):  # the loop may be gone when we stop
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, name="agent-work", daemon=True).start()
    return future


def _awaitable_error(exc: BaseException) -> BaseException:
    """What the work's awaiter gets for ``exc``.

    An asyncio future refuses StopIteration (the result would be lost and the
    awaiter wait forever), and SystemExit, KeyboardInterrupt or GeneratorExit
    raised in a worker thread end that work, not the agent: all of them arrive
    as a RuntimeError that names them.
    """
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration):
        return exc
    wrapped = RuntimeError(f"{type(exc).__name__} raised in a worker thread: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
