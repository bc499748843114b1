"""The etcd reboot lock against a real etcd: airlock's semaphore, its holders'
start times, admin operations, malformed values, TLS and auth."""

from __future__ import annotations

import base64
import http.server
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.etcd import USER, USER_PASSWORD, EtcdNode
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.rebootlock import RebootLock
from policies.semaphore import Semaphore, holder_key, holders_prefix, semaphore_key
from updater.errors import ConfigError, LockError

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd")


class FixedClock:
    def __init__(self, when: datetime) -> None:
        self.when = when

    def now(self) -> datetime:
        return self.when

    def monotonic(self) -> float:
        return 0.0


T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)


def make_lock(
    client: EtcdClient, group: str, slots: int = 2, clock: FixedClock | None = None
) -> EtcdLock:
    return EtcdLock(client, group, slots, clock=clock or FixedClock(T0))


def raw(client: EtcdClient, key: str) -> bytes | None:
    kv = client.range(key)
    return None if kv is None else kv.value


def put(etcd: EtcdNode, key: str, value: bytes) -> None:
    etcd.etcdctl("put", key, value.decode())


# ---- the semaphore ---------------------------------------------------------------------------


def test_is_a_reboot_lock(client: EtcdClient, group: str) -> None:
    lock: RebootLock = make_lock(client, group)
    assert lock.name == "etcd"


def test_created_if_missing_with_the_configured_slots(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=3)
    assert lock.status() is None
    assert raw(client, semaphore_key(group)) is None
    assert lock.acquire("a")
    assert raw(client, semaphore_key(group)) == b'{"total_slots":3,"holders":["a"]}'
    # The stored count wins over another host's configuration (set-max changes it).
    other = make_lock(client, group, slots=1)
    assert other.acquire("b")
    status = other.status()
    assert status is not None
    assert status.total_slots == 3


def test_release_alone_does_not_create_the_semaphore(client: EtcdClient, group: str) -> None:
    make_lock(client, group).release("a")
    assert raw(client, semaphore_key(group)) is None


def test_acquire_up_to_n_then_refuse(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=2)
    assert lock.acquire("b")
    assert lock.acquire("a")
    assert not lock.acquire("c")
    assert raw(client, semaphore_key(group)) == b'{"total_slots":2,"holders":["a","b"]}'


def test_acquire_and_release_are_idempotent(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=2)
    assert lock.acquire("a")
    rev = client.range(semaphore_key(group)).mod_revision  # type: ignore[union-attr]
    assert lock.acquire("a")  # already held: yes, and nothing written
    assert client.range(semaphore_key(group)).mod_revision == rev  # type: ignore[union-attr]
    lock.release("a")
    rev = client.range(semaphore_key(group)).mod_revision  # type: ignore[union-attr]
    lock.release("a")  # not held: fine, and nothing written
    lock.release("never-held")
    assert client.range(semaphore_key(group)).mod_revision == rev  # type: ignore[union-attr]
    assert raw(client, semaphore_key(group)) == b'{"total_slots":2,"holders":[]}'


def test_release_frees_a_slot(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=1)
    assert lock.acquire("a")
    assert not lock.acquire("b")
    lock.release("a")
    assert lock.acquire("b")


def test_holder_start_time_is_written_and_removed_with_the_semaphore(
    client: EtcdClient, group: str
) -> None:
    lock = make_lock(client, group, clock=FixedClock(T0))
    assert lock.acquire("host-1")
    sem = client.range(semaphore_key(group))
    since = client.range(holder_key(group, "host-1"))
    assert sem is not None
    assert since is not None
    assert since.value == b'{"since":%.1f}' % T0.timestamp()
    assert since.mod_revision == sem.mod_revision  # one transaction
    status = lock.status()
    assert status is not None
    assert [(h.id, h.since) for h in status.holders] == [("host-1", T0.timestamp())]
    assert status.holders[0].age_s(T0.timestamp() + 90) == 90

    lock.release("host-1")
    sem_after = client.range(semaphore_key(group))
    assert sem_after is not None
    assert client.range(holder_key(group, "host-1")) is None
    # The since key was deleted at exactly the release's revision.
    assert client.range(holder_key(group, "host-1"), revision=sem_after.mod_revision - 1)
    assert client.range(holder_key(group, "host-1"), revision=sem_after.mod_revision) is None


