"""The TLS context of our HTTP servers (`fleetlock serve`, `fleet serve`)."""

from __future__ import annotations

import ssl
from pathlib import Path

from updater.errors import ConfigError


def server_tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """TLS 1.2 or newer with ``cert`` (the chain) and ``key``; None without them.
    A file that cannot be loaded is a ConfigError naming it."""
    if cert is None or key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "unreadable",
            f"cannot load the TLS certificate and key: {exc}",
            file=str(cert),
            hint="PEM files: the certificate chain and its unencrypted private key",
        ) from None
    return ctx
