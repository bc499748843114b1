"""Maintenance windows: open/closed at many instants, DST edges, both config forms."""

from __future__ import annotations

import shutil
import tomllib
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from policies.windows import (
    ALL_DAYS,
    Window,
    Windows,
    parse_go_duration,
    parse_locksmith_window,
    parse_time_zone,
    parse_window_entries,
    parse_windows,
)
from updater.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def win(days: set[int], start: str, minutes: float) -> Window:
    h, m = start.split(":")
    return Window(frozenset(days), time(int(h), int(m)), timedelta(minutes=minutes))


# 2024-06-03 is a Monday; 2024-06-09 a Sunday, 2024-06-10 the next Monday.
MON_THU_4 = Windows((win({MON, THU}, "04:00", 60),))
FRI_LATE = Windows((win({FRI}, "23:00", 120),))
SUN_LATE = Windows((win({SUN}, "23:00", 120),))
OVERLAP = Windows((win({MON}, "04:00", 120), win({MON}, "05:00", 120)))
BACK_TO_BACK = Windows((win({MON}, "04:00", 60), win({MON}, "05:00", 60)))
SEVERAL = Windows((win({MON}, "04:00", 60), win({WED, SAT}, "22:00", 180)))
WHOLE_WEEK = Windows((win({WED}, "12:00", 7 * 24 * 60),))

OPEN_CASES: list[tuple[str, Windows, str, bool]] = [
    ("before the start", MON_THU_4, "2024-06-03T03:59:59", False),
    ("at the start", MON_THU_4, "2024-06-03T04:00", True),
    ("inside", MON_THU_4, "2024-06-03T04:30", True),
    ("last microsecond", MON_THU_4, "2024-06-03T04:59:59.999999", True),
    ("at the end (half-open)", MON_THU_4, "2024-06-03T05:00", False),
    ("a day not listed", MON_THU_4, "2024-06-04T04:30", False),
    ("the other listed day", MON_THU_4, "2024-06-06T04:30", True),
    ("next week", MON_THU_4, "2024-06-10T04:15", True),
    ("crossing midnight, before", FRI_LATE, "2024-06-07T23:30", True),
    ("crossing midnight, after", FRI_LATE, "2024-06-08T00:59", True),
    ("crossing midnight, closed", FRI_LATE, "2024-06-08T01:00", False),
    ("the day before a midnight crossing", FRI_LATE, "2024-06-07T00:30", False),
    ("crossing the week's end, Sunday", SUN_LATE, "2024-06-09T23:30", True),
    ("crossing the week's end, Monday", SUN_LATE, "2024-06-10T00:30", True),
    ("after the week's end", SUN_LATE, "2024-06-10T01:00", False),
    ("Monday before Sunday's window", SUN_LATE, "2024-06-03T00:30", True),
    ("overlap: first only", OVERLAP, "2024-06-03T04:30", True),
    ("overlap: both", OVERLAP, "2024-06-03T05:30", True),
    ("overlap: second only", OVERLAP, "2024-06-03T06:30", True),
    ("overlap: after both", OVERLAP, "2024-06-03T07:00", False),
    ("several: first", SEVERAL, "2024-06-03T04:10", True),
    ("several: second, Wednesday", SEVERAL, "2024-06-05T23:00", True),
    ("several: second, past midnight", SEVERAL, "2024-06-09T00:59", True),
    ("several: closed between", SEVERAL, "2024-06-05T12:00", False),
    ("a week-long window is always open", WHOLE_WEEK, "2024-06-05T11:59:59", True),
    ("no windows: always open", Windows(), "2024-06-05T11:59:59", True),
]


@pytest.mark.parametrize(
    ("windows", "now", "expected"),
    [c[1:] for c in OPEN_CASES],
    ids=[c[0] for c in OPEN_CASES],
)
def test_is_open(windows: Windows, now: str, expected: bool) -> None:
    assert windows.is_open(utc(now)) is expected