def test_concurrent_acquires_never_exceed_the_slots(etcd: EtcdNode, group: str) -> None:
    slots, hosts = 3, 16
    granted: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(hosts)
    done = threading.Lock()

    def host(i: int) -> None:
        client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
        lock = EtcdLock(client, group, slots)
        barrier.wait()
        try:
            if lock.acquire(f"host-{i:02d}"):
                with done:
                    granted.append(f"host-{i:02d}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    with capture_logs() as logs:
        threads = [threading.Thread(target=host, args=(i,)) for i in range(hosts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert len(granted) == slots
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints))
    status = EtcdLock(client, group, slots).status()
    assert status is not None
    assert sorted(h.id for h in status.holders) == sorted(granted)
    # Everyone read one free slot at the same time: compare-and-swap sorted them out.
    assert any(e["event"] == "etcd_lock_conflict" for e in logs)


# ---- malformed values ------------------------------------------------------------------------

MALFORMED = [
    b"not json",
    b"\xff\xfe",
    b"[]",
    b'"a string"',
    b"{}",
    b'{"total_slots":"2","holders":[]}',
    b'{"total_slots":2.0,"holders":[]}',
    b'{"total_slots":true,"holders":[]}',
    b'{"total_slots":-1,"holders":[]}',
    b'{"total_slots":2}',
    b'{"total_slots":2,"holders":null}',
    b'{"total_slots":2,"holders":"a"}',
    b'{"total_slots":2,"holders":[1]}',
    b'{"total_slots":2,"holders":["b","a"]}',
    b'{"total_slots":2,"holders":["a","a"]}',
    b'{"total_slots":NaN,"holders":[]}',
    # hostile: anyone who can write the key (json.loads raised RecursionError for these)
    b"[" * 2000,
    b'{"total_slots":2,"holders":[],"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"total_slots":2,"holders":[],"x":Infinity}',
    b'{"total_slots":2,"holders":["\\ud800"]}',  # valid JSON, but no UTF-8 to write back
    b'{"total_slots":' + b"9" * 5000 + b',"holders":[]}',
]


@pytest.mark.parametrize("value", MALFORMED, ids=lambda v: v.decode("utf-8", "replace")[:60])
def test_malformed_semaphore_is_a_typed_error_and_never_overwritten(
    client: EtcdClient, group: str, value: bytes
) -> None:
    key = semaphore_key(group)
    client.txn([], [{"request_put": {"key": _b64(key), "value": _b64(value)}}])
    before = client.range(key)
    assert before is not None
    lock = make_lock(client, group)
    for op in (
        lambda: lock.acquire("a"),
        lambda: lock.release("a"),
        lambda: lock.force_lock("a"),
        lambda: lock.unlock("a"),
        lambda: lock.set_max(5),
        lock.status,
    ):
        with pytest.raises(LockError) as err:
            op()
        assert err.value.kind == "malformed"
        assert key in err.value.message
    after = client.range(key)
    assert after == before  # same bytes, same revision: nothing was written
    assert client.range(holder_key(group, "a")) is None


def test_repair_overwrites_only_a_malformed_semaphore(client: EtcdClient, group: str) -> None:
    key = semaphore_key(group)
    lock = make_lock(client, group, slots=2)
    assert lock.acquire("a")
    with pytest.raises(LockError) as err:
        lock.repair(3)
    assert err.value.kind == "bad_argument"
    assert raw(client, key) == b'{"total_slots":2,"holders":["a"]}'

    client.txn([], [{"request_put": {"key": _b64(key), "value": _b64(b"{garbage")}}])
    with capture_logs() as logs:
        lock.repair(3)
    assert raw(client, key) == b'{"total_slots":3,"holders":[]}'
    assert client.range(holder_key(group, "a")) is None  # no one holds after a repair
    assert [e["old_value"] for e in logs if e["event"] == "etcd_lock_repaired"] == ["{garbage"]
    assert lock.acquire("b")

    lock.repair(1, force=True)  # an explicit reset of a well-formed one
    assert raw(client, key) == b'{"total_slots":1,"holders":[]}'


def test_repair_creates_a_missing_semaphore(client: EtcdClient, group: str) -> None:
    make_lock(client, group).repair(4)
    assert raw(client, semaphore_key(group)) == b'{"total_slots":4,"holders":[]}'


# ---- admin -----------------------------------------------------------------------------------


def test_set_max_down_keeps_holders_and_admits_no_one_until_below(
    client: EtcdClient, group: str
) -> None:
    lock = make_lock(client, group, slots=3)
    for h in ("a", "b", "c"):
        assert lock.acquire(h)
    assert lock.set_max(1) == 3
    status = lock.status()
    assert status is not None
    assert (status.total_slots, [h.id for h in status.holders]) == (1, ["a", "b", "c"])
    assert status.free_slots == 0
    assert lock.acquire("a")  # a holder still holds
    assert not lock.acquire("d")
    lock.release("a")
    assert not lock.acquire("d")  # two holders, one slot
    lock.release("b")
    assert not lock.acquire("d")  # one holder, one slot
    lock.release("c")
    assert lock.acquire("d")
    assert raw(client, semaphore_key(group)) == b'{"total_slots":1,"holders":["d"]}'


def test_set_max_up_admits_more_and_creates_when_missing(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=1)
    assert lock.set_max(2) is None  # created with 2, not the configured 1
    assert lock.acquire("a")
    assert lock.acquire("b")
    assert not lock.acquire("c")
    assert lock.set_max(3) == 2
    assert lock.acquire("c")
    assert lock.set_max(3) == 3
    with pytest.raises(LockError) as err:
        lock.set_max(-1)
    assert err.value.kind == "bad_argument"


def test_set_max_zero_pauses_the_group(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=2)
    lock.set_max(0)
    assert not lock.acquire("a")


def test_unlock_a_dead_holder(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=1)
    assert lock.acquire("dead-host")
    assert not lock.acquire("live-host")
    admin = make_lock(client, group)
    assert admin.unlock("dead-host") is True
    assert client.range(holder_key(group, "dead-host")) is None
    assert admin.unlock("dead-host") is False
    assert lock.acquire("live-host")


def test_force_lock_takes_a_slot_even_when_full(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group, slots=1)
    assert lock.acquire("a")
    lock.force_lock("admin-hold")
    lock.force_lock("admin-hold")
    status = lock.status()
    assert status is not None
    assert [h.id for h in status.holders] == ["a", "admin-hold"]
    assert all(h.since == T0.timestamp() for h in status.holders)
    lock.release("a")
    assert not lock.acquire("b")  # still 1 holder for 1 slot


def test_holder_without_a_start_time_has_unknown_age(
    etcd: EtcdNode, client: EtcdClient, group: str
) -> None:
    # airlock admitted this one: it writes no since key.
    put(etcd, semaphore_key(group), b'{"total_slots":2,"holders":["from-airlock"]}')
    lock = make_lock(client, group)
    status = lock.status()
    assert status is not None
    assert status.holders[0].since is None
    assert status.holders[0].age_s(1e9) is None
    assert status.as_dict(0)["holders"] == [{"id": "from-airlock", "since": None, "age_s": None}]


# ---- compatibility with airlock ---------------------------------------------------------------


def test_reads_and_writes_airlocks_exact_bytes(
    etcd: EtcdNode, client: EtcdClient, group: str
) -> None:
    # What airlock's Go code (encoding/json of {TotalSlots uint64 `json:"total_slots"`,
    # Holders []string `json:"holders"`}) writes for a fresh and a held semaphore.
    key = semaphore_key(group)
    assert key == f"com.coreos.airlock/groups/{group}/v1/semaphore"
    put(etcd, key, b'{"total_slots":2,"holders":[]}')
    lock = make_lock(client, group, slots=5)
    assert lock.acquire("fedora-b")
    assert raw(client, key) == b'{"total_slots":2,"holders":["fedora-b"]}'
    put(etcd, key, b'{"total_slots":2,"holders":["fedora-b","fedora-c"]}')  # airlock took one
    assert not lock.acquire("fedora-a")
    lock.release("fedora-c")
    assert lock.acquire("fedora-a")
    assert raw(client, key) == b'{"total_slots":2,"holders":["fedora-a","fedora-b"]}'
    # Whitespace and field order from another writer are fine to read.
    put(etcd, key, b'{ "holders": ["x"], "total_slots": 3 }')
    assert lock.acquire("y")
    assert raw(client, key) == b'{"total_slots":3,"holders":["x","y"]}'


def test_unknown_fields_are_kept(etcd: EtcdNode, client: EtcdClient, group: str) -> None:
    key = semaphore_key(group)
    put(etcd, key, b'{"total_slots":2,"holders":[],"note":{"by":"admin"}}')
    lock = make_lock(client, group)
    assert lock.acquire("a")
    assert raw(client, key) == b'{"total_slots":2,"holders":["a"],"note":{"by":"admin"}}'


# Valid JSON that a re-encoder would change: 1e999 became Infinity (not JSON, so
# every agent and airlock then read the semaphore as malformed), 1.0e2 became
# 100.0, -0 became 0, a big int or an escape could be rewritten.
FOREIGN = (
    b'"big":1e999,"f":1.0e2,"z":-0,"zf":-0.0E-0,"i":123456789012345678901234567890,'
    b'"u":"\\u00e9\\ud83d\\ude00\\u2028<&>","\\u006eame":"x","n":{"a" : [1E+2, true,null]},'
    b'"dup":1,"dup":2'
)


def test_foreign_fields_survive_lock_and_unlock_byte_exact(
    etcd: EtcdNode, client: EtcdClient, group: str
) -> None:
    key = semaphore_key(group)
    original = b'{"total_slots":2,"holders":[],' + FOREIGN + b"}"
    client.txn([], [{"request_put": {"key": _b64(key), "value": _b64(original)}}])
    lock = make_lock(client, group)
    assert lock.acquire("a")
    assert raw(client, key) == b'{"total_slots":2,"holders":["a"],' + FOREIGN + b"}"
    status = lock.status()
    assert status is not None and [h.id for h in status.holders] == ["a"]
    assert lock.set_max(3) == 2
    assert lock.set_max(2) == 3
    lock.release("a")
    assert raw(client, key) == original
    # and what we wrote is still readable by the next agent
    assert make_lock(client, group).acquire("b")


def test_foreign_fields_keep_their_text_wherever_they_stood(
    etcd: EtcdNode, client: EtcdClient, group: str
) -> None:
    key = semaphore_key(group)
    put(etcd, key, b'{ "x" : 1e999 , "holders" : [ ] , "total_slots" : 1 }')
    assert make_lock(client, group).acquire("a")
    assert raw(client, key) == b'{"total_slots":1,"holders":["a"],"x":1e999}'


@pytest.mark.parametrize(
    "value",
    [
        b'{"total_slots":2,"holders":[],"Total_Slots":5}',  # airlock reads this as total_slots
        b'{"total_slots":2,"holders":[],"HOLDERS":["x"]}',
        b'{"total_slots":2,"holders":[],"total_\\u017flots":5}',  # long s folds to s in Go
        b'{"total_slots":2,"holders":[],"x":NaN}',
        b'{"total_slots":2,"holders":[],"x":-Infinity}',
    ],
)
def test_fields_airlock_reads_differently_are_malformed(
    client: EtcdClient, group: str, value: bytes
) -> None:
    key = semaphore_key(group)
    client.txn([], [{"request_put": {"key": _b64(key), "value": _b64(value)}}])
    before = client.range(key)
    with pytest.raises(LockError) as err:
        make_lock(client, group).acquire("a")
    assert err.value.kind == "malformed"
    assert client.range(key) == before


def test_encoding_matches_go() -> None:
    sem = Semaphore(2, ("a<b>&c", "é\u2028"))
    assert (
        sem.encode()
        == '{"total_slots":2,"holders":["a\\u003cb\\u003e\\u0026c","é\\u2028"]}'.encode()
    )
    assert Semaphore.decode(sem.encode(), "k") == sem


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "grp_1", "ü", "a\n"])
def test_group_is_validated(client: EtcdClient, bad: str) -> None:
    with pytest.raises(LockError) as err:
        EtcdLock(client, bad, 1)
    assert err.value.kind == "bad_argument"


