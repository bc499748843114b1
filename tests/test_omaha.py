"""Omaha v3: requests shaped like update_engine's (checked against real ones),
responses read as update_engine reads them (real Nebraska and update_engine
documents), hostile answers typed, the size cap enforced while reading, the
error-code table; a client against a test Omaha server that records traffic."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import defusedxml.ElementTree
import pytest
from structlog.testing import capture_logs

from tests.omaha_server import (
    FIXTURES,
    HUGE_BYTES,
    Answer,
    OmahaServer,
    Release,
    SeenEvent,
    billion_laughs,
    parse_request,
)
from updater import errors
from updater.errors import (
    ConfigError,
    DownloadError,
    OmahaError,
    UpdaterError,
    VerificationError,
)
from updater.omaha import MAX_RESPONSE_BYTES, Deferred, OmahaNoUpdate, UpdateOffer, parse_response
from updater.omaha_client import OmahaClient, host_context, read_boot_id, read_machine_id
from updater.omaha_codes import (
    ERROR_CODES,
    ErrorCode,
    error_code_for,
    error_code_for_error,
    http_error_code,
)
from updater.omaha_request import (
    FLATCAR_APP_ID,
    EventResult,
    EventType,
    OmahaEvent,
    OmahaRequestContext,
    build_request,
)
from updater.omaha_source import EventQueue, OmahaSource
from updater.source import Happened, Happening, SignedFetcher
from updater.transport import FileTransport, HttpSettings, HttpTransport

APP = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
MACHINE_ID = "abce671d61774703ac7be60715220bfe"
BOOT_ID = "965fb4c5-ad3e-4eb7-a4c2-ca0c0e31ec84"
FIXTURE_SHA256 = "b2d2c6dd4fe8e00afc4cc1c5c13fd1581d2236469638ee90b4baeaebe00705b0"
SHA = "ab" * 32

CTX = OmahaRequestContext(
    app_id=APP,
    version="1.0.0",
    track="stable",
    machine_id=MACHINE_ID,
    boot_id=BOOT_ID,
    machine="x86_64",
)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parse_xml(data: bytes) -> ET.Element:
    root: ET.Element = defusedxml.ElementTree.fromstring(data)
    return root


def attribute_sets(data: bytes) -> dict[str, set[str]]:
    """Attribute names per element; events keyed by position."""
    root = parse_xml(data)
    out = {"request": set(root.attrib)}
    for path, tag in (("os", "os"), ("app", "app"), ("app/ping", "ping")):
        element = root.find(path)
        if element is not None:
            out[tag] = set(element.attrib)
    check = root.find("app/updatecheck")
    if check is not None:
        out["updatecheck"] = set(check.attrib)
    for i, event in enumerate(root.findall("app/event")):
        out[f"event{i}"] = set(event.attrib)
    return out


# -- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "events"),
    [
        ("request-flatcar-ue-rs.xml", [OmahaEvent.install_staged()]),
        ("request-update-engine.xml", [OmahaEvent.rebooted("")]),
    ],
)
def test_our_request_carries_every_attribute_of_the_real_one(
    name: str, events: list[OmahaEvent]
) -> None:
    real = attribute_sets(fixture(name))
    ours = attribute_sets(build_request(CTX, ping=True, updatecheck=True, events=events))
    assert set(real) == set(ours)
    for element, attrs in real.items():
        assert attrs <= ours[element], f"<{element}> lacks {sorted(attrs - ours[element])}"


def test_the_real_requests_events_match_our_constructors() -> None:
    _, ue_rs = parse_request(fixture("request-flatcar-ue-rs.xml"))
    _, ue = parse_request(fixture("request-update-engine.xml"))
    assert ue_rs == (SeenEvent(3, 1, None, None),)
    assert ue == (SeenEvent(3, 2, None, ""),)
    assert OmahaEvent.install_staged() == OmahaEvent(3, 1)
    assert OmahaEvent.rebooted("") == OmahaEvent(3, 2, previous_version="")


def test_request_shape() -> None:
    ctx = dataclasses.replace(CTX, oem="ami", oem_version="0.1.1", machine_alias="web-1")
    root = parse_xml(build_request(ctx, ping=True, updatecheck=True, events=[]))
    assert root.tag == "request"
    assert root.attrib["protocol"] == "3.0"
    assert root.attrib["ismachine"] == "1"
    assert root.attrib["installsource"] == "scheduler"
    assert root.attrib["version"] == root.attrib["updaterversion"]
    os_ = root.find("os")
    assert os_ is not None
    assert os_.attrib == {
        "version": "Chateau",
        "platform": "CoreOS",
        "sp": "1.0.0_x86_64",
        "arch": "x64",
    }
    app = root.find("app")
    assert app is not None
    assert app.attrib == {
        "appid": APP,
        "version": "1.0.0",
        "track": "stable",
        "from_track": "stable",
        "bootid": "{" + BOOT_ID + "}",
        "oem": "ami",
        "oemversion": "0.1.1",
        "alephversion": "1.0.0",
        "machineid": MACHINE_ID,
        "machinealias": "web-1",
        "lang": "en-US",
        "board": "amd64-usr",
        "hardware_class": "",
        "delta_okay": "false",
    }
    ping = app.find("ping")
    assert ping is not None and ping.attrib == {"active": "1", "a": "-1", "r": "-1"}
    check = app.find("updatecheck")
    assert check is not None and check.attrib == {"targetversionprefix": ""}
    assert app.findall("event") == []


def test_request_without_ping_or_check_carries_only_events() -> None:
    data = build_request(CTX, ping=False, updatecheck=False, events=[OmahaEvent.download_started()])
    elements, events = parse_request(data)
    assert "ping" not in elements and "updatecheck" not in elements
    assert events == (SeenEvent(13, 1, None, None),)


def test_request_interactive_and_overrides() -> None:
    ctx = dataclasses.replace(
        CTX, machine="aarch64", boot_id="{" + BOOT_ID + "}", aleph_version="0.9.0"
    )
    root = parse_xml(build_request(ctx, ping=True, updatecheck=True, interactive=True))
    app = root.find("app")
    assert app is not None and root.find("os") is not None
    assert root.attrib["installsource"] == "ondemandupdate"
    assert app.attrib["bootid"] == "{" + BOOT_ID + "}"  # not doubled
    assert app.attrib["board"] == "arm64-usr"
    assert app.attrib["alephversion"] == "0.9.0"
    assert root.find("os").attrib["arch"] == "arm64"  # type: ignore[union-attr]


def test_request_escapes_values() -> None:
    ctx = dataclasses.replace(CTX, track="a\"<b>&'c", oem="x y")
    data = build_request(ctx, ping=True, updatecheck=True)
    app = parse_xml(data).find("app")
    assert app is not None and app.attrib["track"] == "a\"<b>&'c"
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')


@pytest.mark.parametrize("field", ["track", "version", "app_id"])
def test_context_rejects_empty_required_fields(field: str) -> None:
    values: dict[str, Any] = {**dataclasses.asdict(CTX), field: " "}
    with pytest.raises(ConfigError) as err:
        OmahaRequestContext(**values)
    assert err.value.key == field


def test_context_rejects_control_characters() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(CTX, oem="a\x00b")


@pytest.mark.parametrize(
    ("event", "attrs"),
    [
        (OmahaEvent.download_started(), {"eventtype": "13", "eventresult": "1"}),
        (OmahaEvent.download_finished(), {"eventtype": "14", "eventresult": "1"}),
        (OmahaEvent.install_staged(), {"eventtype": "3", "eventresult": "1"}),
        (
            OmahaEvent.rebooted("1.0.0"),
            {"eventtype": "3", "eventresult": "2", "previousversion": "1.0.0"},
        ),
        (OmahaEvent.rollback(), {"eventtype": "3", "eventresult": "0", "errorcode": "44"}),
        (OmahaEvent.failure(10), {"eventtype": "3", "eventresult": "0", "errorcode": "10"}),
        (OmahaEvent.deferred(), {"eventtype": "3", "eventresult": "9", "errorcode": "36"}),
        (
            OmahaEvent.failed_with(VerificationError("signature_invalid", "x")),
            {"eventtype": "3", "eventresult": "0", "errorcode": "18"},
        ),
    ],
)
def test_events_as_update_engine_sends_them(event: OmahaEvent, attrs: dict[str, str]) -> None:
    app = parse_xml(build_request(CTX, ping=False, updatecheck=False, events=[event])).find("app")
    assert app is not None
    assert [e.attrib for e in app.findall("event")] == [attrs]


def test_event_constants() -> None:
    assert [int(t) for t in EventType] == [3, 13, 14]
    assert [int(r) for r in EventResult] == [0, 1, 2, 9]
    with pytest.raises(ValueError):
        OmahaEvent(3, 0, -1)
    assert repr(OmahaEvent.rollback()) == (
        "OmahaEvent(type=3, result=0, error_code=44, previous_version=None)"
    )


@pytest.mark.parametrize(
    "event",
    [OmahaEvent.rebooted("1.0.0"), OmahaEvent.rollback(), OmahaEvent.download_started()],
)
def test_events_persist_as_json(event: OmahaEvent) -> None:
    assert OmahaEvent.from_dict(json.loads(json.dumps(event.as_dict()))) == event


@pytest.mark.parametrize(
    "obj",
    [{}, {"type": 3}, {"type": "3", "result": 1}, {"type": 3, "result": 1, "previous_version": 1}],
)
def test_garbage_is_no_event(obj: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OmahaEvent.from_dict(obj)


# -- responses: the real documents ------------------------------------------------------------


def test_real_noupdate_parses() -> None:
    assert parse_response(fixture("response-noupdate.xml"), APP) == OmahaNoUpdate(None)


@pytest.mark.parametrize("app_id", [APP, APP.strip("{}"), APP.upper(), FLATCAR_APP_ID])
def test_real_nebraska_update_parses(app_id: str) -> None:
    offer = parse_response(fixture("response-nebraska-update.xml"), app_id)
    assert offer == UpdateOffer(
        version="3732.0.0",
        codebase="https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/",
        package_name="flatcar_production_update.gz",
        size=382137917,
        sha256=FIXTURE_SHA256,  # the postinstall action's base64, as hex
        codebases=("https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/",),
    )
    assert isinstance(offer, UpdateOffer)
    assert offer.url == (
        "https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/flatcar_production_update.gz"
    )
    assert offer.manifest_url == offer.url + ".json"
    assert offer.signature_url == offer.url + ".json.asc"


def edit(transform: str, new: str) -> bytes:
    text = fixture("response-nebraska-update.xml").decode()
    assert transform in text, transform
    return text.replace(transform, new).encode()


POSTINSTALL = 'sha256="stLG3U/o4Ar8TMHFwT/RWB0iNkaWOO6QtLrq6+AHBbA="'
MAIN_PACKAGE = 'name="flatcar_production_update.gz" hash="I6DGNAOrJRUxPbCuLw+AITfiVMo="'
CODEBASE = 'codebase="https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/"'


def test_hex_hash_sha256_of_the_first_package_when_no_postinstall_hash() -> None:
    data = edit(POSTINSTALL, "").replace(
        MAIN_PACKAGE.encode(), (MAIN_PACKAGE + f' hash_sha256="{SHA.upper()}"').encode()
    )
    offer = parse_response(data, APP)
    assert isinstance(offer, UpdateOffer) and offer.sha256 == SHA


def test_extra_packages_hash_sha256_is_not_the_payloads() -> None:
    with pytest.raises(OmahaError) as err:
        parse_response(edit(POSTINSTALL, ""), APP)
    assert err.value.kind == "hash_missing"


def test_both_hashes_must_agree() -> None:
    agree = edit(MAIN_PACKAGE, MAIN_PACKAGE + f' hash_sha256="{FIXTURE_SHA256}"')
    assert parse_response(agree, APP).sha256 == FIXTURE_SHA256  # type: ignore[union-attr]
    disagree = edit(MAIN_PACKAGE, MAIN_PACKAGE + f' hash_sha256="{SHA}"')
    with pytest.raises(OmahaError) as err:
        parse_response(disagree, APP)
    assert err.value.kind == "hash_invalid"


def test_codebase_gets_a_slash_and_every_url_is_kept() -> None:
    data = edit(
        "<url " + CODEBASE + "></url>",
        '<url codebase="https://a.example/x"></url><url codebase="http://b.example:8080/y/"></url>',
    )
    offer = parse_response(data, APP)
    assert isinstance(offer, UpdateOffer)
    assert offer.url == "https://a.example/x/flatcar_production_update.gz"
    assert offer.urls == (
        "https://a.example/x/flatcar_production_update.gz",
        "http://b.example:8080/y/flatcar_production_update.gz",
    )


@pytest.mark.parametrize(
    ("attr", "expected"), [("3600", 3600), ("+60", 60), ("0", None), ("-5", None), ("x", None)]
)
def test_poll_interval(attr: str, expected: int | None) -> None:
    data = edit('<updatecheck status="ok">', f'<updatecheck status="ok" PollInterval="{attr}">')
    assert parse_response(data, APP).poll_interval_s == expected
    noupdate = fixture("response-noupdate.xml").replace(
        b'status="noupdate"', f'status="noupdate" PollInterval="{attr}"'.encode()
    )
    assert parse_response(noupdate, APP) == OmahaNoUpdate(expected)


@pytest.mark.parametrize(
    "reason",
    [
        "error-maxUpdatesPerPeriodLimitReached",
        "error-maxConcurrentUpdatesLimitReached",
        "error-maxTimedOutUpdatesLimitReached",
        "error-updatesDisabled",
        "error-couldNotCheckUpdatesStats",
        "error-updateInProgressOnInstance",
        "error-onlyOfficeHours",
    ],
)
def test_app_error_status_is_a_deferral(reason: str) -> None:
    data = (
        f'<response protocol="3.0" server="nebraska"><daystart elapsed_seconds="0"/>'
        f'<app appid="{APP}" status="{reason}"><updatecheck status="error-internal"/></app>'
        "</response>"
    ).encode()
    assert parse_response(data, APP) == Deferred(reason)


# -- responses: hostile and broken ----------------------------------------------------------

XXE_DOC = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<response protocol="3.0"><app appid="' + APP.encode() + b'">&x;</app></response>'
)
NOUPDATE = fixture("response-noupdate.xml").decode()


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty_response"),
        (b"  \n", "empty_response"),
        (b"not xml", "xml_parse"),
        (fixture("response-nebraska-update.xml")[:500], "xml_parse"),
        (b"\xff\xfe<response/>", "xml_parse"),
        (billion_laughs(), "xml_forbidden"),
        (XXE_DOC, "xml_forbidden"),
        (b'<!DOCTYPE response><response protocol="3.0"/>', "xml_forbidden"),
        (b"<request/>", "invalid_response"),
        (
            NOUPDATE.replace(APP, "{00000000-0000-0000-0000-000000000000}").encode(),
            "invalid_response",
        ),
        (
            NOUPDATE.replace('status="ok"><ping', 'status="restricted"><ping').encode(),
            "unknown_status",
        ),
        (NOUPDATE.replace('<updatecheck status="noupdate"/>', "").encode(), "invalid_response"),
        (NOUPDATE.replace(' status="noupdate"', "").encode(), "invalid_response"),
        (NOUPDATE.replace('"noupdate"', '"error-internal"').encode(), "unknown_status"),
        (NOUPDATE.replace('"noupdate"', '"ok"').encode(), "invalid_response"),  # no manifest
        (edit('version="3732.0.0"', 'version=""'), "invalid_response"),
        (edit('version="3732.0.0"', 'version="../x"'), "invalid_response"),
        (edit("<url " + CODEBASE + "></url>", ""), "missing_codebase"),
        (edit(CODEBASE, 'codebase=""'), "missing_codebase"),
        (edit(CODEBASE, ""), "missing_codebase"),
        (edit(CODEBASE, 'codebase="ftp://update.example/"'), "package_url"),
        (edit(CODEBASE, 'codebase="file:///var/tmp/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://a.example/x?y=/"'), "package_url"),
        (edit('name="flatcar_production_update.gz"', 'name=""'), "invalid_response"),
        (
            edit('name="flatcar_production_update.gz"', 'name="https://evil.invalid/p"'),
            "package_url",
        ),
        (edit('name="flatcar_production_update.gz"', 'name="//evil.invalid/p"'), "package_url"),
        (edit('name="flatcar_production_update.gz"', 'name="../../p.gz"'), "package_url"),
        (edit('name="flatcar_production_update.gz"', 'name="a/../p.gz"'), "package_url"),
        (edit('name="flatcar_production_update.gz"', 'name="p%2e%2e.gz"'), "package_url"),
        (edit('name="flatcar_production_update.gz"', 'name="p.gz?x"'), "package_url"),
        (edit('size="382137917"', 'size="0"'), "size_invalid"),
        (edit('size="382137917"', 'size="-1"'), "size_invalid"),
        (edit('size="382137917"', 'size="1e9"'), "size_invalid"),
        (edit('size="382137917"', 'size=""'), "size_invalid"),
        (edit('size="382137917"', ""), "size_invalid"),
        (edit(POSTINSTALL, ""), "hash_missing"),
        (edit('event="postinstall"', 'event="preinstall"'), "hash_missing"),
        (edit(POSTINSTALL, 'sha256="not base64!"'), "hash_invalid"),
        (edit(POSTINSTALL, 'sha256="I6DGNAOrJRUxPbCuLw+AITfiVMo="'), "hash_invalid"),  # SHA-1
        (edit(MAIN_PACKAGE, MAIN_PACKAGE + ' hash_sha256="xyz"'), "hash_invalid"),
        (b"<response>" + b" " * MAX_RESPONSE_BYTES + b"</response>", "too_large"),
    ],
)
def test_hostile_response_is_a_typed_error(data: bytes, kind: str) -> None:
    with pytest.raises(OmahaError) as err:
        parse_response(data, APP)
    assert err.value.kind == kind
    assert err.value.category == "download"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        # URLs that urlsplit, .port or IDNA reject with ValueError/UnicodeError
        (edit(CODEBASE, 'codebase="https://[::1/amd64-usr/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://a.example:99999/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://a.example:x/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://a\uff0fb.example/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://' + "a" * 64 + '.example/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://\u00b2.example/"'), "package_url"),
        (edit(CODEBASE, 'codebase="https://a.example\\evil/"'), "package_url"),
        # an XML declaration naming a codec Python does not have (LookupError)
        (b'<?xml version="1.0" encoding="x-no-such-codec"?><response/>', "xml_parse"),
        (b'<?xml version="1.0" encoding="utf-16"?><response/>', "xml_parse"),
        # only Omaha 3.0
        (NOUPDATE.replace('protocol="3.0"', 'protocol="2.0"').encode(), "unsupported_protocol"),
        (NOUPDATE.replace(' protocol="3.0"', "").encode(), "unsupported_protocol"),
    ],
)
def test_hostile_response_found_by_review_is_a_typed_error(data: bytes, kind: str) -> None:
    with pytest.raises(OmahaError) as err:
        parse_response(data, APP)
    assert err.value.kind == kind


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        ("error-instanceRegistrationFailed", "semver"),
        ("error-unknownApplicationOrGroup", "group"),
        ("error-unknownApplication", "app_id"),
        ("error-noPackageFound", "package"),
        ("error-invalidAppId", "app_id"),
        ("error-failedToRetrieveUpdatePackageInfo", "server"),
        ("error-somethingNew", "server"),
    ],
)
def test_a_refusal_by_the_server_is_an_error_not_a_deferral(status: str, hint: str) -> None:
    data = (
        f'<response protocol="3.0" server="nebraska"><daystart elapsed_seconds="0"/>'
        f'<app appid="{APP}" status="{status}"><updatecheck status="error-internal"/></app>'
        "</response>"
    ).encode()
    with pytest.raises(OmahaError) as err:
        parse_response(data, APP, sent_version="1.0.0~rc1")
    assert err.value.kind == "server_refused"
    assert status in err.value.message
    assert err.value.hint is not None and hint in err.value.hint
    if status == "error-instanceRegistrationFailed":
        assert "1.0.0~rc1" in err.value.hint
    assert error_code_for_error(err.value, during_check=True) == ErrorCode.OMAHA_RESPONSE_INVALID


def test_the_first_package_is_the_payload_even_when_extras_are_valid() -> None:
    # the first package broken, the extras fine: still an error, never an extra as payload
    with pytest.raises(OmahaError) as err:
        parse_response(edit('size="382137917"', 'size="0"'), APP)
    assert err.value.kind == "size_invalid"


def test_defusedxml_refuses_entities_before_expanding_them() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(OmahaError):
            parse_response(billion_laughs(), APP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # 10^9 "lol"s were never built


# -- the error-code table -----------------------------------------------------------------------


def all_kinds() -> set[str]:
    """Every kind of the categories in updater.errors, and OmahaError's."""
    categories: list[type[UpdaterError]] = [OmahaError]
    for c in vars(errors).values():
        if isinstance(c, type) and issubclass(c, UpdaterError) and c.__module__ == errors.__name__:
            categories.append(c)
    return set().union(*(c.kinds for c in categories))


