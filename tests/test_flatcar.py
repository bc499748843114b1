from pathlib import Path

from updater import flatcar


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
    assert flatcar.parse("no equals\nA='unterminated\nB=ok\n=x\n") == {"B": "ok", "": "x"}
