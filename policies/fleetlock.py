"""FleetLock client: the cluster reboot lock served over HTTP (airlock, Typhoon's fleetlock).

The protocol (coreos/zincati ``docs/development/fleetlock/protocol.md``):
``POST <base_url>/v1/pre-reboot`` takes a slot, ``POST <base_url>/v1/steady-state``
gives it back, both recursive (idempotent) per client id. Every request carries
the header ``fleet-lock-protocol: true`` and the JSON body
``{"client_params": {"id": ..., "group": ...}}``. Status 200 is success; any
other status is a failure, whose body SHOULD be ``{"kind": ..., "value": ...}``
(a bounded machine-readable kind and a human description); without one the
kind is ``generic_http_<status>``, as Zincati names it.

Decisions where the spec leaves room, all failing closed:

* "No free slot" is not an error but the ordinary answer while others reboot:
  ``acquire`` returns False for status 423 (Locked) or a kind in
  ``full_kinds`` (the spec's own example ``failed_lock_semaphore_full``, and
  Typhoon's ``lock_held``). airlock answers a full semaphore with 500
  ``failed_lock``, the kind it also uses for etcd failures, so against
  airlock a full semaphore surfaces as :class:`FleetLockError` (refused):
  still "no", only counted as an error.
* Only 200 succeeds (Zincati takes any 2xx). A 200 whose body is neither
  empty nor JSON (a captive portal, a catch-all web server answering every
  POST) is not a FleetLock answer: ``malformed``.
* The answer is judged by its body, never by its Content-Type: airlock sends
  its JSON errors as ``text/plain``.
* Redirects are never followed (the protocol header exists so that a request
  reaches only the server it was meant for): a 3xx is ``refused``.
* Bodies are parsed by :mod:`updater.jsonutil` (at most MAX_ANSWER_BYTES bytes, bounded
  nesting, no NaN): whatever the server sends, the answer is an Outcome or a
  :class:`FleetLockError`, never another exception.
* Transport failures, timeouts and 5xx without a FleetLock body are
  ``unavailable``; a FleetLock error body is ``refused`` (the service said no);
  a JSON body that is not a FleetLock error, an oversized body or an
  unbounded-looking kind is ``malformed``.
* ``timeout_s`` bounds connecting and each read; reading the body also stops
  at a deadline of ``timeout_s`` after the request began, so a server that
  trickles bytes cannot hold the agent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import requests
import structlog
import urllib3

from policies.fleetlockproto import PRE_REBOOT, PROTOCOL_HEADER, STEADY_STATE, group_base_url
from policies.rebootlock import FailureReport, check_group
from updater.errors import LockError, RefusedError
from updater.httpbody import read1
from updater.jsonutil import loads as load_json

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_S: Final = 30.0
FULL_KINDS: Final = frozenset({"failed_lock_semaphore_full", "lock_held"})
MAX_ANSWER_BYTES: Final = 64 * 1024  # a FleetLock answer is a few dozen
MAX_LOGGED_VALUE: Final = 512  # characters of a server's description kept for logs
# A kind becomes a metric label: refuse anything that does not look bounded.
_KIND_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class FleetLockError(LockError):
    """A FleetLock request failed; ``protocol_kind``/``protocol_value`` are the server's
    (or ``generic_http_<status>``, ``timeout``, ``connection_failed``, ...) for logs and
    metrics, ``status`` the HTTP status if there was an answer."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        endpoint: str,
        status: int | None,
        protocol_kind: str,
        protocol_value: str,
        hint: str | None = None,
    ) -> None:
        super().__init__(kind, message, hint=hint)
        self.endpoint = endpoint
        self.status = status
        self.protocol_kind = protocol_kind
        self.protocol_value = protocol_value


