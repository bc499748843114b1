"""The etcd reboot lock: airlock's counting semaphore, over the etcd v3 JSON gateway.

One key per group, shared with airlock (mixed fleets use one semaphore)::

    com.coreos.airlock/groups/<group>/v1/semaphore = {"total_slots":N,"holders":["a","b"]}

compact JSON with ``total_slots`` first and ``holders`` sorted and unique, the
bytes Go's ``encoding/json`` writes for airlock's ``Semaphore`` struct. The
key is created, when missing, with the configured slot count by a
create-if-absent transaction (compare ``create_revision == 0``); after that the
stored count wins (``set_max`` changes it). Every change is a transaction
that compares the key's ``mod_revision`` with the one read: a concurrent
change makes it fail, and the change is recomputed from the new value, a
bounded number of times with jittered backoff.

Beside it, ``.../v1/holders/<id>`` = ``{"since": unix seconds}`` records when
each holder took its slot. It is written and deleted in the same transaction
as the semaphore change, so the two never disagree; airlock ignores it. A
holder listed in the semaphore with no such key (one airlock admitted) has an
unknown age.

A semaphore that cannot be read (not JSON, wrong types, unsorted holders, a
negative count) is reported as ``LockError("malformed")`` naming the key and
is never overwritten, except by the explicit :meth:`EtcdLock.repair`.

etcd3gw talks to one endpoint; :class:`EtcdClient` keeps the configured list
in order and moves to the next one when a request fails to connect, times out
or gets a 5xx, with a per-request timeout. Every transaction is a
compare-and-swap, so retrying one whose answer was lost is safe: it either
finds its own change already made or fails its compare.
"""

from __future__ import annotations

import base64
import json
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import structlog
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from policies.lock import FailureReport, check_group, parse_etcd_endpoint
from updater.clock import Clock, SystemClock
from updater.errors import ConfigError, LockError
from updater.jsonutil import loads as load_json
from updater.jsonutil import object_members

log = structlog.get_logger(__name__)

KEY_PREFIX = "com.coreos.airlock/groups/"
MAX_SLOTS = 2**63 - 1  # airlock stores a uint64; etcd's JSON gateway, an int64
MAX_HOLDER_LEN = 256
MAX_VALUE_BYTES = 1024 * 1024  # a semaphore or holder record; etcd's own cap is 1.5 MiB
API_PATH = "/v3/"  # etcd >= 3.4; pinned so no /version discovery round trip is needed


def semaphore_key(group: str) -> str:
    """airlock's key (it query-escapes the group; valid groups need no escaping)."""
    return f"{KEY_PREFIX}{check_group(group)}/v1/semaphore"


def holders_prefix(group: str) -> str:
    return f"{KEY_PREFIX}{check_group(group)}/v1/holders/"


def holder_key(group: str, holder: str) -> str:
    return holders_prefix(group) + urllib.parse.quote(holder, safe="")


def check_holder(holder: str) -> str:
    """A holder id: 1..256 printable characters (ours are 32 hex digits)."""
    if not (0 < len(holder) <= MAX_HOLDER_LEN) or not holder.isprintable():
        raise LockError(
            "bad_argument", f"invalid holder id {holder!r}: use 1-256 printable characters"
        )
    return holder


def check_slots(slots: int) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= MAX_SLOTS:
        raise LockError("bad_argument", f"invalid slot count {slots!r}: use a whole number >= 0")
    return slots


# ---- the semaphore value (pure) --------------------------------------------------------------


