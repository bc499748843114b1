"""The agent's D-Bus API on a real dbus-daemon that loads our policy file."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import dbus_fast
import pytest
import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from structlog.testing import capture_logs

from devtools.dbusdaemon import PrivateBus
from tests.dbus_support import POLICY, add_match, connect, run
from updater import dbus_api, errors
from updater.agentapi import STATES, AgentStatus, StatusListener
from updater.dbus_api import (
    BUS_NAME,
    COREOS_BUS_NAME,
    COREOS_INTERFACE,
    COREOS_OBJECT_PATH,
    INTERFACE,
    OBJECT_PATH,
    AgentAccessDeniedError,
    AgentUnavailableError,
)
from updater.errors import HealthError, RefusedError, UpdaterError

ROOT = Path(__file__).resolve().parent.parent
PROPS = "org.freedesktop.DBus.Properties"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")


INITIAL = AgentStatus(
    state="IDLE",
    booted_slot="USR-A",
    booted_version="1.0.0",
    staged_version="",
    new_version="",
    new_size=0,
    progress=0.0,
    last_error_kind="",
    last_error_message="",
    last_check_time=1_700_000_000,
    last_change_time=1_700_000_001,
)

# D-Bus method -> the AgentControl coroutine it must reach
NATIVE_METHODS = dict(dbus_api.METHODS)
COREOS_METHODS = {"AttemptUpdate": "install_now", "ResetStatus": "reset_status"}


class RecordingAgent:
    """An AgentControl that records what reaches it and raises what it is told to."""

    def __init__(self, status: AgentStatus = INITIAL) -> None:
        self._status = status
        self._listeners: list[StatusListener] = []
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}

    def status(self) -> AgentStatus:
        return self._status

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def subscribe(self, listener: StatusListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set(self, **changes: Any) -> AgentStatus:
        self._status = dataclasses.replace(self._status, **changes)
        for listener in list(self._listeners):
            listener(self._status)
        return self._status

    async def _act(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    async def check_now(self) -> None:
        await self._act("check_now")

    async def install_now(self) -> None:
        await self._act("install_now")

    async def reboot_now(self) -> None:
        await self._act("reboot_now")

    async def mark_good(self) -> None:
        await self._act("mark_good")

    async def reset_status(self) -> None:
        await self._act("reset_status")

    async def request_reboot(self) -> str:
        await self._act("request_reboot")
        return "waiting"

    async def reload(self) -> None:
        await self._act("reload")


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus(policy_files=(POLICY,)) as b:
        yield b


@contextlib.asynccontextmanager
async def served(
    address: str, agent: RecordingAgent, *, coreos: bool = True
) -> AsyncIterator[MessageBus]:
    """The agent served on one connection; yields a second connection, a client's."""
    server = await connect(address)
    client = await connect(address)
    try:
        service = await dbus_api.serve(agent, server, coreos_compat=coreos)
        try:
            yield client
        finally:
            await service.close()
    finally:
        client.disconnect()
        server.disconnect()


def method_call(
    member: str,
    *,
    interface: str | None = INTERFACE,
    destination: str = BUS_NAME,
    path: str = OBJECT_PATH,
    signature: str = "",
    body: list[Any] | None = None,
) -> Message:
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
    )


