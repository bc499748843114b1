"""The composition root: the one place that builds real objects from the config."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import structlog
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from partitions import booted
from partitions.bootcontrol import BootControl, Slot
from partitions.gptprio import GptPrioBootControl
from policies.fleetlock import FleetLock
from policies.identity import host_id
from policies.rebootlock import NoLock, RebootLock
from policies.strategy import STRATEGIES, LockStrategy, RebootStrategy, Windowed
from updater import dbus_api
from updater.agent import Agent
from updater.blessing import bless
from updater.clock import Clock, SystemClock
from updater.config import ESP_CANDIDATES, Config, entry_template
from updater.config import load as load_config
from updater.errors import ConfigError
from updater.health import HealthChecker, SystemdUnits
from updater.hostlock import FlockHostLock
from updater.hostpolicy import target_version_prefix
from updater.hostpolicyfile import HostPolicyStore
from updater.hostports import KuredSentinel, OsReleaseFile
from updater.install import ProgressFn
from updater.lockmetrics import MeteredLock
from updater.machine import Timing
from updater.metrics import Metrics
from updater.rebooter import LogindRebooter, Rebooter, UnavailableRebooter
from updater.sdnotify import Notifier
from updater.sessions import LogindSessions, UserSessions
from updater.settings import fleet_publishing
from updater.slots import Slots
from updater.source import HttpCache, SignedFetcher, StaticSource, UpdateSource
from updater.state import StateStore
from updater.transport import HttpSettings, HttpTransport, SchemeTransport, Transport
from updater.trustchain import ChainVerifier, TrustChain
from updater.update import Updater
from updater.updatesettings import UpdateSettings

if TYPE_CHECKING:
    from partitions.filestore import DirStore
    from partitions.mtools import MtoolsStore
    from policies.etcdclient import EtcdSettings
    from policies.etcdlock import EtcdLock
    from policies.failed import GroupBlocks
    from updater.bootfiles import BootFiles
    from updater.fleetreport import EtcdFleetReporter

# The etcd client (etcd3gw and what it pulls in, ~5 MiB resident) is imported
# only by the functions that need it: an agent without the etcd lock stays small.

log = structlog.get_logger(__name__)


def omaha_settings(config: Config) -> tuple[str | None, str]:
    """The Omaha server and group: [omaha], else Flatcar's update.conf, else [source] channel."""
    server, group = config.omaha.server, config.omaha.group
    if config.omaha.flatcar_conf and (server is None or group is None):
        from updater import flatcar

        fc = flatcar.read()
        server = server or fc.server
        group = group or fc.group
        if fc.files:
            log.info(
                "flatcar_update_conf_read",
                files=[str(f) for f in fc.files],
                server=server,
                group=group,
            )
    return server, group or config.source.channel


def expected_channel(config: Config, omaha: tuple[str | None, str] | None = None) -> str:
    """The channel a manifest must name: the Omaha group (of ``omaha``, the
    :func:`omaha_settings` already read), or [source] channel."""
    if config.source.kind != "omaha":
        return config.source.channel
    return (omaha or omaha_settings(config))[1]


def update_source(
    config: Config,
    transport: SchemeTransport,
    http: HttpTransport,
    *,
    omaha: tuple[str | None, str] | None = None,  # omaha_settings, if already read
) -> UpdateSource:
    cache = HttpCache(config.agent.state_dir / "cache")
    if config.source.kind == "omaha":
        # Omaha (its XML, its error codes) is loaded only for an Omaha source.
        from updater.flatcar import DISABLED
        from updater.omaha_client import OmahaClient, host_context
        from updater.omaha_source import DisabledSource, EventQueue, OmahaSource

        server, group = omaha or omaha_settings(config)
        if server == DISABLED:
            return DisabledSource()
        if server is None:
            raise ConfigError(
                "missing",
                "no Omaha server is configured",
                key="omaha.server",
                hint="set [omaha] server, or SERVER= in /etc/flatcar/update.conf",
            )
        app_id = config.omaha.app_id
        return OmahaSource(
            OmahaClient(server, transport=http),
            lambda version: replace(
                host_context(app_id, version, group),
                target_version_prefix=target_version_prefix(config.source.pin),
            ),
            SignedFetcher(transport, cache),
            EventQueue(config.agent.state_dir / "omaha-events.json"),
        )
    if config.source.url is not None:
        return StaticSource(config.source.url, config.source.channel, transport, cache)
    raise ConfigError(
        "missing",
        "no release repository is configured",
        key="source.url",
        hint="set [source] url in a file under /etc/updater/config.d/",
    )


