"""Fuzzing the configuration edge (hypothesis): reboot window specs, the whole
config loader, os-release, Flatcar's update.conf and the metrics listen address.
Each returns a result or a typed error (ConfigError where it is one); nothing
else, no hang, bounded memory."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from policies.etcdclient import EtcdSettings
from policies.fleetlock import FleetLock
from policies.windows import Windows, parse_go_duration, parse_windows
from tests.fuzzing import parse_or_typed_error
from updater import config, flatcar, osrelease
from updater.errors import ConfigError, UpdaterError
from updater.listen import ListenAddress, parse_listen
from updater.urls import parse_url

pytestmark = pytest.mark.fuzz

NOW = datetime(2024, 3, 31, 0, 30, tzinfo=UTC)  # the night Europe springs forward

# Anything tomllib can hand over as a value, odd numbers and strings weighted in.
toml_scalars = st.one_of(
    st.text(max_size=30),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.just(UTC)),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def _clock_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(
            lambda h, m, sep: f"{h}{sep}{m}",
            st.sampled_from(["0", "00", "4", "04", "23", "24", "99", "-1", "\u0664", "\uff14", ""]),
            st.sampled_from(["00", "0", "30", "59", "60", "5", "\u0660\u0660", ""]),
            st.sampled_from([":", "", " ", "::", "\uff1a"]),
        ),
        st.text(max_size=8),
    )


day_names = st.one_of(
    st.sampled_from(
        ["Mon", "mon", "MONDAY", "Thu", "thursday", "Sun", "Caturday", "", "Mo", "Mond", "İ"]
    ),
    st.text(max_size=10),
)
window_entries = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "days": st.one_of(st.lists(day_names, max_size=8), day_names, toml_values),
                "start_time": st.one_of(_clock_text(), toml_values),
                "length_minutes": st.one_of(
                    st.integers(-10, 10100),
                    st.sampled_from([0, 1, 10080, 10081, 2**64]),
                    toml_values,
                ),
                "extra": toml_values,
            },
        ),
        toml_values,
    ),
    max_size=4,
)
go_durations = st.one_of(
    st.lists(
        st.builds(
            lambda n, unit: f"{n}{unit}",
            st.sampled_from(["0", "1", "1.5", ".5", "1.", "90", "9" * 30, "\u0661", "", "1e3"]),
            st.sampled_from(["h", "m", "s", "ms", "us", "\u00b5s", "\u03bcs", "ns", "d", "", "H"]),
        ),
        min_size=1,
        max_size=4,
    ).map(lambda terms: "".join(terms)),
    st.builds(lambda s, t: s + t, st.sampled_from(["", "-", "+", "--"]), st.text(max_size=12)),
)
window_starts = st.one_of(
    st.builds(lambda d, t: f"{d} {t}".strip(), st.one_of(st.just(""), day_names), _clock_text()),
    st.text(max_size=20),
    toml_values,
)
zones = st.one_of(
    st.sampled_from(
        [
            "UTC",
            "Etc/UTC",
            "Europe/Berlin",
            "America/St_Johns",
            "Australia/Lord_Howe",
            "localtime",
            "",
            "Europe",
            "/etc/localtime",
            "../../etc/passwd",
            "Europe/../Europe/Berlin",
            "zone.tab",
            "tzdata.zi",
            "right/UTC",
            "posixrules",
            "Europe/Berlin\x00",
            "a" * 5000,
        ]
    ),
    st.text(max_size=30),
    st.integers(1, 3000).map(lambda n: "/".join(["Europe"] * n)),
    toml_values,
)


def _use(windows: Windows) -> None:
    """Accepted windows answer every question the strategy asks (within bounds)."""
    for now in (NOW, NOW + timedelta(days=210, hours=1)):
        open_now = windows.is_open(now)
        opens = windows.next_open(now)
        closes = windows.closes_at(now)
        assert opens is None or opens >= now
        assert open_now == (opens == now)
        assert closes is None or closes >= now
    str(windows)


@given(
    entries=window_entries,
    tz=zones,
    start=st.one_of(st.none(), window_starts),
    length=st.one_of(st.none(), go_durations, toml_values),
)
def test_window_specs_are_windows_or_config_errors(
    entries: Any, tz: Any, start: Any, length: Any
) -> None:
    def parse() -> Windows:
        windows = parse_windows(
            entries,
            tz,
            window_start=start,
            window_length=length,
            file="/etc/updater/config.d/50-w.toml",
            key="reboot.window",
        )
        _use(windows)
        return windows

    result = parse_or_typed_error(parse)
    if not isinstance(result, Windows):
        assert isinstance(result, ConfigError), result
        assert result.kind in ("invalid", "missing")
        assert result.key is not None and result.key.startswith("reboot.")
        assert result.file == "/etc/updater/config.d/50-w.toml"


@given(text=go_durations)
def test_go_durations_are_durations_or_value_errors(text: str) -> None:
    try:
        span = parse_go_duration(text)
    except ValueError:
        return
    assert abs(span) <= timedelta(microseconds=10**15)


def test_fuzz_strategies_reach_accepted_windows() -> None:
    """The generators are not all noise: a plain spec from them is accepted."""
    windows = parse_windows(
        [{"days": ["Sun"], "start_time": "1:30", "length_minutes": 90}],
        "Europe/Berlin",
        window_start="04:00",
        window_length="1.5h",
        file=None,
        key="reboot.window",
    )
    assert windows.is_open(datetime.combine(date(2024, 3, 31), time(0, 45), tzinfo=UTC))


# --- the whole config loader --------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: object) -> str:
    """``value`` (what tomllib returns) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value).replace("inf", "inf")
    if isinstance(value, str):
        return (
            '"'
            + "".join(
                c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in value
            )
            + '"'
        )
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _known_keys() -> dict[str, list[str]]:
    """Every key the loader reads, per section (from the settings' dataclasses)."""
    out = {}
    for section in config._SECTIONS:
        cls = type(getattr(config.Config(), section.replace("-", "_")))
        out[section] = [f.name for f in dataclasses.fields(cls)]
    out["reboot"] = [k for k in out["reboot"] if k not in ("windows", "windows_file")] + [
        "window",
        "window_start",
        "window_length",
    ]
    out["systemd-boot"] = [k for k in out["systemd-boot"] if k != "entry"] + [*config.DEFAULT_ENTRY]
    out["etcd"] += ["password_file"]
    return out


