"""The id a host uses in cluster locks and fleet status.

Not the raw /etc/machine-id (which must not leak to other parties): an
application-specific id derived from it, as sd_id128_get_machine_app_specific()
does (HMAC-SHA256 keyed with the machine id over our application id, first 16
bytes, marked as a UUID v4), the same scheme Zincati uses for FleetLock.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from pathlib import Path

from updater.errors import ConfigError

# This application's id (a random UUID, fixed forever: changing it changes every host's id).
APP_ID = uuid.UUID("3c1f8a7e-5d2b-4b8e-9f61-0a7c2e4d9b13")


def app_specific_id(machine_id: str, app_id: uuid.UUID = APP_ID) -> str:
    """32 lowercase hex digits, like the machine id it is derived from."""
    try:
        key = uuid.UUID(machine_id.strip()).bytes
    except ValueError:
        raise ConfigError(
            "invalid",
            f"not a machine id: {machine_id.strip()!r}",
            hint="/etc/machine-id must hold 32 hex digits",
        ) from None
    digest = bytearray(hmac.new(key, app_id.bytes, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # version 4
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(digest).hex()


def host_id(machine_id_file: Path = Path("/etc/machine-id")) -> str:
    try:
        return app_specific_id(machine_id_file.read_text())
    except OSError as exc:
        raise ConfigError(
            "unreadable",
            exc.strerror or str(exc),
            file=str(machine_id_file),
            hint="systemd-machine-id-setup creates it",
        ) from None
