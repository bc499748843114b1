import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from updater import compose, config, flatcar, osrelease
from updater.errors import ConfigError


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
