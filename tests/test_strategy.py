"""Strategies, table-tested with a lock that records its traffic."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policies.identity import app_specific_id
from policies.rebootlock import FailureReport, NoLock, check_group
from policies.strategy import STRATEGIES, Immediate, LockStrategy, Off, RebootStrategy, Windowed
from updater.errors import LockError
from updater.run import run

T = datetime(2026, 11, 28, 4, 30, tzinfo=UTC)


class Clock:
    def __init__(self, times: list[datetime]) -> None:
        self.times = times

    def now(self) -> datetime:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]

    def monotonic(self) -> float:
        return 0.0


class Windows:
    def __init__(self, open_at: set[datetime]) -> None:
        self.open_at = open_at

    def is_open(self, now: datetime) -> bool:
        return now in self.open_at


class Lock:
    name = "test"

    def __init__(self, grant: bool = True, fail: bool = False) -> None:
        self.grant, self.fail = grant, fail
        self.calls: list[str] = []

    def acquire(self, holder: str, *, version: str | None = None) -> bool:
        self.calls.append(f"acquire {holder}" + ("" if version is None else f" {version}"))
        if self.fail:
            raise LockError("unavailable", "etcd is down")
        return self.grant

    def release(self, holder: str, *, failed: FailureReport | None = None) -> bool:
        self.calls.append(f"release {holder}" + ("" if failed is None else f" {failed}"))
        return failed is not None


def test_simple_strategies() -> None:
    table: list[tuple[RebootStrategy, bool]] = [(Immediate(), True), (Off(), False)]
    for strategy, allowed in table:
        assert strategy.can_finalize() is allowed
        strategy.report_steady()
        assert STRATEGIES[strategy.name] is type(strategy)


@pytest.mark.parametrize(
    ("open_at", "grant", "allowed", "calls"),
    [
        (None, True, True, ["acquire h"]),
        (None, False, False, ["acquire h"]),
        ({T}, True, True, ["acquire h"]),  # open before and after the lock
        (set(), True, False, []),  # closed: the lock is not even asked
        ({T}, False, False, ["acquire h"]),
    ],
)
def test_lock_strategy(
    open_at: set[datetime] | None, grant: bool, allowed: bool, calls: list[str]
) -> None:
    lock = Lock(grant)
    windows = None if open_at is None else Windows(open_at)
    s = LockStrategy(lock, "h", Clock([T, T]), windows)
    assert s.can_finalize() is allowed
    assert lock.calls == calls


def test_window_closes_while_waiting_for_the_lock() -> None:
    lock = Lock()
    later = datetime(2026, 11, 28, 5, 30, tzinfo=UTC)
    s = LockStrategy(lock, "h", Clock([T, later]), Windows({T}))
    assert s.can_finalize() is False
    assert lock.calls == ["acquire h", "release h"]  # the slot is given back


def test_lock_errors_propagate_never_grant() -> None:
    s = LockStrategy(Lock(fail=True), "h", Clock([T]))
    with pytest.raises(LockError):
        s.can_finalize()


def test_report_steady_releases() -> None:
    lock = Lock()
    LockStrategy(lock, "h", Clock([T])).report_steady()
    assert lock.calls == ["release h"]


def test_windowed() -> None:
    assert Windowed(Immediate(), Windows({T}), Clock([T])).can_finalize() is True
    assert Windowed(Immediate(), Windows(set()), Clock([T])).can_finalize() is False
    assert Windowed(Off(), Windows({T}), Clock([T])).can_finalize() is False


def test_no_lock_and_groups() -> None:
    assert NoLock().acquire("x") is True
    assert check_group("workers.eu-1") == "workers.eu-1"
    for bad in ("", "a b", "a/b", "ä"):
        with pytest.raises(LockError):
            check_group(bad)


@pytest.mark.skipif(not Path("/etc/machine-id").exists(), reason="no machine id here")
def test_app_specific_id_matches_systemd() -> None:
    """Our holder id is what sd_id128_get_machine_app_specific() gives (systemd-id128)."""
    machine = Path("/etc/machine-id").read_text().strip()
    ours = app_specific_id(machine)
    theirs = run(
        ["systemd-id128", "machine-id", "--app-specific=3c1f8a7e5d2b4b8e9f610a7c2e4d9b13"]
    ).text.strip()
    assert ours == theirs
    assert ours != machine


def test_lock_answers_are_observed_and_an_observer_failure_changes_nothing() -> None:
    seen: list[bool] = []
    lock = Lock(grant=False)
    s = LockStrategy(lock, "h", Clock([T]), observe=seen.append)
    assert s.can_finalize() is False
    lock.grant = True
    assert s.can_finalize() is True
    assert seen == [False, True]

    def broken(granted: bool) -> None:
        raise LockError("unavailable", "etcd went away between the two reads")

    assert LockStrategy(Lock(grant=True), "h", Clock([T]), observe=broken).can_finalize()
    assert LockStrategy(Lock(grant=False), "h", Clock([T]), observe=broken).can_finalize() is False
