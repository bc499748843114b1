"""Fuzzing the JSON readers (hypothesis): the release manifest, the trust root
(and the host's record of it), airlock's etcd semaphore, FleetLock answers,
fleet host records, failed-version records and the agent's state file.
Whatever arrives (random bytes, JSON-ish text, deep nesting, mutated valid
documents) is a result or the reader's typed error; no other exception, no
hang, bounded memory. And what the semaphore writer writes back reads again."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from policies.etcdtxn import KeyValue
from policies.failed import FailedRecord, Failure, decide
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.fleetlock import MAX_ANSWER_BYTES, FleetLockError, Outcome, judge
from policies.fleetlockproto import PRE_REBOOT, STEADY_STATE
from policies.fleetview import fleet_view, metrics_text, parse_snapshot
from policies.semaphore import KEY_PREFIX as LOCK_PREFIX
from policies.semaphore import Semaphore
from tests.fuzzing import fewer_examples, parse_or_typed_error
from updater import jsonutil
from updater.errors import LockError, StateError, UpdaterError, VerificationError
from updater.manifest import BootFileRef, Compression, ImageRef, Manifest, parse, serialize
from updater.state import SlotRecord, State, StateStore
from updater.trustchain import TrustFile
from updater.trustroot import Root, RootKey, Trusted, parse_root, serialize_root

pytestmark = pytest.mark.fuzz

T0 = datetime(2026, 11, 28, tzinfo=UTC)
MANIFEST = serialize(
    Manifest(
        channel="stable",
        version="1.1.0",
        created=T0,
        expires=T0.replace(year=2027),
        image=ImageRef(
            "../images/1.1.0/usr.img.zst", 1000, "1" * 64, Compression.ZSTD, 4096, "2" * 64
        ),
        boot=(
            BootFileRef("vmlinuz", "../images/1.1.0/boot/vmlinuz", 5000, "3" * 64),
            BootFileRef("initrd.img", "../images/1.1.0/boot/initrd.img", 9000, "4" * 64),
        ),
    )
)
SEMAPHORES = [
    b'{"total_slots":2,"holders":[]}',
    b'{"total_slots":3,"holders":["a","b\\u003c"],"note":{"by":"admin"},"x":1e999,"z":-0}',
]
FLEETLOCK_BODIES = [
    b"",
    b'{"kind":"failed_lock","value":"all 1 semaphore slots currently locked"}',
    b'{"kind":"lock_held","value":"held by x"}',
]
HOST = HostRecord("h1", "node-1", "default", "USR-A", "1.0.0", "IDLE", "", 1, "", False, 1.0)

# Pieces that matter to a JSON reader, spliced into valid documents.
TOKENS = [
    b"[",
    b"]",
    b"{",
    b"}",
    b'"',
    b"\\",
    b",",
    b":",
    b"1e999",
    b"-1e999",
    b"NaN",
    b"Infinity",
    b"-0",
    b"1.0e2",
    b"\xff",
    b"\xc3",
    b'"\\ud800"',
    b'"\\u0000"',
    b"9" * 30,
    b"9" * 5000,
    b"[" * 3000,
    b'{"a":' * 3000,
    b"null",
    b"true",
    b'"Total_Slots"',
    b'"holders"',
    b"\x00",
    b"\xef\xbb\xbf",
]
json_ish = st.text(alphabet='{}[]",:0123456789eE.+- tfnrulasNIy\\u', max_size=200)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def mutations(docs: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid document with a few tokens inserted, replaced or cut out."""

    def apply(doc: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
        for pos, cut, token in edits:
            at = pos % (len(doc) + 1)
            doc = doc[:at] + token + doc[at + cut :]
        return doc

    return st.builds(
        apply,
        st.sampled_from(docs),
        st.lists(
            st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.sampled_from(TOKENS)),
            max_size=4,
        ),
    )


def deep(n: int, opener: bytes, closed: bool) -> bytes:
    closer = {b"[": b"]", b'{"a":': b"}"}[opener]
    return opener * n + ((b"1" if opener != b"[" else b"") + closer * n if closed else b"")


