"""The FleetLock protocol, pure: what client and server share, and the server's
checks of a request.

The protocol (coreos/zincati ``docs/development/fleetlock/protocol.md``):
``POST <base_url>/v1/pre-reboot`` takes a slot, ``POST <base_url>/v1/steady-state``
gives it back, both recursive (idempotent) per client id. Every request carries
the header ``fleet-lock-protocol: true`` and the JSON body
``{"client_params": {"id": ..., "group": ...}}``; 200 is success, anything
else a failure whose body is ``{"kind": ..., "value": ...}``.

Here: the header and endpoints, the check of a configured base URL
(:func:`group_base_url`, used by the config and the client
:mod:`policies.fleetlock`), and the server's (:mod:`policies.fleetlockd`)
checks of a request, each failing with a :class:`ProtocolError` whose kind is
one of the bounded set :data:`KINDS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from policies.rebootlock import FAILURE_KIND_RE, check_group
from policies.semaphore import check_holder
from updater.errors import LockError
from updater.jsonutil import loads as load_json
from updater.urls import parse_url
from updater.versions import is_valid as is_valid_version

PROTOCOL_HEADER: Final = "fleet-lock-protocol"
PRE_REBOOT: Final = "/v1/pre-reboot"
STEADY_STATE: Final = "/v1/steady-state"
STATUS: Final = "/v1/status"  # ours, not part of the FleetLock protocol
GROUP_PLACEHOLDER: Final = "${group}"
MAX_REQUEST_BYTES: Final = 16 * 1024  # a request body; Zincati's is about 90, ours a little more
MAX_QUOTED_VALUE: Final = 300  # characters of a description quoted back to a client
FULL_KIND: Final = "failed_lock_semaphore_full"


def group_base_url(base_url: str, group: str) -> str:
    """``base_url`` with ``${group}`` replaced by ``group``, checked: an http(s) URL
    without query or fragment, else ``LockError("bad_argument")``."""
    url = base_url.replace(GROUP_PLACEHOLDER, group).rstrip("/")
    parts = parse_url(url, lambda why: LockError("bad_argument", f"FleetLock base_url: {why}"))
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise LockError(
            "bad_argument", f"FleetLock base_url {base_url!r} must not have a query or fragment"
        )
    return url


# Every kind this server answers, with its HTTP status: a bounded set (clients
# use kinds as metric labels).
KINDS: Final[Mapping[str, int]] = {
    "not_found": 404,
    "method_not_allowed": 405,
    "bad_request": 400,  # an HTTP request that http.server could not parse
    "headers_too_large": 431,
    "uri_too_long": 414,
    "missing_protocol_header": 400,
    "length_required": 411,
    "body_too_large": 413,
    "invalid_json": 400,
    "invalid_client_params": 400,
    "invalid_id": 400,
    "invalid_group": 400,
    "invalid_version": 400,
    "unknown_group": 400,
    FULL_KIND: 409,
    "version_blocked": 403,
    "etcd_unavailable": 503,
    "etcd_conflict": 503,
    "etcd_refused": 500,
    "semaphore_malformed": 500,
    "internal_error": 500,
}

Endpoint = Literal["pre-reboot", "steady-state", "status"]


class ProtocolError(Exception):
    """A FleetLock error answer: ``kind`` (one of :data:`KINDS`) and a human ``value``."""

    def __init__(self, kind: str, value: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"no FleetLock error kind {kind!r}")
        super().__init__(f"{kind}: {value}")
        self.kind = kind
        self.value = value[:MAX_QUOTED_VALUE] or kind

    @property
    def status(self) -> int:
        return KINDS[self.kind]

    def body(self) -> bytes:
        return json.dumps({"kind": self.kind, "value": self.value}).encode()


# ---- the request, checked (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ClientParams:
    id: str
    group: str
    version: str | None = None  # ours only: the version the client is about to reboot into
    # ours only, in a steady-state: a version the client rolled back from, and why
    failed_version: str | None = None
    failure_kind: str | None = None


def route(method: str, target: str) -> Endpoint:
    """The endpoint ``method`` and ``target`` (the request line's path) ask for."""
    path = urlsplit(target).path
    wanted: dict[str, tuple[Endpoint, tuple[str, ...]]] = {
        PRE_REBOOT: ("pre-reboot", ("POST",)),
        STEADY_STATE: ("steady-state", ("POST",)),
        STATUS: ("status", ("GET", "HEAD")),
    }
    if path not in wanted:
        raise ProtocolError("not_found", f"no FleetLock endpoint at {path[:100]}")
    endpoint, methods = wanted[path]
    if method not in methods:
        raise ProtocolError("method_not_allowed", f"{path} takes {' or '.join(methods)}")
    return endpoint


def body_length(headers: Mapping[str, list[str]]) -> int:
    """The checked body length of a lock request (``headers``: lower-case name -> values)."""
    if headers.get(PROTOCOL_HEADER, []) != ["true"]:
        raise ProtocolError(
            "missing_protocol_header", f"the header {PROTOCOL_HEADER}: true is required"
        )
    if headers.get("transfer-encoding"):
        raise ProtocolError("length_required", "send the body with a Content-Length, not chunked")
    lengths = headers.get("content-length", [])
    if not lengths:
        raise ProtocolError("length_required", "a Content-Length is required")
    if len(lengths) != 1 or not lengths[0].isascii() or not lengths[0].isdigit():
        raise ProtocolError("bad_request", "Content-Length is not one whole number")
    length = int(lengths[0])
    if length > MAX_REQUEST_BYTES:
        raise ProtocolError("body_too_large", f"the body is over {MAX_REQUEST_BYTES} bytes")
    return length


def parse_body(body: bytes) -> ClientParams:
    """``{"client_params": {"id", "group"[, "version"]}}``, every field checked."""

    def bad_json(why: str) -> ProtocolError:
        return ProtocolError("invalid_json", f"the body is not a JSON document: {why}")

    doc: Any = load_json(body, bad_json, max_bytes=MAX_REQUEST_BYTES)
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise ProtocolError("invalid_client_params", "client_params (a JSON object) is required")
    client_id, group, version = params.get("id"), params.get("group"), params.get("version")
    if not isinstance(client_id, str):
        raise ProtocolError("invalid_id", "client_params.id (a string) is required")
    try:
        check_holder(client_id)
    except LockError:
        raise ProtocolError("invalid_id", "client_params.id: 1-256 printable characters") from None
    if not isinstance(group, str):
        raise ProtocolError("invalid_group", "client_params.group (a string) is required")
    try:
        check_group(group)
    except LockError:
        raise ProtocolError(
            "invalid_group", "client_params.group must match [a-zA-Z0-9.-]+"
        ) from None
    failed, kind = params.get("failed_version"), params.get("failure_kind")
    for v in (version, failed):
        if v is not None and (not isinstance(v, str) or not is_valid_version(v)):
            raise ProtocolError(
                "invalid_version",
                "client_params.version and failed_version: a version like 1.2.3 "
                "(at most 64 characters)",
            )
    if (failed is None) != (kind is None) or (
        kind is not None and (not isinstance(kind, str) or not FAILURE_KIND_RE.fullmatch(kind))
    ):
        raise ProtocolError(
            "invalid_client_params",
            "client_params.failed_version and failure_kind go together; failure_kind: "
            "1-64 of [a-z0-9_]",
        )
    return ClientParams(client_id, group, version, failed, kind)


def lock_failure(exc: LockError) -> ProtocolError:
    """The answer for an etcd failure (bounded kinds; the message is for the admin)."""
    kind = {
        "unavailable": "etcd_unavailable",
        "conflict": "etcd_conflict",
        "malformed": "semaphore_malformed",
        "refused": "etcd_refused",
    }.get(exc.kind, "internal_error")
    return ProtocolError(kind, exc.message)
