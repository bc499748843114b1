"""What ``updatectl``'s commands share in their output: JSON, ages, failed versions,
the host policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from updater.hostpolicy import HostPolicy, format_time

if TYPE_CHECKING:
    from policies.failed import Verdict


def emit_json(out: TextIO, doc: Any) -> None:
    out.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600}h"
        if s >= 86400
        else (f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s")
    )


def print_failed_versions(verdicts: list[Verdict], out: TextIO, max_failures: int) -> None:
    if not verdicts:
        return
    out.write(
        f"Failed versions (blocked at {max_failures} host{'s' if max_failures > 1 else ''}):\n"
    )
    for v in verdicts:
        state = "BLOCKED" if v.blocked else "counting"
        if v.malformed is not None:
            out.write(f"  {v.version:20} {state}: unreadable record ({v.malformed.message})\n")
            continue
        failures = () if v.record is None else v.record.failures
        out.write(f"  {v.version:20} {state}, {len(failures)} host(s):\n")
        for f in failures:
            when = datetime.fromtimestamp(f.at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            out.write(f"    {f.host:34} {f.kind:16} {when}\n")
    if any(v.blocked for v in verdicts):
        out.write("  (`updatectl fleet unblock VERSION` lets the group take a blocked version)\n")


def policy_doc(policy: HostPolicy, now: float) -> dict[str, Any]:
    until = policy.held_until(now)
    d = policy.downgrade
    return {
        "held": until is not None,
        "held_until": None if not until else format_time(until),
        "skipped": list(policy.skipped),
        "downgrade": None
        if d is None
        else {"channel": d.channel, "version": d.version, "floor": d.floor},
    }
