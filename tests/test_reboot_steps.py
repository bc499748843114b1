"""Two promises of the reboot path, on real etcd and real hook executables:

- the pre-reboot hooks run in name order, each held to its timeout; a failing
  (or hanging) one gives the group's slot back, and the attempt is made again
  later, when the hooks pass and the host reboots;
- after a healthy boot the slot is released, and that release is retried until
  it succeeds: etcd frozen (SIGSTOP, it holds its sockets and answers nothing)
  across the blessing, then thawed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devtools.diskimage import cgpt_flags
from devtools.etcd import EtcdNode
from devtools.host import Host
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.etcdlock import EtcdLock
from policies.strategy import LockStrategy
from tests.conftest import NotifySocket, Repo, until
from tests.test_agent import FAST, Harness, running
from updater.clock import SystemClock
from updater.health import HealthChecker

TIMING = replace(FAST, reboot_retry_s=0.1, retry_base_s=6.0, retry_cap_s=0.5)


@pytest.fixture
def own_etcd() -> Iterator[EtcdNode]:
    """An etcd of this test's own: it is frozen, which must not reach other tests."""
    with EtcdNode() as node:
        yield node


def lock_of(etcd: EtcdNode, group: str, timeout_s: float = 5.0) -> EtcdLock:
    return EtcdLock(
        EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=timeout_s)), group, 1
    )


def holders(etcd: EtcdNode, group: str) -> list[str]:
    st = lock_of(etcd, group).status()
    return [] if st is None else [h.id for h in st.holders]


def events(logs: list[Any], name: str) -> list[Any]:
    return [e for e in logs if e["event"] == name]


HOOK = """#!/bin/sh
echo {name} >> {log}
if [ -e {broken} ]; then
{failure}
fi
exit 0
"""


def test_pre_reboot_hooks_in_order_with_their_timeout_a_failure_gives_the_slot_back(
    etcd: EtcdNode,
    group: str,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
    tmp_path: Path,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    hooks, ran, broken = tmp_path / "pre-reboot.d", tmp_path / "ran", tmp_path / "broken"
    hooks.mkdir()
    pids = tmp_path / "pids"
    failures = {
        "10-drain": "true",
        "20-notify": "  echo 'the service did not drain' >&2; exit 1",  # fails
        "30-wait": f"  echo $$ >> {pids}; exec sleep 30",  # outlives its timeout
    }
    for name, failure in failures.items():
        (hooks / name).write_text(HOOK.format(name=name, log=ran, broken=broken, failure=failure))
        (hooks / name).chmod(0o755)
    (hooks / "15-not-executable").write_text("#!/bin/sh\nexit 1\n")  # skipped, not run
    broken.touch()

    strategy = LockStrategy(lock_of(etcd, group), "host-a", clock=SystemClock())
    checker = HealthChecker(hooks, 1.0, event="pre_reboot_hook")
    h = Harness(host, notify, strategy, timing=TIMING, pre_reboot=checker)

    async def scenario(logs: list[Any]) -> None:
        async with running(h):
            await until(lambda: bool(events(logs, "pre_reboot_hooks_failed")), timeout=60)
            # the hooks ran in name order, the slot taken for them went back
            assert ran.read_text().split() == ["10-drain", "20-notify", "30-wait"]
            await until(lambda: bool(events(logs, "reboot_lock_given_back")))
            assert holders(etcd, group) == []
            assert h.rebooter.calls == []
            # the hanging hook was killed at its timeout, not left behind
            pid = int(pids.read_text().split()[0])
            await until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid))
            broken.unlink()  # fixed: the next attempt passes and reboots, holding the slot
            await until(lambda: bool(h.rebooter.calls), timeout=60)
            assert holders(etcd, group) == ["host-a"]

    with capture_logs() as logs:
        asyncio.run(scenario(logs))
    assert ran.read_text().split()[-3:] == ["10-drain", "20-notify", "30-wait"]
    failed = events(logs, "pre_reboot_hooks_failed")[0]
    assert failed["failed"] == ["20-notify", "30-wait"]
    timeouts = events(logs, "pre_reboot_hook_timeout")
    assert [e.get("check", e.get("name")) for e in timeouts][:1] == ["30-wait"]
    assert events(logs, "reboot_lock_given_back")[0]["reason"] == "pre_reboot_failed"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_the_release_after_a_healthy_boot_is_retried_until_etcd_answers(
    own_etcd: EtcdNode,
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    notify: NotifySocket,
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    group = "steady"

    def harness() -> Harness:
        lock = lock_of(own_etcd, group, timeout_s=0.5)
        return Harness(
            host, notify, LockStrategy(lock, "host-a", clock=SystemClock()), timing=TIMING
        )

    first = harness()

    async def stage_and_reboot() -> None:
        async with running(first):
            await until(lambda: bool(first.rebooter.calls))

    asyncio.run(stage_and_reboot())
    assert holders(own_etcd, group) == ["host-a"]
    assert host.reboot() == "USR-B"  # the trial boot of 1.1.0

    second = harness()

    async def healthy_boot(logs: list[Any]) -> None:
        async with running(second):
            own_etcd.freeze(0)
            try:
                await second.agent.mark_good()  # blessed: etcd is not needed for that
                assert cgpt_flags(host.disk, 2).successful
                await until(lambda: len(events(logs, "report_steady_failed")) >= 3)
                assert events(logs, "reported_steady") == []
            finally:
                own_etcd.thaw(0)
            await until(lambda: bool(events(logs, "reported_steady")), timeout=30)

    with capture_logs() as logs:
        asyncio.run(healthy_boot(logs))
    assert holders(own_etcd, group) == []  # released, once etcd answered
    failed = events(logs, "report_steady_failed")
    assert {e["error_kind"] for e in failed} == {"unavailable"}
    delays = [e["retry_in_s"] for e in failed]
    assert delays == sorted(delays) and delays[-1] <= TIMING.retry_cap_s  # backing off
