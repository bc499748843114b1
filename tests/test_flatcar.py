import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from partitions.bootcontrol import SlotFlags
from tests.conftest import Repo, updatectl
from tests.omaha_server import Answer, OmahaServer, Release
from tests.test_cycle import Snapshot, assert_refused
from updater import compose, config, flatcar, osrelease
from updater.errors import ConfigError, ExitCode


def test_etc_wins_over_usr_key_by_key(tmp_path: Path) -> None:
    usr, etc = tmp_path / "usr.conf", tmp_path / "etc.conf"
    usr.write_text("GROUP=stable\nSERVER=https://public.update.flatcar-linux.net/v1/update/\n")
    etc.write_text('# mine\nGROUP="beta"  # comment\n')
    s = flatcar.read((usr, etc))
    assert s.group == "beta"
    assert s.server == "https://public.update.flatcar-linux.net/v1/update/"
    assert s.files == (usr, etc) and not s.disabled


def test_disabled_and_missing(tmp_path: Path) -> None:
    etc = tmp_path / "etc.conf"
    etc.write_text("SERVER=disabled\n")
    assert flatcar.read((tmp_path / "none", etc)).disabled
    assert flatcar.read((tmp_path / "none",)) == flatcar.FlatcarSettings()


def test_garbage_lines_are_ignored() -> None:
    assert flatcar.parse("no equals\nA='unterminated\nB=ok\n=x\n") == {"B": "ok"}


def test_odd_lines_are_skipped_and_the_rest_read(tmp_path: Path) -> None:
    usr, etc = tmp_path / "usr.conf", tmp_path / "etc.conf"
    usr.write_text("SERVER=https://public.update.flatcar-linux.net/v1/update/\nGROUP=stable\n")
    etc.write_bytes(
        b"SERVER=http://\xff/\n"  # invalid UTF-8: skipped, the vendor's SERVER= stays
        b"GROUP=beta\x00\n"  # NUL: skipped
        b'GROUP="alpha\n'  # unbalanced: skipped
        b"GROUP='beta' # the admin's\r\n"
    )
    s = flatcar.read((usr, etc))
    assert s.server == "https://public.update.flatcar-linux.net/v1/update/"
    assert s.group == "beta"


def test_an_unreadable_update_conf_is_a_config_error(tmp_path: Path) -> None:
    """Not skipped: the SERVER=disabled in it may be what keeps the host from updating."""
    usr, etc = tmp_path / "usr.conf", tmp_path / "etc.conf"
    usr.write_text("SERVER=https://public.update.flatcar-linux.net/v1/update/\n")
    etc.write_text("SERVER=disabled\n" + "#\n" * osrelease.MAX_FILE_BYTES)
    with pytest.raises(ConfigError) as err:
        flatcar.read((usr, etc))
    assert (err.value.kind, err.value.file) == ("unreadable", str(etc))
    etc.unlink()
    os.mkfifo(etc)  # would block for ever
    with pytest.raises(ConfigError) as err:
        flatcar.read((usr, etc))
    assert (err.value.kind, err.value.file) == ("unreadable", str(etc))
    etc.unlink()
    etc.mkdir()
    with pytest.raises(ConfigError) as err:
        flatcar.read((usr, etc))
    assert err.value.kind == "unreadable"
    assert flatcar.read((usr, tmp_path / "missing", usr / "below-a-file")).files == (usr,)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("SERVER=http://[::1\n", "SERVER"),
        ("SERVER=https://h:\u0662/\n", "SERVER"),
        ("SERVER=file:///srv\n", "SERVER"),
        ("GROUP=a/b\n", "GROUP"),
    ],
)
def test_bad_server_or_group_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    etc = tmp_path / "etc.conf"
    etc.write_text(text)
    with pytest.raises(ConfigError) as err:
        flatcar.read((etc,))
    assert (err.value.kind, err.value.file, err.value.key) == ("invalid", str(etc), key)


