"""The agent on the D-Bus system bus (the client `updatectl` uses to reach it is
:mod:`updater.dbus_client`, the names and errors both share :mod:`updater.dbus_wire`,
the CoreOS interface :mod:`updater.dbus_coreos`; all re-exported here).

Two services, both fed from one :class:`~updater.agentapi.AgentControl`:

- the native interface ``org.updater.Agent1`` (bus name and interface) at
  ``/org/updater/Agent1``: read-only properties mirroring
  :class:`~updater.agentapi.AgentStatus`, ``PropertiesChanged`` on every
  change, and methods ``CheckNow``, ``InstallNow``, ``RebootNow``,
  ``MarkGood``, ``RequestReboot`` (-> ``started`` | ``waiting``), ``Reload``.
  An :class:`~updater.errors.UpdaterError` becomes the D-Bus
  error ``org.updater.Agent1.Error.<Kind>`` (``reboot_refused`` ->
  ``RebootRefused``) carrying the message;
- optionally, CoreOS update_engine's ``com.coreos.update1.Manager`` at
  ``/com/coreos/update1`` (bus name ``com.coreos.update1``), signature for
  signature, so locksmith and FLUO's update-agent work unchanged:
  ``AttemptUpdate()``, ``ResetStatus()``, ``GetStatus() -> xdssx`` and the
  signal ``StatusUpdate(xdssx)``: last checked time (unix seconds), progress
  (0..1), ``UPDATE_STATUS_<STATE>``, new version, new size (bytes).

Who may do what is the D-Bus policy's job
(``dist/dbus-1/system.d/org.updater.Agent1.conf``): anyone reads, root acts.
Calls with wrong argument types never reach the agent: dbus-fast answers them
with ``org.freedesktop.DBus.Error.UnknownMethod`` (no method of that name
takes those arguments).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from dbus_fast import (
    DBusError,
    NameFlag,
    PropertyAccess,
    RequestNameReply,
)
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property

from updater.agentapi import AgentControl, AgentStatus
from updater.dbus_client import call, read_status
from updater.dbus_coreos import (
    COREOS_BUS_NAME,
    COREOS_INTERFACE,
    COREOS_OBJECT_PATH,
    CoreOSInterface,
    coreos_status,
)
from updater.dbus_wire import (
    BUS_NAME,
    INTERFACE,
    METHOD_RETURNS,
    METHODS,
    OBJECT_PATH,
    PROPERTIES,
    AgentAccessDeniedError,
    AgentUnavailableError,
    Property,
    dbus_error_name,
    forward,
    from_dbus_error,
    to_dbus_error,
)
from updater.dbuscompat import dbus_method, signature
from updater.errors import RefusedError, UpdaterError

__all__ = [
    "BUS_NAME",
    "COREOS_BUS_NAME",
    "COREOS_INTERFACE",
    "COREOS_OBJECT_PATH",
    "INTERFACE",
    "METHODS",
    "METHOD_RETURNS",
    "OBJECT_PATH",
    "PROPERTIES",
    "AgentAccessDeniedError",
    "AgentInterface",
    "AgentService",
    "AgentUnavailableError",
    "call",
    "coreos_status",
    "dbus_error_name",
    "from_dbus_error",
    "read_status",
    "serve",
    "to_dbus_error",
]

log = structlog.get_logger(__name__)

# ---- the services ---------------------------------------------------------------------------


def _wire(status: AgentStatus, prop: Property) -> Any:
    """A status field as its property's D-Bus value (unsigned never negative)."""
    value = getattr(status, prop.field)
    if prop.signature == "t":
        return max(0, int(value))
    if prop.signature == "d":
        return float(value)
    if prop.signature == "b":
        return bool(value)
    if prop.signature == "as":
        return [str(v) for v in value]
    return str(value)


