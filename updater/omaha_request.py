"""The Omaha v3 request document as update_engine sends it, and its events. Pure.

Requests have update_engine's shape, attribute for attribute, so that
Nebraska (the Flatcar update server) and other CoreOS-style Omaha servers
treat this agent like update_engine::

    <request protocol="3.0" version=... updaterversion=... installsource=... ismachine="1">
      <os version=... platform=... sp=... arch=.../>
      <app appid=... version=... track=... from_track=... bootid="{...}" oem=...
           oemversion=... alephversion=... machineid=... machinealias=... lang=...
           board=... hardware_class=... delta_okay="false">
        <ping active="1" a=... r=.../>
        <updatecheck targetversionprefix=""/>
        <event eventtype=... eventresult=... [errorcode=...] [previousversion=...]/>
      </app>
    </request>

The answer is read by :mod:`updater.omaha`; an event's error code comes from
:mod:`updater.omaha_codes`.
"""

from __future__ import annotations

import enum
import re
import xml.etree.ElementTree as ET  # building only; answers are parsed with defusedxml
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from updater import __version__
from updater.errors import ConfigError
from updater.omaha_codes import ErrorCode as _E
from updater.omaha_codes import error_code_for_error

PROTOCOL: Final = "3.0"
FLATCAR_APP_ID: Final = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"  # update_engine's kAppId
UPDATER_VERSION: Final = f"updater-{__version__}"


# -- events -----------------------------------------------------------------------------------


class EventType(enum.IntEnum):
    """``OmahaEvent::Type`` (``omaha_request_action.h``) that update_engine sends."""

    UPDATE_COMPLETE = 3
    UPDATE_DOWNLOAD_STARTED = 13
    UPDATE_DOWNLOAD_FINISHED = 14


class EventResult(enum.IntEnum):
    """``OmahaEvent::Result``."""

    ERROR = 0
    SUCCESS = 1
    SUCCESS_REBOOT = 2
    UPDATE_DEFERRED = 9


@dataclass(frozen=True)
class OmahaEvent:
    """One ``<event>``. Plain ints (an :class:`EventType` is one), so events persist as JSON
    (:meth:`as_dict`) and can wait in the state file for a server that was unreachable."""

    type: int
    result: int
    error_code: int = 0
    previous_version: str | None = None  # sent with 3/2, the version before the reboot

    def __post_init__(self) -> None:
        for name in ("type", "result", "error_code"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Omaha event {name} must be an int >= 0, not {value!r}")
            object.__setattr__(self, name, int(value))
        if self.previous_version is not None and not isinstance(self.previous_version, str):
            raise ValueError(f"previous_version must be a string: {self.previous_version!r}")

    def as_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {
            "type": self.type,
            "result": self.result,
            "error_code": self.error_code,
        }
        if self.previous_version is not None:
            out["previous_version"] = self.previous_version
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, object]) -> OmahaEvent:
        """The inverse of :meth:`as_dict`; ValueError if ``obj`` is not one."""
        type_, result = obj.get("type"), obj.get("result")
        code, previous = obj.get("error_code", 0), obj.get("previous_version")
        if not (isinstance(type_, int) and isinstance(result, int) and isinstance(code, int)):
            raise ValueError(f"not an Omaha event: {obj!r}")
        if previous is not None and not isinstance(previous, str):
            raise ValueError(f"not an Omaha event: {obj!r}")
        return cls(type_, result, code, previous)

    @classmethod
    def download_started(cls) -> OmahaEvent:
        return cls(EventType.UPDATE_DOWNLOAD_STARTED, EventResult.SUCCESS)

    @classmethod
    def download_finished(cls) -> OmahaEvent:
        return cls(EventType.UPDATE_DOWNLOAD_FINISHED, EventResult.SUCCESS)

    @classmethod
    def install_staged(cls) -> OmahaEvent:
        """3/1: the update is written and will be booted next."""
        return cls(EventType.UPDATE_COMPLETE, EventResult.SUCCESS)

    @classmethod
    def rebooted(cls, previous_version: str) -> OmahaEvent:
        """3/2: the first check after booting the update (Nebraska's "Complete").

        Nebraska ignores a 3/2 of Flatcar's app id whose previous version is
        "" or "0.0.0.0": send the version that was booted before.
        """
        return cls(
            EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT, previous_version=previous_version
        )

    @classmethod
    def rollback(cls) -> OmahaEvent:
        """3/0 errorcode 44: the machine came back on the old version."""
        return cls(EventType.UPDATE_COMPLETE, EventResult.ERROR, _E.ROLLBACK_ERROR)

    @classmethod
    def failure(cls, error_code: int) -> OmahaEvent:
        return cls(EventType.UPDATE_COMPLETE, EventResult.ERROR, error_code)

    @classmethod
    def failed_with(cls, exc: BaseException, *, during_check: bool = False) -> OmahaEvent:
        return cls.failure(error_code_for_error(exc, during_check=during_check))

    @classmethod
    def deferred(cls, error_code: int = _E.OMAHA_UPDATE_DEFERRED_PER_POLICY) -> OmahaEvent:
        """3/9, as update_engine reports an update held back by policy."""
        return cls(EventType.UPDATE_COMPLETE, EventResult.UPDATE_DEFERRED, error_code)


# -- requests ---------------------------------------------------------------------------------