deep_documents = st.builds(
    deep, st.integers(1, 20_000), st.sampled_from([b"[", b'{"a":']), st.booleans()
)
anything = st.one_of(
    st.binary(max_size=2048),
    json_ish.map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)


# ---- the release manifest ----------------------------------------------------------------------


def _manifest(data: bytes) -> None:
    result = parse_or_typed_error(lambda: parse(data))
    assert isinstance(result, Manifest | VerificationError), result
    if isinstance(result, VerificationError):
        assert result.kind == "manifest_malformed" and len(result.message) < 1000


@given(st.one_of(anything, mutations([MANIFEST]), deep_documents))
def test_fuzz_manifest(data: bytes) -> None:
    _manifest(data)


@given(
    st.dictionaries(
        st.sampled_from(["schema", "channel", "version", "created", "expires", "image", "boot"]),
        json_values,
    )
)
def test_fuzz_manifest_fields(fields: dict[str, object]) -> None:
    doc = json.loads(MANIFEST)
    doc.update(fields)
    _manifest(json.dumps(doc).encode())


@given(
    st.integers(0, 1),
    st.dictionaries(st.sampled_from(["name", "url", "size", "sha256", "extra"]), json_values),
)
def test_fuzz_manifest_boot_fields(index: int, fields: dict[str, object]) -> None:
    doc = json.loads(MANIFEST)
    doc["boot"][index].update(fields)
    _manifest(json.dumps(doc).encode())


# ---- the trust root (keys/root.<N>.json) and the host's record of it ---------------------------

_PUB = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n"
ROOT = serialize_root(
    Root(3, 2, (RootKey("A" * 40, _PUB), RootKey("B" * 64, _PUB)), T0.replace(year=2027))
)


def _root(data: bytes) -> None:
    result = parse_or_typed_error(lambda: parse_root(data))
    assert isinstance(result, Root | VerificationError), result
    if isinstance(result, VerificationError):
        assert result.kind == "root_malformed" and len(result.message) < 1000
        return
    assert 1 <= result.threshold <= len(result.keys) and result.version >= 1
    assert parse_root(serialize_root(result)) == result  # what a rotation writes reads back


@given(st.one_of(anything, mutations([ROOT]), deep_documents))
def test_fuzz_root(data: bytes) -> None:
    _root(data)


@given(
    st.dictionaries(
        st.sampled_from(["schema", "type", "version", "expires", "threshold", "keys"]),
        json_values,
    )
)
def test_fuzz_root_fields(fields: dict[str, object]) -> None:
    doc = json.loads(ROOT)
    doc.update(fields)
    _root(json.dumps(doc).encode())


@given(
    st.integers(0, 1), st.dictionaries(st.sampled_from(["fingerprint", "public_key"]), json_values)
)
def test_fuzz_root_key_fields(index: int, fields: dict[str, object]) -> None:
    doc = json.loads(ROOT)
    doc["keys"][index].update(fields)
    _root(json.dumps(doc).encode())


TRUST_FILE = json.dumps(
    {"schema": 1, "version": 3, "root": ROOT.decode(), "retired": ["C" * 40]}
).encode()


@given(st.one_of(anything, mutations([TRUST_FILE]), deep_documents))
def test_fuzz_trust_file(data: bytes) -> None:
    """The host's trust-root.json: read, or moved aside (None), or a newer schema refused."""
    with tempfile.TemporaryDirectory() as d:
        store = TrustFile(Path(d))
        store.path.write_bytes(data)
        result = parse_or_typed_error(store.load)
        assert result is None or isinstance(result, Trusted | StateError), result
        if isinstance(result, StateError):
            assert result.kind == "newer_schema"
        elif result is None:
            assert not store.path.exists()  # set aside, never trusted


# ---- airlock's semaphore in etcd ---------------------------------------------------------------


