"""What the agent's D-Bus service and its client share: the names of
``org.updater.Agent1``, its properties and methods, and its errors
(:class:`~updater.errors.UpdaterError` <-> ``org.updater.Agent1.Error.<Kind>``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog
from dbus_fast import (
    DBusError,
)

from updater import errors
from updater.errors import CommandError, ExitCode, RefusedError, UpdaterError

log = structlog.get_logger(__name__)

BUS_NAME: Final = "org.updater.Agent1"
OBJECT_PATH: Final = "/org/updater/Agent1"
INTERFACE: Final = "org.updater.Agent1"
ERROR_PREFIX: Final = "org.updater.Agent1.Error."

PROPERTIES_INTERFACE: Final = "org.freedesktop.DBus.Properties"

# D-Bus method of org.updater.Agent1 -> the AgentControl coroutine it calls.
METHODS: Final = {
    "CheckNow": "check_now",
    "InstallNow": "install_now",
    "RebootNow": "reboot_now",
    "MarkGood": "mark_good",
    "RequestReboot": "request_reboot",
    "Reload": "reload",
}
# what a method returns (D-Bus signature), when not nothing
METHOD_RETURNS: Final = {"RequestReboot": "s"}

DEFAULT_CALL_TIMEOUT_S: Final = 300.0  # mark-good runs health checks; an install can be long

# errors a bus gives when nobody owns the name we talk to
NO_OWNER: Final = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
)
_ACCESS_DENIED: Final = "org.freedesktop.DBus.Error.AccessDenied"


@dataclass(frozen=True)
class Property:
    name: str  # D-Bus property name
    field: str  # AgentStatus attribute
    signature: str


# Every AgentStatus field, as the property that shows it. The API only grows.
PROPERTIES: Final = (
    Property("State", "state", "s"),
    Property("BootedSlot", "booted_slot", "s"),
    Property("BootedVersion", "booted_version", "s"),
    Property("StagedVersion", "staged_version", "s"),
    Property("NewVersion", "new_version", "s"),
    Property("NewSize", "new_size", "t"),
    Property("Progress", "progress", "d"),
    Property("LastErrorKind", "last_error_kind", "s"),
    Property("LastErrorMessage", "last_error_message", "s"),
    Property("LastCheckTime", "last_check_time", "t"),
    Property("LastChangeTime", "last_change_time", "t"),
    Property("Held", "held", "b"),
    Property("HeldUntil", "held_until", "t"),
    Property("SkippedVersions", "skipped_versions", "as"),
    Property("Pin", "pin", "s"),
)
# a property's value when the agent does not send it (an older agent)
EMPTY: Final = {"s": "", "t": 0, "d": 0.0, "b": False, "as": ()}


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
    if name in NO_OWNER:
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


_T = TypeVar("_T")


async def forward(method: str, action: Callable[[], Awaitable[_T]]) -> _T:
    """Run one agent action for a D-Bus caller, its errors turned into D-Bus errors."""
    log.info("dbus_method_called", method=method)
    try:
        return await action()
    except UpdaterError as err:
        log.info("dbus_method_failed", method=method, category=err.category, kind=err.kind)
        raise to_dbus_error(err) from err
    except Exception as err:
        log.exception("dbus_method_crashed", method=method)
        raise DBusError(
            dbus_error_name("internal"), f"internal error: {type(err).__name__}"
        ) from err
