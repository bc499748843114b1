"""`updatectl fleet serve`: the read-only dashboard API over a real etcd holding 200
simulated hosts (devtools/fleetsim.py), real reboot slots and failed versions; hostile
records; methods that would change something; the bearer token; TLS; the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devtools.etcd import EtcdNode, free_port
from devtools.fleetsim import GROUPS, IMG, NEW, OLD, SCRIPT, FleetWriter, fleet, host_id, hostile
from devtools.tls import make_tls
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdtxn import b64
from policies.fleet import HOSTS_PREFIX, HostRecord
from policies.fleetserve import (
    EtcdReads,
    FleetCache,
    FleetServer,
    ServeSettings,
    read_token,
    serving,
)
from tests.conftest import updatectl
from updater import compose, config
from updater.agentapi import AgentStatus
from updater.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
N = 200
STALE_AFTER_S = 3600.0


def start(
    endpoints: tuple[str, ...], *, token: str | None = None, tls: tuple[Path, Path] | None = None
) -> tuple[FleetServer, EtcdClient]:
    client = EtcdClient(EtcdSettings(endpoints=endpoints, timeout_s=2))
    cache = FleetCache(EtcdReads(client, 1), refresh_s=0.2, stale_after_s=STALE_AFTER_S)
    settings = ServeSettings(
        port=0,
        token=token,
        tls_cert=None if tls is None else tls[0],
        tls_key=None if tls is None else tls[1],
    )
    return FleetServer(settings, cache), client


@pytest.fixture(scope="module")
def populated(etcd: EtcdNode) -> Iterator[tuple[list[HostRecord], float]]:
    """200 hosts; two of db's hosts hold slots (one for two hours: stale); a failed
    version in web."""
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    now = time.time()
    hosts = fleet(N, now)
    w = FleetWriter(client)
    w.put_all(hosts)
    assert w.take_slot("db", host_id(3), since=now - 7200)  # stale
    assert w.take_slot("db", host_id(7), since=now - 60)
    assert w.take_slot("web", "airlock-host", since=now - 30)  # not in the records
    w.fail("web", "1.2.0", host_id(0), "check_failed", now - 100)
    yield hosts, now
    client.close()


@pytest.fixture
def server(etcd: EtcdNode, populated: object) -> Iterator[FleetServer]:
    srv, client = start(etcd.endpoints)
    with contextlib.closing(client), serving(srv):
        yield srv


def get(srv: FleetServer, path: str, **kw: object) -> requests.Response:
    return requests.get(srv.url + path, timeout=10, **kw)  # type: ignore[arg-type]


def test_hosts_200(server: FleetServer, populated: tuple[list[HostRecord], float]) -> None:
    hosts, _ = populated
    r = get(server, "/api/v1/hosts")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json()
    rows = {h["hostname"]: h for h in doc["hosts"]}
    assert len(rows) == N and doc["unreadable"] == [] and doc["target_version"] == NEW
    for h in hosts:
        row = rows[h.hostname]
        assert (row["id"], row["group"], row["booted_version"], row["state"]) == (
            h.id,
            h.group,
            h.booted_version,
            h.state,
        )
        assert row["strategy"] == h.strategy and row["last_error"] == h.last_error
    assert rows["host-003"]["phase"] == "rebooting" and rows["host-003"]["held_for_s"] >= 7200
    assert rows["host-002"]["phase"] == "staged" and rows["host-001"]["phase"] == "behind"
    assert rows["host-007"]["phase"] == "failing"  # a failing host holding a slot: failing first
    assert rows["host-007"]["last_error_kind"] == "timeout"
    assert rows["host-000"]["phase"] == "current" and rows["host-005"]["phase"] == "updating"
    assert all((r["lock_held"] is None) == (r["strategy"] != "lock") for r in doc["hosts"])
    want_phases = Counter(
        "failing"
        if h.last_error_kind
        else "rebooting"
        if h.id in (host_id(3), host_id(7))
        else "staged"
        if h.state == "UPDATED_NEED_REBOOT"
        else "updating"
        if h.state == "DOWNLOADING"
        else "current"
        if h.booted_version == NEW
        else "behind"
        for h in hosts
    )
    assert Counter(r["phase"] for r in doc["hosts"]) == want_phases


def test_versions_and_rollout_progress(
    server: FleetServer, populated: tuple[list[HostRecord], float]
) -> None:
    hosts, _ = populated
    doc = get(server, "/api/v1/versions").json()
    on_new = sum(1 for h in hosts if h.booted_version == NEW)
    assert doc["target_version"] == NEW
    assert doc["progress"] == {
        "on_target": on_new,
        "staged": sum(1 for h in hosts if h.staged_version == NEW),
        "hosts": N,
        "fraction": round(on_new / N, 4),
    }
    assert [v["version"] for v in doc["versions"]] == [NEW, OLD]  # newest first
    old = doc["versions"][1]
    assert old["hosts"] == N - on_new
    assert old["states"] == dict(
        sorted(Counter(h.state for h in hosts if h.booted_version == OLD).items())
    )


def test_groups_holders_ages_and_failed_versions(
    server: FleetServer, populated: tuple[list[HostRecord], float]
) -> None:
    hosts, now = populated
    doc = get(server, "/api/v1/groups").json()
    groups = {g["group"]: g for g in doc["groups"]}
    assert set(groups) == set(GROUPS)
    db, web = groups["db"], groups["web"]
    assert db["hosts"] == sum(1 for h in hosts if h.group == "db") and db["total_slots"] == 2
    held = {h["hostname"]: h for h in db["holders"]}
    assert set(held) == {"host-003", "host-007"} and db["free_slots"] == 0
    assert held["host-003"]["stale"] and held["host-003"]["age_s"] >= 7200
    assert not held["host-007"]["stale"] and 60 <= held["host-007"]["age_s"] < 7200
    assert db["oldest_holder_age_s"] == held["host-003"]["age_s"]
    assert web["holders"] == [
        {
            "id": "airlock-host",
            "hostname": None,
            "age_s": web["holders"][0]["age_s"],
            "stale": False,
        }
    ]
    assert web["failed_versions"] == [
        {
            "version": "1.2.0",
            "blocked": True,
            "hosts": 1,
            "failures": [{"host": host_id(0), "kind": "check_failed", "at": round(now - 100, 3)}],
            "malformed": None,
        }
    ]


def test_metrics(server: FleetServer, populated: tuple[list[HostRecord], float]) -> None:
    hosts, _ = populated
    r = get(server, "/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(
        "text/plain; version=0.0.4"
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    assert samples[("updater_fleet_up", ())] == 1
    by = Counter((h.group, h.booted_version, h.state) for h in hosts)
    for (g, v, s), n in by.items():
        key = ("updater_fleet_hosts", (("group", g), ("state", s), ("version", v)))
        assert samples[key] == n
    assert samples[("updater_fleet_lock_holders", (("group", "db"),))] == 2
    assert samples[("updater_fleet_lock_stale_holders", (("group", "db"),))] == 1
    assert samples[("updater_fleet_lock_oldest_holder_age_seconds", (("group", "db"),))] >= 7200
    assert samples[("updater_fleet_hosts_failing", (("kind", "timeout"),))] == sum(
        1 for h in hosts if h.last_error_kind == "timeout"
    )
    assert samples[("updater_fleet_target_info", (("version", NEW),))] == 1
    blocked = (
        "updater_fleet_failed_version_hosts",
        (("blocked", "true"), ("group", "web"), ("version", "1.2.0")),
    )
    assert samples[blocked] == 1


def test_etag_answers_304_until_the_fleet_is_read_again(server: FleetServer) -> None:
    r = get(server, "/api/v1/versions")
    etag = r.headers["ETag"]
    server.cache.refresh_s = 3600  # hold the cache still
    time.sleep(0.5)
    r = get(server, "/api/v1/versions")
    etag = r.headers["ETag"]
    again = get(server, "/api/v1/versions", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    "method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"]
)
@pytest.mark.parametrize("path", ["/api/v1/hosts", "/metrics", "/", "/api/v1/groups"])
def test_read_only(server: FleetServer, etcd: EtcdNode, method: str, path: str) -> None:
    """Nothing but GET and HEAD is served, and etcd's revision does not move."""
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    with contextlib.closing(client):
        before = FleetWriter(client).revision()
        r = requests.request(method, server.url + path, data=b'{"total_slots":9}', timeout=10)
        assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
        assert r.json()["error"] == "method_not_allowed"
        assert FleetWriter(client).revision() == before
    assert requests.head(server.url + path, timeout=10).status_code == 200


