"""The booted slot for boot loaders that also say which entry they picked.

:func:`partitions.booted.booted_slot` reads the kernel command line, then the
mounts. systemd-boot (``LoaderEntrySelected``) and a GRUB fragment
(``updater.slot=A``) also name what they booted; that is a second opinion,
asked between the two: the partition on the kernel command line is what the
kernel really mounts, so it wins; the loader's word comes before guessing from
the mounts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from partitions import booted as booted_mod
from partitions.bootcontrol import Slot
from updater.errors import DiskError

log = structlog.get_logger(__name__)

LoaderHint = Callable[[str | None], Slot | None]  # kernel command line text -> slot


def booted_slot(
    slots: Sequence[Slot],
    loader_hint: LoaderHint,
    hint_source: str,
    *,
    kernel_cmdline: Path,
    proc_root: Path,
    sys_root: Path,
    dev_root: Path,
) -> Slot:
    """The booted slot: kernel command line, else ``loader_hint``, else the mounts."""
    text = booted_mod.read_text(kernel_cmdline, booted_mod.MAX_CMDLINE_BYTES)
    from_cmdline = booted_mod.slot_from_cmdline(text, slots) if text is not None else None
    hinted = loader_hint(text)
    if from_cmdline is not None:
        if hinted is not None and hinted != from_cmdline:
            log.warning(
                "booted_sources_disagree",
                kernel_cmdline=from_cmdline.label,
                loader=hinted.label,
                loader_source=hint_source,
            )
        log.debug("booted_slot_found", slot=from_cmdline.label, source="kernel_cmdline")
        return from_cmdline
    if hinted is not None:
        log.debug("booted_slot_found", slot=hinted.label, source=hint_source)
        return hinted
    try:
        return booted_mod.booted_slot(
            slots,
            kernel_cmdline=kernel_cmdline,
            proc_root=proc_root,
            sys_root=sys_root,
            dev_root=dev_root,
        )
    except DiskError as exc:
        raise DiskError(
            exc.kind, f"{exc.message}; {hint_source} names none of them either", hint=exc.hint
        ) from exc
