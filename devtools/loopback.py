"""An HTTP(S) server on 127.0.0.1:<free port>, answered from a daemon thread.

The base of the test servers (release repository, FleetLock, Omaha): ``with``
starts it and, pass or fail, stops it (its ``closing`` event set first, to cut
hangs and trickles short; then shutdown, the socket closed, the thread joined).
"""

from __future__ import annotations

import ssl
import threading
from http.server import ThreadingHTTPServer
from typing import Generic, Self, TypeVar

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
