"""Maintenance windows: the weekly times at which a reboot may happen.

Pure: nothing here reads a clock. Every question takes an aware ``now``.

A :class:`Window` opens at ``start`` local wall-clock time on each of its
``days`` and then stays open for ``length`` of *elapsed* time, so a window
may cross midnight and the week's end (Sun 23:00 + 2h is open on Monday at
00:30). Windows may overlap; a :class:`Windows` set is open when any of its
windows is, and a set without windows is always open.

Time zones and daylight saving time, decided here once:

* The opening instant of a window on a given day is the local wall time
  resolved the way ``zoneinfo`` resolves ``fold=0``:
  - a start time that does not exist that day (spring forward, e.g. 02:30 in
    Europe/Berlin on the last Sunday of March) is shifted forward by the
    size of the gap: the window opens at 03:30 CEST (01:30 UTC), the instant
    the clock would have shown 02:30 had it not jumped. The window is neither
    skipped (systemd timers skip such a time, systemd issue #5595) nor
    shortened (Zincati measures windows in wall-clock minutes, so its window
    shrinks or vanishes that day);
  - a start time that occurs twice (fall back, 02:30 on the last Sunday of
    October in Berlin) opens the window at its first occurrence (02:30 CEST)
    and only then; the repeated 02:30 does not open it again.
* The length is real time: a window is exactly ``length`` long on every day,
  DST or not. (So "every day 00:00 for 24h" has a one-hour gap on a fall-back
  day, a 25-hour day; configure no windows at all to mean "always".)

Config forms, both parsed into the same :class:`Window`:

* Zincati's periodic strategy (``docs/usage/updates-strategy.md``)::

      [[reboot.window]]
      days = ["Sat", "Sun"]     # English names, full or three letters, any case
      start_time = "23:30"      # hh:mm, 24-hour
      length_minutes = 60       # 1 .. 10080 (a week)

* locksmith's (``README.md``, ``pkg/timeutil/periodic.go``):
  ``window_start = "Thu 04:00"`` (or ``"04:00"``: every day) and
  ``window_length = "1h30m"`` (Go ``time.ParseDuration`` syntax), shorter
  than a day without a day name, shorter than a week with one.

Bad input raises :class:`~updater.errors.ConfigError` naming the file and key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from updater.errors import ConfigError

log = structlog.get_logger(__name__)

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # index = date.weekday()
ALL_DAYS = frozenset(range(7))
MAX_LENGTH = timedelta(days=7)  # a window longer than its period would be always open
MAX_LENGTH_MINUTES = 7 * 24 * 60

_DAY_BY_NAME = {
    **{name.lower(): i for i, name in enumerate(DAY_NAMES)},
    **{
        full: i
        for i, full in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
}
_TIME_OF_DAY = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")
# Go's time.ParseDuration: an optional sign, then one or more <decimal><unit>.
_GO_TERM = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, as Go accepts it
    "\u03bcs": 1_000,  # Greek mu, as Go accepts it
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_ZONEINFO_DIR = "zoneinfo"
# IANA zone names: up to three '/'-separated parts of letters, digits, '_', '+', '-'
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]{1,30}(?:/[A-Za-z0-9_+-]{1,30}){0,3}")
ENTRY_KEYS = frozenset({"days", "start_time", "length_minutes"})


# --- the model ----------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Opens at ``start`` (local wall time) on each of ``days`` (0 = Monday) for ``length``."""

    days: frozenset[int]
    start: time
    length: timedelta

    def __post_init__(self) -> None:
        if not self.days or not self.days <= ALL_DAYS:
            raise ValueError(f"days must be a non-empty subset of 0..6, not {sorted(self.days)}")
        if self.start.tzinfo is not None:
            raise ValueError("start is a local wall time: it carries no tzinfo")
        if not timedelta(0) < self.length <= MAX_LENGTH:
            raise ValueError(f"length must be in (0, 7 days], not {self.length}")

    def opening(self, day: date, tz: tzinfo) -> tuple[datetime, datetime] | None:
        """[opens, closes) in UTC for the occurrence that starts on ``day``, if any."""
        if day.weekday() not in self.days:
            return None
        # fold=0 (the default): a time in a gap moves forward, a repeated one is its first.
        opens = datetime.combine(day, self.start, tzinfo=tz).astimezone(UTC)
        return opens, opens + self.length

    def __str__(self) -> str:
        days = (
            "every day"
            if self.days == ALL_DAYS
            else ",".join(DAY_NAMES[d] for d in sorted(self.days))
        )
        return f"{days} {self.start:%H:%M} for {_format_length(self.length)}"


