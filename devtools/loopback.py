"""An HTTP(S) server on 127.0.0.1:<free port>, answered from a daemon thread.

The base of the test servers (release repository, FleetLock, Omaha): ``with``
starts it and, pass or fail, stops it (its ``closing`` event set first, to cut
hangs and trickles short; then shutdown, the socket closed, the thread joined).
"""

from __future__ import annotations

import ssl
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Generic, Self, TypeVar


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threading server for tests: its threads die with the process, its port can be
    reused at once, and a client that hangs up mid-answer (an agent cancelled during a
    download) is no error worth a traceback."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


S = TypeVar("S", bound=ThreadingHTTPServer)


class LoopbackServer(Generic[S]):
    def __init__(
        self,
        server: S,
        *,
        tls: ssl.SSLContext | None = None,
        poll_interval: float = 0.05,
        closing: threading.Event | None = None,
    ) -> None:
        self._server = server
        self._scheme = "http"
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
            self._scheme = "https"
        self._closing = closing
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
        )

    @property
    def origin(self) -> str:
        """Scheme, host and port: ``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._closing is not None:
            self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self._server.server_close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
