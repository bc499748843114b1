"""The etcd client: how to reach etcd (:class:`EtcdSettings`) and the v3 JSON
gateway calls over the configured endpoints (:class:`EtcdClient`).

etcd3gw talks to one endpoint; :class:`EtcdClient` keeps the configured list
in order and moves to the next one when a request fails to connect, times out
or gets a 5xx, with a per-request timeout. Every transaction the callers send
is a compare-and-swap, so retrying one whose answer was lost is safe: it
either finds its own change already made or fails its compare.

The requests themselves are plain data (:mod:`policies.etcdtxn`).
"""

from __future__ import annotations

import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import structlog
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from policies.etcdtxn import (
    MAX_VALUE_BYTES,
    KeyValue,
    TxnResult,
    gateway_int,
    key_values,
    request_range,
)
from policies.rebootlock import parse_etcd_endpoint
from updater.errors import ConfigError, LockError
from updater.jsonutil import loads as load_json

log = structlog.get_logger(__name__)

API_PATH = "/v3/"  # etcd >= 3.4; pinned so no /version discovery round trip is needed


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
        kvs = self._range(request_range(key)["request_range"], revision)
        return kvs[0] if kvs else None

    def range_prefix(self, prefix: str, *, revision: int | None = None) -> list[KeyValue]:
        """Every key that starts with ``prefix`` (at ``revision``), in key order."""
        return self._range(request_range(prefix, prefix=True)["request_range"], revision)

    def _range(self, body: dict[str, Any], revision: int | None) -> list[KeyValue]:
        if revision is not None:
            body["revision"] = str(revision)
        return key_values(self.call("kv/range", body))

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
        revision = gateway_int(header.get("revision") if isinstance(header, dict) else None)
        ranges: list[list[KeyValue]] = []
        responses = answer.get("responses")
        for r in responses if isinstance(responses, list) else []:
            if isinstance(r, dict) and isinstance(r.get("response_range"), dict):
                ranges.append(key_values(r["response_range"]))
        return TxnResult(bool(answer.get("succeeded", False)), revision, tuple(ranges))
