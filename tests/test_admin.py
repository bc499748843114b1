"""An admin's levers through the real `updatectl`, against a real repository on
loopback and a GPT disk image: hold / unhold, skip, the pin (also as Omaha's
targetversionprefix), and moving to another channel, refused below the floor
unless a one-shot --allow-downgrade lets one version through."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from partitions.bootcontrol import SlotFlags
from tests.conftest import CliResult, Repo, updatectl
from tests.omaha_server import Answer, OmahaServer
from tests.test_cycle import Snapshot, assert_refused
from tests.test_omaha_cycle import omaha  # noqa: F401 - the fixture
from updater import cli
from updater.hostpolicy import Hold, HostPolicy
from updater.hostpolicyfile import HostPolicyStore

A, B = 1, 2
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_system_bus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No agent answers here: the commands write the file, Reload finds nobody."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'no-bus'}")


def image_gets(repo: Repo) -> int:
    return len([r for r in repo.server.requests if "/images/" in r.path])


def error_kind(r: CliResult) -> str:
    kind: str = r.json()["error"]["kind"]
    return kind


def refused(host: Host, repo: Repo, kind: str, code: int = 7) -> None:
    """`check --install` is refused with ``kind``; nothing is downloaded or written."""
    before, gets = Snapshot.take(host), image_gets(repo)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == code, r.err
    assert error_kind(r) == kind
    assert image_gets(repo) == gets
    assert_refused(host, before)


def installs(host: Host, usr_images: dict[str, Path], version: str) -> None:
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True and r.json()["version"] == version
    raw = usr_images[version].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert cgpt_flags(host.disk, B) == SlotFlags(2, 1, False)


# ---- hold -------------------------------------------------------------------------------------


def test_hold_stops_installs_until_unhold(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    r = updatectl(host, "hold", "--json")
    assert r.code == 0, r.err
    assert r.json()["held"] is True and r.json()["held_until"] is None
    assert r.json()["agent_reloaded"] is False  # no agent: it reads the file when it starts

    status = updatectl(host, "status", "--json").json()
    assert status["host_policy"]["held"] is True
    assert "Held:           no installs until `updatectl unhold`" in updatectl(host, "status").out

    check = updatectl(host, "check", "--json")
    assert check.code == 0 and check.json()["update_available"] is True
    assert check.json()["refused"]["kind"] == "held"
    assert "refused: this host is held" in updatectl(host, "check").out
    refused(host, repo, "held")
    refused(host, repo, "held")  # a second check, the same: a hold survives

    r = updatectl(host, "unhold", "--json")
    assert r.code == 0 and r.json()["held"] is False
    assert updatectl(host, "status", "--json").json()["host_policy"]["held"] is False
    installs(host, usr_images, "1.1.0")


def test_hold_until_a_time(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    store = HostPolicyStore(host.state_dir)
    for bad in ("2000-01-01T00:00Z", "yesterday", "0s", "2h30"):
        r = updatectl(host, "hold", "--until", bad, "--json")
        assert r.code == 2 and error_kind(r) == "bad_time", (bad, r.out)
        assert not store.path.exists()  # nothing held by a bad command

    r = updatectl(host, "hold", "--until", "2d", "--json")
    assert r.code == 0, r.err
    until = store.load().hold
    assert until is not None and until.until is not None
    assert 2 * 86400 - 60 < until.until - time.time() <= 2 * 86400
    assert r.json()["held_until"].endswith("Z")
    refused(host, repo, "held")

    # the time passes (written as it would be two days on): the hold is over by itself
    store.save(HostPolicy(hold=Hold(time.time() - 3 * 86400, until=time.time() - 1)))
    assert updatectl(host, "status", "--json").json()["host_policy"]["held"] is False
    installs(host, usr_images, "1.1.0")


def test_an_unreadable_policy_file_stops_installs(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    store = HostPolicyStore(host.state_dir)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text('{"schema": 1, "hold": {"since": "a while"}}')
    refused(host, repo, "policy_corrupt", code=8)
    r = updatectl(host, "status", "--json")
    assert r.code == 0 and r.json()["host_policy_error"].startswith("policy_corrupt")
    assert updatectl(host, "skip", "1.2.0").code == 8  # skip does not overwrite what it cannot read
    assert updatectl(host, "unhold").code == 0  # unhold writes it anew
    assert store.load() == HostPolicy()
    installs(host, usr_images, "1.1.0")


# ---- skip -------------------------------------------------------------------------------------


def test_skip_refuses_one_version(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    r = updatectl(host, "skip", "1.1.0", "--json")
    assert r.code == 0 and r.json()["skipped"] == ["1.1.0"]
    for bad in ("../1.2", "", "1.2 3"):
        r = updatectl(host, "skip", bad, "--json")
        assert r.code == 2 and error_kind(r) == "bad_version"
    assert HostPolicyStore(host.state_dir).load().skipped == ("1.1.0",)
    assert "Skipped:        1.1.0" in updatectl(host, "status").out
    refused(host, repo, "skipped")

    repo.publish("1.2.0", usr_images["1.2.0"])  # a newer one installs
    installs(host, usr_images, "1.2.0")
    assert updatectl(host, "unskip", "1.1.0", "--json").json()["skipped"] == []


# ---- the pin ----------------------------------------------------------------------------------


def pin(host: Host, line: str) -> None:
    text = host.config.read_text()
    lines = [x for x in text.splitlines() if not x.startswith("pin = ")]
    text = "\n".join(lines).replace("[source]\n", f'[source]\npin = "{line}"\n', 1)
    host.config.write_text(text)


def test_the_pin_keeps_a_host_on_its_line(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"])
    pin(host, "1.0.*")
    assert updatectl(host, "status", "--json").json()["pin"] == "1.0.*"
    refused(host, repo, "pinned")
    pin(host, "1.1")
    installs(host, usr_images, "1.1.0")

    pin(host, "1.*.*")
    r = updatectl(host, "status", "--json")
    assert r.code == 3 and error_kind(r) == "invalid"
    assert "source.pin" in r.json()["error"]["message"]


def test_omaha_requests_carry_the_pin(
    host: Host,
    repo: Repo,
    omaha: OmahaServer,  # noqa: F811 - the fixture
) -> None:
    pin(host, "1.0.*")
    omaha.answer(Answer.UPDATE)  # a server that ignores the prefix and offers 1.1.0 anyway
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 7 and error_kind(r) == "pinned"
    assert omaha.requests[-1].elements["updatecheck"] == {"targetversionprefix": "1.0."}
    assert_refused(host, before, state_unchanged=False)  # the Omaha event queue may change
    assert not any(r.path.endswith(".zst") for r in repo.server.requests)


# ---- channel ----------------------------------------------------------------------------------


def in_dir(host: Host) -> Path:
    """The host's config as a drop-in directory (`--config DIR`), as on a real host."""
    d = host.root / "config.d"
    d.mkdir(exist_ok=True)
    shutil.copy(host.config, d / "50-host.toml")
    return d