NEXT_OPEN_CASES: list[tuple[str, Windows, str, str | None]] = [
    ("later today", MON_THU_4, "2024-06-03T03:00", "2024-06-03T04:00"),
    ("open now: now", MON_THU_4, "2024-06-03T04:30", "2024-06-03T04:30"),
    ("just closed: next listed day", MON_THU_4, "2024-06-03T05:00", "2024-06-06T04:00"),
    ("wraps to next week", MON_THU_4, "2024-06-06T05:00", "2024-06-10T04:00"),
    ("Sunday's window from Monday", SUN_LATE, "2024-06-10T01:00", "2024-06-16T23:00"),
    ("the earlier of several", SEVERAL, "2024-06-03T06:00", "2024-06-05T22:00"),
    ("no windows: now", Windows(), "2024-06-03T06:00", "2024-06-03T06:00"),
]


@pytest.mark.parametrize(
    ("windows", "now", "expected"),
    [c[1:] for c in NEXT_OPEN_CASES],
    ids=[c[0] for c in NEXT_OPEN_CASES],
)
def test_next_open(windows: Windows, now: str, expected: str | None) -> None:
    assert windows.next_open(utc(now)) == (utc(expected) if expected else None)


CLOSES_CASES: list[tuple[str, Windows, str, str | None]] = [
    ("inside one window", MON_THU_4, "2024-06-03T04:10", "2024-06-03T05:00"),
    ("closed now: now", MON_THU_4, "2024-06-03T06:00", "2024-06-03T06:00"),
    ("overlapping windows are one", OVERLAP, "2024-06-03T04:10", "2024-06-03T07:00"),
    ("back-to-back windows are one", BACK_TO_BACK, "2024-06-03T04:10", "2024-06-03T06:00"),
    ("across the week's end", SUN_LATE, "2024-06-09T23:10", "2024-06-10T01:00"),
    ("never closes", WHOLE_WEEK, "2024-06-03T04:10", None),
    ("no windows: never closes", Windows(), "2024-06-03T04:10", None),
]


@pytest.mark.parametrize(
    ("windows", "now", "expected"),
    [c[1:] for c in CLOSES_CASES],
    ids=[c[0] for c in CLOSES_CASES],
)
def test_closes_at(windows: Windows, now: str, expected: str | None) -> None:
    assert windows.closes_at(utc(now)) == (utc(expected) if expected else None)


# --- time zones and DST -----------------------------------------------------------
# Europe/Berlin 2024: 03-31 02:00 CET -> 03:00 CEST; 10-27 03:00 CEST -> 02:00 CET.
# America/New_York 2024: 03-10 02:00 EST -> 03:00 EDT; 11-03 02:00 EDT -> 01:00 EST.

# A start in the spring-forward gap moves forward by the gap: 02:30 -> 03:30 CEST.
BERLIN_GAP = Windows((win({SUN}, "02:30", 60),), BERLIN)
# A window across spring forward lasts its length in real time: 01:30 CET + 2h = 04:30 CEST.
BERLIN_ACROSS_SPRING = Windows((win({SUN}, "01:30", 120),), BERLIN)
# A repeated start opens at the first 02:30 (CEST) only.
BERLIN_FOLD_SHORT = Windows((win({SUN}, "02:30", 30),), BERLIN)
BERLIN_FOLD_HOUR = Windows((win({SUN}, "02:30", 60),), BERLIN)
# Every day at midnight for 24h: a fall-back day has 25 hours, so one stays closed.
BERLIN_DAILY = Windows((win(set(ALL_DAYS), "00:00", 24 * 60),), BERLIN)
BERLIN_MON_4 = Windows((win({MON}, "04:00", 60),), BERLIN)
NY_GAP = Windows((win({SUN}, "02:15", 60),), NEW_YORK)
NY_FOLD = Windows((win({SUN}, "01:30", 60),), NEW_YORK)