def _semaphore(data: bytes) -> None:
    result = parse_or_typed_error(lambda: Semaphore.decode(data, "k"))
    assert isinstance(result, Semaphore | LockError), result
    if isinstance(result, LockError):
        assert result.kind == "malformed" and len(result.message) < 1000
        return
    # what we write back is JSON Go reads (no NaN/Infinity) and reads back the same
    written = result.with_holder("zz").without_holder("zz").encode()
    assert Semaphore.decode(written, "k") == result
    assert Semaphore.decode(result.with_holder("zz").encode(), "k").holders == tuple(
        sorted({*result.holders, "zz"})
    )


@given(st.one_of(anything, mutations(SEMAPHORES), deep_documents))
def test_fuzz_semaphore(data: bytes) -> None:
    _semaphore(data)


@given(json_values, json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=3))
def test_fuzz_semaphore_fields(slots: object, holders: object, extra: dict[str, object]) -> None:
    doc = {"total_slots": slots, "holders": holders, **extra}
    _semaphore(json.dumps(doc).encode())


# ---- FleetLock answers -------------------------------------------------------------------------


def _judged(status: int, body: bytes | None) -> None:
    for endpoint in (PRE_REBOOT, STEADY_STATE):
        verdict = parse_or_typed_error(lambda e=endpoint: judge(e, status, body))  # type: ignore[misc]
        assert isinstance(verdict, Outcome), verdict  # judge never raises: it returns the error
        if verdict.error is not None:
            assert isinstance(verdict.error, FleetLockError)
            assert verdict.error.kind in LockError.kinds
            assert len(verdict.error.message) < 1000
            assert len(verdict.error.protocol_value) <= 512
        if status != 200:
            assert verdict.error is not None


@given(
    st.one_of(
        st.sampled_from([200, 204, 301, 400, 404, 409, 423, 500, 503]), st.integers(100, 599)
    ),
    st.one_of(anything, mutations(FLEETLOCK_BODIES), deep_documents, st.none()),
)
def test_fuzz_fleetlock_answers(status: int, body: bytes | None) -> None:
    if body is not None and len(body) > MAX_ANSWER_BYTES:
        body = None  # the client stops reading there
    _judged(status, body)


# ---- fleet host records ------------------------------------------------------------------------


@given(st.one_of(anything, mutations([HOST.encode()]), deep_documents))
def test_fuzz_host_records(data: bytes) -> None:
    def decode() -> HostRecord | None:
        try:
            return HostRecord.decode(data)
        except ValueError:  # read_hosts logs and skips it
            return None

    result = parse_or_typed_error(decode)
    assert result is None or isinstance(result, HostRecord), result


# ---- the fleet dashboard's reading of etcd (policies.fleetview) -------------------------------

DASHBOARD_KEYS = st.one_of(
    st.builds(lambda t: HOSTS_PREFIX + t, st.text(max_size=40)),
    st.builds(lambda g, r: f"{LOCK_PREFIX}{g}/v1/{r}", st.text(max_size=12), st.text(max_size=20)),
    st.builds(lambda t: LOCK_PREFIX + t, st.text(max_size=40)),
    st.builds(
        lambda g, v: f"updater/v1/groups/{g}/failed/{v}", st.text(max_size=12), st.text(max_size=20)
    ),
)
FAILED_DOC = b'{"version":"1.2.0","failures":[{"host":"h","kind":"x","at":1}]}'
SINCE_DOC = b'{"since":1800000000.5}'
HUGE_SINCE = b'{"since":' + b"9" * 400 + b"}"
DASHBOARD_VALUES = st.one_of(
    anything,
    mutations([HOST.encode(), FAILED_DOC, SINCE_DOC, HUGE_SINCE, SEMAPHORES[0]]),
    deep_documents,
)


