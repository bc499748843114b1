"""Configuration: drop-in merging, validation into frozen dataclasses, errors
that name the file and the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import updatectl
from updater import config, flatcar
from updater.errors import ConfigError, ExitCode
from updater.settings import fleet_publishing

ROOT = Path(__file__).resolve().parent.parent


def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    out = (tmp_path / "usr", tmp_path / "run", tmp_path / "etc")
    for d in out:
        d.mkdir()
    return out


def test_defaults_without_any_file(tmp_path: Path) -> None:
    cfg = config.load(dirs=dirs(tmp_path))
    assert cfg.source.url is None and cfg.source.channel == "stable"
    assert cfg.source.keyring == ()
    assert cfg.disk.slots == ("USR-A", "USR-B")
    assert cfg.disk.kernel_cmdline == Path("/proc/cmdline")
    assert cfg.agent.state_dir == Path("/var/lib/updater")
    assert cfg.install.readback is True
    assert cfg.install.delta_min_saving == 0.2
    assert cfg.install.delta is True
    assert cfg.reboot.max_failures == 1  # the first host that rolls back stops the version
    assert cfg.files == ()


def test_dropins_merge_in_name_order_and_etc_masks_usr(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    (usr / "10-vendor.toml").write_text(
        '[source]\nurl = "https://vendor/repo"\nchannel = "stable"\nkeyring = "/usr/k.asc"\n'
    )
    (usr / "50-site.toml").write_text('[source]\nchannel = "vendor-beta"\n')
    (etc / "50-site.toml").write_text('[source]\nchannel = "beta"\n')  # masks usr/50-site
    (run / "60-runtime.toml").write_text(
        "[install]\nreadback = false\ndelta_min_saving = 0.5\ndelta = false\n"
    )
    (etc / "90-local.toml").write_text('[disk]\ndevice = "/dev/vda"\n')
    (etc / "ignored.conf").write_text("not toml")
    cfg = config.load(dirs=(usr, run, etc))
    assert cfg.source.url == "https://vendor/repo"
    assert cfg.source.channel == "beta"
    assert cfg.source.keyring == (Path("/usr/k.asc"),)
    assert cfg.install.readback is False
    assert cfg.install.delta_min_saving == 0.5
    assert cfg.install.delta is False
    assert cfg.disk.device == Path("/dev/vda")
    assert [p.name for p in cfg.files] == [
        "10-vendor.toml",
        "50-site.toml",
        "60-runtime.toml",
        "90-local.toml",
    ]
    assert cfg.files[1].parent == etc


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = config.load(dirs=dirs(tmp_path))
    with pytest.raises(AttributeError):
        cfg.source.channel = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "kind"),
    [
        ('[source]\nurl = "ftp://x/y"\n', "source.url", "invalid"),
        ('[source]\nurl = "http:///nohost"\n', "source.url", "invalid"),
        ("[source]\nurl = 5\n", "source.url", "invalid"),
        ('[source]\nchannel = "a/b"\n', "source.channel", "invalid"),
        ('[source]\nkeyring = "relative.asc"\n', "source.keyring", "invalid"),
        ("[source]\nkeyring = [1]\n", "source.keyring", "invalid"),
        ("[source]\nread_timeout_s = 0\n", "source.read_timeout_s", "invalid"),
        ("[source]\nretries = true\n", "source.retries", "invalid"),
        ('[disk]\nslots = ["A"]\n', "disk.slots", "invalid"),
        ('[disk]\nslots = ["A", "A"]\n', "disk.slots", "invalid"),
        ('[disk]\nbackend = "uboot"\n', "disk.backend", "invalid"),
        ('[disk]\ndevice = "sda"\n', "disk.device", "invalid"),
        ('[disk]\nesp = "boot/efi"\n', "disk.esp", "invalid"),
        ('[disk]\nesp = "/efi"\nesp_partition = "ESP"\n', "disk.esp_partition", "invalid"),
        ("[systemd-boot]\ntries = 0\n", "systemd-boot.tries", "invalid"),
        ("[systemd-boot]\ntries = 16\n", "systemd-boot.tries", "invalid"),
        ('[systemd-boot]\noptions = "root=/dev/sda2 ro"\n', "systemd-boot.options", "invalid"),
        ('[systemd-boot]\noptions = "root={partuuid}"\n', "systemd-boot.options", "invalid"),
        ('[systemd-boot]\ntitle = "OS {slot}"\n', "systemd-boot.title", "invalid"),
        ('[systemd-boot]\nlinux = "/../vmlinuz"\n', "systemd-boot.linux", "invalid"),
        ('[systemd-boot]\ninitrd = ["/i*.img"]\n', "systemd-boot.initrd", "invalid"),
        ('[systemd-boot]\nprefix = "my+os"\n', "systemd-boot.prefix", "invalid"),
        ('[systemd-boot]\nsort_key = "a b"\n', "systemd-boot.sort_key", "invalid"),
        ('[systemd-boot]\nefivars = "sys"\n', "systemd-boot.efivars", "invalid"),
        ('[grub-env]\npath = "grub/../grubenv"\n', "grub-env.path", "invalid"),
        ('[grub-env]\npath = "/"\n', "grub-env.path", "invalid"),
        ('[grub-env]\nnames = ["A"]\n', "grub-env.names", "invalid"),
        ('[grub-env]\nnames = ["A", "A"]\n', "grub-env.names", "invalid"),
        ('[grub-env]\nnames = ["A", "B-2"]\n', "grub-env.names", "invalid"),
        ('[install]\nreadback = "yes"\n', "install.readback", "invalid"),
        ("[install]\nchunk_size = 100000\n", "install.chunk_size", "invalid"),
        ("[install]\ndelta_min_saving = 1.5\n", "install.delta_min_saving", "invalid"),
        ("[install]\ndelta_min_saving = -0.1\n", "install.delta_min_saving", "invalid"),
        ('[install]\ndelta_min_saving = "20%"\n', "install.delta_min_saving", "invalid"),
        ('[install]\ndelta = "no"\n', "install.delta", "invalid"),
        ('[agent]\nstate_dir = "var/lib"\n', "agent.state_dir", "invalid"),
        ("source = 1\n", "source", "invalid"),
        ('[agent]\nlog = "syslog"\n', "agent.log", "invalid"),
        ("[agent]\nretry_base_s = 100\nretry_cap_s = 10\n", "agent.retry_cap_s", "invalid"),
        ("[agent]\njitter = 0.9\n", "agent.jitter", "invalid"),
        ('[reboot]\nstrategy = "locksmith"\n', "reboot.strategy", "invalid"),
        ('[reboot]\nlock = "zookeeper"\n', "reboot.lock", "invalid"),
        ('[reboot]\ngroup = "a b"\n', "reboot.group", "invalid"),
        ("[reboot]\nmax_failures = 0\n", "reboot.max_failures", "invalid"),
        ("[reboot]\nmax_failures = 101\n", "reboot.max_failures", "invalid"),
        ('[reboot]\nmax_failures = "2"\n', "reboot.max_failures", "invalid"),
        ('[reboot]\nwindow_start = "Thu 04:00"\n', "reboot.window_start", "invalid"),
        (
            '[reboot]\nwindow_start = "Thu 4"\nwindow_length = "1h"\n',
            "reboot.window_start",
            "invalid",
        ),
        (
            '[[reboot.window]]\ndays = ["Caturday"]\nstart_time = "04:00"\nlength_minutes = 60\n',
            "reboot.window[0].days",
            "invalid",
        ),
        ('[etcd]\nendpoints = ["ftp://x"]\n', "etcd.endpoints", "invalid"),
        ('[etcd]\ncert_file = "/c.pem"\n', "etcd.cert_file", "invalid"),
        ('[etcd]\nusername = "root"\n', "etcd.username", "invalid"),
        ('[fleetlock]\nurl = "nope"\n', "fleetlock.url", "invalid"),
        ('[health]\nunits = ["a/b"]\n', "health.units", "invalid"),
        ('[metrics]\nlisten = "0.0.0.0:9464"\n', "metrics.listen", "invalid"),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, text: str, key: str, kind: str) -> None:
    usr, run, etc = dirs(tmp_path)
    (etc / "50-bad.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert err.value.kind == kind
    assert err.value.key == key
    assert err.value.file == str(etc / "50-bad.toml")
    assert str(etc / "50-bad.toml") in str(err.value) and key in str(err.value)


def test_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    (usr / "10-a.toml").write_text('[source]\nchannel = "ok"\n')
    (etc / "20-b.toml").write_text('[source]\nchannel = "not ok"\n')
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert err.value.file == str(etc / "20-b.toml")


def test_max_failures(tmp_path: Path) -> None:
    f = tmp_path / "u.toml"
    f.write_text("[reboot]\nmax_failures = 2\n")
    assert config.load(f).reboot.max_failures == 2
    f.write_text("[reboot]\nmax_failures = 100\n")
    assert config.load(f).reboot.max_failures == 100


def test_syntax_error(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    (run / "10-broken.toml").write_text("[source\nurl=")
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert err.value.kind == "syntax" and err.value.file == str(run / "10-broken.toml")


def test_unknown_keys_warn_but_do_not_fail(tmp_path: Path) -> None:
    """An older agent (after a fallback) must start with a newer agent's config."""
    usr, run, etc = dirs(tmp_path)
    (etc / "10.toml").write_text('[source]\nfuture_key = 1\n[fleets]\nstrategy = "lock"\n')
    with capture_logs() as logs:
        cfg = config.load(dirs=(usr, run, etc))
    assert cfg.source.channel == "stable"
    events = {(e["event"], e.get("key", e.get("section"))) for e in logs}
    assert ("config_key_unknown", "source.future_key") in events
    assert ("config_section_unknown", "fleets") in events