def test_every_error_kind_has_a_code() -> None:
    missing = sorted(all_kinds() - set(ERROR_CODES))
    assert not missing, f"add these kinds to updater.omaha_codes.ERROR_CODES: {missing}"
    assert {"hash_mismatch", "http_status", "xml_parse", "check_failed"} <= all_kinds()


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("hash_mismatch", 10),
        ("size_mismatch", 11),
        ("signature_invalid", 18),
        ("signature_missing", 17),
        ("source_mismatch", 12),
        ("manifest_malformed", 23),
        ("decompress_failed", 28),
        ("connection", 9),
        ("readback_mismatch", 15),
        ("empty_response", 30),
        ("xml_parse", 31),
        ("xml_forbidden", 31),
        ("invalid_response", 34),
        ("missing_codebase", 34),
        ("deferred", 36),
        ("rollback", 44),
        ("busy", 1),
        ("no_such_kind", 1),
    ],
)
def test_error_code_spot_checks(kind: str, code: int) -> None:
    assert error_code_for(kind) == code


def test_error_code_numbers_are_update_engines() -> None:
    # flatcar/update_engine src/update_engine/action_processor.h (kActionCode...)
    verified = {
        "PAYLOAD_HASH_MISMATCH_ERROR": 10,
        "PAYLOAD_SIZE_MISMATCH_ERROR": 11,
        "SIGNED_DELTA_PAYLOAD_EXPECTED_ERROR": 17,
        "DOWNLOAD_PAYLOAD_PUB_KEY_VERIFICATION_ERROR": 18,
        "OMAHA_REQUEST_XML_PARSE_ERROR": 31,
        "OMAHA_RESPONSE_INVALID": 34,
        "OMAHA_UPDATE_DEFERRED_PER_POLICY": 36,
        "ROLLBACK_ERROR": 44,
        "OMAHA_REQUEST_HTTP_RESPONSE_BASE": 2000,
    }
    assert {name: int(ErrorCode[name]) for name in verified} == verified
    assert [int(c) for c in ErrorCode][:7] == [0, 1, 2, 3, 4, 5, 7]  # 6 is unused upstream