DST_CASES: list[tuple[str, Windows, str, bool]] = [
    ("Berlin gap: 01:29 UTC (03:29 CEST)", BERLIN_GAP, "2024-03-31T01:29", False),
    ("Berlin gap: opens 01:30 UTC (03:30 CEST)", BERLIN_GAP, "2024-03-31T01:30", True),
    ("Berlin gap: open 02:29 UTC", BERLIN_GAP, "2024-03-31T02:29", True),
    ("Berlin gap: closes 02:30 UTC (04:30 CEST)", BERLIN_GAP, "2024-03-31T02:30", False),
    ("Berlin gap: the week before (CET)", BERLIN_GAP, "2024-03-24T01:45", True),
    ("Berlin gap: the week after (CEST)", BERLIN_GAP, "2024-04-07T00:45", True),
    ("Berlin spring: opens 01:30 CET", BERLIN_ACROSS_SPRING, "2024-03-31T00:30", True),
    ("Berlin spring: open 04:29 CEST", BERLIN_ACROSS_SPRING, "2024-03-31T02:29", True),
    ("Berlin spring: closed 04:30 CEST", BERLIN_ACROSS_SPRING, "2024-03-31T02:30", False),
    ("Berlin fold: before 02:30 CEST", BERLIN_FOLD_SHORT, "2024-10-27T00:29", False),
    ("Berlin fold: opens 02:30 CEST", BERLIN_FOLD_SHORT, "2024-10-27T00:30", True),
    ("Berlin fold: closes 03:00 CEST", BERLIN_FOLD_SHORT, "2024-10-27T01:00", False),
    ("Berlin fold: second 02:30 (CET) stays closed", BERLIN_FOLD_SHORT, "2024-10-27T01:30", False),
    ("Berlin fold: second 02:45 (CET) closed", BERLIN_FOLD_SHORT, "2024-10-27T01:45", False),
    ("Berlin fold 1h: 02:00 CET still open", BERLIN_FOLD_HOUR, "2024-10-27T01:00", True),
    ("Berlin fold 1h: closes at 02:30 CET", BERLIN_FOLD_HOUR, "2024-10-27T01:30", False),
    ("Berlin daily: 22:59 CET on fall-back day", BERLIN_DAILY, "2024-10-27T21:59", True),
    ("Berlin daily: 23:00 CET on fall-back day", BERLIN_DAILY, "2024-10-27T22:00", False),
    ("Berlin daily: next midnight", BERLIN_DAILY, "2024-10-27T23:00", True),
    ("Berlin daily: spring-forward day", BERLIN_DAILY, "2024-03-31T21:59", True),
    ("Berlin summer: 04:00 CEST is 02:00 UTC", BERLIN_MON_4, "2024-06-03T02:00", True),
    ("Berlin summer: 04:00 UTC is 06:00 CEST", BERLIN_MON_4, "2024-06-03T04:00", False),
    ("Berlin winter: 04:00 CET is 03:00 UTC", BERLIN_MON_4, "2024-01-08T03:00", True),
    ("Berlin winter: 02:30 UTC is 03:30 CET", BERLIN_MON_4, "2024-01-08T02:30", False),
    ("New York gap: 02:15 -> 03:15 EDT (07:15 UTC)", NY_GAP, "2024-03-10T07:14", False),
    ("New York gap: open 07:15 UTC", NY_GAP, "2024-03-10T07:15", True),
    ("New York gap: closes 08:15 UTC", NY_GAP, "2024-03-10T08:15", False),
    ("New York fold: first 01:30 EDT", NY_FOLD, "2024-11-03T05:30", True),
    ("New York fold: 01:15 EST still open", NY_FOLD, "2024-11-03T06:15", True),
    ("New York fold: second 01:30 EST closed", NY_FOLD, "2024-11-03T06:30", False),
    ("New York fold: a normal Sunday (EST)", NY_FOLD, "2024-11-10T06:45", True),
]


@pytest.mark.parametrize(
    ("windows", "now", "expected"), [c[1:] for c in DST_CASES], ids=[c[0] for c in DST_CASES]
)
def test_dst_edges(windows: Windows, now: str, expected: bool) -> None:
    assert windows.is_open(utc(now)) is expected


