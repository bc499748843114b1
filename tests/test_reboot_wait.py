"""A staged reboot waits: for logged-in users (logind's sessions) and for logind
refusing (an inhibitor), each bounded by ``release_after_s``, which gives the
group's slot back in real etcd while the host keeps waiting. The sessions come
from a fake logind implementing logind's interface on a private dbus-daemon."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from devtools import fake_logind
from devtools.dbusdaemon import PrivateBus
from devtools.etcd import EtcdNode
from devtools.fake_logind import FakeLogind, FakeLogindProcess
from devtools.host import Host
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.strategy import LockStrategy
from tests.conftest import NotifySocket, Repo, reboot_now_when_free, until, updatectl
from tests.dbus_support import POLICY, connect
from tests.test_agent import FAST, Harness, RecordingRebooter, running, saved_machine
from updater import compose, config, dbus_api
from updater.agent import status_text
from updater.clock import SystemClock
from updater.errors import ExitCode, RefusedError
from updater.metrics import Metrics
from updater.rebooter import LogindRebooter
from updater.sdnotify import Notifier
from updater.sessions import (
    LogindSessions,
    Session,
    is_interactive,
    parse_session,
    parse_session_list,
)

needs_bus = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")

# ---- the decision (pure) ----------------------------------------------------------------------


def s(**kw: Any) -> Session:
    return replace(Session("1", "alice", 1000), **kw)


@pytest.mark.parametrize(
    ("session", "waits"),
    [
        (s(seat="seat0", tty="tty1"), True),  # a console login
        (s(tty="ttyS0"), True),  # the serial console (no seat)
        (s(tty="pts/0", remote=True, remote_host="10.0.0.5"), True),  # ssh with a terminal
        (s(seat="seat0"), True),  # a graphical login
        (s(session_class="user-early", tty="tty2"), True),
        (s(remote=True, remote_host="10.0.0.5"), False),  # `ssh host cmd`: no terminal
        (s(session_class="background"), False),  # cron
        (s(session_class="background", tty="pts/3"), False),
        (s(session_class="manager"), False),  # user@.service
        (s(session_class="greeter", seat="seat0"), False),  # the login screen
        (s(tty="pts/0", state="closing"), False),  # logged out, a process lingers
        (s(tty="pts/0", state="online"), True),
    ],
)
def test_which_sessions_a_reboot_waits_for(session: Session, waits: bool) -> None:
    assert is_interactive(session) is waits


PATH3 = "/org/freedesktop/login1/session/_33"


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        ([[]], []),
        (
            [[["3", 1000, "alice", "", "/org/freedesktop/login1/session/_33"]]],
            [("3", "/org/freedesktop/login1/session/_33")],
        ),
        ([], None),
        ("x", None),
        ([[["3", 1000, "alice", ""]]], None),  # four fields
        ([[["3", "1000", "alice", "", "/p"]]], None),  # uid a string
        ([[[3, 1000, "alice", "", "/p"]]], None),
    ],
)
def test_parse_session_list(body: Any, parsed: list[tuple[str, str]] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError, match="susso"):
            parse_session_list(body)
    else:
        assert parse_session_list(body) == parsed


def test_parse_session_properties() -> None:
    props = {
        "Id": Variant("s", "7"),
        "Name": Variant("s", "bob"),
        "User": Variant("(uo)", [1001, "/org/freedesktop/login1/user/_1001"]),
        "Seat": Variant("(so)", ["", "/"]),
        "TTY": Variant("s", "pts/1"),
        "Remote": Variant("b", True),
        "RemoteHost": Variant("s", "192.0.2.9"),
        "Class": Variant("s", "user"),
        "State": Variant("s", "active"),
        "Type": Variant("s", "tty"),
    }
    got = parse_session("7", props)
    assert got == Session("7", "bob", 1001, "", "pts/1", True, "192.0.2.9", "user", "active")
    assert got.describe() == "bob on pts/1 from 192.0.2.9"
    with pytest.raises(ValueError, match="Remote"):
        parse_session("7", {**props, "Remote": Variant("s", "yes")})
    with pytest.raises(ValueError, match=r"a\{sv\}"):
        parse_session("7", ["not", "a", "dict"])


# ---- logind on a bus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus(policy_files=(POLICY,)) as b:
        yield b


@needs_bus
@pytest.mark.root  # the bus lets only root own names
def test_logind_sessions_read_over_the_bus(bus: PrivateBus) -> None:
    async def go() -> None:
        server, client = await connect(bus.address), await connect(bus.address)
        fake = FakeLogind()
        fake.add_session("root", 0, seat="seat0", tty="tty1")  # exported on start
        try:
            await fake.start(server)
            cron = fake.add_session("root", 0, tty="", session_class="background")
            ssh = fake.add_session("alice", 1000, tty="pts/0", remote=True, remote_host="::1")
            users = LogindSessions(client)
            assert {x.id for x in await users.sessions()} == {"1", cron, ssh}
            waited = await users.interactive()
            assert [x.describe() for x in waited] == ["root on tty1", "alice on pts/0 from ::1"]
            fake.remove_session("1")
            fake.remove_session(ssh)
            assert await users.interactive() == []
        finally:
            await fake.stop()
            client.disconnect()
            server.disconnect()

    asyncio.run(go())


@needs_bus
def test_no_logind_means_unknown_users_and_the_reboot_waits(bus: PrivateBus) -> None:
    async def go() -> None:
        client = await connect(bus.address)
        try:
            with pytest.raises(RefusedError) as info:
                await LogindSessions(client, timeout_s=5).interactive()
            assert info.value.kind == "reboot_refused"
            assert "cannot tell who is logged in" in info.value.message
        finally:
            client.disconnect()

    asyncio.run(go())


@needs_bus
@pytest.mark.root
def test_fake_logind_sessions_driven_from_another_process(bus: PrivateBus, tmp_path: Path) -> None:
    async def go() -> None:
        client = await connect(bus.address)
        try:
            users = LogindSessions(client)
            sid = await fake_logind.add_session(bus.address, "carol", 1002, tty="ttyS0")
            assert [x.describe() for x in await users.interactive()] == ["carol on ttyS0"]
            await fake_logind.remove_session(bus.address, sid)
            assert await users.interactive() == []
        finally:
            client.disconnect()

    with FakeLogindProcess(bus.address, tmp_path / "logind.jsonl") as proc:
        asyncio.run(go())
        assert [c["method"] for c in proc.calls()] == ["ListSessions", "ListSessions"]


# ---- the agent waits --------------------------------------------------------------------------


def holders(etcd: EtcdNode, group: str) -> list[str]:
    st = EtcdLock(EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,))), group, 1).status()
    return [] if st is None else [h.id for h in st.holders]


def lock_harness(
    host: Host, notify: NotifySocket, etcd: EtcdNode, group: str, metrics: Metrics
) -> Harness:
    lock = EtcdLock(EtcdClient(EtcdSettings(endpoints=(etcd.endpoint,))), group, 1)
    strategy = LockStrategy(lock, "host-a", clock=SystemClock())
    timing = replace(FAST, release_after_s=1.5, reboot_retry_s=0.1, retry_cap_s=0.2)
    return Harness(host, notify, strategy, timing=timing, metrics=metrics)


@needs_bus
@pytest.mark.root
def test_the_reboot_waits_for_a_logged_in_user_and_gives_the_slot_back(
    monkeypatch: pytest.MonkeyPatch,
    bus: PrivateBus,
    etcd: EtcdNode,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    metrics = Metrics()
    h = lock_harness(host, notify, etcd, group, metrics)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)  # for `updatectl status`

    def gauge() -> float | None:
        text = metrics.render().decode()
        for line in text.splitlines():
            if line.startswith("updater_reboot_waiting_for_users "):
                return float(line.split()[1])
        return None

    async def scenario(logs: list[Any]) -> None:
        server, client = await connect(bus.address), await connect(bus.address)
        fake = FakeLogind()
        await fake.start(server)
        fake.add_session("root", 0, tty="", session_class="background")  # cron: not waited for
        ssh = fake.add_session("alice", 1000, tty="pts/0", remote=True, remote_host="10.0.0.5")
        h.agent.reboots.users = LogindSessions(client)
        agent_bus = await connect(bus.address)
        service = await dbus_api.serve(h.agent, agent_bus, coreos_compat=False)
        try:
            async with running(h):
                await until(lambda: h.agent.machine.last_error is not None)
                m = h.agent.machine
                assert m.staged == "1.1.0" and m.last_error is not None
                assert m.last_error.kind == "users_logged_in"
                assert "alice on pts/0 from 10.0.0.5" in m.last_error.message
                waited = "(the last attempt waited for logged-in users)"
                assert status_text(h.agent.status()).endswith(waited)
                assert gauge() == 1.0
                # status, as an admin reads it
                assert saved_machine(host)["last_error"]["kind"] == "users_logged_in"
                # waiting longer than release_after_s: the slot goes back, the wait goes on
                await until(lambda: "reboot_lock_given_back" in [e["event"] for e in logs])
                await until(lambda: holders(etcd, group) == [])
                assert h.rebooter.calls == []
                # what an admin sees: `updatectl status`, from the agent over D-Bus
                # (updatectl configures logging: the captured log ends here)
                shown = await asyncio.to_thread(updatectl, host, "status")
                assert shown.code == 0, shown.err
                assert waited in shown.out
                assert "Last error:     users_logged_in: the reboot waits for 1" in shown.out
                assert "alice on pts/0 from 10.0.0.5" in shown.out
                fake.remove_session(ssh)  # alice logs out: the host takes the slot, reboots
                await until(lambda: bool(h.rebooter.calls))
                assert holders(etcd, group) == ["host-a"]
                assert gauge() == 0.0
        finally:
            await service.close()
            agent_bus.disconnect()
            await fake.stop()
            client.disconnect()
            server.disconnect()

    with capture_logs() as logs:
        asyncio.run(scenario(logs))
    waits = [e for e in logs if e["event"] == "reboot_waits_for_users"]
    assert waits and waits[0]["sessions"] == ["alice on pts/0 from 10.0.0.5"]
    given = [e for e in logs if e["event"] == "reboot_lock_given_back"]
    assert given[0]["reason"] == "reboot_refused_too_long"


@needs_bus
@pytest.mark.root
def test_a_forced_reboot_does_not_wait_for_users(
    bus: PrivateBus, host: Host, repo: Repo, usr_images: dict[str, Path], notify: NotifySocket
) -> None:
    """`updatectl reboot --force` from an admin's own ssh session must not wait for it."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    host.config.write_text(host.config.read_text() + '\n[reboot]\nstrategy = "off"\n')
    cfg = config.load(host.config)

    async def scenario() -> None:
        server, client = await connect(bus.address), await connect(bus.address)
        fake = FakeLogind()
        await fake.start(server)
        fake.add_session("admin", 0, tty="pts/0", remote=True, remote_host="10.0.0.1")
        h = Harness(host, notify, compose.reboot_strategy(cfg, SystemClock()))
        h.agent.reboots.users = LogindSessions(client)
        try:
            async with running(h):
                await until(lambda: h.agent.machine.staged == "1.1.0")
                await reboot_now_when_free(h.agent)
                assert len(h.rebooter.calls) == 1
        finally:
            await fake.stop()
            client.disconnect()
            server.disconnect()

    asyncio.run(scenario())


