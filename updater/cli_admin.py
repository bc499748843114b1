"""``updatectl`` commands an admin reaches for on one host: reboot (through the policy),
hold / unhold, skip / unskip a version, and move to another channel."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import structlog

from updater import compose, config, versions
from updater.cli_output import emit_json, policy_doc
from updater.clock import SystemClock
from updater.configfiles import DROPIN_DIRS
from updater.dbus_client import call
from updater.dbus_wire import AgentUnavailableError
from updater.errors import ConfigError, RefusedError, UpdaterError, UsageError
from updater.fsutil import atomic_write
from updater.hostpolicy import Downgrade, Hold, HostPolicy, below_floor, format_time, parse_until
from updater.hostpolicyfile import HostPolicyStore
from updater.manifest import valid_channel

log = structlog.get_logger(__name__)

CHANNEL_DROPIN = "90-channel.toml"


# ---- reboot -----------------------------------------------------------------------------------


def cmd_reboot(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    if args.force:
        asyncio.run(call("RebootNow"))
        outcome = "started"
    else:
        outcome = str(asyncio.run(call("RequestReboot")))
    if args.json:
        emit_json(out, {"reboot": outcome, "forced": args.force})
    elif outcome == "started":
        out.write("Rebooting into the staged update.\n")
    else:
        out.write(
            "Reboot requested: waiting for the reboot policy (the cluster lock, a maintenance "
            "window); the agent reboots as soon as it allows. "
            "`updatectl reboot --force` reboots now, past the policy.\n"
        )
    return 0


# ---- hold, skip -------------------------------------------------------------------------------


def _tell_agent(cfg: config.Config, err: TextIO) -> bool:
    """Ask the running agent to re-read the host policy (D-Bus Reload); False if it
    did not (it reads the file at its next check or start anyway)."""
    if not cfg.agent.dbus:
        return False
    try:
        asyncio.run(call("Reload"))
    except AgentUnavailableError:
        return False
    except UpdaterError as exc:
        err.write(
            f"updatectl: warning: the agent did not reload ({exc.kind}: {exc.message}); "
            "it reads the change at its next check\n"
        )
        return False
    return True


def _policy_done(
    args: argparse.Namespace, cfg: config.Config, out: TextIO, policy: HostPolicy, text: str
) -> int:
    told = _tell_agent(cfg, args.err)
    if args.json:
        doc = policy_doc(policy, SystemClock().now().timestamp())
        doc["agent_reloaded"] = told
        emit_json(out, doc)
    else:
        out.write(text + "\n")
    return 0


def cmd_hold(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    now = SystemClock().now()
    until = None if args.until is None else parse_until(args.until, now)
    store = HostPolicyStore(cfg.agent.state_dir)
    policy = store.update(
        lambda p: replace(p, hold=Hold(now.timestamp(), until)), replace_corrupt=True
    )
    log.info("host_held", until=None if until is None else format_time(until), uid=os.geteuid())
    when = "`updatectl unhold`" if until is None else format_time(until)
    return _policy_done(args, cfg, out, policy, f"Held: no installs until {when}.")


def cmd_unhold(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    store = HostPolicyStore(cfg.agent.state_dir)
    policy = store.update(lambda p: replace(p, hold=None), replace_corrupt=True)
    log.info("host_unheld", uid=os.geteuid())
    return _policy_done(args, cfg, out, policy, "Not held: updates install again.")


def _version_arg(text: str) -> str:
    if not versions.is_valid(text):
        raise UsageError(
            "bad_version",
            f"{text!r} is not a version",
            hint="[A-Za-z0-9.~^-], at most 64, starting alphanumeric",
        )
    return text


def cmd_skip(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    version = _version_arg(args.version)
    policy = HostPolicyStore(cfg.agent.state_dir).update(lambda p: p.skip(version))
    log.info("version_skipped", version=version, uid=os.geteuid())
    text = f"Skipped: this host never installs {version} (a newer version, yes)."
    return _policy_done(args, cfg, out, policy, text)


def cmd_unskip(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    version = _version_arg(args.version)
    policy = HostPolicyStore(cfg.agent.state_dir).update(lambda p: p.unskip(version))
    log.info("version_unskipped", version=version, uid=os.geteuid())
    return _policy_done(args, cfg, out, policy, f"{version} may install again.")


# ---- channel ----------------------------------------------------------------------------------


def dropin_dir(config_file: Path | None) -> Path:
    """Where `updatectl channel` writes its drop-in: the admin's directory, or the one
    `--config DIR` names; `--config FILE` has none."""
    if config_file is None:
        return DROPIN_DIRS[-1]
    if config_file.is_dir():
        return config_file
    raise ConfigError(
        "invalid",
        "`updatectl channel` writes a drop-in, and --config names one file",
        file=str(config_file),
        hint="set [source] channel in that file, or use --config DIR (a drop-in directory)",
    )


def _channel_config(cfg: config.Config, name: str) -> config.Config:
    omaha = cfg.omaha if cfg.source.kind != "omaha" else replace(cfg.omaha, group=name)
    return replace(cfg, source=replace(cfg.source, channel=name), omaha=omaha)


def _dropin_text(cfg: config.Config, name: str) -> str:
    text = f'# written by `updatectl channel {name}`\n[source]\nchannel = "{name}"\n'
    if cfg.source.kind == "omaha":  # the Omaha group is the channel (over update.conf's)
        text += f'\n[omaha]\ngroup = "{name}"\n'
    return text


def cmd_channel(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    name = args.name
    if not valid_channel(name):
        raise UsageError(
            "bad_channel", f"invalid channel name {name!r}", hint="[A-Za-z0-9][A-Za-z0-9._-]*"
        )
    directory = dropin_dir(args.config)
    if args.allow_downgrade and os.geteuid() != 0:
        raise RefusedError(
            "not_root", "only root may allow a downgrade", hint="run it as root (sudo)"
        )
    moved = _channel_config(cfg, name)
    up = compose.updater(moved)
    newest = up.newest()  # verified: signature, channel, expiry, size
    report = up.status()
    floor = None
    if newest is not None:
        floor = below_floor(newest.version, report.booted_version, report.highest_version)
    downgrade = None
    if floor is not None and newest is not None:
        if not args.allow_downgrade:
            raise RefusedError(
                "channel_downgrade",
                f"channel {name}'s newest release is {newest.version}, below this host's "
                f"version floor {floor}: the host would never take it",
                hint=f"`updatectl channel {name} --allow-downgrade` (root) installs "
                f"{newest.version} once, below the floor; or wait for a newer release there",
            )
        now = SystemClock().now().timestamp()
        downgrade = Downgrade(name, newest.version, floor, now, os.geteuid())
        log.warning(
            "channel_downgrade_allowed",
            channel=name,
            version=newest.version,
            floor=floor,
            uid=os.geteuid(),
        )
    # the allowance first: a drop-in without it would only refuse the channel's release
    HostPolicyStore(cfg.agent.state_dir).update(lambda p: replace(p, downgrade=downgrade))
    path = directory / CHANNEL_DROPIN
    atomic_write(path, _dropin_text(cfg, name).encode())
    log.info("channel_changed", channel=name, previous=cfg.source.channel, dropin=str(path))
    told = _tell_agent(cfg, args.err)
    if args.json:
        emit_json(
            out,
            {
                "channel": name,
                "dropin": str(path),
                "newest": None if newest is None else newest.version,
                "downgrade": downgrade is not None,
                "floor": floor,
                "agent_reloaded": told,
            },
        )
        return 0
    out.write(f"Channel {name} (written to {path}).\n")
    if newest is None:
        out.write("The channel offers nothing yet.\n")
    elif downgrade is not None:
        out.write(
            f"Downgrade allowed once: {newest.version}, below the floor {floor}, installs "
            "at the next check.\n"
        )
    else:
        out.write(f"Its newest release: {newest.version}.\n")
    if not told:
        out.write("The agent is not running: it takes the channel when it starts.\n")
    return 0
