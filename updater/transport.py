"""Getting bytes from a release repository: http(s):// with requests, file://.

Every foreign exception is wrapped into :class:`DownloadError` with a bounded
kind (python-tuf's FetcherInterface lesson), so callers never see a requests
or OSError type. Timeouts: one for connecting, one for a stalled read (it
fires when the server stops sending, mid-body included).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import requests
import structlog
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from updater import __version__
from updater.errors import DownloadError

log = structlog.get_logger(__name__)

USER_AGENT = f"updater/{__version__}"


@dataclass(frozen=True)
class FetchResult:
    body: bytes | None  # None when the server said Not Modified
    etag: str | None

    @property
    def not_modified(self) -> bool:
        return self.body is None


class ByteStream(Protocol):
    """An open download: bytes from ``start`` on. ``read`` returns b"" at the end."""

    start: int  # first byte offset actually served (0 if a Range was ignored)
    length: int | None  # bytes this response will carry, if the server said so
    validator: str | None  # ETag to send as If-Range when resuming

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@runtime_checkable
class IntoStream(ByteStream, Protocol):
    """A ByteStream that can also fill the caller's buffer (no new bytes object per read)."""

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the stream goes; 0 at the end."""
        ...


class Transport(Protocol):
    def get(self, url: str, *, max_bytes: int, etag: str | None = None) -> FetchResult:
        """Fetch a small document; conditional when ``etag`` is given."""
        ...

    def open_stream(self, url: str, *, start: int = 0, if_range: str | None = None) -> ByteStream:
        """Open ``url`` for streaming from byte ``start``."""
        ...


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3  # connection errors and 5xx answers, with backoff
    ca_file: Path | None = None  # trust these CAs for https instead of the system's


def _http_error(url: str, status: int) -> DownloadError:
    return DownloadError("http_status", f"HTTP {status} for {url}", status=status)


def wrap_error(url: str, exc: BaseException) -> DownloadError:
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return DownloadError("timeout", f"{url}: timed out ({exc})")
    if isinstance(exc, requests.exceptions.SSLError):
        return DownloadError(
            "connection",
            f"{url}: TLS failed ({exc})",
            hint="check [source] ca_file and the server's certificate",
        )
    if isinstance(exc, requests.exceptions.RetryError):
        return DownloadError("http_status", f"{url}: gave up after retries ({exc})")
    return DownloadError("connection", f"{url}: {exc}")


FOREIGN_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class _HttpStream:
    def __init__(self, url: str, response: requests.Response, start: int) -> None:
        self._url = url
        self._response = response
        self.start = start
        length = response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self.validator = response.headers.get("ETag")

    def read(self, n: int) -> bytes:
        try:
            data: bytes = self._response.raw.read(n, decode_content=False)
        except FOREIGN_ERRORS as exc:
            raise wrap_error(self._url, exc) from exc
        return data

    def readinto(self, buf: memoryview) -> int:
        body = _http_client_body(self._response)
        try:
            if body is None:
                n: int = self._response.raw.readinto(buf)
            else:
                n = body.readinto(buf)
        except (*FOREIGN_ERRORS, http.client.HTTPException) as exc:
            raise wrap_error(self._url, exc) from exc
        return n

    def close(self) -> None:
        self._response.close()


def _http_client_body(response: requests.Response) -> http.client.HTTPResponse | None:
    """The http.client response under urllib3's, to read the body without a copy.

    urllib3's own ``readinto`` reads into a new bytes object and copies that
    into the buffer; http.client's reads from the socket straight into it.
    ``_fp`` is private to urllib3, hence this one place and the fallback (None:
    use urllib3's documented methods). Reading past urllib3 loses nothing we
    rely on: the body is never decoded (we hash the bytes as served), and a
    body cut short shows as a short read that the downloader resumes.
    """
    fp = getattr(response.raw, "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


class HttpTransport:
    def __init__(
        self, settings: HttpSettings | None = None, session: requests.Session | None = None
    ) -> None:
        self.settings = settings or HttpSettings()
        self.session = session or self._session()

    def _session(self) -> requests.Session:
        retry = Retry(
            total=self.settings.retries,
            connect=self.settings.retries,
            read=0,  # a read that fails mid-body is resumed by the downloader
            other=0,  # e.g. a certificate that does not verify: retrying cannot help
            status=self.settings.retries,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            backoff_factor=0.5,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        session.headers["User-Agent"] = USER_AGENT
        # No transparent decompression: we hash the bytes exactly as served.
        session.headers["Accept-Encoding"] = "identity"
        return session

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout_s, self.settings.read_timeout_s)

    @property
    def _verify(self) -> str | bool:
        # Passed on every request: requests lets REQUESTS_CA_BUNDLE override a
        # session-level setting, never an explicit per-request one.
        return True if self.settings.ca_file is None else str(self.settings.ca_file)

    def get(self, url: str, *, max_bytes: int, etag: str | None = None) -> FetchResult:
        headers = {"If-None-Match": etag} if etag else {}
        try:
            with self.session.get(
                url, headers=headers, timeout=self._timeout, stream=True, verify=self._verify
            ) as resp:
                if resp.status_code == 304 and etag:
                    return FetchResult(None, etag)
                if resp.status_code != 200:
                    raise _http_error(url, resp.status_code)
                body = resp.raw.read(max_bytes + 1, decode_content=False)
                if len(body) > max_bytes:
                    raise DownloadError("too_much_data", f"{url}: more than {max_bytes} bytes")
                return FetchResult(body, resp.headers.get("ETag"))
        except FOREIGN_ERRORS as exc:
            raise wrap_error(url, exc) from exc

    def open_stream(self, url: str, *, start: int = 0, if_range: str | None = None) -> ByteStream:
        headers: dict[str, str] = {}
        if start:
            headers["Range"] = f"bytes={start}-"
            if if_range:
                headers["If-Range"] = if_range
        try:
            resp = self.session.get(
                url, headers=headers, timeout=self._timeout, stream=True, verify=self._verify
            )
        except FOREIGN_ERRORS as exc:
            raise wrap_error(url, exc) from exc
        if resp.status_code == 206 and start:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                resp.close()
                raise DownloadError(
                    "http_status",
                    f"{url}: asked for bytes {start}-, got {content_range!r}",
                    status=206,
                )
            return _HttpStream(url, resp, start)
        if resp.status_code == 200:
            return _HttpStream(url, resp, 0)
        resp.close()
        raise _http_error(url, resp.status_code)


class _FileStream:
    def __init__(self, fh: io.BufferedReader, start: int, length: int, validator: str) -> None:
        self._fh = fh
        self.start = start
        self.length: int | None = length
        self.validator: str | None = validator

    def read(self, n: int) -> bytes:
        try:
            return self._fh.read(n)
        except OSError as exc:
            raise DownloadError("connection", f"read failed: {exc}") from exc

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._fh.readinto(buf)
        except OSError as exc:
            raise DownloadError("connection", f"read failed: {exc}") from exc

    def close(self) -> None:
        self._fh.close()


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError("unsupported_url", f"{url}: file:// URLs must be local")
    return Path(unquote(parts.path))


def _file_etag(st: os.stat_result) -> str:
    return (
        '"'
        + hashlib.sha256(f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:32]
        + '"'
    )


class FileTransport:
    """A release repository in a local directory (or a mounted medium)."""

    def get(self, url: str, *, max_bytes: int, etag: str | None = None) -> FetchResult:
        path = _file_path(url)
        try:
            with path.open("rb") as fh:
                tag = _file_etag(os.fstat(fh.fileno()))
                if etag == tag:
                    return FetchResult(None, tag)
                body = fh.read(max_bytes + 1)
        except FileNotFoundError:
            raise DownloadError("http_status", f"{url}: not found", status=404) from None
        except OSError as exc:
            raise DownloadError("connection", f"{url}: {exc.strerror}") from None
        if len(body) > max_bytes:
            raise DownloadError("too_much_data", f"{url}: more than {max_bytes} bytes")
        return FetchResult(body, tag)

    def open_stream(self, url: str, *, start: int = 0, if_range: str | None = None) -> ByteStream:
        path = _file_path(url)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise DownloadError("http_status", f"{url}: not found", status=404) from None
        except OSError as exc:
            raise DownloadError("connection", f"{url}: {exc.strerror}") from None
        st = os.fstat(fh.fileno())
        tag = _file_etag(st)
        if if_range is not None and if_range != tag:
            start = 0  # changed since: serve it whole, as HTTP would
        fh.seek(start)
        return _FileStream(fh, start, st.st_size - start, tag)


class SchemeTransport:
    """Dispatches on the URL scheme."""

    def __init__(self, http: Transport | None = None, file: Transport | None = None) -> None:
        self._http = http or HttpTransport()
        self._file = file or FileTransport()

    def _pick(self, url: str) -> Transport:
        scheme = urlsplit(url).scheme
        if scheme in ("http", "https"):
            return self._http
        if scheme == "file":
            return self._file
        raise DownloadError("unsupported_url", f"{url}: only http, https and file URLs work")

    def get(self, url: str, *, max_bytes: int, etag: str | None = None) -> FetchResult:
        return self._pick(url).get(url, max_bytes=max_bytes, etag=etag)

    def open_stream(self, url: str, *, start: int = 0, if_range: str | None = None) -> ByteStream:
        return self._pick(url).open_stream(url, start=start, if_range=if_range)
