"""What an admin decided for this one host, and what it means for an install (pure).

- a **hold** (`updatectl hold [--until TIME]`): no installs until `unhold`, or until
  the time given;
- **skipped** versions (`updatectl skip VERSION`): never installed on this host;
- the **pin** (`[source] pin = "1.4.*"`): only versions of that line;
- a one-shot **downgrade allowance** (`updatectl channel NAME --allow-downgrade`):
  one version of one channel may be installed below the host's version floor.

The first three live in ``<state_dir>/hostpolicy.json`` (the last too), read and
written by :mod:`updater.hostpolicyfile`; here are only the model, its JSON and
the decisions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from updater import versions
from updater.errors import RefusedError, UsageError

SCHEMA = 1
MAX_SKIPPED = 64  # a list an admin keeps by hand; more is not one


@dataclass(frozen=True)
class Hold:
    since: float  # unix seconds
    until: float | None = None  # unix seconds; None: until `updatectl unhold`


@dataclass(frozen=True)
class Downgrade:
    """One install of ``version`` from ``channel`` may go below the floor, once."""

    channel: str
    version: str
    floor: str  # the floor it goes below (for the log and status)
    at: float  # unix seconds it was allowed
    by: int  # uid of who allowed it


@dataclass(frozen=True)
class HostPolicy:
    hold: Hold | None = None
    skipped: tuple[str, ...] = ()
    downgrade: Downgrade | None = None

    def held_until(self, now: float) -> float | None:
        """None: not held; 0.0: held until unhold; else the unix time it ends."""
        if self.hold is None:
            return None
        if self.hold.until is None:
            return 0.0
        return self.hold.until if now < self.hold.until else None

    def held(self, now: float) -> bool:
        return self.held_until(now) is not None

    def skip(self, version: str) -> HostPolicy:
        if version in self.skipped:
            return self
        return replace(self, skipped=(*self.skipped, version)[-MAX_SKIPPED:])

    def unskip(self, version: str) -> HostPolicy:
        return replace(self, skipped=tuple(v for v in self.skipped if v != version))


# ---- the pin ----------------------------------------------------------------------------------

_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.~^-]{0,62}(\.\*)?")


def valid_pin(pin: str) -> bool:
    """``1.4.*`` (the 1.4 line) or a version prefix ``1.4`` (the same line)."""
    return _PIN.fullmatch(pin) is not None and not pin.removesuffix(".*").endswith(".")


def _line(pin: str) -> str:
    return pin.removesuffix(".*")


def pin_matches(pin: str, version: str) -> bool:
    """Is ``version`` on the pinned line? ``1.4.*`` and ``1.4`` take 1.4, 1.4.2,
    1.4~rc1 and 1.4^1, never 1.40 or 1.5.0 (a prefix ends at a component)."""
    line = _line(pin)
    if version == line:
        return True
    return version.startswith(line) and version[len(line)] in ".~^-"


def target_version_prefix(pin: str | None) -> str:
    """The pin as update_engine's ``targetversionprefix`` (a plain string prefix):
    ``1.4.*`` -> ``1.4.``, a version prefix as it is; "" without a pin."""
    if pin is None:
        return ""
    return pin[:-1] if pin.endswith(".*") else pin


# ---- the decision -----------------------------------------------------------------------------


def install_refusal(
    version: str, policy: HostPolicy, pin: str | None, now: float
) -> RefusedError | None:
    """Why this host refuses to install ``version`` (held, skipped, pinned), or None."""
    until = policy.held_until(now)
    if until is not None:
        when = "`updatectl unhold`" if until == 0.0 else format_time(until)
        return RefusedError(
            "held",
            f"this host is held: no installs until {when} ({version} waits)",
            hint="`updatectl unhold` lets it install again",
        )
    if version in policy.skipped:
        return RefusedError(
            "skipped",
            f"{version} is skipped on this host",
            hint=f"`updatectl unskip {version}` takes it again; a newer version installs",
        )
    if pin is not None and not pin_matches(pin, version):
        return RefusedError(
            "pinned",
            f"{version} is not on the pinned line {pin!r}",
            hint="[source] pin keeps the host on that line; change or remove it to move on",
        )
    return None


def downgrade_allowed(policy: HostPolicy, channel: str, version: str) -> bool:
    """May ``version`` of ``channel`` be installed below the floor (the one-shot allowance)?"""
    d = policy.downgrade
    return d is not None and d.channel == channel and d.version == version


def below_floor(version: str, booted: str | None, highest: str | None) -> str | None:
    """The floor ``version`` is below (the booted version or the highest this host ever
    accepted, whichever is higher), or None when it is not below it."""
    floors = [v for v in (booted, highest) if v is not None]
    if not floors:
        return None
    floor = max(floors, key=versions.sort_key)
    return floor if versions.compare(version, floor) < 0 else None


# ---- hold times -------------------------------------------------------------------------------

_DURATION = re.compile(r"(?:([0-9]{1,6})([smhdw]))+")
_TERM = re.compile(r"([0-9]{1,6})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_HOLD = timedelta(days=3660)  # a hold of more than ten years is a typo


def parse_until(text: str, now: datetime) -> float:
    """``--until``: a duration from ``now`` (``90m``, ``2h``, ``1d12h``, ``2w``) or a
    time (ISO 8601: ``2026-12-24``, ``2026-12-24T08:00``, with ``Z`` or an offset;
    without one, UTC). Unix seconds; UsageError if malformed or not in the future."""
    if _DURATION.fullmatch(text):
        seconds = sum(int(n) * _UNIT_S[u] for n, u in _TERM.findall(text))
        until = now + timedelta(seconds=seconds)
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
        except ValueError:
            raise UsageError(
                "bad_time",
                f"--until {text!r} is neither a time nor a duration",
                hint="e.g. --until 2026-12-24T08:00Z, --until 12h, --until 2d",
            ) from None
        until = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if until <= now:
        raise UsageError(
            "bad_time",
            f"--until {text!r} is not in the future",
            hint="`updatectl unhold` ends a hold now",
        )
    if until - now > MAX_HOLD:
        raise UsageError(
            "bad_time", f"--until {text!r} is more than ten years away", hint="omit --until"
        )
    return until.timestamp()


def format_time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---- JSON -------------------------------------------------------------------------------------


class PolicyInvalid(Exception):
    pass


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyInvalid(f"{what} must be a number")
    return float(value)


def _version(value: Any, what: str) -> str:
    if not isinstance(value, str) or not versions.is_valid(value):
        raise PolicyInvalid(f"{what} must be a version")
    return value


def from_json(doc: Any) -> HostPolicy:
    if not isinstance(doc, dict):
        raise PolicyInvalid("top level must be an object")
    schema = doc.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SCHEMA:
        raise PolicyInvalid(f"schema must be 1..{SCHEMA}")
    hold = None
    raw = doc.get("hold")
    if raw is not None:
        if not isinstance(raw, dict):
            raise PolicyInvalid("hold must be an object")
        until = raw.get("until")
        hold = Hold(
            _number(raw.get("since"), "hold.since"),
            None if until is None else _number(until, "hold.until"),
        )
    skipped = doc.get("skipped", [])
    if not isinstance(skipped, list) or len(skipped) > MAX_SKIPPED:
        raise PolicyInvalid(f"skipped must be a list of at most {MAX_SKIPPED} versions")
    downgrade = None
    raw = doc.get("downgrade")
    if raw is not None:
        if not isinstance(raw, dict) or not isinstance(raw.get("channel"), str):
            raise PolicyInvalid("downgrade must be an object with a channel")
        by = raw.get("by")
        if not isinstance(by, int) or isinstance(by, bool):
            raise PolicyInvalid("downgrade.by must be a uid")
        downgrade = Downgrade(
            raw["channel"],
            _version(raw.get("version"), "downgrade.version"),
            _version(raw.get("floor"), "downgrade.floor"),
            _number(raw.get("at"), "downgrade.at"),
            by,
        )
    return HostPolicy(hold, tuple(_version(v, "a skipped version") for v in skipped), downgrade)


def to_json(policy: HostPolicy) -> dict[str, Any]:
    hold = policy.hold
    d = policy.downgrade
    return {
        "schema": SCHEMA,
        "hold": None if hold is None else {"since": hold.since, "until": hold.until},
        "skipped": list(policy.skipped),
        "downgrade": None
        if d is None
        else {"channel": d.channel, "version": d.version, "floor": d.floor, "at": d.at, "by": d.by},
    }