def test_unknown_paths_are_404(server: FleetServer) -> None:
    for path in ("/api/v1/hosts/x", "/api/v2/hosts", "/../etc/passwd", "/static/../setup.cfg"):
        assert get(server, path).status_code == 404


def test_the_page_and_its_headers(server: FleetServer) -> None:
    r = get(server, "/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css"):
        assert get(server, asset).status_code == 200
    assert "http" not in get(server, "/static/app.js").text.replace("https://", "").split("//")[0]
    page = r.text + get(server, "/static/style.css").text
    assert "://" not in page  # nothing from another origin (no CDN)


def test_token(etcd: EtcdNode, populated: object, tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s3cret-token\n")
    srv, client = start(etcd.endpoints, token=read_token(f))
    with contextlib.closing(client), serving(srv):
        for path in ("/api/v1/hosts", "/metrics"):
            assert get(srv, path).status_code == 401
            bad = get(srv, path, headers={"Authorization": "Bearer s3cret-tokeN"})
            assert bad.status_code == 401 and bad.headers["WWW-Authenticate"].startswith("Bearer")
            assert (
                get(srv, path, headers={"Authorization": "Basic s3cret-token"}).status_code == 401
            )
            ok = get(srv, path, headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status_code == 200
        assert get(srv, "/").status_code == 200  # the page holds no data


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"", "invalid"),
        (b"two words", "invalid"),
        (b"\xff\xfe", "invalid"),
        (b"x" * 5000, "invalid"),
    ],
)
def test_bad_token_files(tmp_path: Path, content: bytes, kind: str) -> None:
    f = tmp_path / "token"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_token(f)
    assert err.value.kind == kind and err.value.file == str(f)
    with pytest.raises(ConfigError) as err:
        read_token(tmp_path / "missing")
    assert err.value.kind == "unreadable"


