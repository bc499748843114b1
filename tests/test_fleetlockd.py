"""The FleetLock server over real etcd: our own client, requests shaped exactly as
Zincati sends them, etcd-lock agents on the same semaphore, hostile requests,
etcd down, TLS, and `updatectl fleetlock serve` as a process."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from structlog.testing import capture_logs

from devtools.etcd import EtcdNode, free_port
from devtools.tls import TLSFiles, make_tls
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.failed import FailedRecord, FailedVersions
from policies.fleetlock import FleetLock, FleetLockError
from policies.fleetlockd import FleetLockServer, ServerSettings, running
from policies.fleetlockproto import KINDS, MAX_REQUEST_BYTES, ProtocolError, parse_body
from policies.fleetlockservice import FleetLockService, StoredFailedVersions
from policies.rebootlock import FailureReport
from tests.conftest import updatectl
from updater.errors import LockError, RefusedError

T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)
ZINCATI_ID = "c988d2509fdf4cdcbed39037c56406fb"  # node_uuid.lower_hex(): 32 hex digits


class StepClock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.when = T0

    def now(self) -> datetime:
        return self.when

    def monotonic(self) -> float:
        return (self.when - T0).total_seconds()


class Blocked:
    """A GroupFailedVersions with fixed records: what part 2's etcd records will answer."""

    def __init__(self, by_group: dict[str, set[str]]) -> None:
        self.by_group = by_group

    def blocked(self, group: str) -> Collection[str]:
        return self.by_group.get(group, set())

    def record(self, group: str, version: str, host: str, kind: str) -> None:
        raise AssertionError("nothing is recorded here")


@contextlib.contextmanager
def serving(
    client: EtcdClient,
    groups: dict[str, int],
    *,
    tls: TLSFiles | None = None,
    failed: Blocked | None = None,
    clock: StepClock | None = None,
    request_timeout_s: float = 30.0,
) -> Iterator[FleetLockServer]:
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        tls_cert=tls.server_cert if tls else None,
        tls_key=tls.server_key if tls else None,
        groups=groups,
        request_timeout_s=request_timeout_s,
    )
    service = FleetLockService(client, groups, failed=failed, clock=clock or StepClock())
    with running(FleetLockServer(settings, service), poll_interval_s=0.01) as server:
        yield server
    assert server.socket.fileno() == -1  # closed


@pytest.fixture
def server(client: EtcdClient, group: str) -> Iterator[FleetLockServer]:
    with serving(client, {group: 2}) as srv:
        yield srv


def holders(client: EtcdClient, group: str) -> list[str]:
    st = EtcdLock(client, group, 1).status()
    return [] if st is None else [h.id for h in st.holders]


def zincati_post(url: str, endpoint: str, client_id: str, group: str) -> requests.Response:
    """A request as Zincati's fleet_lock client sends it: reqwest with only the
    protocol header set, the body `serde_json::to_string_pretty` of client_params
    (id, then group), no Content-Type, the endpoint joined to the base URL."""
    body = json.dumps({"client_params": {"id": client_id, "group": group}}, indent=2)
    with requests.Session() as session:
        session.headers.clear()  # reqwest sends no User-Agent or Accept-Encoding of its own
        return session.post(
            f"{url}/v1/{endpoint}",
            data=body.encode(),
            headers={"fleet-lock-protocol": "true", "accept": "*/*"},
            timeout=10,
        )