def test_groups_are_separate(client: EtcdClient, group: str) -> None:
    one = make_lock(client, group, slots=1)
    two = make_lock(client, group + ".2", slots=1)
    assert one.acquire("a")
    assert two.acquire("b")
    assert holders_prefix(group) != holders_prefix(group + ".2")


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 257])
def test_holder_is_validated(client: EtcdClient, group: str, bad: str) -> None:
    lock = make_lock(client, group)
    with pytest.raises(LockError) as err:
        lock.acquire(bad)
    assert err.value.kind == "bad_argument"


def test_holder_ids_are_escaped_in_keys(client: EtcdClient, group: str) -> None:
    lock = make_lock(client, group)
    assert lock.acquire("node/1 %x")
    assert holder_key(group, "node/1 %x").endswith("/v1/holders/node%2F1%20%25x")
    status = lock.status()
    assert status is not None
    assert [(h.id, h.since) for h in status.holders] == [("node/1 %x", T0.timestamp())]


@pytest.mark.parametrize("slots", [-1, True, 2**63])
def test_slots_are_validated(client: EtcdClient, group: str, slots: int) -> None:
    with pytest.raises(LockError) as err:
        EtcdLock(client, group, slots)
    assert err.value.kind == "bad_argument"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"endpoints": ()}, "endpoints"),
        ({"endpoints": ("127.0.0.1:2379",)}, "endpoints"),
        ({"endpoints": ("ftp://h:1",)}, "endpoints"),
        ({"endpoints": ("http://h:99999",)}, "endpoints"),
        ({"endpoints": ("http://h:1/v3",)}, "endpoints"),
        ({"endpoints": ("http://[::1",)}, "endpoints"),  # was urlsplit's ValueError
        ({"endpoints": ("http://h:\u0662",)}, "endpoints"),
        ({"endpoints": ("http://u:p@h:1",)}, "endpoints"),
        ({"endpoints": ("http://h:1",), "ca_file": Path("/ca.pem")}, "endpoints"),
        ({"endpoints": ("http://h:1",), "cert_file": Path("/c.pem")}, "endpoints"),
        ({"endpoints": ("https://h:1",), "cert_file": Path("/c.pem")}, "key_file"),
        ({"endpoints": ("https://h:1",), "key_file": Path("/k.pem")}, "cert_file"),
        ({"username": "u"}, "password"),
        ({"password": "p"}, "username"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"conflict_retries": 0}, "conflict_retries"),
    ],
)
def test_settings_are_validated(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        EtcdSettings(**kwargs)  # type: ignore[arg-type]
    assert err.value.key == key


# ---- TLS and auth ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[EtcdNode]:
    with EtcdNode(tls=True) as node:
        yield node


@pytest.fixture(scope="module")
def mtls_etcd() -> Iterator[EtcdNode]:
    with EtcdNode(client_cert_auth=True) as node:
        yield node


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdNode]:
    with EtcdNode(auth=True) as node:
        yield node


