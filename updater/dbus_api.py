"""The agent on the D-Bus system bus, and the client `updatectl` uses to reach it.

Two services, both fed from one :class:`~updater.agentapi.AgentControl`:

- the native interface ``org.updater.Agent1`` (bus name and interface) at
  ``/org/updater/Agent1``: read-only properties mirroring
  :class:`~updater.agentapi.AgentStatus`, ``PropertiesChanged`` on every
  change, and methods ``CheckNow``, ``InstallNow``, ``RebootNow``,
  ``MarkGood``. An :class:`~updater.errors.UpdaterError` becomes the D-Bus
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
import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import structlog
from dbus_fast import (
    BusType,
    DBusError,
    Message,
    MessageFlag,
    MessageType,
    NameFlag,
    PropertyAccess,
    RequestNameReply,
    Variant,
)
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property

from updater import errors
from updater.agentapi import AgentControl, AgentStatus
from updater.dbuscompat import BUS_FAILURES, dbus_method, dbus_signal, signature
from updater.errors import CommandError, ExitCode, RefusedError, UpdaterError

log = structlog.get_logger(__name__)

BUS_NAME: Final = "org.updater.Agent1"
OBJECT_PATH: Final = "/org/updater/Agent1"
INTERFACE: Final = "org.updater.Agent1"
ERROR_PREFIX: Final = "org.updater.Agent1.Error."

COREOS_BUS_NAME: Final = "com.coreos.update1"
COREOS_OBJECT_PATH: Final = "/com/coreos/update1"
COREOS_INTERFACE: Final = "com.coreos.update1.Manager"
COREOS_STATUS_PREFIX: Final = "UPDATE_STATUS_"

PROPERTIES_INTERFACE: Final = "org.freedesktop.DBus.Properties"

# D-Bus method of org.updater.Agent1 -> the AgentControl coroutine it calls.
METHODS: Final = {
    "CheckNow": "check_now",
    "InstallNow": "install_now",
    "RebootNow": "reboot_now",
    "MarkGood": "mark_good",
}

DEFAULT_CALL_TIMEOUT_S: Final = 300.0  # mark-good runs health checks; an install can be long

# errors a bus gives when nobody owns the name we talk to
_NO_OWNER: Final = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
)
_ACCESS_DENIED: Final = "org.freedesktop.DBus.Error.AccessDenied"


@dataclass(frozen=True)
class _Property:
    name: str  # D-Bus property name
    field: str  # AgentStatus attribute
    signature: str


# Every AgentStatus field, as the property that shows it. The API only grows.
PROPERTIES: Final = (
    _Property("State", "state", "s"),
    _Property("BootedSlot", "booted_slot", "s"),
    _Property("BootedVersion", "booted_version", "s"),
    _Property("StagedVersion", "staged_version", "s"),
    _Property("NewVersion", "new_version", "s"),
    _Property("NewSize", "new_size", "t"),
    _Property("Progress", "progress", "d"),
    _Property("LastErrorKind", "last_error_kind", "s"),
    _Property("LastErrorMessage", "last_error_message", "s"),
    _Property("LastCheckTime", "last_check_time", "t"),
    _Property("LastChangeTime", "last_change_time", "t"),
)


# ---- errors ---------------------------------------------------------------------------------


class AgentUnavailableError(UpdaterError):
    """No agent answers on the system bus (no bus, or nobody owns the name)."""

    exit_code = ExitCode.INTERNAL
    kinds = frozenset({"agent_not_running"})


class AgentAccessDeniedError(RefusedError):
    """The bus policy refused the call: only root may act on the agent."""

    kinds = frozenset({"access_denied"})


def dbus_error_name(kind: str) -> str:
    """``reboot_refused`` -> ``org.updater.Agent1.Error.RebootRefused``."""
    return ERROR_PREFIX + "".join(part.capitalize() for part in kind.split("_"))


def _error_classes() -> Iterator[type[UpdaterError]]:
    stack: list[type[UpdaterError]] = [UpdaterError]
    while stack:
        cls = stack.pop(0)
        if cls.__module__ == errors.__name__:
            yield cls
        stack.extend(cls.__subclasses__())


@functools.cache
def _error_table() -> dict[str, tuple[type[UpdaterError], str]]:
    """D-Bus error name -> (class, kind) for every kind of updater.errors."""
    table: dict[str, tuple[type[UpdaterError], str]] = {}
    for cls in _error_classes():
        for kind in sorted(cls.kinds):
            table.setdefault(dbus_error_name(kind), (cls, kind))
    return table


def to_dbus_error(err: UpdaterError) -> DBusError:
    return DBusError(dbus_error_name(err.kind), err.message)


def from_dbus_error(name: str, text: str) -> UpdaterError:
    """The UpdaterError a D-Bus error stands for; an unknown one is ``internal``."""
    if name == _ACCESS_DENIED:
        return AgentAccessDeniedError(
            "access_denied",
            text,
            hint="only root may change what the updater agent does; reading status is open",
        )
    if name in _NO_OWNER:
        return AgentUnavailableError(
            "agent_not_running",
            f"no updater agent owns {BUS_NAME} on the system bus",
            hint="start updater.service",
        )
    found = _error_table().get(name)
    if found is None:
        return UpdaterError("internal", f"{text} ({name})")
    cls, kind = found
    if cls is CommandError:
        return CommandError(kind, text, argv=[], returncode=None)
    return cls(kind, text)


# ---- the services ---------------------------------------------------------------------------


async def _forward(method: str, action: Callable[[], Awaitable[None]]) -> None:
    """Run one agent action for a D-Bus caller, its errors turned into D-Bus errors."""
    log.info("dbus_method_called", method=method)
    try:
        await action()
    except UpdaterError as err:
        log.info("dbus_method_failed", method=method, category=err.category, kind=err.kind)
        raise to_dbus_error(err) from err
    except Exception as err:
        log.exception("dbus_method_crashed", method=method)
        raise DBusError(
            dbus_error_name("internal"), f"internal error: {type(err).__name__}"
        ) from err


def _wire(status: AgentStatus, prop: _Property) -> Any:
    """A status field as its property's D-Bus value (unsigned never negative)."""
    value = getattr(status, prop.field)
    if prop.signature == "t":
        return max(0, int(value))
    if prop.signature == "d":
        return float(value)
    return str(value)


