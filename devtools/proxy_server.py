"""A small HTTP proxy on loopback that records what passed through it: the proxy
an admin puts in ``[source] proxy`` or ``HTTPS_PROXY`` (squid's two jobs).

- ``CONNECT host:port`` (https through the proxy): a TCP tunnel, bytes copied
  both ways unread (TLS stays end to end);
- ``GET http://host:port/path`` (absolute form, plain http): forwarded to the
  origin with ``http.client``, the answer streamed back (status, headers, body).

With ``credentials`` set it answers 407 (``Proxy-Authenticate: Basic``) to a
request without the right ``Proxy-Authorization``. Every request is recorded
(:attr:`ProxyServer.passed`: method, target, status), so a test asserts what
went through it, and what did not.

    with ProxyServer() as proxy:
        proxy.url          # http://127.0.0.1:PORT
        proxy.passed       # [Passed("GET", "http://127.0.0.1:8000/stable/release.json", 200)]
"""

from __future__ import annotations

import base64
import http.client
import http.server
import select
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import Final

_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_CHUNK: Final = 64 * 1024
_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class Passed:
    method: str  # "CONNECT", "GET", ...
    target: str  # "127.0.0.1:8443" for CONNECT, the absolute URL otherwise
    status: int  # what the proxy answered (200 for an open tunnel, 407, 502...)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _authorized(self) -> bool:
        want = self.server.owner.credentials
        if want is None:
            return True
        token = base64.b64encode(f"{want[0]}:{want[1]}".encode()).decode()
        if self.headers.get("Proxy-Authorization", "") == f"Basic {token}":
            return True
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="test proxy"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_CONNECT(self) -> None:
        owner = self.server.owner
        if not self._authorized():
            owner.record(Passed("CONNECT", self.path, 407))
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=_TIMEOUT_S)
        except (OSError, ValueError):
            owner.record(Passed("CONNECT", self.path, 502))
            self.send_error(502)
            return
        owner.record(Passed("CONNECT", self.path, 200))
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        owner.tunnels.add(upstream)
        try:
            _pipe(self.connection, upstream)
        finally:
            owner.tunnels.discard(upstream)

    def _forward(self) -> None:
        owner = self.server.owner
        if not self._authorized():
            owner.record(Passed(self.command, self.path, 407))
            return
        url = urllib.parse.urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            owner.record(Passed(self.command, self.path, 400))
            self.send_error(400, "absolute http:// URL expected")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=_TIMEOUT_S)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            answer = conn.getresponse()
        except OSError:
            conn.close()
            owner.record(Passed(self.command, self.path, 502))
            self.send_error(502)
            return
        owner.record(Passed(self.command, self.path, answer.status))
        try:
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            chunked = answer.getheader("Content-Length") is None and self.command != "HEAD"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while self.command != "HEAD":
                piece = answer.read1(_CHUNK)
                if not piece:
                    break
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client hung up mid-body
        finally:
            conn.close()

    do_GET = _forward
    do_HEAD = _forward
    do_POST = _forward


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], _TIMEOUT_S)
            if not ready:
                return
            for src in ready:
                data = src.recv(_CHUNK)
                if not data:
                    return
                (b if src is a else a).sendall(data)
    except OSError:
        return
    finally:
        b.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: ProxyServer


class ProxyServer:
    """A recording proxy on 127.0.0.1 (a free port), in a thread, for a ``with`` block."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.passed: list[Passed] = []
        self.tunnels: set[socket.socket] = set()  # open CONNECT tunnels' upstream sockets
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, passed: Passed) -> None:
        with self._lock:
            self.passed.append(passed)

    def targets(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [p.target for p in self.passed if method is None or p.method == method]

    def start(self) -> ProxyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        for upstream in list(self.tunnels):  # ends their pipes: no thread outlives the proxy
            upstream.close()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
