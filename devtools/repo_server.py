"""A static HTTP server for a release repository, on loopback, for tests,
the demo and the benchmarks (not part of the agent).

It honours Range (one range, ``bytes=a-`` or ``bytes=a-b``) and If-Range
(Python's http.server does not), answers conditional GETs with ETags, sends
files with sendfile(2) so it is never the bottleneck of a benchmark, records
every request, and can misbehave on purpose per path (:class:`Fault`) to play
a hostile or broken server.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from devtools.loopback import LoopbackHTTPServer, LoopbackServer


@dataclass
class Fault:
    """How to misbehave when serving one path."""

    flip_byte_at: int | None = None  # XOR 0xFF into the byte at this file offset
    extra_bytes: int = 0  # append garbage after the file (Content-Length omitted)
    drop_after: int | None = None  # close the connection after this many body bytes
    drop_times: int = 1  # ... on this many requests (then serve normally)
    stall_after: int | None = None  # stop sending (keep the socket open) after this many
    stall_s: float = 30.0
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    status: int | None = None  # answer with this status and no body
    status_times: int | None = None  # ... only this many times (None: always)
    body: bytes | None = None  # serve these bytes instead of the file
    delay_s: float = 0.0  # wait before answering
    chunk_delay_s: float = 0.0  # pause after each 64 KiB of body (a slow link)
    # Trickle: one byte every trickle_s seconds, each well under any read timeout.
    trickle_s: float = 0.0  # > 0: the body trickles from file offset trickle_after on
    trickle_after: int = 0
    trickle_head: bool = False  # ... and the status line and headers trickle too
    trickle_times: int | None = None  # on this many requests (None: always)
    redirect_to: str | None = None  # answer 302 with this Location (any text, however broken)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    sent: int  # body bytes sent


@dataclass
class _Shared:
    root: Path
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)
    idle: threading.Condition = field(default_factory=threading.Condition)
    in_flight: int = 0  # requests being answered (recorded only when done)
    begun: list[str] = field(default_factory=list)  # paths of every request, as it arrives


def etag_of(st: os.stat_result) -> str:
    return (
        '"'
        + hashlib.sha1(f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:20]
        + '"'
    )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as nginx's tcp_nodelay: the head and the body go out as two
    # writes, and a small body (a delta update's frames) would otherwise wait for
    # the client's delayed ACK, 40 ms a request on keep-alive connections.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, status: int, sent: int) -> None:
        with self.server.shared.lock:
            self.server.shared.requests.append(
                Request(self.command, self.path, dict(self.headers.items()), status, sent)
            )

    def flush_headers(self) -> None:
        fault: Fault | None = getattr(self, "_fault", None)
        if fault is None or not fault.trickle_head or not getattr(self, "_trickling", False):
            super().flush_headers()
            return
        head = b"".join(getattr(self, "_headers_buffer", []))
        self._headers_buffer: list[bytes] = []
        self._trickle(memoryview(head), fault.trickle_s)

    def _trickle(self, data: memoryview, every_s: float) -> int:
        """Send ``data`` one byte at a time; the count sent (less if the client left)."""
        closing = self.server.shared.closing
        sent = 0
        for i in range(len(data)):
            if closing.wait(every_s):
                break
            try:
                sent += self.connection.send(data[i : i + 1])
            except OSError:
                self.close_connection = True
                break
        return sent

    def _simple(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self._record(status, 0)

    def do_GET(self) -> None:
        shared = self.server.shared
        with shared.idle:
            shared.in_flight += 1
            shared.begun.append(unquote(urlsplit(self.path).path))
        try:
            self._get()
        finally:
            with shared.idle:
                shared.in_flight -= 1
                shared.idle.notify_all()

    def _get(self) -> None:
        shared = self.server.shared
        path = unquote(urlsplit(self.path).path)
        fault = shared.faults.get(path, Fault())
        self._fault = fault
        self._trickling = False
        if fault.trickle_s and (fault.trickle_times is None or fault.trickle_times > 0):
            self._trickling = True
            if fault.trickle_times is not None:
                with shared.lock:
                    fault.trickle_times -= 1
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", fault.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(302, 0)
            return
        if fault.status is not None and (fault.status_times is None or fault.status_times > 0):
            if fault.status_times is not None:
                with shared.lock:
                    fault.status_times -= 1
            self._simple(fault.status)
            return
        target = (shared.root / path.lstrip("/")).resolve()
        if shared.root.resolve() not in target.parents or not target.is_file():
            self._simple(404)
            return
        with target.open("rb") as fh:
            st = os.fstat(fh.fileno())
            etag = etag_of(st)
            data_override = fault.body
            size = len(data_override) if data_override is not None else st.st_size
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                self._record(304, 0)
                return
            start, end, status = 0, size, 200
            rng = self.headers.get("Range")
            if rng and not fault.ignore_range and rng.startswith("bytes="):
                if_range = self.headers.get("If-Range")
                if if_range is None or if_range == etag:
                    first, _, last = rng[6:].partition("-")
                    start = int(first)
                    end = min(size, int(last) + 1) if last else size  # "a-b": b inclusive
                    status = 206
                    if start >= size or end <= start:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        self._record(416, 0)
                        return
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            if fault.extra_bytes:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(end - start))
            self.end_headers()
            sent = self._body(fh, fault, start, end, data_override)
            self._record(status, sent)

    def _body(
        self, fh: BinaryIO, fault: Fault, start: int, end: int, override: bytes | None
    ) -> int:
        """Send bytes ``start .. end-1`` of the file (or of ``override``)."""
        shared = self.server.shared
        simple = (
            override is None
            and fault.flip_byte_at is None
            and fault.drop_after is None
            and fault.stall_after is None
            and not fault.extra_bytes
            and not fault.chunk_delay_s
            and not self._trickling
        )
        if simple:
            try:
                sent: int = self.connection.sendfile(fh, offset=start, count=end - start)
            except OSError:  # the client hung up (e.g. on a 200 to its Range request)
                self.close_connection = True
                sent = max(0, fh.tell() - start)  # sendfile leaves the position where it stopped
            return sent
        fh.seek(0)
        data = override if override is not None else fh.read()
        if fault.flip_byte_at is not None and fault.flip_byte_at < len(data):
            b = bytearray(data)
            b[fault.flip_byte_at] ^= 0xFF
            data = bytes(b)
        body = data[start:end] + b"\xa5" * fault.extra_bytes
        limit = len(body)
        drop = False
        if fault.drop_after is not None and fault.drop_times > 0:
            with shared.lock:
                fault.drop_times -= 1
            limit = max(0, fault.drop_after - start)
            drop = True
        stall = fault.stall_after is not None
        if stall:
            limit = max(0, (fault.stall_after or 0) - start)
        sent = 0
        view = memoryview(body)[: min(limit, len(body))]
        trickle_at = len(view)
        if self._trickling:
            trickle_at = min(len(view), max(0, fault.trickle_after - start))
        try:
            while sent < trickle_at:
                sent += self.connection.send(view[sent : min(sent + 65536, trickle_at)])
                if fault.chunk_delay_s:
                    time.sleep(fault.chunk_delay_s)
            if sent < len(view):
                sent += self._trickle(view[sent:], fault.trickle_s)
            if stall:
                shared.closing.wait(fault.stall_s)
            if drop or stall:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True
        return sent


class _Server(LoopbackHTTPServer):
    shared: _Shared


class RepoServer(LoopbackServer[_Server]):
    """``with RepoServer(root) as srv: srv.url`` — serves ``root`` on 127.0.0.1:<free port>."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.shared = _Shared(root)
        super().__init__(server, tls=tls, closing=server.shared.closing)

    @property
    def url(self) -> str:
        return self.origin

    @property
    def requests(self) -> list[Request]:
        """Every answered request; waits (briefly) for those still being answered."""
        shared = self._server.shared
        with shared.idle:
            shared.idle.wait_for(lambda: shared.in_flight == 0, timeout=5)
        with self._server.shared.lock:
            return list(self._server.shared.requests)

    @property
    def begun(self) -> list[str]:
        """The path of every request received, answered or not (a hung one too)."""
        with self._server.shared.idle:
            return list(self._server.shared.begun)

    def fault(self, path: str, fault: Fault) -> None:
        self._server.shared.faults[path] = fault

    def clear_faults(self) -> None:
        self._server.shared.faults.clear()


def main() -> None:
    p = argparse.ArgumentParser(description="serve a release repository on loopback")
    p.add_argument("root", type=Path)
    p.add_argument("--port-file", type=Path, help="write the URL here once listening")
    args = p.parse_args()
    with RepoServer(args.root) as srv:
        if args.port_file:
            args.port_file.write_text(srv.url + "\n")
        print(srv.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