def test_tls_with_a_ca_file(tls_etcd: EtcdNode, group: str) -> None:
    assert tls_etcd.tls is not None
    assert tls_etcd.endpoint.startswith("https://")
    settings = EtcdSettings(endpoints=tls_etcd.endpoints, ca_file=tls_etcd.tls.ca_cert)
    lock = EtcdLock.from_settings(settings, group, 1)
    assert lock.acquire("a")
    assert not lock.acquire("b")


def test_tls_with_an_unknown_ca_is_unavailable(tls_etcd: EtcdNode, group: str) -> None:
    # Without our CA the system's trust store rejects the server: never a grant.
    lock = EtcdLock.from_settings(EtcdSettings(endpoints=tls_etcd.endpoints), group, 1)
    with pytest.raises(LockError) as err:
        lock.acquire("a")
    assert err.value.kind == "unavailable"
    assert "certificate" in err.value.message.lower() or "ssl" in err.value.message.lower()


def test_tls_with_a_client_certificate(mtls_etcd: EtcdNode, group: str) -> None:
    tls = mtls_etcd.tls
    assert tls is not None
    settings = EtcdSettings(
        endpoints=mtls_etcd.endpoints,
        ca_file=tls.ca_cert,
        cert_file=tls.client_cert,
        key_file=tls.client_key,
    )
    lock = EtcdLock.from_settings(settings, group, 1)
    assert lock.acquire("a")
    lock.release("a")

    no_cert = EtcdSettings(endpoints=mtls_etcd.endpoints, ca_file=tls.ca_cert, timeout_s=2)
    with pytest.raises(LockError) as err:
        EtcdLock.from_settings(no_cert, group, 1).acquire("a")
    assert err.value.kind == "unavailable"