def ctl(config: Path, *args: str) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.suppress(SystemExit):
        code = cli.main(["--config", str(config), *args], out=out, err=err)
        return CliResult(code, out.getvalue(), err.getvalue())
    return CliResult(2, out.getvalue(), err.getvalue())


def on_1_1(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    """The host runs 1.1.0, blessed: its floor is 1.1.0."""
    repo.publish("1.1.0", usr_images["1.1.0"])
    installs(host, usr_images, "1.1.0")
    assert host.reboot() == "USR-B"
    assert updatectl(host, "mark-good").code == 0


def test_channel_moves_to_a_channel_at_or_above_the_floor(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    conf = in_dir(host)
    repo.publish("1.2.0", usr_images["1.2.0"], channel="beta")
    r = ctl(conf, "channel", "beta", "--json")
    assert r.code == 0, r.err
    assert r.json()["newest"] == "1.2.0" and r.json()["downgrade"] is False
    dropin = conf / "90-channel.toml"
    assert 'channel = "beta"' in dropin.read_text()
    assert ctl(conf, "status", "--json").json()["channel"] == "beta"
    r = ctl(conf, "check", "--install", "--json")
    assert r.code == 0 and r.json()["version"] == "1.2.0" and r.json()["channel"] == "beta"

    # to a channel the repository does not have: refused as the check would be, unmoved
    r = ctl(conf, "channel", "nightly", "--json")
    assert r.code == 5 and error_kind(r) == "http_status"
    assert 'channel = "beta"' in dropin.read_text()


def test_channel_below_the_floor_is_refused_unless_a_downgrade_is_allowed(
    host: Host, repo: Repo, usr_images: dict[str, Path]
) -> None:
    on_1_1(host, repo, usr_images)
    conf = in_dir(host)
    repo.publish("1.0.0", usr_images["1.0.0"], channel="lts")
    store = HostPolicyStore(host.state_dir)
    state = (host.state_dir / "state.json").read_bytes()
    files = sorted(p.name for p in conf.iterdir())

    r = ctl(conf, "channel", "lts", "--json")
    assert r.code == 7 and error_kind(r) == "channel_downgrade"
    assert "1.0.0" in r.err and "1.1.0" in r.err and "--allow-downgrade" in r.err
    assert sorted(p.name for p in conf.iterdir()) == files  # no drop-in
    assert not store.path.exists()
    assert (host.state_dir / "state.json").read_bytes() == state
    assert ctl(conf, "status", "--json").json()["channel"] == "stable"

    r = ctl(conf, "channel", "lts", "--allow-downgrade", "--json")
    assert r.code == 0, r.err
    assert r.json()["downgrade"] is True and r.json()["floor"] == "1.1.0"
    assert "channel_downgrade_allowed" in r.err  # logged
    allowance = store.load().downgrade
    assert allowance is not None and (allowance.channel, allowance.version) == ("lts", "1.0.0")
    assert allowance.by == 0
    assert "Downgrade:      1.0.0 of lts allowed once" in ctl(conf, "status").out

    # the next check installs 1.0.0 into the other slot, below the floor, once
    r = ctl(conf, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True and r.json()["version"] == "1.0.0"
    raw = usr_images["1.0.0"].read_bytes()
    assert host.slot_bytes("USR-A", len(raw)) == raw
    assert cgpt_flags(host.disk, A) == SlotFlags(3, 1, False)
    assert store.load().downgrade is None  # used up
    assert json.loads((host.state_dir / "state.json").read_text())["highest_version"] == "1.0.0"
    assert host.reboot() == "USR-A"
    assert ctl(conf, "mark-good").code == 0

    # one shot: an older release on lts is refused again, by the floor
    repo.publish("0.9.0", usr_images["1.0.0"], channel="lts")
    before, gets = Snapshot.take(host), image_gets(repo)
    r = ctl(conf, "check", "--install", "--json")
    assert r.code == 4 and error_kind(r) == "older_than_booted"
    assert image_gets(repo) == gets
    assert Snapshot.take(host).flags_b == before.flags_b
    r = ctl(conf, "channel", "lts", "--json")
    assert r.code == 7 and error_kind(r) == "channel_downgrade"


def test_channel_refusals(host: Host, repo: Repo, usr_images: dict[str, Path]) -> None:
    repo.publish("1.1.0", usr_images["1.1.0"], channel="beta")
    r = updatectl(host, "channel", "beta", "--json")  # --config FILE: no drop-in directory
    assert r.code == 3 and error_kind(r) == "invalid"
    conf = in_dir(host)
    for bad in ("../etc", "-x", "a b", ""):
        r = ctl(conf, "channel", bad, "--json")
        assert r.code in (2,) and (not r.out or error_kind(r) == "bad_channel"), bad
    assert not (conf / "90-channel.toml").exists()
    # a channel whose manifest is not signed by the keyring is not moved to
    repo.root.joinpath("evil").mkdir()
    shutil.copy(repo.manifest_path("beta"), repo.root / "evil" / "release.json")
    r = ctl(conf, "channel", "evil", "--json")
    assert r.code == 4 and error_kind(r) == "signature_missing"
    # signed, but beta's manifest replayed as another channel's
    repo.sign_manifest(repo.manifest_path("beta").read_bytes(), channel="evil")
    r = ctl(conf, "channel", "evil", "--json")
    assert r.code == 4 and error_kind(r) == "channel_mismatch"
    assert not (conf / "90-channel.toml").exists()
    assert not HostPolicyStore(host.state_dir).path.exists()


@pytest.mark.root  # switches to another user
def test_only_root_may_allow_a_downgrade(
    host: Host, repo: Repo, usr_images: dict[str, Path], tmp_path: Path
) -> None:
    on_1_1(host, repo, usr_images)
    repo.publish("1.0.0", usr_images["1.0.0"], channel="lts")
    # the config where "nobody" reads it (pytest's tmp_path is root's alone)
    conf = Path(tempfile.mkdtemp(prefix="updater-conf-", dir="/tmp"))
    try:
        conf.chmod(0o755)
        shutil.copy(host.config, conf / "50-host.toml")
        (conf / "50-host.toml").chmod(0o644)
        # updatectl's own code, in a process that is nobody when it runs: it loads as
        # root (the checkout and the interpreter may sit where only root reads, as in
        # CI), then drops to uid/gid 65534 before the command line is parsed
        argv = ["--config", str(conf), "channel", "lts", "--allow-downgrade", "--json"]
        child = (
            "import os, sys\n"
            "from updater import cli, cli_admin, cli_output, config\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            f"sys.exit(cli.main({argv!r}))\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", child],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                 "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}"},
        )  # fmt: skip
        assert r.returncode == 7, r.stderr
        assert json.loads(r.stdout)["error"]["kind"] == "not_root"
        assert sorted(p.name for p in conf.iterdir()) == ["50-host.toml"]  # no drop-in
    finally:
        shutil.rmtree(conf)
    assert not HostPolicyStore(host.state_dir).path.exists()
