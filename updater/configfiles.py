"""Configuration files: TOML fragments -> merged inputs, and typed access to them.

Drop-ins are read from ``/usr/lib/updater/config.d/`` (vendor),
``/run/updater/config.d/`` (runtime) and ``/etc/updater/config.d/`` (admin).
A file name in a later directory masks the same name in an earlier one; the
surviving files are merged in file-name order, later keys winning (systemd's
drop-in rules); ``[[arrays of tables]]`` add up. Every merged value remembers
its file, so that :class:`Section`'s errors name file and key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from updater.errors import ConfigError
from updater.fsutil import read_bounded
from updater.urls import parse_url

log = structlog.get_logger(__name__)

MAX_FILE_BYTES = 1024 * 1024  # a config file; a bigger one is a mistake, not a config
DROPIN_DIRS = (
    Path("/usr/lib/updater/config.d"),
    Path("/run/updater/config.d"),
    Path("/etc/updater/config.d"),
)


@dataclass(frozen=True)
class Value:
    value: Any
    file: str


def dropin_files(dirs: Sequence[Path] = DROPIN_DIRS) -> list[Path]:
    by_name: dict[str, Path] = {}
    for d in dirs:
        try:
            entries = sorted(d.iterdir())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError("unreadable", exc.strerror or str(exc), file=str(d)) from None
        for p in entries:
            if p.suffix == ".toml" and not p.name.startswith("."):
                by_name[p.name] = p
    return [by_name[name] for name in sorted(by_name)]


def _read(path: Path) -> dict[str, Any]:
    try:
        text = read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except OSError as exc:
        raise ConfigError("unreadable", exc.strerror or str(exc), file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("syntax", "not UTF-8 text", file=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("syntax", f"invalid TOML: {exc}", file=str(path)) from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError("syntax", "invalid TOML: nested too deeply", file=str(path)) from None


def merge(files: Sequence[Path]) -> dict[str, dict[str, Value]]:
    merged: dict[str, dict[str, Value]] = {}
    for path in files:
        doc = _read(path)
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    "invalid", "top-level keys must be [sections]", file=str(path), key=section
                )
            dest = merged.setdefault(section, {})
            for key, value in table.items():
                before = dest.get(key)
                if _is_table_array(value) and before is not None and _is_table_array(before.value):
                    # [[arrays of tables]] (maintenance windows) add up across drop-ins,
                    # as Zincati's do; every other key is replaced by a later file
                    dest[key] = Value([*before.value, *value], f"{before.file}, {path}")
                else:
                    dest[key] = Value(value, str(path))
    return merged


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


class Section:
    """Typed accessors over one merged section; errors name file and key."""

    def __init__(self, name: str, values: Mapping[str, Value]) -> None:
        self.name = name
        self.values = dict(values)
        self.used: set[str] = set()

    def _get(self, key: str) -> Value | None:
        self.used.add(key)
        return self.values.get(key)

    def error(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        v = self.values.get(key)
        return ConfigError(
            "invalid", message, file=v.file if v else None, key=f"{self.name}.{key}", hint=hint
        )

    def str_(self, key: str, default: str | None) -> str | None:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v.value, str):
            raise self.error(key, "must be a string")
        if "\0" in v.value:  # no file name, argument or URL holds one (os calls raise)
            raise self.error(key, "must not contain a NUL character")
        return v.value

    def path(self, key: str, default: Path | None, *, allow_empty: bool = False) -> Path | None:
        s = self.str_(key, None)
        if s is None:
            return default
        if s == "" and allow_empty:
            return None
        if not s.startswith("/"):
            raise self.error(key, f"must be an absolute path, not {s!r}")
        return Path(s)

    def bool_(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v.value, bool):
            raise self.error(key, "must be true or false")
        return v.value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v.value, bool) or not isinstance(v.value, int | float):
            raise self.error(key, "must be a number")
        if not minimum <= v.value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}")
        return float(v.value)

    def int_(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v.value, bool) or not isinstance(v.value, int):
            raise self.error(key, "must be an integer")
        if not minimum <= v.value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}")
        return v.value

    def str_list(self, key: str, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
        v = self._get(key)
        if v is None:
            return default
        value = [v.value] if isinstance(v.value, str) else v.value
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise self.error(key, "must be a string or a list of strings")
        if any("\0" in x for x in value):
            raise self.error(key, "must not contain a NUL character")
        return tuple(value)

    def url(self, key: str, text: str, *, schemes: tuple[str, ...], hint: str | None = None) -> str:
        """``text`` (the value of ``key``, or one of its list) if :func:`parse_url` takes it."""
        parse_url(text, lambda why: self.error(key, why, hint), schemes=schemes)
        return text

    def raw(self, key: str) -> Value | None:
        return self._get(key)

    def file_of(self, key: str) -> str | None:
        v = self.values.get(key)
        return v.file if v else None

    def warn_unknown(self) -> None:
        for key in sorted(set(self.values) - self.used):
            log.warning("config_key_unknown", file=self.values[key].file, key=f"{self.name}.{key}")
