"""``updatectl``: the command line. Parses arguments, calls the composition root,
prints results (``--json`` for machines), and maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from policies.identity import host_id
from updater import compose, config, release, versions
from updater.agent import status_text
from updater.agentapi import AgentStatus
from updater.clock import SystemClock
from updater.dbus_api import read_status
from updater.errors import ConfigError, RefusedError, UpdaterError
from updater.install import WriteResult
from updater.log import configure
from updater.machine import Timing, server_interval
from updater.manifest import Compression, format_time
from updater.progress import TerminalProgress, human
from updater.slots import StatusReport, as_dict
from updater.update import UpdateCheckResult

if TYPE_CHECKING:
    from policies.etcdlock import EtcdClient
    from policies.failed import FailedVersions, Verdict


def _emit_json(out: TextIO, doc: Any) -> None:
    out.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")


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
        _emit_json(out, doc)
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
    if args.json:
        doc = dict(as_dict(report)) if report is not None else {}
        doc["agent"] = None if agent is None else dataclasses.asdict(agent)
        if failed is not None or failed_error is not None:
            from policies.failed import verdicts_as_dict  # noqa: PLC0415

            doc["failed_versions"] = None if failed is None else verdicts_as_dict(failed)
            doc["failed_versions_error"] = failed_error
        _emit_json(out, doc)
        return 0
    if agent is not None:
        _print_agent(agent, out)
    else:
        out.write("Agent:          not running (state from the disk and the state file)\n")
    if report is not None:
        _print_status(report, out)
    if failed_error is not None:
        out.write(f"Failed versions: unknown ({failed_error})\n")
    elif failed:
        _print_failed_versions(failed, out, cfg.reboot.max_failures)
    return 0


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
    asyncio.run(compose.run_agent(cfg))
    return 0


def cmd_mark_good(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    slot = asyncio.run(compose.mark_good(cfg))
    if args.json:
        _emit_json(out, {"marked_good": slot.label})
    else:
        out.write(f"Marked {slot.label} good: it keeps booting.\n")
    return 0


def cmd_rollback(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    slot = compose.host_slots(cfg).rollback()
    if args.json:
        _emit_json(out, {"next_boot": slot.label})
    else:
        out.write(f"{slot.label} boots next, on trial: reboot to roll back.\n")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600}h"
        if s >= 86400
        else (f"{s // 3600}h{s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m{s % 60}s")
    )


def cmd_lock(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    lock = compose.etcd_lock(cfg, args.group)
    now = time.time()
    action = args.lock_action
    if action == "status":
        st = lock.status()
        if args.json:
            _emit_json(out, None if st is None else st.as_dict(now))
            return 0
        if st is None:
            out.write(f"Group {lock.group}: no semaphore yet ({lock.key})\n")
            return 0
        out.write(
            f"Group {st.group}: {len(st.holders)} of {st.total_slots} slots held "
            f"({st.free_slots} free)\n"
        )
        for h in st.holders:
            out.write(f"  {h.id}  held for {_age(h.age_s(now))}\n")
        if len(st.holders) > st.total_slots:
            out.write("  (more holders than slots: no one new gets a slot until below)\n")
        return 0
    holder = (args.id or host_id()) if action in ("lock", "unlock") else ""
    if action == "lock":
        if not lock.acquire(holder):
            raise RefusedError(
                "no_free_slot",
                f"every slot of group {lock.group} is held",
                hint="updatectl lock status shows the holders and their ages",
            )
        result: dict[str, object] = {"locked": holder, "group": lock.group}
    elif action == "unlock":
        result = {"unlocked": holder, "group": lock.group, "was_holder": lock.unlock(holder)}
    elif action == "set-max":
        result = {
            "group": lock.group,
            "total_slots": args.slots,
            "previous": lock.set_max(args.slots),
        }
    else:  # repair
        lock.repair(args.slots, force=args.force)
        result = {"group": lock.group, "repaired": True, "total_slots": args.slots}
    if args.json:
        _emit_json(out, result)
    else:
        out.write(", ".join(f"{k}={v}" for k, v in result.items()) + "\n")
    return 0


def cmd_fleet(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from policies.failed import verdicts_as_dict  # noqa: PLC0415 - etcd only when asked for
    from policies.fleet import fleet_status  # noqa: PLC0415

    lock = compose.etcd_lock(cfg, args.group)
    now = time.time()
    summary = fleet_status(lock.client, lock.status(), now)
    failed = _failed_versions(cfg, lock.client, lock.group).verdicts()
    if args.json:
        _emit_json(out, {**summary.as_dict(), "failed_versions": verdicts_as_dict(failed)})
        return 0
    out.write(f"Hosts: {summary.hosts}")
    if summary.total_slots is not None:
        out.write(
            f"; group {lock.group}: {len(summary.holders)} of {summary.total_slots} "
            "reboot slots held"
        )
    out.write("\n")
    out.write("Booted versions:\n")
    for version, n in summary.versions.items():
        out.write(f"  {version:20} {n} host{'s' if n != 1 else ''}\n")
    if summary.staged:
        out.write("Staged, waiting to reboot:\n")
        for version, n in summary.staged.items():
            out.write(f"  {version:20} {n}\n")
    if summary.holders:
        out.write("Holding a reboot slot:\n")
        for h in summary.holders:
            out.write(f"  {h.hostname or h.id:30} for {_age(h.age_s)}\n")
    if summary.waiting:
        out.write(f"Waiting for the lock: {', '.join(summary.waiting)}\n")
    if summary.errors:
        out.write("Last check or install failed:\n")
        for name, kind in summary.errors:
            out.write(f"  {name:30} {kind}\n")
    _print_failed_versions(failed, out, cfg.reboot.max_failures)
    if summary.refusing:
        out.write("Refusing a blocked version:\n")
        for name, version in summary.refusing:
            out.write(f"  {name:30} {version}\n")
    return 0


def _failed_versions(cfg: config.Config, client: EtcdClient, group: str) -> FailedVersions:
    from policies.failed import FailedVersions  # noqa: PLC0415 - etcd only when asked for

    return FailedVersions(client, group, cfg.reboot.max_failures)


def _print_failed_versions(verdicts: list[Verdict], out: TextIO, max_failures: int) -> None:
    if not verdicts:
        return
    out.write(
        f"Failed versions (blocked at {max_failures} host{'s' if max_failures > 1 else ''}):\n"
    )
    for v in verdicts:
        state = "BLOCKED" if v.blocked else "counting"
        if v.malformed is not None:
            out.write(f"  {v.version:20} {state}: unreadable record ({v.malformed.message})\n")
            continue
        failures = () if v.record is None else v.record.failures
        out.write(f"  {v.version:20} {state}, {len(failures)} host(s):\n")
        for f in failures:
            when = datetime.fromtimestamp(f.at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            out.write(f"    {f.host:34} {f.kind:16} {when}\n")
    if any(v.blocked for v in verdicts):
        out.write("  (`updatectl fleet unblock VERSION` lets the group take a blocked version)\n")


def cmd_fleet_unblock(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from policies.failed import check_version  # noqa: PLC0415 - etcd only when asked for

    lock = compose.etcd_lock(cfg, args.group)
    store = _failed_versions(cfg, lock.client, lock.group)
    gone = store.unblock(check_version(args.version))
    if gone is None:
        raise RefusedError(
            "not_blocked",
            f"nothing is recorded for {args.version} in group {store.group} "
            f"({store.key(args.version)})",
            hint="`updatectl fleet status` lists the failed versions",
        )
    removed = gone.removed
    if args.json:
        doc: dict[str, Any] = {"unblocked": gone.version, "group": store.group, "key": gone.key}
        if isinstance(removed, UpdaterError):
            doc["removed"] = None
            doc["malformed"] = removed.message
        else:
            doc["removed"] = removed.as_dict()
        _emit_json(out, doc)
        return 0
    out.write(f"Unblocked {gone.version} in group {store.group} (deleted {gone.key}).\n")
    if isinstance(removed, UpdaterError):
        out.write(f"  it held an unreadable record: {removed.message}\n")
    else:
        for f in removed.failures:
            when = datetime.fromtimestamp(f.at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            out.write(f"  had failed on {f.host} ({f.kind}) at {when}\n")
    return 0


def _fleetlock_groups(specs: Sequence[str] | None, cfg: config.Config) -> dict[str, int]:
    """``--group NAME[=SLOTS]`` options; none: the [reboot] group with [etcd] slots."""
    from policies.etcdlock import check_slots  # noqa: PLC0415 - etcd only when asked for
    from policies.lock import check_group  # noqa: PLC0415

    if not specs:
        return {cfg.reboot.group: cfg.etcd.slots}
    groups: dict[str, int] = {}
    for spec in specs:
        name, sep, slots = spec.partition("=")
        try:
            check_group(name)
            if sep and not (slots.isascii() and slots.isdigit()):
                raise ConfigError("invalid", f"{slots!r} is not a slot count", key="--group")
            groups[name] = check_slots(int(slots)) if sep else cfg.etcd.slots
        except UpdaterError as exc:
            raise ConfigError(
                "invalid", f"{spec!r}: {exc.message}", key="--group", hint="NAME or NAME=SLOTS"
            ) from None
    return groups


def _fleetlock_max_failures(flag: int | None, cfg: config.Config) -> int:
    """``--max-failures`` or [reboot] max_failures: the agents' own threshold."""
    from policies.failed import MAX_MAX_FAILURES  # noqa: PLC0415

    if flag is None:
        return cfg.reboot.max_failures
    if not 1 <= flag <= MAX_MAX_FAILURES:
        raise ConfigError(
            "invalid", f"must be 1..{MAX_MAX_FAILURES}, not {flag}", key="--max-failures"
        )
    return flag


