"""Rebooting the machine through systemd-logind, honouring inhibitors.

Root bypasses logind's block inhibitors unless it asks not to (until systemd
257, which refuses strong block locks to everyone). So we ask not to:
``RebootWithFlags(SD_LOGIND_ROOT_CHECK_INHIBITORS)`` makes logind refuse while
a ``shutdown`` block inhibitor is held. An older logind without that method
(it answers UnknownMethod) gets the same check done here with
``ListInhibitors()`` before a plain ``Reboot(false)``.

Any refusal, by an inhibitor or otherwise, is logged and raised as
``RefusedError("reboot_refused")``: the caller tries again later and counts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Protocol

import structlog
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from updater.dbuscompat import BUS_FAILURES
from updater.errors import RefusedError

log = structlog.get_logger(__name__)

LOGIND_BUS_NAME: Final = "org.freedesktop.login1"
LOGIND_OBJECT_PATH: Final = "/org/freedesktop/login1"
LOGIND_INTERFACE: Final = "org.freedesktop.login1.Manager"

SD_LOGIND_ROOT_CHECK_INHIBITORS: Final = 1 << 0

# What logind answers when a block inhibitor stops the reboot: newer systemd
# (logind-dbus.c, verify_shutdown_creds), and older ones to root asking with
# SD_LOGIND_ROOT_CHECK_INHIBITORS ("Access denied to root due to active block
# inhibitor").
BLOCKED_BY_INHIBITOR_LOCK: Final = "org.freedesktop.login1.BlockedByInhibitorLock"
ACCESS_DENIED: Final = "org.freedesktop.DBus.Error.AccessDenied"
BLOCKED_BY_INHIBITOR: Final = frozenset({BLOCKED_BY_INHIBITOR_LOCK, ACCESS_DENIED})
UNKNOWN_METHOD: Final = "org.freedesktop.DBus.Error.UnknownMethod"

# Inhibitor modes that stop an operation ("block-weak" since systemd 257).
BLOCKING_MODES: Final = frozenset({"block", "block-weak"})

DEFAULT_TIMEOUT_S: Final = 25.0  # seconds, the usual D-Bus method call timeout


class Rebooter(Protocol):
    async def reboot(self) -> None:
        """Ask for a reboot now; RefusedError("reboot_refused") when it is refused."""
        ...


@dataclass(frozen=True)
class Inhibitor:
    """One entry of logind's ListInhibitors() (a(ssssuu))."""

    what: str  # colon-separated: "shutdown:sleep"
    who: str
    why: str
    mode: str  # "block", "block-weak" or "delay"
    uid: int
    pid: int

    @property
    def blocks_shutdown(self) -> bool:
        return self.mode in BLOCKING_MODES and "shutdown" in self.what.split(":")


def parse_inhibitors(body: Any) -> list[Inhibitor]:
    """ListInhibitors()'s reply body, validated."""
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], list):
        raise ValueError("ListInhibitors reply is not a(ssssuu)")
    out = []
    for entry in body[0]:
        if not isinstance(entry, (list, tuple)) or len(entry) != 6:
            raise ValueError("ListInhibitors entry is not (ssssuu)")
        what, who, why, mode, uid, pid = entry
        if not all(isinstance(v, str) for v in (what, who, why, mode)) or not all(
            isinstance(v, int) for v in (uid, pid)
        ):
            raise ValueError("ListInhibitors entry is not (ssssuu)")
        out.append(Inhibitor(what, who, why, mode, uid, pid))
    return out


