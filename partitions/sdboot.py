"""The ``systemd-boot`` boot-control backend: Boot Loader Spec entries with boot counting.

One Type #1 entry per slot in ``loader/entries/`` on the ESP, named
``<prefix>-<label>[+<left>[-<done>]].conf``, whose kernel command line selects
the slot (``mount.usr=PARTUUID=...`` or ``root=...``, from a template). What
this relies on, as verified in the UAPI Boot Loader Specification ("Boot
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

So: make primary = write the slot's entry with ``+<tries>-0`` and a ``version``
above the other slots' under the shared ``sort-key`` (a name-only order would
never try an older-named slot); mark good = rename to drop the counter; mark
bad = rename to ``+0-<done>``, never delete. ``default`` in loader.conf or a
``LoaderEntryDefault`` EFI variable would defeat the fallback: every read
refuses with ``esp_invalid`` while one is set.

Flags (so the updater's rules hold as for gpt-prio): a good entry (no counter)
is successful with 0 tries; ``+N-M`` with N > 0 is on trial with N tries; a bad
entry, a missing entry or one whose kernel is missing cannot be booted
(priority 0). Priority ranks the bootable entries of the slots in
systemd-boot's order (first = highest). :meth:`SdBootControl.primary` is what
systemd-boot boots next, or None when that is no bootable slot entry (every
entry bad: systemd-boot then boots the first bad one anyway; or another
entry sorts first).

Every change is a few renames and at most one new file, written under a hidden
temporary name and renamed into place; a slot never has two entries at once
(its old entry is removed before the new one appears, which leaves it
unbootable for that instant, never bootable with stale content). Every check
runs before anything is written.

Entries named ``<prefix>-*`` belong to the agent: one for a label that is not
a slot, two for one slot, or a malformed one are ``boot_entry_invalid``. Other
entries are the admin's and are only read, to know the order; one that boots
a slot's partition is refused too (it would bypass the counting). A foreign
entry the agent cannot read (a name the store refuses, such as
``debian[1].conf``, which FAT allows; more than :data:`MAX_ENTRY_BYTES`; not
UTF-8; an I/O error) is logged (``boot_entry_ignored``) and left out: it is
not ours to judge, and it must not stop the agent. Every read is bounded.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog

from partitions import booted as booted_mod
from partitions import gpt
from partitions.bootcontrol import (
    DEFAULT_LABELS,
    MAX_PRIORITY,
    MAX_TRIES,
    SDBOOT_EFIVARS,
    SDBOOT_TRIES,
    Slot,
    SlotFlags,
    SlotStatus,
    find_slots,
    flags_of,
    not_a_slot_of,
    same_slot,
)
from partitions.booted import RUNNING_SYSTEM, BootedSlotFinder
from partitions.filestore import FileStore, TooLarge, clean_path, describe, is_clean_name
from updater.errors import DiskError, RefusedError
from updater.versions import compare as compare_versions

log = structlog.get_logger(__name__)

LOADER_VENDOR_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd's Boot Loader Interface
ENTRIES_DIR = "loader/entries"
LOADER_CONF = "loader/loader.conf"
DEFAULT_EFIVARS = SDBOOT_EFIVARS
DEFAULT_TRIES = SDBOOT_TRIES
ENTRY_SUFFIX = ".conf"
NEW_SUFFIX = ".new"  # our own temporary entry names: ".<entry>.conf.new"
MAX_ENTRY_BYTES = 64 * 1024  # an entry or loader.conf; real ones are a few hundred bytes
MAX_EFIVAR_BYTES = 4096  # a string EFI variable such as LoaderEntrySelected
MAX_GENERATION_DIGITS = 18  # our "version": a whole number that fits 64 bits

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+")  # the spec's file-name characters, without "+"
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KEY_SEP = re.compile(r"[ \t]+")
_COUNTER_RE = re.compile(r"\+([0-9]+)(?:-([0-9]+))?$")  # ASCII digits, as systemd-boot
_GENERATION_RE = re.compile(f"[0-9]{{1,{MAX_GENERATION_DIGITS}}}")
_PLACEHOLDERS = frozenset({"label", "partuuid"})
_BAD = SlotFlags(priority=0, tries=0, successful=False)


def _cmp(x: Any, y: Any) -> int:
    return int(x > y) - int(x < y)


# ---- pure: entry names, text and order ------------------------------------------------------


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


@dataclass(frozen=True)
class EspState:
    """What the ESP says, validated: every entry, and ours by slot label."""

    entries: tuple[BootEntry, ...] = ()
    stale: tuple[str, ...] = ()  # our temporaries left by a crash

    @property
    def ours(self) -> dict[str, BootEntry]:
        return {e.label: e for e in self.entries if e.label is not None}


def slot_flags(state: EspState, labels: Sequence[str]) -> dict[str, SlotFlags]:
    """The flags of each slot, mapped from its entry and systemd-boot's order."""
    ranked = [e for e in boot_order(state.entries) if e.ours and not e.name.bad]
    flags = dict.fromkeys(labels, _BAD)
    for position, entry in enumerate(ranked):
        assert entry.label is not None
        priority = min(len(ranked) - position, MAX_PRIORITY)
        if entry.name.counting:
            left = entry.name.left or 0
            flags[entry.label] = SlotFlags(priority, min(left, MAX_TRIES), successful=False)
        else:
            flags[entry.label] = SlotFlags(priority, 0, successful=True)
    return flags


