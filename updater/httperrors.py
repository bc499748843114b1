"""HTTP failures -> :class:`DownloadError`, in one place (python-tuf's fetcher lesson).

Whatever requests, urllib3, http.client and the socket layer raise for what a
server sends (or does not) becomes a ``DownloadError`` with a bounded kind:
``timeout``, ``connection`` (TLS included, with a hint), ``http_status`` (gave
up after retries) or ``unsupported_url`` (a URL that cannot be used, e.g. a
redirect to a malformed one), so callers never see a foreign exception type.
The HTTP transport sends every request and reads every body inside
:func:`wrapped`.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager

import requests
import urllib3

from updater.errors import DownloadError

# Everything requests, urllib3 and the socket layer raise for what a server sends:
# besides their own errors, plain ValueError (urllib.parse on a redirect's Location:
# a bad IPv6 literal, an NFKC netloc; requests' InvalidURL) and LookupError (a codec).
FOREIGN_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
    ValueError,
    LookupError,
)


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (one of :data:`FOREIGN_ERRORS`) is a timeout."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return True
    # urllib3 gives up on a read timeout it may not retry as MaxRetryError, which
    # requests raises as a ConnectionError: the reason says what it was.
    reason = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        return isinstance(reason.reason, urllib3.exceptions.ReadTimeoutError)
    return False


def wrap_error(url: str, exc: BaseException) -> DownloadError:
    """The :class:`DownloadError` that ``exc``, raised fetching ``url``, is."""
    if timed_out(exc):
        return DownloadError("timeout", f"{url}: timed out ({exc})")
    if isinstance(exc, requests.exceptions.SSLError):
        return DownloadError(
            "connection",
            f"{url}: TLS failed ({exc})",
            hint="check [source] ca_file and the server's certificate",
        )
    if isinstance(exc, requests.exceptions.RetryError):
        return DownloadError("http_status", f"{url}: gave up after retries ({exc})")
    if isinstance(exc, (ValueError, LookupError)) and not isinstance(
        exc, requests.exceptions.ConnectionError
    ):
        return DownloadError(
            "unsupported_url",
            f"{url}: a URL that cannot be used ({type(exc).__name__}: {exc})",
            hint="a redirect to a malformed URL? the server (or a proxy) is misconfigured",
        )
    return DownloadError("connection", f"{url}: {exc}")


@contextmanager
def wrapped(url: str) -> Iterator[None]:
    """Run the block; a foreign exception it raises leaves as :func:`wrap_error`'s."""
    try:
        yield
    except FOREIGN_ERRORS as exc:
        raise wrap_error(url, exc) from exc


def status_error(url: str, status: int) -> DownloadError:
    """An answer that is not the one asked for (HTTP ``status``)."""
    return DownloadError("http_status", f"HTTP {status} for {url}", status=status)