@dataclass(frozen=True)
class Windows:
    """A set of windows in one time zone; open when any window is; none = always open."""

    windows: tuple[Window, ...] = ()
    tz: tzinfo = field(default=UTC)

    @property
    def always_open(self) -> bool:
        return not self.windows

    def is_open(self, now: datetime) -> bool:
        if not self.windows:
            return True
        t = _utc(now)
        return any(opens <= t < closes for opens, closes in self._around(t))

    def next_open(self, now: datetime) -> datetime | None:
        """The first instant at or after ``now`` when a window is open (``now`` if one is).

        None if no window ever opens. The answer is in UTC (convert with
        ``.astimezone(windows.tz)`` to show it): an aware datetime inside a
        repeated (fall-back) hour never compares equal to one in another zone.
        """
        t = _utc(now)
        if self.is_open(t):
            return t
        # every window recurs weekly, so the next opening is at most 8 local days away
        local = t.astimezone(self.tz).date()
        upcoming = [
            opens
            for opens, _ in self._intervals(local - timedelta(days=1), local + timedelta(days=8))
            if opens > t
        ]
        return min(upcoming) if upcoming else None

    def closes_at(
        self, now: datetime, *, horizon: timedelta = timedelta(days=366)
    ) -> datetime | None:
        """The first instant at or after ``now`` when no window is open (``now`` if none is).

        Overlapping and back-to-back windows count as one. None if the windows
        never close within ``horizon`` (no windows, or windows covering the week).
        The answer is in UTC, as for :meth:`next_open`.
        """
        if not self.windows:
            return None
        t = cursor = _utc(now)
        while cursor - t <= horizon:
            covering = [
                closes for opens, closes in self._around(cursor) if opens <= cursor < closes
            ]
            if not covering:
                return cursor
            cursor = max(covering)
        return None

    def _around(self, t: datetime) -> list[tuple[datetime, datetime]]:
        """Every occurrence that may contain ``t`` (a window lasts at most 7 days)."""
        local = t.astimezone(self.tz).date()
        return self._intervals(local - timedelta(days=8), local + timedelta(days=1))

    def _intervals(self, first: date, last: date) -> list[tuple[datetime, datetime]]:
        out: list[tuple[datetime, datetime]] = []
        day = first
        while day <= last:
            for w in self.windows:
                occurrence = w.opening(day, self.tz)
                if occurrence is not None:
                    out.append(occurrence)
            day += timedelta(days=1)
        return sorted(out)

    def __str__(self) -> str:
        if not self.windows:
            return "always"
        return "; ".join(str(w) for w in self.windows) + f" ({_zone_name(self.tz)})"


def _utc(now: datetime) -> datetime:
    # Aware datetimes sharing a tzinfo compare and add as wall times (fold ignored),
    # which is wrong across DST changes: all arithmetic here is in UTC.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _zone_name(tz: tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