def test_auth_with_the_right_password(auth_etcd: EtcdNode, group: str) -> None:
    # The least-privilege user: read/write under com.coreos.airlock/ only.
    settings = EtcdSettings(endpoints=auth_etcd.endpoints, username=USER, password=USER_PASSWORD)
    lock = EtcdLock.from_settings(settings, group, 1)
    assert lock.acquire("a")
    assert not lock.acquire("b")
    lock.release("a")
    status = lock.status()
    assert status is not None
    assert status.holders == ()


def test_auth_token_rejected_is_renewed(auth_etcd: EtcdNode, group: str) -> None:
    settings = EtcdSettings(endpoints=auth_etcd.endpoints, username=USER, password=USER_PASSWORD)
    client = EtcdClient(settings)
    lock = EtcdLock(client, group, 1)
    assert lock.acquire("a")
    client._token = "forgotten.1"  # what a restarted member or an expired token looks like
    lock.release("a")
    assert client._token != "forgotten.1"


@pytest.mark.parametrize(("username", "password"), [(USER, "wrong"), ("nobody", "x"), (None, None)])
def test_auth_failures_are_refused(
    auth_etcd: EtcdNode, group: str, username: str | None, password: str | None
) -> None:
    settings = EtcdSettings(endpoints=auth_etcd.endpoints, username=username, password=password)
    lock = EtcdLock.from_settings(settings, group, 1)
    with pytest.raises(LockError) as err:
        lock.acquire("a")
    assert err.value.kind == "refused"
    assert err.value.hint is not None


