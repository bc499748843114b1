"""The logind rebooter against a fake logind on a real dbus-daemon."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.service import ServiceInterface
from structlog.testing import capture_logs

from devtools import fake_logind
from devtools.dbusdaemon import PrivateBus
from devtools.fake_logind import FakeLogind, FakeLogindProcess, Flavour
from tests.dbus_support import POLICY, connect, run
from updater.dbuscompat import dbus_method, signature
from updater.errors import RefusedError
from updater.rebooter import Inhibitor, LogindRebooter, Rebooter, parse_inhibitors

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus(policy_files=(POLICY,)) as b:
        yield b


@contextlib.asynccontextmanager
async def logind(
    address: str, flavour: Flavour = "current", **kwargs: Any
) -> AsyncIterator[tuple[FakeLogind, Rebooter]]:
    """A fake logind on its own connection, and a rebooter on another."""
    server = await connect(address)
    client = await connect(address)
    fake = FakeLogind(flavour=flavour, **kwargs)
    try:
        await fake.start(server)
        yield fake, LogindRebooter(client)
    finally:
        await fake.stop()
        client.disconnect()
        server.disconnect()


def methods(fake: FakeLogind) -> list[tuple[str, list[Any], str]]:
    return [(c.method, c.args, c.outcome) for c in fake.calls]


@pytest.mark.parametrize("flavour", ["current", "root_bypass"])
@pytest.mark.root  # the bus lets only root own names
def test_reboot_asks_logind_to_check_inhibitors(bus: PrivateBus, flavour: Flavour) -> None:
    async def body() -> None:
        async with logind(bus.address, flavour) as (fake, rebooter):
            with capture_logs() as logs:
                await rebooter.reboot()
            assert methods(fake) == [("RebootWithFlags", [1], "rebooted")]
            assert [(e["event"], e.get("method")) for e in logs] == [
                ("reboot_requested", "RebootWithFlags")
            ]

    run(body())


@pytest.mark.parametrize(
    ("flavour", "mode", "error"),
    [
        ("current", "block", fake_logind.BLOCKED_BY_INHIBITOR_LOCK),
        ("current", "block-weak", fake_logind.BLOCKED_BY_INHIBITOR_LOCK),
        ("root_bypass", "block", fake_logind.ACCESS_DENIED),
    ],
)
@pytest.mark.root  # the bus lets only root own names
def test_shutdown_inhibitor_refuses_the_reboot(
    bus: PrivateBus, flavour: Flavour, mode: str, error: str
) -> None:
    async def body() -> None:
        async with logind(bus.address, flavour) as (fake, rebooter):
            fake.add_inhibitor(what="sleep:shutdown", who="backup", why="writing", mode=mode)
            with capture_logs() as logs, pytest.raises(RefusedError) as refused:
                await rebooter.reboot()
            assert refused.value.kind == "reboot_refused"
            assert "backup: writing" in refused.value.message
            assert fake.reboots == []
            assert [c.method for c in fake.calls] == ["RebootWithFlags", "ListInhibitors"]
            assert fake.calls[0].error == error
            [event] = [e for e in logs if e["event"] == "reboot_refused"]
            assert event["reason"] == "inhibited"
            assert event["error"] == error
            assert event["log_level"] == "warning"

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_reboot_goes_through_once_the_inhibitor_is_gone(bus: PrivateBus) -> None:
    async def body() -> None:
        async with logind(bus.address) as (fake, rebooter):
            handle = fake.add_inhibitor()
            with pytest.raises(RefusedError):
                await rebooter.reboot()
            fake.remove_inhibitor(handle)
            await rebooter.reboot()
            assert [c.method for c in fake.reboots] == ["RebootWithFlags"]

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_fallback_without_reboot_with_flags(bus: PrivateBus) -> None:
    async def body() -> None:
        async with logind(bus.address, "no_flags") as (fake, rebooter):
            # inhibitors that do not stop a reboot
            fake.add_inhibitor(what="shutdown", mode="delay")
            fake.add_inhibitor(what="sleep:idle", mode="block")
            with capture_logs() as logs:
                await rebooter.reboot()
            assert methods(fake) == [
                ("ListInhibitors", [], "listed"),
                ("Reboot", [False], "rebooted"),
            ]
            assert [e["event"] for e in logs] == ["reboot_fallback", "reboot_requested"]

    run(body())


@pytest.mark.parametrize("what", ["shutdown", "idle:shutdown"])
@pytest.mark.root  # the bus lets only root own names
def test_fallback_honours_an_inhibitor_logind_would_let_root_pass(
    bus: PrivateBus, what: str
) -> None:
    async def body() -> None:
        async with logind(bus.address, "no_flags") as (fake, rebooter):
            fake.add_inhibitor(what=what, who="dpkg", why="upgrading packages")
            with pytest.raises(RefusedError) as refused:
                await rebooter.reboot()
            assert refused.value.kind == "reboot_refused"
            assert "dpkg" in refused.value.message
            assert methods(fake) == [("ListInhibitors", [], "listed")]  # no Reboot call at all

    run(body())


@pytest.mark.parametrize(
    "fail_with",
    [
        ("org.freedesktop.login1.OperationInProgress", "Action reboot already in progress"),
        ("org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", "polkit says no"),
    ],
)
@pytest.mark.root  # the bus lets only root own names
def test_other_logind_errors_refuse(bus: PrivateBus, fail_with: tuple[str, str]) -> None:
    async def body() -> None:
        async with logind(bus.address, fail_with=fail_with) as (fake, rebooter):
            with capture_logs() as logs, pytest.raises(RefusedError) as refused:
                await rebooter.reboot()
            assert refused.value.kind == "reboot_refused"
            assert fail_with[0] in refused.value.message
            assert fake.reboots == []
            [event] = [e for e in logs if e["event"] == "reboot_refused"]
            assert (event["reason"], event["error"]) == ("logind_error", fail_with[0])

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_access_denied_without_an_inhibitor_is_not_blamed_on_one(bus: PrivateBus) -> None:
    denied = (fake_logind.ACCESS_DENIED, "polkit says no")

    async def body() -> None:
        async with logind(bus.address, fail_with=denied) as (fake, rebooter):
            with capture_logs() as logs, pytest.raises(RefusedError) as refused:
                await rebooter.reboot()
            assert "inhibitor" not in refused.value.message
            assert fake.reboots == []
            [event] = [e for e in logs if e["event"] == "reboot_refused"]
            assert event["reason"] == "logind_error"

    run(body())


class SlowLogind(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(fake_logind.MANAGER_INTERFACE)

    @dbus_method(name="RebootWithFlags")
    @signature("", flags="t")
    async def reboot_with_flags(self, flags: int) -> None:
        await asyncio.sleep(30)


@pytest.mark.root  # the bus lets only root own names
def test_a_logind_that_does_not_answer_refuses(bus: PrivateBus) -> None:
    async def body() -> None:
        server, client = await connect(bus.address), await connect(bus.address)
        try:
            server.export(fake_logind.OBJECT_PATH, SlowLogind())
            await server.request_name(fake_logind.BUS_NAME)
            with capture_logs() as logs, pytest.raises(RefusedError, match="did not answer"):
                await LogindRebooter(client, timeout_s=0.2).reboot()
            assert [(e["event"], e["reason"]) for e in logs] == [
                ("reboot_refused", "logind_timeout")
            ]
        finally:
            client.disconnect()
            server.disconnect()

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_no_logind_refuses(bus: PrivateBus) -> None:
    async def body() -> None:
        client = await connect(bus.address)
        try:
            with pytest.raises(RefusedError) as refused:
                await LogindRebooter(client).reboot()
            assert "ServiceUnknown" in refused.value.message
        finally:
            client.disconnect()

    run(body())


@pytest.mark.root  # the bus lets only root own names
def test_fake_logind_as_a_subprocess(bus: PrivateBus, tmp_path: Path) -> None:
    record = tmp_path / "logind.jsonl"

    async def body(fake: FakeLogindProcess) -> None:
        client = await connect(bus.address)
        try:
            rebooter = LogindRebooter(client)
            await rebooter.reboot()
            handle = await fake_logind.add_inhibitor(bus.address, who="etcd", why="compacting")
            with pytest.raises(RefusedError, match="etcd: compacting"):
                await rebooter.reboot()
            await fake_logind.remove_inhibitor(bus.address, handle)
            await rebooter.reboot()
        finally:
            client.disconnect()

    with FakeLogindProcess(bus.address, record) as fake:
        run(body(fake))
        calls = fake.calls()
        assert [(c["method"], c["args"], c["outcome"]) for c in calls] == [
            ("RebootWithFlags", [1], "rebooted"),
            ("RebootWithFlags", [1], "refused"),
            ("ListInhibitors", [], "listed"),
            ("RebootWithFlags", [1], "rebooted"),
        ]
        assert calls[1]["error"] == fake_logind.BLOCKED_BY_INHIBITOR_LOCK
        assert all(isinstance(c["time"], float) for c in calls)
        assert len(fake.reboots()) == 2


@pytest.mark.root  # the bus lets only root own names
def test_fake_logind_subprocess_options(bus: PrivateBus, tmp_path: Path) -> None:
    record = tmp_path / "logind.jsonl"

    async def body() -> None:
        client = await connect(bus.address)
        try:
            with pytest.raises(RefusedError):
                await LogindRebooter(client).reboot()
        finally:
            client.disconnect()

    with FakeLogindProcess(bus.address, record, flavour="no_flags", inhibit=["shutdown"]) as fake:
        run(body())
        assert [c["method"] for c in fake.calls()] == ["ListInhibitors"]
    assert fake.reboots() == []


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        ([[]], []),
        (
            [[("shutdown", "w", "y", "block", 0, 7)]],
            [Inhibitor("shutdown", "w", "y", "block", 0, 7)],
        ),
        (
            [[["sleep", "w", "y", "delay", 1000, 8]]],
            [Inhibitor("sleep", "w", "y", "delay", 1000, 8)],
        ),
        ([], None),
        ([[("shutdown", "w", "y", "block", 0)]], None),
        ([[("shutdown", "w", "y", "block", "0", 7)]], None),
        ("a(ssssuu)", None),
    ],
)
def test_parse_inhibitors(body: Any, parsed: list[Inhibitor] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError, match="ListInhibitors"):
            parse_inhibitors(body)
    else:
        assert parse_inhibitors(body) == parsed


@pytest.mark.parametrize(
    ("what", "mode", "blocks"),
    [
        ("shutdown", "block", True),
        ("sleep:shutdown", "block-weak", True),
        ("shutdown", "delay", False),
        ("sleep", "block", False),
        ("handle-power-key", "block", False),
    ],
)
def test_which_inhibitors_block_a_reboot(what: str, mode: str, blocks: bool) -> None:
    assert Inhibitor(what, "who", "why", mode, 0, 1).blocks_shutdown is blocks