@needs_bus
@pytest.mark.root
def test_logind_refusing_for_release_after_s_gives_the_slot_back(
    bus: PrivateBus,
    etcd: EtcdNode,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    """The promise of ``release_after_s``: logind keeps refusing (a shutdown inhibitor);
    the slot goes back to the group, and is taken again once the inhibitor is gone."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    h = lock_harness(host, notify, etcd, group, Metrics())

    async def scenario(logs: list[Any]) -> None:
        server, client = await connect(bus.address), await connect(bus.address)
        fake = FakeLogind()
        await fake.start(server)
        inhibitor = fake.add_inhibitor(who="backup", why="nightly backup")
        h.agent.reboots.rebooter = LogindRebooter(client)
        try:
            async with running(h):
                await until(lambda: any(c.outcome == "refused" for c in fake.calls))
                assert holders(etcd, group) == ["host-a"]  # held while logind refuses ...
                await until(lambda: "reboot_lock_given_back" in [e["event"] for e in logs])
                await until(lambda: holders(etcd, group) == [])  # ... until release_after_s
                m = h.agent.machine
                assert m.staged == "1.1.0" and m.last_error is not None
                assert m.last_error.kind == "reboot_refused"
                assert "backup" in m.last_error.message
                fake.remove_inhibitor(inhibitor)
                await until(lambda: bool(fake.reboots))
                assert holders(etcd, group) == ["host-a"]
        finally:
            await fake.stop()
            client.disconnect()
            server.disconnect()

    with capture_logs() as logs:
        asyncio.run(scenario(logs))
    given = [e for e in logs if e["event"] == "reboot_lock_given_back"]
    assert given and given[0]["reason"] == "reboot_refused_too_long"


# ---- the config and the composition root -------------------------------------------------------


def test_wait_for_users_is_on_by_default_and_can_be_turned_off(host: Host, tmp_path: Path) -> None:
    on = config.load(host.config)
    assert on.reboot.wait_for_users is True
    host.config.write_text(host.config.read_text() + "\n[reboot]\nwait_for_users = false\n")
    off = config.load(host.config)
    assert off.reboot.wait_for_users is False

    class Nobody:
        async def interactive(self) -> list[Session]:
            return []

    up, metrics, quiet = compose.updater(on), Metrics(), Notifier(env={})
    agent_on = compose.build_agent(on, up, RecordingRebooter(), metrics, quiet, users=Nobody())
    agent_off = compose.build_agent(off, up, RecordingRebooter(), metrics, quiet, users=Nobody())
    assert agent_on.reboots.users is not None
    assert agent_off.reboots.users is None
    bad = tmp_path / "bad.toml"
    bad.write_text(
        host.config.read_text().replace("wait_for_users = false", 'wait_for_users = "yes"')
    )
    result = updatectl(None, "--config", str(bad), "status")
    assert result.code == ExitCode.CONFIG, result
    assert "wait_for_users" in result.err and str(bad) in result.err


# ---- logind's replies are outside input ---------------------------------------------------------

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.builds(Variant, st.just("s"), st.text(max_size=8)),
)
_values = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner), max_leaves=24
)
_props = st.dictionaries(
    st.sampled_from(
        ["Id", "Name", "User", "Seat", "TTY", "Remote", "RemoteHost", "Class", "State"]
    ),
    _values,
    max_size=9,
)


@pytest.mark.fuzz
@given(_values)
def test_fuzz_session_list(body: Any) -> None:
    """Whatever ListSessions answers: its pairs, or ValueError (a refusal, never a crash)."""
    try:
        pairs = parse_session_list(body)
    except ValueError:
        return
    assert all(isinstance(sid, str) and isinstance(path, str) for sid, path in pairs)


@pytest.mark.fuzz
@given(st.one_of(_props, _values))
def test_fuzz_session_properties(props: Any) -> None:
    try:
        session = parse_session("1", props)
    except ValueError:
        return
    assert isinstance(is_interactive(session), bool)
    assert isinstance(session.describe(), str)