def primary_label(state: EspState) -> str | None:
    """The slot systemd-boot boots next; None if that is a bad entry or not a slot's."""
    order = boot_order(state.entries)
    if not order:
        return None
    first = order[0]
    if first.name.bad:
        return None
    return first.label


# ---- pure: the template and the plans -------------------------------------------------------


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


@dataclass(frozen=True)
class Write:
    path: str
    data: bytes


@dataclass(frozen=True)
class Rename:
    src: str
    dst: str


@dataclass(frozen=True)
class Remove:
    path: str


Op = Write | Rename | Remove


def entry_path(name: str) -> str:
    return f"{ENTRIES_DIR}/{name}"


def plan_mark_good(
    state: EspState, slot: Slot, template: EntryTemplate
) -> tuple[list[Op], EspState]:
    """Drop the counter (what systemd-bless-boot does); no entry: a good one above the rest."""
    entry = state.ours.get(slot.label)
    if entry is None:
        generation = _next_generation(state, slot.label)
        text = template.render(slot, generation)
        name = EntryName(f"{template.stem(slot.label)}{ENTRY_SUFFIX}", template.stem(slot.label))
        new = BootEntry(name, parse_entry_text(text), True, slot.label, generation)
        return [Write(entry_path(name.name), text.encode())], _with(state, slot.label, new)
    if not entry.name.counting:
        return [], state
    new = replace(entry, name=entry.name.renamed(None))
    ops: list[Op] = [Rename(entry_path(entry.name.name), entry_path(new.name.name))]
    return ops, _with(state, slot.label, new)


def plan_mark_bad(
    state: EspState, slot: Slot, locate: Callable[[str], str] = str
) -> tuple[list[Op], EspState]:
    """Counter to ``+0-<done>`` (a good entry: ``+0-0``); never deleted. No entry: nothing.

    Refused (``last_bootable_slot``) when no other slot would keep an entry
    systemd-boot can boot: it would then boot the first bad entry anyway, which
    may well be the broken one.
    """
    entry = state.ours.get(slot.label)
    if entry is None or entry.name.bad:
        return [], state
    others = [e for e in state.entries if e.ours and e.label != slot.label]
    if not any(e.visible and not e.name.bad for e in others):
        raise RefusedError(
            "last_bootable_slot",
            f"{locate(entry_path(entry.name.name))}: marking {slot.label} bad would leave "
            "no slot entry systemd-boot can boot "
            f"({', '.join(sorted(e.name.name for e in others)) or 'no other entry'})",
            hint="mark another slot good (or make it primary) first",
        )
    new = replace(entry, name=entry.name.renamed(0, entry.name.done or 0))
    ops: list[Op] = [Rename(entry_path(entry.name.name), entry_path(new.name.name))]
    return ops, _with(state, slot.label, new)