def _go_json_string(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe, raw UTF-8)."""
    out = json.dumps(s, ensure_ascii=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        out = out.replace(ch, esc)
    return out


_KNOWN_FIELDS = frozenset({"total_slots", "holders"})


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


@dataclass(frozen=True)
class Semaphore:
    """airlock's semaphore.

    ``extra`` keeps the fields it does not know as written (the raw JSON text of
    name and value), to be put back byte for byte: re-encoding them would
    change them (``1e999`` would come back as ``Infinity``, which is not JSON,
    and every agent and airlock would then read the semaphore as malformed).
    """

    total_slots: int
    holders: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def decode(cls, raw: bytes, key: str) -> Semaphore:
        def bad(why: str) -> LockError:
            shown = raw[:200].decode("utf-8", "replace")
            return LockError(
                "malformed",
                f"etcd key {key}: {why}: {shown!r}",
                hint="fix it with `updatectl lock repair` (drops all holders) or etcdctl put",
            )

        members = object_members(raw, bad, max_bytes=MAX_VALUE_BYTES)
        for m in members:
            # Go's encoding/json matches field names ignoring case: airlock would
            # read "Total_Slots" as total_slots, while we would keep it as foreign.
            if m.name not in _KNOWN_FIELDS and m.name.casefold() in _KNOWN_FIELDS:
                raise bad(f"field {m.raw_name} is {m.name.casefold()} to airlock")
        doc = {m.name: m.value for m in members}  # the last of duplicates wins, as in Go
        slots = doc.get("total_slots")
        if isinstance(slots, bool) or not isinstance(slots, int):
            raise bad("total_slots is not a whole number")
        if not 0 <= slots <= MAX_SLOTS:
            raise bad("total_slots is out of range")
        holders = doc.get("holders")
        if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
            raise bad("holders is not a list of strings")
        if holders != sorted(set(holders)):
            raise bad("holders are not sorted and unique")
        if not all(_is_unicode(h) for h in holders):  # "\ud800": JSON, but no UTF-8
            raise bad("a holder is not valid Unicode")
        extra = tuple((m.raw_name, m.raw_value) for m in members if m.name not in _KNOWN_FIELDS)
        return cls(slots, tuple(holders), extra)

    def encode(self) -> bytes:
        parts = [
            f'"total_slots":{self.total_slots}',
            '"holders":[' + ",".join(_go_json_string(h) for h in self.holders) + "]",
            *(f"{name}:{value}" for name, value in self.extra),
        ]
        return ("{" + ",".join(parts) + "}").encode("utf-8")

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def holds(self, holder: str) -> bool:
        return holder in self.holders

    def with_holder(self, holder: str) -> Semaphore:
        return Semaphore(self.total_slots, tuple(sorted({*self.holders, holder})), self.extra)

    def without_holder(self, holder: str) -> Semaphore:
        return Semaphore(
            self.total_slots, tuple(h for h in self.holders if h != holder), self.extra
        )

    def with_slots(self, slots: int) -> Semaphore:
        return Semaphore(slots, self.holders, self.extra)


@dataclass(frozen=True)
class Holder:
    id: str
    since: float | None  # unix seconds; None when unknown (e.g. admitted by airlock)

    def age_s(self, now: float) -> float | None:
        return None if self.since is None else max(0.0, now - self.since)


@dataclass(frozen=True)
class SemaphoreStatus:
    group: str
    key: str
    total_slots: int
    holders: tuple[Holder, ...]
    mod_revision: int

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "group": self.group,
            "key": self.key,
            "total_slots": self.total_slots,
            "free_slots": self.free_slots,
            "mod_revision": self.mod_revision,
            "holders": [
                {"id": h.id, "since": h.since, "age_s": h.age_s(now)} for h in self.holders
            ],
        }


def _encode_since(since: float) -> bytes:
    return json.dumps({"since": round(since, 3)}, separators=(",", ":")).encode()


def _decode_since(raw: bytes) -> float | None:
    try:
        doc = load_json(raw, ValueError, max_bytes=MAX_VALUE_BYTES)
    except ValueError:
        return None
    since = doc.get("since") if isinstance(doc, dict) else None
    if isinstance(since, bool) or not isinstance(since, int | float):
        return None
    return float(since)


# ---- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd. Invalid values raise ConfigError naming the field."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    ca_file: Path | None = None  # PEM CA bundle for https endpoints (else the system's)
    cert_file: Path | None = None  # client certificate (with key_file)
    key_file: Path | None = None
    username: str | None = None  # etcd v3 auth (with password)
    password: str | None = None
    timeout_s: float = 5.0  # per request, per endpoint
    conflict_retries: int = 32  # compare-and-swap attempts before LockError("conflict")
    backoff_s: float = 0.01  # first conflict backoff; doubles, jittered
    backoff_max_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("invalid", "no etcd endpoint", key="endpoints")
        for url in self.endpoints:
            parts = parse_etcd_endpoint(
                url,
                lambda why: ConfigError(
                    "invalid",
                    f"not an etcd endpoint: {why}",
                    key="endpoints",
                    hint="like https://10.0.0.1:2379",
                ),
            )
            if (self.ca_file or self.cert_file) and parts.scheme != "https":
                raise ConfigError(
                    "invalid",
                    f"TLS files are set but {url!r} is not https",
                    key="endpoints",
                    hint="use https:// endpoints with TLS",
                )
        if (self.cert_file is None) != (self.key_file is None):
            missing = "cert_file" if self.cert_file is None else "key_file"
            raise ConfigError("invalid", "cert_file and key_file go together", key=missing)
        if (self.username is None) != (self.password is None):
            raise ConfigError(
                "invalid",
                "username and password go together",
                key="password" if self.password is None else "username",
            )
        if not 0 < self.timeout_s <= 300:
            raise ConfigError("invalid", "timeout_s must be in (0, 300]", key="timeout_s")
        if self.conflict_retries < 1:
            raise ConfigError("invalid", "conflict_retries must be >= 1", key="conflict_retries")


# ---- the connection: failover, TLS, auth -------------------------------------------------------

ClientFactory = Callable[[str], Etcd3Client]
"""Builds the etcd3gw client for one endpoint URL."""


def _system_trust() -> str | bool:
    """The system's CA store (requests would use its own bundle from certifi)."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