def test_error_code_of_a_failed_check() -> None:
    assert http_error_code(500) == 2500
    assert http_error_code(None) == 2000
    assert http_error_code(1234) == 2999
    http = DownloadError("http_status", "x", status=503)
    assert error_code_for_error(http, during_check=True) == 2503
    assert error_code_for_error(http) == 9
    assert error_code_for_error(DownloadError("connection", "x"), during_check=True) == 2000
    assert error_code_for_error(OmahaError("xml_parse", "x"), during_check=True) == 31
    assert error_code_for_error(ValueError("x")) == 1


# -- host facts --------------------------------------------------------------------------------


def test_machine_and_boot_id(tmp_path: Path) -> None:
    (tmp_path / "machine-id").write_text(MACHINE_ID.upper() + "\n")
    (tmp_path / "boot_id").write_text(BOOT_ID + "\n")
    assert read_machine_id(tmp_path / "machine-id") == MACHINE_ID
    assert read_boot_id(tmp_path / "boot_id") == "{" + BOOT_ID + "}"
    ctx = host_context(
        APP,
        "1.0.0",
        "beta",
        machine_id_path=tmp_path / "machine-id",
        boot_id_path=tmp_path / "boot_id",
    )
    assert (ctx.machine_id, ctx.boot_id, ctx.track) == (MACHINE_ID, "{" + BOOT_ID + "}", "beta")
    assert ctx.machine


