"""The Boot Loader Specification's Type #1 entries, as systemd-boot reads them: file names
with boot counting, the entry text, systemd-boot's order, and the entry the agent writes
for a slot. Pure: no I/O.

What this relies on, as verified in the UAPI Boot Loader Specification ("Boot
counting", "Sorting"), systemd's ``docs/AUTOMATIC_BOOT_ASSESSMENT.md`` and
systemd-boot's ``src/boot/efi/boot.c`` (``config_entry_compare``,
``config_default_entry_select``, ``config_entry_parse_tries``):

- systemd-boot reads ``loader/entries/*.conf`` (not names starting with ``.``
  or ``auto-``), and lists an entry only if its ``linux``/``efi`` file exists;
- a ``+LEFT[-DONE]`` counter right before ``.conf`` turns boot counting on;
  booting the entry renames it to ``+(LEFT-1)-(DONE+1)``; ``+0-DONE`` is "bad";
  no counter is "good" (systemd-bless-boot drops it after a good boot);
- entries are ordered: bad ones last; entries with a ``sort-key`` before those
  without; then ``sort-key`` ascending, ``machine-id`` ascending, ``version``
  descending (UAPI version comparison), then the file name descending;
- with no ``default`` (loader.conf, ``LoaderEntryDefault``) it boots the first
  entry of that order; if every entry is bad, still the first one.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from partitions import booted as booted_mod
from partitions.bootcontrol import Slot
from partitions.filestore import clean_path
from updater.versions import compare as compare_versions

ENTRIES_DIR = "loader/entries"
ENTRY_SUFFIX = ".conf"

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")  # the spec's file-name characters, without "+"
_KEY_SEP = re.compile(r"[ \t]+")
_COUNTER_RE = re.compile(r"\+([0-9]+)(?:-([0-9]+))?$")  # ASCII digits, as systemd-boot
_PLACEHOLDERS = frozenset({"label", "partuuid"})


def _cmp(x: Any, y: Any) -> int:
    return int(x > y) - int(x < y)


# ---- entry names, text and order ------------------------------------------------------------


@dataclass(frozen=True)
class EntryName:
    """A ``loader/entries`` file name and its boot counter."""

    name: str
    stem: str  # the name without counter and ".conf"
    left: int | None = None  # tries left; None: no boot counting (good, or never counted)
    done: int | None = None

    @property
    def counting(self) -> bool:
        return self.left is not None

    @property
    def bad(self) -> bool:
        return self.left == 0

    def renamed(self, left: int | None, done: int | None = None) -> EntryName:
        """This entry with another counter (None: no counter, "good")."""
        if left is None:
            return EntryName(f"{self.stem}{ENTRY_SUFFIX}", self.stem)
        done = 0 if done is None else done
        return EntryName(f"{self.stem}+{left}-{done}{ENTRY_SUFFIX}", self.stem, left, done)


def parse_entry_name(name: str) -> EntryName | None:
    """The entry systemd-boot reads under ``name``; None for files it skips."""
    if not name.lower().endswith(ENTRY_SUFFIX) or name.startswith(".") or name.startswith("auto-"):
        return None
    base = name[: -len(ENTRY_SUFFIX)]
    # the counter is only recognized right before a ".conf" spelled in lower case
    match = _COUNTER_RE.search(base) if name.endswith(ENTRY_SUFFIX) else None
    if match is None:
        return EntryName(name, base)
    done = int(match.group(2)) if match.group(2) is not None else 0
    return EntryName(name, base[: match.start()], int(match.group(1)), done)


@dataclass(frozen=True)
class EntryFields:
    """The keys of a Type #1 entry that matter for booting and ordering."""

    title: str | None = None
    version: str | None = None
    machine_id: str | None = None
    sort_key: str | None = None
    linux: str | None = None
    efi: str | None = None
    initrd: tuple[str, ...] = ()
    options: str = ""
    architecture: str | None = None

    @property
    def loader(self) -> str | None:
        """The file systemd-boot starts (and checks for): ``linux``, else ``efi``."""
        return self.linux if self.linux is not None else self.efi


def parse_entry_text(text: str) -> EntryFields:
    """The keys of an entry: the first word of a line is the key, the rest its value."""
    values: dict[str, str] = {}
    initrd: list[str] = []
    options: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = _KEY_SEP.sub(" ", line, count=1).partition(" ")
        value = value.strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        if key == "initrd":
            initrd.append(value)
        elif key == "options":
            options.append(value)
        else:
            values[key] = value  # the last one wins, as in systemd-boot
    return EntryFields(
        title=values.get("title"),
        version=values.get("version"),
        machine_id=values.get("machine-id"),
        sort_key=values.get("sort-key"),
        linux=values.get("linux"),
        efi=values.get("efi"),
        initrd=tuple(initrd),
        options=" ".join(options),
        architecture=values.get("architecture"),
    )


