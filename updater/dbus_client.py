"""The client ``updatectl`` uses to reach the agent on the system bus: its status
(:func:`read_status`) and its methods (:func:`call`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from dbus_fast import (
    BusType,
    Message,
    MessageFlag,
    MessageType,
    Variant,
)
from dbus_fast.aio import MessageBus

from updater.agentapi import AgentStatus
from updater.dbus_wire import (
    BUS_NAME,
    DEFAULT_CALL_TIMEOUT_S,
    EMPTY,
    INTERFACE,
    METHODS,
    NO_OWNER,
    OBJECT_PATH,
    PROPERTIES,
    PROPERTIES_INTERFACE,
    AgentUnavailableError,
    from_dbus_error,
)
from updater.dbuscompat import BUS_FAILURES
from updater.errors import UpdaterError

log = structlog.get_logger(__name__)


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
            kwargs[prop.field] = EMPTY[prop.signature]
        elif prop.signature == "as":
            kwargs[prop.field] = tuple(value.value)
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
        if reply.error_name not in NO_OWNER:
            log.warning("agent_status_unreadable", error=reply.error_name)
        return None
    return _status_from_properties(reply.body[0])


async def call(
    method: str, bus_address: str | None = None, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
) -> Any:
    """Call one method of ``org.updater.Agent1`` (a key of METHODS) and wait for it;
    what it returns (None for most).

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
    return reply.body[0] if reply.body else None