class _BusFailure(Exception):
    """logind could not be asked (timeout, no bus, a reply we cannot read)."""

    def __init__(self, reason: str, method: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.method = method


class LogindRebooter:
    """Reboots through ``org.freedesktop.login1.Manager`` on ``bus`` (the system bus)."""

    def __init__(self, bus: MessageBus, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._bus = bus
        self._timeout_s = timeout_s

    async def reboot(self) -> None:
        try:
            await self._reboot()
        except _BusFailure as failure:
            log.warning("reboot_refused", reason=failure.reason, method=failure.method)
            raise RefusedError(
                "reboot_refused", str(failure), hint="the reboot is retried later"
            ) from failure

    async def _reboot(self) -> None:
        reply = await self._call("RebootWithFlags", "t", [SD_LOGIND_ROOT_CHECK_INHIBITORS])
        if reply.message_type != MessageType.ERROR:
            log.info("reboot_requested", method="RebootWithFlags")
            return
        if reply.error_name in BLOCKED_BY_INHIBITOR:
            blocking = [i for i in await self._inhibitors_for_log() if i.blocks_shutdown]
            # AccessDenied can be polkit's or the bus's answer too: name an inhibitor or not
            if blocking or reply.error_name != ACCESS_DENIED:
                self._refuse("inhibited", reply, blocking)
        if reply.error_name != UNKNOWN_METHOD:
            self._refuse("logind_error", reply, [])

        # An older logind: no flags, and root would pass its inhibitors.
        log.info("reboot_fallback", reason="no_reboot_with_flags")
        listed = await self._call("ListInhibitors", "", [])
        if listed.message_type == MessageType.ERROR:
            self._refuse("logind_error", listed, [])
        try:
            inhibitors = parse_inhibitors(listed.body)
        except ValueError as err:
            raise _BusFailure("logind_error", "ListInhibitors", f"logind: {err}") from err
        blocking = [i for i in inhibitors if i.blocks_shutdown]
        if blocking:
            self._refuse("inhibited", None, blocking)
        reply = await self._call("Reboot", "b", [False])
        if reply.message_type == MessageType.ERROR:
            self._refuse("logind_error", reply, [])
        log.info("reboot_requested", method="Reboot")

    async def _call(self, member: str, signature: str, body: list[Any]) -> Message:
        msg = Message(
            destination=LOGIND_BUS_NAME,
            path=LOGIND_OBJECT_PATH,
            interface=LOGIND_INTERFACE,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._bus.call(msg)
        except TimeoutError as err:
            raise _BusFailure(
                "logind_timeout",
                member,
                f"logind did not answer {member} within {self._timeout_s:g} s",
            ) from err
        except BUS_FAILURES as err:
            raise _BusFailure("bus_error", member, f"cannot reach logind: {err}") from err

    async def _inhibitors_for_log(self) -> list[Inhibitor]:
        """Who holds the lock, for the log; nobody when logind will not say."""
        try:
            reply = await self._call("ListInhibitors", "", [])
            if reply.message_type == MessageType.ERROR:
                return []
            return parse_inhibitors(reply.body)
        except (_BusFailure, ValueError):
            return []

    def _refuse(self, reason: str, reply: Message | None, blocking: list[Inhibitor]) -> NoReturn:
        error = reply.error_name if reply is not None else None
        text = str(reply.body[0]) if reply is not None and reply.body else ""
        log.warning(
            "reboot_refused",
            reason=reason,
            error=error,
            detail=text,
            inhibitors=[f"{i.who} ({i.why}) pid {i.pid}" for i in blocking],
        )
        if reason == "inhibited":
            who = ", ".join(f"{i.who}: {i.why}" for i in blocking) or "an inhibitor"
            message = f"reboot blocked by a shutdown inhibitor ({who})"
            hint = "see `systemd-inhibit --list`; the reboot is retried later"
        else:
            message = f"logind refused the reboot: {error}: {text}"
            hint = "the reboot is retried later"
        raise RefusedError("reboot_refused", message, hint=hint)


class UnavailableRebooter:
    """No system bus: every reboot is refused (and retried later by the agent)."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def reboot(self) -> None:
        log.error("reboot_refused", reason="no_system_bus", error=self.why)
        raise RefusedError(
            "reboot_refused",
            f"cannot reach logind: {self.why}",
            hint="the agent needs the system D-Bus to reboot",
        )