def coreos_status(status: AgentStatus) -> tuple[int, float, str, str, int]:
    """update_engine's GetStatus tuple (x last_checked_time, d progress,
    s current_operation, s new_version, x new_size)."""
    return (
        int(status.last_check_time),
        float(status.progress),
        COREOS_STATUS_PREFIX + status.state,
        status.new_version,
        int(status.new_size),
    )


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

    @dbus_method(name="CheckNow")
    @signature("")
    async def check_now(self) -> None:
        await _forward("CheckNow", self._control.check_now)

    @dbus_method(name="InstallNow")
    @signature("")
    async def install_now(self) -> None:
        await _forward("InstallNow", self._control.install_now)

    @dbus_method(name="RebootNow")
    @signature("")
    async def reboot_now(self) -> None:
        await _forward("RebootNow", self._control.reboot_now)

    @dbus_method(name="MarkGood")
    @signature("")
    async def mark_good(self) -> None:
        await _forward("MarkGood", self._control.mark_good)


class CoreOSInterface(ServiceInterface):
    """``com.coreos.update1.Manager``, as update_engine exports it."""

    def __init__(self, control: AgentControl) -> None:
        super().__init__(COREOS_INTERFACE)
        self._control = control
        self._last = coreos_status(control.status())

    def update(self, status: AgentStatus) -> None:
        """Take a new status; emit StatusUpdate when what GetStatus says changed."""
        now = coreos_status(status)
        if now != self._last:
            self._last = now
            self.status_update(now)

    @dbus_signal(name="StatusUpdate")
    @signature("xdssx")
    def status_update(self, status: tuple[int, float, str, str, int]) -> list[object]:
        return list(status)  # dbus-fast < 4 takes several out arguments only as a list

    @dbus_method(name="GetStatus")
    @signature("xdssx")
    def get_status(self) -> list[object]:
        return list(self._last)

    @dbus_method(name="AttemptUpdate")
    @signature("")
    async def attempt_update(self) -> None:
        await _forward("AttemptUpdate", self._control.install_now)

    @dbus_method(name="ResetStatus")
    @signature("")
    async def reset_status(self) -> None:
        await _forward("ResetStatus", self._control.reset_status)


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