def test_windows_add_up_across_dropins(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    w = '[[reboot.window]]\ndays = ["{day}"]\nstart_time = "04:00"\nlength_minutes = 60\n'
    (usr / "10-vendor.toml").write_text(w.format(day="Mon"))
    (etc / "50-site.toml").write_text(w.format(day="Thu") + '[reboot]\ntime_zone = "UTC"\n')
    cfg = config.load(dirs=(usr, run, etc))
    windows = cfg.reboot.windows
    assert windows is not None and len(windows.windows) == 2
    assert cfg.reboot.windows_file == f"{usr / '10-vendor.toml'}, {etc / '50-site.toml'}"


def test_locksmith_window_form(tmp_path: Path) -> None:
    f = tmp_path / "one.toml"
    f.write_text('[reboot]\nwindow_start = "Thu 04:00"\nwindow_length = "1h30m"\n')
    windows = config.load(f).reboot.windows
    assert windows is not None and str(windows.windows[0]).startswith("Thu 04:00")


def test_single_config_file(tmp_path: Path) -> None:
    f = tmp_path / "one.toml"
    f.write_text('[source]\nurl = "file:///srv/repo"\n[disk]\nslots = ["ROOT-A", "ROOT-B"]\n')
    cfg = config.load(f)
    assert cfg.source.url == "file:///srv/repo" and cfg.disk.slots == ("ROOT-A", "ROOT-B")
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "missing.toml")
    assert err.value.kind == "missing"


