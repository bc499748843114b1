"""The configuration's model: validated, frozen settings, one dataclass per section.

What every key means and its default; :mod:`updater.config` reads the TOML
drop-ins into these (:func:`updater.config.load`), checking every value once,
at load. Units are in the field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitions.bootcontrol import GRUBENV_NAMES, GRUBENV_PATH, SDBOOT_EFIVARS, SDBOOT_TRIES

if TYPE_CHECKING:
    from partitions.bls import EntryTemplate
    from policies.windows import Windows
    from updater.log import LogMode


@dataclass(frozen=True)
class SourceConfig:
    url: str | None = None  # release repository base URL (http, https, file)
    channel: str = "stable"
    keyring: tuple[Path, ...] = ()  # public key files; none configured = error at check time
    # the signed trust root shipped in the OS image (keys/root.<N>.json); None: keyring is root 0
    trust_root: Path | None = None
    ca_file: Path | None = None  # PEM bundle for https; None: the system's CA store
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3  # urllib3 retries for connection errors and 5xx
    resume_attempts: int = 5  # Range resumes after a dropped download
    kind: str = "static"  # static (a release repository) | omaha (an update server)
    # A transfer slower than this on average over a window is abandoned (and resumed):
    min_speed_bytes_s: float = 1024.0  # 0: no floor
    min_speed_window_s: float = 60.0
    # the repository's and the Omaha server's HTTP proxy (http(s)://[user:pass@]host:port);
    # None: HTTPS_PROXY / HTTP_PROXY from the environment, if set. NO_PROXY applies to both.
    proxy: str | None = None
    pin: str | None = None  # "1.4.*" or a version prefix: only that line (updater.hostpolicy)


@dataclass(frozen=True)
class OmahaConfig:
    server: str | None = None  # e.g. https://nebraska.example.com/v1/update/
    app_id: str = "{3c1f8a7e-5d2b-4b8e-9f61-0a7c2e4d9b13}"  # the app in Nebraska
    group: str | None = None  # Omaha track; unset: Flatcar's GROUP=, else [source] channel
    flatcar_conf: bool = True  # read SERVER=/GROUP= from update.conf when unset


@dataclass(frozen=True)
class DiskConfig:
    device: Path | None = None  # None: the disk holding the booted root
    slots: tuple[str, str] = ("USR-A", "USR-B")
    kernel_cmdline: Path = Path("/proc/cmdline")
    backend: str = "gpt-prio"  # gpt-prio | systemd-boot | grub-env
    # Where systemd-boot's entries or the grubenv live: a mounted directory ...
    esp: Path | None = None  # None: the first of ESP_CANDIDATES that has the backend's files
    # ... or the GPT partition of that name on `device`, edited with mtools (image files)
    esp_partition: str | None = None


BACKENDS = ("gpt-prio", "systemd-boot", "grub-env")
ESP_CANDIDATES = (Path("/efi"), Path("/boot/efi"), Path("/boot"))


# The Boot Loader Spec entry written per slot; ``{label}``, ``{partuuid}`` filled in.
DEFAULT_ENTRY: Mapping[str, Any] = {
    "title": "{label}",
    "linux": "/vmlinuz",  # on the ESP; e.g. "/{label}/vmlinuz" for a kernel per slot
    "initrd": ("/initrd.img",),
    "options": "mount.usr=PARTUUID={partuuid} ro",
    "sort_key": "updater",
    "prefix": "updater",  # entries are loader/entries/<prefix>-<label>[+L-D].conf
}


@dataclass(frozen=True)
class SystemdBootConfig:
    tries: int = SDBOOT_TRIES  # boot attempts of a new slot before systemd-boot gives up on it
    efivars: Path = SDBOOT_EFIVARS
    # The entry of [systemd-boot] title, linux, initrd, options, sort_key and prefix, built
    # and checked at load; None (no [systemd-boot] section): DEFAULT_ENTRY, built only
    # when the backend is used (entry_template), so that the idle agent does not load it.
    entry: EntryTemplate | None = None


@dataclass(frozen=True)
class GrubEnvConfig:
    path: str = GRUBENV_PATH  # the environment block, relative to [disk] esp
    names: tuple[str, str] = GRUBENV_NAMES  # the slots' names in ORDER, A_OK, ...: as [disk] slots


@dataclass(frozen=True)
class InstallConfig:
    readback: bool = True  # re-read and hash the slot before making it bootable
    chunk_size: int = 1024 * 1024  # bytes per read/write
    # A delta update (reuse the slots' blocks, fetch the rest) is taken when it saves
    # at least this share of the full download (0..1); else the whole image.
    delta_min_saving: float = 0.2
    delta: bool = True  # false: always the full download (no scan of the slots)


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = Path("/var/lib/updater")
    os_release: Path = Path("/usr/lib/os-release")
    reboot_sentinel: Path | None = Path("/run/reboot-required")
    poll_interval_s: float = 3600.0
    first_check_delay_s: float = 60.0
    jitter: float = 0.1  # +- fraction of every delay
    retry_base_s: float = 60.0  # first retry after a failure, doubling
    retry_cap_s: float = 3600.0  # the longest backoff
    dbus: bool = True  # publish org.updater.Agent1 on the system bus
    coreos_compat: bool = False  # also com.coreos.update1 (locksmith, FLUO)
    log: LogMode = "auto"


@dataclass(frozen=True)
class RebootConfig:
    strategy: str = "immediate"  # immediate | off | lock
    retry_s: float = 60.0  # ask the policy (the lock: one etcd read) / logind again after this
    lock: str = "etcd"  # with strategy = "lock": etcd | fleetlock | none
    group: str = "default"  # hosts that share the lock's slots
    release_after_s: float = 900.0  # give the slot back when logind refuses this long
    pre_reboot_dir: Path = Path("/etc/updater/pre-reboot.d")
    pre_reboot_timeout_s: float = 60.0
    wait_for_users: bool = True  # no reboot while interactive users are logged in (logind)
    time_zone: str = "UTC"  # of the windows: an IANA name, "UTC" or "localtime"
    # [[reboot.window]] tables and locksmith's window_start = "Thu 04:00" with
    # window_length = "1h30m", parsed at load; None: no windows are configured
    windows: Windows | None = None
    windows_file: str | None = None  # where the windows were set
    # hosts that must roll back from a version before the group refuses it (with etcd)
    max_failures: int = 1


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    slots: int = 1  # total_slots of a semaphore this host creates
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    timeout_s: float = 5.0
    publish_status: bool = True  # keep this host's status under updater/v1/hosts/
    endpoints_set: bool = False  # endpoints were given in a file (not the default)


@dataclass(frozen=True)
class FleetConfig:
    # keep this host's record under updater/v1/hosts/ in etcd; None: when an etcd
    # endpoint is configured or the etcd lock is used (fleet_publishing)
    publish: bool | None = None


@dataclass(frozen=True)
class FleetLockConfig:
    url: str | None = None  # ${group} is replaced by [reboot] group
    ca_file: Path | None = None
    timeout_s: float = 10.0


@dataclass(frozen=True)
class HealthConfig:
    checks_dir: Path = Path("/etc/updater/health.d")
    timeout_s: float = 60.0  # per check
    units: tuple[str, ...] = ()  # systemd units that must be active


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "127.0.0.1:9464" or "unix:/run/updater/metrics.sock"


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    omaha: OmahaConfig = field(default_factory=OmahaConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    systemd_boot: SystemdBootConfig = field(default_factory=SystemdBootConfig)
    grub_env: GrubEnvConfig = field(default_factory=GrubEnvConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    reboot: RebootConfig = field(default_factory=RebootConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    fleetlock: FleetLockConfig = field(default_factory=FleetLockConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    files: tuple[Path, ...] = ()  # where it came from, in merge order


def fleet_publishing(config: Config) -> bool:
    """Whether this host keeps its fleet record in etcd, whatever its reboot strategy:
    ``[fleet] publish`` if set; else not when the older ``[etcd] publish_status`` is
    false; else when an etcd endpoint is configured or the etcd lock is used."""
    if config.fleet.publish is not None:
        return config.fleet.publish
    if not config.etcd.publish_status:
        return False
    etcd_lock = config.reboot.strategy == "lock" and config.reboot.lock == "etcd"
    return config.etcd.endpoints_set or etcd_lock
