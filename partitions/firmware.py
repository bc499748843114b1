"""Firmware emulation for disk images, so tests and the demo can "reboot".

It chooses a slot the way ChromeOS/CoreOS firmware does with the gpt-prio
bits, spends one try of a slot on trial (marking it bad when that was its last
one, as vboot's GPT_UPDATE_ENTRY_TRY does), and writes the kernel command line
the boot loader would pass, naming the chosen slot.

    python -m partitions.firmware --disk IMG --cmdline-out FILE [--labels USR-A,USR-B]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from partitions import gpt, gptprio, gpttable
from partitions.bootcontrol import BAD, DEFAULT_LABELS, Slot, SlotFlags, find_slots
from updater.errors import UpdaterError
from updater.fsutil import atomic_write

log = structlog.get_logger(__name__)


class NoBootableSlotError(Exception):
    """No slot has priority > 0 and (successful or tries left): real firmware would halt."""


@dataclass(frozen=True)
class BootResult:
    slot: Slot
    before: SlotFlags  # the chosen slot's flags when the firmware looked at them
    after: SlotFlags  # ... and as it left them
    cmdline: str  # what it wrote to cmdline_out (without the newline)


def select_boot(flags: Mapping[int, SlotFlags]) -> tuple[int, dict[int, SlotFlags]]:
    """The slot (GPT index) the firmware boots and every slot's flags after choosing it.

    Candidates have priority > 0 and are successful or have tries left; the highest
    priority wins, the lower GPT index on a tie. A slot on trial loses a try; when it
    had only one left it is marked bad right away, yet boots this one time.
    """
    chosen = gptprio.primary_index(flags)
    if chosen is None:
        raise NoBootableSlotError(
            "no bootable slot: every slot has priority 0, or no tries left and is not successful"
        )
    current = flags[chosen]
    after = dict(flags)
    if not current.successful:
        after[chosen] = (
            SlotFlags(priority=current.priority, tries=current.tries - 1, successful=False)
            if current.tries > 1
            else BAD
        )
    return chosen, after


def kernel_cmdline(slot: Slot, extra_args: str = "ro") -> str:
    return " ".join(part for part in (f"mount.usr=PARTUUID={slot.part_uuid}", extra_args) if part)


def boot_disk_image(
    disk: Path, labels: Sequence[str], cmdline_out: Path, extra_args: str = "ro"
) -> BootResult:
    """Choose the slot to boot on ``disk``, update its flags, write its kernel command line."""
    found: list[BootResult] = []

    def decide(table: gpttable.GptTable) -> dict[int, int]:
        slots = find_slots(table, disk, labels)
        before = {s.index: gptprio.decode_flags(table.entry(s.index).attributes) for s in slots}
        chosen, after = select_boot(before)
        slot = next(s for s in slots if s.index == chosen)
        found.append(
            BootResult(slot, before[chosen], after[chosen], kernel_cmdline(slot, extra_args))
        )
        return {
            i: gptprio.encode_flags(table.entry(i).attributes, f)
            for i, f in gptprio.changed(before, after).items()
        }

    gpt.update_attributes(disk, decide)
    result = found[0]
    atomic_write(cmdline_out, (result.cmdline + "\n").encode())
    log.info(
        "firmware_booted",
        disk=str(disk),
        slot=result.slot.label,
        part_uuid=str(result.slot.part_uuid),
        priority=result.after.priority,
        tries=result.after.tries,
        successful=result.after.successful,
        cmdline_out=str(cmdline_out),
    )
    return result


def _flags_dict(f: SlotFlags) -> dict[str, int | bool]:
    return {"priority": f.priority, "tries": f.tries, "successful": f.successful}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partitions.firmware",
        description="Emulate gpt-prio firmware: pick the slot to boot on a disk image.",
    )
    parser.add_argument("--disk", type=Path, required=True, help="disk image or block device")
    parser.add_argument(
        "--cmdline-out", type=Path, required=True, help="file to write the kernel command line to"
    )
    parser.add_argument(
        "--labels",
        default=",".join(DEFAULT_LABELS),
        help="comma-separated slot partition names (default: %(default)s)",
    )
    parser.add_argument("--extra-args", default="ro", help="more kernel parameters")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    labels = [label for label in args.labels.split(",") if label]
    try:
        result = boot_disk_image(args.disk, labels, args.cmdline_out, args.extra_args)
    except NoBootableSlotError as exc:
        print(f"firmware: {exc}", file=sys.stderr)
        return 1
    except UpdaterError as exc:
        print(f"firmware: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    if args.json:
        print(
            json.dumps(
                {
                    "slot": result.slot.label,
                    "index": result.slot.index,
                    "part_uuid": str(result.slot.part_uuid),
                    "before": _flags_dict(result.before),
                    "after": _flags_dict(result.after),
                    "cmdline": result.cmdline,
                }
            )
        )
    else:
        print(
            f"booted {result.slot.label} (partition {result.slot.index}, "
            f"PARTUUID={result.slot.part_uuid})"
        )
    return 0


if __name__ == "__main__":
    # stdout is for the result; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    sys.exit(main())