def cmd_fleetlock_serve(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from policies.etcdlock import EtcdClient  # noqa: PLC0415 - etcd only when asked for
    from policies.fleetlockd import (  # noqa: PLC0415 - etcd only when asked for
        FleetLockServer,
        FleetLockService,
        ServerSettings,
        StoredFailedVersions,
        running,
    )
    from updater.listen import parse_listen  # noqa: PLC0415
    from updater.sdnotify import Notifier  # noqa: PLC0415

    configure(logging.DEBUG if args.verbose > 1 else logging.INFO, mode=args.log or "auto")
    addr = parse_listen(
        args.listen,
        key="--listen",
        allow_port_zero=True,
        loopback_only=False,
        what="FleetLock listen address",
        hint='an IP literal and a port: "0.0.0.0:3333", "127.0.0.1:3333", "[::]:3333"',
    )
    if addr.family != "tcp":
        raise ConfigError("invalid", "FleetLock clients speak HTTP over TCP", key="--listen")
    etcd = compose.etcd_settings(cfg)
    if args.etcd:
        etcd = dataclasses.replace(etcd, endpoints=tuple(args.etcd))
    settings = ServerSettings(
        host=addr.host,
        port=addr.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        groups=_fleetlock_groups(args.group, cfg),
    )
    client = EtcdClient(etcd)
    max_failures = _fleetlock_max_failures(args.max_failures, cfg)
    failed = StoredFailedVersions(client, max_failures)
    service = FleetLockService(client, settings.groups, failed=failed)
    try:
        server = FleetLockServer(settings, service)
    except OSError as exc:
        client.close()
        raise ConfigError(
            "invalid", f"cannot listen on {addr}: {exc.strerror or exc}", key="--listen"
        ) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with contextlib.closing(client), running(server):
        log = structlog.get_logger("updater.fleetlockd")
        log.info(
            "fleetlock_serving",
            url=server.url,
            groups=dict(settings.groups),
            etcd=list(etcd.endpoints),
            max_failures=max_failures,
        )
        out.write(f"FleetLock serving on {server.url}\n")
        out.flush()
        notifier = Notifier()
        notifier.ready(f"serving {server.url}")
        stop.wait()
        notifier.stopping()
        log.info("fleetlock_stopping", url=server.url)
    return 0


def cmd_release(args: argparse.Namespace, cfg: config.Config | None, out: TextIO) -> int:
    passphrase = None
    if args.passphrase_file is not None:
        try:
            passphrase = args.passphrase_file.read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(
                "unreadable", exc.strerror or str(exc), file=str(args.passphrase_file)
            ) from None
    published = release.publish(
        release.ReleaseRequest(
            image=args.image,
            version=args.version,
            repo=args.repo,
            gnupghome=args.gnupghome,
            key_id=args.key,
            channel=args.channel,
            compression=Compression(args.compression),
            expires_in=timedelta(days=args.expires_days),
            passphrase=passphrase,
            boot_files=release.boot_files(args.kernel, args.initrd, args.uki),
        ),
        SystemClock().now(),
    )
    m = published.manifest
    warnings = versions.omaha_warnings(m.version)
    for warning in warnings:
        args.err.write(f"updatectl: warning: {warning}\n")
    if args.json:
        _emit_json(
            out,
            {
                "warnings": list(warnings),
                "version": m.version,
                "channel": m.channel,
                "manifest": str(published.manifest_path),
                "signature": str(published.signature_path),
                "image": str(published.image_path),
                "size": m.image.size,
                "raw_size": m.image.raw_size,
                "expires": format_time(m.expires),
                "boot": [{"name": b.name, "size": b.size, "sha256": b.sha256} for b in m.boot],
            },
        )
    else:
        out.write(
            f"Published {m.version} on {m.channel}: {published.image_path} "
            f"({human(m.image.size)}, {m.image.compression.value}, raw {human(m.image.raw_size)}),"
            f" expires {format_time(m.expires)}\n"
        )
        for b in m.boot:
            out.write(f"  boot file {b.name} ({human(b.size)})\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="updatectl", description="A/B OS updates: check, install, inspect, publish."
    )
    p.add_argument("--config", type=Path, help="read this one TOML file instead of the drop-ins")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print JSON")
        sp.set_defaults(func=func)
        return sp

    c = add("check", cmd_check, "ask the release repository for a newer, signed version")
    c.add_argument("--install", action="store_true", help="install it into the other slot")
    add("status", cmd_status, "show the slots, versions and the update state")
    add(
        "mark-good",
        cmd_mark_good,
        "run the health checks; pass: the booted slot keeps booting, fail: fall back",
    )
    a = add("agent", cmd_agent, "run the update agent (the systemd service)")
    a.add_argument(
        "--log",
        choices=["auto", "journal", "console", "json"],
        help="log destination (default: [agent] log, auto)",
    )
    add("rollback", cmd_rollback, "boot the other slot next, if it holds a verified install")
    lk = sub.add_parser(
        "lock",
        help="the cluster reboot lock (etcd)",
        description="inspect and administer the etcd reboot semaphore",
    )
    lk.set_defaults(func=cmd_lock)
    lsub = lk.add_subparsers(dest="lock_action", required=True, metavar="ACTION")

    def lock_action(name: str, help_: str) -> argparse.ArgumentParser:
        la = lsub.add_parser(name, help=help_, description=help_)
        la.add_argument("--group", help="lock group (default: [reboot] group)")
        la.add_argument("--json", action="store_true", help="print JSON")
        return la

    lock_action("status", "slots, holders and how long each has held its slot")
    lock_action("lock", "take a slot for ID (default: this host)").add_argument("id", nargs="?")
    lock_action("unlock", "free ID's slot, e.g. of a dead host (default: this host)").add_argument(
        "id", nargs="?"
    )
    lock_action("set-max", "change the number of slots in place").add_argument("slots", type=int)
    rp = lock_action("repair", "replace a malformed semaphore with an empty one of N slots")
    rp.add_argument("slots", type=int)
    rp.add_argument(
        "--force",
        action="store_true",
        help="also replace a well-formed one (its holders lose their slots)",
    )

    fl = sub.add_parser(
        "fleet",
        help="the fleet's update status (etcd)",
        description="hosts per version, lock holders, waiting hosts, errors",
    )
    fsub = fl.add_subparsers(dest="fleet_action", required=True, metavar="ACTION")
    fs = fsub.add_parser("status", help="the fleet as the agents report it in etcd")
    fs.add_argument("--group", help="lock group (default: [reboot] group)")
    fs.add_argument("--json", action="store_true", help="print JSON")
    fs.set_defaults(func=cmd_fleet)
    fu = fsub.add_parser(
        "unblock",
        help="let the group take VERSION again (deletes its failed-version record)",
        description="delete updater/v1/groups/<group>/failed/VERSION: the agents of the group "
        "install and reboot into VERSION again",
    )
    fu.add_argument("version", metavar="VERSION")
    fu.add_argument("--group", help="lock group (default: [reboot] group)")
    fu.add_argument("--json", action="store_true", help="print JSON")
    fu.set_defaults(func=cmd_fleet_unblock)

    flk = sub.add_parser(
        "fleetlock",
        help="a FleetLock server (Zincati's protocol) over the etcd semaphore",
        description="serve FleetLock over the etcd reboot semaphore",
    )
    flsub = flk.add_subparsers(dest="fleetlock_action", required=True, metavar="ACTION")
    srv = flsub.add_parser(
        "serve",
        help="answer FleetLock clients (Zincati, [reboot] lock = fleetlock) from etcd",
        description="answer FleetLock clients from the etcd semaphore; [etcd] gives TLS and auth",
    )
    srv.add_argument(
        "--listen", default="127.0.0.1:3333", help="IP:PORT (default 127.0.0.1:3333; 0.0.0.0:3333)"
    )
    srv.add_argument(
        "--etcd",
        action="append",
        metavar="URL",
        help="etcd endpoint, repeatable (default: [etcd] endpoints)",
    )
    srv.add_argument(
        "--group",
        action="append",
        metavar="NAME[=SLOTS]",
        help="serve this group, repeatable (default: [reboot] group); SLOTS when it creates"
        " the semaphore (default: [etcd] slots)",
    )
    srv.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="a version is blocked once N hosts rolled back from it (default: [reboot]"
        " max_failures, as the agents of the group use)",
    )
    srv.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain")
    srv.add_argument("--tls-key", type=Path, help="and this PEM private key")
    srv.add_argument(
        "--log",
        choices=["auto", "journal", "console", "json"],
        help="log destination (default: auto)",
    )
    srv.set_defaults(func=cmd_fleetlock_serve, json=False)

    r = add("release", cmd_release, "publish a signed release into a repository directory")
    r.add_argument("--image", type=Path, required=True, help="the raw image file")
    r.add_argument("--version", required=True, help="release version (UAPI format)")
    r.add_argument("--repo", type=Path, required=True, help="repository directory")
    r.add_argument("--channel", default="stable")
    r.add_argument("--gnupghome", type=Path, required=True, help="GnuPG home with the key")
    r.add_argument("--key", required=True, help="signing key id or fingerprint")
    r.add_argument("--compression", choices=[c.value for c in Compression], default="zstd")
    r.add_argument(
        "--expires-days",
        type=float,
        default=30.0,
        help="days until the manifest expires (default 30)",
    )
    r.add_argument("--passphrase-file", type=Path, help="file holding the key's passphrase")
    r.add_argument(
        "--kernel", type=Path, help="the release's kernel, written to the ESP as /<slot>/vmlinuz"
    )
    r.add_argument("--initrd", type=Path, help="its initrd, written as /<slot>/initrd.img")
    r.add_argument(
        "--uki", type=Path, help="a unified kernel image instead, written as /<slot>/uki.efi"
    )
    return p


def _report(exc: UpdaterError, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        _emit_json(out, {"error": exc.as_dict()})
    err.write(f"updatectl: {exc.category} error ({exc.kind}): {exc.message}\n")
    if exc.hint:
        err.write(f"hint: {exc.hint}\n")


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    configure({0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG), stream=err)
    try:
        cfg = None if args.command == "release" else config.load(args.config)
        args.err = err  # for warnings beside a command's output
        code: int = args.func(args, cfg, out)
        return code
    except UpdaterError as exc:
        _report(exc, args.json, out, err)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        err.write("updatectl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