def _format_length(length: timedelta) -> str:
    seconds = int(length.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or f"{length.total_seconds()}s"


# --- parsing (the config edge) --------------------------------------------------


def _invalid(message: str, file: str | None, key: str, hint: str | None = None) -> ConfigError:
    return ConfigError("invalid", message, file=file, key=key, hint=hint)


def parse_days(value: object, *, file: str | None, key: str) -> frozenset[int]:
    """``["Mon", "thursday"]`` (or one name) -> ``{0, 3}``; English names, any case."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise _invalid(
            "must be a non-empty list of day names", file, key, hint='e.g. ["Mon", "Thu"]'
        )
    days: set[int] = set()
    for name in names:
        day = _DAY_BY_NAME.get(name.lower()) if isinstance(name, str) else None
        if day is None:
            raise _invalid(
                f"unknown day {name!r}", file, key, hint="Mon..Sun or Monday..Sunday (any case)"
            )
        days.add(day)
    return frozenset(days)


def parse_time_of_day(value: object, *, file: str | None, key: str) -> time:
    """``"04:00"`` or ``"4:00"`` -> 04:00; 24-hour clock, 00:00..23:59."""
    m = _TIME_OF_DAY.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise _invalid(
            f"invalid time of day {value!r}", file, key, hint='hh:mm, 24-hour, "00:00" to "23:59"'
        )
    return time(int(m[1]), int(m[2]))


def parse_go_duration(text: str) -> timedelta:
    """Go's ``time.ParseDuration`` (``"1h30m"``, ``"90m"``, ``"1.5h"``, ``"0"``), to the µs.

    Raises ValueError; a sign is accepted as Go does (callers reject negatives).
    """
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return timedelta(0)
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    total_ns = Decimal(0)
    pos = 0
    while pos < len(body):
        m = _GO_TERM.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        try:
            total_ns += Decimal(m[1]) * _GO_UNIT_NS[m[2]]
        except InvalidOperation:
            raise ValueError(f"invalid duration {text!r}") from None
        pos = m.end()
    if total_ns > 10**18:  # beyond anything meaningful (Go overflows at ~292 years)
        raise ValueError(f"duration {text!r} is too long")
    micro = int(total_ns) // 1000
    return timedelta(microseconds=-micro if text.startswith("-") else micro)


def parse_time_zone(
    value: object, *, file: str | None, key: str, localtime: Path = Path("/etc/localtime")
) -> tzinfo:
    """An IANA zone name, ``"UTC"``, or ``"localtime"`` (the zone ``/etc/localtime`` names;
    UTC when it does not exist, as Zincati does)."""
    if not isinstance(value, str):
        raise _invalid("must be a string", file, key)
    if value in ("UTC", "Etc/UTC"):
        return UTC  # needs no tz database
    if value == "localtime":
        return _localtime(localtime, file=file, key=key)
    try:
        if not _ZONE_NAME.fullmatch(value):
            # zoneinfo turns each '/' into a package to import from tzdata: thousands
            # of them exhaust the stack (RecursionError); no IANA name looks like that
            raise ValueError(value)
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _invalid(
            f"unknown time zone {value!r}",
            file,
            key,
            hint='an IANA name such as "Europe/Berlin", "UTC" or "localtime"',
        ) from None


def _localtime(path: Path, *, file: str | None, key: str) -> tzinfo:
    if not path.exists():
        return UTC
    parts = path.resolve().parts
    if _ZONEINFO_DIR in parts:
        name = "/".join(parts[len(parts) - parts[::-1].index(_ZONEINFO_DIR) :])
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with path.open("rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (ValueError, OSError) as exc:
        raise _invalid(
            f"{path} is not a time zone file ({exc})",
            file,
            key,
            hint=f"link {path} to a zone under /usr/share/zoneinfo, or name the zone",
        ) from None


def parse_window_entries(entries: object, *, file: str | None, key: str) -> tuple[Window, ...]:
    """Zincati's ``[[...window]]`` tables -> windows. Unknown keys are logged, not fatal
    (an older agent must start with a newer configuration)."""
    if not isinstance(entries, list):
        raise _invalid("must be a list of tables ([[...]])", file, key)
    windows = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise _invalid("must be a table with days, start_time, length_minutes", file, where)
        for name in ("days", "start_time", "length_minutes"):
            if name not in entry:
                raise ConfigError(
                    "missing", f"{name} is required", file=file, key=f"{where}.{name}"
                )
        for unknown in sorted(set(entry) - ENTRY_KEYS):
            log.warning("config_key_unknown", file=file, key=f"{where}.{unknown}")
        minutes = entry["length_minutes"]
        if isinstance(minutes, bool) or not isinstance(minutes, int):
            raise _invalid("must be an integer (minutes)", file, f"{where}.length_minutes")
        if not 1 <= minutes <= MAX_LENGTH_MINUTES:
            raise _invalid(
                f"must be between 1 and {MAX_LENGTH_MINUTES} (a week), not {minutes}",
                file,
                f"{where}.length_minutes",
            )
        windows.append(
            Window(
                days=parse_days(entry["days"], file=file, key=f"{where}.days"),
                start=parse_time_of_day(entry["start_time"], file=file, key=f"{where}.start_time"),
                length=timedelta(minutes=minutes),
            )
        )
    return tuple(windows)


def parse_windows(
    entries: object,
    tz: str | tzinfo = "UTC",
    *,
    window_start: object = None,
    window_length: object = None,
    file: str | None,
    key: str,
    tz_key: str | None = None,
) -> Windows:
    """Zincati's window tables, locksmith's ``window_start``/``window_length`` pair
    (optional, beside them) and a zone name -> one :class:`Windows` (the union).

    ``key`` names the tables (``reboot.window``); the other keys are its siblings
    (``reboot.window_start``, ``reboot.window_length``, ``reboot.time_zone``), or
    ``tz_key`` for the zone.
    """
    parent = key.rpartition(".")[0]

    def sibling(name: str) -> str:
        return f"{parent}.{name}" if parent else name

    if not isinstance(tz, tzinfo):
        tz = parse_time_zone(tz, file=file, key=tz_key or sibling("time_zone"))
    windows = parse_window_entries(entries, file=file, key=key)
    if window_start is not None or window_length is not None:
        if window_start is None or window_length is None:
            missing = "window_start" if window_start is None else "window_length"
            raise ConfigError(
                "missing",
                "window_start and window_length go together",
                file=file,
                key=sibling(missing),
            )
        windows += (
            parse_locksmith_window(
                window_start,
                window_length,
                file=file,
                start_key=sibling("window_start"),
                length_key=sibling("window_length"),
            ),
        )
    return Windows(windows, tz)


def parse_locksmith_window(
    start: object,
    length: object,
    *,
    file: str | None,
    start_key: str,
    length_key: str,
    length_file: str | None = None,
) -> Window:
    """locksmith's ``"Thu 04:00"`` / ``"04:00"`` (every day) and ``"1h30m"`` -> a window.

    As locksmith: the length must be shorter than the period (a day without a
    day name, a week with one); unlike locksmith, a zero length is refused
    (a window that never opens is a typo, not a policy).
    """
    length_file = file if length_file is None else length_file
    fields = start.split() if isinstance(start, str) else []
    if len(fields) not in (1, 2):
        raise _invalid(
            f"invalid window start {start!r}", file, start_key, hint='"Thu 04:00" or "04:00"'
        )
    days = parse_days(fields[0], file=file, key=start_key) if len(fields) == 2 else ALL_DAYS
    at = parse_time_of_day(fields[-1], file=file, key=start_key)
    if not isinstance(length, str):
        raise _invalid("must be a string", length_file, length_key, hint='e.g. "1h30m"')
    try:
        span = parse_go_duration(length)
    except ValueError as exc:
        raise _invalid(
            str(exc), length_file, length_key, hint='e.g. "1h30m", "45m", "2h"'
        ) from None
    period = timedelta(days=1) if days == ALL_DAYS and len(fields) == 1 else MAX_LENGTH
    if not timedelta(0) < span < period:
        raise _invalid(
            f"length {length!r} must be more than 0 and less than {_format_length(period)}",
            length_file,
            length_key,
        )
    return Window(days=days, start=at, length=span)