def disk_of(config: Config) -> Path:
    return config.disk.device or booted.RUNNING_SYSTEM.disk()


def _gptprio(config: Config, disk: Path, finder: booted.BootedSlotFinder) -> BootControl:
    return GptPrioBootControl(disk, config.disk.slots, finder)


def _sdboot(config: Config, disk: Path, finder: booted.BootedSlotFinder) -> BootControl:
    from partitions.bls import ENTRIES_DIR
    from partitions.sdboot import SdBootControl

    sd = config.systemd_boot
    return SdBootControl(
        boot_files(config, disk, ENTRIES_DIR),
        disk,
        config.disk.slots,
        finder,
        entry=entry_template(sd),
        tries=sd.tries,
        efivars=sd.efivars,
    )


def _grubenv(config: Config, disk: Path, finder: booted.BootedSlotFinder) -> BootControl:
    from partitions.grubenv import GrubEnvControl

    g = config.grub_env
    return GrubEnvControl(
        boot_files(config, disk, g.path),
        disk,
        config.disk.slots,
        finder,
        env_path=g.path,
        names=g.names,
    )


# [disk] backend -> its builder. Only the configured backend is loaded: the idle agent
# stays small.
BOOT_BACKENDS: dict[str, Callable[[Config, Path, booted.BootedSlotFinder], BootControl]] = {
    "gpt-prio": _gptprio,
    "systemd-boot": _sdboot,
    "grub-env": _grubenv,
}


def boot_control(config: Config) -> BootControl:
    """The backend of ``[disk] backend``, over the disk and (for a boot loader's files) the ESP."""
    finder = booted.BootedSlotFinder(config.disk.kernel_cmdline)
    return BOOT_BACKENDS[config.disk.backend](config, disk_of(config), finder)


def boot_files(config: Config, disk: Path, marker: str) -> DirStore | MtoolsStore:
    """Where the boot loader's files are: [disk] esp_partition (mtools), esp, or found.

    ``marker`` (``loader/entries``, the grubenv) picks the mounted directory
    when neither is set: the first of /efi, /boot/efi, /boot that holds it.
    """
    from partitions.filestore import DirStore, find_mounted
    from partitions.mtools import MtoolsStore, fat_partition

    d = config.disk
    if d.esp_partition is not None:
        offset, _size = fat_partition(disk, d.esp_partition)
        return MtoolsStore(disk, offset)
    if d.esp is not None:
        return DirStore(d.esp)
    return DirStore(find_mounted(ESP_CANDIDATES, marker))


def slot_boot_files(config: Config) -> BootFiles | ConfigError | None:
    """Where a release's boot files go: the ESP of [disk] esp / esp_partition, or the one
    the systemd-boot or grub-env backend uses; None for gpt-prio without an ESP set, and
    the reason when the boot loader would not boot a slot's own files (an install of a
    release that carries boot files is then refused, see Updater)."""
    from updater.bootfiles import EspBootFiles

    d = config.disk
    if problem := boot_files_unused(config):
        return problem
    if d.esp is None and d.esp_partition is None and d.backend == "gpt-prio":
        return None
    # the marker finds a mounted ESP when neither is set, as for the backend's own files
    marker = config.grub_env.path if d.backend == "grub-env" else "loader/entries"
    return EspBootFiles(boot_files(config, disk_of(config), marker))