@dataclass(frozen=True)
class BootEntry:
    """One entry as systemd-boot would see it."""

    name: EntryName
    fields: EntryFields
    visible: bool = True  # its linux/efi file exists (systemd-boot skips it otherwise)
    label: str | None = None  # the slot, for one of ours
    generation: int = 0  # ours: the integer "version"

    @property
    def ours(self) -> bool:
        return self.label is not None


def _compare_entries(a: BootEntry, b: BootEntry) -> int:
    """systemd-boot's order: negative when ``a`` comes first."""
    r = _cmp(a.name.bad, b.name.bad)  # bad ones last
    if r:
        return r
    ka, kb = a.fields.sort_key, b.fields.sort_key
    r = _cmp(ka is None, kb is None)  # with a sort-key before without
    if r:
        return r
    if ka is not None and kb is not None:
        r = _cmp(ka, kb)
        if r:
            return r
        r = _cmp(a.fields.machine_id or "", b.fields.machine_id or "")
        if r:
            return r
        r = -compare_versions(a.fields.version or "", b.fields.version or "")
        if r:
            return r
    r = -compare_versions(a.name.name.lower(), b.name.name.lower())
    if r:
        return r
    if a.name.left is None or b.name.left is None:
        return 0
    r = -_cmp(a.name.left, b.name.left)  # more tries left first
    if r:
        return r
    return _cmp(a.name.done or 0, b.name.done or 0)  # fewer tries done first


def boot_order(entries: Sequence[BootEntry]) -> list[BootEntry]:
    """The entries systemd-boot lists, in its order; it boots the first."""
    visible = [e for e in entries if e.visible]
    return sorted(visible, key=functools.cmp_to_key(_compare_entries))


def entry_path(name: str) -> str:
    return f"{ENTRIES_DIR}/{name}"


# ---- the entry the agent writes for a slot --------------------------------------------------


class EntryTemplateError(ValueError):
    """A bad entry template; ``field`` names the setting (title, linux, initrd, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EntryTemplate:
    """How a slot's entry reads; ``{label}`` and ``{partuuid}`` are filled in per slot."""

    title: str
    linux: str
    initrd: tuple[str, ...]
    options: str  # must name the slot: e.g. "mount.usr=PARTUUID={partuuid} ro"
    sort_key: str = "updater"
    prefix: str = "updater"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise EntryTemplateError(
                "prefix", f"entry prefix {self.prefix!r}: use letters, digits, '_', '.', '-'"
            )
        if not self.sort_key or any(c.isspace() for c in self.sort_key):
            raise EntryTemplateError("sort_key", f"sort-key {self.sort_key!r}: one word, not empty")
        if not self.linux.strip():
            raise EntryTemplateError("linux", "the entry needs a linux path")
        for name, text in self._texts():
            if "\n" in text or "\r" in text:
                raise EntryTemplateError(name, f"entry {name} {text!r}: one line only")
            used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            if used - _PLACEHOLDERS:
                raise EntryTemplateError(
                    name,
                    f"entry {name} {text!r}: unknown placeholder(s) "
                    f"{sorted(used - _PLACEHOLDERS)}; known: {sorted(_PLACEHOLDERS)}",
                )
        for name, path in (("linux", self.linux), *(("initrd", i) for i in self.initrd)):
            try:
                clean_path(path.format(label="X", partuuid=UUID(int=1)))
            except ValueError as exc:
                raise EntryTemplateError(name, f"entry path {path!r}: {exc}") from exc
        if "{partuuid}" not in self.options:
            raise EntryTemplateError(
                "options",
                f"entry options {self.options!r} must name the slot with {{partuuid}}, "
                "e.g. mount.usr=PARTUUID={partuuid}",
            )
        probe = self.options.format(label="X", partuuid=UUID(int=1))
        if not booted_mod.partition_refs(probe):
            raise EntryTemplateError(
                "options",
                f"entry options {self.options!r}: name the slot as "
                f"{'/'.join(booted_mod.CMDLINE_KEYS)}=PARTUUID={{partuuid}}",
            )

    def _texts(self) -> list[tuple[str, str]]:
        return [
            ("title", self.title),
            ("linux", self.linux),
            *(("initrd", i) for i in self.initrd),
            ("options", self.options),
        ]

    def stem(self, label: str) -> str:
        return f"{self.prefix}-{label}"

    def fill(self, text: str, slot: Slot) -> str:
        return text.format(label=slot.label, partuuid=slot.part_uuid)

    def render(self, slot: Slot, generation: int) -> str:
        """The entry text for ``slot`` at ``generation`` (its ``version``)."""
        lines = [
            f"# {slot.label}: written by updater. The +LEFT-DONE in the file name is",
            "# systemd-boot's boot counter; the agent renames this file, never edits it.",
            f"title {self.fill(self.title, slot)}",
            f"version {generation}",
            f"sort-key {self.sort_key}",
            f"linux {self.fill(self.linux, slot)}",
            *(f"initrd {self.fill(i, slot)}" for i in self.initrd),
            f"options {self.fill(self.options, slot)}",
        ]
        return "\n".join(lines) + "\n"
