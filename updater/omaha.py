"""Omaha v3 as update_engine speaks it: request documents, response parsing,
events and error codes. Pure: no I/O (the HTTP side is :mod:`updater.omaha_client`).

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

Responses are parsed with defusedxml (no DTD, no entities, no external
references) after a size check, and read as update_engine reads them
(``omaha_request_action.cc``): ``updatecheck/@status`` "noupdate" or "ok"
(anything else is an error), ``@PollInterval``, ``manifest/@version``,
``urls/url/@codebase`` (+ "/" if missing) + the *first* package's ``@name``,
its ``@size`` (> 0), and the payload's SHA-256: base64 in the postinstall
action's ``sha256`` (update_engine's source) or hex in the first package's
``hash_sha256`` (Nebraska's extra-file attribute); the SHA-1 ``hash`` is
ignored. Nebraska's rollout policy answers ``<app status="error-...">``
(:data:`DEFERRAL_STATUSES`): that is a :class:`Deferred`, not an error; any
other ``error-*`` app status is the server refusing the request
(``server_refused``: an unregistrable version, an unknown app or group), an
error an admin must act on. Only ``<response protocol="3.0">`` is read.

An Omaha answer is not a signature: the agent must still verify the signed
manifest published beside the package (:attr:`UpdateOffer.manifest_url`), and
the offer's URL, size and SHA-256 must be the manifest's own.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import xml.etree.ElementTree as ET  # building only; parsing goes through defusedxml
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import defusedxml
import defusedxml.ElementTree

from updater import __version__, versions
from updater.errors import ConfigError, OmahaError, UpdaterError
from updater.urls import parse_url

PROTOCOL: Final = "3.0"
FLATCAR_APP_ID: Final = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"  # update_engine's kAppId
MAX_RESPONSE_BYTES: Final = 1024 * 1024  # an update check answer is a few KiB
UPDATER_VERSION: Final = f"updater-{__version__}"

# Where the signed manifest of a package lives: beside it, under the same codebase.
MANIFEST_SUFFIX: Final = ".json"
SIGNATURE_SUFFIX: Final = ".json.asc"


# -- error codes ------------------------------------------------------------------------------


class ErrorCode(enum.IntEnum):
    """update_engine's ``ActionExitCode`` values (flatcar/update_engine,
    ``src/update_engine/action_processor.h``), as sent in ``errorcode``."""

    SUCCESS = 0
    ERROR = 1
    OMAHA_REQUEST_ERROR = 2
    OMAHA_RESPONSE_HANDLER_ERROR = 3
    FILESYSTEM_COPIER_ERROR = 4
    POSTINSTALL_RUNNER_ERROR = 5
    INSTALL_DEVICE_OPEN_ERROR = 7
    KERNEL_DEVICE_OPEN_ERROR = 8
    DOWNLOAD_TRANSFER_ERROR = 9
    PAYLOAD_HASH_MISMATCH_ERROR = 10
    PAYLOAD_SIZE_MISMATCH_ERROR = 11
    DOWNLOAD_PAYLOAD_VERIFICATION_ERROR = 12
    DOWNLOAD_NEW_PARTITION_INFO_ERROR = 13
    DOWNLOAD_WRITE_ERROR = 14
    NEW_ROOTFS_VERIFICATION_ERROR = 15
    NEW_KERNEL_VERIFICATION_ERROR = 16
    SIGNED_DELTA_PAYLOAD_EXPECTED_ERROR = 17
    DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR = 18
    POSTINSTALL_BOOTED_FROM_FIRMWARE_B = 19
    DOWNLOAD_STATE_INITIALIZATION_ERROR = 20
    DOWNLOAD_INVALID_METADATA_MAGIC_STRING = 21
    DOWNLOAD_SIGNATURE_MISSING_IN_MANIFEST = 22
    DOWNLOAD_MANIFEST_PARSE_ERROR = 23
    DOWNLOAD_METADATA_SIGNATURE_ERROR = 24
    DOWNLOAD_METADATA_SIGNATURE_VERIFICATION_ERROR = 25
    DOWNLOAD_METADATA_SIGNATURE_MISMATCH = 26
    DOWNLOAD_OPERATION_HASH_VERIFICATION_ERROR = 27
    DOWNLOAD_OPERATION_EXECUTION_ERROR = 28
    DOWNLOAD_OPERATION_HASH_MISMATCH = 29
    OMAHA_REQUEST_EMPTY_RESPONSE_ERROR = 30
    OMAHA_REQUEST_XML_PARSE_ERROR = 31
    DOWNLOAD_INVALID_METADATA_SIZE = 32
    DOWNLOAD_INVALID_METADATA_SIGNATURE = 33
    OMAHA_RESPONSE_INVALID = 34
    OMAHA_UPDATE_IGNORED_PER_POLICY = 35
    OMAHA_UPDATE_DEFERRED_PER_POLICY = 36
    OMAHA_ERROR_IN_HTTP_RESPONSE = 37
    DOWNLOAD_OPERATION_HASH_MISSING_ERROR = 38
    DOWNLOAD_METADATA_SIGNATURE_MISSING_ERROR = 39
    OMAHA_UPDATE_DEFERRED_FOR_BACKOFF = 40
    POSTINSTALL_POWERWASH_ERROR = 41
    NEW_PCR_POLICY_VERIFICATION_ERROR = 42
    NEW_PCR_POLICY_HTTP_ERROR = 43
    ROLLBACK_ERROR = 44
    OMAHA_REQUEST_HTTP_RESPONSE_BASE = 2000  # + the HTTP status of a failed update check


_E = ErrorCode

# Our error kinds -> update_engine's code; the table is in error_code_for's docstring.
ERROR_CODES: Final[Mapping[str, ErrorCode]] = {
    # VerificationError
    "hash_mismatch": _E.PAYLOAD_HASH_MISMATCH_ERROR,
    "size_mismatch": _E.PAYLOAD_SIZE_MISMATCH_ERROR,
    "expired": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "older_than_booted": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "below_highest_accepted": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "channel_mismatch": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "image_too_large": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "source_mismatch": _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
    "signature_missing": _E.SIGNED_DELTA_PAYLOAD_EXPECTED_ERROR,
    "signature_invalid": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "no_keyring": _E.DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR,
    "manifest_malformed": _E.DOWNLOAD_MANIFEST_PARSE_ERROR,
    "manifest_too_large": _E.DOWNLOAD_INVALID_METADATA_SIZE,
    "decompress_failed": _E.DOWNLOAD_OPERATION_EXECUTION_ERROR,
    # DownloadError
    "connection": _E.DOWNLOAD_TRANSFER_ERROR,
    "timeout": _E.DOWNLOAD_TRANSFER_ERROR,
    "http_status": _E.DOWNLOAD_TRANSFER_ERROR,
    "unsupported_url": _E.DOWNLOAD_TRANSFER_ERROR,
    "too_much_data": _E.PAYLOAD_SIZE_MISMATCH_ERROR,
    # DiskError
    "io": _E.DOWNLOAD_WRITE_ERROR,
    "gpt_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "slot_not_found": _E.INSTALL_DEVICE_OPEN_ERROR,
    "booted_unknown": _E.INSTALL_DEVICE_OPEN_ERROR,
    "not_a_disk": _E.INSTALL_DEVICE_OPEN_ERROR,
    "esp_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "boot_entry_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "grubenv_invalid": _E.INSTALL_DEVICE_OPEN_ERROR,
    "readback_mismatch": _E.NEW_ROOTFS_VERIFICATION_ERROR,
    # OmahaError
    "empty_response": _E.OMAHA_REQUEST_EMPTY_RESPONSE_ERROR,
    "xml_parse": _E.OMAHA_REQUEST_XML_PARSE_ERROR,
    "xml_forbidden": _E.OMAHA_REQUEST_XML_PARSE_ERROR,
    "invalid_response": _E.OMAHA_RESPONSE_INVALID,
    "unknown_status": _E.OMAHA_RESPONSE_INVALID,
    "size_invalid": _E.OMAHA_RESPONSE_INVALID,
    "missing_codebase": _E.OMAHA_RESPONSE_INVALID,
    "package_url": _E.OMAHA_RESPONSE_INVALID,
    "hash_missing": _E.OMAHA_RESPONSE_INVALID,
    "hash_invalid": _E.OMAHA_RESPONSE_INVALID,
    "too_large": _E.OMAHA_RESPONSE_INVALID,
    "unsupported_protocol": _E.OMAHA_RESPONSE_INVALID,
    "server_refused": _E.OMAHA_RESPONSE_INVALID,
    # outcomes that are no exception of ours
    "deferred": _E.OMAHA_UPDATE_DEFERRED_PER_POLICY,
    "rollback": _E.ROLLBACK_ERROR,
    # HealthError: the new boot was not blessed, the machine falls back to the old version
    "check_failed": _E.ROLLBACK_ERROR,
    "check_timeout": _E.ROLLBACK_ERROR,
    "unit_inactive": _E.ROLLBACK_ERROR,
    # the generic code, listed so that every kind is a decision (tests check coverage)
    **dict.fromkeys(
        (
            "internal",
            "unreadable",
            "syntax",
            "invalid",
            "missing",
            "rollback_refused",
            "booted_not_good",
            "busy",
            "nothing_staged",
            "reboot_refused",
            "no_free_slot",
            "last_bootable_slot",
            "version_blocked",
            "not_blocked",
            "unwritable",
            "newer_schema",
            "unavailable",
            "malformed",
            "conflict",
            "refused",
            "bad_argument",
            "cancelled",
            "command_failed",
            "command_missing",
            "command_timeout",
        ),
        _E.ERROR,
    ),
}


def error_code_for(kind: str) -> int:
    """update_engine's error code for one of our error kinds; kActionCodeError (1) if unknown.

    Every kind of the categories in :mod:`updater.errors` and of
    :class:`OmahaError` is in :data:`ERROR_CODES` (a test checks it), so
    adding a kind forces a decision here. Numbers and names are
    update_engine's ``ActionExitCode`` (flatcar/update_engine,
    ``src/update_engine/action_processor.h``):

    ==========================================  =====================================  ====
    kind(s)                                     update_engine name                     code
    ==========================================  =====================================  ====
    hash_mismatch                               kActionCodePayloadHashMismatchError     10
    size_mismatch, too_much_data                kActionCodePayloadSizeMismatchError     11
    expired, older_than_booted,                 kActionCodeDownloadPayload-             12
    below_highest_accepted, channel_mismatch,   VerificationError
    image_too_large, source_mismatch
    signature_missing                           kActionCodeSignedDeltaPayloadExpected-  17
                                                Error (signature data empty)
    signature_invalid, no_keyring               kActionCodeDownloadPayloadPubKey-       18
                                                VerificationError
    manifest_malformed                          kActionCodeDownloadManifestParseError   23
    manifest_too_large                          kActionCodeDownloadInvalidMetadataSize  32
    decompress_failed                           kActionCodeDownloadOperation-           28
                                                ExecutionError
    connection, timeout, http_status,           kActionCodeDownloadTransferError         9
    unsupported_url
    io                                          kActionCodeDownloadWriteError           14
    gpt_invalid, slot_not_found,                kActionCodeInstallDeviceOpenError        7
    booted_unknown, not_a_disk, esp_invalid,
    boot_entry_invalid, grubenv_invalid
    readback_mismatch                           kActionCodeNewRootfsVerificationError   15
    empty_response                              kActionCodeOmahaRequestEmptyResponse-   30
                                                Error
    xml_parse, xml_forbidden                    kActionCodeOmahaRequestXMLParseError    31
    invalid_response, unknown_status,           kActionCodeOmahaResponseInvalid         34
    size_invalid, missing_codebase,
    package_url, hash_missing, hash_invalid,
    too_large, unsupported_protocol,
    server_refused
    deferred (Nebraska's error-... app status)  kActionCodeOmahaUpdateDeferredPerPolicy 36
    rollback, check_failed, check_timeout,      kActionCodeRollbackError                44
    unit_inactive (the new boot failed and the
    machine is back on the old version)
    everything else (config, state, lock,       kActionCodeError                         1
    refusals, commands, cancelled)
    ==========================================  =====================================  ====

    A failed update check itself is 2000 + the HTTP status (0 when no answer,
    999 when out of range), as update_engine's OmahaRequestAction does
    (:func:`error_code_for_error` with ``during_check=True``).
    """
    return int(ERROR_CODES.get(kind, _E.ERROR))


def http_error_code(status: int | None) -> int:
    """The code of a failed update check: 2000 + HTTP status (0: no answer; 999 if out of range)."""
    code = 0 if status is None else status
    if code < 0 or code >= 1000:
        code = 999
    return int(_E.OMAHA_REQUEST_HTTP_RESPONSE_BASE) + code


def error_code_for_error(exc: BaseException, *, during_check: bool = False) -> int:
    """The code to report for ``exc``.

    ``during_check``: the exception came from the update check request itself;
    a transport failure there is 2000 + HTTP status (update_engine's
    OmahaRequestAction), elsewhere it is a payload download error (9).
    """
    if not isinstance(exc, UpdaterError):
        return int(_E.ERROR)
    if during_check and exc.category == "download" and not isinstance(exc, OmahaError):
        return http_error_code(getattr(exc, "status", None))
    return error_code_for(exc.kind)


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


# -- responses --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoUpdate:
    poll_interval_s: int | None = None  # the server's PollInterval, if it sent one


@dataclass(frozen=True)
class Deferred:
    """The server's rollout policy holds the update back: ask again later."""

    reason: str  # the app status, e.g. "error-maxUpdatesPerPeriodLimitReached"
    poll_interval_s: int | None = None


# Nebraska's rollout-policy answers (its handleRolloutPolicyErrors), and CoreUpdate's
# office hours: the update exists, this host just does not get it yet.
DEFERRAL_STATUSES: Final = frozenset(
    {
        "error-maxUpdatesPerPeriodLimitReached",
        "error-maxConcurrentUpdatesLimitReached",
        "error-maxTimedOutUpdatesLimitReached",
        "error-updatesDisabled",
        "error-couldNotCheckUpdatesStats",
        "error-updateInProgressOnInstance",
        "error-onlyOfficeHours",
    }
)

# Every other error-* status is a refusal: the server could not or would not
# serve this request (Nebraska's handleInvalidRequestErrors and its catch-all).
# Waiting does not help; an admin must act. What to tell them:
_REFUSAL_HINTS: Final[Mapping[str, str]] = {
    "error-instanceRegistrationFailed": (
        "Nebraska could not register this host: it accepts only semver versions "
        "(MAJOR.MINOR.PATCH[-pre][+build]) and this host sent {version!r}; also check that "
        "[omaha] group names an existing group or channel and the machine id is set"
    ),
    "error-unknownApplicationOrGroup": (
        "the server knows no such application or group: check [omaha] app_id and group"
    ),
    "error-unknownApplication": "the server knows no such application: check [omaha] app_id",
    "error-invalidAppId": "the server refused the application id: check [omaha] app_id",
    "error-noPackageFound": (
        "the group's channel points at no package on the server: an admin must assign one"
    ),
}
_REFUSAL_DEFAULT_HINT: Final = (
    "the update server refused the request or failed serving it; see its logs"
)


def _refused(status: str, sent_version: str | None) -> OmahaError:
    hint = _REFUSAL_HINTS.get(status, _REFUSAL_DEFAULT_HINT)
    return OmahaError(
        "server_refused",
        f"Omaha response: the server answered {status!r}",
        hint=hint.format(version=sent_version or "?"),
    )


@dataclass(frozen=True)
class UpdateOffer:
    version: str  # manifest/@version
    codebase: str  # the first urls/url/@codebase, ending in "/"
    package_name: str  # the first package
    size: int  # bytes, > 0
    sha256: str  # lowercase hex
    poll_interval_s: int | None = None
    codebases: tuple[str, ...] = field(default=())  # every codebase, first = codebase

    @property
    def url(self) -> str:
        return self.codebase + self.package_name

    @property
    def urls(self) -> tuple[str, ...]:
        """The payload under every codebase (update_engine's fallback list)."""
        return tuple(c + self.package_name for c in (self.codebases or (self.codebase,)))

    @property
    def manifest_url(self) -> str:
        """The signed release manifest, beside the package: ``<package name>.json``."""
        return self.url + MANIFEST_SUFFIX

    @property
    def signature_url(self) -> str:
        """Its detached OpenPGP signature: ``<package name>.json.asc``."""
        return self.url + SIGNATURE_SUFFIX


OmahaResponse = NoUpdate | UpdateOffer | Deferred


def _fail(kind: str, message: str) -> OmahaError:
    return OmahaError(
        kind,
        f"Omaha response: {message}",
        hint="the update server (or something between us and it) sent a bad answer",
    )


_POLL_RE = re.compile(r"^\+?[0-9]{1,9}$")
_SIZE_RE = re.compile(r"^[0-9]{1,19}$")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# A package name is a relative path under the codebase: no scheme, no query or
# fragment, no percent-escapes, no "..", no empty segment.
_NAME_RE = re.compile(r"^[A-Za-z0-9_~+=,-][A-Za-z0-9._~+=,-]*(/[A-Za-z0-9._~+=,-]+)*$")


def _poll_interval(updatecheck: ET.Element) -> int | None:
    text = updatecheck.get("PollInterval")
    if text is None or not _POLL_RE.fullmatch(text.strip()):
        return None  # update_engine: unparsable means "use the default"
    value = int(text)
    return value if value > 0 else None


def _parse(data: bytes, max_bytes: int) -> ET.Element:
    if len(data) > max_bytes:
        raise _fail("too_large", f"{len(data)} bytes, more than the {max_bytes} allowed")
    if not data.strip():
        raise _fail("empty_response", "the server sent an empty body")
    try:
        root: ET.Element = defusedxml.ElementTree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DefusedXmlException as exc:
        raise _fail("xml_forbidden", f"refused XML construct ({type(exc).__name__})") from None
    except ET.ParseError as exc:
        raise _fail("xml_parse", f"not well-formed XML ({exc})") from None
    except (LookupError, ValueError) as exc:  # an encoding declaration naming no codec we have
        raise _fail("xml_parse", f"unreadable XML ({type(exc).__name__}: {exc})") from None
    return root


def _our_app(root: ET.Element, app_id: str) -> ET.Element:
    if root.tag != "response":
        raise _fail("invalid_response", f"the root element is <{root.tag}>, not <response>")
    if root.get("protocol") != PROTOCOL:
        raise _fail(
            "unsupported_protocol",
            f"protocol {root.get('protocol')!r}; this agent speaks Omaha {PROTOCOL} only",
        )
    want = normalize_app_id(app_id)
    for app in root.findall("app"):
        if normalize_app_id(app.get("appid", "")) == want:
            return app
    raise _fail("invalid_response", f"no <app> for appid {app_id}")


def _codebases(updatecheck: ET.Element) -> tuple[str, ...]:
    urls = updatecheck.findall("urls/url")
    if not urls:
        raise _fail("missing_codebase", "no urls/url in an update")
    out = []
    for url in urls:
        codebase = (url.get("codebase") or "").strip()
        if not codebase:
            raise _fail("missing_codebase", "a url has no codebase")
        parts = parse_url(codebase, lambda why: _fail("package_url", f"codebase: {why}"))
        if parts.query or parts.fragment or "#" in codebase or "?" in codebase:
            raise _fail("package_url", f"codebase {codebase!r} has a query or fragment")
        out.append(codebase if codebase.endswith("/") else codebase + "/")
    return tuple(out)


def _package_name(package: ET.Element) -> str:
    name = package.get("name", "")
    if not name:
        raise _fail("invalid_response", "the package has no name")
    if not _NAME_RE.fullmatch(name) or ".." in name.split("/"):
        raise _fail("package_url", f"package name {name!r} is not a plain path under the codebase")
    return name


def _size(package: ET.Element) -> int:
    text = (package.get("size") or "").strip()
    if not _SIZE_RE.fullmatch(text) or int(text) <= 0:
        raise _fail("size_invalid", f"package size {text!r} is not a positive number")
    return int(text)


def _sha256(manifest: ET.Element, package: ET.Element) -> str:
    postinstall = next(
        (a for a in manifest.findall("actions/action") if a.get("event") == "postinstall"), None
    )
    b64 = (postinstall.get("sha256") or "").strip() if postinstall is not None else ""
    hex_text = (package.get("hash_sha256") or "").strip()
    found: list[str] = []
    if b64:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise _fail("hash_invalid", f"postinstall sha256 {b64!r} is not base64") from None
        if len(raw) != 32:
            raise _fail("hash_invalid", f"postinstall sha256 is {len(raw)} bytes, not 32")
        found.append(raw.hex())
    if hex_text:
        if not _HEX64_RE.fullmatch(hex_text):
            raise _fail("hash_invalid", f"hash_sha256 {hex_text!r} is not 64 hex digits")
        found.append(hex_text.lower())
    if not found:
        raise _fail("hash_missing", "neither a postinstall action sha256 nor a package hash_sha256")
    if len(set(found)) > 1:
        raise _fail("hash_invalid", "the postinstall sha256 and hash_sha256 disagree")
    return found[0]


def _offer(updatecheck: ET.Element, poll: int | None) -> UpdateOffer:
    manifest = updatecheck.find("manifest")
    if manifest is None:
        raise _fail("invalid_response", "an update without a manifest")
    version = (manifest.get("version") or "").strip()
    if not versions.is_valid(version):
        raise _fail("invalid_response", f"manifest version {version!r} is not a version")
    codebases = _codebases(updatecheck)
    packages = manifest.findall("packages/package")
    if not packages:
        raise _fail("invalid_response", "an update without a package")
    package = packages[0]  # the payload; Nebraska's extra files follow it
    return UpdateOffer(
        version=version,
        codebase=codebases[0],
        package_name=_package_name(package),
        size=_size(package),
        sha256=_sha256(manifest, package),
        poll_interval_s=poll,
        codebases=codebases,
    )


def parse_response(
    data: bytes,
    app_id: str,
    *,
    max_bytes: int = MAX_RESPONSE_BYTES,
    sent_version: str | None = None,
) -> OmahaResponse:
    """Read the answer to an update check for ``app_id``; raises :class:`OmahaError`.

    ``sent_version`` (the version the request carried) only goes into hints.
    """
    app = _our_app(_parse(data, max_bytes), app_id)
    updatecheck = app.find("updatecheck")
    poll = _poll_interval(updatecheck) if updatecheck is not None else None
    app_status = (app.get("status") or "ok").strip()
    if app_status in DEFERRAL_STATUSES:
        return Deferred(app_status, poll)
    if app_status.startswith("error-"):
        raise _refused(app_status, sent_version)
    if app_status != "ok":
        raise _fail("unknown_status", f"app status {app_status!r}")
    if updatecheck is None:
        raise _fail("invalid_response", "no updatecheck in the answer to an update check")
    status = updatecheck.get("status")
    if status is None:
        raise _fail("invalid_response", "updatecheck has no status")
    if status == "noupdate":
        return NoUpdate(poll)
    if status != "ok":
        raise _fail("unknown_status", f"updatecheck status {status!r}")
    return _offer(updatecheck, poll)