# uname -m -> (Omaha os/@arch, Flatcar board). Nebraska picks the architecture
# from the board first (amd64-usr, arm64-usr), then from os/@arch.
_ARCHES: Final[Mapping[str, tuple[str, str]]] = {
    "x86_64": ("x64", "amd64-usr"),
    "amd64": ("x64", "amd64-usr"),
    "aarch64": ("arm64", "arm64-usr"),
    "arm64": ("arm64", "arm64-usr"),
    "i386": ("x86", ""),
    "i686": ("x86", ""),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def omaha_arch(machine: str) -> str:
    return _ARCHES.get(machine, (machine, ""))[0]


def default_board(machine: str) -> str:
    return _ARCHES.get(machine, ("", ""))[1]


def braced(uuid_text: str) -> str:
    """``{...}``: how update_engine sends the boot id (and its app id)."""
    text = uuid_text.strip()
    return text if text.startswith("{") and text.endswith("}") else "{" + text + "}"


def normalize_app_id(app_id: str) -> str:
    """Compare app ids without braces and case (servers echo either form)."""
    return app_id.strip().strip("{}").lower()


@dataclass(frozen=True)
class OmahaRequestContext:
    """Who is asking: fixed for one agent run (the boot id for one boot)."""

    app_id: str
    version: str  # the booted OS version
    track: str  # Nebraska's group (update_engine's GROUP)
    machine_id: str  # /etc/machine-id, as update_engine sends it
    boot_id: str  # sent in braces
    machine: str  # uname -m
    board: str | None = None  # None: from machine (amd64-usr, arm64-usr)
    os_platform: str = "CoreOS"  # update_engine's kOsPlatform
    os_version: str = "Chateau"  # update_engine's kOsVersion
    os_sp: str | None = None  # None: "<version>_<machine>", as update_engine
    oem: str = ""
    oem_version: str = ""
    aleph_version: str | None = None  # the first version installed; None: version
    machine_alias: str = ""
    lang: str = "en-US"
    hardware_class: str = ""
    delta_okay: bool = False
    from_track: str | None = None  # None: track (no channel change)
    target_version_prefix: str = ""
    updater_version: str = UPDATER_VERSION

    def __post_init__(self) -> None:
        for name in ("app_id", "version", "track"):
            if not getattr(self, name).strip():
                raise ConfigError("invalid", f"the Omaha {name} is empty", key=name)
        for name, value in vars(self).items():
            if isinstance(value, str) and _CONTROL.search(value):
                raise ConfigError(
                    "invalid", f"the Omaha {name} contains control characters", key=name
                )


def _attrs(element: ET.Element, pairs: Sequence[tuple[str, str]]) -> None:
    for key, value in pairs:
        element.set(key, value)


def build_request(
    ctx: OmahaRequestContext,
    *,
    ping: bool,
    updatecheck: bool,
    events: Sequence[OmahaEvent] = (),
    interactive: bool = False,
    days_since_active_ping: int = -1,
    days_since_rollcall: int = -1,
) -> bytes:
    """The request document, UTF-8 with an XML declaration.

    ``interactive`` says a person asked (installsource "ondemandupdate"
    instead of "scheduler"). The ping's ``a``/``r`` are days since the last
    active and roll-call ping, -1 for "first" (Nebraska ignores both).
    """
    request = ET.Element("request")
    _attrs(
        request,
        [
            ("protocol", PROTOCOL),
            ("version", ctx.updater_version),
            ("updaterversion", ctx.updater_version),
            ("installsource", "ondemandupdate" if interactive else "scheduler"),
            ("ismachine", "1"),
        ],
    )
    _attrs(
        ET.SubElement(request, "os"),
        [
            ("version", ctx.os_version),
            ("platform", ctx.os_platform),
            ("sp", ctx.os_sp if ctx.os_sp is not None else f"{ctx.version}_{ctx.machine}"),
            ("arch", omaha_arch(ctx.machine)),
        ],
    )
    app = ET.SubElement(request, "app")
    _attrs(
        app,
        [
            ("appid", ctx.app_id),
            ("version", ctx.version),
            ("track", ctx.track),
            ("from_track", ctx.from_track if ctx.from_track is not None else ctx.track),
            ("bootid", braced(ctx.boot_id)),
            ("oem", ctx.oem),
            ("oemversion", ctx.oem_version),
            ("alephversion", ctx.aleph_version if ctx.aleph_version is not None else ctx.version),
            ("machineid", ctx.machine_id),
            ("machinealias", ctx.machine_alias),
            ("lang", ctx.lang),
            ("board", ctx.board if ctx.board is not None else default_board(ctx.machine)),
            ("hardware_class", ctx.hardware_class),
            ("delta_okay", "true" if ctx.delta_okay else "false"),
        ],
    )
    if ping:
        _attrs(
            ET.SubElement(app, "ping"),
            [("active", "1"), ("a", str(days_since_active_ping)), ("r", str(days_since_rollcall))],
        )
    if updatecheck:
        _attrs(
            ET.SubElement(app, "updatecheck"), [("targetversionprefix", ctx.target_version_prefix)]
        )
    for event in events:
        element = ET.SubElement(app, "event")
        _attrs(
            element,
            [("eventtype", str(int(event.type))), ("eventresult", str(int(event.result)))],
        )
        # update_engine sends errorcode only with a result other than success
        if event.result not in (EventResult.SUCCESS, EventResult.SUCCESS_REBOOT) or (
            event.error_code
        ):
            element.set("errorcode", str(event.error_code))
        if event.previous_version is not None:
            element.set("previousversion", event.previous_version)
    body = ET.tostring(request, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n").encode()