class AgentInterface(ServiceInterface):
    """``org.updater.Agent1``: the agent's status as properties, its actions as methods."""

    def __init__(self, control: AgentControl) -> None:
        super().__init__(INTERFACE)
        self._control = control
        self._status = control.status()

    def update(self, status: AgentStatus) -> None:
        """Take a new status; emit PropertiesChanged with what differs."""
        changed = {
            p.name: _wire(status, p)
            for p in PROPERTIES
            if _wire(status, p) != _wire(self._status, p)
        }
        self._status = status
        if changed:
            self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ, name="State")
    @signature("s")
    def state(self) -> str:
        return self._status.state

    @dbus_property(access=PropertyAccess.READ, name="BootedSlot")
    @signature("s")
    def booted_slot(self) -> str:
        return self._status.booted_slot

    @dbus_property(access=PropertyAccess.READ, name="BootedVersion")
    @signature("s")
    def booted_version(self) -> str:
        return self._status.booted_version

    @dbus_property(access=PropertyAccess.READ, name="StagedVersion")
    @signature("s")
    def staged_version(self) -> str:
        return self._status.staged_version

    @dbus_property(access=PropertyAccess.READ, name="NewVersion")
    @signature("s")
    def new_version(self) -> str:
        return self._status.new_version

    @dbus_property(access=PropertyAccess.READ, name="NewSize")
    @signature("t")
    def new_size(self) -> int:
        return max(0, self._status.new_size)

    @dbus_property(access=PropertyAccess.READ, name="Progress")
    @signature("d")
    def progress(self) -> float:
        return float(self._status.progress)

    @dbus_property(access=PropertyAccess.READ, name="LastErrorKind")
    @signature("s")
    def last_error_kind(self) -> str:
        return self._status.last_error_kind

    @dbus_property(access=PropertyAccess.READ, name="LastErrorMessage")
    @signature("s")
    def last_error_message(self) -> str:
        return self._status.last_error_message

    @dbus_property(access=PropertyAccess.READ, name="LastCheckTime")
    @signature("t")
    def last_check_time(self) -> int:
        return max(0, self._status.last_check_time)

    @dbus_property(access=PropertyAccess.READ, name="LastChangeTime")
    @signature("t")
    def last_change_time(self) -> int:
        return max(0, self._status.last_change_time)

    @dbus_property(access=PropertyAccess.READ, name="Held")
    @signature("b")
    def held(self) -> bool:
        return self._status.held

    @dbus_property(access=PropertyAccess.READ, name="HeldUntil")
    @signature("t")
    def held_until(self) -> int:
        return max(0, self._status.held_until)

    @dbus_property(access=PropertyAccess.READ, name="SkippedVersions")
    @signature("as")
    def skipped_versions(self) -> list[str]:
        return list(self._status.skipped_versions)

    @dbus_property(access=PropertyAccess.READ, name="Pin")
    @signature("s")
    def pin(self) -> str:
        return self._status.pin

    @dbus_method(name="CheckNow")
    @signature("")
    async def check_now(self) -> None:
        await forward("CheckNow", self._control.check_now)

    @dbus_method(name="InstallNow")
    @signature("")
    async def install_now(self) -> None:
        await forward("InstallNow", self._control.install_now)

    @dbus_method(name="RebootNow")
    @signature("")
    async def reboot_now(self) -> None:
        await forward("RebootNow", self._control.reboot_now)

    @dbus_method(name="MarkGood")
    @signature("")
    async def mark_good(self) -> None:
        await forward("MarkGood", self._control.mark_good)

    @dbus_method(name="RequestReboot")
    @signature("s")
    async def request_reboot(self) -> str:
        return await forward("RequestReboot", self._control.request_reboot)

    @dbus_method(name="Reload")
    @signature("")
    async def reload(self) -> None:
        await forward("Reload", self._control.reload)


class AgentService:
    """The exported interfaces and owned names on one bus connection.

    Calling it (or :meth:`stop`) unsubscribes and unexports; :meth:`close`
    also gives the names back. Disconnecting the bus gives them back too.
    """

    def __init__(self, control: AgentControl, bus: MessageBus, *, coreos_compat: bool) -> None:
        self._control = control
        self._bus = bus
        self._agent = AgentInterface(control)
        self._coreos = CoreOSInterface(control) if coreos_compat else None
        self._names: list[str] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Objects first, names last: whoever sees the name finds the objects.
        self._bus.export(OBJECT_PATH, self._agent)
        if self._coreos is not None:
            self._bus.export(COREOS_OBJECT_PATH, self._coreos)
        self._unsubscribe = self._control.subscribe(self._on_status)
        self._on_status(self._control.status())  # whatever changed while we set up
        wanted = [BUS_NAME] + ([COREOS_BUS_NAME] if self._coreos is not None else [])
        try:
            for name in wanted:
                await self._own(name)
        except BaseException:
            self.stop()
            raise
        log.info("dbus_service_started", names=list(self._names))

    async def _own(self, name: str) -> None:
        try:
            reply = await self._bus.request_name(name, NameFlag.DO_NOT_QUEUE)
        except DBusError as err:
            raise UpdaterError(
                "internal",
                f"cannot own {name} on the system bus: {err.text} ({err.type})",
                hint="run the agent as root with dist/dbus-1/system.d/org.updater.Agent1.conf "
                "installed in /usr/share/dbus-1/system.d/",
            ) from err
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RefusedError(
                "busy",
                f"{name} is already owned on the system bus: another agent is running",
                hint="stop the other agent (systemctl stop updater.service) first",
            )
        self._names.append(name)

    def _on_status(self, status: AgentStatus) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._publish(status)
        else:  # called from another thread: the bus is the loop's alone
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self._publish, status)

    def _publish(self, status: AgentStatus) -> None:
        if self._unsubscribe is None:  # stopped
            return
        try:
            self._agent.update(status)
            if self._coreos is not None:
                self._coreos.update(status)
        except Exception:  # a broken bus must not break the agent that reports to it
            log.warning("dbus_signal_failed", state=status.state, exc_info=True)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(Exception):
            self._bus.unexport(OBJECT_PATH, self._agent)
        if self._coreos is not None:
            with contextlib.suppress(Exception):
                self._bus.unexport(COREOS_OBJECT_PATH, self._coreos)

    __call__ = stop

    async def close(self) -> None:
        self.stop()
        names, self._names = self._names, []
        for name in names:
            with contextlib.suppress(Exception):
                await self._bus.release_name(name)
        log.info("dbus_service_stopped", names=names)


async def serve(control: AgentControl, bus: MessageBus, *, coreos_compat: bool) -> AgentService:
    """Export the agent on ``bus`` (connected) and own its names.

    Returns the running service; call it to stop (``await service.close()``
    also releases the names). Raises RefusedError("busy") when another agent
    owns a name, UpdaterError("internal") when the bus policy refuses it.
    """
    service = AgentService(control, bus, coreos_compat=coreos_compat)
    await service.start()
    return service