@dataclass(frozen=True)
class Outcome:
    """What an HTTP answer means: success (``error`` None), or a failure that is
    either "no free slot" (``full``) or an error to raise."""

    error: FleetLockError | None = None
    full: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def judge(
    endpoint: str, status: int, body: bytes | None, full_kinds: frozenset[str] = FULL_KINDS
) -> Outcome:
    """Pure: the meaning of ``status`` and ``body`` (None: larger than MAX_ANSWER_BYTES)."""

    def fail(
        kind: str, pkind: str, value: str, hint: str | None = None, *, full: bool = False
    ) -> Outcome:
        message = f"FleetLock {endpoint}: HTTP {status}, {pkind}: {value}"
        err = FleetLockError(
            kind,
            message,
            endpoint=endpoint,
            status=status,
            protocol_kind=pkind,
            protocol_value=value,
            hint=hint,
        )
        return Outcome(error=err, full=full)

    generic = f"generic_http_{status}"
    if body is None:
        return fail("malformed", generic, f"answer larger than {MAX_ANSWER_BYTES} bytes")
    text = body.decode("utf-8", errors="replace")
    try:
        # bounded: a body nested thousands deep is "not JSON", never a RecursionError
        doc: object = (
            load_json(body, ValueError, max_bytes=MAX_ANSWER_BYTES) if body.strip() else None
        )
        is_json = True
    except ValueError:
        doc, is_json = None, False

    if status == 200:
        if text.strip() and not is_json:
            return fail(
                "malformed",
                "invalid_success_body",
                f"200 with a body that is not JSON: {_excerpt(text)}",
                hint="base_url must point at a FleetLock server, not a web page",
            )
        return Outcome()

    remote = _remote_error(doc)
    if remote is not None:
        pkind, value = remote
        if endpoint == PRE_REBOOT and (status == 423 or pkind in full_kinds):
            return fail("refused", pkind, value, full=True)
        return fail("refused", pkind, value)
    if endpoint == PRE_REBOOT and status == 423:
        return fail("refused", generic, "locked", full=True)
    if is_json and doc is not None:
        return fail("malformed", generic, f"not a FleetLock error: {_excerpt(text)}")
    if 300 <= status < 400:
        return fail(
            "refused",
            generic,
            "redirects are not followed",
            hint="set base_url to where the server really is",
        )
    if status >= 500:
        return fail("unavailable", generic, _excerpt(text) or "server error")
    return fail("refused", generic, _excerpt(text) or "no FleetLock error in the answer")


def is_version_blocked(err: FleetLockError) -> bool:
    """Our server's refusal of a pre-reboot into a version the group has blocked."""
    return (
        err.endpoint == PRE_REBOOT and err.status == 403 and err.protocol_kind == "version_blocked"
    )


def _remote_error(doc: object) -> tuple[str, str] | None:
    if not isinstance(doc, dict):
        return None
    kind, value = doc.get("kind"), doc.get("value")
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        return None
    if not isinstance(value, str) or not value:
        return None
    return kind, value[:MAX_LOGGED_VALUE]


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 120 else flat[:117] + "..."


