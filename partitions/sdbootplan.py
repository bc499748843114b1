"""The systemd-boot backend's decisions, pure: a slot's flags from the entries, and the
renames and the one write each verb needs.

Make primary = write the slot's entry with ``+<tries>-0`` and a ``version``
above the other slots' under the shared ``sort-key`` (a name-only order would
never try an older-named slot); mark good = rename to drop the counter; mark
bad = rename to ``+0-<done>``, never delete.

Flags (so the updater's rules hold as for gpt-prio): a good entry (no counter)
is successful with 0 tries; ``+N-M`` with N > 0 is on trial with N tries; a bad
entry, a missing entry or one whose kernel is missing cannot be booted
(priority 0). Priority ranks the bootable entries of the slots in
systemd-boot's order (first = highest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from partitions.bls import (
    ENTRIES_DIR,
    ENTRY_SUFFIX,
    BootEntry,
    EntryName,
    EntryTemplate,
    boot_order,
    entry_path,
    parse_entry_text,
)
from partitions.bootcontrol import BAD, MAX_PRIORITY, MAX_TRIES, Slot, SlotFlags
from updater.errors import DiskError, RefusedError

NEW_SUFFIX = ".new"  # our own temporary entry names: ".<entry>.conf.new"


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
    flags = dict.fromkeys(labels, BAD)
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


# ---- the plans ------------------------------------------------------------------------------


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