@pytest.mark.parametrize(("content", "kind"), [(None, "unreadable"), ("nope\n", "invalid")])
def test_bad_machine_or_boot_id(tmp_path: Path, content: str | None, kind: str) -> None:
    path = tmp_path / "id"
    if content is not None:
        path.write_text(content)
    for reader in (read_machine_id, read_boot_id):
        with pytest.raises(ConfigError) as err:
            reader(path)
        assert err.value.kind == kind and err.value.file == str(path)


def test_the_real_boot_id_reads() -> None:
    if not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no /proc")
    boot_id = read_boot_id()
    assert boot_id.startswith("{") and boot_id.endswith("}") and len(boot_id) == 38


# -- the client against a test Omaha server --------------------------------------------------

RELEASE = Release(
    version="1.1.0",
    codebase="http://127.0.0.1:1/images/1.1.0",
    package="usr.img.zst",
    size=12345,
    sha256=SHA,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OmahaServer]:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET-CONTENT")
    with OmahaServer(release=RELEASE, xxe_target=secret) as srv:
        yield srv


def client(srv: OmahaServer, **kw: int) -> OmahaClient:
    settings = HttpSettings(connect_timeout_s=2, read_timeout_s=5, retries=2)
    return OmahaClient(srv.url, transport=HttpTransport(settings), **kw)


