"""Transports and the resumable download against real servers on loopback:
http, https with a private CA, file://; retries, conditional GETs, Range."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.host import Host, write_config
from devtools.repo_server import Fault, RepoServer
from devtools.tls import TLSFiles, make_tls
from tests.conftest import Repo, updatectl
from updater import download
from updater.errors import DownloadError
from updater.transport import FileTransport, HttpSettings, HttpTransport, SchemeTransport

DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RepoServer]:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob").write_bytes(DATA)
    with RepoServer(tmp_path / "www") as srv:
        yield srv


def fast(**kw: float) -> HttpTransport:
    return HttpTransport(
        HttpSettings(
            connect_timeout_s=2, read_timeout_s=kw.get("read", 2), retries=int(kw.get("retries", 2))
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