KNOWN_KEYS = _known_keys()
SCALAR_TEXT = st.sampled_from(
    [
        "",
        "/",
        "/etc/updater/keys/release.asc",
        "relative/path",
        "https://updates.example/repo",
        "http://127.0.0.1:2379",
        "http://[::1",
        "http://h:99999/",
        "http://h:\u00b2/",
        "file:///srv/repo",
        "disabled",
        "127.0.0.1:9464",
        "127.0.0.1:\u00b2",
        "[::1]:0",
        "unix:/run/updater/metrics.sock",
        "unix:/run/a\x00b",
        "stable",
        "a/b",
        "USR-A",
        "gpt-prio",
        "systemd-boot",
        "grub-env",
        "omaha",
        "static",
        "lock",
        "etcd",
        "fleetlock",
        "{label}",
        "mount.usr=PARTUUID={partuuid} ro",
        "Thu 04:00",
        "1h30m",
        "Europe/Berlin",
        "localtime",
        "{3c1f8a7e-5d2b-4b8e-9f61-0a7c2e4d9b13}",
        "\x00",
        "\u202e",
        "a" * 300,
    ]
)
key_values = st.one_of(
    SCALAR_TEXT,
    st.lists(SCALAR_TEXT, max_size=3),
    st.sampled_from([0, 1, -1, 2, 3, 4096, 65536, 1024 * 1024, 2**63 - 1, -(2**63)]),
    st.sampled_from([0.0, 0.05, 0.5, 1.5, -0.0, math.inf, -math.inf, math.nan, 1e308]),
    toml_values,
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, dict[str, object]]:
    doc: dict[str, dict[str, object]] = {}
    sections = draw(
        st.lists(st.sampled_from([*KNOWN_KEYS, "unknown-section"]), max_size=5, unique=True)
    )
    for section in sections:
        keys = [*KNOWN_KEYS.get(section, ["x"]), "future_key"]
        chosen = draw(st.lists(st.sampled_from(keys), max_size=6, unique=True))
        table: dict[str, object] = {}
        for key in chosen:
            if key == "window":
                table[key] = draw(
                    window_entries.filter(lambda w: bool(w) and all(isinstance(e, dict) for e in w))
                    | toml_values
                )
            else:
                table[key] = draw(key_values)
        doc[section] = table
    return doc