def coreos_call(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    return method_call(
        member,
        interface=COREOS_INTERFACE,
        destination=COREOS_BUS_NAME,
        path=COREOS_OBJECT_PATH,
        signature=signature,
        body=body,
    )


class Signals:
    """Signals from the agent's connection, as a client sees them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._arrived = asyncio.Event()

    @classmethod
    async def watch(cls, client: MessageBus) -> Signals:
        signals = cls()
        client.add_message_handler(signals._handle)
        for rule in (
            f"type='signal',path='{OBJECT_PATH}',interface='{PROPS}'",
            f"type='signal',path='{COREOS_OBJECT_PATH}',interface='{COREOS_INTERFACE}'",
        ):
            await add_match(client, rule)
        return signals

    def _handle(self, msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            self.messages.append(msg)
            self._arrived.set()

    def named(self, member: str) -> list[Message]:
        return [m for m in self.messages if m.member == member]

    async def wait(self, member: str, count: int = 1) -> list[Message]:
        while len(self.named(member)) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 5)
        return self.named(member)

    def clear(self) -> None:
        self.messages.clear()


async def barrier(client: MessageBus) -> None:
    """Round trip to the agent: every signal it sent before has arrived by now."""
    reply = await client.call(
        method_call("GetAll", interface=PROPS, signature="s", body=[INTERFACE])
    )
    assert reply.message_type == MessageType.METHOD_RETURN


def expected_properties(status: AgentStatus) -> dict[str, tuple[str, Any]]:
    def wire(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {p.name: (p.signature, wire(getattr(status, p.field))) for p in dbus_api.PROPERTIES}


def as_pairs(values: dict[str, Variant]) -> dict[str, tuple[str, Any]]:
    return {name: (v.signature, v.value) for name, v in values.items()}


# ---- properties and signals -----------------------------------------------------------------


def test_every_status_field_is_a_property() -> None:
    assert [p.field for p in dbus_api.PROPERTIES] == [
        f.name for f in dataclasses.fields(AgentStatus)
    ]


@pytest.mark.root  # the bus lets only root own names
def test_properties_are_readable(bus: PrivateBus) -> None:
    agent = RecordingAgent(dataclasses.replace(INITIAL, new_version="1.1.0", new_size=12345))

    async def body() -> None:
        async with served(bus.address, agent) as client:
            reply = await client.call(
                method_call("GetAll", interface=PROPS, signature="s", body=[INTERFACE])
            )
            assert as_pairs(reply.body[0]) == expected_properties(agent.status())
            reply = await client.call(
                method_call("Get", interface=PROPS, signature="ss", body=[INTERFACE, "NewSize"])
            )
            assert (reply.body[0].signature, reply.body[0].value) == ("t", 12345)

            # introspection shows exactly these, all read-only
            node = await client.introspect(BUS_NAME, OBJECT_PATH)
            [iface] = [i for i in node.interfaces if i.name == INTERFACE]
            shown = {(p.name, p.signature, p.access.value) for p in iface.properties}
            assert shown == {(p.name, p.signature, "read") for p in dbus_api.PROPERTIES}
            assert {m.name for m in iface.methods} == set(NATIVE_METHODS)

    run(body())
    assert agent.calls == []


@pytest.mark.root  # the bus lets only root own names
def test_properties_changed_and_status_update_on_every_change(bus: PrivateBus) -> None:
    agent = RecordingAgent()

    async def body() -> None:
        async with served(bus.address, agent) as client:
            signals = await Signals.watch(client)

            agent.set(state="DOWNLOADING", new_version="1.1.0", new_size=4096, progress=0.25)
            [changed] = await signals.wait("PropertiesChanged")
            assert changed.body[0] == INTERFACE
            assert as_pairs(changed.body[1]) == {
                "State": ("s", "DOWNLOADING"),
                "NewVersion": ("s", "1.1.0"),
                "NewSize": ("t", 4096),
                "Progress": ("d", 0.25),
            }
            [update] = await signals.wait("StatusUpdate")
            assert update.signature == "xdssx"
            assert update.body == [1_700_000_000, 0.25, "UPDATE_STATUS_DOWNLOADING", "1.1.0", 4096]

            # the same status again: nothing to tell
            signals.clear()
            agent.set()
            await barrier(client)
            assert signals.messages == []

            # a change GetStatus does not show: PropertiesChanged only
            agent.set(booted_version="1.0.1")
            [changed] = await signals.wait("PropertiesChanged")
            assert as_pairs(changed.body[1]) == {"BootedVersion": ("s", "1.0.1")}
            await barrier(client)
            assert signals.named("StatusUpdate") == []

            # a change made from another thread arrives too
            signals.clear()
            await asyncio.to_thread(
                agent.set, state="UPDATED_NEED_REBOOT", staged_version="1.1.0", progress=1.0
            )
            [changed] = await signals.wait("PropertiesChanged")
            assert as_pairs(changed.body[1]) == {
                "State": ("s", "UPDATED_NEED_REBOOT"),
                "StagedVersion": ("s", "1.1.0"),
                "Progress": ("d", 1.0),
            }
            [update] = await signals.wait("StatusUpdate")
            assert update.body[2] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"

            # and the properties read back as the last status
            reply = await client.call(
                method_call("GetAll", interface=PROPS, signature="s", body=[INTERFACE])
            )
            assert as_pairs(reply.body[0]) == expected_properties(agent.status())

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_no_coreos_interface_unless_asked(bus: PrivateBus) -> None:
    agent = RecordingAgent()

    async def body() -> None:
        async with served(bus.address, agent, coreos=False) as client:
            reply = await client.call(coreos_call("GetStatus"))
            assert reply.error_name == "org.freedesktop.DBus.Error.ServiceUnknown"
            signals = await Signals.watch(client)
            agent.set(state="CHECKING_FOR_UPDATE")
            await signals.wait("PropertiesChanged")
            await barrier(client)
            assert signals.named("StatusUpdate") == []

    run(body())


# ---- methods --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interface", "member", "reaches"),
    [(INTERFACE, m, c) for m, c in NATIVE_METHODS.items()]
    + [(COREOS_INTERFACE, m, c) for m, c in COREOS_METHODS.items()],
)
@pytest.mark.root  # the bus lets only root own names
def test_every_method_reaches_the_agent(
    bus: PrivateBus, interface: str, member: str, reaches: str
) -> None:
    agent = RecordingAgent()

    async def body() -> None:
        async with served(bus.address, agent) as client:
            msg = method_call(member) if interface == INTERFACE else coreos_call(member)
            reply = await client.call(msg)
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
            assert reply.signature == dbus_api.METHOD_RETURNS.get(member, "")
            if member == "RequestReboot":
                assert reply.body == ["waiting"]

    run(body())
    assert agent.calls == [reaches]


@pytest.mark.parametrize(
    ("raised", "name", "text"),
    [
        (
            RefusedError("reboot_refused", "blocked by an inhibitor"),
            "org.updater.Agent1.Error.RebootRefused",
            "blocked by an inhibitor",
        ),
        (
            HealthError("check_failed", "10-network failed"),
            "org.updater.Agent1.Error.CheckFailed",
            "10-network failed",
        ),
        (RuntimeError("secret detail"), "org.updater.Agent1.Error.Internal", "RuntimeError"),
    ],
)
@pytest.mark.root  # the bus lets only root own names
def test_agent_errors_become_named_dbus_errors(
    bus: PrivateBus, raised: Exception, name: str, text: str
) -> None:
    agent = RecordingAgent()
    agent.fail = {"reboot_now": raised, "install_now": raised}

    async def body() -> None:
        async with served(bus.address, agent) as client:
            for msg in (method_call("RebootNow"), coreos_call("AttemptUpdate")):
                with capture_logs() as logs:
                    reply = await client.call(msg)
                assert reply.message_type == MessageType.ERROR
                assert reply.error_name == name
                assert text in reply.body[0]
                assert "secret detail" not in reply.body[0]
                assert {e["event"] for e in logs} & {"dbus_method_failed", "dbus_method_crashed"}

    run(body())
    assert agent.calls == ["reboot_now", "install_now"]


@pytest.mark.parametrize(("signature", "args"), [("s", ["now"]), ("u", [1]), ("b", [True])])
@pytest.mark.root  # the bus lets only root own names
def test_wrong_argument_types_are_refused_before_the_agent(
    bus: PrivateBus, signature: str, args: list[Any]
) -> None:
    agent = RecordingAgent()

    async def body() -> None:
        async with served(bus.address, agent) as client:
            messages = [method_call(m, signature=signature, body=args) for m in NATIVE_METHODS]
            messages += [coreos_call(m, signature, args) for m in [*COREOS_METHODS, "GetStatus"]]
            for msg in messages:
                reply = await client.call(msg)
                assert reply.message_type == MessageType.ERROR, msg.member
                assert reply.error_name == UNKNOWN_METHOD, (msg.member, reply.error_name)
            # writing a property: read-only, or the wrong type
            for prop, value in (("State", Variant("s", "IDLE")), ("NewSize", Variant("s", "1"))):
                reply = await client.call(
                    method_call(
                        "Set", interface=PROPS, signature="ssv", body=[INTERFACE, prop, value]
                    )
                )
                assert reply.error_name == "org.freedesktop.DBus.Error.PropertyReadOnly"
            reply = await client.call(
                method_call("Get", interface=PROPS, signature="su", body=[INTERFACE, 1])
            )
            assert reply.message_type == MessageType.ERROR

    run(body())
    assert agent.calls == []
    assert agent.status() == INITIAL


@pytest.mark.root  # the bus lets only root own names
def test_get_status_is_update_engines_tuple(bus: PrivateBus) -> None:
    agent = RecordingAgent(
        dataclasses.replace(
            INITIAL,
            state="UPDATED_NEED_REBOOT",
            new_version="1.1.0",
            new_size=2**40,
            progress=1.0,
        )
    )

    async def body() -> None:
        async with served(bus.address, agent) as client:
            reply = await client.call(coreos_call("GetStatus"))
            assert reply.signature == "xdssx"
            assert reply.body == [
                1_700_000_000,
                1.0,
                "UPDATE_STATUS_UPDATED_NEED_REBOOT",
                "1.1.0",
                2**40,
            ]
            node = await client.introspect(COREOS_BUS_NAME, COREOS_OBJECT_PATH)
            [iface] = [i for i in node.interfaces if i.name == COREOS_INTERFACE]
            assert {m.name: (m.in_signature, m.out_signature) for m in iface.methods} == {
                "AttemptUpdate": ("", ""),
                "ResetStatus": ("", ""),
                "GetStatus": ("", "xdssx"),
            }
            assert {s.name: s.signature for s in iface.signals} == {"StatusUpdate": "xdssx"}

    run(body())
    assert agent.calls == []


@pytest.mark.parametrize("state", STATES)
def test_every_state_is_an_update_engine_operation(state: str) -> None:
    status = dataclasses.replace(INITIAL, state=state)
    assert dbus_api.coreos_status(status)[2] == f"UPDATE_STATUS_{state}"


# ---- the client -----------------------------------------------------------------------------


@pytest.mark.root  # the bus lets only root own names
def test_read_status_reads_the_running_agent(bus: PrivateBus) -> None:
    agent = RecordingAgent(
        dataclasses.replace(
            INITIAL,
            state="REPORTING_ERROR_EVENT",
            last_error_kind="hash_mismatch",
            last_error_message="sha256 of usr.img differs",
            progress=0.5,
        )
    )

    async def body() -> None:
        async with served(bus.address, agent):
            assert await dbus_api.read_status(bus.address) == agent.status()

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_read_status_none_without_an_agent(bus: PrivateBus, tmp_path: Path) -> None:
    async def body() -> None:
        assert await dbus_api.read_status(bus.address) is None
        assert await dbus_api.read_status(f"unix:path={tmp_path / 'no-such-socket'}") is None

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_read_status_uses_the_system_bus_address(
    bus: PrivateBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    agent = RecordingAgent()

    async def body() -> None:
        async with served(bus.address, agent):
            assert await dbus_api.read_status() == INITIAL

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_call_reaches_the_agent_and_maps_errors_back(bus: PrivateBus) -> None:
    agent = RecordingAgent()
    agent.fail = {
        "reboot_now": RefusedError("nothing_staged", "no update is staged"),
        "mark_good": HealthError("check_timeout", "20-app timed out"),
    }

    async def body() -> None:
        async with served(bus.address, agent):
            await dbus_api.call("CheckNow", bus.address)
            await dbus_api.call("InstallNow", bus.address)
            with pytest.raises(RefusedError) as refused:
                await dbus_api.call("RebootNow", bus.address)
            assert (refused.value.category, refused.value.kind) == ("refused", "nothing_staged")
            assert refused.value.message == "no update is staged"
            with pytest.raises(HealthError) as unhealthy:
                await dbus_api.call("MarkGood", bus.address)
            assert (unhealthy.value.category, unhealthy.value.kind) == ("health", "check_timeout")
            with pytest.raises(ValueError, match="no method"):
                await dbus_api.call("Reboot", bus.address)

    run(body())
    assert agent.calls == ["check_now", "install_now", "reboot_now", "mark_good"]


@pytest.mark.root  # the bus lets only root own names
def test_call_without_an_agent(bus: PrivateBus, tmp_path: Path) -> None:
    async def body() -> None:
        for address in (bus.address, f"unix:path={tmp_path / 'no-such-socket'}"):
            with pytest.raises(AgentUnavailableError) as err:
                await dbus_api.call("CheckNow", address)
            assert err.value.kind == "agent_not_running"

    run(body())


def test_error_names_round_trip_for_every_kind() -> None:
    classes: list[type[UpdaterError]] = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, UpdaterError)
    ]
    seen: dict[str, type[UpdaterError]] = {}
    for cls in classes:
        for kind in cls.kinds:
            assert kind not in seen, f"kind {kind} in {cls.__name__} and {seen[kind].__name__}"
            seen[kind] = cls
    for kind, cls in seen.items():
        name = dbus_api.dbus_error_name(kind)
        assert name.startswith("org.updater.Agent1.Error.") and "_" not in name
        back = dbus_api.from_dbus_error(name, "text")
        assert (type(back), back.kind, back.message) == (cls, kind, "text")
    assert dbus_api.dbus_error_name("reboot_refused") == "org.updater.Agent1.Error.RebootRefused"
    unknown = dbus_api.from_dbus_error("org.updater.Agent1.Error.FromTheFuture", "new")
    assert (unknown.category, unknown.kind) == ("internal", "internal")


async def name_has_owner(client: MessageBus, name: str) -> bool:
    reply = await client.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="NameHasOwner",
            signature="s",
            body=[name],
        )
    )
    return bool(reply.body[0])


@pytest.mark.root  # the bus lets only root own names
def test_serve_refuses_a_second_agent_and_stops_cleanly(bus: PrivateBus) -> None:
    agent = RecordingAgent()

    async def body() -> None:
        server, second, client = [await connect(bus.address) for _ in range(3)]
        try:
            service = await dbus_api.serve(agent, server, coreos_compat=True)
            assert service.names == (BUS_NAME, COREOS_BUS_NAME)
            other = RecordingAgent()
            with pytest.raises(RefusedError) as busy:
                await dbus_api.serve(other, second, coreos_compat=False)
            assert busy.value.kind == "busy"
            assert other.listeners == 0  # the failed one undid its subscription
            assert await dbus_api.read_status(bus.address) == INITIAL

            service()  # stop: no more objects, no more listener
            assert agent.listeners == 0
            with capture_logs() as logs:
                assert await dbus_api.read_status(bus.address) is None
            assert [e["event"] for e in logs] == ["agent_status_unreadable"]
            assert await name_has_owner(client, BUS_NAME)

            await service.close()  # and the names go back
            assert not await name_has_owner(client, BUS_NAME)
            assert not await name_has_owner(client, COREOS_BUS_NAME)
        finally:
            for b in (server, second, client):
                b.disconnect()

    run(body())


# ---- the policy: anyone reads, only root acts -----------------------------------------------

USER_CLIENT = r"""
import asyncio, json, os, sys
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from updater import dbus_api

A = ("org.updater.Agent1", "/org/updater/Agent1")
C = ("com.coreos.update1", "/com/coreos/update1")
P = "org.freedesktop.DBus.Properties"
I = "org.freedesktop.DBus.Introspectable"

CALLS = {
    "CheckNow": (A, "org.updater.Agent1", "CheckNow", "", []),
    "InstallNow": (A, "org.updater.Agent1", "InstallNow", "", []),
    "RebootNow": (A, "org.updater.Agent1", "RebootNow", "", []),
    "MarkGood": (A, "org.updater.Agent1", "MarkGood", "", []),
    "RequestReboot": (A, "org.updater.Agent1", "RequestReboot", "", []),
    "Reload": (A, "org.updater.Agent1", "Reload", "", []),
    "CheckNow/no-interface": (A, None, "CheckNow", "", []),
    "MarkGood/no-interface": (A, None, "MarkGood", "", []),
    "Set": (A, P, "Set", "ssv", ["org.updater.Agent1", "State", Variant("s", "IDLE")]),
    "AttemptUpdate": (C, "com.coreos.update1.Manager", "AttemptUpdate", "", []),
    "ResetStatus": (C, "com.coreos.update1.Manager", "ResetStatus", "", []),
    "AttemptUpdate/no-interface": (C, None, "AttemptUpdate", "", []),
    "Set/coreos": (C, P, "Set", "ssv", ["com.coreos.update1.Manager", "X", Variant("s", "")]),
    "Get": (A, P, "Get", "ss", ["org.updater.Agent1", "State"]),
    "Introspect": (A, I, "Introspect", "", []),
    "GetStatus": (C, "com.coreos.update1.Manager", "GetStatus", "", []),
    "GetAll/coreos": (C, P, "GetAll", "s", ["com.coreos.update1.Manager"]),
    "Introspect/coreos": (C, I, "Introspect", "", []),
}

async def main():
    out = {"uid": os.getuid(), "results": {}}
    status = await dbus_api.read_status()
    out["status"] = None if status is None else status.__dict__
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    for label, ((dest, path), iface, member, sig, body) in CALLS.items():
        reply = await bus.call(Message(destination=dest, path=path, interface=iface,
                                       member=member, signature=sig, body=body))
        out["results"][label] = (reply.error_name if reply.message_type == MessageType.ERROR
                                 else "ok")
    for name in ("org.updater.Agent1", "com.coreos.update1"):
        try:
            await bus.request_name(name)
            out["results"]["own " + name] = "ok"
        except Exception as err:
            out["results"]["own " + name] = getattr(err, "type", repr(err))
    try:
        await dbus_api.call("RebootNow")
        out["results"]["call()"] = "ok"
    except Exception as err:
        out["results"]["call()"] = [type(err).__name__, err.category, err.kind]
    bus.disconnect()
    print(json.dumps(out))

asyncio.run(main())
"""

DENIED = [
    "CheckNow",
    "InstallNow",
    "RebootNow",
    "MarkGood",
    "RequestReboot",
    "Reload",
    "CheckNow/no-interface",
    "MarkGood/no-interface",
    "Set",
    "AttemptUpdate",
    "ResetStatus",
    "AttemptUpdate/no-interface",
    "Set/coreos",
    "own org.updater.Agent1",
    "own com.coreos.update1",
]
ALLOWED = ["Get", "Introspect", "GetStatus", "GetAll/coreos", "Introspect/coreos"]


@contextlib.contextmanager
def system_user() -> Iterator[str]:
    name = f"updater-test-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextlib.contextmanager
def world_readable_code() -> Iterator[Path]:
    """Our client's imports, copied where any user can read them.

    The checkout and the virtualenv may sit where only root can reach (a
    0700 temp dir in CI, ~root); the test user needs the code, not the place.
    """
    top = Path(tempfile.mkdtemp(prefix="updater-user-code-"))
    try:
        for package in (
            ROOT / "updater",
            Path(dbus_fast.__file__).parent,
            Path(structlog.__file__).parent,
        ):
            shutil.copytree(
                package, top / package.name, ignore=shutil.ignore_patterns("__pycache__")
            )
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def user_env(extra: dict[str, str], code: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": "/",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": str(code),
        **extra,
    }


def python_for(user: str, env: dict[str, str]) -> str | None:
    """An interpreter ``user`` can run that imports our code and dbus-fast.

    The venv's interpreter may live where only root can reach (~root/.pyenv);
    a system python of the same minor version loads the same wheels."""
    v = sys.version_info
    candidates = [sys.executable, os.path.realpath(sys.executable)]
    candidates += [
        p for p in (shutil.which(f"python{v.major}.{v.minor}", path="/usr/bin:/bin"),) if p
    ]
    for candidate in dict.fromkeys(candidates):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import dbus_fast, structlog, updater.dbus_api"],
                user=user,
                env=env,
                cwd="/",
                capture_output=True,
                check=False,
            )
        except OSError:  # the user cannot even execute it
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.root
def test_policy_anyone_reads_only_root_acts(bus: PrivateBus) -> None:
    agent = RecordingAgent(dataclasses.replace(INITIAL, state="UPDATED_NEED_REBOOT"))

    with system_user() as user, world_readable_code() as code:
        env = user_env(bus.env(), code)
        python = python_for(user, env)
        if python is None:
            pytest.skip(f"no python interpreter that user {user} can run imports dbus-fast")

        async def body() -> dict[str, Any]:
            async with served(bus.address, agent) as client:
                done = await asyncio.to_thread(
                    subprocess.run,
                    [python, "-c", USER_CLIENT],
                    user=user,
                    env=env,
                    cwd="/",
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
                seen: dict[str, Any] = json.loads(done.stdout)
                assert agent.calls == [], "a denied call reached the agent"

                # root, on the same bus, may do everything the user may not
                for member in NATIVE_METHODS:
                    reply = await client.call(method_call(member))
                    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
                for member in COREOS_METHODS:
                    reply = await client.call(coreos_call(member))
                    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
                return seen

        seen = run(body())

    assert seen["uid"] != 0
    # through JSON, as the client printed it: tuples are lists
    assert seen["status"] == json.loads(json.dumps(dataclasses.asdict(agent.status())))
    results = seen["results"]
    assert {k: results[k] for k in ALLOWED} == dict.fromkeys(ALLOWED, "ok")
    assert {k: results[k] for k in DENIED} == dict.fromkeys(DENIED, ACCESS_DENIED)
    assert results["call()"] == [AgentAccessDeniedError.__name__, "refused", "access_denied"]
    assert agent.calls == [*NATIVE_METHODS.values(), *COREOS_METHODS.values()]


def test_policy_file_is_well_formed() -> None:
    root = ET.parse(POLICY).getroot()
    assert root.tag == "busconfig"
    rules = [(p.attrib, r.tag, r.attrib) for p in root.iter("policy") for r in p]
    owners = {a["own"] for (ctx, tag, a) in rules if tag == "allow" and "own" in a}
    assert owners == {BUS_NAME, COREOS_BUS_NAME}
    assert all(ctx == {"user": "root"} for (ctx, tag, a) in rules if tag == "allow" and "own" in a)
    # nobody but root gets Properties.Set or a method of ours
    for ctx, tag, a in rules:
        if tag == "allow" and ctx != {"user": "root"}:
            assert a.get("send_member") in {"Get", "GetAll", "Introspect", "GetStatus"}, a
