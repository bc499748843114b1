"""HTTP proxies: ``[source] proxy`` and the environment's HTTPS_PROXY / HTTP_PROXY /
NO_PROXY, for the release repository and the Omaha server, through a real proxy on
loopback (devtools/proxy_server.py) that records what passed through it; etcd is
always reached directly. A proxy that refuses or is down is a typed error and
changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.etcd import EtcdNode
from devtools.host import Host
from devtools.proxy_server import Passed, ProxyServer
from devtools.repo_server import RepoServer
from devtools.tls import TLSFiles, make_tls
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from tests.conftest import Repo, updatectl
from tests.omaha_server import Answer, OmahaServer, omaha_release, use_omaha
from tests.test_cycle import Snapshot, assert_refused
from updater import config
from updater.errors import ConfigError, ExitCode
from updater.manifest import Compression
from updater.transport import HttpSettings, HttpTransport

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test decides the proxy variables (a CI runner may set its own)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def proxy() -> Iterator[ProxyServer]:
    with ProxyServer() as p:
        yield p


def set_proxy(host: Host, url: str) -> None:
    host.config.write_text(
        host.config.read_text().replace("[source]\n", f'[source]\nproxy = "{url}"\n')
    )


def test_the_repository_through_the_configured_proxy(
    host: Host, repo: Repo, usr_images: dict[str, Path], proxy: ProxyServer
) -> None:
    published = repo.publish("1.1.0", usr_images["1.1.0"])
    set_proxy(host, proxy.url)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    got = proxy.targets("GET")
    for path in ("/stable/release.json", "/stable/release.json.asc", repo.image_path()):
        assert f"{repo.url}{path}" in got, (path, got)
    # every request the repository answered came through the proxy
    assert len(repo.server.requests) == len(proxy.passed)
    # the one 404: the next trust root, which this repository has not published
    assert {(p.status, p.target) for p in proxy.passed if p.status not in (200, 206)} == {
        (404, f"{repo.url}/keys/root.1.json")
    }
    assert published.image_path.exists()


def test_the_environment_proxy_and_no_proxy(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    proxy: ProxyServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    assert sorted(proxy.targets("GET")) == [
        f"{repo.url}/keys/root.1.json",  # is there a newer trust root? (404: no)
        f"{repo.url}/stable/release.json",
        f"{repo.url}/stable/release.json.asc",
    ]
    # NO_PROXY names the repository's host: direct, for the environment's proxy ...
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    before = len(proxy.passed)
    assert updatectl(host, "check", "--json").code == 0
    # ... and for the configured one
    set_proxy(host, proxy.url)
    assert updatectl(host, "check", "--json").code == 0
    assert len(proxy.passed) == before


def test_https_goes_through_a_connect_tunnel(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    proxy: ProxyServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS stays end to end: the proxy sees host and port, never a URL, and the
    repository's certificate is checked against [source] ca_file as without a proxy."""
    tls: TLSFiles = make_tls(tmp_path / "tls")
    repo.publish("1.1.0", usr_images["1.1.0"])
    with RepoServer(repo.root, tls=tls.server_context()) as https_repo:
        text = host.config.read_text().replace(repo.url, https_repo.url)
        host.config.write_text(text.replace("[source]\n", f'[source]\nca_file = "{tls.ca_cert}"\n'))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, r.err
        port = https_repo.url.rsplit(":", 1)[1].split("/")[0]
        assert set(proxy.targets()) == {f"127.0.0.1:{port}"}
        assert {p.method for p in proxy.passed} == {"CONNECT"}
        assert len(https_repo.requests) >= 3  # manifest, signature, image: all tunnelled


def test_the_omaha_server_through_the_proxy(
    host: Host, repo: Repo, usr_images: dict[str, Path], proxy: ProxyServer
) -> None:
    published = repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.ZSTD)
    with OmahaServer(release=omaha_release(repo.url, published), answer=Answer.UPDATE) as omaha:
        use_omaha(host.config, omaha.url)
        set_proxy(host, proxy.url)
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, r.err
        posts = [p for p in proxy.passed if p.method == "POST"]
        assert posts and all(p.target == omaha.url for p in posts)
        assert len(posts) == len(omaha.requests)  # the check and every event
        assert f"{repo.url}{repo.image_path()}" in proxy.targets("GET")


def test_etcd_is_reached_directly(
    etcd: EtcdNode, group: str, proxy: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,))), group, 1)
    assert lock.acquire("host-a")
    status = lock.status()
    assert status is not None and [h.id for h in status.holders] == ["host-a"]
    lock.release("host-a")
    status = lock.status()
    assert status is not None and status.holders == ()
    assert proxy.passed == []


# ---- a proxy that refuses, or is not there ------------------------------------------------------


def test_a_proxy_that_wants_credentials(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    before = Snapshot.take(host)
    with ProxyServer(credentials=("updater", "s3cret")) as proxy:
        set_proxy(host, proxy.url)
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == ExitCode.DOWNLOAD, r.err
        assert r.json()["error"]["kind"] == "http_status"
        assert "407" in r.json()["error"]["message"]
        assert repo.server.requests == []  # nothing got past it
        assert_refused(host, before)
        assert [p.status for p in proxy.passed] == [407]
        # the credentials in the URL: through
        host.config.write_text(
            host.config.read_text().replace(proxy.url, proxy.url.replace("//", "//updater:s3cret@"))
        )
        r = updatectl(host, "check", "--json")
        assert r.code == 0, r.err
        assert r.json()["update_available"] is True
        assert "s3cret" not in r.out + r.err


def test_a_proxy_that_is_down(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    before = Snapshot.take(host)
    with ProxyServer() as gone:
        url = gone.url  # a port nobody listens on once the proxy stopped
    set_proxy(host, url.replace("//", "//updater:s3cret@"))
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.DOWNLOAD, r.err
    assert r.json()["error"]["kind"] == "connection"
    assert "s3cret" not in r.out + r.err  # the proxy's password is not shown
    assert repo.server.requests == []
    assert_refused(host, before)


def test_a_tunnel_the_proxy_cannot_open(proxy: ProxyServer, tmp_path: Path) -> None:
    """CONNECT to a port nobody listens on: the proxy answers 502, a connection error."""
    with ProxyServer() as gone:
        port = gone.port
    http = HttpTransport(HttpSettings(retries=0, proxy=proxy.url))
    from updater.errors import DownloadError  # noqa: PLC0415

    with pytest.raises(DownloadError) as info:
        http.get(f"https://127.0.0.1:{port}/stable/release.json", max_bytes=1024)
    assert info.value.kind == "connection"
    assert proxy.passed == [Passed("CONNECT", f"127.0.0.1:{port}", 502)]


@pytest.mark.parametrize(
    "value",
    ["socks5://127.0.0.1:1080", "proxy:3128", "http://", "http://a b:1", "http://x:99999", 3128],
)
def test_a_bad_proxy_setting_names_the_key(host: Host, value: object) -> None:
    rendered = f'"{value}"' if isinstance(value, str) else str(value)
    host.config.write_text(
        host.config.read_text().replace("[source]\n", f"[source]\nproxy = {rendered}\n")
    )
    with pytest.raises(ConfigError) as info:
        config.load(host.config)
    assert info.value.kind == "invalid"
    assert "proxy" in info.value.message and str(host.config) in info.value.message


def test_the_proxy_setting_is_read() -> None:
    assert config.SourceConfig().proxy is None