def test_tls(etcd: EtcdNode, populated: object, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    srv, client = start(etcd.endpoints, tls=(tls.server_cert, tls.server_key))
    with contextlib.closing(client), serving(srv):
        assert srv.url.startswith("https://")
        r = requests.get(srv.url + "/api/v1/hosts", verify=str(tls.ca_cert), timeout=10)
        assert r.status_code == 200 and len(r.json()["hosts"]) == N
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(srv.url + "/api/v1/hosts", timeout=10)  # not the system's CA


def test_etcd_down_is_503_and_up_0() -> None:
    srv, client = start((f"http://127.0.0.1:{free_port()}",))
    with contextlib.closing(client), serving(srv):
        r = get(srv, "/api/v1/hosts")
        assert r.status_code == 503 and r.json()["error"] == "etcd_unavailable"
        assert "updater_fleet_up 0" in get(srv, "/metrics").text


# ---- hostile records ---------------------------------------------------------------------------


@pytest.fixture
def hostile_etcd() -> Iterator[tuple[EtcdNode, float]]:
    with EtcdNode() as node:
        client = EtcdClient(EtcdSettings(endpoints=node.endpoints, timeout_s=5))
        with contextlib.closing(client):
            now = time.time()
            w = FleetWriter(client)
            w.put_all(fleet(20, now))
            hostile(w, now)
        yield node, now


def test_hostile_records_are_shown_as_unreadable_or_as_text(
    hostile_etcd: tuple[EtcdNode, float],
) -> None:
    node, _ = hostile_etcd
    srv, client = start(node.endpoints)
    before = FleetWriter(client).revision()
    with contextlib.closing(client), serving(srv):
        r = get(srv, "/api/v1/hosts")
        assert r.status_code == 200
        assert b"<" not in r.content and b">" not in r.content  # escaped in the JSON itself
        doc = r.json()
        rows = {h["id"]: h for h in doc["hosts"]}
        assert len(rows) == 21  # the 20 and the one with markup in its fields
        evil = rows["e" * 32]
        assert evil["hostname"] == IMG and evil["booted_version"] == SCRIPT  # the same text
        assert len(evil["last_error"]) <= 500
        bad = {u["key"]: u["error"] for u in doc["unreadable"]}
        assert set(bad) == {
            HOSTS_PREFIX + "not-json",
            HOSTS_PREFIX + "array",
            HOSTS_PREFIX + "nan",
            HOSTS_PREFIX + "deep",
            HOSTS_PREFIX + "huge",
            HOSTS_PREFIX + "f" * 32,
            "updater/v1/groups/web/failed/9.9.9",
        }
        assert "another host" in bad[HOSTS_PREFIX + "f" * 32]
        assert all(len(e) <= 500 for e in bad.values())
        assert len(r.content) < 64 * 1024  # the megabyte record is not passed on
        groups = {g["group"]: g for g in get(srv, "/api/v1/groups").json()["groups"]}
        assert "total_slots" in groups["broken"]["lock_error"]
        assert groups["web"]["failed_versions"][0]["blocked"]  # unreadable: blocks (fail safe)
        metrics = get(srv, "/metrics").text
        families = list(text_string_to_metric_families(metrics))  # still parses
        assert any(f.name == "updater_fleet_records_unreadable" for f in families)
        assert "updater_fleet_records_unreadable 7" in metrics
        assert 'updater_fleet_lock_malformed{group="broken"} 1' in metrics
        assert srv.requests and not [p for _, p in srv.requests if "pwned" in p]
        assert {u["kind"] for u in doc["unreadable"]} == {"malformed"}
        assert FleetWriter(client).revision() == before  # nothing repaired, nothing written


# ---- every host publishes, whatever its strategy (a real agent's reporter) --------------------


@pytest.mark.parametrize("strategy", ["immediate", "off"])
def test_hosts_without_the_etcd_lock_publish_their_record(
    etcd: EtcdNode, tmp_path: Path, strategy: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        f'[reboot]\nstrategy = "{strategy}"\n[etcd]\nendpoints = ["{etcd.endpoints[0]}"]\n'
    )
    cfg = config.load(f)
    hid = os.urandom(16).hex()
    reporter = compose.fleet_reporter(cfg, holder=hid)
    assert reporter is not None
    status = AgentStatus(
        "REPORTING_ERROR_EVENT", "USR-A", "1.0.0", "", "", 0, 0.0, "timeout", "x" * 900, 1, 1
    )
    reporter.report(status, None)
    srv, client = start(etcd.endpoints)
    with contextlib.closing(client), serving(srv):
        rows = {h["id"]: h for h in get(srv, "/api/v1/hosts").json()["hosts"]}
    assert rows[hid]["strategy"] == strategy and rows[hid]["lock_held"] is None
    assert rows[hid]["last_error"] == "x" * 500 and rows[hid]["phase"] == "failing"


# ---- the command ---------------------------------------------------------------------------


def test_cli_serves_until_sigterm(etcd: EtcdNode, populated: object, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[etcd]\nendpoints = ["{etcd.endpoints[0]}"]\n')
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "updater.cli",
            "--config",
            str(cfg),
            "fleet",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token),
            "--refresh",
            "0.5",
            "--log",
            "json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line == f"Fleet dashboard on http://127.0.0.1:{port}/\n"
        r = requests.get(
            f"http://127.0.0.1:{port}/api/v1/hosts",
            headers={"Authorization": "Bearer t0ken"},
            timeout=10,
        )
        assert r.status_code == 200 and len(r.json()["hosts"]) >= N
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["--listen", "nowhere"],
        ["--listen", "unix:/run/x.sock"],
        ["--refresh", "0"],
        ["--refresh", "nan"],
        ["--stale-after", "-1"],
        ["--tls-cert", "/nonexistent.pem"],
        ["--token-file", "/nonexistent-token"],
    ],
)
def test_cli_refuses_bad_options(tmp_path: Path, args: list[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    r = updatectl(None, "--config", str(cfg), "fleet", "serve", "--listen", "127.0.0.1:0", *args)
    assert r.code == 3, r.err
    assert "error" in r.err.lower() or r.err


def test_etcd_lost_after_a_read_serves_the_last_read_marked_down() -> None:
    with EtcdNode() as node:
        client = EtcdClient(EtcdSettings(endpoints=node.endpoints, timeout_s=1))
        FleetWriter(client).put_all(fleet(10, time.time()))
        cache = FleetCache(EtcdReads(client, 1), refresh_s=3600, stale_after_s=STALE_AFTER_S)
        srv = FleetServer(ServeSettings(port=0), cache)
        with contextlib.closing(client), serving(srv):
            assert get(srv, "/api/v1/fleet").json()["up"] is True
            node.kill(0)
            cache.refresh()
            doc = get(srv, "/api/v1/fleet").json()
            assert doc["up"] is False and len(doc["hosts"]["hosts"]) == 10
            assert "updater_fleet_up 0" in get(srv, "/metrics").text
            assert cache.error  # why, for the log and the next answers
            node.restart(0)
            cache.refresh()
            assert get(srv, "/api/v1/fleet").json()["up"] is True and not cache.error


def test_reads_decode_only_what_changed(etcd: EtcdNode, group: str) -> None:
    """Records are decoded again only when their revision moved; deleted keys are
    forgotten."""
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    with contextlib.closing(client):
        w = FleetWriter(client)
        mine = [
            dataclasses.replace(h, id=f"{group}-{i}", group=group)
            for i, h in enumerate(fleet(3, time.time()))
        ]
        w.put_all(mine)
        reads = EtcdReads(client, 1)
        first = {h.id: h for h in reads.read(time.time()).hosts if h.group == group}
        w.change(mine[0], booted_version="9.9.9")
        client.call("kv/deleterange", {"key": b64(HOSTS_PREFIX + mine[1].id)})
        second = {h.id: h for h in reads.read(time.time()).hosts if h.group == group}
        assert second[mine[0].id].booted_version == "9.9.9"
        assert mine[1].id not in second and HOSTS_PREFIX + mine[1].id not in reads._decoded
        assert second[mine[2].id] is first[mine[2].id]  # the same object: not decoded again
