"""``updatectl`` commands about this host: check, status, agent, mark-good, rollback."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from updater import compose, config
from updater.agent import status_text
from updater.agentapi import AgentStatus
from updater.clock import SystemClock
from updater.dbus_api import read_status
from updater.errors import UpdaterError
from updater.hostpolicy import HostPolicy
from updater.hostpolicy import format_time as format_unix
from updater.hostpolicyfile import HostPolicyStore
from updater.install import WriteResult
from updater.log import configure
from updater.machine import Timing, server_interval
from updater.manifest import format_time
from updater.progress import TerminalProgress, human
from updater.slots import StatusReport, as_dict
from updater.update import UpdateCheckResult

if TYPE_CHECKING:
    from policies.failed import Verdict


from updater.cli_output import emit_json, policy_doc, print_failed_versions


def _check_doc(result: UpdateCheckResult, timing: Timing) -> dict[str, Any]:
    interval = result.interval_s
    doc: dict[str, Any] = {
        "update_available": result.update_available,
        "staged": result.staged,
        "booted": result.booted.label,
        "booted_version": result.booted_version,
        "target": result.target.label,
        "deferred": result.deferred,
        # what the agent would wait: the server's wish, held to its bounds
        "poll_interval_s": None if interval is None else server_interval(interval, timing),
        "blocked": None if result.blocked is None else result.blocked.describe(),
        # this host refuses it (held, skipped, pinned): kind and why
        "refused": None if result.refused is None else result.refused.as_dict(),
    }
    m = result.manifest
    if m is not None:
        doc.update(
            version=m.version,
            channel=m.channel,
            expires=format_time(m.expires),
            size=m.image.size,
            raw_size=m.image.raw_size,
            compression=m.image.compression.value,
        )
    return doc


def cmd_check(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    bar = TerminalProgress(sys.stderr) if args.install and sys.stderr.isatty() else None
    up = compose.updater(cfg, progress=bar)
    result = up.check()
    written: WriteResult | None = None
    if args.install:
        written = up.install(result)
        if bar is not None:
            bar.finish()
    if args.json:
        doc = _check_doc(result, compose.timing(cfg))
        if args.install:
            doc["installed"] = written is not None
            if written is not None:
                doc["seconds"] = round(written.seconds, 3)
        emit_json(out, doc)
        return 0
    m = result.manifest
    if result.deferred is not None:
        out.write(f"The update server holds an update back for now: {result.deferred}.\n")
    elif m is None:
        out.write(f"Up to date: the server offers nothing newer than {result.booted_version}.\n")
    elif not result.update_available:
        out.write(f"Up to date: {result.booted_version} is the newest on {m.channel}.\n")
    elif result.staged:
        out.write(f"{m.version} is already installed in {result.target.label}: reboot to apply.\n")
    elif result.refused is not None:
        out.write(f"Update available but refused: {result.refused.message}.\n")
    elif result.blocked is not None:
        out.write(
            f"Update available but refused: {result.blocked.describe()}. "
            f"`updatectl fleet unblock {m.version}` lets the group take it.\n"
        )
    elif written is not None:
        rate = written.raw_size / max(written.seconds, 1e-6)
        out.write(
            f"Installed {m.version} into {result.target.label} "
            f"({human(written.raw_size)} in {written.seconds:.1f}s, {human(rate)}/s); "
            "it boots next, on trial: reboot to apply.\n"
        )
    else:
        out.write(
            f"Update available: {m.version} (booted: {result.booted_version or 'unknown'}), "
            f"{human(m.image.size)} to download. Run `updatectl check --install`.\n"
        )
    return 0


_STATE_TEXT = {
    "idle": "idle",
    "installing": "installing an update",
    "install_interrupted": "an install was interrupted (the next check restarts it)",
    "update_staged": "update staged: reboot to apply",
    "trial_boot": "trial boot: run `updatectl mark-good` once the system is healthy",
}


def _print_status(r: StatusReport, out: TextIO) -> None:
    out.write(f"State:          {_STATE_TEXT[r.state]}\n")
    out.write(f"Booted:         {r.booted} (version {r.booted_version or 'unknown'})\n")
    out.write(f"Next boot:      {r.primary or 'none: no slot is bootable!'}\n")
    if r.highest_version:
        out.write(f"Highest seen:   {r.highest_version}\n")
    out.write("Slots:\n")
    out.write("  LABEL   PRIO TRIES GOOD  VERSION      CONDITION\n")
    for s in r.slots:
        marks = " ".join(m for m, on in (("booted", s.booted), ("next", s.primary)) if on)
        out.write(
            f"  {s.label:7} {s.flags.priority:4} {s.flags.tries:5} "
            f"{'yes' if s.flags.successful else 'no':5} {s.version or '-':12} "
            f"{s.condition or '-':10} {marks}\n"
        )


def _print_agent(st: AgentStatus, out: TextIO) -> None:
    out.write(f"Agent:          {st.state} ({status_text(st)})\n")
    if st.last_check_time:
        when = datetime.fromtimestamp(st.last_check_time, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        out.write(f"Last check:     {when}\n")
    if st.last_error_kind:
        out.write(f"Last error:     {st.last_error_kind}: {st.last_error_message}\n")


def cmd_status(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    agent = asyncio.run(read_status()) if cfg.agent.dbus else None
    try:
        report: StatusReport | None = compose.host_slots(cfg).status()
    except UpdaterError:
        if agent is None:
            raise
        report = None  # e.g. not root: the disk is unreadable, the agent answered
    failed, failed_error = _group_failed_versions(cfg)
    trust, trust_error = _trust_root(cfg)
    now = SystemClock().now().timestamp()
    try:
        policy: HostPolicy | None = HostPolicyStore(cfg.agent.state_dir).load()
        policy_error = None
    except UpdaterError as exc:
        policy, policy_error = None, f"{exc.kind}: {exc.message}"
    if args.json:
        doc = dict(as_dict(report)) if report is not None else {}
        doc["agent"] = None if agent is None else dataclasses.asdict(agent)
        doc["trust_root"] = trust
        doc["trust_root_error"] = trust_error
        doc["channel"] = cfg.source.channel
        doc["pin"] = cfg.source.pin
        doc["host_policy"] = None if policy is None else policy_doc(policy, now)
        doc["host_policy_error"] = policy_error
        if failed is not None or failed_error is not None:
            from policies.failed import verdicts_as_dict  # noqa: PLC0415

            doc["failed_versions"] = None if failed is None else verdicts_as_dict(failed)
            doc["failed_versions_error"] = failed_error
        emit_json(out, doc)
        return 0
    if agent is not None:
        _print_agent(agent, out)
    else:
        out.write("Agent:          not running (state from the disk and the state file)\n")
    out.write(f"Channel:        {cfg.source.channel}\n")
    if cfg.source.pin:
        out.write(f"Pinned to:      {cfg.source.pin}\n")
    if policy_error is not None:
        out.write(f"Host policy:    unreadable ({policy_error}): no installs\n")
    elif policy is not None:
        _print_policy(policy, now, out)
    if report is not None:
        _print_status(report, out)
    _print_trust(trust, trust_error, out)
    if failed_error is not None:
        out.write(f"Failed versions: unknown ({failed_error})\n")
    elif failed:
        print_failed_versions(failed, out, cfg.reboot.max_failures)
    return 0


def _trust_root(cfg: config.Config) -> tuple[dict[str, Any] | None, str | None]:
    """The trust root this host holds (shipped or walked to; no network), or why not."""
    try:
        trusted = compose.trust_chain(cfg).current()
    except UpdaterError as exc:
        return None, str(exc)
    root = trusted.root
    return {
        "version": root.version,
        "threshold": root.threshold,
        "keys": sorted(root.fingerprints),
        "expires": None if root.expires is None else format_time(root.expires),
        "retired": sorted(trusted.retired),
        "source": "keyring" if root.version == 0 else "root",
    }, None


def _print_trust(trust: dict[str, Any] | None, error: str | None, out: TextIO) -> None:
    if trust is None:
        out.write(f"Trust root:     unknown ({error})\n")
        return
    if trust["version"] == 0:
        out.write("Trust root:     0 (the [source] keyring; threshold 1, no expiry)\n")
    else:
        out.write(
            f"Trust root:     {trust['version']} (threshold {trust['threshold']}, "
            f"expires {trust['expires']})\n"
        )
    for fpr in trust["keys"]:
        out.write(f"  key {fpr}\n")
    for fpr in trust["retired"]:
        out.write(f"  retired {fpr}\n")


def _print_policy(policy: HostPolicy, now: float, out: TextIO) -> None:
    until = policy.held_until(now)
    if until is not None:
        when = "`updatectl unhold`" if until == 0.0 else format_unix(until)
        out.write(f"Held:           no installs until {when}\n")
    if policy.skipped:
        out.write(f"Skipped:        {', '.join(policy.skipped)}\n")
    d = policy.downgrade
    if d is not None:
        out.write(
            f"Downgrade:      {d.version} of {d.channel} allowed once (below the floor {d.floor})\n"
        )


def _group_failed_versions(cfg: config.Config) -> tuple[list[Verdict] | None, str | None]:
    """With the etcd lock: the group's failed versions, or why they could not be read."""
    blocks = compose.version_blocks(cfg)
    if blocks is None:
        return None, None
    try:
        return blocks.store.verdicts(), None
    except UpdaterError as exc:
        return None, f"{exc.kind}: {exc.message}"


def cmd_agent(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    configure(logging.DEBUG if args.verbose > 1 else logging.INFO, mode=args.log or cfg.agent.log)
    asyncio.run(compose.run_agent(cfg, args.config))
    return 0


def cmd_mark_good(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    slot = asyncio.run(compose.mark_good(cfg))
    if args.json:
        emit_json(out, {"marked_good": slot.label})
    else:
        out.write(f"Marked {slot.label} good: it keeps booting.\n")
    return 0


def cmd_rollback(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    slot = compose.host_slots(cfg).rollback()
    if args.json:
        emit_json(out, {"next_boot": slot.label})
    else:
        out.write(f"{slot.label} boots next, on trial: reboot to roll back.\n")
    return 0
