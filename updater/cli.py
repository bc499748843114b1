"""``updatectl``: the command line. Parses arguments, runs the command (which calls the
composition root and prints results, ``--json`` for machines), and maps errors to exit
codes. The commands: :mod:`updater.cli_host` (this host), :mod:`updater.cli_fleet`
(locks and the fleet), :mod:`updater.cli_release` (publishing)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from updater import config
from updater.cli_admin import (
    cmd_channel,
    cmd_hold,
    cmd_reboot,
    cmd_skip,
    cmd_unhold,
    cmd_unskip,
)
from updater.cli_fleet import (
    cmd_fleet,
    cmd_fleet_serve,
    cmd_fleet_unblock,
    cmd_fleetlock_serve,
    cmd_lock,
)
from updater.cli_host import cmd_agent, cmd_check, cmd_mark_good, cmd_rollback, cmd_status
from updater.cli_output import emit_json
from updater.cli_release import cmd_keys_rotate, cmd_release
from updater.errors import UpdaterError
from updater.log import configure
from updater.manifest import Compression


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="updatectl", description="A/B OS updates: check, install, inspect, publish."
    )
    p.add_argument(
        "--config",
        type=Path,
        help="read this one TOML file (or this directory's drop-ins) instead of the drop-ins",
    )
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
    rb = add(
        "reboot",
        cmd_reboot,
        "reboot into the staged update through the reboot policy (its lock and windows)",
    )
    rb.add_argument(
        "--force", action="store_true", help="reboot now, past the policy (not inhibitors)"
    )
    hd = add("hold", cmd_hold, "stop installs on this host until `unhold` (or --until)")
    hd.add_argument(
        "--until", metavar="TIME", help="end the hold then: 2026-12-24T08:00Z, or 12h, 2d, 1w"
    )
    add("unhold", cmd_unhold, "let this host install updates again")
    sk = add("skip", cmd_skip, "never install VERSION on this host")
    sk.add_argument("version", metavar="VERSION")
    us = add("unskip", cmd_unskip, "let this host install VERSION again")
    us.add_argument("version", metavar="VERSION")
    ch = add(
        "channel",
        cmd_channel,
        "follow channel NAME (writes a drop-in); refused if its newest is below this host's floor",
    )
    ch.add_argument("name", metavar="NAME")
    ch.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="root: install the channel's newest once, below the version floor",
    )
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
    fsv = fsub.add_parser(
        "serve",
        help="the fleet dashboard: read-only HTTP over etcd (a page, JSON, /metrics)",
        description="serve the fleet dashboard (GET /, /api/v1/hosts, /api/v1/groups, "
        "/api/v1/versions, /metrics) from etcd; [etcd] gives TLS and auth",
    )
    fsv.add_argument(
        "--listen", default="127.0.0.1:9477", help="IP:PORT (default 127.0.0.1:9477; 0.0.0.0:9477)"
    )
    fsv.add_argument(
        "--etcd",
        action="append",
        metavar="URL",
        help="etcd endpoint, repeatable (default: [etcd] endpoints)",
    )
    fsv.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain")
    fsv.add_argument("--tls-key", type=Path, help="and this PEM private key")
    fsv.add_argument(
        "--token-file",
        type=Path,
        help="/api/ and /metrics need Authorization: Bearer <the token in this file>",
    )
    fsv.add_argument(
        "--refresh",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="read etcd this often (default 2)",
    )
    fsv.add_argument(
        "--stale-after",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="a reboot slot held longer is shown stale (default 3600)",
    )
    fsv.add_argument(
        "--log",
        choices=["auto", "journal", "console", "json"],
        help="log destination (default: auto)",
    )
    fsv.set_defaults(func=cmd_fleet_serve, json=False)

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
    r.add_argument(
        "--key",
        required=True,
        action="append",
        help="signing key id or fingerprint; repeat it for a root whose threshold is above 1",
    )
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

    ks = sub.add_parser("keys", help="the repository's trust roots (signing key rotation)")
    ksub = ks.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    kr = ksub.add_parser(
        "rotate",
        help="write the next root (keys/root.<N+1>.json), signed by the current and new keys",
        description="write the next root (keys/root.<N+1>.json), signed by the current and "
        "new keys; revoking a key is a rotation that removes it",
    )
    kr.add_argument("--json", action="store_true", help="print JSON")
    kr.add_argument("--repo", type=Path, required=True, help="repository directory")
    kr.add_argument("--gnupghome", type=Path, required=True, help="GnuPG home with the keys")
    kr.add_argument(
        "--key",
        action="append",
        required=True,
        default=[],
        help="a signing key's fingerprint (repeat: a threshold of the current root's keys and "
        "of the next root's keys must sign)",
    )
    kr.add_argument("--add", action="append", default=[], help="fingerprint of a key to add")
    kr.add_argument(
        "--remove", action="append", default=[], help="fingerprint of a key to remove (revoke)"
    )
    kr.add_argument("--threshold", type=int, help="signatures a release needs (default: as now)")
    kr.add_argument(
        "--expires-days",
        type=float,
        default=365.0,
        help="days until the new root expires (default 365): rotate again before",
    )
    kr.add_argument("--passphrase-file", type=Path, help="file holding the keys' passphrase")
    kr.set_defaults(func=cmd_keys_rotate)
    return p


def _report(exc: UpdaterError, as_json: bool, out: TextIO, err: TextIO) -> None:
    if as_json:
        emit_json(out, {"error": exc.as_dict()})
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
        publishing = args.command in ("release", "keys")
        cfg = None if publishing else config.load(args.config)
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