def raw(url: str, request: bytes, *, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, headers, body


# ---- our own client ----------------------------------------------------------------------------


def test_our_client_takes_and_gives_back_slots_in_etcd(
    server: FleetLockServer, client: EtcdClient, group: str
) -> None:
    lock = FleetLock(server.url, group, timeout_s=10)
    try:
        assert lock.acquire("host-a") is True
        assert lock.acquire("host-b") is True
        assert lock.acquire("host-c") is False  # 409 failed_lock_semaphore_full: "wait"
        assert lock.acquire("host-a") is True  # recursive
        assert holders(client, group) == ["host-a", "host-b"]
        lock.release("host-a")
        lock.release("host-a")  # releasing what is not held is success
        assert holders(client, group) == ["host-b"]
        assert lock.acquire("host-c") is True
        assert holders(client, group) == ["host-b", "host-c"]
    finally:
        lock.close()


def test_slots_are_honoured_under_a_crowd(server: FleetLockServer, group: str) -> None:
    results: dict[str, bool] = {}

    def ask(i: int) -> None:
        lock = FleetLock(server.url, group, timeout_s=30)
        try:
            results[f"h{i}"] = lock.acquire(f"h{i}")
        finally:
            lock.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    assert sum(results.values()) == 2  # slots=2, whatever the interleaving


def test_an_etcd_lock_agent_and_a_fleetlock_client_share_one_semaphore(
    client: EtcdClient, group: str
) -> None:
    agent = EtcdLock(client, group, 1)  # what an agent with [reboot] lock = "etcd" uses
    with serving(client, {group: 1}) as srv:
        fleet = FleetLock(srv.url, group, timeout_s=10)
        try:
            assert agent.acquire("etcd-host")
            assert fleet.acquire("fleetlock-host") is False  # the agent holds the slot
            agent.release("etcd-host")
            assert fleet.acquire("fleetlock-host") is True
            assert agent.acquire("etcd-host") is False  # now the FleetLock client holds it
            assert holders(client, group) == ["fleetlock-host"]
            fleet.release("fleetlock-host")
            assert agent.acquire("etcd-host")
        finally:
            fleet.close()


# ---- Zincati's requests ------------------------------------------------------------------------


def test_requests_shaped_as_zincati_sends_them(server: FleetLockServer, group: str) -> None:
    ok = zincati_post(server.url, "pre-reboot", ZINCATI_ID, group)
    assert (ok.status_code, ok.content) == (200, b"")
    assert "content-type" not in {k.lower() for k in ok.request.headers}
    assert zincati_post(server.url, "pre-reboot", ZINCATI_ID, group).status_code == 200
    assert zincati_post(server.url, "pre-reboot", "b" * 32, group).status_code == 200
    full = zincati_post(server.url, "pre-reboot", "c" * 32, group)
    assert full.status_code == 409
    doc = full.json()  # what Zincati's RemoteJsonError decodes: two non-empty strings
    assert doc["kind"] == "failed_lock_semaphore_full"
    assert isinstance(doc["value"], str) and "2 slots" in doc["value"]
    done = zincati_post(server.url, "steady-state", ZINCATI_ID, group)
    assert (done.status_code, done.content) == (200, b"")
    assert zincati_post(server.url, "pre-reboot", "c" * 32, group).status_code == 200


def test_a_body_with_our_version_field_and_without_it(client: EtcdClient, group: str) -> None:
    failed = Blocked({group: {"2.0.0"}})
    with serving(client, {group: 2}, failed=failed) as srv:
        lock = FleetLock(srv.url, group, timeout_s=10)
        try:
            assert lock.acquire("good", version="2.0.1") is True
            with capture_logs() as logs, pytest.raises(RefusedError) as exc:
                lock.acquire("bad", version="2.0.0")
            assert exc.value.kind == "version_blocked" and "2.0.0" in exc.value.message
            (answer,) = [e for e in logs if e["event"] == "fleetlock_request_failed"]
            assert (answer["status"], answer["protocol_kind"]) == (403, "version_blocked")
            assert holders(client, group) == ["good"]
            # Zincati sends no version: it cannot be refused for one
            assert zincati_post(srv.url, "pre-reboot", ZINCATI_ID, group).status_code == 200
            status = requests.get(f"{srv.url}/v1/status", timeout=10).json()
            assert status["groups"][0]["blocked_versions"] == ["2.0.0"]
        finally:
            lock.close()


def test_a_blocklist_that_cannot_answer_refuses(client: EtcdClient, group: str) -> None:
    class Broken:
        def blocked(self, group: str) -> Collection[str]:
            raise LockError("unavailable", "etcd is gone")

        def record(self, group: str, version: str, host: str, kind: str) -> None:
            raise LockError("unavailable", "etcd is gone")

    with serving(client, {group: 2}) as srv:
        srv.service.failed = Broken()
        lock = FleetLock(srv.url, group, timeout_s=10)
        try:
            with pytest.raises(FleetLockError) as exc:
                lock.acquire("h", version="1.0")
            assert (exc.value.status, exc.value.protocol_kind) == (503, "etcd_unavailable")
            assert lock.acquire("h") is True  # without a version, nothing to look up
        finally:
            lock.close()


# ---- status and logs -----------------------------------------------------------------------------


def test_status_and_logs_give_the_holders_ages(client: EtcdClient, group: str) -> None:
    clock = StepClock()
    agent = EtcdLock(client, group, 2, clock=clock)
    with serving(client, {group: 2}, clock=clock) as srv:
        lock = FleetLock(srv.url, group, timeout_s=10)
        try:
            with capture_logs() as logs:
                assert agent.acquire("etcd-host")
                assert lock.acquire("fl-host")
                clock.when = T0 + timedelta(seconds=90)
                assert lock.acquire("fl-host")  # recursive: held for 90 s already
                answer = requests.get(f"{srv.url}/v1/status", timeout=10)
                lock.release("fl-host")
        finally:
            lock.close()
    assert answer.status_code == 200
    doc = answer.json()
    assert "not FleetLock" in doc["protocol"]
    (g,) = doc["groups"]
    assert (g["group"], g["total_slots"], g["free_slots"]) == (group, 2, 0)
    assert {(h["id"], h["age_s"]) for h in g["holders"]} == {("etcd-host", 90), ("fl-host", 90)}
    locked = [e for e in logs if e["event"] == "fleetlock_locked"]
    assert [(e["holder"], e["held_s"]) for e in locked] == [("fl-host", 0), ("fl-host", 90)]
    (unlocked,) = [e for e in logs if e["event"] == "fleetlock_unlocked"]
    assert (unlocked["holder"], unlocked["held_s"], unlocked["group"]) == ("fl-host", 90, group)


def test_status_of_a_group_without_a_semaphore(server: FleetLockServer, group: str) -> None:
    doc = requests.get(f"{server.url}/v1/status", timeout=10).json()
    assert doc["groups"][0] == {
        "group": group,
        "key": f"com.coreos.airlock/groups/{group}/v1/semaphore",
        "total_slots": None,
        "holders": [],
        "blocked_versions": [],
    }
    head = requests.head(f"{server.url}/v1/status", timeout=10)
    assert (head.status_code, head.content) == (200, b"")


# ---- hostile requests --------------------------------------------------------------------------


def _post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _params(**params: object) -> bytes:
    return json.dumps({"client_params": params}).encode()


PROTO = "fleet-lock-protocol: true"
P = "/v1/pre-reboot"
H = "hostile"  # the group of the hostile requests (Content-Length is computed with it)
LONG = "a" * 70000
NO_LENGTH = f"POST {P} HTTP/1.1\r\nHost: x\r\n{PROTO}\r\n\r\n".encode()


def pre(**params: object) -> bytes:
    return _post(P, _params(**params), PROTO)


HOSTILE: list[tuple[str, bytes, int, str]] = [
    (
        "no protocol header",
        _post(P, _params(id="i", group=H)),
        400,
        "missing_protocol_header",
    ),
    (
        "protocol header false",
        _post(P, _params(id="i", group=H), "fleet-lock-protocol: false"),
        400,
        "missing_protocol_header",
    ),
    (
        "protocol header twice",
        _post(P, _params(id="i", group=H), PROTO, PROTO),
        400,
        "missing_protocol_header",
    ),
    (
        "GET a lock endpoint",
        b"GET /v1/pre-reboot HTTP/1.1\r\nHost: x\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    (
        "PUT with a body",
        _post(P, _params(id="i", group=H), PROTO).replace(b"POST", b"PUT", 1),
        405,
        "method_not_allowed",
    ),
    (
        "a method nobody knows",
        b"BREW /v1/pre-reboot HTTP/1.1\r\nHost: x\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    (
        "unknown path",
        _post("/v1/reboot-now", _params(id="i", group=H), PROTO),
        404,
        "not_found",
    ),
    (
        "path under a base",
        _post("/base" + P, _params(id="i", group=H), PROTO),
        404,
        "not_found",
    ),
    (
        "oversize body",
        _post(P, b"{" + b" " * (MAX_REQUEST_BYTES + 1) + b"}", PROTO),
        413,
        "body_too_large",
    ),
    (
        "a huge Content-Length",
        _post(P, b"", PROTO, "Content-Length: 99999999999999999999"),
        413,
        "body_too_large",
    ),
    (
        "chunked",
        _post(P, b"5\r\nhello\r\n0\r\n\r\n", PROTO, "Transfer-Encoding: chunked"),
        411,
        "length_required",
    ),
    ("no Content-Length", NO_LENGTH, 411, "length_required"),
    ("bad Content-Length", _post(P, b"{}", PROTO, "Content-Length: -2"), 400, "bad_request"),
    ("not JSON", _post(P, b"{client_params:", PROTO), 400, "invalid_json"),
    ("not UTF-8", _post(P, b'{"\xff": 1}', PROTO), 400, "invalid_json"),
    ("NaN", _post(P, b'{"client_params": NaN}', PROTO), 400, "invalid_json"),
    ("nested deep", _post(P, b"[" * 5000 + b"]" * 5000, PROTO), 400, "invalid_json"),
    ("a JSON array", _post(P, b"[1, 2]", PROTO), 400, "invalid_client_params"),
    ("no client_params", _post(P, b'{"id": "x"}', PROTO), 400, "invalid_client_params"),
    ("airlock's old field", pre(node_uuid="x", group=H), 400, "invalid_id"),
    ("empty id", pre(id="", group=H), 400, "invalid_id"),
    ("id a number", pre(id=7, group=H), 400, "invalid_id"),
    ("id too long", pre(id="x" * 257, group=H), 400, "invalid_id"),
    ("id with a newline", pre(id="a\nb", group=H), 400, "invalid_id"),
    ("group a path", pre(id="x", group="../" + H), 400, "invalid_group"),
    ("empty group", pre(id="x", group=""), 400, "invalid_group"),
    ("no group", _post("/v1/steady-state", _params(id="keeper"), PROTO), 400, "invalid_group"),
    ("unknown group", pre(id="x", group="other"), 400, "unknown_group"),
    ("bad version", pre(id="x", group=H, version="1.0; rm"), 400, "invalid_version"),
    ("version a number", pre(id="x", group=H, version=2), 400, "invalid_version"),
    ("garbage request line", b"\x16\x03\x01 hello\r\n\r\n", 400, "bad_request"),
    ("HTTP/0.9", b"GET /v1/status\r\n", 400, "bad_request"),
    (
        "an endless header",
        f"POST {P} HTTP/1.1\r\nX: {LONG}\r\n\r\n".encode(),
        431,
        "headers_too_large",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "kind"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_requests_get_a_clear_error_and_change_nothing(
    client: EtcdClient, request_bytes: bytes, status: int, kind: str
) -> None:
    keeper = EtcdLock(client, H, 2)
    assert keeper.acquire("keeper")
    before = keeper.status()
    with serving(client, {H: 2}) as srv:
        got, headers, body = raw(srv.url, request_bytes)
        after = keeper.status()
        assert zincati_post(srv.url, "pre-reboot", ZINCATI_ID, H).status_code == 200  # serving
        assert zincati_post(srv.url, "steady-state", ZINCATI_ID, H).status_code == 200
    assert got == status == KINDS[kind]
    doc = json.loads(body)
    assert doc["kind"] == kind and isinstance(doc["value"], str) and doc["value"]
    assert headers["content-type"] == "application/json"
    if status == 405:
        assert headers["allow"] == "POST"
    assert after is not None and before is not None
    assert (after.holders, after.mod_revision) == (before.holders, before.mod_revision)


def test_a_client_that_sends_nothing_holds_up_nobody(client: EtcdClient, group: str) -> None:
    with serving(client, {group: 2}, request_timeout_s=1.0) as srv:
        host, port = srv.server_address[0], srv.server_address[1]
        with socket.create_connection((str(host), port)) as idle:
            idle.sendall(b"POST /v1/pre-reboot HTTP/1.1\r\n")  # and then nothing
            started = time.monotonic()
            assert zincati_post(srv.url, "pre-reboot", ZINCATI_ID, group).status_code == 200
            assert time.monotonic() - started < 1.0
            idle.settimeout(5)
            assert idle.recv(65536) == b""  # the server hung up after its read timeout


def test_parse_body_accepts_unknown_fields_and_refuses_bad_ones() -> None:
    params = parse_body(b'{"client_params": {"id": "a", "group": "g", "zone": 3}, "x": []}')
    assert (params.id, params.group, params.version) == ("a", "g", None)
    with pytest.raises(ProtocolError) as exc:
        parse_body(b'{"client_params": {"id": "a", "group": "g", "version": ""}}')
    assert exc.value.kind == "invalid_version"


# ---- etcd down ---------------------------------------------------------------------------------


def test_etcd_down_is_a_5xx_with_a_kind_and_the_server_lives_on(group: str) -> None:
    with EtcdNode() as node:
        c = EtcdClient(EtcdSettings(endpoints=node.endpoints, timeout_s=2))
        try:
            with serving(c, {group: 1}) as srv:
                lock = FleetLock(srv.url, group, timeout_s=20)
                try:
                    assert lock.acquire("before")
                    node.close()  # every member stopped
                    for _ in range(2):  # the same answer again: nothing broke
                        with pytest.raises(FleetLockError) as exc:
                            lock.acquire("during")
                        assert (exc.value.status, exc.value.protocol_kind) == (
                            503,
                            "etcd_unavailable",
                        )
                        assert exc.value.kind == "refused"
                    with pytest.raises(FleetLockError) as exc:
                        lock.release("before")
                    assert exc.value.protocol_kind == "etcd_unavailable"
                    answer = zincati_post(srv.url, "pre-reboot", ZINCATI_ID, group)
                    assert answer.status_code == 503
                    assert answer.json()["kind"] == "etcd_unavailable"
                    status = requests.get(f"{srv.url}/v1/status", timeout=20)
                    assert (status.status_code, status.json()["kind"]) == (503, "etcd_unavailable")
                finally:
                    lock.close()
        finally:
            c.close()


def test_a_malformed_semaphore_is_a_500_and_is_left_alone(
    server: FleetLockServer, etcd: EtcdNode, client: EtcdClient, group: str
) -> None:
    key = f"com.coreos.airlock/groups/{group}/v1/semaphore"
    etcd.etcdctl("put", key, "not json")
    answer = zincati_post(server.url, "pre-reboot", ZINCATI_ID, group)
    assert (answer.status_code, answer.json()["kind"]) == (500, "semaphore_malformed")
    kv = client.range(key)
    assert kv is not None and kv.value == b"not json"


# ---- TLS ---------------------------------------------------------------------------------------


def test_tls(client: EtcdClient, group: str, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    with serving(client, {group: 1}, tls=tls, request_timeout_s=2.0) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        host, port = srv.server_address[0], srv.server_address[1]
        # a client that connects and never says hello holds up nobody (handshakes are per thread)
        with socket.create_connection((str(host), port)):
            lock = FleetLock(srv.url, group, timeout_s=10, ca_file=tls.ca_cert)
            try:
                assert lock.acquire("tls-host")
                assert holders(client, group) == ["tls-host"]
                lock.release("tls-host")
            finally:
                lock.close()
        untrusting = FleetLock(srv.url, group, timeout_s=10)  # the system CAs: not ours
        try:
            with pytest.raises(FleetLockError) as exc:
                untrusting.acquire("h")
            assert exc.value.protocol_kind == "tls_failed"
        finally:
            untrusting.close()
        plain = FleetLock(srv.url.replace("https", "http"), group, timeout_s=10)
        try:
            with pytest.raises(FleetLockError):
                plain.acquire("h")
        finally:
            plain.close()
        ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
        with (
            socket.create_connection((str(host), port)) as s,
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as conn,
        ):
            assert conn.version() in ("TLSv1.2", "TLSv1.3")
    assert holders(client, group) == []


# ---- the command -------------------------------------------------------------------------------


def test_updatectl_fleetlock_serve(
    etcd: EtcdNode, client: EtcdClient, group: str, tmp_path: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    argv = [sys.executable, "-m", "updater.cli", "--config", str(cfg), "fleetlock", "serve"]
    argv += ["--listen", f"127.0.0.1:{port}", "--etcd", etcd.endpoint, "--group", f"{group}=2"]
    argv += ["--log", "json"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line == f"FleetLock serving on http://127.0.0.1:{port}\n", proc.stderr
        url = f"http://127.0.0.1:{port}"
        assert zincati_post(url, "pre-reboot", ZINCATI_ID, group).status_code == 200
        assert zincati_post(url, "pre-reboot", "b" * 32, group).status_code == 200
        assert zincati_post(url, "pre-reboot", "c" * 32, group).status_code == 409
        assert holders(client, group) == sorted([ZINCATI_ID, "b" * 32])
        assert zincati_post(url, "steady-state", ZINCATI_ID, group).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    events = [
        json.loads(ln) for ln in proc.stderr.read().decode().splitlines() if ln.startswith("{")
    ]
    names = [e["event"] for e in events]
    assert names[0] == "fleetlock_serving" and names[-1] == "fleetlock_stopping"
    unlocked = [e for e in events if e["event"] == "fleetlock_unlocked"]
    assert [e["holder"] for e in unlocked] == [ZINCATI_ID]


def ours_post(url: str, endpoint: str, params: dict[str, str]) -> requests.Response:
    """Our client's request: client_params with our extra fields."""
    return requests.post(
        f"{url}/v1/{endpoint}",
        data=json.dumps({"client_params": params}).encode(),
        headers={"fleet-lock-protocol": "true"},
        timeout=10,
    )


@pytest.mark.parametrize(("flag", "threshold"), [([], 2), (["--max-failures", "1"], 1)])
def test_updatectl_fleetlock_serve_uses_the_failed_version_store(
    etcd: EtcdNode,
    client: EtcdClient,
    group: str,
    tmp_path: Path,
    flag: list[str],
    threshold: int,
) -> None:
    """[reboot] max_failures (here 2), or --max-failures, as the agents of the group use."""
    port = free_port()
    cfg = tmp_path / "updater.toml"
    cfg.write_text("[reboot]\nmax_failures = 2\n")
    argv = [sys.executable, "-m", "updater.cli", "--config", str(cfg), "fleetlock", "serve"]
    argv += ["--listen", f"127.0.0.1:{port}", "--etcd", etcd.endpoint, "--group", group, *flag]
    argv += ["--log", "json"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().startswith("FleetLock serving"), proc.stderr

        def blocked() -> list[str]:
            doc = requests.get(f"{url}/v1/status", timeout=10).json()
            return list(doc["groups"][0]["blocked_versions"])

        for n, host in enumerate(("h1", "h2"), start=1):
            assert ours_post(url, "pre-reboot", {"id": host, "group": group}).status_code == 200
            done = ours_post(
                url,
                "steady-state",
                {
                    "id": host,
                    "group": group,
                    "failed_version": "1.2.0",
                    "failure_kind": "check_failed",
                },
            )
            assert (done.status_code, done.content) == (200, b"")
            assert blocked() == (["1.2.0"] if n >= threshold else [])
        record = FailedVersions(client, group, max_failures=threshold).verdict("1.2.0")
        assert record.blocked and record.record is not None
        assert [(f.host, f.kind) for f in record.record.failures][:threshold] == [
            ("h1", "check_failed"),
            ("h2", "check_failed"),
        ][:threshold]
        refused = ours_post(url, "pre-reboot", {"id": "h3", "group": group, "version": "1.2.0"})
        assert (refused.status_code, refused.json()["kind"]) == (403, "version_blocked")
        assert holders(client, group) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    events = [json.loads(ln) for ln in proc.stderr.read().decode().splitlines() if ln[:1] == "{"]
    assert events[0]["max_failures"] == threshold
    recorded = [e for e in events if e["event"] == "fleetlock_failed_version_recorded"]
    assert [(e["holder"], e["version"]) for e in recorded] == [("h1", "1.2.0"), ("h2", "1.2.0")]


BAD_REPORTS = [
    ({"failed_version": "1.2.0"}, "invalid_client_params"),  # no failure_kind
    ({"failure_kind": "rolled_back"}, "invalid_client_params"),  # no failed_version
    ({"failed_version": "1.2.0", "failure_kind": "Rolled Back"}, "invalid_client_params"),
    ({"failed_version": "1.2.0", "failure_kind": "k" * 65}, "invalid_client_params"),
    ({"failed_version": "1.2.0", "failure_kind": 7}, "invalid_client_params"),
    ({"failed_version": "../1.2.0", "failure_kind": "rolled_back"}, "invalid_version"),
    ({"failed_version": ["1.2.0"], "failure_kind": "rolled_back"}, "invalid_version"),
]


@pytest.mark.parametrize(("extra", "kind"), BAD_REPORTS)
def test_a_bad_failure_report_is_refused_and_changes_nothing(
    client: EtcdClient, group: str, extra: dict[str, object], kind: str
) -> None:
    with serving(client, {group: 2}, failed=None) as srv:
        srv.service.failed = StoredFailedVersions(client)
        assert ours_post(srv.url, "pre-reboot", {"id": "h", "group": group}).status_code == 200
        answer = ours_post(srv.url, "steady-state", {"id": "h", "group": group, **extra})  # type: ignore[dict-item]
        assert (answer.status_code, answer.json()["kind"]) == (400, kind)
        assert holders(client, group) == ["h"]  # still held
        assert FailedVersions(client, group).read() == {}  # nothing recorded


def test_a_failure_report_the_store_cannot_take_keeps_the_slot(
    client: EtcdClient, group: str
) -> None:
    class Down:
        def blocked(self, group: str) -> Collection[str]:
            return frozenset()

        def record(self, group: str, version: str, host: str, kind: str) -> None:
            raise LockError("unavailable", "etcd is gone")

    with serving(client, {group: 2}) as srv:
        srv.service.failed = Down()
        lock = FleetLock(srv.url, group, timeout_s=10)
        try:
            assert lock.acquire("h") is True
            with pytest.raises(FleetLockError) as exc:
                lock.release("h", failed=FailureReport("1.2.0", "rolled_back"))
            assert (exc.value.status, exc.value.protocol_kind) == (503, "etcd_unavailable")
            assert holders(client, group) == ["h"]  # not released without the record
            srv.service.failed = StoredFailedVersions(client)
            # an odd kind from a state file goes as "rolled_back", never a 400 for good
            assert lock.release("h", failed=FailureReport("1.2.0", "Odd Kind!")) is True
            assert holders(client, group) == []
            stored = FailedVersions(client, group).read()["1.2.0"]
            assert isinstance(stored, FailedRecord)
            assert [(f.host, f.kind) for f in stored.failures] == [("h", "rolled_back")]
            # airlock-style clients (Zincati) send no such fields: a plain release
            assert lock.release("h") is False
        finally:
            lock.close()


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--listen", "example.com:3333"], "not a name"),
        (["--listen", "unix:/run/x.sock"], "TCP"),
        (["--listen", "127.0.0.1:99999"], "port"),
        (["--group", "a/b"], "--group"),
        (["--group", "g=many"], "--group"),
        (["--tls-cert", "/nonexistent.pem"], "go together"),
        (["--etcd", "ftp://x"], "endpoints"),
        (["--max-failures", "0"], "--max-failures"),
        (["--max-failures", "101"], "--max-failures"),
    ],
)
def test_bad_options_are_config_errors(args: list[str], word: str, tmp_path: Path) -> None:
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    result = updatectl(None, "--config", str(cfg), "fleetlock", "serve", *args)
    assert result.code == 3, result.err
    assert word in result.err


def test_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = updatectl(
            None, "--config", str(cfg), "fleetlock", "serve", "--listen", f"127.0.0.1:{port}"
        )
    assert result.code == 3 and "cannot listen" in result.err
