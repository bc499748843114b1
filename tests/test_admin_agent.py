"""The admin's levers with the real agent running (`updatectl agent` in a subprocess,
on a private dbus-daemon, a fake logind recording reboots, real etcd where the lock
is involved), all through the real `updatectl`: reboot through the policy (waiting
for the window and the lock) or forced, hold/unhold and skip as the running agent
sees them (D-Bus, metrics, the fleet record, across a restart), and a channel
move the agent takes at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devtools.dbusdaemon import PrivateBus
from devtools.etcd import EtcdNode
from devtools.fake_logind import FakeLogindProcess
from devtools.host import Host
from tests.conftest import CliResult, NotifySocket, Repo, wait_for
from tests.dbus_support import POLICY
from tests.test_daemon import Daemon, dbus_call, scrape
from updater import cli, dbus_api
from updater.agentapi import AgentStatus
from updater.dbus_api import BUS_NAME, INTERFACE, OBJECT_PATH, read_status
from updater.errors import ConfigError

pytestmark = pytest.mark.root  # only root may own the agent's bus name (our policy)

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class World:
    def __init__(self, host: Host, bus: PrivateBus, logind: FakeLogindProcess, tmp: Path) -> None:
        self.host = host
        self.bus = bus
        self.logind = logind
        self.tmp = tmp
        self.notify = NotifySocket(tmp / "notify.sock")
        self.metrics = tmp / "metrics.sock"
        self.conf = host.root / "config.d"
        self.conf.mkdir()
        self.daemons: list[Daemon] = []

    def configure(self, extra: str) -> None:
        base = self.host.config.read_text().replace(
            "[agent]\n", "[agent]\nfirst_check_delay_s = 0.2\nretry_base_s = 1\n"
        )
        (self.conf / "50-host.toml").write_text(
            base + f'\n[metrics]\nlisten = "unix:{self.metrics}"\n' + extra
        )

    def start(self) -> Daemon:
        d = Daemon(
            replace(self.host, config=self.conf),
            self.bus,
            self.notify.path,
            self.tmp / f"agent-{len(self.daemons)}.log",
        )
        self.daemons.append(d)
        return d

    def ctl(self, *args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.suppress(SystemExit):
            code = cli.main(["--config", str(self.conf), *args], out=out, err=err)
            return CliResult(code, out.getvalue(), err.getvalue())
        return CliResult(2, out.getvalue(), err.getvalue())

    def status(self) -> AgentStatus:
        st = self.agent()
        assert st is not None, "no agent answers"
        return st

    def agent(self) -> AgentStatus | None:
        """The agent's D-Bus properties; None until it answers."""
        return asyncio.run(read_status(self.bus.address))

    def answers(self, **wanted: Any) -> bool:
        st = self.agent()
        return st is not None and all(getattr(st, k) == v for k, v in wanted.items())

    def check_now(self) -> None:
        asyncio.run(dbus_call(self.bus.address, BUS_NAME, OBJECT_PATH, INTERFACE, "CheckNow"))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for d in self.daemons for e in d.events() if e["event"] == name]