def test_composing_the_updater_reads_update_conf_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Omaha server and the channel the manifests must name come from one read."""
    etc = tmp_path / "update.conf"
    etc.write_text("SERVER=https://nebraska.example/v1/update/\nGROUP=beta\n")
    monkeypatch.setattr(flatcar, "FILES", (tmp_path / "none", etc))
    cfg = tmp_path / "updater.toml"
    cfg.write_text(
        f'[source]\nkind = "omaha"\n[disk]\ndevice = "{tmp_path / "disk.img"}"\n'
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
    )
    with capture_logs() as logs:
        updater = compose.updater(config.load(cfg))
    reads = [e for e in logs if e["event"] == "flatcar_update_conf_read"]
    assert len(reads) == 1 and reads[0]["group"] == "beta"
    assert updater.settings.channel == "beta"


# ---- wired through compose into a real check (updatectl, an Omaha server on loopback) -----------


@pytest.fixture
def omaha_host(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[Host, OmahaServer, Path, Path]]:
    """A host whose config says only `kind = "omaha"`: the server and the group come
    from update.conf (the vendor's and the admin's, at paths of the test's own)."""
    published = repo.publish("1.1.0", usr_images["1.1.0"], channel="beta")
    data = published.image_path.read_bytes()
    release = Release(
        version="1.1.0",
        codebase=f"{repo.url}/images/1.1.0/",
        package=published.image_path.name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    host.config.write_text(
        host.config.read_text().replace("[source]\n", '[source]\nkind = "omaha"\n')
    )
    usr, etc = tmp_path / "usr-update.conf", tmp_path / "etc-update.conf"
    with OmahaServer(release=release, answer=Answer.UPDATE) as server:
        yield host, server, usr, etc


def test_update_conf_server_and_group_drive_a_real_check(
    omaha_host: tuple[Host, OmahaServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, server, usr, etc = omaha_host
    usr.write_text(f"SERVER={server.url}\nGROUP=stable\n")  # the vendor's
    etc.write_text("GROUP=beta\n")  # the admin's, winning key by key
    monkeypatch.setattr(flatcar, "FILES", (usr, etc))
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True
    assert server.requests and all(q.app["track"] == "beta" for q in server.requests)
    assert cgpt_flags(host.disk, 2) == SlotFlags(2, 1, False)


def test_config_wins_over_update_conf(
    omaha_host: tuple[Host, OmahaServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, server, usr, etc = omaha_host
    etc.write_text("SERVER=http://127.0.0.1:9/nobody-here/\nGROUP=alpha\n")
    monkeypatch.setattr(flatcar, "FILES", (usr, etc))
    host.config.write_text(
        host.config.read_text() + f'\n[omaha]\nserver = "{server.url}"\ngroup = "beta"\n'
    )
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    assert r.json()["update_available"] is True
    assert [q.app["track"] for q in server.requests] == ["beta"]


def test_server_disabled_stops_checks(
    omaha_host: tuple[Host, OmahaServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, server, usr, etc = omaha_host
    usr.write_text(f"SERVER={server.url}\nGROUP=beta\n")
    etc.write_text("SERVER=disabled\n")
    monkeypatch.setattr(flatcar, "FILES", (usr, etc))
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["update_available"] is False
    assert server.requests == []  # not asked, and no event reported
    assert_refused(host, before, state_unchanged=False)
    # flatcar_conf = false: update.conf is not read, so no server is configured at all
    host.config.write_text(host.config.read_text() + "\n[omaha]\nflatcar_conf = false\n")
    r = updatectl(host, "check", "--json")
    assert r.code == ExitCode.CONFIG
    assert r.json()["error"]["kind"] == "missing" and "omaha.server" in r.err


def test_a_bad_server_in_update_conf_fails_the_check_naming_it(
    omaha_host: tuple[Host, OmahaServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, server, usr, etc = omaha_host
    etc.write_text("SERVER=ftp://updates.example/\n")
    monkeypatch.setattr(flatcar, "FILES", (usr, etc))
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.CONFIG, r.err
    assert r.json()["error"]["kind"] == "invalid"
    assert str(etc) in r.err and "SERVER" in r.err
    assert server.requests == []
    assert_refused(host, before)