def test_noupdate_and_the_traffic(server: OmahaServer) -> None:
    server.state.poll_interval_s = 1800
    assert client(server).check(CTX) == OmahaNoUpdate(1800)
    [seen] = server.requests
    assert seen.headers["Content-Type"] == "text/xml"
    assert seen.path == "/v1/update/"
    assert seen.has_ping and seen.has_updatecheck and seen.events == ()
    assert seen.app["machineid"] == MACHINE_ID
    assert seen.app["bootid"] == "{" + BOOT_ID + "}"
    # what the server received carries every attribute of both real requests
    received = attribute_sets(seen.body)
    for name in ("request-flatcar-ue-rs.xml", "request-update-engine.xml"):
        for element, attrs in attribute_sets(fixture(name)).items():
            if not element.startswith("event"):
                assert attrs <= received[element], (name, element)


@pytest.mark.parametrize("answer", [Answer.UPDATE, Answer.UPDATE_HEX_HASH])
def test_update_offer(server: OmahaServer, answer: Answer) -> None:
    server.answer(answer)
    offer = client(server).check(CTX)
    assert offer == UpdateOffer(
        version="1.1.0",
        codebase="http://127.0.0.1:1/images/1.1.0/",
        package_name="usr.img.zst",
        size=12345,
        sha256=SHA,
        codebases=("http://127.0.0.1:1/images/1.1.0/",),
    )
    assert isinstance(offer, UpdateOffer)
    assert offer.manifest_url == "http://127.0.0.1:1/images/1.1.0/usr.img.zst.json"
    # the document served kept Nebraska's extra packages after the payload
    [seen] = server.requests
    assert seen.answer is answer