def boot_files_unused(config: Config) -> ConfigError | None:
    """Why the configured boot loader would never boot the files a release carries for a
    slot (``/<label>/<name>`` on the ESP), or None. A new root with the old kernel would
    boot without its modules: such a release is refused rather than half installed."""
    d = config.disk
    if d.backend == "grub-env":
        return ConfigError(
            "invalid",
            "the release carries boot files and the grub-env backend boots one kernel "
            "(updater_linux) for both slots",
            key="disk.backend",
            hint='use backend systemd-boot with linux = "/{label}/vmlinuz" for releases '
            "that carry a kernel, or publish releases without --kernel/--uki",
        )
    if d.backend == "systemd-boot":
        entry = entry_template(config.systemd_boot)
        paths = [entry.linux, *entry.initrd]
        if not all("{label}" in p for p in paths):
            return ConfigError(
                "invalid",
                f"the release carries boot files and the boot entries read {paths} for every "
                "slot: the new slot would boot the old kernel",
                key="systemd-boot.linux",
                hint='point each slot at its own files: linux = "/{label}/vmlinuz", '
                'initrd = ["/{label}/initrd.img"]',
            )
    return None


def host_slots(config: Config) -> Slots:
    """The host's slots: all that `updatectl status`, `mark-good` and `rollback` need."""
    boot_files = slot_boot_files(config)
    os_release = OsReleaseFile(config.agent.os_release)
    sentinel = config.agent.reboot_sentinel
    return Slots(
        boot=boot_control(config),
        store=StateStore(config.agent.state_dir),
        clock=SystemClock(),
        os_release=os_release,
        lock=FlockHostLock(config.agent.state_dir),
        sentinel=None if sentinel is None else KuredSentinel(sentinel, os_release),
        boot_files=None if isinstance(boot_files, ConfigError) else boot_files,
        chunk_size=config.install.chunk_size,
    )


def updater(config: Config, *, progress: ProgressFn | None = None) -> Updater:
    """Check and install over the host's slots (a source must be configured)."""
    src = config.source
    http = HttpTransport(
        HttpSettings(
            src.connect_timeout_s,
            src.read_timeout_s,
            src.retries,
            src.ca_file,
            min_speed_bytes_s=src.min_speed_bytes_s,
            min_speed_window_s=src.min_speed_window_s,
            proxy=src.proxy,
        )
    )
    transport = SchemeTransport(http=http)
    # Flatcar's update.conf, read once: the server and the group the manifests must name
    omaha = omaha_settings(config) if src.kind == "omaha" else None
    source = update_source(config, transport, http, omaha=omaha)  # first: its ConfigError first
    return Updater(
        slots=host_slots(config),
        source=source,
        verifier=ChainVerifier(trust_chain(config, transport), source.root_url),
        transport=transport,
        settings=UpdateSettings(
            channel=expected_channel(config, omaha),
            readback=config.install.readback,
            chunk_size=config.install.chunk_size,
            resume_attempts=src.resume_attempts,
            delta_min_saving=config.install.delta_min_saving,
            delta=config.install.delta,
            pin=src.pin,
        ),
        policy=HostPolicyStore(config.agent.state_dir),
        blocks=version_blocks(config),
        boot_files_refusal=boot_files_unused(config),
        progress=progress,
    )


def trust_chain(config: Config, transport: Transport | None = None) -> TrustChain:
    """The host's trust root: shipped in the image ([source] trust_root, or the keyring as
    root 0), the floor in the state dir, and the repository's newer roots."""
    return TrustChain(
        state_dir=config.agent.state_dir,
        transport=transport or SchemeTransport(http=HttpTransport(HttpSettings())),
        clock=SystemClock(),
        shipped_root=config.source.trust_root,
        keyring=config.source.keyring,
    )


def version_blocks(config: Config) -> GroupBlocks | None:
    """With the etcd lock, the group's failed versions (policies.failed): a version that
    rolled back on ``[reboot] max_failures`` hosts is neither installed nor rebooted into."""
    if not (config.reboot.strategy == "lock" and config.reboot.lock == "etcd"):
        return None
    from policies.failed import FailedVersions, GroupBlocks

    r = config.reboot

    def store() -> FailedVersions:
        from policies.etcdclient import EtcdClient

        return FailedVersions(EtcdClient(etcd_settings(config)), r.group, r.max_failures)

    return GroupBlocks(r.group, store, host_id)


