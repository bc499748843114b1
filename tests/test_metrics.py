"""Metrics scraped over real HTTP (TCP loopback and a Unix socket) and parsed
with prometheus-client's own parser."""

from __future__ import annotations

import http.client
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from updater.agentapi import STATES
from updater.errors import ConfigError, RefusedError
from updater.listen import parse_listen
from updater.metrics import OTHER_KIND, Metrics, MetricsServer, error_kinds

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(self.path))


def get(server: MetricsServer, path: str = "/metrics") -> tuple[int, str, str]:
    conn: http.client.HTTPConnection
    if server.address.family == "unix":
        assert server.address.path is not None
        conn = UnixHTTPConnection(server.address.path)
    else:
        conn = http.client.HTTPConnection(server.address.host, server.address.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def exercised() -> Metrics:
    m = Metrics()
    m.state_changed("CHECKING_FOR_UPDATE", 1000.0)
    m.checked(1001.5)
    m.state_changed("DOWNLOADING", 1002.0)
    m.installed(raw_bytes=8 * 1024 * 1024, seconds=2.5)
    m.installed(raw_bytes=1024, seconds=0.5)
    m.state_changed("UPDATED_NEED_REBOOT", 1010.0)
    m.check_failed("connection")
    m.check_failed("connection")
    m.check_failed("signature_invalid")
    m.error("io")
    m.error("made-up kind")  # counted, but under a bounded label
    m.reboot_requested()
    m.reboot_requested()
    m.reboot_refused()
    m.rollback("1.1.0")
    m.rollback("1.2.0")
    return m


def test_every_metric_over_tcp_loopback() -> None:
    with exercised().serve("127.0.0.1:0") as server:
        assert server.address.port > 0
        code, ctype, body = get(server)
    assert code == 200 and ctype.startswith("text/plain")
    s = parse(body)
    for state in STATES:
        assert value(s, "updater_state", state=state) == (state == "UPDATED_NEED_REBOOT")
    assert value(s, "updater_last_state_change_timestamp_seconds") == 1010.0
    assert value(s, "updater_last_check_timestamp_seconds") == 1001.5
    assert value(s, "updater_checks_total") == 4
    assert value(s, "updater_check_failures_total", kind="connection") == 2
    assert value(s, "updater_check_failures_total", kind="signature_invalid") == 1
    assert value(s, "updater_errors_total", kind="connection") == 2
    assert value(s, "updater_errors_total", kind="io") == 1
    assert value(s, "updater_errors_total", kind=OTHER_KIND) == 1
    assert value(s, "updater_installs_total") == 2
    assert value(s, "updater_installed_bytes_total") == 8 * 1024 * 1024 + 1024
    assert value(s, "updater_install_seconds_total") == 3.0
    assert value(s, "updater_rollbacks_total") == 2
    assert value(s, "updater_last_rollback_info", version="1.2.0") == 1
    assert ("updater_last_rollback_info", frozenset({("version", "1.1.0")})) not in s
    assert value(s, "updater_reboots_requested_total") == 2
    assert value(s, "updater_reboots_refused_total") == 1


def test_fresh_metrics_start_at_zero_and_idle_state_is_known() -> None:
    s = parse(Metrics().render().decode())
    assert value(s, "updater_checks_total") == 0
    assert value(s, "updater_last_check_timestamp_seconds") == 0
    assert all(value(s, "updater_state", state=st) == 0 for st in STATES)


def test_unknown_state_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown state"):
        Metrics().state_changed("SLEEPING", 1.0)


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.reboot_requested()
    assert value(parse(b.render().decode()), "updater_reboots_requested_total") == 0


def test_error_kinds_are_the_error_hierarchy() -> None:
    kinds = error_kinds()
    assert {"connection", "hash_mismatch", "check_timeout", "internal", "busy", "policy"} <= kinds
    assert OTHER_KIND not in kinds


def test_ipv6_loopback_and_other_paths() -> None:
    m = Metrics()
    try:
        server = m.serve("[::1]:0")
    except OSError as exc:  # a host without IPv6
        pytest.skip(f"no IPv6 loopback: {exc}")
    with server:
        assert server.url.startswith("http://[::1]:")
        assert get(server)[0] == 200
        assert get(server, "/")[0] == 200
        assert get(server, "/nothing")[0] == 404


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "updater" / "metrics.sock"  # parents are created
    m = Metrics()
    m.reboot_refused()
    with m.serve(f"unix:{path}") as server:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
        code, _, body = get(server)
        assert code == 200
        assert value(parse(body), "updater_reboots_refused_total") == 1
        m.reboot_refused()  # live values, not a snapshot
        assert value(parse(get(server)[2]), "updater_reboots_refused_total") == 2
        assert not list(path.parent.glob(".*.tmp"))
    assert not path.exists()  # removed on close


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a crashed agent leaves
    stale.close()
    with Metrics().serve(f"unix:{path}") as server:
        assert get(server)[0] == 200


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    with Metrics().serve(f"unix:{path}") as first:
        with pytest.raises(RefusedError) as err:
            Metrics().serve(f"unix:{path}")
        assert err.value.kind == "busy"
        assert get(first)[0] == 200


def test_a_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        Metrics().serve(f"unix:{path}")
    assert path.read_text() == "precious"


def test_close_stops_the_thread_and_frees_the_port() -> None:
    before = {t.name for t in threading.enumerate()}
    server = Metrics().serve("127.0.0.1:0")
    port = server.address.port
    assert "metrics-http" in {t.name for t in threading.enumerate()}
    assert get(server)[0] == 200
    server.close()
    server.close()  # idempotent
    assert {t.name for t in threading.enumerate()} <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:9464",
        "192.168.1.10:9464",
        "[::]:9464",
        "localhost:9464",
        "::1:9464",
        "127.0.0.1",
        "127.0.0.1:http",
        "127.0.0.1:70000",
        "unix:relative.sock",
        "unix:/",
        "unix:/" + "x" * 120,
        "",
        "127.0.0.1:\u00b2",  # isdigit() is true for it, int() refuses it: was a ValueError
        "127.0.0.1:\u0669\u0664\u0666\u0664",  # Arabic-Indic digits: int() takes them
        "127.0.0.1:\uff19\uff14\uff16\uff14",  # fullwidth digits
        "127.0.0.1:0",  # any free port: nobody could scrape it
        "127.0.0.1:65536",
        "127.0.0.1:009464",
        "127.0.0.1:-1",
        "127.0.0.1:+9464",
        "127.0.0.1: 9464",
        "127.0.0.1:9464\n",
        " 127.0.0.1:9464",
        "127.000.000.001:9464",
        "127.1:9464",
        "[::1%lo]:9464",
        "[::1]",
        "[::1]:",
        "[127.0.0.1]:9464",
        "[::ffff:127.0.0.1]:9464",
        "[[::1]]:9464",
        "\u0661\u0662\u0667.0.0.1:9464",
        "unix:/run/a\x00b.sock",
        "unix:/run/dir/",
        "unix:/run/..",
        "unix:/run/a\nb.sock",
        "unix:/run/\udcff\ud800.sock",
        "unix:" + "/x" * 60,
    ],
)
def test_refused_addresses(listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_listen(listen, key="metrics.listen")
    assert err.value.kind == "invalid"
    assert err.value.key == "metrics.listen"
    assert err.value.hint is not None and "127.0.0.1" in err.value.hint


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", "127.0.0.1:9464"),
        ("127.0.0.53:1", "127.0.0.53:1"),
        ("[::1]:9464", "[::1]:9464"),
        ("unix:/run/updater/metrics.sock", "unix:/run/updater/metrics.sock"),
    ],
)
def test_accepted_addresses(listen: str, expected: str) -> None:
    assert str(parse_listen(listen)) == expected