def test_deferral_and_events_with_the_check(server: OmahaServer) -> None:
    server.answer(Answer.DEFERRED)
    pending = [OmahaEvent.rebooted("1.0.0"), OmahaEvent.failure(10)]
    assert client(server).check(CTX, events=pending) == Deferred(
        "error-maxUpdatesPerPeriodLimitReached"
    )
    assert server.events() == [SeenEvent(3, 2, None, "1.0.0"), SeenEvent(3, 0, 10, None)]


def test_report_sends_events_alone(server: OmahaServer) -> None:
    c = client(server)
    c.report(CTX, [OmahaEvent.download_started()])
    c.report(CTX, [])  # nothing to send: no request
    c.report(CTX, [OmahaEvent.download_finished(), OmahaEvent.install_staged()])
    seen = server.requests
    assert len(seen) == 2
    assert not any(r.has_ping or r.has_updatecheck for r in seen)
    assert server.events() == [
        SeenEvent(13, 1, None, None),
        SeenEvent(14, 1, None, None),
        SeenEvent(3, 1, None, None),
    ]


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer.MALFORMED, "xml_parse"),
        (Answer.EMPTY, "empty_response"),
        (Answer.BILLION_LAUGHS, "xml_forbidden"),
        (Answer.XXE, "xml_forbidden"),
        (Answer.NO_CODEBASE, "missing_codebase"),
        (Answer.SIZE_ZERO, "size_invalid"),
        (Answer.HASH_MISSING, "hash_missing"),
        (Answer.FOREIGN_PACKAGE, "package_url"),
        (Answer.UNKNOWN_STATUS, "unknown_status"),
    ],
)
def test_hostile_server(server: OmahaServer, answer: Answer, kind: str) -> None:
    server.answer(answer)
    with pytest.raises(OmahaError) as err:
        client(server).check(CTX)
    assert err.value.kind == kind
    assert "TOP-SECRET" not in str(err.value)
    assert [r.answer for r in server.requests] == [answer]


