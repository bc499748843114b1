"""The FleetLock client against a FleetLock server written from the protocol,
well-behaved and hostile; assertions on the recorded traffic."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from structlog.testing import capture_logs

from devtools.fleetlock_server import Fault, FleetLockServer
from devtools.tls import TLSFiles, make_tls
from policies.fleetlock import MAX_ANSWER_BYTES, FleetLock, FleetLockError, judge
from policies.fleetlockproto import PRE_REBOOT, STEADY_STATE
from policies.rebootlock import RebootLock
from updater.errors import LockError


@pytest.fixture
def server() -> Iterator[FleetLockServer]:
    with FleetLockServer(slots=2) as srv:
        yield srv


def client(srv: FleetLockServer, group: str = "default", timeout_s: float = 5.0) -> FleetLock:
    return FleetLock(srv.base_url, group, timeout_s=timeout_s)


def test_is_a_reboot_lock() -> None:
    lock: RebootLock = FleetLock("http://127.0.0.1:1", "default")
    assert lock.name == "fleetlock"


def test_acquire_until_full_then_release_frees(server: FleetLockServer) -> None:
    lock = client(server)
    assert lock.acquire("a") is True
    assert lock.acquire("b") is True
    assert lock.acquire("c") is False
    assert server.holders() == ["a", "b"]
    assert lock.acquire("a") is True  # recursive: holding already is yes
    assert server.holders() == ["a", "b"]
    lock.release("a")
    assert server.holders() == ["b"]
    lock.release("a")  # releasing what is not held is fine
    assert lock.acquire("c") is True
    assert server.holders() == ["b", "c"]


def test_requests_are_exactly_as_the_protocol_says(server: FleetLockServer) -> None:
    lock = client(server, group="workers")
    assert lock.acquire("c988d2509fdf4cdcbed39037c56406fb")
    lock.release("c988d2509fdf4cdcbed39037c56406fb")
    pre, steady = server.requests
    for req, path in ((pre, "/v1/pre-reboot"), (steady, "/v1/steady-state")):
        assert (req.method, req.path, req.status) == ("POST", path, 200)
        assert req.headers["fleet-lock-protocol"] == "true"
        assert req.headers["content-type"] == "application/json"
        assert req.json() == {
            "client_params": {"id": "c988d2509fdf4cdcbed39037c56406fb", "group": "workers"}
        }


def test_group_placeholder_in_base_url() -> None:
    with FleetLockServer(slots=1, base_path="/groups/${group}") as srv:
        workers = FleetLock(srv.url + "/groups/${group}/", "workers")
        db = FleetLock(srv.url + "/groups/${group}", "db")
        assert workers.base_url == srv.url + "/groups/workers"
        assert workers.acquire("a") and db.acquire("a")  # one semaphore per group
        assert not workers.acquire("b")
        assert [r.path for r in srv.requests] == [
            "/groups/workers/v1/pre-reboot",
            "/groups/db/v1/pre-reboot",
            "/groups/workers/v1/pre-reboot",
        ]
        assert srv.holders("workers") == ["a"] and srv.holders("db") == ["a"]


def test_a_trailing_slash_does_not_double(server: FleetLockServer) -> None:
    assert FleetLock(server.base_url + "/", "default").acquire("a")
    assert server.requests[-1].path == "/v1/pre-reboot"


def test_a_changed_slot_count_applies_at_once(server: FleetLockServer) -> None:
    server.set_slots(1)
    lock = client(server)
    assert lock.acquire("a") and not lock.acquire("b")
    server.set_slots(2)
    assert lock.acquire("b")


def test_full_is_false_and_logged_with_the_servers_kind(server: FleetLockServer) -> None:
    server.set_slots(0)
    with capture_logs() as logs:
        assert client(server).acquire("a") is False
    (event,) = [e for e in logs if e["event"] == "fleetlock_semaphore_full"]
    assert event["protocol_kind"] == "failed_lock_semaphore_full"
    assert event["status"] == 409


@pytest.mark.parametrize(
    "fault",
    [
        Fault.error(423, "lock_held", "reboot lease lock unavailable, held by x"),  # Typhoon
        Fault.error(409, "failed_lock_semaphore_full", "semaphore full"),  # the spec's example
        Fault(status=423),  # Locked, without a body
    ],
    ids=["typhoon", "spec-example", "423-no-body"],
)
def test_other_servers_full_answers_are_false(server: FleetLockServer, fault: Fault) -> None:
    server.add_fault(fault)
    assert client(server).acquire("a") is False


def test_airlock_full_is_a_refusal_and_its_text_plain_json_is_read(server: FleetLockServer) -> None:
    # airlock answers a full semaphore with 500 failed_lock, as text/plain (Go's http.Error)
    server.add_fault(
        Fault.error(
            500,
            "failed_lock",
            "all 1 semaphore slots currently locked",
            content_type="text/plain; charset=utf-8",
        )
    )
    with pytest.raises(FleetLockError) as err:
        client(server).acquire("a")
    assert (err.value.kind, err.value.status) == ("refused", 500)
    assert err.value.protocol_kind == "failed_lock"
    assert err.value.protocol_value == "all 1 semaphore slots currently locked"
    assert err.value.endpoint == PRE_REBOOT
    assert "all 1 semaphore slots currently locked" in str(err.value)
    assert err.value.as_dict()["category"] == "lock"


def test_full_kind_on_release_is_an_error(server: FleetLockServer) -> None:
    server.add_fault(Fault.error(423, "lock_held", "held by someone else"))
    with pytest.raises(FleetLockError) as err:
        client(server).release("a")
    assert (err.value.kind, err.value.protocol_kind, err.value.endpoint) == (
        "refused",
        "lock_held",
        STEADY_STATE,
    )


HOSTILE: list[tuple[str, Fault, str, str, int | None]] = [
    ("500 empty", Fault.server_error(500), "unavailable", "generic_http_500", 500),
    ("503 empty", Fault.server_error(503), "unavailable", "generic_http_503", 503),
    ("500 garbage", Fault.garbage(500), "unavailable", "generic_http_500", 500),
    ("502 proxy page", Fault.html(502), "unavailable", "generic_http_502", 502),
    ("400 garbage", Fault.garbage(400), "refused", "generic_http_400", 400),
    ("404 empty", Fault.server_error(404), "refused", "generic_http_404", 404),
    ("204, not 200", Fault(status=204), "refused", "generic_http_204", 204),
    ("200 html", Fault.html(200), "malformed", "invalid_success_body", 200),
    (
        "JSON, not an error",
        Fault(status=500, body=b'{"error": "x"}'),
        "malformed",
        "generic_http_500",
        500,
    ),
    (
        "empty kind",
        Fault(status=400, body=b'{"kind": "", "value": "x"}'),
        "malformed",
        "generic_http_400",
        400,
    ),
    (
        "unbounded kind",
        Fault.error(400, "user 123 said no " * 10, "x"),
        "malformed",
        "generic_http_400",
        400,
    ),
    (
        "kind not a string",
        Fault(status=400, body=b'{"kind": 1, "value": "x"}'),
        "malformed",
        "generic_http_400",
        400,
    ),
    ("JSON list", Fault(status=400, body=b"[1, 2]"), "malformed", "generic_http_400", 400),
    (
        "endless body",
        Fault(status=500, body=b"x" * (MAX_ANSWER_BYTES + 1)),
        "malformed",
        "generic_http_500",
        500,
    ),
    ("dropped connection", Fault.dropped(), "unavailable", "connection_failed", None),
    # JSON that json.loads cannot take (RecursionError) or should not (NaN, huge)
    ("200 deep", Fault(status=200, body=b"[" * 5000), "malformed", "invalid_success_body", 200),
    (
        "200 deep, closed",
        Fault(status=200, body=b"[" * 5000 + b"]" * 5000),
        "malformed",
        "invalid_success_body",
        200,
    ),
    ("500 deep", Fault(status=500, body=b"[" * 5000), "unavailable", "generic_http_500", 500),
    ("409 deep", Fault(status=409, body=b'{"a":' * 5000), "refused", "generic_http_409", 409),
    (
        "deep value",
        Fault(status=400, body=b'{"kind":"k","value":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "refused",
        "generic_http_400",
        400,
    ),
    ("200 NaN", Fault(status=200, body=b"NaN"), "malformed", "invalid_success_body", 200),
    (
        "kind an object",
        Fault(status=409, body=b'{"kind":{"k":1},"value":"x"}'),
        "malformed",
        "generic_http_409",
        409,
    ),
    (
        "200 endless",
        Fault(status=200, body=b"[" + b"1," * MAX_ANSWER_BYTES + b"1]"),
        "malformed",
        "generic_http_200",
        200,
    ),
    (  # JSON is UTF-8 (RFC 8259); Go's encoder never writes anything else
        "not UTF-8",
        Fault(status=400, body=b'{"kind":"k","value":"\xff"}'),
        "refused",
        "generic_http_400",
        400,
    ),
]


@pytest.mark.parametrize("operation", ["acquire", "release"])
@pytest.mark.parametrize(
    ("fault", "kind", "protocol_kind", "status"),
    [c[1:] for c in HOSTILE],
    ids=[c[0] for c in HOSTILE],
)
def test_hostile_answers_fail_closed(
    server: FleetLockServer,
    operation: str,
    fault: Fault,
    kind: str,
    protocol_kind: str,
    status: int | None,
) -> None:
    server.add_fault(fault)
    lock = client(server)
    with capture_logs() as logs, pytest.raises(FleetLockError) as err:
        getattr(lock, operation)("a")
    assert isinstance(err.value, LockError)
    assert (err.value.kind, err.value.protocol_kind, err.value.status) == (
        kind,
        protocol_kind,
        status,
    )
    assert err.value.protocol_value
    assert server.holders() == []
    failed = [e for e in logs if e["event"] == "fleetlock_request_failed"]
    assert [(e["kind"], e["protocol_kind"]) for e in failed] == [(kind, protocol_kind)]


@pytest.mark.parametrize(
    "body", [b"[" * 5000, b"{" * 100_000, b"NaN", b"x" * (MAX_ANSWER_BYTES + 1)]
)
def test_a_hostile_answer_changes_nothing_and_the_next_good_one_works(
    server: FleetLockServer, body: bytes
) -> None:
    lock = client(server)
    assert lock.acquire("a")
    server.add_fault(Fault(status=200, body=body, endpoint="steady-state", times=1))
    with pytest.raises(FleetLockError) as err:
        lock.release("a")
    assert err.value.kind == "malformed"
    assert len(str(err.value)) < 400
    assert server.holders() == ["a"]  # the server never saw the release: still held
    lock.release("a")
    assert server.holders() == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(server: FleetLockServer, status: int) -> None:
    # the redirect points at a real FleetLock endpoint that would grant the slot
    server.add_fault(Fault(status=status, location=server.url + "/v1/pre-reboot", times=1))
    with pytest.raises(FleetLockError) as err:
        client(server).acquire("a")
    assert (err.value.kind, err.value.protocol_kind) == ("refused", f"generic_http_{status}")
    assert [r.path for r in server.requests] == ["/v1/pre-reboot"]  # one request, not two
    assert server.holders() == []


def test_a_hanging_server_times_out_quickly(server: FleetLockServer) -> None:
    server.add_fault(Fault.hang(60))
    began = time.monotonic()
    with pytest.raises(FleetLockError) as err:
        client(server, timeout_s=0.3).acquire("a")
    assert time.monotonic() - began < 2
    assert (err.value.kind, err.value.protocol_kind, err.value.status) == (
        "unavailable",
        "timeout",
        None,
    )


def test_a_trickling_server_is_cut_at_the_deadline(server: FleetLockServer) -> None:
    # one byte every 0.1 s never trips the per-read timeout; the deadline does
    server.add_fault(Fault.trickle(0.1, size=4096))
    began = time.monotonic()
    with pytest.raises(FleetLockError) as err:
        client(server, timeout_s=0.5).acquire("a")
    assert time.monotonic() - began < 2
    assert (err.value.kind, err.value.protocol_kind) == ("unavailable", "timeout")


def test_nobody_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: refused
    with pytest.raises(FleetLockError) as err:
        FleetLock(f"http://127.0.0.1:{port}", "default", timeout_s=1).acquire("a")
    assert (err.value.kind, err.value.protocol_kind) == ("unavailable", "connection_failed")


def test_content_type_is_not_what_decides(server: FleetLockServer) -> None:
    server.add_fault(Fault(status=200, body=b'{"ok": true}', content_type="text/html", times=1))
    assert client(server).acquire("a") is True


def test_a_transient_failure_then_success(server: FleetLockServer) -> None:
    server.add_fault(Fault(status=503, times=1))
    lock = client(server)
    with pytest.raises(FleetLockError):
        lock.acquire("a")
    assert lock.acquire("a") is True
    assert [r.status for r in server.requests] == [503, 200]


def test_server_kinds_on_bad_requests(server: FleetLockServer) -> None:
    """The test server itself answers bad requests as the spec says: 4xx + {kind, value}."""
    url = server.base_url + "/v1/pre-reboot"
    good = {"client_params": {"id": "a", "group": "default"}}
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({}, json.dumps(good).encode(), 400, "missing_protocol_header"),
        ({"fleet-lock-protocol": "yes"}, json.dumps(good).encode(), 400, "missing_protocol_header"),
        ({"fleet-lock-protocol": "true"}, b"{", 400, "invalid_body"),
        ({"fleet-lock-protocol": "true"}, b"{}", 400, "invalid_client_params"),
        (
            {"fleet-lock-protocol": "true"},
            json.dumps({"client_params": {"id": "", "group": "default"}}).encode(),
            400,
            "invalid_client_params",
        ),
        (
            {"fleet-lock-protocol": "true"},
            json.dumps({"client_params": {"id": "a", "group": "no/slash"}}).encode(),
            400,
            "invalid_group",
        ),
    ]
    for headers, body, status, kind in cases:
        r = requests.post(url, data=body, headers=headers, timeout=5)
        assert (r.status_code, r.json()["kind"]) == (status, kind)
        assert r.json()["value"]
    r = requests.get(url, timeout=5)
    assert (r.status_code, r.json()["kind"]) == (405, "method_not_allowed")
    r = requests.post(server.base_url + "/v2/pre-reboot", timeout=5)
    assert (r.status_code, r.json()["kind"]) == (404, "not_found")
    assert server.holders() == []


def test_concurrent_clients_never_exceed_the_slots() -> None:
    with FleetLockServer(slots=3) as srv:
        results: dict[str, bool] = {}
        start = threading.Barrier(12)

        def contend(holder: str) -> None:
            lock = client(srv)  # one session per thread
            start.wait()
            results[holder] = lock.acquire(holder)

        threads = [threading.Thread(target=contend, args=(f"host{i}",)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert sum(results.values()) == 3
        assert sorted(srv.holders()) == sorted(h for h, ok in results.items() if ok)


def test_an_injected_session_is_used(server: FleetLockServer) -> None:
    session = requests.Session()
    session.headers["User-Agent"] = "updater-test"
    assert FleetLock(server.base_url, "default", session=session).acquire("a")
    lock = FleetLock(server.base_url, "default", session=session)
    assert lock.acquire("b")
    lock.close()  # not its session to close
    assert session.post(server.base_url + "/v1/steady-state", timeout=5).status_code == 400
    assert server.requests[-2].headers["user-agent"] == "updater-test"


@pytest.mark.parametrize(
    ("base_url", "group"),
    [
        ("http://127.0.0.1:1", "no/slash"),
        ("http://127.0.0.1:1", ""),
        ("ftp://127.0.0.1/", "default"),
        ("127.0.0.1:4000", "default"),
        ("http://127.0.0.1:1/?x=1", "default"),
        ("http:///v1", "default"),
        ("http://[::1", "default"),  # was urlsplit's ValueError
        ("http://[::1]:99999/", "default"),
        ("http://h\u2100/", "default"),
        ("http://127.0.0.1:1/#", "default"),
    ],
)
def test_bad_settings_are_invalid(base_url: str, group: str) -> None:
    with pytest.raises(LockError) as err:
        FleetLock(base_url, group)
    assert err.value.kind == "bad_argument"


def test_empty_id_and_timeout_are_invalid(server: FleetLockServer) -> None:
    with pytest.raises(LockError) as err:
        client(server).acquire("")
    assert err.value.kind == "bad_argument"
    with pytest.raises(LockError):
        FleetLock(server.base_url, "default", timeout_s=0)
    assert server.requests == []


@pytest.mark.parametrize(
    ("endpoint", "status", "body", "ok", "full", "kind"),
    [
        (PRE_REBOOT, 200, b"", True, False, None),
        (PRE_REBOOT, 200, b"null", True, False, None),
        (PRE_REBOOT, 200, b'{"kind": "x", "value": "y"}', True, False, None),
        (PRE_REBOOT, 200, b"OK", False, False, "malformed"),
        (PRE_REBOOT, 200, None, False, False, "malformed"),
        (
            PRE_REBOOT,
            409,
            b'{"kind": "failed_lock_semaphore_full", "value": "v"}',
            False,
            True,
            "refused",
        ),
        (
            STEADY_STATE,
            409,
            b'{"kind": "failed_lock_semaphore_full", "value": "v"}',
            False,
            False,
            "refused",
        ),
        (PRE_REBOOT, 423, b"", False, True, "refused"),
        (STEADY_STATE, 423, b"", False, False, "refused"),
        (PRE_REBOOT, 500, b'{"kind": "failed_lock", "value": "v"}', False, False, "refused"),
        (PRE_REBOOT, 504, b"<html>gateway timeout</html>", False, False, "unavailable"),
        (PRE_REBOOT, 302, b"", False, False, "refused"),
    ],
)
def test_judge(
    endpoint: str, status: int, body: bytes | None, ok: bool, full: bool, kind: str | None
) -> None:
    verdict = judge(endpoint, status, body)
    assert (verdict.ok, verdict.full) == (ok, full)
    assert (verdict.error.kind if verdict.error else None) == kind


# --- https with a private CA ---------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("fleetlock-tls"))


def test_https_with_a_ca_file(tls_files: TLSFiles) -> None:
    with FleetLockServer(slots=1, tls=tls_files.server_context()) as srv:
        assert srv.base_url.startswith("https://")
        assert FleetLock(srv.base_url, "default", ca_file=tls_files.ca_cert, timeout_s=5).acquire(
            "a"
        )
        with pytest.raises(FleetLockError) as err:  # the system's CAs do not know this one
            FleetLock(srv.base_url, "default", timeout_s=5).acquire("b")
        assert (err.value.kind, err.value.protocol_kind) == ("unavailable", "tls_failed")
        assert srv.holders() == ["a"]