def plan_make_primary(
    state: EspState,
    slot: Slot,
    template: EntryTemplate,
    tries: int,
    locate: Callable[[str], str] = str,
) -> tuple[list[Op], EspState]:
    """A fresh entry ``+<tries>-0`` with a version above every other slot's.

    The new text is written under a hidden name first; then the slot's old entry
    (if any) is removed and the new one renamed into place (the commit). A crash
    in between leaves the slot with no entry, i.e. unbootable, which is where
    an install leaves it anyway.
    """
    generation = _next_generation(state, slot.label)
    text = template.render(slot, generation)
    stem = template.stem(slot.label)
    name = EntryName(f"{stem}+{tries}-0{ENTRY_SUFFIX}", stem, tries, 0)
    new = BootEntry(name, parse_entry_text(text), True, slot.label, generation)
    after = _with(state, slot.label, new)
    _require_first(after, new, locate)
    old = state.ours.get(slot.label)
    final = entry_path(name.name)
    if old is None:
        return [Write(final, text.encode())], after
    if old.name.name == name.name:
        return [Write(final, text.encode())], after  # the store replaces it atomically
    tmp = f"{ENTRIES_DIR}/.{name.name}{NEW_SUFFIX}"
    ops: list[Op] = [Write(tmp, text.encode()), Remove(entry_path(old.name.name))]
    ops.append(Rename(tmp, final))
    return ops, after


def _next_generation(state: EspState, label: str) -> int:
    others = [e.generation for e in state.entries if e.ours and e.label != label]
    return max(others, default=0) + 1


def _with(state: EspState, label: str, new: BootEntry) -> EspState:
    kept = tuple(e for e in state.entries if e.label != label)
    return EspState(entries=(*kept, new), stale=state.stale)


def _require_first(state: EspState, target: BootEntry, locate: Callable[[str], str]) -> None:
    order = boot_order(state.entries)
    if order and order[0] is not target:
        first = order[0]
        raise DiskError(
            "boot_entry_invalid",
            f"{locate(entry_path(first.name.name))} would still be booted before the slot's entry "
            f"(sort-key {first.fields.sort_key!r}, version {first.fields.version!r})",
            hint=f"remove that entry, or give it a sort-key after {target.fields.sort_key!r}",
        )


# ---- the backend ----------------------------------------------------------------------------