@pytest.mark.parametrize("answer", [Answer.HUGE, Answer.HUGE_DECLARED])
def test_a_100_mb_answer_is_never_read_whole(server: OmahaServer, answer: Answer) -> None:
    server.answer(answer)
    tracemalloc.start()
    try:
        with pytest.raises(OmahaError) as err:
            client(server).check(CTX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.kind == "too_large"
    assert peak < 8 * 1024 * 1024
    [seen] = server.requests  # waits until the server gave up sending
    assert seen.sent < HUGE_BYTES // 4, seen.sent


def test_http_error_is_a_download_error_and_not_retried(server: OmahaServer) -> None:
    server.answer(Answer.HTTP_ERROR)
    with pytest.raises(DownloadError) as err:
        client(server).check(CTX)
    assert (err.value.kind, err.value.status) == ("http_status", 500)
    assert error_code_for_error(err.value, during_check=True) == 2500
    assert len(server.requests) == 1  # a POST is retried at the next poll, not now


def test_redirect_on_the_same_server_is_followed(server: OmahaServer) -> None:
    server.queue(Answer.REDIRECT_SAME)
    assert client(server).check(CTX) == OmahaNoUpdate(None)
    first, second = server.requests
    assert (first.status, second.path) == (307, "/v1/update/redirected")
    assert second.body == first.body


def test_redirect_to_another_host_is_refused(server: OmahaServer) -> None:
    server.answer(Answer.REDIRECT_AWAY)
    with pytest.raises(DownloadError) as err:
        client(server).check(CTX)
    assert (err.value.kind, err.value.status) == ("http_status", 302)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "location",
    ["http://[::1/v1/update/", "http://localhost:99999/", "http://a..b/", "http://%/x"],
)
def test_redirect_to_a_malformed_url_is_a_typed_error(server: OmahaServer, location: str) -> None:
    server.state.location = location
    server.answer(Answer.REDIRECT_MALFORMED)
    with pytest.raises(DownloadError) as err:
        client(server).check(CTX)
    # requests reads a Location itself first: what it cannot parse is unsupported_url
    assert err.value.kind in ("http_status", "unsupported_url")
    assert len(server.requests) == 1