def test_auth_user_without_rights_on_the_key_is_refused(auth_etcd: EtcdNode) -> None:
    auth_etcd.etcdctl("user", "add", "reader:reader-pw")
    settings = EtcdSettings(endpoints=auth_etcd.endpoints, username="reader", password="reader-pw")
    with pytest.raises(LockError) as err:
        EtcdLock.from_settings(settings, "g", 1).acquire("a")
    assert err.value.kind == "refused"
    assert "permission denied" in err.value.message


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# ---- a gateway that answers nonsense -----------------------------------------------------------


class _Nonsense(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b"[" * 100_000  # requests' json() recursed into RecursionError

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b"[" * 100_000), (500, b'{"code":' * 100_000), (200, b"NaN"), (200, b"[1]")],
    ids=["200-deep", "500-deep", "200-nan", "200-list"],
)
def test_a_gateway_answering_nonsense_is_unavailable(status: int, body: bytes) -> None:
    handler = type("H", (_Nonsense,), {"status": status, "body": body})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            c = EtcdClient(EtcdSettings(endpoints=(url,), timeout_s=5))
            with pytest.raises(LockError) as err:
                EtcdLock(c, "default", 1).acquire("a")
            assert err.value.kind == "unavailable"
            c.close()
        finally:
            server.shutdown()


@pytest.mark.parametrize(
    "value", [b'{"since":' + b"9" * 400 + b"}", b'{"since":-1e999}', b'{"since":"x"}', b"not json"]
)
def test_a_holder_start_that_is_no_time_is_unknown(
    etcd: EtcdNode, client: EtcdClient, group: str, value: bytes
) -> None:
    """A hostile start time (an integer no float holds, ...) makes the age unknown; the
    status is still read (it once raised OverflowError)."""
    lock = EtcdLock(client, group, 1)
    assert lock.acquire("host-1")
    put(etcd, holder_key(group, "host-1"), value)
    st = lock.status()
    assert st is not None and [(h.id, h.since) for h in st.holders] == [("host-1", None)]
