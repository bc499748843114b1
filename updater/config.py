"""Configuration: TOML fragments -> merged inputs -> validated, frozen settings.

The files and their merge are :mod:`updater.configfiles`, the settings'
dataclasses :mod:`updater.settings` (re-exported here); this module checks
every section once, at load, and keeps the typed result (URLs checked, windows
parsed, the boot entry built). ``--config FILE`` reads that one file instead
of the drop-ins.

Unknown keys are logged and ignored rather than fatal: the agent updates
itself, so after a fallback to an older slot an older agent must still start
with a configuration written for a newer one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from partitions.bootcontrol import MAX_TRIES
from policies.failed import MAX_MAX_FAILURES
from policies.fleetlockproto import group_base_url
from policies.rebootlock import GROUP_RE, parse_etcd_endpoint
from updater.configfiles import (
    DROPIN_DIRS,
    MAX_FILE_BYTES,
    Section,
    Value,
    dropin_files,
    merge,
)
from updater.errors import ConfigError, LockError
from updater.hostpolicy import valid_pin
from updater.listen import parse_listen
from updater.log import LogMode
from updater.manifest import valid_channel
from updater.settings import (
    BACKENDS,
    DEFAULT_ENTRY,
    ESP_CANDIDATES,
    AgentConfig,
    Config,
    DiskConfig,
    EtcdConfig,
    FleetConfig,
    FleetLockConfig,
    GrubEnvConfig,
    HealthConfig,
    InstallConfig,
    MetricsConfig,
    OmahaConfig,
    RebootConfig,
    SourceConfig,
    SystemdBootConfig,
)

if TYPE_CHECKING:
    from partitions.bls import EntryTemplate

__all__ = [
    "BACKENDS",
    "DEFAULT_ENTRY",
    "DROPIN_DIRS",
    "ESP_CANDIDATES",
    "MAX_FILE_BYTES",
    "AgentConfig",
    "Config",
    "DiskConfig",
    "EtcdConfig",
    "FleetConfig",
    "FleetLockConfig",
    "GrubEnvConfig",
    "HealthConfig",
    "InstallConfig",
    "MetricsConfig",
    "OmahaConfig",
    "RebootConfig",
    "SourceConfig",
    "SystemdBootConfig",
    "dropin_files",
    "entry_template",
    "load",
    "merge",
    "validate",
]

log = structlog.get_logger(__name__)


def _source(s: Section) -> SourceConfig:
    d = SourceConfig()
    url = s.str_("url", d.url)
    if url is not None:
        s.url(
            "url",
            url,
            schemes=("http", "https", "file"),
            hint="the release repository, e.g. https://updates.example.com/repo or file:///srv/repo",
        )
    channel = s.str_("channel", d.channel) or d.channel
    if not valid_channel(channel):
        raise s.error("channel", f"invalid channel name {channel!r}")
    keyring_strs = s.str_list("keyring", None)
    keyring: tuple[Path, ...] = d.keyring
    if keyring_strs is not None:
        for k in keyring_strs:
            if not k.startswith("/"):
                raise s.error("keyring", f"must be absolute paths, not {k!r}")
        keyring = tuple(Path(k) for k in keyring_strs)
    trust_root = s.path("trust_root", d.trust_root)
    kind = s.str_("kind", d.kind) or d.kind
    if kind not in ("static", "omaha"):
        raise s.error("kind", f"unknown source {kind!r}", hint="static or omaha")
    proxy = s.str_("proxy", None) or None
    if proxy is not None:
        s.url("proxy", proxy, schemes=("http", "https"), hint=_PROXY_HINT)
    pin = s.str_("pin", d.pin)
    if pin is not None and not valid_pin(pin):
        raise s.error(
            "pin", f"invalid pin {pin!r}", hint='a line such as "1.4.*", or a version prefix "1.4"'
        )
    return SourceConfig(
        pin=pin,
        url=url,
        proxy=proxy,
        channel=channel,
        keyring=keyring,
        trust_root=trust_root,
        ca_file=s.path("ca_file", d.ca_file),
        connect_timeout_s=s.number(
            "connect_timeout_s", d.connect_timeout_s, minimum=0.1, maximum=600
        ),
        read_timeout_s=s.number("read_timeout_s", d.read_timeout_s, minimum=0.1, maximum=3600),
        retries=s.int_("retries", d.retries, minimum=0, maximum=20),
        resume_attempts=s.int_("resume_attempts", d.resume_attempts, minimum=0, maximum=100),
        kind=kind,
        min_speed_bytes_s=s.number(
            "min_speed_bytes_s", d.min_speed_bytes_s, minimum=0, maximum=1024**3
        ),
        min_speed_window_s=s.number(
            "min_speed_window_s", d.min_speed_window_s, minimum=0.1, maximum=3600
        ),
    )


_PROXY_HINT = "an HTTP proxy: http://[user:password@]host:port"

_APP_ID_RE = re.compile(
    r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$"
)


def _omaha(s: Section) -> OmahaConfig:
    d = OmahaConfig()
    server = s.str_("server", None)
    if server is not None and server != "disabled":
        s.url(
            "server",
            server,
            schemes=("http", "https"),
            hint='e.g. https://nebraska.example.com/v1/update/, or "disabled" to turn checks off',
        )
    app_id = s.str_("app_id", d.app_id) or d.app_id
    if not _APP_ID_RE.fullmatch(app_id):
        raise s.error("app_id", f"{app_id!r} is not an app id (a UUID, in braces or not)")
    group = s.str_("group", None)
    if group is not None and not valid_channel(group):
        raise s.error("group", f"invalid group {group!r}")
    return OmahaConfig(
        server=server,
        app_id=app_id,
        group=group,
        flatcar_conf=s.bool_("flatcar_conf", d.flatcar_conf),
    )


def _disk(s: Section) -> DiskConfig:
    d = DiskConfig()
    labels = s.str_list("slots", d.slots) or d.slots
    if len(labels) != 2 or labels[0] == labels[1] or not all(labels):
        raise s.error("slots", "must name exactly two different partition labels")
    backend = s.str_("backend", d.backend) or d.backend
    if backend not in BACKENDS:
        raise s.error(
            "backend", f"unknown backend {backend!r}", hint=f"one of {', '.join(BACKENDS)}"
        )
    esp = s.path("esp", d.esp)
    esp_partition = s.str_("esp_partition", d.esp_partition) or None
    if esp is not None and esp_partition is not None:
        raise s.error(
            "esp_partition",
            "set [disk] esp (a mounted directory) or esp_partition (a partition edited "
            "with mtools), not both",
        )
    return DiskConfig(
        device=s.path("device", d.device),
        slots=(labels[0], labels[1]),
        kernel_cmdline=s.path("kernel_cmdline", d.kernel_cmdline) or d.kernel_cmdline,
        backend=backend,
        esp=esp,
        esp_partition=esp_partition,
    )


def _systemd_boot(s: Section) -> SystemdBootConfig:
    d, e = SystemdBootConfig(), DEFAULT_ENTRY
    tries = s.int_("tries", d.tries, minimum=1, maximum=MAX_TRIES)
    fields: dict[str, Any] = {
        key: (s.str_list(key, e[key]) or ()) if key == "initrd" else (s.str_(key, None) or e[key])
        for key in ("title", "linux", "initrd", "options", "sort_key", "prefix")
    }
    efivars = s.path("efivars", d.efivars) or d.efivars
    entry = None
    if s.values:  # the defaults make a valid entry (tested); the backend loads only if set
        from partitions.bls import EntryTemplate, EntryTemplateError  # noqa: PLC0415

        try:
            entry = EntryTemplate(**fields)
        except EntryTemplateError as exc:
            raise s.error(exc.field, str(exc)) from exc
    return SystemdBootConfig(tries=tries, efivars=efivars, entry=entry)


def entry_template(c: SystemdBootConfig) -> EntryTemplate:
    """The systemd-boot entry of these settings: the one built at load, or the default."""
    if c.entry is not None:
        return c.entry
    from partitions.bls import EntryTemplate  # noqa: PLC0415 - only when used

    return EntryTemplate(**DEFAULT_ENTRY)


_GRUB_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def _grub_env(s: Section) -> GrubEnvConfig:
    d = GrubEnvConfig()
    clean = d.path
    path = s.str_("path", None)
    if path is not None:
        from partitions.filestore import clean_path  # noqa: PLC0415 - only when set

        try:
            clean = clean_path(path)
        except ValueError as exc:
            raise s.error("path", str(exc)) from exc
        if not clean:
            raise s.error("path", "must name a file, e.g. grub/grubenv")
    names = s.str_list("names", d.names) or d.names
    if len(names) != 2 or names[0] == names[1]:
        raise s.error("names", "must be two different names, one per slot in [disk] slots")
    for name in names:
        if not _GRUB_NAME_RE.fullmatch(name):
            raise s.error("names", f"{name!r}: GRUB variable names are letters, digits and '_'")
    return GrubEnvConfig(path=clean, names=(names[0], names[1]))


def _install(s: Section) -> InstallConfig:
    d = InstallConfig()
    chunk = s.int_("chunk_size", d.chunk_size, minimum=64 * 1024, maximum=64 * 1024 * 1024)
    if chunk % 4096:
        raise s.error("chunk_size", "must be a multiple of 4096")
    return InstallConfig(
        readback=s.bool_("readback", d.readback),
        chunk_size=chunk,
        delta_min_saving=s.number("delta_min_saving", d.delta_min_saving, minimum=0.0, maximum=1.0),
        delta=s.bool_("delta", d.delta),
    )


def _agent(s: Section) -> AgentConfig:
    d = AgentConfig()
    log_mode = s.str_("log", d.log) or d.log
    if log_mode not in ("auto", "journal", "console", "json"):
        raise s.error(
            "log", f"unknown log mode {log_mode!r}", hint="auto, journal, console or json"
        )
    retry_base = s.number("retry_base_s", d.retry_base_s, minimum=1, maximum=86400)
    retry_cap = s.number("retry_cap_s", d.retry_cap_s, minimum=1, maximum=7 * 86400)
    if retry_cap < retry_base:
        raise s.error("retry_cap_s", "must not be below retry_base_s")
    return AgentConfig(
        state_dir=s.path("state_dir", d.state_dir) or d.state_dir,
        os_release=s.path("os_release", d.os_release) or d.os_release,
        reboot_sentinel=s.path("reboot_sentinel", d.reboot_sentinel, allow_empty=True),
        poll_interval_s=s.number(
            "poll_interval_s", d.poll_interval_s, minimum=1, maximum=7 * 86400
        ),
        first_check_delay_s=s.number(
            "first_check_delay_s", d.first_check_delay_s, minimum=0, maximum=86400
        ),
        jitter=s.number("jitter", d.jitter, minimum=0, maximum=0.5),
        retry_base_s=retry_base,
        retry_cap_s=retry_cap,
        dbus=s.bool_("dbus", d.dbus),
        coreos_compat=s.bool_("coreos_compat", d.coreos_compat),
        log=cast(LogMode, log_mode),
    )


def _reboot(s: Section) -> RebootConfig:
    d = RebootConfig()
    strategy = s.str_("strategy", d.strategy) or d.strategy
    if strategy not in ("immediate", "off", "lock"):
        raise s.error("strategy", f"unknown strategy {strategy!r}", hint="immediate, off or lock")
    lock = s.str_("lock", d.lock) or d.lock
    if lock not in ("etcd", "fleetlock", "none"):
        raise s.error("lock", f"unknown lock {lock!r}", hint="etcd, fleetlock or none")
    group = s.str_("group", d.group) or d.group
    if not GROUP_RE.fullmatch(group):
        raise s.error("group", f"invalid group {group!r}", hint="letters, digits, '.' and '-'")
    raw = s.raw("window")
    tables: list[Mapping[str, Any]] = []
    windows_file = None
    if raw is not None:
        if not isinstance(raw.value, list) or not all(isinstance(w, dict) for w in raw.value):
            raise s.error("window", "must be [[reboot.window]] tables")
        tables, windows_file = list(raw.value), raw.file
    start, length = s.str_("window_start", None), s.str_("window_length", None)
    if (start is None) != (length is None):
        present, missing = (
            ("window_length", "window_start")
            if start is None
            else ("window_start", "window_length")
        )
        raise s.error(present, f"needs {missing} too (locksmith's window form)")
    if start is not None:
        windows_file = windows_file or s.file_of("window_start")
    retry_s = s.number("retry_s", d.retry_s, minimum=1, maximum=86400)
    release_after_s = s.number("release_after_s", d.release_after_s, minimum=0, maximum=7 * 86400)
    pre_reboot_dir = s.path("pre_reboot_dir", d.pre_reboot_dir) or d.pre_reboot_dir
    pre_reboot_timeout_s = s.number(
        "pre_reboot_timeout_s", d.pre_reboot_timeout_s, minimum=0.1, maximum=3600
    )
    time_zone = s.str_("time_zone", d.time_zone) or d.time_zone
    wait_for_users = s.bool_("wait_for_users", d.wait_for_users)
    max_failures = s.int_("max_failures", d.max_failures, minimum=1, maximum=MAX_MAX_FAILURES)
    windows = None
    if tables or start is not None:  # parsed here, at start, with file and key
        from policies.windows import parse_windows  # noqa: PLC0415 - only when windows are set

        windows = parse_windows(
            tables,
            time_zone,
            window_start=start,
            window_length=length,
            file=windows_file,
            key="reboot.window",
        )
    return RebootConfig(
        strategy=strategy,
        retry_s=retry_s,
        lock=lock,
        group=group,
        release_after_s=release_after_s,
        pre_reboot_dir=pre_reboot_dir,
        pre_reboot_timeout_s=pre_reboot_timeout_s,
        wait_for_users=wait_for_users,
        time_zone=time_zone,
        windows=windows,
        windows_file=windows_file,
        max_failures=max_failures,
    )


_ETCD_HINT = "etcd endpoints are http(s)://HOST[:PORT], e.g. https://10.0.0.1:2379"


def _etcd(s: Section) -> EtcdConfig:
    d = EtcdConfig()
    endpoints = s.str_list("endpoints", d.endpoints) or d.endpoints
    for url in endpoints:
        parse_etcd_endpoint(url, lambda why: s.error("endpoints", why, _ETCD_HINT))
    cert, key = s.path("cert_file", None), s.path("key_file", None)
    if (cert is None) != (key is None):
        present, missing = ("key_file", "cert_file") if cert is None else ("cert_file", "key_file")
        raise s.error(present, f"needs {missing} too")
    username, password = s.str_("username", None), s.path("password_file", None)
    if (username is None) != (password is None):
        present, missing = (
            ("password_file", "username") if username is None else ("username", "password_file")
        )
        raise s.error(present, f"needs {missing} too")
    return EtcdConfig(
        endpoints=endpoints,
        slots=s.int_("slots", d.slots, minimum=1, maximum=10000),
        ca_file=s.path("ca_file", None),
        cert_file=cert,
        key_file=key,
        username=username,
        password_file=password,
        timeout_s=s.number("timeout_s", d.timeout_s, minimum=0.1, maximum=300),
        publish_status=s.bool_("publish_status", d.publish_status),
        endpoints_set=s.raw("endpoints") is not None,
    )


def _fleet(s: Section) -> FleetConfig:
    publish = s.raw("publish")
    return FleetConfig(publish=None if publish is None else s.bool_("publish", False))


def _fleetlock(s: Section) -> FleetLockConfig:
    d = FleetLockConfig()
    url = s.str_("url", None)
    if url is not None:
        try:
            group_base_url(url, "default")  # the client's own check, at start
        except LockError as exc:
            raise s.error("url", exc.message) from None
    return FleetLockConfig(
        url=url,
        ca_file=s.path("ca_file", None),
        timeout_s=s.number("timeout_s", d.timeout_s, minimum=0.1, maximum=300),
    )


def _health(s: Section) -> HealthConfig:
    d = HealthConfig()
    units = s.str_list("units", d.units) or ()
    for unit in units:
        if "/" in unit or not unit or unit.startswith("-"):
            raise s.error("units", f"{unit!r} is not a unit name")
    return HealthConfig(
        checks_dir=s.path("checks_dir", d.checks_dir) or d.checks_dir,
        timeout_s=s.number("timeout_s", d.timeout_s, minimum=0.1, maximum=3600),
        units=units,
    )


def _metrics(s: Section) -> MetricsConfig:
    listen = s.str_("listen", None)
    if listen == "":
        listen = None
    if listen is not None:
        # the agent binds what parse_listen makes of it: checked here, at load, not at bind
        parse_listen(listen, key="metrics.listen", file=s.file_of("listen"))
    return MetricsConfig(listen=listen)


_SECTIONS = {
    "source": _source,
    "omaha": _omaha,
    "disk": _disk,
    "systemd-boot": _systemd_boot,
    "grub-env": _grub_env,
    "install": _install,
    "agent": _agent,
    "reboot": _reboot,
    "etcd": _etcd,
    "fleetlock": _fleetlock,
    "fleet": _fleet,
    "health": _health,
    "metrics": _metrics,
}


def validate(merged: Mapping[str, Mapping[str, Value]], files: Sequence[Path]) -> Config:
    parts: dict[str, Any] = {}
    for name, build in _SECTIONS.items():
        section = Section(name, merged.get(name, {}))
        parts[name.replace("-", "_")] = build(section)
        section.warn_unknown()
    reboot = parts["reboot"]
    if reboot.strategy == "lock" and reboot.lock == "fleetlock" and parts["fleetlock"].url is None:
        raise ConfigError(
            "missing",
            "the fleetlock lock needs a server",
            key="fleetlock.url",
            hint='set [fleetlock] url, or [reboot] lock = "etcd"',
        )
    for name in sorted(set(merged) - set(_SECTIONS)):
        files_of = sorted({v.file for v in merged[name].values()})
        log.warning("config_section_unknown", section=name, files=files_of)
    return Config(files=tuple(files), **parts)


def load(config_file: Path | None = None, dirs: Sequence[Path] = DROPIN_DIRS) -> Config:
    """Load ``config_file`` alone (a directory: its drop-ins alone), or the merged drop-ins."""
    if config_file is not None and config_file.is_dir():
        files = dropin_files([config_file])
    elif config_file is not None:
        if not config_file.exists():
            raise ConfigError("missing", "no such file", file=str(config_file))
        files = [config_file]
    else:
        files = dropin_files(dirs)
    return validate(merge(files), files)