def timing(config: Config) -> Timing:
    a = config.agent
    return Timing(
        poll_interval_s=a.poll_interval_s,
        first_check_delay_s=a.first_check_delay_s,
        jitter=a.jitter,
        retry_base_s=a.retry_base_s,
        retry_cap_s=a.retry_cap_s,
        reboot_retry_s=config.reboot.retry_s,
    )


def health_checker(config: Config) -> HealthChecker:
    h = config.health
    return HealthChecker(h.checks_dir, h.timeout_s, h.units, SystemdUnits() if h.units else None)


async def system_bus() -> MessageBus | None:
    """The system bus (DBUS_SYSTEM_BUS_ADDRESS honoured), or None if it cannot be reached."""
    try:
        return await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), 10)
    except (OSError, TimeoutError, DBusError, ValueError) as exc:
        log.warning("system_bus_unavailable", error=str(exc))
        return None


def rebooter(bus: MessageBus | None) -> Rebooter:
    return LogindRebooter(bus) if bus is not None else UnavailableRebooter("no system bus")


def user_sessions(bus: MessageBus | None) -> UserSessions | None:
    """logind's sessions on ``bus``; without a bus, the rebooter refuses anyway."""
    return LogindSessions(bus) if bus is not None else None


def etcd_settings(config: Config) -> EtcdSettings:
    from policies.etcdclient import EtcdSettings

    e = config.etcd
    password = None
    if e.password_file is not None:
        try:
            password = e.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                "unreadable",
                exc.strerror or str(exc),
                file=str(e.password_file),
                key="etcd.password_file",
            ) from None
    return EtcdSettings(
        endpoints=e.endpoints,
        ca_file=e.ca_file,
        cert_file=e.cert_file,
        key_file=e.key_file,
        username=e.username,
        password=password,
        timeout_s=e.timeout_s,
    )


def etcd_lock(config: Config, group: str | None = None) -> EtcdLock:
    """The etcd semaphore of ``group`` (default: [reboot] group), for `updatectl lock`."""
    from policies.etcdlock import EtcdLock

    return EtcdLock.from_settings(
        etcd_settings(config), group or config.reboot.group, config.etcd.slots
    )


def reboot_lock(config: Config) -> RebootLock:
    r = config.reboot
    if r.lock == "fleetlock":
        f = config.fleetlock
        assert f.url is not None  # config validation requires it
        return FleetLock(f.url, r.group, timeout_s=f.timeout_s, ca_file=f.ca_file)
    if r.lock == "etcd":
        return etcd_lock(config)
    return NoLock()


def reboot_strategy(
    config: Config, clock: Clock, *, holder: str | None = None, metrics: Metrics | None = None
) -> RebootStrategy:
    """The configured strategy; with the lock, ``holder`` (default: this host's id) asks
    for the slot, and with the etcd lock ``metrics`` gets the holders' ages while waiting."""
    windows = config.reboot.windows
    if config.reboot.strategy == "lock":
        lock = reboot_lock(config)
        observe = None
        if metrics is not None and config.reboot.lock == "etcd":
            observe = etcd_lock_observer(cast("EtcdLock", lock), metrics)
        if metrics is not None:
            lock = MeteredLock(lock, metrics, config.reboot.group)
        return LockStrategy(lock, holder or host_id(), clock, windows, observe)
    base = STRATEGIES[config.reboot.strategy]()
    return base if windows is None else Windowed(base, windows, clock)


def request_strategy(config: Config, strategy: RebootStrategy, clock: Clock) -> RebootStrategy:
    """What `updatectl reboot` (D-Bus RequestReboot) asks: the configured strategy, its
    lock and windows; but `off` (never by itself) gives way to the admin's request,
    inside the windows if any."""
    if config.reboot.strategy != "off":
        return strategy
    base = STRATEGIES["immediate"]()
    windows = config.reboot.windows
    return base if windows is None else Windowed(base, windows, clock)