def test_too_many_redirects(server: OmahaServer) -> None:
    server.answer(Answer.REDIRECT_SAME)
    with pytest.raises(DownloadError):
        client(server, max_redirects=2).check(CTX)
    assert len(server.requests) == 3


def test_unreachable_server_is_a_download_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = OmahaClient(
        f"http://127.0.0.1:{port}/v1/update/",
        transport=HttpTransport(HttpSettings(connect_timeout_s=1, retries=0)),
    )
    with pytest.raises(DownloadError) as err:
        c.check(CTX)
    assert err.value.kind == "connection"
    assert error_code_for_error(err.value, during_check=True) == 2000


@pytest.mark.parametrize("url", ["ftp://x/", "file:///tmp/x", "not a url", "http:///x"])
def test_server_url_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError):
        OmahaClient(url)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Answer.REAL_NOUPDATE, OmahaNoUpdate(None)),
        (
            Answer.REAL_UPDATE,
            UpdateOffer(
                version="3732.0.0",
                codebase="https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/",
                package_name="flatcar_production_update.gz",
                size=382137917,
                sha256=FIXTURE_SHA256,
                codebases=("https://update.release.flatcar-linux.net/amd64-usr/3732.0.0/",),
            ),
        ),
    ],
)
def test_the_real_documents_served_verbatim(
    server: OmahaServer, answer: Answer, expected: OmahaNoUpdate | UpdateOffer
) -> None:
    server.answer(answer)
    ctx = dataclasses.replace(CTX, app_id=FLATCAR_APP_ID)
    assert client(server).check(ctx) == expected
    assert base64.b64decode("stLG3U/o4Ar8TMHFwT/RWB0iNkaWOO6QtLrq6+AHBbA=").hex() == FIXTURE_SHA256


class _BrokenClient(OmahaClient):
    """Its report fails the way nothing in the error hierarchy describes."""

    def report(self, ctx: OmahaRequestContext, events: Sequence[OmahaEvent]) -> None:
        raise ValueError("Invalid IPv6 URL")


@pytest.mark.parametrize("what", ["download_started", "staged", "deferred"])
def test_a_report_never_raises_and_keeps_the_event(tmp_path: Path, what: Happened) -> None:
    queue = EventQueue(tmp_path / "omaha-events.json")
    source = OmahaSource(
        _BrokenClient("http://127.0.0.1:9/"),
        lambda version: CTX,
        SignedFetcher(FileTransport()),
        queue,
    )
    with capture_logs() as logs:
        source.report(Happening(what, version="1.1.0"))
    assert len(queue.pending()) == 1  # kept for the next request
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["omaha_report_failed"]