def _write_toml(doc: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{_toml_key(section)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _load(path: Path) -> config.Config:
    """Load, and use what was accepted as the agent would: every consumer takes it."""
    cfg = config.load(path)
    assert cfg.reboot.windows is None or isinstance(cfg.reboot.windows, Windows)  # by load
    if cfg.metrics.listen is not None:
        address = parse_listen(cfg.metrics.listen)
        assert parse_listen(str(address)) == address
    for url in (cfg.source.url, cfg.omaha.server, *cfg.etcd.endpoints):
        if url is not None and url != "disabled":
            parse_url(
                url, lambda why: ConfigError("invalid", why), schemes=("http", "https", "file")
            )
    EtcdSettings(
        endpoints=cfg.etcd.endpoints,
        ca_file=cfg.etcd.ca_file,
        cert_file=cfg.etcd.cert_file,
        key_file=cfg.etcd.key_file,
        username=cfg.etcd.username,
        password=None if cfg.etcd.username is None else "pw",
        timeout_s=cfg.etcd.timeout_s,
    )
    if cfg.fleetlock.url is not None:
        FleetLock(cfg.fleetlock.url, cfg.reboot.group, timeout_s=cfg.fleetlock.timeout_s).close()
    if cfg.systemd_boot != config.SystemdBootConfig():
        config.entry_template(cfg.systemd_boot)
    return cfg


def _loaded(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with capture_logs():  # unknown keys are warnings
        result = parse_or_typed_error(lambda: _load(path), timeout_s=10)
    if not isinstance(result, config.Config):
        assert isinstance(result, ConfigError), result
        assert result.kind in ConfigError.kinds
        assert result.file is None or result.file == str(path), result.file


@given(doc=config_documents())
def test_fuzz_config_documents(tmp_path: Path, doc: dict[str, dict[str, object]]) -> None:
    """Valid TOML, random values of random types in every key the loader knows."""
    text = _write_toml(doc)
    assert tomllib.loads(text).keys() == doc.keys()  # the writer writes TOML
    _loaded(tmp_path / "fuzz.toml", text.encode())


EXAMPLE = Path(__file__).resolve().parent.parent / "dist" / "config.d" / "50-example.toml"


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    data = bytearray(_uncommented(EXAMPLE.read_text()).encode())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(MUTATIONS)))
        if action == "insert":
            data[at:at] = chunk
        elif action == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at : at + len(chunk)] = chunk
    return bytes(data)


MUTATIONS = [
    b'"',
    b"'",
    b"[",
    b"]",
    b"[[",
    b"=",
    b"\n",
    b"\\",
    b"\x00",
    b"\xff",
    b"nan",
    b"-",
    b"9" * 25,
    b"\\u0000",
    b"{",
    b"}",
    b",",
]


def _uncommented(text: str) -> str:
    """The example with its commented settings switched on (so mutations hit values)."""
    return "\n".join(re.sub(r"^# ?([a-z_]+ = )", r"\1", line) for line in text.split("\n"))


def test_the_uncommented_example_loads(tmp_path: Path) -> None:
    f = tmp_path / "example.toml"
    f.write_text(_uncommented(EXAMPLE.read_text()))
    result = parse_or_typed_error(lambda: config.load(f))
    assert isinstance(result, config.Config | ConfigError)


