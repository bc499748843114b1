"""Omaha v3 answers as update_engine reads them. Pure: no I/O.

The request document and its events are :mod:`updater.omaha_request`, the
error codes :mod:`updater.omaha_codes`, the HTTP side :mod:`updater.omaha_client`.

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
import re
import xml.etree.ElementTree as ET  # the parsed tree's type; parsing goes through defusedxml
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import defusedxml
import defusedxml.ElementTree

from updater import versions
from updater.errors import OmahaError
from updater.omaha_request import PROTOCOL, normalize_app_id
from updater.urls import parse_url

MAX_RESPONSE_BYTES: Final = 1024 * 1024  # an update check answer is a few KiB

# Where the signed manifest of a package lives: beside it, under the same codebase.
MANIFEST_SUFFIX: Final = ".json"
SIGNATURE_SUFFIX: Final = ".json.asc"


@dataclass(frozen=True)
class OmahaNoUpdate:
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


OmahaResponse = OmahaNoUpdate | UpdateOffer | Deferred


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
        return OmahaNoUpdate(poll)
    if status != "ok":
        raise _fail("unknown_status", f"updatecheck status {status!r}")
    return _offer(updatecheck, poll)
