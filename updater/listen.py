"""Where the metrics endpoint listens: a loopback TCP address or a Unix socket.

``127.0.0.1:9464``, ``[::1]:9464`` or ``unix:/run/updater/metrics.sock``, read
strictly: a port in ASCII digits, an IPv6 address in brackets, a loopback IP
literal (no names, no scope ids), a socket path the kernel can bind. Anything
else is a :class:`~updater.errors.ConfigError` ``invalid`` naming the setting,
checked when the configuration is loaded, not when the agent binds.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from updater.errors import ConfigError

SUN_PATH_MAX = 108  # bytes in sockaddr_un.sun_path, the terminating NUL included
_HINT = 'use "127.0.0.1:PORT", "[::1]:PORT" or "unix:/run/updater/metrics.sock"'
# [0-9] is ASCII only (str.isdigit would take "²" and int() then fails)
_TCP = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]{2,45})\]|(?P<ipv4>[0-9.]{7,15})):(?P<port>[0-9]{1,5})"
)


@dataclass(frozen=True)
class ListenAddress:
    family: Literal["tcp", "unix"]
    host: str = ""  # tcp: a loopback IP literal
    port: int = 0  # tcp: 0 picks a free port
    path: Path | None = None  # unix

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(
    listen: str,
    *,
    key: str | None = None,
    file: str | None = None,
    allow_port_zero: bool = False,
    loopback_only: bool = True,
    what: str = "metrics listen address",
    hint: str = _HINT,
) -> ListenAddress:
    """``listen`` as an address, or ConfigError ``invalid`` (``file`` and ``key`` name it).

    Port 0 (any free port) only with ``allow_port_zero``: nobody could scrape
    a configured endpoint on a port chosen at random. A server for other
    machines (the FleetLock server) passes ``loopback_only=False``: any IP
    literal then, ``0.0.0.0`` or ``[::]`` for every address.
    """

    def bad(why: str) -> ConfigError:
        shown = listen if len(listen) <= 200 else listen[:200] + "..."
        return ConfigError("invalid", f"{what} {shown!r}: {why}", file=file, key=key, hint=hint)

    if not isinstance(listen, str):
        raise bad("must be a string")
    if listen.startswith("unix:"):
        return ListenAddress("unix", path=_socket_path(listen[len("unix:") :], bad))
    m = _TCP.fullmatch(listen)
    if m is None:
        if ":" in listen.rpartition(":")[0] and not listen.startswith("["):
            raise bad("write an IPv6 address in brackets, e.g. [::1]:9464")
        ip_kind = "a loopback IP address" if loopback_only else "an IP address"
        raise bad(f"expected IP:PORT with {ip_kind} (not a name) and a port")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv6Address(m["ipv6"]) if m["ipv6"] else ipaddress.IPv4Address(m["ipv4"])
        )
    except ValueError:
        raise bad("the host is not an IP address") from None
    if loopback_only and not ip.is_loopback:
        raise bad("only loopback addresses are allowed")
    port = int(m["port"])
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise bad("the port must be a number from 1 to 65535")
    return ListenAddress("tcp", host=str(ip), port=port)


def _socket_path(text: str, bad: Callable[[str], ConfigError]) -> Path:
    if not text.startswith("/"):
        raise bad("a Unix socket needs an absolute file path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise bad("the socket path has control characters")
    path = Path(text)
    if text.endswith("/") or path.name in ("", ".", ".."):
        raise bad("the socket path must name a file")
    try:
        encoded = os.fsencode(path)
    except UnicodeError:
        raise bad("the socket path cannot be encoded as a file name") from None
    if len(encoded) >= SUN_PATH_MAX:
        raise bad(f"the socket path is too long (at most {SUN_PATH_MAX - 1} bytes)")
    return path