def test_empty_reboot_sentinel_disables_it(tmp_path: Path) -> None:
    f = tmp_path / "one.toml"
    f.write_text('[agent]\nreboot_sentinel = ""\n')
    assert config.load(f).agent.reboot_sentinel is None


def test_boot_loader_backends(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    cfg = config.load(dirs=(usr, run, etc))
    assert (cfg.disk.backend, cfg.disk.esp, cfg.disk.esp_partition) == ("gpt-prio", None, None)
    assert cfg.systemd_boot == config.SystemdBootConfig()
    assert config.entry_template(cfg.systemd_boot).options == "mount.usr=PARTUUID={partuuid} ro"
    (etc / "50-boot.toml").write_text(
        '[disk]\nbackend = "systemd-boot"\nesp = "/boot/efi"\n'
        "[systemd-boot]\ntries = 3\n"
        'title = "Fleet OS ({label})"\n'
        'linux = "/fleet/{label}/vmlinuz"\n'
        'initrd = "/fleet/{label}/initrd"\n'
        'options = "root=PARTUUID={partuuid} rw quiet"\n'
        'efivars = "/run/efivars"\n'
        '[grub-env]\npath = "/boot/grub/grubenv"\nnames = ["a", "b"]\n'
    )
    cfg = config.load(dirs=(usr, run, etc))
    assert (cfg.disk.backend, cfg.disk.esp) == ("systemd-boot", Path("/boot/efi"))
    sd = cfg.systemd_boot
    template = config.entry_template(sd)
    assert template is sd.entry  # built at load, kept
    assert (sd.tries, template.linux, template.initrd) == (
        3,
        "/fleet/{label}/vmlinuz",
        ("/fleet/{label}/initrd",),
    )
    assert sd.efivars == Path("/run/efivars")
    assert (template.title, template.options) == (
        "Fleet OS ({label})",
        "root=PARTUUID={partuuid} rw quiet",
    )
    assert (cfg.grub_env.path, cfg.grub_env.names) == ("boot/grub/grubenv", ("a", "b"))
    (etc / "50-boot.toml").write_text(
        '[disk]\nbackend = "grub-env"\nesp_partition = "EFI-SYSTEM"\n[systemd-boot]\ninitrd = []\n'
    )
    cfg = config.load(dirs=(usr, run, etc))
    assert (cfg.disk.backend, cfg.disk.esp, cfg.disk.esp_partition) == (
        "grub-env",
        None,
        "EFI-SYSTEM",
    )
    assert config.entry_template(cfg.systemd_boot).initrd == ()  # an entry without an initrd


# --- every URL key goes through updater.urls.parse_url ------------------------------------------

# what urlsplit, .port or requests would raise on, or a URL that reaches no server
HOSTILE_URLS = [
    "http://[::1",  # urlsplit: ValueError Invalid IPv6 URL
    "http://[::1]x/",
    "http://[fe80::1%eth0]/",
    "http://[not-v6]/",
    "http://host:99999/",  # .port: ValueError out of range
    "http://host:0/",
    "http://host:\u0662/",  # an Arabic-Indic digit two
    "http://ho st/",
    "http://host\u2100/",  # changes under NFKC: urlsplit raises
    "http://" + "a" * 64 + ".example/",  # a label longer than 63
    "http://.example/",
    "http:///nohost",
    " http://host/",
    "http://host/\x00",
    "gopher://host/",
    "http://" + "a" * 9000,
]

URL_KEYS = [
    ("[source]\nurl = {value}\n", "source.url"),
    ("[omaha]\nserver = {value}\n", "omaha.server"),
    ("[etcd]\nendpoints = [{value}]\n", "etcd.endpoints"),
    ('[etcd]\nendpoints = ["http://127.0.0.1:2379", {value}]\n', "etcd.endpoints"),
    ("[fleetlock]\nurl = {value}\n", "fleetlock.url"),
]


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string, anything unprintable escaped."""
    escaped = (c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return '"' + "".join(escaped) + '"'


@pytest.mark.parametrize("url", HOSTILE_URLS)
@pytest.mark.parametrize(("template", "key"), URL_KEYS)
def test_bad_urls_are_config_errors_naming_file_and_key(
    tmp_path: Path, template: str, key: str, url: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(template.format(value=_toml_string(url)))
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert (err.value.kind, err.value.key, err.value.file) == ("invalid", key, str(f))
    assert str(f) in str(err.value) and key in str(err.value)


@pytest.mark.parametrize(("template", "key"), URL_KEYS)
def test_bad_url_through_the_cli_is_the_config_exit_code_and_json(
    tmp_path: Path, template: str, key: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(template.format(value='"http://[::1"'))
    result = updatectl(None, "--config", str(f), "status", "--json")
    assert result.code == ExitCode.CONFIG
    error = result.json()["error"]
    assert (error["category"], error["kind"]) == ("config", "invalid")
    assert key in error["message"] and str(f) in error["message"]
    assert "Traceback" not in result.err and "updatectl: config error (invalid)" in result.err


@pytest.mark.parametrize(
    "url",
    [
        "http://user@10.0.0.1:2379",  # the client drops user info: refused, not ignored
        "http://10.0.0.1:2379/v3",
        "http://10.0.0.1:2379?x=1",
        "http://10.0.0.1:2379#f",
        "unix:///run/etcd.sock",
    ],
)
def test_etcd_endpoints_are_what_the_client_can_use(tmp_path: Path, url: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(f"[etcd]\nendpoints = [{_toml_string(url)}]\n")
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert err.value.key == "etcd.endpoints"


def test_good_urls_still_load(tmp_path: Path) -> None:
    f = tmp_path / "good.toml"
    f.write_text(
        '[source]\nurl = "https://[2001:db8::1]:8443/repo"\n'
        '[omaha]\nserver = "https://bücher.example/v1/update/"\n'
        '[etcd]\nendpoints = ["https://[::1]:2379", "http://etcd-1.lan/"]\n'
        '[fleetlock]\nurl = "http://127.0.0.1:8080/groups/${group}"\n'
    )
    cfg = config.load(f)
    assert cfg.source.url == "https://[2001:db8::1]:8443/repo"
    assert cfg.etcd.endpoints == ("https://[::1]:2379", "http://etcd-1.lan/")
    f.write_text('[omaha]\nserver = "disabled"\n[source]\nurl = "file://localhost/srv/repo"\n')
    assert config.load(f).omaha.server == "disabled"


@pytest.mark.parametrize(
    ("conf", "key"),
    [
        ("SERVER=http://[::1\n", "SERVER"),
        ("SERVER='http://host:99999/'\n", "SERVER"),
        ("SERVER=ftp://host/\n", "SERVER"),
        ('GROUP="a b"\n', "GROUP"),
        ("GROUP=../x\n", "GROUP"),
    ],
)
def test_flatcar_update_conf_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str, key: str
) -> None:
    usr, etc = tmp_path / "usr-update.conf", tmp_path / "etc-update.conf"
    usr.write_text("SERVER=https://public.update.flatcar-linux.net/v1/update/\nGROUP=stable\n")
    etc.write_text(conf)
    monkeypatch.setattr(flatcar, "FILES", (usr, etc))
    f = tmp_path / "omaha.toml"
    f.write_text(f'[source]\nkind = "omaha"\n[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    result = updatectl(None, "--config", str(f), "check", "--json")
    assert result.code == ExitCode.CONFIG
    error = result.json()["error"]
    assert (error["category"], error["kind"]) == ("config", "invalid")
    assert f"{etc}:{key}" in error["message"]
    assert not (tmp_path / "state").exists()  # nothing was written before the error


# --- [metrics] listen is read as the agent binds it -------------------------------------------


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1:\u00b2",  # isdigit() took it; the agent crashed at start on int()
        "127.0.0.1:\u0669\u0664\u0666\u0664",
        "localhost:9464",  # passed the old check, refused when the agent bound it
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "[::1",
        "::1:9464",
        "unix:/run/a\x00b.sock",
        "unix:/" + "x" * 200,
    ],
)
def test_bad_metrics_listen_is_refused_at_load(tmp_path: Path, listen: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(f"[metrics]\nlisten = {_toml_string(listen)}\n")
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert (err.value.kind, err.value.key, err.value.file) == ("invalid", "metrics.listen", str(f))


def test_agent_start_with_a_bad_metrics_listen_is_the_config_error(tmp_path: Path) -> None:
    """`updatectl agent` (the service's ExecStart) stops at the config, typed, before
    it touches the bus, the disk or the state directory."""
    state = tmp_path / "state"
    f = tmp_path / "bad.toml"
    f.write_text(f'[agent]\nstate_dir = "{state}"\n[metrics]\nlisten = "127.0.0.1:\u00b2"\n')
    result = updatectl(None, "--config", str(f), "agent", "--json")
    assert result.code == ExitCode.CONFIG
    assert result.json()["error"]["kind"] == "invalid"
    assert "metrics.listen" in result.json()["error"]["message"]
    # the same as a process, as systemd starts it
    proc = subprocess.run(
        [sys.executable, "-m", "updater.cli", "--config", str(f), "agent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "updatectl: config error (invalid)" in proc.stderr and "metrics.listen" in proc.stderr
    assert not state.exists()


# --- numbers and strings from the file: NaN, infinities, huge, negative, NUL --------------------

NUMBER_KEYS = [
    ("source", "connect_timeout_s"),
    ("source", "min_speed_bytes_s"),
    ("agent", "poll_interval_s"),
    ("agent", "jitter"),
    ("agent", "retry_base_s"),
    ("reboot", "retry_s"),
    ("etcd", "timeout_s"),
    ("health", "timeout_s"),
    ("install", "delta_min_saving"),
]
INT_KEYS = [
    ("source", "retries"),
    ("install", "chunk_size"),
    ("systemd-boot", "tries"),
    ("etcd", "slots"),
    ("reboot", "max_failures"),
]


@pytest.mark.parametrize(
    "value",
    [
        "nan",
        "+nan",
        "-nan",
        "inf",
        "-inf",
        "1e400",
        "-1",
        "-0.5",
        "1" + "0" * 40,
        "true",
        '"5"',
        "[1]",
    ],
)
@pytest.mark.parametrize(("section", "key"), NUMBER_KEYS + INT_KEYS)
def test_odd_numbers_are_refused(tmp_path: Path, section: str, key: str, value: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert (err.value.kind, err.value.key, err.value.file) == (
        "invalid",
        f"{section}.{key}",
        str(f),
    )


@pytest.mark.parametrize(("section", "key"), INT_KEYS)
def test_integers_are_not_floats(tmp_path: Path, section: str, key: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(f"[{section}]\n{key} = 4.0\n")
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert err.value.key == f"{section}.{key}"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[agent]\nstate_dir = "/var/lib/up\\u0000dater"\n', "agent.state_dir"),
        ('[disk]\ndevice = "/dev/vda\\u0000"\n', "disk.device"),
        ('[source]\nkeyring = ["/k.asc", "/k\\u0000.asc"]\n', "source.keyring"),
        ('[health]\nunits = ["a\\u0000.service"]\n', "health.units"),
        ('[reboot]\ntime_zone = "Europe/Berlin\\u0000"\n', "reboot.time_zone"),
        ('[source]\nchannel = "stable\\u0000"\n', "source.channel"),
    ],
)
def test_nul_in_a_string_is_refused(tmp_path: Path, text: str, key: str) -> None:
    """os calls and subprocess argv raise ValueError on an embedded NUL: refused at load."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert (err.value.kind, err.value.key) == ("invalid", key)


@pytest.mark.parametrize("nested", ["[" * 2000 + "]" * 2000, "{a=" * 2000 + "1" + "}" * 2000])
def test_deeply_nested_toml_is_a_syntax_error(tmp_path: Path, nested: str) -> None:
    f = tmp_path / "deep.toml"
    f.write_text(f"[source]\nx = {nested}\n")
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert (err.value.kind, err.value.file) == ("syntax", str(f))


def test_config_files_are_read_bounded(tmp_path: Path) -> None:
    usr, run, etc = dirs(tmp_path)
    big = etc / "10-big.toml"
    big.write_text("# padding\n" * (config.MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert (err.value.kind, err.value.file) == ("unreadable", str(big))
    big.unlink()
    fifo = etc / "20-fifo.toml"
    os.mkfifo(fifo)  # no writer: an unbounded read would block for ever
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert (err.value.kind, err.value.file) == ("unreadable", str(fifo))
    fifo.unlink()
    (etc / "30-dir.toml").mkdir()
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert err.value.kind == "unreadable"
    (etc / "30-dir.toml").rmdir()
    (etc / "40-latin1.toml").write_bytes(b'[source]\nchannel = "caf\xe9"\n')
    with pytest.raises(ConfigError) as err:
        config.load(dirs=(usr, run, etc))
    assert err.value.kind == "syntax"


def test_a_time_zone_of_thousands_of_parts_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "tz.toml"
    f.write_text(
        '[reboot]\ntime_zone = "' + "/".join(["a"] * 2000) + '"\n'
        'window_start = "04:00"\nwindow_length = "1h"\n'
    )
    result = updatectl(None, "--config", str(f), "status", "--json")
    assert result.code == ExitCode.CONFIG
    assert result.json()["error"]["message"].startswith(f"{f}:reboot.time_zone")


ETCD_AT = '[etcd]\nendpoints = ["http://10.0.0.1:2379"]\n'


@pytest.mark.parametrize(
    ("text", "publishes"),
    [
        ("", False),  # a single machine: no etcd anywhere
        ('[reboot]\nstrategy = "off"\n', False),
        ('[reboot]\nstrategy = "lock"\n', True),  # the etcd lock (the default lock)
        ('[reboot]\nstrategy = "lock"\nlock = "fleetlock"\n[fleetlock]\nurl = "http://a"\n', False),
        (ETCD_AT, True),  # immediate, with an etcd endpoint
        ('[reboot]\nstrategy = "off"\n' + ETCD_AT, True),
        (
            '[reboot]\nstrategy = "lock"\nlock = "fleetlock"\n[fleetlock]\nurl = "http://a"\n'
            + ETCD_AT,
            True,
        ),
        (ETCD_AT + "publish_status = false\n", False),  # the older key still turns it off
        ('[reboot]\nstrategy = "lock"\n[fleet]\npublish = false\n', False),
        ("[fleet]\npublish = true\n", True),  # the default endpoint, by request
        (ETCD_AT + "publish_status = false\n[fleet]\npublish = true\n", True),
    ],
)
def test_fleet_publishing(tmp_path: Path, text: str, publishes: bool) -> None:
    """Every host may publish its record, whatever its reboot strategy (issue 16)."""
    f = tmp_path / "one.toml"
    f.write_text(text)
    assert fleet_publishing(config.load(f)) is publishes


def test_fleet_publish_must_be_a_boolean(tmp_path: Path) -> None:
    f = tmp_path / "one.toml"
    f.write_text('[fleet]\npublish = "yes"\n')
    with pytest.raises(ConfigError) as err:
        config.load(f)
    assert err.value.key == "fleet.publish" and err.value.file == str(f)