def client_factory(settings: EtcdSettings) -> ClientFactory:
    """etcd3gw clients with the settings' TLS files and per-request timeout."""

    def make(endpoint: str) -> Etcd3Client:
        url = urllib.parse.urlsplit(endpoint)
        assert url.hostname is not None  # checked by EtcdSettings
        session = _TimeoutSession(settings.timeout_s)
        # Not from the environment: REQUESTS_CA_BUNDLE would replace our CA
        # file, and an HTTP(S)_PROXY meant for the update server would get etcd.
        session.trust_env = False
        session.verify = str(settings.ca_file) if settings.ca_file else _system_trust()
        if settings.cert_file is not None and settings.key_file is not None:
            session.cert = (str(settings.cert_file), str(settings.key_file))
        client = Etcd3Client(
            host=url.hostname,
            port=url.port or 2379,
            protocol=url.scheme,
            timeout=settings.timeout_s,
            api_path=API_PATH,
        )
        # etcd3gw 2.0 (bookworm's) takes no session argument; every version
        # sends its requests through this attribute
        client.session = session
        return client

    return make


def _base_url(client: Etcd3Client) -> str:
    """``http(s)://host:port`` of ``client`` (etcd3gw 2.0, bookworm's, has no ``base_url``)."""
    host = f"[{client.host}]" if ":" in client.host else client.host
    return f"{client.protocol}://{host}:{client.port}"


