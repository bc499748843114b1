"""The admin's decisions for one host (updater.hostpolicy), table-tested, and the
machine's reboot request through the policy (updater.machine)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.fuzzing import fewer_examples, parse_or_typed_error
from tests.test_fuzz_json import anything, deep_documents, mutations
from updater.errors import RefusedError, StateError, UsageError
from updater.hostpolicy import (
    Downgrade,
    Hold,
    HostPolicy,
    below_floor,
    downgrade_allowed,
    from_json,
    install_refusal,
    parse_until,
    pin_matches,
    target_version_prefix,
    to_json,
    valid_pin,
)
from updater.hostpolicyfile import POLICY_FILE, HostPolicyStore
from updater.machine import (
    Finalize,
    Machine,
    Note,
    RebootRequested,
    Refuse,
    S,
    Staged,
    Tick,
    step,
)
from updater.metrics import Metrics

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
T = NOW.timestamp()

# ---- the pin ----------------------------------------------------------------------------------

PIN_CASES = [
    ("1.4.*", "1.4", True),
    ("1.4.*", "1.4.0", True),
    ("1.4.*", "1.4.17", True),
    ("1.4.*", "1.4~rc1", True),
    ("1.4.*", "1.4^1", True),
    ("1.4.*", "1.4-2", True),
    ("1.4.*", "1.40", False),
    ("1.4.*", "1.40.0", False),
    ("1.4.*", "1.5.0", False),
    ("1.4.*", "1.3.9", False),
    ("1.4.*", "11.4.0", False),
    ("1.4", "1.4.2", True),
    ("1.4", "1.41", False),
    ("1.4.2", "1.4.2", True),
    ("1.4.2", "1.4.20", False),
    ("1", "1.9.9", True),
    ("1", "2.0.0", False),
]


@pytest.mark.parametrize(("pin", "version", "matches"), PIN_CASES)
def test_pin_matches_a_line_at_component_boundaries(pin: str, version: str, matches: bool) -> None:
    assert pin_matches(pin, version) is matches


@pytest.mark.parametrize(
    ("pin", "valid"),
    [
        ("1.4.*", True),
        ("1.4", True),
        ("1", True),
        ("2026.12.*", True),
        ("*", False),
        ("1.*.*", False),
        ("1.4.", False),
        ("1.4.*.", False),
        (".4", False),
        ("1.4 ", False),
        ("1.4*", False),
        ("", False),
        ("1/4", False),
    ],
)
def test_valid_pins(pin: str, valid: bool) -> None:
    assert valid_pin(pin) is valid


@pytest.mark.parametrize(
    ("pin", "prefix"), [(None, ""), ("1.4.*", "1.4."), ("1.4", "1.4"), ("1.4.2", "1.4.2")]
)
def test_target_version_prefix_is_update_engines(pin: str | None, prefix: str) -> None:
    assert target_version_prefix(pin) == prefix


# ---- the install decision ---------------------------------------------------------------------

HELD = HostPolicy(hold=Hold(T - 60))
HELD_FOR_AN_HOUR = HostPolicy(hold=Hold(T - 60, until=T + 3600))
HOLD_OVER = HostPolicy(hold=Hold(T - 7200, until=T - 1))
SKIPS = HostPolicy(skipped=("1.1.0", "1.3.0"))

DECISIONS: list[tuple[str, HostPolicy, str | None, str, str | None]] = [
    ("nothing decided", HostPolicy(), None, "1.1.0", None),
    ("held until unhold", HELD, None, "1.1.0", "held"),
    ("held for an hour", HELD_FOR_AN_HOUR, None, "1.1.0", "held"),
    ("a hold that ended", HOLD_OVER, None, "1.1.0", None),
    ("skipped", SKIPS, None, "1.1.0", "skipped"),
    ("another skipped", SKIPS, None, "1.3.0", "skipped"),
    ("not skipped", SKIPS, None, "1.2.0", None),
    ("on the pinned line", HostPolicy(), "1.1.*", "1.1.4", None),
    ("off the pinned line", HostPolicy(), "1.1.*", "1.2.0", "pinned"),
    ("held wins over skipped", replace(SKIPS, hold=Hold(T)), None, "1.1.0", "held"),
    ("skipped wins over pinned", SKIPS, "1.2.*", "1.1.0", "skipped"),
    ("held and off the line", HELD, "1.2.*", "1.1.0", "held"),
    ("skipped but on the line", SKIPS, "1.1.*", "1.1.0", "skipped"),
]


@pytest.mark.parametrize(
    ("policy", "pin", "version", "kind"),
    [d[1:] for d in DECISIONS],
    ids=[d[0] for d in DECISIONS],
)
def test_install_refusal(
    policy: HostPolicy, pin: str | None, version: str, kind: str | None
) -> None:
    refused = install_refusal(version, policy, pin, T)
    if kind is None:
        assert refused is None
    else:
        assert isinstance(refused, RefusedError)
        assert refused.kind == kind and refused.hint
        assert version in refused.message


@pytest.mark.parametrize(
    ("policy", "held_until"),
    [
        (HostPolicy(), None),
        (HELD, 0.0),
        (HELD_FOR_AN_HOUR, T + 3600),
        (HOLD_OVER, None),
        (HostPolicy(hold=Hold(T - 1, until=T)), None),  # it ends at `until`
    ],
)
def test_held_until(policy: HostPolicy, held_until: float | None) -> None:
    assert policy.held_until(T) == held_until


@pytest.mark.parametrize(
    ("version", "booted", "highest", "floor"),
    [
        ("1.0.0", "1.1.0", "1.1.0", "1.1.0"),
        ("1.0.0", "1.0.0", "1.1.0", "1.1.0"),  # accepted 1.1.0 once (staged, rolled back)
        ("1.1.0", "1.0.0", "1.1.0", None),
        ("1.2.0", "1.1.0", "1.1.0", None),
        ("1.1.0", "1.1.0", None, None),  # the same version is no downgrade
        ("1.0.0", None, None, None),
        ("1.9", "1.10", None, "1.10"),  # by UAPI version order, not by string
        ("1.10", "1.9", None, None),
    ],
)
def test_below_floor(
    version: str, booted: str | None, highest: str | None, floor: str | None
) -> None:
    assert below_floor(version, booted, highest) == floor


DOWN = Downgrade("lts", "1.0.0", "1.1.0", T, 0)


@pytest.mark.parametrize(
    ("policy", "channel", "version", "allowed"),
    [
        (HostPolicy(downgrade=DOWN), "lts", "1.0.0", True),
        (HostPolicy(downgrade=DOWN), "lts", "0.9.0", False),  # only the version allowed
        (HostPolicy(downgrade=DOWN), "stable", "1.0.0", False),  # only on that channel
        (HostPolicy(), "lts", "1.0.0", False),
    ],
)
def test_downgrade_allowed_is_one_version_of_one_channel(
    policy: HostPolicy, channel: str, version: str, allowed: bool
) -> None:
    assert downgrade_allowed(policy, channel, version) is allowed


def test_skips_are_kept_once_and_bounded() -> None:
    p = HostPolicy().skip("1.1.0").skip("1.1.0").skip("1.2.0")
    assert p.skipped == ("1.1.0", "1.2.0")
    assert p.unskip("1.1.0").skipped == ("1.2.0",)
    many = HostPolicy()
    for i in range(100):
        many = many.skip(f"1.{i}")
    assert len(many.skipped) == 64 and many.skipped[-1] == "1.99"


# ---- hold times -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "until"),
    [
        ("90m", NOW + timedelta(minutes=90)),
        ("2h", NOW + timedelta(hours=2)),
        ("1d12h", NOW + timedelta(days=1, hours=12)),
        ("2w", NOW + timedelta(weeks=2)),
        ("30s", NOW + timedelta(seconds=30)),
        ("2026-12-24", datetime(2026, 12, 24, tzinfo=UTC)),
        ("2026-12-24T08:00Z", datetime(2026, 12, 24, 8, tzinfo=UTC)),
        ("2026-12-24 08:00", datetime(2026, 12, 24, 8, tzinfo=UTC)),  # no zone: UTC
        ("2026-12-24T08:00+02:00", datetime(2026, 12, 24, 6, tzinfo=UTC)),
    ],
)
def test_parse_until(text: str, until: datetime) -> None:
    assert parse_until(text, NOW) == until.timestamp()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soon",
        "2h30",
        "-2h",
        "0s",  # now is not the future
        "2026-12-06T11:00Z",  # the past
        "2026-12-06T12:00Z",  # now
        "2026-13-01",
        "9999999w",
        "2040-01-01",  # more than ten years
        "12h\n",
        "1e3s",
    ],
)
def test_parse_until_refuses(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_until(text, NOW)
    assert caught.value.kind == "bad_time" and caught.value.exit_code == 2


# ---- the file ---------------------------------------------------------------------------------

FULL = HostPolicy(hold=Hold(T, until=T + 60), skipped=("1.1.0",), downgrade=DOWN)


@pytest.mark.parametrize("policy", [HostPolicy(), HELD, FULL])
def test_json_round_trip(policy: HostPolicy) -> None:
    assert from_json(json.loads(json.dumps(to_json(policy)))) == policy


BAD_FILES: list[tuple[str, bytes]] = [
    ("not JSON", b"{"),
    ("not an object", b"[]"),
    ("no schema", b"{}"),
    ("a newer schema", b'{"schema": 2}'),
    ("schema a bool", b'{"schema": true}'),
    ("hold not an object", b'{"schema": 1, "hold": 5}'),
    ("hold without since", b'{"schema": 1, "hold": {}}'),
    ("until a string", b'{"schema": 1, "hold": {"since": 1, "until": "tomorrow"}}'),
    ("until NaN", b'{"schema": 1, "hold": {"since": 1, "until": NaN}}'),
    ("skipped not a list", b'{"schema": 1, "skipped": "1.1.0"}'),
    ("skipped not versions", b'{"schema": 1, "skipped": ["../x"]}'),
    ("downgrade without by", b'{"schema": 1, "downgrade": {"channel": "a", "version": "1"}}'),
    ("too large", b'{"schema": 1, "skipped": ["' + b"1" * 70000 + b'"]}'),
    ("deep", b"[" * 100 + b"]" * 100),
]


@pytest.mark.parametrize("data", [b for _, b in BAD_FILES], ids=[n for n, _ in BAD_FILES])
def test_an_unreadable_file_stops_installs_and_hold_rewrites_it(
    tmp_path: Path, data: bytes
) -> None:
    store = HostPolicyStore(tmp_path)
    store.path.write_bytes(data)
    with pytest.raises(StateError) as caught:
        store.load()
    assert caught.value.kind == "policy_corrupt" and caught.value.exit_code == 8
    with pytest.raises(StateError):  # skip keeps what it cannot read: no silent loss
        store.update(lambda p: p.skip("1.2.0"))
    assert store.path.read_bytes() == data
    held = store.update(lambda p: replace(p, hold=Hold(T)), replace_corrupt=True)
    assert store.load() == held == HostPolicy(hold=Hold(T))


def test_no_file_is_no_policy(tmp_path: Path) -> None:
    assert HostPolicyStore(tmp_path).load() == HostPolicy()


# ---- the reboot request, through the policy ---------------------------------------------------

STAGED = Machine(S.UPDATED_NEED_REBOOT, staged="1.1.0")
UNDER_WAY = replace(STAGED, finalizing=True)
WANTED = replace(STAGED, reboot_wanted=True)

REQUESTS: list[tuple[str, Machine, Any, tuple[object, ...], bool]] = [
    ("asked: an attempt through the policy", STAGED, RebootRequested(force=False),
     (Finalize(force=False, requested=True),), True),
    ("forced: past the policy", STAGED, RebootRequested(),
     (Finalize(force=True),), False),
    ("asked while one runs: remembered", UNDER_WAY, RebootRequested(force=False),
     (Note("reboot_attempt_under_way", "info", (("forced", False),)),), True),
    ("the timer keeps asking for it", WANTED, Tick(),
     (Finalize(force=False, requested=True),), True),
    ("a new update staged: a new question", replace(WANTED, state=S.FINALIZING), Staged("1.2.0"),
     (Finalize(),), False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("machine", "event", "actions", "wanted"),
    [r[1:] for r in REQUESTS],
    ids=[r[0] for r in REQUESTS],
)
def test_reboot_request(
    machine: Machine, event: Any, actions: tuple[object, ...], wanted: bool
) -> None:
    after, got = step(machine, event, 1000.0)
    assert got == actions
    assert after.reboot_wanted is wanted


@pytest.mark.parametrize("state", [s for s in S if s != S.UPDATED_NEED_REBOOT])
def test_reboot_request_with_nothing_staged(state: S) -> None:
    after, got = step(Machine(state), RebootRequested(force=False), 1000.0)
    assert after.reboot_wanted is False
    assert [type(a) for a in got] == [Refuse] and got[0].kind == "nothing_staged"  # type: ignore[union-attr]


# ---- fuzzed: whatever the file holds is a policy or policy_corrupt ------------------------------

POLICY_DOC = (json.dumps(to_json(FULL)) + "\n").encode()


@pytest.mark.fuzz
@settings(max_examples=fewer_examples(2))  # files on disk
@given(st.one_of(anything, mutations([POLICY_DOC]), deep_documents))
def test_fuzz_policy_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = HostPolicyStore(Path(d))
        store.path.write_bytes(data)
        result = parse_or_typed_error(store.load)
        assert isinstance(result, HostPolicy | StateError), result
        if isinstance(result, StateError):
            assert result.kind == "policy_corrupt" and len(result.message) < 1000
        else:
            store.save(result)  # what was read can be written again, and reads the same
            assert store.load() == result
        assert not any(p.name != POLICY_FILE for p in Path(d).iterdir())


# ---- the metrics of the policy ------------------------------------------------------------------


def test_policy_metrics_follow_the_policy() -> None:
    m = Metrics()

    def samples() -> dict[str, float]:
        out = {}
        for family in text_string_to_metric_families(m.render().decode()):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return {k: v for k, v in out.items() if "held" in k or "skipped" in k or "pin" in k}

    assert samples() == {"updater_held": 0, "updater_held_until_timestamp_seconds": 0}
    m.host_policy(T + 60, ("1.1.0", "1.2.0"), "1.4.*")
    assert samples() == {
        "updater_held": 1,
        "updater_held_until_timestamp_seconds": T + 60,
        "updater_version_skipped{version=1.1.0}": 1,
        "updater_version_skipped{version=1.2.0}": 1,
        "updater_pin_info{pin=1.4.*}": 1,
    }
    m.host_policy(None, ("1.2.0",), "1.5")
    assert samples() == {
        "updater_held": 0,
        "updater_held_until_timestamp_seconds": 0,
        "updater_version_skipped{version=1.2.0}": 1,
        "updater_pin_info{pin=1.5}": 1,
    }
    m.host_policy(None, (), "")
    assert samples() == {"updater_held": 0, "updater_held_until_timestamp_seconds": 0}
