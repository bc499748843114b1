"""The ``systemd-boot`` boot-control backend: Boot Loader Spec entries with boot counting.

One Type #1 entry per slot in ``loader/entries/`` on the ESP, named
``<prefix>-<label>[+<left>[-<done>]].conf``, whose kernel command line selects
the slot (``mount.usr=PARTUUID=...`` or ``root=...``, from a template). What
systemd-boot does with the entries (boot counting, its order) is in
:mod:`partitions.bls`; which renames each verb needs, and how entries map to
slot flags, in :mod:`partitions.sdbootplan`; this module is the I/O around
them: it reads and validates the ESP, then applies a plan. ``default`` in
loader.conf or a ``LoaderEntryDefault`` EFI variable would defeat the
fallback: every read refuses with ``esp_invalid`` while one is set.

:meth:`SdBootControl.primary` is what systemd-boot boots next, or None when
that is no bootable slot entry (every entry bad: systemd-boot then boots the
first bad one anyway; or another entry sorts first).

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

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from partitions import booted as booted_mod
from partitions import gpt
from partitions.bls import (
    ENTRIES_DIR,
    ENTRY_SUFFIX,
    BootEntry,
    EntryName,
    EntryTemplate,
    boot_order,
    entry_path,
    parse_entry_name,
    parse_entry_text,
)
from partitions.bootcontrol import (
    DEFAULT_LABELS,
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
from partitions.filestore import FileStore, TooLarge, describe, is_clean_name
from partitions.sdbootplan import (
    NEW_SUFFIX,
    EspState,
    Op,
    Remove,
    Rename,
    Write,
    plan_make_primary,
    plan_mark_bad,
    plan_mark_good,
    primary_label,
    slot_flags,
)
from updater.errors import DiskError

log = structlog.get_logger(__name__)

LOADER_VENDOR_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd's Boot Loader Interface
LOADER_CONF = "loader/loader.conf"
DEFAULT_EFIVARS = SDBOOT_EFIVARS
DEFAULT_TRIES = SDBOOT_TRIES
MAX_ENTRY_BYTES = 64 * 1024  # an entry or loader.conf; real ones are a few hundred bytes
MAX_EFIVAR_BYTES = 4096  # a string EFI variable such as LoaderEntrySelected
MAX_GENERATION_DIGITS = 18  # our "version": a whole number that fits 64 bits

_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]+")
_GENERATION_RE = re.compile(f"[0-9]{{1,{MAX_GENERATION_DIGITS}}}")


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
