"""One socket read of an HTTP response body, on every urllib3 the agent runs on.

The downloads and the FleetLock client read bodies with ``read1`` (at most one
socket read per call), so that a slow server is seen byte by byte rather than
a read sitting for ever on a trickle. ``HTTPResponse.read1`` came in urllib3
2.0; Debian bookworm ships 1.26. There :func:`read1` does what 2.x does: one
``read1`` of the ``http.client`` response underneath, inside urllib3's own
error translation (a timeout is ``ReadTimeoutError``, a broken connection
``ProtocolError``), a body cut short of its Content-Length an error rather than
a quiet end. The body is never decoded (``Content-Encoding`` stays as sent).
"""

from __future__ import annotations

from typing import Any

import urllib3


def read1(raw: Any, n: int) -> bytes:
    """At most ``n`` bytes of ``raw`` (a urllib3 ``HTTPResponse``), from at most one
    socket read; ``b""`` at the end of the body."""
    if hasattr(type(raw), "read1"):  # urllib3 >= 2
        data: bytes = raw.read1(n, decode_content=False)
        return data
    fp = raw._fp  # urllib3 1.26: the http.client response
    if fp is None or getattr(fp, "closed", False) or n == 0:
        return b""
    with raw._error_catcher():
        data = fp.read1(n)
        if data:
            raw._fp_bytes_read += len(data)
            if raw.length_remaining is not None:
                raw.length_remaining -= len(data)
        elif raw.length_remaining:
            raise urllib3.exceptions.IncompleteRead(raw._fp_bytes_read, raw.length_remaining)
    return data
