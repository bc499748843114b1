"""The agent's machine (updater.machine) in the state file, and across restarts:
what a restarted agent continues with. Pure: no I/O (updater.state writes the file).

The reboot attempt's fields (``finalizing``, ``reboot_started_at``,
``refused_since``) are monotonic times of one run of the agent: not saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from updater import versions
from updater.machine import BUSY, ErrorInfo, Machine, Offer, S, enter


def to_dict(m: Machine) -> dict[str, Any]:
    return {
        "state": m.state.value,
        "since": m.since,
        "failures": m.failures,
        "offer": None if m.offer is None else {"version": m.offer.version, "size": m.offer.size},
        "staged": m.staged,
        "last_error": None
        if m.last_error is None
        else {"kind": m.last_error.kind, "message": m.last_error.message},
        "last_check": m.last_check,
        "reboot_refusals": m.reboot_refusals,
        "server_interval_s": m.server_interval_s,
    }


def _num(d: dict[str, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else default


def from_dict(d: Any) -> Machine:
    """Read what :func:`to_dict` wrote; anything unreadable gives a fresh machine."""
    if not isinstance(d, dict):
        return Machine()
    try:
        state = S(str(d.get("state")))
    except ValueError:
        return Machine()
    offer = d.get("offer")
    err = d.get("last_error")
    staged = d.get("staged")
    interval = d.get("server_interval_s")
    return Machine(
        state=state,
        since=_num(d, "since", 0.0),
        failures=max(0, int(_num(d, "failures", 0))),
        offer=Offer(str(offer["version"]), int(offer["size"]))
        if isinstance(offer, dict)
        and versions.is_valid(str(offer.get("version", "")))
        and isinstance(offer.get("size"), int)
        else None,
        staged=staged if isinstance(staged, str) and versions.is_valid(staged) else None,
        last_error=ErrorInfo(str(err.get("kind", "")), str(err.get("message", "")))
        if isinstance(err, dict)
        else None,
        last_check=_num(d, "last_check", 0.0),
        reboot_refusals=max(0, int(_num(d, "reboot_refusals", 0))),
        server_interval_s=float(interval) if isinstance(interval, int | float) else None,
    )


@dataclass(frozen=True)
class Resumed:
    machine: Machine
    note: str  # what happened to the state across the restart, for the log


def resume(m: Machine, now: float, *, staged_still_next: bool) -> Resumed:
    """The machine a restarted agent continues with.

    UPDATED_NEED_REBOOT survives a restart while the staged slot still boots
    next (update_engine's marker file); work cut off by a stop or a crash
    restarts from IDLE (the install's own marker makes it start over); an
    error being reported is done.
    """
    if m.state == S.UPDATED_NEED_REBOOT:
        if staged_still_next:
            return Resumed(m, "update_still_staged")
        return Resumed(enter(m, S.IDLE, now, staged=None, progress=0.0), "staged_update_gone")
    if m.state in BUSY:
        return Resumed(enter(m, S.IDLE, now, progress=0.0, offer=None), "work_interrupted")
    if m.state == S.REPORTING_ERROR_EVENT:
        return Resumed(enter(m, S.IDLE, now), "error_reported")
    return Resumed(m, "idle")
