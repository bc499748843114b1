"""Getting bytes from a release repository: http(s):// with requests, file://.

Every foreign exception is wrapped into :class:`DownloadError` with a bounded
kind (python-tuf's FetcherInterface lesson), in one place
(:mod:`updater.httperrors`: every request goes out through
:meth:`HttpTransport.request`, every body is read inside its wrapper), so
callers never see a requests or OSError type.

Timeouts: one for connecting, one for a stalled read (it fires when the
server stops sending, mid-body included), and a speed floor
(:class:`SpeedFloor`) for a server that trickles: one byte every few seconds
keeps every read under the read timeout and a transfer going for ever. The
response head (status line and headers) must arrive within the floor's window
too (:class:`_HeadDeadline`). Both end as ``DownloadError("timeout")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import requests
import structlog
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from updater import __version__
from updater.errors import DownloadError
from updater.httpbody import read1
from updater.httperrors import status_error, wrapped

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

    def open_range(
        self, url: str, *, start: int, length: int, if_range: str | None = None
    ) -> ByteStream | None:
        """Open exactly the bytes ``start .. start+length-1`` of ``url`` (a delta
        update's frames); None when the server ignores Range (answers 200 with the
        whole file) or the file changed since ``if_range``."""
        ...


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3  # connection errors and 5xx answers, with backoff
    ca_file: Path | None = None  # trust these CAs for https instead of the system's
    min_speed_bytes_s: float = 1024.0  # slower than this on average (0: no floor) ...
    min_speed_window_s: float = 60.0  # ... over this long: abandoned (and resumed)
    # every request through this proxy (but hosts NO_PROXY names); None: the environment's
    # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as requests reads them
    proxy: str | None = None

    @property
    def head_timeout_s(self) -> float | None:
        """How long the response head may take: one window, never less than the read
        timeout (a server that thinks before it answers is not trickling)."""
        if self.min_speed_bytes_s <= 0:
            return None
        return max(self.min_speed_window_s, self.read_timeout_s)


class SpeedFloor:
    """A transfer must average ``min_bytes_s`` over every ``window_s`` spent waiting
    for it (curl's LOW_SPEED_LIMIT / LOW_SPEED_TIME; update_engine sets 1 byte/s for
    90 s), else ``DownloadError("timeout")``. Only the time spent in reads counts: a
    consumer that pauses (a slow disk, a full pipeline) is not the server's fault.
    Decides from the numbers it is given (the clock is injected): no I/O.
    """

    def __init__(
        self,
        url: str,
        min_bytes_s: float,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_bytes_s = min_bytes_s
        self.window_s = window_s
        self.clock = clock
        self._spent = 0.0  # seconds waited in reads, this window
        self._got = 0  # bytes those reads returned

    def note(self, n: int, started: float) -> None:
        """A read that began at ``started`` (by ``clock``) returned ``n`` bytes."""
        if self.min_bytes_s <= 0:
            return
        self._spent += max(0.0, self.clock() - started)
        self._got += n
        if self._spent < self.window_s:
            return
        if self._got < self.min_bytes_s * self._spent:
            raise DownloadError(
                "timeout",
                f"{self.url}: {self._got} bytes in {self._spent:.1f} s, slower than the "
                f"floor of {self.min_bytes_s:g} bytes/s",
                hint="a server or link that trickles; [source] min_speed_bytes_s and "
                "min_speed_window_s set the floor",
            )
        self._spent, self._got = 0.0, 0


class _HttpStream:
    """A response body read with at most one socket read per call, so that the
    speed floor sees every byte as it arrives (a read that waits for a full buffer
    would sit for ever on a trickle)."""

    def __init__(
        self, url: str, response: requests.Response, start: int, floor: SpeedFloor
    ) -> None:
        self._url = url
        self._response = response
        self._floor = floor
        self.start = start
        length = response.headers.get("Content-Length")
        # ASCII only: Latin-1 "\u00b2" passes isdigit() and int() refuses it
        self.length = int(length) if length and length.isascii() and length.isdigit() else None
        self.validator = response.headers.get("ETag")

    def read(self, n: int) -> bytes:
        started = self._floor.clock()
        with wrapped(self._url):
            data: bytes = read1(self._response.raw, n)
        self._floor.note(len(data), started)
        return data

    def readinto(self, buf: memoryview) -> int:
        body = _http_client_body(self._response)
        started = self._floor.clock()
        with wrapped(self._url):
            if body is None:
                data = read1(self._response.raw, len(buf))
                n = len(data)
                buf[:n] = data
            else:
                n = _readinto_once(body, buf)
        self._floor.note(n, started)
        return n

    def close(self) -> None:
        self._response.close()


def _http_client_body(response: requests.Response) -> http.client.HTTPResponse | None:
    """The http.client response under urllib3's, to read the body with less copying.

    urllib3's own ``readinto`` reads into a new bytes object through its own
    buffering and copies that into the buffer; http.client's ``readinto1`` does
    one socket read and one copy.
    ``_fp`` is private to urllib3, hence this one place and the fallback (None:
    use urllib3's documented methods). Reading past urllib3 loses nothing we
    rely on: the body is never decoded (we hash the bytes as served), and a
    body cut short shows as a short read that the downloader resumes.
    """
    fp = getattr(response.raw, "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


class _HeadDeadline:
    """Mixed into urllib3's connections: the response head (status line and headers)
    must be complete within ``head_timeout_s``, or the socket is shut down under the
    reading thread and the read ends as a timeout. The read timeout alone fires only
    on a server that stops, not on one that trickles its headers."""

    head_timeout_s: float | None = None
    sock: socket.socket | None

    def getresponse(self) -> Any:
        sock, limit = self.sock, self.head_timeout_s
        if sock is None or limit is None:
            return super().getresponse()  # type: ignore[misc]
        fired = threading.Event()

        def cut() -> None:
            fired.set()
            # socket.socket's own shutdown: an SSLSocket's would also drop its TLS state
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

        timer = threading.Timer(limit, cut)
        timer.daemon = True
        timer.start()
        try:
            return super().getresponse()  # type: ignore[misc]
        except Exception as exc:
            if fired.is_set():  # urllib3 reports it as a read timeout
                raise TimeoutError(f"no complete response head within {limit:g} s") from exc
            raise
        finally:
            timer.cancel()


def _adapter(retry: Retry, head_timeout_s: float | None) -> HTTPAdapter:
    """requests' adapter, its connections holding the response head to a deadline.

    The classes are made per transport because urllib3 builds connections from a
    class, with no per-pool setting to carry the deadline. (Through a proxy,
    requests uses urllib3's own ProxyManager: the head is then bounded only by the
    read timeout.)
    """

    class Http(_HeadDeadline, HTTPConnection):
        pass

    class Https(_HeadDeadline, HTTPSConnection):
        pass

    Http.head_timeout_s = Https.head_timeout_s = head_timeout_s

    class HttpPool(HTTPConnectionPool):
        ConnectionCls = Http

    class HttpsPool(HTTPSConnectionPool):
        ConnectionCls = Https

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HttpPool, "https": HttpsPool}

    return Adapter(max_retries=retry)


def _readinto_once(body: http.client.HTTPResponse, buf: memoryview) -> int:
    """http.client's ``readinto`` with at most one socket read, straight into ``buf``.

    Its own ``readinto`` waits until the buffer is full; its ``readinto1`` (read1,
    then a copy) allocates a bytes object per read. With a Content-Length this
    reads from the socket file into ``buf`` and keeps the response's count of what
    is left, as its ``readinto`` does; anything else takes the documented path.
    """
    fp, length = body.fp, body.length
    if body.chunked or length is None or fp is None:
        return body.readinto1(buf)
    if length <= 0:
        return 0
    n = fp.readinto1(buf[: min(len(buf), length)])
    body.length = length - n
    return n


class HttpTransport:
    def __init__(
        self,
        settings: HttpSettings | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or HttpSettings()
        self.clock = clock
        self.session = session or self._session()

    def speed_floor(self, url: str) -> SpeedFloor:
        s = self.settings
        return SpeedFloor(url, s.min_speed_bytes_s, s.min_speed_window_s, self.clock)

    def read_capped(self, url: str, response: requests.Response, max_bytes: int) -> bytes:
        """The body of ``response``, at most ``max_bytes + 1`` bytes (so that the
        caller sees a body over the cap), held to the speed floor."""
        floor = self.speed_floor(url)
        out = bytearray()
        with wrapped(url):
            while len(out) <= max_bytes:
                started = floor.clock()
                piece = read1(response.raw, max_bytes + 1 - len(out))
                floor.note(len(piece), started)
                if not piece:
                    break
                out += piece
        return bytes(out)

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
        adapter = _adapter(retry, self.settings.head_timeout_s)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
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

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], **kwargs: Any
    ) -> requests.Response:
        """Send one request with this transport's timeouts and CA file; the response
        is streamed (read its body with :meth:`read_capped` or a stream). The one
        place requests go out: failures are ``DownloadError`` (:mod:`updater.httperrors`)."""
        with wrapped(url):
            return self.session.request(
                method,
                url,
                headers=headers,
                timeout=self._timeout,
                verify=self._verify,
                stream=True,
                proxies=self._proxies(url),
                **kwargs,
            )

    def _proxies(self, url: str) -> dict[str, str]:
        """The configured proxy for ``url`` (none for a host NO_PROXY names). Passed per
        request: requests lets the environment's proxies override a session's, not these;
        with none here, the environment's apply (requests' trust_env)."""
        proxy = self.settings.proxy
        if proxy is None or requests.utils.should_bypass_proxies(url, no_proxy=None):
            return {}
        return {"http": proxy, "https": proxy}

    def get(self, url: str, *, max_bytes: int, etag: str | None = None) -> FetchResult:
        headers = {"If-None-Match": etag} if etag else {}
        with wrapped(url), self.request("GET", url, headers=headers) as resp:
            if resp.status_code == 304 and etag:
                return FetchResult(None, etag)
            if resp.status_code != 200:
                raise status_error(url, resp.status_code)
            body = self.read_capped(url, resp, max_bytes)
            if len(body) > max_bytes:
                raise DownloadError("too_much_data", f"{url}: more than {max_bytes} bytes")
            return FetchResult(body, resp.headers.get("ETag"))

    def open_stream(self, url: str, *, start: int = 0, if_range: str | None = None) -> ByteStream:
        headers: dict[str, str] = {}
        if start:
            headers["Range"] = f"bytes={start}-"
            if if_range:
                headers["If-Range"] = if_range
        resp = self.request("GET", url, headers=headers)
        if resp.status_code == 206 and start:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {start}-"):
                resp.close()
                raise DownloadError(
                    "http_status",
                    f"{url}: asked for bytes {start}-, got {content_range!r}",
                    status=206,
                )
            return _HttpStream(url, resp, start, self.speed_floor(url))
        if resp.status_code == 200:
            return _HttpStream(url, resp, 0, self.speed_floor(url))
        resp.close()
        raise status_error(url, resp.status_code)

    def open_range(
        self, url: str, *, start: int, length: int, if_range: str | None = None
    ) -> ByteStream | None:
        headers = {"Range": _range_header(start, length)}
        if if_range:
            headers["If-Range"] = if_range
        resp = self.request("GET", url, headers=headers)
        if resp.status_code == 200:
            resp.close()  # Range ignored (or If-Range failed): the caller takes the whole file
            return None
        if resp.status_code != 206:
            resp.close()
            raise status_error(url, resp.status_code)
        end = start + length - 1
        content_range = resp.headers.get("Content-Range", "")
        # exactly the bytes asked for: a server that answers another range (or a
        # multipart one) is not a server this client can trust to cut frames
        if not content_range.startswith(f"bytes {start}-{end}/"):
            resp.close()
            raise DownloadError(
                "http_status",
                f"{url}: asked for bytes {start}-{end}, got {content_range!r}",
                status=206,
            )
        stream = _HttpStream(url, resp, start, self.speed_floor(url))
        if stream.length is not None and stream.length != length:
            stream.close()
            raise DownloadError(
                "too_much_data" if stream.length > length else "connection",
                f"{url}: {stream.length} bytes announced for a range of {length}",
            )
        return stream


def _range_header(start: int, length: int) -> str:
    if start < 0 or length <= 0:
        raise ValueError(f"bad range {start}+{length}")
    return f"bytes={start}-{start + length - 1}"


class _FileStream:
    def __init__(self, fh: io.BufferedReader, start: int, length: int, validator: str) -> None:
        self._fh = fh
        self.start = start
        self.length: int | None = length
        self.validator: str | None = validator
        self._left: int | None = None  # bytes a range may still return

    def limit(self, n: int) -> None:
        self._left = n

    def _cap(self, n: int) -> int:
        return n if self._left is None else min(n, self._left)

    def _took(self, n: int) -> None:
        if self._left is not None:
            self._left -= n

    def read(self, n: int) -> bytes:
        try:
            data = self._fh.read(self._cap(n))
        except OSError as exc:
            raise DownloadError("connection", f"read failed: {exc}") from exc
        self._took(len(data))
        return data

    def readinto(self, buf: memoryview) -> int:
        try:
            n = self._fh.readinto(buf[: self._cap(len(buf))])
        except OSError as exc:
            raise DownloadError("connection", f"read failed: {exc}") from exc
        self._took(n)
        return n

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

    def open_range(
        self, url: str, *, start: int, length: int, if_range: str | None = None
    ) -> ByteStream | None:
        _range_header(start, length)  # the same argument checks as over HTTP
        stream = self.open_stream(url, start=start, if_range=if_range)
        if stream.start != start:  # changed since if_range: as HTTP's 200
            stream.close()
            return None
        if stream.length is None or stream.length < length:
            stream.close()
            raise DownloadError(
                "http_status", f"{url}: bytes {start}+{length} lie past its end", status=416
            )
        assert isinstance(stream, _FileStream)
        stream.length = length
        stream.limit(length)
        return stream


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

    def open_range(
        self, url: str, *, start: int, length: int, if_range: str | None = None
    ) -> ByteStream | None:
        return self._pick(url).open_range(url, start=start, length=length, if_range=if_range)
