"""``updatectl`` commands about the fleet: lock, fleet status and unblock, fleetlock serve."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from policies.identity import host_id
from updater import compose, config
from updater.errors import ConfigError, RefusedError, UpdaterError
from updater.log import configure

if TYPE_CHECKING:
    from policies.etcdclient import EtcdClient, EtcdSettings
    from policies.failed import FailedVersions
    from updater.listen import ListenAddress


from updater.cli_output import age, emit_json, print_failed_versions
from updater.hostpolicy import format_time as format_unix


def cmd_lock(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    lock = compose.etcd_lock(cfg, args.group)
    now = time.time()
    action = args.lock_action
    if action == "status":
        st = lock.status()
        if args.json:
            emit_json(out, None if st is None else st.as_dict(now))
            return 0
        if st is None:
            out.write(f"Group {lock.group}: no semaphore yet ({lock.key})\n")
            return 0
        out.write(
            f"Group {st.group}: {len(st.holders)} of {st.total_slots} slots held "
            f"({st.free_slots} free)\n"
        )
        for h in st.holders:
            out.write(f"  {h.id}  held for {age(h.age_s(now))}\n")
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
        emit_json(out, result)
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
        emit_json(out, {**summary.as_dict(), "failed_versions": verdicts_as_dict(failed)})
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
            out.write(f"  {h.hostname or h.id:30} for {age(h.age_s)}\n")
    if summary.waiting:
        out.write(f"Waiting for the lock: {', '.join(summary.waiting)}\n")
    if summary.errors:
        out.write("Last check or install failed:\n")
        for name, kind in summary.errors:
            out.write(f"  {name:30} {kind}\n")
    print_failed_versions(failed, out, cfg.reboot.max_failures)
    if summary.refusing:
        out.write("Refusing a blocked version:\n")
        for name, version in summary.refusing:
            out.write(f"  {name:30} {version}\n")
    if summary.held:
        out.write("Held by an admin (no installs):\n")
        for name, until in summary.held:
            when = "until unhold" if until == 0 else f"until {format_unix(until)}"
            out.write(f"  {name:30} {when}\n")
    return 0


def _failed_versions(cfg: config.Config, client: EtcdClient, group: str) -> FailedVersions:
    from policies.failed import FailedVersions  # noqa: PLC0415 - etcd only when asked for

    return FailedVersions(client, group, cfg.reboot.max_failures)


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
        emit_json(out, doc)
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
    from policies.rebootlock import check_group  # noqa: PLC0415
    from policies.semaphore import check_slots  # noqa: PLC0415 - etcd only when asked for

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


def _http_listen(text: str, what: str, port: int, not_tcp: str) -> ListenAddress:
    """``--listen`` of our HTTP servers: an IP literal and a TCP port (any address)."""
    from updater.listen import parse_listen  # noqa: PLC0415

    addr = parse_listen(
        text,
        key="--listen",
        allow_port_zero=True,
        loopback_only=False,
        what=f"{what} listen address",
        hint=f'an IP literal and a port: "0.0.0.0:{port}", "127.0.0.1:{port}", "[::]:{port}"',
    )
    if addr.family != "tcp":
        raise ConfigError("invalid", not_tcp, key="--listen")
    return addr


def _etcd(args: argparse.Namespace, cfg: config.Config) -> EtcdSettings:
    """The configured etcd, with ``--etcd`` endpoints over its own."""
    etcd = compose.etcd_settings(cfg)
    if args.etcd:
        etcd = dataclasses.replace(etcd, endpoints=tuple(args.etcd))
    return etcd


def _stop_on_signals() -> threading.Event:
    """Set by SIGTERM or SIGINT (installed before the server starts)."""
    import signal  # noqa: PLC0415

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve_until(stop: threading.Event, url: str) -> None:
    """Tell systemd we serve ``url``, wait for ``stop``, tell it we are stopping."""
    from updater.sdnotify import Notifier  # noqa: PLC0415

    notifier = Notifier()
    notifier.ready(f"serving {url}")
    stop.wait()
    notifier.stopping()


def cmd_fleetlock_serve(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from policies.etcdclient import EtcdClient  # noqa: PLC0415 - etcd only when asked for
    from policies.fleetlockd import (  # noqa: PLC0415 - etcd only when asked for
        FleetLockServer,
        ServerSettings,
        running,
    )
    from policies.fleetlockservice import (  # noqa: PLC0415 - etcd only when asked for
        FleetLockService,
        StoredFailedVersions,
    )

    configure(logging.DEBUG if args.verbose > 1 else logging.INFO, mode=args.log or "auto")
    addr = _http_listen(args.listen, "FleetLock", 3333, "FleetLock clients speak HTTP over TCP")
    etcd = _etcd(args, cfg)
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
    stop = _stop_on_signals()
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
        _serve_until(stop, server.url)
        log.info("fleetlock_stopping", url=server.url)
    return 0


def cmd_fleet_serve(args: argparse.Namespace, cfg: config.Config, out: TextIO) -> int:
    from policies.etcdclient import EtcdClient  # noqa: PLC0415 - etcd only when asked for
    from policies.fleetserve import (  # noqa: PLC0415
        EtcdReads,
        FleetCache,
        FleetServer,
        ServeSettings,
        read_token,
        serving,
    )

    configure(logging.DEBUG if args.verbose > 1 else logging.INFO, mode=args.log or "auto")
    addr = _http_listen(args.listen, "dashboard", 9477, "the dashboard speaks HTTP over TCP")
    for name, value, low, high in (
        ("--refresh", args.refresh, 0.1, 3600.0),
        ("--stale-after", args.stale_after, 1.0, 365 * 86400.0),
    ):
        if not low <= value <= high:  # NaN too
            raise ConfigError("invalid", f"must be {low:g}..{high:g} seconds", key=name)
    token = None if args.token_file is None else read_token(args.token_file)
    settings = ServeSettings(
        host=addr.host,
        port=addr.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
    )
    etcd = _etcd(args, cfg)
    client = EtcdClient(etcd)
    cache = FleetCache(
        EtcdReads(client, cfg.reboot.max_failures),
        refresh_s=args.refresh,
        stale_after_s=args.stale_after,
    )
    try:
        server = FleetServer(settings, cache)
    except ConfigError:
        client.close()
        raise
    except OSError as exc:
        client.close()
        raise ConfigError(
            "invalid", f"cannot listen on {addr}: {exc.strerror or exc}", key="--listen"
        ) from None
    stop = _stop_on_signals()
    with contextlib.closing(client), serving(server):
        log = structlog.get_logger("updater.fleetserve")
        log.info(
            "fleet_serving",
            url=server.url,
            etcd=list(etcd.endpoints),
            token=token is not None,
            refresh_s=args.refresh,
        )
        out.write(f"Fleet dashboard on {server.url}/\n")
        out.flush()
        _serve_until(stop, server.url)
        log.info("fleet_serve_stopping", url=server.url)
    return 0