class FleetLock:
    """The FleetLock protocol as a :class:`~policies.rebootlock.RebootLock`."""

    name = "fleetlock"

    def __init__(
        self,
        base_url: str,
        group: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
        ca_file: Path | None = None,
        full_kinds: frozenset[str] = FULL_KINDS,
    ) -> None:
        self.group = check_group(group)
        url = group_base_url(base_url, group)
        if timeout_s <= 0:
            raise LockError("bad_argument", f"timeout_s must be positive, not {timeout_s}")
        self.base_url = url
        self.timeout_s = timeout_s
        self.full_kinds = full_kinds
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        self._verify: str | None = None if ca_file is None else str(ca_file)

    def close(self) -> None:
        """Close the HTTP session, if this object made it."""
        if self._own_session:
            self._session.close()

    def url(self, endpoint: str) -> str:
        return self.base_url + endpoint

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        """Take a slot; ``version`` (the one about to boot) goes along as
        ``client_params.version``, which our server checks against the group's
        failed versions and other servers ignore. Our server's 403
        ``version_blocked`` is ``RefusedError("version_blocked")``."""
        outcome = self._call(PRE_REBOOT, holder, {"version": version})
        if outcome.error is not None and is_version_blocked(outcome.error):
            self._failed(outcome.error, holder)
            raise RefusedError(
                "version_blocked",
                f"FleetLock server {self.base_url}: {outcome.error.protocol_value}",
                hint=f"`updatectl fleet unblock {version}` (where etcd is reachable) once "
                "the version is fixed or known good",
            )
        if outcome.error is None:
            log.info("fleetlock_slot_held", group=self.group, holder=holder, url=self.base_url)
            return True
        if outcome.full:
            log.info(
                "fleetlock_semaphore_full",
                group=self.group,
                holder=holder,
                status=outcome.error.status,
                protocol_kind=outcome.error.protocol_kind,
                value=outcome.error.protocol_value,
            )
            return False
        raise self._failed(outcome.error, holder)

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        """Give the slot back; ``failed`` goes along as ``client_params.failed_version``
        and ``failure_kind``: our server records it for the group before it frees the
        slot (any error answer: neither happened). Other servers (airlock) ignore the
        fields and only release, so True means "sent with a release that succeeded"."""
        extra = (
            {}
            if failed is None
            else {"failed_version": failed.version, "failure_kind": failed.sent_kind}
        )
        outcome = self._call(STEADY_STATE, holder, extra)
        if outcome.error is not None:
            raise self._failed(outcome.error, holder)
        log.info(
            "fleetlock_slot_released",
            group=self.group,
            holder=holder,
            url=self.base_url,
            failed_version=None if failed is None else failed.version,
        )
        return failed is not None

    def _failed(self, err: FleetLockError, holder: str) -> FleetLockError:
        log.warning(
            "fleetlock_request_failed",
            endpoint=err.endpoint,
            group=self.group,
            holder=holder,
            kind=err.kind,
            status=err.status,
            protocol_kind=err.protocol_kind,
            value=err.protocol_value,
        )
        return err

    def _call(
        self, endpoint: str, holder: str, extra: Mapping[str, str | None] | None = None
    ) -> Outcome:
        if not holder:
            raise LockError("bad_argument", "FleetLock client id must be a non-empty string")
        params = {"id": holder, "group": self.group}
        params |= {k: v for k, v in (extra or {}).items() if v is not None}
        body = json.dumps({"client_params": params})
        deadline = time.monotonic() + self.timeout_s
        try:
            response = self._session.post(
                self.url(endpoint),
                data=body.encode(),
                headers={
                    PROTOCOL_HEADER: "true",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                },
                timeout=(self.timeout_s, self.timeout_s),
                allow_redirects=False,
                stream=True,
                verify=self._verify,  # None: the session's setting (the system's CAs)
            )
        except requests.Timeout as exc:
            raise self._transport(endpoint, "timeout", exc) from None
        except requests.exceptions.SSLError as exc:
            raise self._transport(endpoint, "tls_failed", exc) from None
        except requests.RequestException as exc:
            raise self._transport(endpoint, "connection_failed", exc) from None
        with response:
            try:
                data = self._read_body(response, deadline)
            except (TimeoutError, urllib3.exceptions.ReadTimeoutError) as exc:
                raise self._transport(endpoint, "timeout", exc) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._transport(endpoint, "connection_failed", exc) from None
        return judge(endpoint, response.status_code, data, self.full_kinds)

    @staticmethod
    def _read_body(response: requests.Response, deadline: float) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("the answer took longer than timeout_s")
            chunk = read1(response.raw, 4096)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                return None
            chunks.append(chunk)

    def _transport(self, endpoint: str, pkind: str, exc: BaseException) -> FleetLockError:
        err = FleetLockError(
            "unavailable",
            f"FleetLock {endpoint} at {self.url(endpoint)}: {pkind}: {exc}",
            endpoint=endpoint,
            status=None,
            protocol_kind=pkind,
            protocol_value=str(exc)[:MAX_LOGGED_VALUE],
            hint="check that the FleetLock server is reachable at base_url",
        )
        log.warning(
            "fleetlock_request_failed",
            endpoint=endpoint,
            group=self.group,
            kind=err.kind,
            status=None,
            protocol_kind=pkind,
            value=err.protocol_value,
        )
        return err