@given(
    st.lists(st.tuples(DASHBOARD_KEYS, DASHBOARD_VALUES), max_size=8),
    st.floats(min_value=0, max_value=4e9),
)
def test_fuzz_dashboard_views(kvs: list[tuple[str, bytes]], now: float) -> None:
    """Whatever etcd holds under the dashboard's prefixes, every view is made and is JSON;
    /metrics still parses."""
    items = [KeyValue(k, v, 1, 1) for k, v in kvs]
    hosts = [kv for kv in items if kv.key.startswith(HOSTS_PREFIX)]
    locks = [kv for kv in items if kv.key.startswith(LOCK_PREFIX)]
    failed = [kv for kv in items if kv.key.startswith("updater/v1/groups/")]

    def views() -> tuple[str, str]:
        snap = parse_snapshot(hosts, locks, failed, max_failures=1, revision=1, read_at=now)
        doc = json.dumps(fleet_view(snap, 3600.0), allow_nan=True)
        return doc, metrics_text(snap, up=True, stale_after_s=3600.0)

    result = parse_or_typed_error(views)
    assert not isinstance(result, UpdaterError), result  # nothing to refuse: it is shown
    doc, metrics = result
    assert json.loads(doc) is not None
    list(text_string_to_metric_families(metrics))


# ---- failed-version records (policies.failed) --------------------------------------------------

FAILED = FailedRecord(
    "1.2.0", (Failure("h1", "check_failed", 1.5), Failure("h2", "rolled_back", 1800000000))
).encode()


def _failed(data: bytes) -> None:
    result = parse_or_typed_error(lambda: FailedRecord.decode(data, "k", "1.2.0"))
    assert isinstance(result, FailedRecord | LockError), result
    if isinstance(result, LockError):
        assert result.kind == "malformed" and len(result.message) < 1000
        assert decide("1.2.0", result, 100).blocked  # unreadable: blocked, fail safe
        return
    # what an agent writes back after adding itself reads again, with it counted once
    added = result.with_failure(Failure("zz", "rolled_back", 2.0))
    again = FailedRecord.decode(added.encode(), "k", "1.2.0")
    assert again == added and again.with_failure(Failure("zz", "x", 3.0)) == again


@given(st.one_of(anything, mutations([FAILED]), deep_documents))
def test_fuzz_failed_records(data: bytes) -> None:
    _failed(data)


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["host", "kind", "at", "x"]),
            json_values | st.integers(-(10**500), 10**500),
            max_size=2,
        ),
        max_size=4,
    )
)
def test_fuzz_failed_record_fields(changes: list[dict[str, object]]) -> None:
    # valid failures with a field or two replaced, so that every check is reached
    failures = [
        {"host": f"h{i}", "kind": "check_failed", "at": 1.0, **c} for i, c in enumerate(changes)
    ]
    _failed(json.dumps({"version": "1.2.0", "failures": failures}).encode())


# ---- the agent's state file --------------------------------------------------------------------

STATE = (
    State()
    .accept("1.1.0")
    .with_slot("u-a", SlotRecord("USR-A", "good", "1.0.0", updated="t"))
    .with_slot("u-b", SlotRecord("USR-B", "installed", "1.1.0", 4096, "ab" * 32, "t"))
    .fail("1.0.5")
)


def _state_document() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        store = StateStore(Path(d))
        store.save(STATE)
        return store.path.read_bytes()


STATE_DOC = _state_document()


@settings(max_examples=fewer_examples(2))  # files on disk
@given(st.one_of(anything, mutations([STATE_DOC]), deep_documents))
def test_fuzz_state_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = StateStore(Path(d))
        store.path.write_bytes(data)
        result = parse_or_typed_error(store.load)
        assert isinstance(result, State | StateError), result
        if isinstance(result, StateError):
            assert result.kind == "newer_schema"
            assert store.path.read_bytes() == data  # left for the newer agent
            return
        # either trusted as it is, or set aside byte for byte and a fresh state begun
        aside = list(Path(d).glob("state.json.corrupt-*"))
        if aside:
            assert result == State() and aside[0].read_bytes() == data
        else:
            assert store.path.read_bytes() == data
            store.save(result)  # and what was read can be written again


# ---- the bounded reader itself -----------------------------------------------------------------


@given(st.one_of(anything, deep_documents, json_ish))
def test_fuzz_bounded_reader_agrees_with_json_within_bounds(data: bytes | str) -> None:
    def bad(reason: str) -> LockError:
        return LockError("malformed", reason)

    result = parse_or_typed_error(lambda: jsonutil.loads(data, bad, max_bytes=64 * 1024))
    if isinstance(result, LockError):
        return
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    assert json.dumps(result, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)
