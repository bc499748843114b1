"""Fuzzing the configuration edge (hypothesis): reboot window specs, the whole
config loader, os-release, Flatcar's update.conf and the metrics listen address.
Each returns a result or a typed error (ConfigError where it is one); nothing
else, no hang, bounded memory."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.windows import Windows, parse_go_duration, parse_windows
from tests.fuzzing import parse_or_typed_error
from updater.errors import ConfigError

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
