"""The one URL checker for every URL that comes from outside.

``urllib.parse.urlsplit`` raises plain ``ValueError`` for a malformed IPv6
literal or a netloc that changes under NFKC normalization, and ``.port`` raises
for a port out of range or not a number; ``requests`` then fails on a host that
IDNA cannot encode. :func:`parse_url` does all of those checks once, up front,
and turns each failure into the caller's own typed error, so no URL from a
config file, an Omaha answer, a redirect or a lock server's reply can escape as
anything else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna

from updater.errors import UpdaterError

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192  # characters; longer is not a URL anyone configures or serves


# [userinfo@](name | [IPv6])[:port], the port in ASCII digits: anything else is a
# netloc that urlsplit, urllib3 and requests might read three different ways.
_AUTHORITY = re.compile(
    r"(?:[!-~]*@)?"  # user info: printable ASCII (an '@' inside it ends it last)
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._~\-\x80-\U0010ffff]+))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Url:
    """A checked URL: scheme and host lower-cased, the port resolved."""

    text: str
    scheme: str
    host: str  # "" for file:// URLs; an IPv6 literal without its brackets
    port: int | None  # the explicit port, else the scheme's default (None for file://)
    path: str
    query: str
    fragment: str

    @property
    def origin(self) -> tuple[str, str, int | None]:
        """What a redirect may not change without leaving the server: scheme, host, port."""
        return self.scheme, self.host, self.port


def _check_host(host: str) -> str | None:
    """Why ``host`` cannot be connected to, or None if it can."""
    if not host:
        return "no host"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in host):
        return "the host has white space or control characters"
    if host.startswith(("*", ".")):
        return "the host is not a domain name"
    try:
        # refuse what requests (IDNA 2008, UTS 46) or urllib3 (STD3 rules) would
        if host.isascii():
            encoded = host.encode("ascii")
        else:
            encoded = idna.encode(host, uts46=True)
            idna.encode(host.lower(), strict=True, std3_rules=True)
        encoded.decode("ascii").encode("idna")  # label lengths
    except (UnicodeError, idna.IDNAError):
        return "the host is not a valid (IDNA) domain name"
    if len(encoded) > 253 or any(not 0 < len(label) <= 63 for label in encoded.split(b".")[:-1]):
        return "the host is not a valid domain name"
    return None


def parse_url(
    text: str,
    error: Callable[[str], UpdaterError],
    *,
    schemes: Collection[str] = ("http", "https"),
) -> Url:
    """Check ``text`` and split it, or raise ``error(reason)``.

    ``schemes`` are the allowed ones; ``file`` URLs need no host. Every other
    scheme needs a host that is an IP address or an IDNA-encodable name, and a
    port, if given, in 1..65535.
    """
    if not isinstance(text, str):
        raise error(f"{text!r} is not a URL")
    if len(text) > MAX_URL_LENGTH:
        raise error(f"a URL of {len(text)} characters is too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) or text != text.strip():
        raise error(f"{text!r} has white space or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname or ""
    except ValueError as exc:  # bad IPv6 literal, NFKC-unsafe netloc, bad port
        raise error(f"{text!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise error(f"{text!r} is not a {' or '.join(f'{s}://' for s in schemes)} URL")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise error(f"{text!r}: a file:// URL names no host")
        return Url(text, scheme, "", None, parts.path, parts.query, parts.fragment)
    authority = _AUTHORITY.fullmatch(parts.netloc)
    if authority is None:
        raise error(f"{text!r}: the authority is not [user@]host[:port]")
    if authority["ipv6"] is not None and not _is_ipv6(authority["ipv6"]):
        raise error(f"{text!r}: {authority['ipv6']!r} is not an IPv6 address")
    if port == 0:
        raise error(f"{text!r}: port 0")
    why = _check_host(host)
    if why is not None:
        raise error(f"{text!r}: {why}")
    return Url(
        text,
        scheme,
        host.lower(),
        port if port is not None else DEFAULT_PORTS.get(scheme),
        parts.path,
        parts.query,
        parts.fragment,
    )