@given(data=st.one_of(st.binary(max_size=2048), mutated_example()))
def test_fuzz_config_bytes(tmp_path: Path, data: bytes) -> None:
    """Raw bytes, and the example config mutated byte by byte."""
    _loaded(tmp_path / "fuzz.toml", data)


# --- os-release and update.conf -------------------------------------------------------------


LINE_PARTS = st.sampled_from(
    [
        b"IMAGE_VERSION",
        b"VERSION_ID",
        b"SERVER",
        b"GROUP",
        b"ID",
        b"=",
        b'"',
        b"'",
        b"\\",
        b"#",
        b" ",
        b"\t",
        b"\r",
        b"\x00",
        b"\xff",
        b"\xc3\xa9",
        b"\xe2\x80\xa8",
        b"$(x)",
        b"`x`",
        b"1.2.3",
        b"http://[::1",
        b"https://u.example/v1/update/",
        b"disabled",
        b"stable",
        b"\n",
    ]
)
env_files = st.one_of(
    st.binary(max_size=1024),
    st.lists(st.one_of(LINE_PARTS, st.binary(max_size=4)), max_size=40).map(b"".join),
)


@given(data=env_files)
def test_fuzz_os_release(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "os-release"
    f.write_bytes(data)
    result = parse_or_typed_error(lambda: (osrelease.parse(data), osrelease.image_version(f)))
    assert not isinstance(result, UpdaterError), result  # no error at all: fields or none
    fields, version = result
    for key, value in fields.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)
    assert version is None or version in fields.values()


@given(vendor=env_files, admin=env_files)
def test_fuzz_update_conf(tmp_path: Path, vendor: bytes, admin: bytes) -> None:
    usr, etc = tmp_path / "usr.conf", tmp_path / "etc.conf"
    usr.write_bytes(vendor)
    etc.write_bytes(admin)
    result = parse_or_typed_error(lambda: flatcar.read((usr, etc)))
    if isinstance(result, flatcar.FlatcarSettings):
        assert result.files == (usr, etc)
        if result.server is not None and not result.disabled:
            parse_url(result.server, lambda why: ConfigError("invalid", why))
    else:
        assert isinstance(result, ConfigError), result
        assert result.kind == "invalid" and result.key in ("SERVER", "GROUP")
        assert result.file in (str(usr), str(etc))


# --- the metrics listen address -----------------------------------------------------------------

listen_texts = st.one_of(
    st.builds(
        lambda host, sep, port: f"{host}{sep}{port}",
        st.sampled_from(
            [
                "127.0.0.1",
                "[::1]",
                "::1",
                "[::1",
                "localhost",
                "0.0.0.0",
                "127.1",
                "[::1%lo]",
                "127.0.0.01",
                "\u0661\u0662\u0667.0.0.1",
                "[::ffff:127.0.0.1]",
                "",
                "unix",
            ]
        ),
        st.sampled_from([":", "", "::", "\uff1a"]),
        st.one_of(
            st.integers(-1, 70000).map(str),
            st.sampled_from(["\u00b2", "\u0669", "\uff19", "", "0x10", "1_0", " 1", "1 ", "+1"]),
        ),
    ),
    st.builds(lambda p: "unix:" + p, st.text(max_size=120)),
    st.text(max_size=40),
)


@given(listen=listen_texts, allow_zero=st.booleans())
def test_fuzz_metrics_listen(listen: str, allow_zero: bool) -> None:
    result = parse_or_typed_error(
        lambda: parse_listen(listen, key="metrics.listen", allow_port_zero=allow_zero)
    )
    if isinstance(result, ListenAddress):
        assert parse_listen(str(result), allow_port_zero=allow_zero) == result
        if result.family == "tcp":
            assert (0 if allow_zero else 1) <= result.port <= 65535
            assert ipaddress.ip_address(result.host).is_loopback
        else:
            assert result.path is not None and len(os.fsencode(result.path)) < 108
    else:
        assert isinstance(result, ConfigError) and result.key == "metrics.listen", result