def test_next_open_in_a_gap_is_the_shifted_start_in_local_time() -> None:
    nxt = BERLIN_GAP.next_open(utc("2024-03-30T12:00"))
    assert nxt == utc("2024-03-31T01:30")
    assert nxt is not None and nxt.tzinfo is UTC
    local = nxt.astimezone(BERLIN)
    assert (local.hour, local.minute, local.utcoffset()) == (3, 30, timedelta(hours=2))


def test_next_open_on_a_fall_back_day_is_the_first_occurrence() -> None:
    nxt = NY_FOLD.next_open(utc("2024-11-03T00:00"))
    assert nxt == utc("2024-11-03T05:30")
    assert nxt is not None
    assert nxt.astimezone(NEW_YORK).utcoffset() == timedelta(hours=-4)  # EDT: the first 01:30
    assert NY_FOLD.next_open(utc("2024-11-03T06:30")) == utc("2024-11-10T06:30")  # next week, EST


def test_closes_at_finds_the_fall_back_gap_of_a_daily_24h_window() -> None:
    closes = BERLIN_DAILY.closes_at(utc("2024-10-20T12:00"))
    assert closes == utc("2024-10-27T22:00")  # 23:00 CET
    assert BERLIN_DAILY.next_open(closes) == utc("2024-10-27T23:00")


def test_now_may_be_in_any_zone_and_must_be_aware() -> None:
    now_ny = utc("2024-06-03T02:30").astimezone(NEW_YORK)  # Sunday evening in New York
    assert BERLIN_MON_4.is_open(now_ny)
    assert BERLIN_MON_4.closes_at(now_ny) == utc("2024-06-03T03:00")
    with pytest.raises(ValueError, match="aware"):
        BERLIN_MON_4.is_open(datetime(2024, 6, 3, 4, 30))


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK, UTC], ids=str)
def test_answers_agree_with_each_other_over_dst_weeks(tz: tzinfo) -> None:
    windows = Windows(
        (
            win({SUN}, "01:30", 90),
            win({SUN}, "02:30", 30),
            win({SAT, SUN}, "23:45", 30),
            win({TUE}, "12:00", 24 * 60),
        ),
        tz,
    )
    for start in ("2024-03-07T00:00", "2024-03-28T00:00", "2024-10-24T00:00", "2024-10-31T00:00"):
        t = utc(start)
        for _ in range(7 * 24 * 60 // 11):
            nxt = windows.next_open(t)
            closes = windows.closes_at(t)
            assert nxt is not None and closes is not None
            assert nxt >= t and windows.is_open(nxt)
            assert closes >= t and not windows.is_open(closes)
            if windows.is_open(t):
                assert nxt == t and closes > t
                assert windows.is_open(closes - timedelta(microseconds=1))
            else:
                assert closes == t and nxt > t
                assert not windows.is_open(nxt - timedelta(microseconds=1))
            t += timedelta(minutes=11)  # coprime with 60: every minute offset gets a turn


@pytest.mark.parametrize(
    ("days", "start", "length"),
    [
        (frozenset(), time(4), timedelta(hours=1)),
        (frozenset({7}), time(4), timedelta(hours=1)),
        (frozenset({0}), time(4), timedelta(0)),
        (frozenset({0}), time(4), timedelta(days=7, seconds=1)),
        (frozenset({0}), time(4, tzinfo=UTC), timedelta(hours=1)),
    ],
)
def test_window_refuses_nonsense(days: frozenset[int], start: time, length: timedelta) -> None:
    with pytest.raises(ValueError):
        Window(days, start, length)


def test_describe() -> None:
    assert str(Windows()) == "always"
    assert str(MON_THU_4) == "Mon,Thu 04:00 for 1h (UTC)"
    berlin = Windows((win(set(ALL_DAYS), "23:30", 90),), BERLIN)
    assert str(berlin) == "every day 23:30 for 1h30m (Europe/Berlin)"


# --- config forms -------------------------------------------------------------------

ZINCATI_TOML = """
[reboot]
time_zone = "Europe/Berlin"

[[reboot.window]]
days = ["Mon", "Thu"]
start_time = "04:00"
length_minutes = 60

[[reboot.window]]
days = ["saturday", "SUN"]
start_time = "23:30"
length_minutes = 90
"""


def test_zincati_toml_shape() -> None:
    reboot = tomllib.loads(ZINCATI_TOML)["reboot"]
    windows = parse_windows(
        reboot["window"], reboot["time_zone"], file="f.toml", key="reboot.window"
    )
    assert windows == Windows(
        (win({MON, THU}, "04:00", 60), win({SAT, SUN}, "23:30", 90)), ZoneInfo("Europe/Berlin")
    )


@pytest.mark.parametrize(
    ("start", "length", "entry"),
    [
        ("Thu 04:00", "1h30m", {"days": ["Thu"], "start_time": "04:00", "length_minutes": 90}),
        ("thu 4:00", "90m", {"days": ["thursday"], "start_time": "4:00", "length_minutes": 90}),
        ("SUN 23:00", "2h", {"days": ["Sun"], "start_time": "23:00", "length_minutes": 120}),
        ("  Mon   00:05 ", "1.5h", {"days": ["MON"], "start_time": "00:05", "length_minutes": 90}),
        (
            "04:00",  # no day: every day
            "30m",
            {
                "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"],
                "start_time": "04:00",
                "length_minutes": 30,
            },
        ),
        ("Wed 12:00", "167h", {"days": ["Wed"], "start_time": "12:00", "length_minutes": 10020}),
    ],
)
def test_both_config_forms_give_the_same_window(
    start: str, length: str, entry: dict[str, object]
) -> None:
    locksmith = parse_locksmith_window(
        start, length, file="f", start_key="reboot.window_start", length_key="reboot.window_length"
    )
    (zincati,) = parse_window_entries([entry], file="f", key="reboot.window")
    assert locksmith == zincati