# ---- the client -----------------------------------------------------------------------------


async def _connect(bus_address: str | None) -> MessageBus:
    return await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()


def _disconnect(bus: MessageBus) -> None:
    with contextlib.suppress(Exception):
        bus.disconnect()


def _status_from_properties(values: dict[str, Variant]) -> AgentStatus:
    """Validate what the agent sent; a missing or mistyped property reads as empty."""
    kwargs: dict[str, Any] = {}
    for prop in PROPERTIES:
        value = values.get(prop.name)
        if value is None or value.signature != prop.signature:
            if value is not None:
                log.warning(
                    "agent_property_mistyped", property=prop.name, signature=value.signature
                )
            kwargs[prop.field] = {"s": "", "t": 0, "d": 0.0}[prop.signature]
        else:
            kwargs[prop.field] = value.value
    return AgentStatus(**kwargs)


async def read_status(bus_address: str | None = None, timeout_s: float = 2.0) -> AgentStatus | None:
    """All properties of the running agent; None when no bus or no agent answers.

    ``bus_address`` defaults to the system bus (``DBUS_SYSTEM_BUS_ADDRESS``).
    Never starts the agent by bus activation.
    """
    bus: MessageBus | None = None
    try:
        async with asyncio.timeout(timeout_s):
            bus = await _connect(bus_address)
            reply = await bus.call(
                Message(
                    destination=BUS_NAME,
                    path=OBJECT_PATH,
                    interface=PROPERTIES_INTERFACE,
                    member="GetAll",
                    signature="s",
                    body=[INTERFACE],
                    flags=MessageFlag.NO_AUTOSTART,
                )
            )
    except TimeoutError:
        log.warning("agent_status_timeout", timeout_s=timeout_s)
        return None
    except BUS_FAILURES as err:
        log.debug("agent_status_no_bus", error=str(err))
        return None
    finally:
        if bus is not None:
            _disconnect(bus)
    if reply.message_type == MessageType.ERROR:
        if reply.error_name not in _NO_OWNER:
            log.warning("agent_status_unreadable", error=reply.error_name)
        return None
    return _status_from_properties(reply.body[0])


async def call(
    method: str, bus_address: str | None = None, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
) -> None:
    """Call one method of ``org.updater.Agent1`` (a key of METHODS) and wait for it.

    Raises the UpdaterError the agent raised (same category and kind),
    AgentUnavailableError when no agent answers, AgentAccessDeniedError
    when the bus policy refuses the caller.
    """
    if method not in METHODS:
        raise ValueError(f"org.updater.Agent1 has no method {method!r}")
    bus: MessageBus | None = None
    try:
        async with asyncio.timeout(timeout_s):
            try:
                bus = await _connect(bus_address)
            except BUS_FAILURES as err:
                raise AgentUnavailableError(
                    "agent_not_running",
                    f"cannot reach the system bus: {err}",
                    hint="is dbus running? start updater.service",
                ) from err
            try:
                reply = await bus.call(
                    Message(
                        destination=BUS_NAME,
                        path=OBJECT_PATH,
                        interface=INTERFACE,
                        member=method,
                        flags=MessageFlag.NO_AUTOSTART,
                    )
                )
            except BUS_FAILURES as err:
                raise UpdaterError(
                    "internal", f"lost the system bus while calling {method}: {err}"
                ) from err
    except TimeoutError as err:
        raise UpdaterError(
            "internal", f"the updater agent did not answer {method} within {timeout_s:g} s"
        ) from err
    finally:
        if bus is not None:
            _disconnect(bus)
    if reply.message_type == MessageType.ERROR:
        text = str(reply.body[0]) if reply.body else ""
        raise from_dbus_error(reply.error_name or "", text)
