"""What the D-Bus tests share: the shipped policy, a client connection to a private
system bus, and a bounded asyncio.run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "dist" / "dbus-1" / "system.d" / "org.updater.Agent1.conf"

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """``asyncio.run``, failing after 30 s rather than hanging the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


async def connect(address: str) -> MessageBus:
    """A connection to the bus at ``address``, as a system-bus client."""
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()


async def add_match(bus: MessageBus, rule: str) -> None:
    """Ask the bus daemon to route messages matching ``rule`` to ``bus`` (AddMatch)."""
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