def test_every_day_name_zincati_accepts() -> None:
    names = ["mon", "Tue", "WED", "thu", "fri", "sat", "sun"]
    full = ["Monday", "tuesday", "WEDNESDAY", "Thursday", "friday", "Saturday", "sunday"]
    for spelled in (names, full):
        (w,) = parse_window_entries(
            [{"days": spelled, "start_time": "01:00", "length_minutes": 1}], file="f", key="k"
        )
        assert w.days == ALL_DAYS


def test_unknown_entry_keys_are_logged_not_fatal() -> None:
    entry = {"days": ["Mon"], "start_time": "04:00", "length_minutes": 5, "colour": "blue"}
    with capture_logs() as logs:
        (w,) = parse_window_entries([entry], file="f.toml", key="reboot.window")
    assert w == win({MON}, "04:00", 5)
    assert logs == [
        {
            "event": "config_key_unknown",
            "log_level": "warning",
            "file": "f.toml",
            "key": "reboot.window[0].colour",
        }
    ]


def _entry(**changes: object) -> list[object]:
    entry: dict[str, object] = {"days": ["Mon"], "start_time": "04:00", "length_minutes": 60}
    entry.update(changes)
    return [{k: v for k, v in entry.items() if v is not None}]


ZINCATI_BAD: list[tuple[str, object, str]] = [
    ("unknown day", _entry(days=["Mon", "Funday"]), "reboot.window[0].days"),
    ("Zincati's typo", _entry(days=["Tuesady"]), "reboot.window[0].days"),
    ("no days", _entry(days=[]), "reboot.window[0].days"),
    ("days not a list", _entry(days=5), "reboot.window[0].days"),
    ("day not a string", _entry(days=[1]), "reboot.window[0].days"),
    ("24:00", _entry(start_time="24:00"), "reboot.window[0].start_time"),
    ("minute 60", _entry(start_time="04:60"), "reboot.window[0].start_time"),
    ("seconds", _entry(start_time="04:00:00"), "reboot.window[0].start_time"),
    ("no minutes", _entry(start_time="4"), "reboot.window[0].start_time"),
    ("12-hour", _entry(start_time="4pm"), "reboot.window[0].start_time"),
    ("one-digit minute", _entry(start_time="4:5"), "reboot.window[0].start_time"),
    ("time not a string", _entry(start_time=400), "reboot.window[0].start_time"),
    ("length 0", _entry(length_minutes=0), "reboot.window[0].length_minutes"),
    ("length negative", _entry(length_minutes=-5), "reboot.window[0].length_minutes"),
    ("length > a week", _entry(length_minutes=10081), "reboot.window[0].length_minutes"),
    ("length a string", _entry(length_minutes="60"), "reboot.window[0].length_minutes"),
    ("length a float", _entry(length_minutes=60.0), "reboot.window[0].length_minutes"),
    ("length a bool", _entry(length_minutes=True), "reboot.window[0].length_minutes"),
    (
        "missing length",
        [{"days": ["Mon"], "start_time": "04:00"}],
        "reboot.window[0].length_minutes",
    ),
    ("missing days", [{"start_time": "04:00", "length_minutes": 1}], "reboot.window[0].days"),
    ("entry not a table", ["Mon 04:00"], "reboot.window[0]"),
    ("not a list", {"days": ["Mon"]}, "reboot.window"),
    ("second entry", [*_entry(), *_entry(days=["Mo"])], "reboot.window[1].days"),
]


