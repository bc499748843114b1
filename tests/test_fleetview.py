"""The dashboard's views (policies/fleetview.py): pure, table-tested."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from policies.etcdtxn import KeyValue
from policies.failed import FailedRecord, Failure, decide
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.fleetview import (
    MAX_LABEL,
    FleetSnapshot,
    groups_view,
    hosts_view,
    metrics_text,
    parse_failed,
    parse_hosts,
    parse_locks,
    phase,
    target_version,
    versions_view,
)
from policies.semaphore import KEY_PREFIX, Semaphore, encode_since

NOW = 1_800_000_000.0


def rec(hid: str = "a", **kw: object) -> HostRecord:
    base = HostRecord(
        id=hid,
        hostname=f"n-{hid}",
        group="g",
        booted_slot="USR-A",
        booted_version="1.0.0",
        state="IDLE",
        staged_version="",
        last_check=1,
        last_error_kind="",
        lock_held=None,
        updated=NOW,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def kv(key: str, value: bytes) -> KeyValue:
    return KeyValue(key, value, 1, 1)


def snap(*hosts: HostRecord, **kw: object) -> FleetSnapshot:
    args: dict[str, object] = {"hosts": hosts, "locks": {}, "failed": {}, "read_at": NOW}
    args.update(kw)
    return FleetSnapshot(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "holding", "want"),
    [
        ({}, False, "behind"),
        ({"booted_version": "2.0.0"}, False, "current"),
        ({"state": "DOWNLOADING"}, False, "updating"),
        ({"state": "UPDATED_NEED_REBOOT", "staged_version": "2.0.0"}, False, "staged"),
        ({"state": "UPDATED_NEED_REBOOT"}, True, "rebooting"),
        ({"blocked_version": "2.0.0"}, True, "refusing"),
        ({"last_error_kind": "timeout", "blocked_version": "2.0.0"}, True, "failing"),
        ({"booted_version": "2.0.0", "last_error_kind": "expired"}, False, "failing"),
    ],
)
def test_phase(fields: dict[str, object], holding: bool, want: str) -> None:
    assert phase(rec("a", **fields), "2.0.0", holding) == want


@pytest.mark.parametrize(
    ("hosts", "blocked", "want"),
    [
        ((), (), ""),
        ((("1.0.0", ""), ("1.10.0", ""), ("1.9.0", "")), (), "1.10.0"),  # version order
        ((("1.0.0", "1.1.0"),), (), "1.1.0"),  # staged counts
        ((("1.0.0", "1.1.0"),), ("1.1.0",), "1.0.0"),  # blocked in the group: not the target
        ((("<b>", ""), ("1.0.0", "")), (), "1.0.0"),  # a made-up version is never the target
    ],
)
def test_target_version(
    hosts: tuple[tuple[str, str], ...], blocked: tuple[str, ...], want: str
) -> None:
    records = [rec(str(i), booted_version=b, staged_version=s) for i, (b, s) in enumerate(hosts)]
    bad = decide("x", FailedRecord("x", (Failure("h", "rolled_back", 1),)), 1)
    failed = {"g": tuple(dataclasses.replace(bad, version=v) for v in blocked)}
    assert target_version(snap(*records, failed=failed)) == want


def test_parse_hosts_keeps_what_cannot_be_read() -> None:
    good = rec("a")
    hosts, bad = parse_hosts(
        [
            kv(HOSTS_PREFIX + "a", good.encode()),
            kv(HOSTS_PREFIX + "b", good.encode()),  # under another host's key
            kv(HOSTS_PREFIX + "c", b"\xff"),
            kv(HOSTS_PREFIX + "d", b'{"id": 1}'),
        ]
    )
    assert hosts == [good]
    assert [u.key for u in bad] == [HOSTS_PREFIX + k for k in "bcd"]
    assert all(u.as_dict()["error"] for u in bad)


def test_parse_locks() -> None:
    sem = Semaphore(2, ("a", "b c")).encode()
    locks, bad = parse_locks(
        [
            kv(KEY_PREFIX + "g/v1/semaphore", sem),
            kv(KEY_PREFIX + "g/v1/holders/a", encode_since(NOW - 10)),
            kv(KEY_PREFIX + "g/v1/holders/b%20c", b'{"since":' + b"9" * 400 + b"}"),  # no time
            kv(KEY_PREFIX + "h/v1/semaphore", b'{"total_slots":-1,"holders":[]}'),
            kv(KEY_PREFIX + "odd-key", b"x"),
            kv(KEY_PREFIX + "g/v1/other", b"x"),  # airlock's own: ignored
        ]
    )
    st = locks["g"].status
    assert st is not None and st.total_slots == 2
    assert [(h.id, h.since) for h in st.holders] == [("a", NOW - 10), ("b c", None)]
    assert locks["h"].status is None and "out of range" in locks["h"].error
    assert [u.key for u in bad] == [KEY_PREFIX + "odd-key"]
    view = groups_view(snap(rec("a"), locks=locks), stale_after_s=5)
    g = {x["group"]: x for x in view["groups"]}["g"]
    assert g["holders"] == [
        {"id": "a", "hostname": "n-a", "age_s": 10.0, "stale": True},
        {"id": "b c", "hostname": None, "age_s": None, "stale": False},
    ]
    assert g["oldest_holder_age_s"] == 10.0 and g["free_slots"] == 0


def test_parse_failed() -> None:
    good = FailedRecord("1.2.0", (Failure("h1", "check_failed", 5),))
    failed, bad = parse_failed(
        [
            kv("updater/v1/groups/g/failed/1.2.0", good.encode()),
            kv("updater/v1/groups/g/failed/1.3.0", b"[]"),
            kv("updater/v1/groups/g/failed/..%2F..", good.encode()),
            kv("updater/v1/groups/g/something-else", b"x"),
        ],
        max_failures=2,
    )
    verdicts = {v.version: v for v in failed["g"]}
    assert not verdicts["1.2.0"].blocked and verdicts["1.2.0"].hosts == 1  # 1 of 2
    assert verdicts["1.3.0"].blocked and verdicts["../.."].blocked  # unreadable: fail safe
    assert len(bad) == 2


def test_versions_view() -> None:
    hosts = [
        rec("a", booted_version="1.0.0"),
        rec("b", booted_version="1.10.0"),
        rec("c", booted_version="1.10.0", state="UPDATED_NEED_REBOOT", staged_version="1.11.0"),
        rec("d", booted_version=""),
    ]
    v = versions_view(snap(*hosts))
    assert v["target_version"] == "1.11.0"
    assert [x["version"] for x in v["versions"]] == ["1.10.0", "1.0.0", "?"]
    assert v["versions"][0]["states"] == {"IDLE": 1, "UPDATED_NEED_REBOOT": 1}
    assert v["progress"] == {"on_target": 0, "staged": 1, "hosts": 4, "fraction": 0.0}
    assert versions_view(snap())["progress"]["fraction"] is None


def test_long_strings_are_cut() -> None:
    h = hosts_view(snap(rec("a", hostname="x" * 10_000, last_error="y" * 10_000)))["hosts"][0]
    assert len(h["hostname"]) == 500 and h["hostname"].endswith("\u2026")
    assert len(h["last_error"]) == 500


@pytest.mark.parametrize("version", ['1"0', "1\\0", "1\n0", "<script>", "x" * 1000, "\u00e9\u2028"])
def test_metrics_escape_label_values(version: str) -> None:
    text = metrics_text(
        snap(rec("a", booted_version=version, state='I"D\nLE')), up=True, stale_after_s=60
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    sample = families["updater_fleet_hosts"].samples[0]
    want = version if len(version) <= MAX_LABEL else version[: MAX_LABEL - 1] + "\u2026"
    assert sample.labels == {"group": "g", "version": want, "state": 'I"D\nLE'}
    assert sample.value == 1


def test_metrics_when_etcd_was_never_read() -> None:
    assert metrics_text(None, up=False, stale_after_s=60) == (
        "# HELP updater_fleet_up 1 when the last read of etcd succeeded\n"
        "# TYPE updater_fleet_up gauge\nupdater_fleet_up 0\n"
    )
