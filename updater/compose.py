"""The composition root: the one place that builds real objects from the config."""

from __future__ import annotations

from pathlib import Path

from partitions import booted
from partitions.gptprio import GptPrioBootControl
from updater.clock import SystemClock
from updater.config import Config
from updater.errors import ConfigError
from updater.gpg import GnupgVerifier
from updater.install import ProgressFn
from updater.source import HttpCache, StaticSource
from updater.state import StateStore
from updater.transport import HttpSettings, HttpTransport, SchemeTransport
from updater.update import Updater


def disk_of(config: Config) -> Path:
    return config.disk.device or booted.booted_disk()


def boot_control(config: Config) -> GptPrioBootControl:
    return GptPrioBootControl(disk_of(config), config.disk.slots, config.disk.kernel_cmdline)


def updater(
    config: Config, *, progress: ProgressFn | None = None, need_source: bool = False
) -> Updater:
    src = config.source
    transport = SchemeTransport(
        http=HttpTransport(
            HttpSettings(src.connect_timeout_s, src.read_timeout_s, src.retries, src.ca_file)
        )
    )
    source = None
    if src.url is not None:
        cache = HttpCache(config.agent.state_dir / "cache")
        source = StaticSource(src.url, src.channel, transport, cache)
    elif need_source:
        raise ConfigError(
            "missing",
            "no release repository is configured",
            key="source.url",
            hint="set [source] url in a file under /etc/updater/config.d/",
        )
    return Updater(
        boot=boot_control(config),
        store=StateStore(config.agent.state_dir),
        clock=SystemClock(),
        os_release=config.agent.os_release,
        channel=src.channel,
        source=source,
        verifier=GnupgVerifier(src.keyring),
        transport=transport,
        readback=config.install.readback,
        chunk_size=config.install.chunk_size,
        resume_attempts=src.resume_attempts,
        reboot_sentinel=config.agent.reboot_sentinel,
        progress=progress,
    )