class SdBootControl:
    """BootControl over systemd-boot entries with boot counting on an ESP."""

    def __init__(
        self,
        store: FileStore,
        disk: Path,
        labels: Sequence[str] = DEFAULT_LABELS,
        finder: BootedSlotFinder = RUNNING_SYSTEM,
        *,
        entry: EntryTemplate,
        tries: int = DEFAULT_TRIES,
        efivars: Path = DEFAULT_EFIVARS,
    ) -> None:
        if not labels or len({label.lower() for label in labels}) != len(labels):
            raise ValueError(f"slot labels must be unique (ignoring case): {list(labels)}")
        for label in labels:
            if not _LABEL_RE.fullmatch(label):
                raise ValueError(
                    f"slot label {label!r} cannot be part of an entry file name "
                    "(letters, digits, '_', '.', '-')"
                )
        if not 1 <= tries <= MAX_TRIES:
            raise ValueError(f"tries {tries} is outside 1..{MAX_TRIES}")
        self.store = store
        self.disk = disk
        self.labels = tuple(labels)
        self.entry = entry
        self.tries = tries
        self.finder = finder
        self._efivars = efivars

    # -- reading

    def _slots(self) -> tuple[Slot, ...]:
        return find_slots(gpt.read_table(self.disk), self.disk, self.labels)

    def read_state(self, slots: Sequence[Slot] | None = None) -> EspState:
        """Read and validate the ESP (raises esp_invalid / boot_entry_invalid)."""
        slots = tuple(slots) if slots is not None else self._slots()
        self._refuse_default()
        if not self.store.exists(ENTRIES_DIR):
            raise DiskError(
                "esp_invalid",
                f"{describe(self.store, ENTRIES_DIR)}: no such directory; this is not a "
                "systemd-boot ESP, or not set up yet",
                hint="check where [disk] says the ESP is; create loader/entries with "
                "`bootctl install` (or mkdir) on a real ESP",
            )
        entries: list[BootEntry] = []
        stale: list[str] = []
        own = f"{self.entry.prefix}-".lower()
        for name in self.store.list(ENTRIES_DIR):
            lowered = name.lower()
            if not is_clean_name(name) or not name.isprintable():
                self._unusable_name(name, lowered.lstrip(".").startswith(own))
                continue
            if (
                name.startswith(".")
                and lowered.lstrip(".").startswith(own)
                and lowered.endswith((NEW_SUFFIX, ".tmp"))
            ):
                stale.append(name)
                continue
            parsed = parse_entry_name(name)
            if parsed is None:
                continue
            if parsed.stem.lower().startswith(own):
                entries.append(self._our_entry(parsed, slots))
            else:
                foreign = self._foreign_entry(parsed, slots)
                if foreign is not None:
                    entries.append(foreign)
        seen: dict[str, BootEntry] = {}
        for e in entries:
            if e.label is None:
                continue
            if e.label in seen:
                first, second = sorted((seen[e.label].name.name, e.name.name))
                raise DiskError(
                    "boot_entry_invalid",
                    f"{describe(self.store, entry_path(first))} and {second}: two entries "
                    f"for slot {e.label}",
                    hint="a slot has one entry; remove the one that is not the newest",
                )
            seen[e.label] = e
        return EspState(entries=tuple(entries), stale=tuple(stale))

    def _unusable_name(self, name: str, ours: bool) -> None:
        """A listed name that no store path can hold: ours is an error, a foreign one skipped."""
        where = f"{describe(self.store, ENTRIES_DIR)}/{name!r}"
        if ours:
            raise DiskError(
                "boot_entry_invalid",
                f"{where}: an entry name with the agent's prefix that is not one it writes",
                hint=f"entries named {self.entry.prefix}-* belong to the agent: remove it",
            )
        log.warning("boot_entry_ignored", entry=where, reason="unusable file name")

    def _refuse_default(self) -> None:
        if self.store.exists(LOADER_CONF):
            try:
                data = self.store.read(LOADER_CONF, MAX_ENTRY_BYTES)
            except TooLarge as exc:
                raise DiskError(
                    "esp_invalid",
                    f"{exc.message}: that is no loader.conf systemd-boot reads as meant",
                    hint="restore loader/loader.conf (a few lines: timeout, editor, ...)",
                ) from exc
            text = data.decode("utf-8", "replace")
            for line in text.splitlines():
                words = line.split(None, 1)
                if words and words[0] == "default":
                    raise DiskError(
                        "esp_invalid",
                        f"{describe(self.store, LOADER_CONF)}: sets {line.strip()!r}; "
                        "systemd-boot would boot that entry even when it is bad, so a "
                        "failed update would never fall back",
                        hint="remove the default line: the agent orders entries by "
                        "sort-key and version instead",
                    )
        variable = self._efivars / f"LoaderEntryDefault-{LOADER_VENDOR_GUID}"
        if variable.exists():
            value = _efivar_text(variable)
            raise DiskError(
                "esp_invalid",
                f"{variable}: the EFI variable LoaderEntryDefault is set ({value!r}); "
                "systemd-boot would boot it even when it is bad",
                hint="clear it with `bootctl set-default ''`",
            )

    def _read_entry(self, parsed: EntryName) -> str:
        path = entry_path(parsed.name)
        try:
            data = self.store.read(path, MAX_ENTRY_BYTES)
        except TooLarge as exc:
            raise DiskError(
                "boot_entry_invalid",
                exc.message,
                hint="remove it; the agent writes it again on the next update",
            ) from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DiskError(
                "boot_entry_invalid",
                f"{describe(self.store, path)}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                hint="remove it; the agent writes it again on the next update",
            ) from exc

    def _our_entry(self, parsed: EntryName, slots: Sequence[Slot]) -> BootEntry:
        path = entry_path(parsed.name)
        where = describe(self.store, path)
        label_part = parsed.stem[len(self.entry.prefix) + 1 :]
        by_label = {s.label.lower(): s for s in slots}
        slot = by_label.get(label_part.lower())
        if slot is None:
            raise DiskError(
                "boot_entry_invalid",
                f"{where}: an entry for {label_part!r}, which is not one of the slots "
                f"{', '.join(s.label for s in slots)}",
                hint=f"entries named {self.entry.prefix}-* belong to the agent: remove it, "
                "or add the slot to [disk] slots",
            )
        fields = parse_entry_text(self._read_entry(parsed))
        problems: list[str] = []
        if fields.linux is None:
            problems.append("no linux line")
        if fields.sort_key is None:
            problems.append("no sort-key line")
        generation = 0
        if fields.version is None or not _GENERATION_RE.fullmatch(fields.version):
            problems.append(f"version {fields.version!r} is not a whole number")
        else:
            generation = int(fields.version)
        named = [r for r in booted_mod.partition_refs(fields.options) if r.part_uuid is not None]
        if not named:
            problems.append(f"options {fields.options!r} name no partition by PARTUUID")
        elif not named[0].matches(slot):
            others = [s.label for s in slots if named[0].matches(s)]
            problems.append(
                f"options name {named[0].describe()}, which is "
                + (f"slot {others[0]}'s partition" if others else "none of the slots")
                + f", not {slot.label}'s ({slot.part_uuid})"
            )
        if problems:
            raise DiskError(
                "boot_entry_invalid",
                f"{where}: {'; '.join(problems)}",
                hint="remove it; the agent writes it again on the next update "
                "(an entry for a slot of another disk?)",
            )
        assert fields.linux is not None
        visible = self._exists(fields.linux)
        if not visible:
            log.warning("boot_entry_kernel_missing", entry=where, linux=fields.linux)
        return BootEntry(parsed, fields, visible, slot.label, generation)

    def _foreign_entry(self, parsed: EntryName, slots: Sequence[Slot]) -> BootEntry | None:
        path = entry_path(parsed.name)
        try:
            fields = parse_entry_text(self.store.read(path, MAX_ENTRY_BYTES).decode("utf-8"))
        except UnicodeDecodeError:
            log.warning("boot_entry_ignored", entry=describe(self.store, path), reason="not UTF-8")
            return None
        except DiskError as exc:  # too large, a directory, unreadable: not ours to judge
            log.warning("boot_entry_ignored", entry=describe(self.store, path), reason=exc.message)
            return None
        for ref in booted_mod.partition_refs(fields.options):
            hit = [s.label for s in slots if ref.matches(s)]
            if hit:
                raise DiskError(
                    "boot_entry_invalid",
                    f"{describe(self.store, path)}: boots slot {hit[0]} ({ref.describe()}) "
                    "outside the agent's entries, bypassing its boot counting",
                    hint="remove it; the agent keeps one entry per slot",
                )
        loader = fields.loader
        if loader is None:
            return None
        return BootEntry(parsed, fields, self._exists(loader))

    def _exists(self, path: str) -> bool:
        """Whether an entry's file is there; a path no FAT file system can hold is not."""
        try:
            return self.store.exists(path)
        except ValueError:
            return False

    def slots(self) -> tuple[SlotStatus, ...]:
        slots = self._slots()
        flags = slot_flags(self.read_state(slots), self.labels)
        return tuple(SlotStatus(s, flags[s.label]) for s in slots)

    def flags(self, slot: Slot) -> SlotFlags:
        return flags_of(self.slots(), slot, self.disk)

    def primary(self) -> Slot | None:
        slots = self._slots()
        state = self.read_state(slots)
        order = boot_order(state.entries)
        label = primary_label(state)
        if order and label is None:
            log.warning(
                "boot_entry_first_not_bootable_slot",
                entry=describe(self.store, entry_path(order[0].name.name)),
                bad=order[0].name.bad,
            )
        return next((s for s in slots if s.label == label), None)

    def booted(self) -> Slot:
        slots = self._slots()
        return self.finder.slot(
            slots, lambda _cmdline: self._selected_slot(slots), "LoaderEntrySelected"
        )

    def _selected_slot(self, slots: Sequence[Slot]) -> Slot | None:
        """The slot of the entry systemd-boot says it booted (EFI variable), if ours."""
        variable = self._efivars / f"LoaderEntrySelected-{LOADER_VENDOR_GUID}"
        value = _efivar_text(variable)
        if not value:
            return None
        parsed = parse_entry_name(value) or parse_entry_name(value + ENTRY_SUFFIX)
        if parsed is None:
            return None
        for slot in slots:
            if parsed.stem.lower() == self.entry.stem(slot.label).lower():
                return slot
        return None

    # -- the verbs: validate everything, then a few renames and at most one write

    def mark_good(self, slot: Slot) -> None:
        self._apply("slot_marked_good", slot, lambda st, s: plan_mark_good(st, s, self.entry))

    def mark_bad(self, slot: Slot) -> None:
        self._apply(
            "slot_marked_bad",
            slot,
            lambda st, s: plan_mark_bad(st, s, lambda p: describe(self.store, p)),
        )

    def make_primary(self, slot: Slot) -> None:
        self._apply(
            "slot_made_primary",
            slot,
            lambda st, s: plan_make_primary(
                st, s, self.entry, self.tries, lambda p: describe(self.store, p)
            ),
        )

    def _apply(
        self,
        event: str,
        slot: Slot,
        plan: Callable[[EspState, Slot], tuple[list[Op], EspState]],
    ) -> None:
        slots = self._slots()
        target = next((s for s in slots if same_slot(s, slot)), None)
        if target is None:
            raise not_a_slot_of(self.disk, slot)
        state = self.read_state(slots)
        ops, after = plan(state, target)
        if any(isinstance(op, Write) for op in ops):
            self._require_kernel(target)  # a new entry must not point at nothing
        if ops:
            ops = [Remove(entry_path(name)) for name in state.stale] + ops
        for op in ops:
            self._execute(op)
        before_name = state.ours.get(target.label)
        after_name = after.ours.get(target.label)
        log.info(
            event,
            esp=describe(self.store, ENTRIES_DIR),
            slot=target.label,
            entry_before=before_name.name.name if before_name else None,
            entry_after=after_name.name.name if after_name else None,
            changed=bool(ops),
        )

    def _require_kernel(self, slot: Slot) -> None:
        for path in (self.entry.linux, *self.entry.initrd):
            filled = self.entry.fill(path, slot)
            if not self.store.exists(filled):
                raise DiskError(
                    "esp_invalid",
                    f"{describe(self.store, filled)}: missing; systemd-boot skips an entry "
                    f"whose kernel is missing, so {slot.label} would never boot",
                    hint="install the slot's kernel and initrd on the ESP before making it "
                    "the next boot",
                )

    def _execute(self, op: Op) -> None:
        if isinstance(op, Write):
            self.store.write(op.path, op.data)
        elif isinstance(op, Rename):
            self.store.rename(op.src, op.dst)
        else:
            self.store.remove(op.path)


def _efivar_text(path: Path) -> str | None:
    """An EFI variable holding a string: 4 bytes of attributes, then UTF-16LE, NUL-ended."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_EFIVAR_BYTES + 1)
    except OSError:
        return None
    if not 4 <= len(data) <= MAX_EFIVAR_BYTES:
        return None
    return data[4:].decode("utf-16-le", "replace").split("\0", 1)[0]


def efivar_bytes(text: str, attributes: int = 0x7) -> bytes:
    """The efivarfs content of a string variable (for tests and image builders)."""
    return attributes.to_bytes(4, "little") + (text + "\0").encode("utf-16-le")
