"""The ``gpt-prio`` boot-control backend: ChromeOS/CoreOS GPT attribute bits.

Each slot's partition entry carries priority (bits 48-51), tries (52-55) and
successful (56) in its attribute word, bit-compatible with ``cgpt``. The
decisions are pure functions over ``{gpt index: SlotFlags}``; the class is the
thin I/O shell that reads the table, decides, and writes only the entries
that change, in one locked read-modify-write of the GPT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from partitions import gpt, gpttable
from partitions.bootcontrol import (
    BAD,
    DEFAULT_LABELS,
    MAX_PRIORITY,
    MAX_TRIES,
    Slot,
    SlotFlags,
    SlotStatus,
    find_slots,
    flags_of,
    not_a_slot_of,
    same_slot,
)
from partitions.booted import RUNNING_SYSTEM, BootedSlotFinder
from updater.errors import DiskError

log = structlog.get_logger(__name__)

PRIORITY_SHIFT = 48
TRIES_SHIFT = 52
SUCCESSFUL_SHIFT = 56
_NIBBLE = 0xF
_FLAGS_MASK = (_NIBBLE << PRIORITY_SHIFT) | (_NIBBLE << TRIES_SHIFT) | (1 << SUCCESSFUL_SHIFT)


# ---- pure: bits -----------------------------------------------------------------------------


def decode_flags(attributes: int) -> SlotFlags:
    """The slot flags held in a 64-bit GPT attribute word."""
    return SlotFlags(
        priority=(attributes >> PRIORITY_SHIFT) & _NIBBLE,
        tries=(attributes >> TRIES_SHIFT) & _NIBBLE,
        successful=bool((attributes >> SUCCESSFUL_SHIFT) & 1),
    )


def encode_flags(attributes: int, flags: SlotFlags) -> int:
    """``attributes`` with the flag bits replaced by ``flags``; every other bit kept."""
    if not 0 <= flags.priority <= MAX_PRIORITY:
        raise ValueError(f"priority {flags.priority} is outside 0..{MAX_PRIORITY}")
    if not 0 <= flags.tries <= MAX_TRIES:
        raise ValueError(f"tries {flags.tries} is outside 0..{MAX_TRIES}")
    return (
        (attributes & ~_FLAGS_MASK)
        | (flags.priority << PRIORITY_SHIFT)
        | (flags.tries << TRIES_SHIFT)
        | (int(flags.successful) << SUCCESSFUL_SHIFT)
    )


# ---- pure: decisions over {gpt index: flags} ------------------------------------------------


def _require(flags: Mapping[int, SlotFlags], target: int) -> None:
    if target not in flags:
        raise DiskError(
            "slot_not_found",
            f"partition {target} is not one of the slots {sorted(flags)}",
            hint="pass a slot returned by slots()",
        )


def primary_index(flags: Mapping[int, SlotFlags]) -> int | None:
    """The slot the firmware picks: highest priority among bootable ones, lower index on a tie."""
    bootable = [i for i, f in flags.items() if f.bootable]
    if not bootable:
        return None
    return min(bootable, key=lambda i: (-flags[i].priority, i))


def _lowered_below(others: Mapping[int, SlotFlags], ceiling: int) -> dict[int, int]:
    """New priorities for ``others`` all below ``ceiling``, keeping their order.

    Only as much as needed is taken off, from the top down; equal priorities stay
    equal, and a priority above 0 never becomes 0 (if there are too many distinct
    priorities to stay strictly ordered, the lowest ones merge at 1).
    """
    distinct = sorted({f.priority for f in others.values() if f.priority > 0}, reverse=True)
    new: dict[int, int] = {}
    limit = ceiling - 1
    for value in distinct:
        new[value] = max(1, min(value, limit))
        limit = new[value] - 1
    return {i: new.get(f.priority, 0) for i, f in others.items()}


def _raise_above_others(flags: Mapping[int, SlotFlags], target: int) -> dict[int, int]:
    """Priorities that put ``target`` strictly above every other slot."""
    others = {i: f for i, f in flags.items() if i != target}
    highest = max((f.priority for f in others.values()), default=0)
    if highest < MAX_PRIORITY:
        prios = {i: f.priority for i, f in others.items()}
        prios[target] = highest + 1
        return prios
    prios = _lowered_below(others, MAX_PRIORITY)
    prios[target] = MAX_PRIORITY
    return prios


def _with_priorities(
    flags: Mapping[int, SlotFlags], prios: Mapping[int, int]
) -> dict[int, SlotFlags]:
    return {
        i: SlotFlags(priority=prios.get(i, f.priority), tries=f.tries, successful=f.successful)
        for i, f in flags.items()
    }


def decide_mark_bad(flags: Mapping[int, SlotFlags], target: int) -> dict[int, SlotFlags]:
    """Never boot ``target``: priority 0, tries 0, not successful."""
    _require(flags, target)
    return {**flags, target: BAD}


def decide_mark_good(flags: Mapping[int, SlotFlags], target: int) -> dict[int, SlotFlags]:
    """``target`` booted and is healthy: successful, no tries; above the rest if it had 0."""
    _require(flags, target)
    out = dict(flags)
    if flags[target].priority == 0:
        out = _with_priorities(flags, _raise_above_others(flags, target))
    out[target] = SlotFlags(priority=out[target].priority, tries=0, successful=True)
    return out


def decide_make_primary(flags: Mapping[int, SlotFlags], target: int) -> dict[int, SlotFlags]:
    """Boot ``target`` next, once, on trial: strictly highest priority, tries 1, not successful."""
    _require(flags, target)
    out = _with_priorities(flags, _raise_above_others(flags, target))
    out[target] = SlotFlags(priority=out[target].priority, tries=1, successful=False)
    return out


def changed(
    before: Mapping[int, SlotFlags], after: Mapping[int, SlotFlags]
) -> dict[int, SlotFlags]:
    """The entries of ``after`` that differ from ``before``."""
    return {i: f for i, f in after.items() if before.get(i) != f}


class GptPrioBootControl:
    """BootControl over the gpt-prio bits of the slots on one disk (device or image)."""

    def __init__(
        self,
        disk: Path,
        labels: Sequence[str] = DEFAULT_LABELS,
        finder: BootedSlotFinder = RUNNING_SYSTEM,
    ) -> None:
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"slot labels must be unique and non-empty: {list(labels)}")
        self.disk = disk
        self.labels = tuple(labels)
        self.finder = finder

    # -- reading

    def _statuses(self, table: gpttable.GptTable) -> tuple[SlotStatus, ...]:
        return tuple(
            SlotStatus(slot, decode_flags(table.entry(slot.index).attributes))
            for slot in find_slots(table, self.disk, self.labels)
        )

    def slots(self) -> tuple[SlotStatus, ...]:
        return self._statuses(gpt.read_table(self.disk))

    def flags(self, slot: Slot) -> SlotFlags:
        return flags_of(self.slots(), slot, self.disk)

    def booted(self) -> Slot:
        return self.finder.slot([s.slot for s in self.slots()])

    def primary(self) -> Slot | None:
        statuses = self.slots()
        chosen = primary_index({s.slot.index: s.flags for s in statuses})
        return next((s.slot for s in statuses if s.slot.index == chosen), None)

    # -- the verbs: each is one locked read-modify-write of the GPT

    def mark_good(self, slot: Slot) -> None:
        self._apply("slot_marked_good", [slot], lambda before: decide_mark_good(before, slot.index))

    def mark_bad(self, slot: Slot) -> None:
        self._apply("slot_marked_bad", [slot], lambda before: decide_mark_bad(before, slot.index))

    def make_primary(self, slot: Slot) -> None:
        self._apply(
            "slot_made_primary", [slot], lambda before: decide_make_primary(before, slot.index)
        )

    def set_flags(self, new: Mapping[Slot, SlotFlags]) -> None:
        """Write exactly these flags (other attribute bits and other slots untouched)."""
        wanted = {slot.index: f for slot, f in new.items()}
        self._apply("slot_flags_set", list(new), lambda before: {**before, **wanted})

    def _apply(
        self,
        event: str,
        targets: Sequence[Slot],
        decide: Callable[[dict[int, SlotFlags]], dict[int, SlotFlags]],
    ) -> None:
        written: dict[str, str] = {}

        def attributes(table: gpttable.GptTable) -> dict[int, int]:
            statuses = self._statuses(table)
            for target in targets:
                if not any(same_slot(s.slot, target) for s in statuses):
                    raise not_a_slot_of(self.disk, target)
            before = {s.slot.index: s.flags for s in statuses}
            delta = changed(before, decide(before))
            labels = {s.slot.index: s.slot.label for s in statuses}
            written.update({labels[i]: _flags_text(f) for i, f in delta.items()})
            return {i: encode_flags(table.entry(i).attributes, f) for i, f in delta.items()}

        gpt.update_attributes(self.disk, attributes)
        log.info(event, disk=str(self.disk), slots=[t.label for t in targets], changed=written)


def _flags_text(f: SlotFlags) -> str:
    return f"priority={f.priority} tries={f.tries} successful={int(f.successful)}"