def etcd_lock_observer(lock: EtcdLock, metrics: Metrics) -> Callable[[bool], None]:
    """While this host waits for a slot, read the holders and their start times into
    the metrics (one more etcd read per refusal); once granted, drop them."""

    def observe(granted: bool) -> None:
        if granted:
            metrics.lock_not_waiting(lock.group)
            return
        st = lock.status()
        if st is None:
            metrics.lock_not_waiting(lock.group)
            return
        since = [h.since for h in st.holders if h.since is not None]
        metrics.lock_waiting(lock.group, len(st.holders), st.total_slots, min(since, default=None))

    return observe


def fleet_reporter(config: Config, *, holder: str | None = None) -> EtcdFleetReporter | None:
    """This host's fleet record in etcd, whatever its reboot strategy
    (settings.fleet_publishing: [fleet] publish, by default with etcd configured)."""
    if not fleet_publishing(config):
        return None
    from policies.etcdclient import EtcdClient
    from policies.fleet import FleetPublisher
    from updater.fleetreport import EtcdFleetReporter

    ttl = 3 * config.agent.poll_interval_s
    hid = holder or host_id()
    publisher = FleetPublisher(EtcdClient(etcd_settings(config)), hid, ttl)
    return EtcdFleetReporter(publisher, hid, config.reboot.group, config.reboot.strategy)


class _RebooterOnDemand:
    """A Rebooter that reaches the system bus only when a reboot is asked for:
    `updatectl mark-good` needs one only to fall back from a failed trial boot, and
    a healthy boot should not depend on (or warn about) a bus it does not use."""

    async def reboot(self) -> None:
        bus = await system_bus()
        try:
            await rebooter(bus).reboot()
        finally:
            if bus is not None:
                bus.disconnect()


async def mark_good(config: Config) -> Slot:
    """`updatectl mark-good`: health checks, then bless (or give up) the booted slot."""
    return await bless(host_slots(config), health_checker(config), _RebooterOnDemand())


def build_agent(
    config: Config,
    up: Updater,
    reboot: Rebooter,
    metrics: Metrics,
    notifier: Notifier,
    *,
    holder: str | None = None,
    users: UserSessions | None = None,
    config_file: Path | None = None,
) -> Agent:
    """The agent of ``config`` (``holder``: its lock and fleet id, default this host's;
    ``users``: who is logged in, asked before a reboot unless ``[reboot] wait_for_users``
    is false)."""
    checks = health_checker(config)
    strategy = reboot_strategy(config, up.slots.clock, holder=holder, metrics=metrics)
    return Agent(
        updater=up,
        strategy=strategy,
        on_request=request_strategy(config, strategy, up.slots.clock),
        rebooter=reboot,
        bless=lambda: bless(up.slots, checks, reboot),
        clock=up.slots.clock,
        notifier=notifier,
        metrics=metrics,
        timing=replace(timing(config), release_after_s=config.reboot.release_after_s),
        pre_reboot=HealthChecker(
            config.reboot.pre_reboot_dir,
            config.reboot.pre_reboot_timeout_s,
            event="pre_reboot_hook",
        ),
        fleet=fleet_reporter(config, holder=holder),
        users=users if config.reboot.wait_for_users else None,
        # D-Bus Reload: the configuration as it is now, from where this one came
        reloader=lambda: updater(load_config(config_file)),
    )


async def run_agent(config: Config, config_file: Path | None = None) -> None:
    """`updatectl agent`: run until SIGTERM or SIGINT (``config_file``: what `--config`
    named, read again on D-Bus Reload)."""
    up = updater(config)
    bus = await system_bus()
    metrics = Metrics()
    server = metrics.serve(config.metrics.listen) if config.metrics.listen else None
    agent = build_agent(
        config,
        up,
        rebooter(bus),
        metrics,
        Notifier(),
        users=user_sessions(bus),
        config_file=config_file,
    )
    service = None
    if bus is not None and config.agent.dbus:
        service = await dbus_api.serve(agent, bus, coreos_compat=config.agent.coreos_compat)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.run(stop)
    finally:
        if service is not None:
            await service.close()
        if bus is not None:
            bus.disconnect()
        if server is not None:
            server.close()
