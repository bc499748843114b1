"""Transports and the resumable download against real servers on loopback:
http, https with a private CA, file://; retries, conditional GETs, Range."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from devtools.host import Host, write_config
from devtools.repo_server import Fault, RepoServer
from devtools.tls import TLSFiles, make_tls
from tests.conftest import Repo, updatectl
from tests.test_cycle import within
from updater import compose, config, download
from updater.errors import ConfigError, DownloadError
from updater.transport import (
    FileTransport,
    HttpSettings,
    HttpTransport,
    SchemeTransport,
    SpeedFloor,
)

DATA = os.urandom(3 * 1024 * 1024 + 17)
T = TypeVar("T")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RepoServer]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(DATA)
    with RepoServer(tmp_path / "www") as srv:
        yield srv


def fast(**kw: float) -> HttpTransport:
    return HttpTransport(
        HttpSettings(
            connect_timeout_s=2,
            read_timeout_s=kw.get("read", 2),
            retries=int(kw.get("retries", 2)),
            min_speed_bytes_s=kw.get("min_speed", 1024),
            min_speed_window_s=kw.get("window", 60),
        )
    )


def fetch_all(
    transport: HttpTransport | FileTransport | SchemeTransport,
    url: str,
    size: int = len(DATA),
    resume_attempts: int = 5,
) -> bytes:
    chunks = download.Download(
        transport, url, size=size, backoff_s=0.01, resume_attempts=resume_attempts
    )
    return b"".join(chunks)


def test_get_and_conditional_get(served: RepoServer) -> None:
    t = fast()
    first = t.get(served.url + "/blob", max_bytes=len(DATA))
    assert first.body == DATA and first.etag
    again = t.get(served.url + "/blob", max_bytes=len(DATA), etag=first.etag)
    assert again.not_modified
    assert [r.status for r in served.requests] == [200, 304]


def test_get_caps_the_size(served: RepoServer) -> None:
    with pytest.raises(DownloadError) as err:
        fast().get(served.url + "/blob", max_bytes=1000)
    assert err.value.kind == "too_much_data"


def test_retries_server_errors(served: RepoServer) -> None:
    served.fault("/blob", Fault(status=503, status_times=2))
    assert fast(retries=3).get(served.url + "/blob", max_bytes=len(DATA)).body == DATA
    assert [r.status for r in served.requests] == [503, 503, 200]


def test_gives_up_after_retries(served: RepoServer) -> None:
    served.fault("/blob", Fault(status=503))
    with pytest.raises(DownloadError) as err:
        fast(retries=1).get(served.url + "/blob", max_bytes=len(DATA))
    assert err.value.kind == "http_status"
    assert len(served.requests) == 2


def test_not_found_is_not_retried(served: RepoServer) -> None:
    with pytest.raises(DownloadError) as err:
        fast().get(served.url + "/nothing", max_bytes=10)
    assert (err.value.kind, err.value.status) == ("http_status", 404)
    assert len(served.requests) == 1


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening
        with pytest.raises(DownloadError) as err:
            fast(retries=0).get(f"http://127.0.0.1:{port}/x", max_bytes=10)
    assert err.value.kind == "connection"


def test_stream_resumes_with_range(served: RepoServer) -> None:
    served.fault("/blob", Fault(drop_after=1_000_000, drop_times=2))
    assert fetch_all(fast(), served.url + "/blob") == DATA
    assert [r.headers.get("Range") for r in served.requests] == [
        None,
        "bytes=1000000-",
        "bytes=1000000-",
    ]


def test_stream_survives_a_server_that_ignores_range(served: RepoServer) -> None:
    served.fault("/blob", Fault(drop_after=1_000_000, drop_times=1, ignore_range=True))
    assert fetch_all(fast(), served.url + "/blob") == DATA
    assert [r.status for r in served.requests] == [200, 200]


def test_stream_refuses_a_longer_file(served: RepoServer) -> None:
    with pytest.raises(DownloadError) as err:
        fetch_all(fast(), served.url + "/blob", size=len(DATA) - 1)
    assert err.value.kind == "too_much_data"  # from Content-Length, before any byte is read


def test_stream_of_a_shorter_file_fails_after_resumes(served: RepoServer) -> None:
    with pytest.raises(DownloadError) as err:
        fetch_all(fast(), served.url + "/blob", size=len(DATA) + 10, resume_attempts=1)
    assert err.value.kind in ("connection", "http_status")


def test_stall_times_out(served: RepoServer) -> None:
    served.fault("/blob", Fault(stall_after=500_000, stall_s=30))
    with pytest.raises(DownloadError) as err:
        fetch_all(fast(read=0.3), served.url + "/blob", resume_attempts=1)
    assert err.value.kind == "timeout"


def test_file_transport(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(DATA)
    url = (tmp_path / "blob").as_uri()
    t = SchemeTransport()
    first = t.get(url, max_bytes=len(DATA))
    assert first.body == DATA
    assert t.get(url, max_bytes=len(DATA), etag=first.etag).not_modified
    assert fetch_all(t, url) == DATA
    stream = t.open_stream(url, start=10)
    assert stream.read(5) == DATA[10:15]
    stream.close()
    with pytest.raises(DownloadError) as err:
        t.get((tmp_path / "none").as_uri(), max_bytes=1)
    assert err.value.status == 404
    with pytest.raises(DownloadError) as err:
        t.get("ftp://example/x", max_bytes=1)
    assert err.value.kind == "unsupported_url"


def test_a_bounded_range(served: RepoServer) -> None:
    t = fast()
    stream = t.open_range(served.url + "/blob", start=1000, length=5000)
    assert stream is not None and (stream.start, stream.length) == (1000, 5000)
    got = b""
    while piece := stream.read(100_000):
        got += piece
    stream.close()
    assert got == DATA[1000:6000]
    (request,) = served.requests
    assert (request.headers["Range"], request.status) == ("bytes=1000-5999", 206)
    with pytest.raises(ValueError):
        t.open_range(served.url + "/blob", start=0, length=0)


def test_a_range_past_the_end_is_refused(served: RepoServer) -> None:
    with pytest.raises(DownloadError) as err:
        fast().open_range(served.url + "/blob", start=len(DATA), length=10)
    assert err.value.status == 416


def test_a_server_that_ignores_range_answers_none(served: RepoServer) -> None:
    served.fault("/blob", Fault(ignore_range=True))
    assert fast().open_range(served.url + "/blob", start=10, length=10) is None


def test_a_range_answered_with_other_bytes_is_refused(served: RepoServer) -> None:
    """A 206 whose Content-Range is not the range asked for (here: the server
    answers from the start as to ``bytes=a-``) is no place to cut frames from."""
    served.fault("/blob", Fault(ignore_range=True))
    t = fast()
    original = t.request

    def as_if_206(method: str, url: str, **kw: object) -> object:
        resp = original(method, url, **kw)  # type: ignore[arg-type]
        resp.status_code = 206
        resp.headers["Content-Range"] = f"bytes 0-{len(DATA) - 1}/{len(DATA)}"
        return resp

    t.request = as_if_206  # type: ignore[method-assign,assignment]
    with pytest.raises(DownloadError) as err:
        t.open_range(served.url + "/blob", start=10, length=10)
    assert err.value.kind == "http_status"


def test_file_transport_range(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(DATA)
    url = (tmp_path / "blob").as_uri()
    t = SchemeTransport()
    stream = t.open_range(url, start=7, length=100)
    assert stream is not None and stream.read(1000) == DATA[7:107] and stream.read(10) == b""
    stream.close()
    with pytest.raises(DownloadError) as err:
        t.open_range(url, start=len(DATA) - 5, length=10)
    assert err.value.status == 416


# ---- https with a private CA, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_repo(tmp_path: Path, repo: Repo, tls_files: TLSFiles) -> Iterator[RepoServer]:
    with RepoServer(repo.root, tls=tls_files.server_context()) as srv:
        yield srv


def test_https_cycle_with_a_private_ca(
    host: Host,
    repo: Repo,
    tls_repo: RepoServer,
    usr_images: dict[str, Path],
    tls_files: TLSFiles,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    assert tls_repo.url.startswith("https://")
    write_config(host, repo_url=tls_repo.url, keyring=repo.key.public_key)
    refused = updatectl(host, "check", "--json")
    assert refused.code == 5 and "TLS" in refused.err  # the system store does not know our CA
    host.config.write_text(
        host.config.read_text().replace(
            "[source]\n", f'[source]\nca_file = "{tls_files.ca_cert}"\n'
        )
    )
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    raw = usr_images["1.1.0"].read_bytes()
    assert (
        hashlib.sha256(host.slot_bytes("USR-B", len(raw))).digest() == hashlib.sha256(raw).digest()
    )


def test_file_repository_cycle(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    write_config(host, repo_url=repo.root.as_uri(), keyring=repo.key.public_key)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True
    assert repo.server.requests == []  # nothing went over HTTP


# ---- a server that trickles ---------------------------------------------------------------------
#
# One byte every 0.1 s keeps every read far under the read timeout: before the
# speed floor, such a transfer never ended (measured: a download of the 3 MiB
# blob trickling from byte 1 MB on would have taken 25 days).


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# reads as (bytes, seconds the read waited); does the floor (100 B/s over 10 s) give up?
FLOOR_CASES = [
    ([(1, 2.0)] * 4, False),  # 8 s: not a whole window yet
    ([(1, 2.0)] * 5, True),  # a trickle: 5 bytes in 10 s
    ([(1000, 10.0)], False),  # exactly the floor
    ([(999, 10.0)], True),
    ([(5000, 1.0), (1, 9.0)], False),  # a fast start carries its window
    ([(1000, 10.0), (1, 10.0)], True),  # each window on its own
    ([(0, 10.0)], True),  # a read that returns nothing for a window
    ([(10, 0.001)] * 20000, False),  # many quick reads: 20 s waiting, 200000 bytes
]


@pytest.mark.parametrize(("reads", "gives_up"), FLOOR_CASES)
def test_speed_floor(reads: list[tuple[int, float]], gives_up: bool) -> None:
    clock = FakeClock()
    floor = SpeedFloor("http://x/blob", 100, 10.0, clock)
    try:
        for n, waited in reads:
            started = clock()
            clock.t += waited
            floor.note(n, started)
            clock.t += 60.0  # the consumer's own time between reads never counts
    except DownloadError as exc:
        assert gives_up and exc.kind == "timeout" and "100 bytes/s" in exc.message
    else:
        assert not gives_up


def test_speed_floor_off() -> None:
    clock = FakeClock()
    floor = SpeedFloor("http://x/blob", 0, 10.0, clock)
    clock.t += 3600
    floor.note(0, 100.0)


def test_a_trickling_download_is_abandoned_resumed_then_times_out(served: RepoServer) -> None:
    served.fault("/blob", Fault(trickle_s=0.1, trickle_after=1_000_000))
    t = fast(min_speed=100, window=0.5)
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        within(20, lambda: fetch_all(t, served.url + "/blob", resume_attempts=2))
    assert err.value.kind == "timeout" and "bytes/s" in err.value.message
    assert time.monotonic() - started < 8
    ranges = [r.headers.get("Range") for r in served.requests]
    # the first transfer and two resumes, each from where the one before stood
    assert len(ranges) == 3 and ranges.count(None) == 1
    offsets = sorted(int(r[6:-1]) for r in ranges if r is not None)
    assert 1_000_000 < offsets[0] < offsets[1] < 1_000_100


def test_a_trickle_that_stops_is_resumed_to_the_end(served: RepoServer) -> None:
    served.fault("/blob", Fault(trickle_s=0.1, trickle_after=1_000_000, trickle_times=1))
    data = within(20, lambda: fetch_all(fast(min_speed=100, window=0.5), served.url + "/blob"))
    assert data == DATA
    assert sorted(r.status for r in served.requests) == [200, 206]


@pytest.mark.parametrize(
    "fault",
    [Fault(trickle_s=0.1, trickle_after=100), Fault(trickle_s=0.1, trickle_head=True)],
    ids=["body", "head"],
)
def test_a_trickling_small_fetch_times_out(served: RepoServer, fault: Fault) -> None:
    """The manifest and its signature are held to the floor too, their headers included."""
    served.fault("/blob", fault)
    t = fast(min_speed=100, window=0.5, read=0.5, retries=0)
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        within(20, lambda: t.get(served.url + "/blob", max_bytes=len(DATA)))
    assert err.value.kind == "timeout"
    assert time.monotonic() - started < 5


def test_a_trickling_head_of_an_image_times_out(served: RepoServer) -> None:
    served.fault("/blob", Fault(trickle_s=0.1, trickle_head=True))
    t = fast(min_speed=100, window=0.5, read=0.5, retries=0)
    with pytest.raises(DownloadError) as err:
        within(20, lambda: fetch_all(t, served.url + "/blob", resume_attempts=1))
    assert err.value.kind == "timeout"
    assert len(served.begun) == 2


def test_a_slow_link_above_the_floor_is_not_abandoned(served: RepoServer) -> None:
    served.fault("/blob", Fault(chunk_delay_s=0.02))  # ~3 MB/s
    t = fast(min_speed=100_000, window=0.3)
    assert within(30, lambda: fetch_all(t, served.url + "/blob")) == DATA
    assert len(served.requests) == 1


def test_a_consumer_that_pauses_is_not_the_server_trickling(served: RepoServer) -> None:
    t = fast(min_speed=100_000, window=0.3)
    out = bytearray()
    for chunk in download.Download(t, served.url + "/blob", size=len(DATA), chunk_size=1 << 20):
        out += chunk
        time.sleep(0.5)  # longer than the window, between reads
    assert bytes(out) == DATA and len(served.requests) == 1


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("min_speed_bytes_s = 0\nmin_speed_window_s = 0.5\n", True),  # 0: no floor
        ("min_speed_bytes_s = 4096\n", True),
        ("min_speed_bytes_s = -1\n", False),
        ('min_speed_bytes_s = "1k"\n', False),
        ("min_speed_bytes_s = nan\n", False),
        ("min_speed_window_s = 0\n", False),
        ("min_speed_window_s = inf\n", False),
    ],
)
def test_speed_floor_config(host: Host, text: str, ok: bool) -> None:
    host.config.write_text(
        host.config.read_text().replace('channel = "stable"', 'channel = "stable"\n' + text)
    )
    if not ok:
        with pytest.raises(ConfigError) as err:
            config.load(host.config)
        assert err.value.kind == "invalid" and "min_speed" in str(err.value.key)
        return
    cfg = config.load(host.config)
    settings = compose.updater(cfg).transport._http.settings  # type: ignore[attr-defined]
    assert settings.min_speed_bytes_s == cfg.source.min_speed_bytes_s
    assert settings.min_speed_window_s == cfg.source.min_speed_window_s
    assert (settings.head_timeout_s is None) == (cfg.source.min_speed_bytes_s == 0)


@pytest.mark.parametrize(
    "location", ["http://[::1/blob", "http://localhost:99999/blob", "http://%zz/", "http://a..b/"]
)
def test_a_redirect_to_a_malformed_url_is_a_download_error(
    served: RepoServer, location: str
) -> None:
    """requests raises plain ValueError (or InvalidURL) for these; never let it escape."""
    served.fault("/blob", Fault(redirect_to=location))
    transport = fast(retries=0)
    with pytest.raises(DownloadError) as err:
        transport.get(f"{served.url}/blob", max_bytes=len(DATA))
    assert err.value.kind in ("unsupported_url", "connection")
    with pytest.raises(DownloadError):
        fetch_all(transport, f"{served.url}/blob", resume_attempts=0)


@pytest.fixture
def raw_server() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback server answering every connection with the bytes put in its list (a
    response a well-behaved server library would never send), then closing."""
    answers: list[bytes] = []
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(answers[0])
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/blob", answers
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.mark.parametrize("length", ["\u00b2", "\u00b2\u00b2", "-5", "1e3", " 5", "0x5"])
def test_a_content_length_that_is_no_ascii_number_is_not_believed(
    raw_server: tuple[str, list[bytes]], length: str
) -> None:
    """'²' (Latin-1 0xB2, which is how http.client decodes a header) passes str.isdigit()
    and int() refuses it: a ValueError out of the download, not a typed error."""
    url, answers = raw_server
    body = b"hello"
    answers.append(
        b"HTTP/1.1 200 OK\r\nContent-Length: "
        + length.encode("latin-1")
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    try:
        got = fetch_all(fast(retries=0), url, size=len(body), resume_attempts=0)
    except DownloadError:
        pass  # a typed refusal is as good as reading the body to the close
    else:
        assert got == body