@pytest.mark.parametrize(
    ("entries", "key"), [c[1:] for c in ZINCATI_BAD], ids=[c[0] for c in ZINCATI_BAD]
)
def test_bad_zincati_windows_name_file_and_key(entries: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_windows(
            entries, "UTC", file="/etc/updater/config.d/50-reboot.toml", key="reboot.window"
        )
    assert err.value.file == "/etc/updater/config.d/50-reboot.toml"
    assert err.value.key == key
    assert f"/etc/updater/config.d/50-reboot.toml:{key}: " in str(err.value)
    assert err.value.kind in ("invalid", "missing")


LOCKSMITH_BAD: list[tuple[str, object, object, str]] = [
    ("unknown day", "Funday 04:00", "1h", "start"),
    ("only a day", "Thu", "1h", "start"),
    ("three fields", "Thu 04:00 UTC", "1h", "start"),
    ("24:00", "Thu 24:00", "1h", "start"),
    ("empty start", "", "1h", "start"),
    ("start not a string", 400, "1h", "start"),
    ("length 0", "Thu 04:00", "0", "length"),
    ("length 0s", "Thu 04:00", "0s", "length"),
    ("negative", "Thu 04:00", "-1h", "length"),
    ("no unit", "Thu 04:00", "90", "length"),
    ("unknown unit", "Thu 04:00", "1d", "length"),
    ("spaces", "Thu 04:00", "1h 30m", "length"),
    ("empty length", "Thu 04:00", "", "length"),
    ("length not a string", "Thu 04:00", 60, "length"),
    ("a week with a day", "Thu 04:00", "168h", "length"),
    ("a day without a day name", "04:00", "24h", "length"),
]


@pytest.mark.parametrize(
    ("start", "length", "which"),
    [c[1:] for c in LOCKSMITH_BAD],
    ids=[c[0] for c in LOCKSMITH_BAD],
)
def test_bad_locksmith_windows_name_file_and_key(start: object, length: object, which: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_locksmith_window(
            start,
            length,
            file="a.toml",
            start_key="reboot.window_start",
            length_key="reboot.window_length",
            length_file="b.toml",
        )
    expected = {
        "start": ("a.toml", "reboot.window_start"),
        "length": ("b.toml", "reboot.window_length"),
    }
    assert (err.value.file, err.value.key) == expected[which]
    assert err.value.kind == "invalid"


def test_locksmith_daily_limit_is_just_under_a_day() -> None:
    w = parse_locksmith_window("04:00", "23h59m", file=None, start_key="s", length_key="l")
    assert w == win(set(ALL_DAYS), "04:00", 23 * 60 + 59)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90m", timedelta(minutes=90)),
        ("1.5h", timedelta(hours=1.5)),
        (".5h", timedelta(minutes=30)),
        ("5.h", timedelta(hours=5)),
        ("+2h", timedelta(hours=2)),
        ("0", timedelta(0)),
        ("300ms", timedelta(milliseconds=300)),
        ("1h1us", timedelta(hours=1, microseconds=1)),
        ("2\u00b5s", timedelta(microseconds=2)),
        ("2\u03bcs", timedelta(microseconds=2)),
        ("1h999ns", timedelta(hours=1)),  # below a microsecond is dropped
        ("-1h", timedelta(hours=-1)),
    ],
)
def test_go_durations(text: str, expected: timedelta) -> None:
    assert parse_go_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "h", "1", "1.5.5h", "1d", "1h 30m", "1H", "--1h", "99999999999h"]
)
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


