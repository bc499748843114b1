"""structlog, configured once per process.

Readable console lines on a terminal; ``logfmt``-style key=value lines
otherwise (a service's stderr lands in the journal line by line).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(level: int = logging.WARNING, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    renderer: structlog.typing.Processor
    if out.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.LogfmtRenderer(key_order=["level", "event"])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