def test_port_zero_only_when_allowed() -> None:
    assert parse_listen("127.0.0.1:0", allow_port_zero=True).port == 0
    assert parse_listen("[::1]:0", allow_port_zero=True).port == 0


@pytest.mark.parametrize("listen", ["127.0.0.1:\u00b2", "unix:/run/a\x00b.sock", "[::1"])
def test_serve_refuses_a_bad_address_with_the_typed_error(listen: str) -> None:
    """What the agent calls at start, when no config check ran before it."""
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ConfigError) as err:
        Metrics().serve(listen)
    assert err.value.kind == "invalid"
    assert {t.name for t in threading.enumerate()} <= before


def test_no_fd_leak_over_many_scrapes() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with Metrics().serve("127.0.0.1:0") as server:
        for _ in range(20):
            assert get(server)[0] == 200
    assert len(os.listdir("/proc/self/fd")) == fds


def test_lock_gauges_while_waiting_for_a_slot() -> None:
    m = Metrics()
    since = time.time() - 100
    m.lock_waiting("web", holders=2, slots=2, oldest_since=since)
    s = parse(m.render().decode())
    assert value(s, "updater_lock_holders", group="web") == 2
    assert value(s, "updater_lock_slots", group="web") == 2
    age = value(s, "updater_lock_oldest_holder_age_seconds", group="web")
    assert 100 <= age < 200  # computed when scraped
    m.lock_waiting("web", holders=1, slots=2, oldest_since=None)  # an age nobody knows
    s = parse(m.render().decode())
    assert value(s, "updater_lock_holders", group="web") == 1
    assert ("updater_lock_oldest_holder_age_seconds", frozenset({("group", "web")})) not in s
    m.lock_waiting("web", holders=2, slots=2, oldest_since=since)
    m.lock_not_waiting("web")  # granted: the series go
    m.lock_not_waiting("db")  # never waited: nothing to remove
    s = parse(m.render().decode())
    assert not [k for k in s if k[0].startswith("updater_lock_")]