@pytest.fixture
def world(tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with (
        PrivateBus(policy_files=(POLICY,)) as bus,
        FakeLogindProcess(bus.address, tmp_path / "logind.jsonl") as logind,
    ):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        w = World(host, bus, logind, tmp_path)
        try:
            yield w
        finally:
            for d in w.daemons:
                d.kill()
            w.notify.close()


def staged(w: World, version: str) -> None:
    wait_for(lambda: w.answers(staged_version=version), what=f"{version} staged")


def closed_window() -> str:
    """A one-hour window three days from today: closed now."""
    day = DAY_NAMES[(datetime.now(UTC).weekday() + 3) % 7]
    return f'[[reboot.window]]\ndays = ["{day}"]\nstart_time = "00:00"\nlength_minutes = 60\n'


# ---- reboot -----------------------------------------------------------------------------------


def test_reboot_waits_for_the_window_and_force_does_not(
    world: World, repo: Repo, usr_images: dict[str, Path]
) -> None:
    w = world
    w.configure(f'\n[reboot]\nstrategy = "off"\nretry_s = 1\n{closed_window()}')
    w.start()
    wait_for(
        lambda: w.events("update_checked") != [] or w.events("update_failed") != [],
        what="the first check",
    )
    r = w.ctl("reboot", "--json")
    assert r.code == 7 and r.json()["error"]["kind"] == "nothing_staged"

    repo.publish("1.1.0", usr_images["1.1.0"])
    w.check_now()
    staged(w, "1.1.0")
    assert w.logind.reboots() == []  # `off`: never by itself

    r = w.ctl("reboot", "--json")
    assert r.code == 0, r.err
    assert r.json() == {"reboot": "waiting", "forced": False}
    # the agent keeps asking, through the window (off gives way to the request; the window not)
    wait_for(
        lambda: len([e for e in w.events("reboot_deferred") if e.get("requested")]) >= 3,
        what="the request asked again",
    )
    asked = [e for e in w.events("reboot_deferred") if e.get("requested")]
    assert {e["strategy"] for e in asked} == {"immediate+windows"}
    assert w.logind.reboots() == []
    assert "Reboot requested: waiting" in w.ctl("reboot").out

    for _ in range(100):  # asked while one of the agent's own attempts runs: ask again
        r = w.ctl("reboot", "--force", "--json")
        if "under way" not in r.out + r.err:
            break
        time.sleep(0.1)
    assert r.code == 0 and r.json() == {"reboot": "started", "forced": True}, r.out + r.err
    wait_for(lambda: len(w.logind.reboots()) == 1, what="the forced reboot")
    assert scrape(w.metrics)["updater_reboots_requested_total"] == 1


def test_reboot_on_request_under_off_with_no_window(
    world: World, repo: Repo, usr_images: dict[str, Path]
) -> None:
    w = world
    w.configure('\n[reboot]\nstrategy = "off"\nretry_s = 1\n')
    repo.publish("1.1.0", usr_images["1.1.0"])
    w.start()
    staged(w, "1.1.0")
    assert w.logind.reboots() == []
    r = w.ctl("reboot", "--json")
    assert r.code == 0 and r.json() == {"reboot": "started", "forced": False}
    assert len(w.logind.reboots()) == 1
    asked = [e for e in w.events("reboot_requested") if "asked" in e]
    assert [(e["asked"], e["forced"]) for e in asked] == [(True, False)]


def test_reboot_waits_for_the_lock_and_the_fleet_record_shows_the_hold(
    world: World, repo: Repo, usr_images: dict[str, Path], etcd: EtcdNode, group: str
) -> None:
    w = world
    w.configure(
        f'\n[reboot]\nstrategy = "lock"\nlock = "etcd"\ngroup = "{group}"\nretry_s = 1\n'
        f'\n[etcd]\nendpoints = ["{etcd.endpoint}"]\nslots = 1\n'
    )
    assert w.ctl("lock", "lock", "other-host", "--json").code == 0  # the one slot is taken
    repo.publish("1.1.0", usr_images["1.1.0"])
    w.start()
    staged(w, "1.1.0")

    r = w.ctl("reboot", "--json")
    assert r.code == 0 and r.json()["reboot"] == "waiting"
    wait_for(
        lambda: len([e for e in w.events("reboot_deferred") if e.get("requested")]) >= 2,
        what="the request waiting for the lock",
    )
    assert w.logind.reboots() == []

    # a hold now (installs only: the staged update still goes): the fleet sees it
    assert w.ctl("hold", "--json").json()["agent_reloaded"] is True
    wait_for(
        lambda: len(w.ctl("fleet", "status", "--json").json()["held"]) == 1,
        what="the fleet record held",
    )
    assert "Held by an admin (no installs):" in w.ctl("fleet", "status").out

    assert w.ctl("lock", "unlock", "other-host").code == 0
    wait_for(lambda: len(w.logind.reboots()) == 1, what="the reboot once the slot is free")
    holders = w.ctl("lock", "status", "--json").json()["holders"]
    assert len(holders) == 1 and holders[0]["id"] != "other-host"


# ---- hold and skip ----------------------------------------------------------------------------


def test_hold_and_skip_with_a_running_agent(
    world: World, repo: Repo, usr_images: dict[str, Path]
) -> None:
    w = world
    w.configure('\n[reboot]\nstrategy = "off"\n')
    repo.publish("1.0.0", usr_images["1.0.0"])  # nothing newer than the booted
    daemon = w.start()
    wait_for(lambda: w.events("update_checked") != [], what="the first check")
    wait_for(lambda: w.answers(state="IDLE"), what="the agent idle")
    r = w.ctl("hold", "--json")
    assert r.code == 0 and r.json()["agent_reloaded"] is True
    st = w.status()
    assert st.held and st.held_until == 0
    m = scrape(w.metrics)
    assert m["updater_held"] == 1 and m["updater_held_until_timestamp_seconds"] == 0
    wait_for(
        lambda: any(x.endswith("; held") for x in w.notify.assignments("STATUS")),
        what="STATUS= saying held",
    )

    repo.publish("1.1.0", usr_images["1.1.0"])
    w.check_now()
    wait_for(lambda: w.events("update_refused_by_host") != [], what="the refused update")
    assert w.events("update_refused_by_host")[-1]["error_kind"] == "held"
    assert not any("/images/" in q.path for q in repo.server.requests)
    doc = w.ctl("status", "--json").json()
    assert doc["agent"]["held"] is True and doc["host_policy"]["held"] is True
    assert doc["agent"]["state"] == "IDLE" and doc["agent"]["last_error_kind"] == ""

    # the hold survives a restart of the agent
    assert daemon.stop() < 5
    w.start()
    wait_for(lambda: w.answers(held=True), what="held after the restart")
    wait_for(lambda: len(w.events("update_refused_by_host")) >= 2, what="refused again")

    # skip 1.1.0, then unhold: still not installed, for the skip
    assert w.ctl("skip", "1.1.0", "--json").json()["agent_reloaded"] is True
    assert w.ctl("unhold", "--json").json()["agent_reloaded"] is True
    st = w.status()
    assert not st.held and st.skipped_versions == ("1.1.0",)
    m = scrape(w.metrics)
    assert m["updater_held"] == 0 and m["updater_version_skipped{version=1.1.0}"] == 1
    assert m["updater_held_until_timestamp_seconds"] == 0
    w.check_now()
    wait_for(
        lambda: w.events("update_refused_by_host")[-1]["error_kind"] == "skipped",
        what="refused for the skip",
    )
    assert not any("/images/" in q.path for q in repo.server.requests)

    assert w.ctl("unskip", "1.1.0").code == 0
    assert w.status().skipped_versions == ()
    w.check_now()
    staged(w, "1.1.0")


# ---- channel ----------------------------------------------------------------------------------


def test_the_running_agent_takes_a_channel_move_at_once(
    world: World, repo: Repo, usr_images: dict[str, Path]
) -> None:
    w = world
    w.configure('\n[reboot]\nstrategy = "off"\n')
    repo.publish("1.0.0", usr_images["1.0.0"])  # stable: nothing newer than the booted
    repo.publish("1.1.0", usr_images["1.1.0"], channel="beta")
    w.start()
    wait_for(lambda: w.events("update_checked") != [], what="the first check")
    assert w.status().staged_version == ""

    r = w.ctl("channel", "beta", "--json")
    assert r.code == 0, r.err
    assert r.json()["agent_reloaded"] is True
    staged(w, "1.1.0")  # checked at once, on beta
    assert any(e["channel"] == "beta" for e in w.events("config_applied"))
    agent_gets = [q.path for q in repo.server.requests if q.path.startswith("/beta/")]
    assert "/beta/release.json" in agent_gets

    # a bad configuration reaches the caller of Reload; the agent keeps the one it has
    (w.conf / "60-broken.toml").write_text('[source]\nretries = "many"\n')
    before = len(w.events("config_applied"))
    with pytest.raises(ConfigError) as caught:
        asyncio.run(dbus_api.call("Reload", w.bus.address))
    assert caught.value.kind == "invalid"
    assert w.events("dbus_method_failed")[-1]["kind"] == "invalid"
    assert w.answers(staged_version="1.1.0", state="UPDATED_NEED_REBOOT")
    (w.conf / "60-broken.toml").unlink()
    asyncio.run(dbus_api.call("Reload", w.bus.address))  # fixed: taken
    assert len(w.events("config_applied")) == before  # applied at the next check, none yet