class _TimeoutSession(requests.Session):
    """A session whose requests time out: etcd3gw 2.0 (Debian bookworm's)
    passes no timeout to requests, newer ones pass the client's."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        return super().request(method, url, *args, **kwargs)


class _EndpointDown(Exception):
    """This endpoint did not answer usefully: try the next one."""


class _TokenRejected(Exception):
    pass


# gRPC status codes the gateway puts in its error bodies.
_GRPC_INVALID_ARGUMENT = 3
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAUTHENTICATED = 16
_GRPC_OUT_OF_RANGE = 11


def _grpc_error(exc: Etcd3Exception) -> tuple[int | None, str]:
    try:
        doc = load_json(exc.detail_text or "", ValueError, max_bytes=MAX_VALUE_BYTES)
    except ValueError:
        return None, (exc.detail_text or str(exc))[:200]
    if not isinstance(doc, dict):
        return None, str(doc)[:200]
    code = doc.get("code")
    return (code if isinstance(code, int) else None), str(doc.get("error") or doc)[:200]


class EtcdClient:
    """POSTs to the v3 gateway of the first endpoint that answers.

    The endpoint that last answered stays current; a connection failure,
    timeout or 5xx moves to the next one (in order, wrapping). Only when every
    endpoint has failed for one request is ``LockError("unavailable")`` raised.
    """

    def __init__(self, settings: EtcdSettings, *, factory: ClientFactory | None = None) -> None:
        self.settings = settings
        self._factory = factory or client_factory(settings)
        self._clients: dict[str, Etcd3Client] = {}
        self._current = 0
        self._token: str | None = None
        self._mutex = threading.RLock()

    @property
    def endpoint(self) -> str:
        return self.settings.endpoints[self._current]

    def _client(self, endpoint: str) -> Etcd3Client:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = self._factory(endpoint)
        return client

    def close(self) -> None:
        with self._mutex:
            for client in self._clients.values():
                client.session.close()
            self._clients.clear()

    def call(self, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<method>`` (e.g. ``kv/txn``) and return the JSON answer."""
        with self._mutex:
            failures: list[str] = []
            n = len(self.settings.endpoints)
            for _ in range(n):
                endpoint = self.endpoint
                try:
                    return self._call_endpoint(self._client(endpoint), method, body)
                except _EndpointDown as exc:
                    failures.append(f"{endpoint}: {exc}")
                    self._current = (self._current + 1) % n
                    log.warning(
                        "etcd_endpoint_failed",
                        endpoint=endpoint,
                        error=str(exc),
                        next_endpoint=self.endpoint,
                    )
            raise LockError(
                "unavailable",
                "no etcd endpoint answered: " + "; ".join(failures),
                hint="check that etcd runs and the endpoints, TLS files and firewall are right",
            )

    def _call_endpoint(
        self, client: Etcd3Client, method: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        if self.settings.username is not None and self._token is None:
            self._authenticate(client)
        try:
            return self._post(client, method, body)
        except _TokenRejected:
            # Simple tokens expire and are forgotten by a restarted member: log in again.
            self._token = None
            self._authenticate(client)
            try:
                return self._post(client, method, body)
            except _TokenRejected as exc:
                raise _EndpointDown(f"auth token rejected twice: {exc}") from None

    def _authenticate(self, client: Etcd3Client) -> None:
        client.session.headers.pop("Authorization", None)
        try:
            answer = self._post(
                client,
                "auth/authenticate",
                {"name": self.settings.username, "password": self.settings.password},
            )
        except _TokenRejected as exc:
            raise _EndpointDown(str(exc)) from None
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise _EndpointDown("authenticate answered no token")
        self._token = token
        log.debug("etcd_authenticated", endpoint=_base_url(client), user=self.settings.username)

    def _post(self, client: Etcd3Client, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        if self._token is not None:
            client.session.headers["Authorization"] = self._token
        try:
            answer = client.post(client.get_url(method), json=body)
        except Etcd3Exception as exc:
            code, message = _grpc_error(exc)
            if code == _GRPC_UNAUTHENTICATED:
                raise _TokenRejected(message) from None
            if code == _GRPC_INVALID_ARGUMENT and "auth" in message and "old" in message:
                raise _TokenRejected(message) from None  # auth store changed since login
            if code in (_GRPC_INVALID_ARGUMENT, _GRPC_PERMISSION_DENIED):
                # The same answer from every member: wrong credentials, no
                # credentials where auth is on, or a user without rights.
                raise LockError(
                    "refused",
                    f"etcd at {_base_url(client)} refused {method}: {message}",
                    hint="check the etcd username, password and the user's role",
                ) from None
            if code == _GRPC_OUT_OF_RANGE:
                raise LockError("unavailable", f"etcd {method}: {message}") from None
            raise _EndpointDown(message or type(exc).__name__) from None
        except ValueError as exc:  # a 200 that is not JSON: not an etcd gateway
            raise _EndpointDown(f"not JSON: {exc}") from None
        except RecursionError:  # requests' json() on an answer nested thousands deep
            raise _EndpointDown("not JSON: nested too deep") from None
        except OSError as exc:  # requests errors that etcd3gw does not wrap
            raise _EndpointDown(str(exc)) from None
        if not isinstance(answer, dict):
            raise _EndpointDown("answer is not a JSON object")
        return answer

    # ---- the few KV calls the lock needs ------------------------------------------------------

    def range(self, key: str, *, revision: int | None = None) -> KeyValue | None:
        """The key (at ``revision``, if given), or None."""
        kvs = self._range(_range(key)["request_range"], revision)
        return kvs[0] if kvs else None

    def range_prefix(self, prefix: str, *, revision: int | None = None) -> list[KeyValue]:
        """Every key that starts with ``prefix`` (at ``revision``), in key order."""
        return self._range(_range(prefix, prefix=True)["request_range"], revision)

    def _range(self, body: dict[str, Any], revision: int | None) -> list[KeyValue]:
        if revision is not None:
            body["revision"] = str(revision)
        return _kvs(self.call("kv/range", body))

    def txn(
        self,
        compare: Sequence[Mapping[str, Any]],
        success: Sequence[Mapping[str, Any]],
        failure: Sequence[Mapping[str, Any]] = (),
    ) -> TxnResult:
        answer = self.call(
            "kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        header = answer.get("header")
        revision = _int(header.get("revision") if isinstance(header, dict) else None)
        ranges: list[list[KeyValue]] = []
        responses = answer.get("responses")
        for r in responses if isinstance(responses, list) else []:
            if isinstance(r, dict) and isinstance(r.get("response_range"), dict):
                ranges.append(_kvs(r["response_range"]))
        return TxnResult(bool(answer.get("succeeded", False)), revision, tuple(ranges))


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction
    ranges: tuple[list[KeyValue], ...]  # the answers of its range requests, in order


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _int(value: Any) -> int:
    # The gateway writes int64 as a JSON string and omits zeros.
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise LockError("malformed", f"etcd answered a bad number: {value!r}") from None


def _kvs(answer: Mapping[str, Any]) -> list[KeyValue]:
    out = []
    kvs = answer.get("kvs")
    for kv in kvs if isinstance(kvs, list) else []:
        try:
            out.append(
                KeyValue(
                    key=base64.b64decode(kv["key"]).decode("utf-8", "replace"),
                    value=base64.b64decode(kv.get("value", "")),
                    create_revision=_int(kv.get("create_revision")),
                    mod_revision=_int(kv.get("mod_revision")),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise LockError("malformed", f"etcd answered a bad key-value: {kv!r}"[:300]) from None
    return out


def _put(key: str, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value)}}


def _delete(key: str, *, prefix: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        op["range_end"] = _b64(_prefix_end(key))
    return {"request_delete_range": op}


def _range(key: str, *, prefix: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        op["range_end"] = _b64(_prefix_end(key))
    return {"request_range": op}


def _prefix_end(key: str) -> bytes:
    raw = bytearray(key.encode())
    raw[-1] += 1  # our prefixes end in "/", never 0xff
    return bytes(raw)


def _mod_revision_is(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def _absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


# ---- the lock ----------------------------------------------------------------------------------


class EtcdLock:
    """A group's slot in airlock's etcd semaphore (a :class:`policies.lock.RebootLock`)."""

    name = "etcd"

    def __init__(
        self,
        client: EtcdClient,
        group: str,
        slots: int,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.group = check_group(group)
        self.slots = check_slots(slots)
        self.key = semaphore_key(group)
        self.clock = clock or SystemClock()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        settings = client.settings
        self._attempts = settings.conflict_retries
        self._backoff_s = settings.backoff_s
        self._backoff_max_s = settings.backoff_max_s

    @classmethod
    def from_settings(
        cls, settings: EtcdSettings, group: str, slots: int, *, clock: Clock | None = None
    ) -> EtcdLock:
        return cls(EtcdClient(settings), group, slots, clock=clock)

    # ---- RebootLock ----------------------------------------------------------------------------

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        """``version`` is not checked here: etcd-lock agents read the group's failed
        versions themselves (policies.failed), before asking and once granted."""
        check_holder(holder)
        sem, rev = self._read_or_create()
        for attempt in range(self._attempts):
            if sem.holds(holder):
                log.debug("etcd_lock_already_held", group=self.group, holder=holder)
                return True
            if sem.free_slots == 0:
                log.info(
                    "etcd_lock_no_free_slot",
                    group=self.group,
                    holder=holder,
                    total_slots=sem.total_slots,
                    holders=len(sem.holders),
                )
                return False
            done, sem, rev = self._swap(rev, sem.with_holder(holder), self._took(holder))
            if done:
                log.info("etcd_lock_acquired", group=self.group, holder=holder, revision=rev)
                return True
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("acquire")

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        """``failed`` is not taken along: etcd-lock agents record it themselves first."""
        self._remove(check_holder(holder), event="etcd_lock_released")
        return False

    # ---- admin ---------------------------------------------------------------------------------

    def status(self) -> SemaphoreStatus | None:
        """The semaphore and each holder's start time, read atomically; None if absent."""
        result = self.client.txn(
            [], [_range(self.key), _range(holders_prefix(self.group), prefix=True)]
        )
        if len(result.ranges) != 2:
            raise LockError("malformed", "etcd answered a transaction without its reads")
        sem_kvs, since_kvs = result.ranges
        if not sem_kvs:
            return None
        sem = Semaphore.decode(sem_kvs[0].value, self.key)
        prefix = holders_prefix(self.group)
        since = {
            urllib.parse.unquote(kv.key[len(prefix) :]): _decode_since(kv.value) for kv in since_kvs
        }
        return SemaphoreStatus(
            group=self.group,
            key=self.key,
            total_slots=sem.total_slots,
            holders=tuple(Holder(h, since.get(h)) for h in sem.holders),
            mod_revision=sem_kvs[0].mod_revision,
        )

    def force_lock(self, holder: str) -> None:
        """Make ``holder`` hold a slot even when none is free (an admin's override)."""
        check_holder(holder)
        sem, rev = self._read_or_create()
        for attempt in range(self._attempts):
            if sem.holds(holder):
                return
            done, sem, rev = self._swap(rev, sem.with_holder(holder), self._took(holder))
            if done:
                log.warning(
                    "etcd_lock_forced",
                    group=self.group,
                    holder=holder,
                    holders=len(sem.holders),
                    total_slots=sem.total_slots,
                )
                return
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("force_lock")

    def unlock(self, holder: str) -> bool:
        """Take ``holder``'s slot away (a dead host's); True if it held one."""
        if not holder:
            raise LockError("bad_argument", "empty holder id")
        return self._remove(holder, event="etcd_lock_unlocked")

    def set_max(self, slots: int) -> int | None:
        """Change total_slots in place; returns the old count (None: the semaphore was new).

        Holders beyond a lowered count keep their slots; nobody new gets one
        until enough of them have released.
        """
        check_slots(slots)
        sem, rev, created = self._read_or_create_with(slots)
        if created:
            log.info("etcd_lock_max_set", group=self.group, old=None, new=slots)
            return None
        for attempt in range(self._attempts):
            old = sem.total_slots
            if old == slots:
                return old
            done, sem, rev = self._swap(rev, sem.with_slots(slots), [])
            if done:
                log.info(
                    "etcd_lock_max_set",
                    group=self.group,
                    old=old,
                    new=slots,
                    holders=len(sem.holders),
                )
                return old
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("set_max")

    def repair(self, slots: int, *, force: bool = False) -> None:
        """Replace a malformed (or missing) semaphore by an empty one with ``slots`` slots.

        The only operation that overwrites a semaphore it cannot read. A
        well-formed one is left alone unless ``force`` (which drops its holders).
        """
        check_slots(slots)
        for attempt in range(self._attempts):
            kv = self.client.range(self.key)
            if kv is not None and not force:
                try:
                    Semaphore.decode(kv.value, self.key)
                except LockError:
                    pass
                else:
                    raise LockError(
                        "bad_argument",
                        f"etcd key {self.key} is well-formed: nothing to repair",
                        hint="use set-max and unlock, or repair with force",
                    )
            guard = _absent(self.key) if kv is None else _mod_revision_is(self.key, kv.mod_revision)
            result = self.client.txn(
                [guard],
                [
                    _put(self.key, Semaphore(slots).encode()),
                    _delete(holders_prefix(self.group), prefix=True),
                ],
            )
            if result.succeeded:
                log.warning(
                    "etcd_lock_repaired",
                    group=self.group,
                    key=self.key,
                    total_slots=slots,
                    old_value=None if kv is None else kv.value[:200].decode("utf-8", "replace"),
                )
                return
            self._backoff(attempt)
        raise self._conflict("repair")

    # ---- internals -----------------------------------------------------------------------------

    def _took(self, holder: str) -> list[dict[str, Any]]:
        return [_put(holder_key(self.group, holder), _encode_since(self.clock.now().timestamp()))]

    def _remove(self, holder: str, *, event: str) -> bool:
        kv = self.client.range(self.key)
        if kv is None:
            log.info("etcd_lock_not_held", group=self.group, holder=holder, semaphore="absent")
            return False
        sem, rev = Semaphore.decode(kv.value, self.key), kv.mod_revision
        for attempt in range(self._attempts):
            if not sem.holds(holder):
                log.info("etcd_lock_not_held", group=self.group, holder=holder)
                return False
            done, sem, rev = self._swap(
                rev, sem.without_holder(holder), [_delete(holder_key(self.group, holder))]
            )
            if done:
                log.info(event, group=self.group, holder=holder, revision=rev)
                return True
            sem, rev = self._settle(attempt, sem, rev)
        raise self._conflict("release")

    def _read_or_create(self) -> tuple[Semaphore, int]:
        sem, rev, _ = self._read_or_create_with(self.slots)
        return sem, rev

    def _read_or_create_with(self, slots: int) -> tuple[Semaphore, int, bool]:
        """The semaphore and its mod_revision, created with ``slots`` if missing."""
        kv = self.client.range(self.key)
        if kv is not None:
            return Semaphore.decode(kv.value, self.key), kv.mod_revision, False
        fresh = Semaphore(slots)
        result = self.client.txn(
            [_absent(self.key)], [_put(self.key, fresh.encode())], [_range(self.key)]
        )
        if result.succeeded:
            log.info("etcd_lock_semaphore_created", group=self.group, key=self.key, slots=slots)
            return fresh, result.revision, True
        current = result.ranges[0] if result.ranges else []
        if not current:  # created and deleted again in between: a very busy admin
            raise self._conflict("create")
        return Semaphore.decode(current[0].value, self.key), current[0].mod_revision, False

    def _swap(
        self, rev: int, new: Semaphore, also: list[dict[str, Any]]
    ) -> tuple[bool, Semaphore, int]:
        """Write ``new`` if the key is still at ``rev``: (True, new, rev after) or (False, now)."""
        result = self.client.txn(
            [_mod_revision_is(self.key, rev)],
            [_put(self.key, new.encode()), *also],
            [_range(self.key)],
        )
        if result.succeeded:
            return True, new, result.revision
        current = result.ranges[0] if result.ranges else []
        log.debug("etcd_lock_conflict", group=self.group, expected_revision=rev)
        if not current:
            # Deleted under us: start from scratch (re-created with our slot count).
            sem, new_rev = self._read_or_create()
            return False, sem, new_rev
        return False, Semaphore.decode(current[0].value, self.key), current[0].mod_revision

    def _settle(self, attempt: int, sem: Semaphore, rev: int) -> tuple[Semaphore, int]:
        """What to retry with after a lost compare-and-swap.

        The first retry goes at once with the value the failed transaction
        returned (it is fresh). Later ones back off first and then read the key
        again: a value read before a sleep is stale after it, and retrying with
        it loses again under contention (bench/fleet_rollout measured releases
        starving for seconds that way).
        """
        if attempt == 0:
            return sem, rev
        self._backoff(attempt)
        kv = self.client.range(self.key)
        if kv is None:
            return sem, rev  # deleted meanwhile: the next swap fails and starts over
        return Semaphore.decode(kv.value, self.key), kv.mod_revision

    def _backoff(self, attempt: int) -> None:
        cap = min(self._backoff_max_s, self._backoff_s * 2**attempt)
        self._sleep(self._rng.uniform(0, cap))

    def _conflict(self, op: str) -> LockError:
        log.warning("etcd_lock_conflict_gave_up", group=self.group, op=op, attempts=self._attempts)
        return LockError(
            "conflict",
            f"{op}: etcd key {self.key} kept changing ({self._attempts} attempts)",
            hint="too many hosts changing the semaphore at once; it is retried later",
        )