# --- time zones ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus",
        "",
        "Europe",
        "utc",
        "../../etc/passwd",
        "/etc/localtime",
        "zone.tab",
        5,
        "/".join(["a"] * 2000),  # zoneinfo imported a package per part: RecursionError
        "Europe/Berlin\x00",
        "Europe/Berlin\n",
        "__init__.py",
        "Europe/__init__.py",
    ],
)
def test_unknown_time_zones_name_file_and_key(name: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_windows(_entry(), name, file="f.toml", key="reboot.window")  # type: ignore[arg-type]
    assert (err.value.file, err.value.key) == ("f.toml", "reboot.time_zone")


def test_time_zone_key_can_be_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_windows(_entry(), "Nowhere", file="g.toml", key="window", tz_key="tz")
    assert (err.value.file, err.value.key) == ("g.toml", "tz")


def test_time_zones() -> None:
    assert parse_time_zone("UTC", file=None, key="k") is UTC
    assert parse_time_zone("Etc/UTC", file=None, key="k") is UTC
    assert parse_time_zone("Europe/Berlin", file=None, key="k") == BERLIN


def test_localtime(tmp_path: Path) -> None:
    link = tmp_path / "localtime"
    assert parse_time_zone("localtime", file=None, key="k", localtime=link) is UTC  # absent: UTC
    link.symlink_to("/usr/share/zoneinfo/America/New_York")
    assert parse_time_zone("localtime", file=None, key="k", localtime=link) == NEW_YORK

    copy = tmp_path / "copied"
    shutil.copyfile("/usr/share/zoneinfo/Europe/Berlin", copy)
    zone = parse_time_zone("localtime", file=None, key="k", localtime=copy)
    assert datetime(2024, 6, 3, 4, tzinfo=zone).utcoffset() == timedelta(hours=2)

    garbage = tmp_path / "garbage"
    garbage.write_text("not a zone\n")
    with pytest.raises(ConfigError) as err:
        parse_time_zone("localtime", file="f.toml", key="reboot.time_zone", localtime=garbage)
    assert (err.value.file, err.value.key) == ("f.toml", "reboot.time_zone")


def test_both_forms_together_are_one_set() -> None:
    windows = parse_windows(
        [{"days": ["Mon"], "start_time": "04:00", "length_minutes": 60}],
        "Europe/Berlin",
        window_start="Thu 23:00",
        window_length="2h",
        file="f.toml",
        key="reboot.window",
    )
    assert windows == Windows((win({MON}, "04:00", 60), win({THU}, "23:00", 120)), BERLIN)
    only_locksmith = parse_windows(
        [], "UTC", window_start="04:00", window_length="1h", file="f", key="reboot.window"
    )
    assert only_locksmith == Windows((win(set(ALL_DAYS), "04:00", 60),))


@pytest.mark.parametrize(
    ("start", "length", "key"),
    [
        ("Thu 23:00", None, "reboot.window_length"),
        (None, "2h", "reboot.window_start"),
        ("Thu 25:00", "2h", "reboot.window_start"),
        ("Thu 23:00", "2 hours", "reboot.window_length"),
    ],
)
def test_locksmith_keys_beside_the_tables_are_named(
    start: str | None, length: str | None, key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_windows(
            [], "UTC", window_start=start, window_length=length, file="f.toml", key="reboot.window"
        )
    assert (err.value.file, err.value.key) == ("f.toml", key)
