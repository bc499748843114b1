"""Fuzzing the Omaha side (hypothesis): whatever a server or a proxy answers, the
parser returns an answer or an OmahaError, and a redirect's Location is followed
or refused with a DownloadError; nothing else, no hang, bounded memory."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fewer_examples, parse_or_typed_error
from tests.omaha_server import FIXTURES
from updater.errors import DownloadError, OmahaError
from updater.omaha import Deferred, OmahaNoUpdate, UpdateOffer, parse_response
from updater.omaha_client import _redirect_target
from updater.urls import parse_url

pytestmark = pytest.mark.fuzz

APP = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
UPDATE = (FIXTURES / "response-nebraska-update.xml").read_bytes()
NOUPDATE = (FIXTURES / "response-noupdate.xml").read_bytes()

# Every attribute the parser reads, by where it sits.
ATTRIBUTES = [
    (".", "protocol"),
    ("app", "appid"),
    ("app", "status"),
    ("app/updatecheck", "status"),
    ("app/updatecheck", "PollInterval"),
    ("app/updatecheck/urls/url", "codebase"),
    ("app/updatecheck/manifest", "version"),
    ("app/updatecheck/manifest/packages/package", "name"),
    ("app/updatecheck/manifest/packages/package", "size"),
    ("app/updatecheck/manifest/packages/package", "hash_sha256"),
    ("app/updatecheck/manifest/actions/action", "event"),
    ("app/updatecheck/manifest/actions/action", "sha256"),
]
ELEMENTS = [
    "app",
    "app/updatecheck",
    "app/updatecheck/urls",
    "app/updatecheck/urls/url",
    "app/updatecheck/manifest",
    "app/updatecheck/manifest/packages",
    "app/updatecheck/manifest/packages/package",
    "app/updatecheck/manifest/actions/action",
]

# Values that look like what belongs there, and what does not.
url_like = st.builds(
    lambda scheme, host, port, path: f"{scheme}{host}{port}/{path}",
    st.sampled_from(["http://", "https://", "ftp://", "file://", "//", ""]),
    st.one_of(
        st.sampled_from(["a.example", "[::1", "[::1]", "[zz]", "a..b", "\uff0f", "xn--", "%"]),
        st.text(max_size=20),
    ),
    st.one_of(st.just(""), st.integers(-5, 99999).map(lambda p: f":{p}"), st.just(":x")),
    st.text(max_size=20),
)
values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "3.0",
            "2.0",
            "ok",
            "noupdate",
            "error-instanceRegistrationFailed",
            "error-maxUpdatesPerPeriodLimitReached",
            "error-",
            "postinstall",
            "0",
            "-1",
            "1e9",
            "99999999999999999999999",
            "ab" * 32,
            "q83vEjRWeJASNFZ4kBI0VniQEjRWeJASNFZ4kBI0Vng=",
            APP,
            "../x",
            "a/../b",
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    url_like,
)


def _mutate(doc: bytes, edits: list[tuple[int, str]], drops: list[int], extra: int) -> bytes:
    root = ET.fromstring(doc)
    for which, value in edits:
        path, attr = ATTRIBUTES[which % len(ATTRIBUTES)]
        for element in root.iterfind(path) if path != "." else [root]:
            element.set(attr, value)
    for which in drops:
        path = ELEMENTS[which % len(ELEMENTS)]
        parent_path, _, tag = path.rpartition("/")
        parent = root.find(parent_path) if parent_path else root
        for child in [] if parent is None else parent.findall(tag):
            parent.remove(child)  # type: ignore[union-attr]
    app = root.find("app")
    for _ in range(extra):  # a second app, a second url: the first must still decide
        if app is not None:
            root.append(copy.deepcopy(app))
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _parsed(data: bytes) -> object:
    result = parse_or_typed_error(lambda: parse_response(data, APP, sent_version="1.0.0"))
    assert isinstance(result, OmahaNoUpdate | Deferred | UpdateOffer | OmahaError), result
    if isinstance(result, UpdateOffer):  # whatever was accepted is usable
        for url in result.urls:
            parse_url(url, lambda why: OmahaError("package_url", why))
        assert result.size > 0 and len(result.sha256) == 64
    return result


@given(st.binary(max_size=2048))
def test_fuzz_raw_bytes(data: bytes) -> None:
    _parsed(data)


@given(
    st.sampled_from([UPDATE, NOUPDATE]),
    st.lists(st.tuples(st.integers(0, 100), values), max_size=4),
    st.lists(st.integers(0, 100), max_size=2),
    st.integers(0, 2),
)
def test_fuzz_mutated_documents(
    doc: bytes, edits: list[tuple[int, str]], drops: list[int], extra: int
) -> None:
    try:
        mutated = _mutate(doc, edits, drops, extra)
    except ValueError:  # a value ElementTree cannot write (a control character)
        return
    _parsed(mutated)


@given(
    st.sampled_from([UPDATE, NOUPDATE]),
    st.one_of(
        st.sampled_from(["utf-8", "UTF-16", "latin-1", "x-no-such-codec", "ascii", "", "uTf-8 "]),
        st.text(max_size=12),
    ),
    st.booleans(),
)
def test_fuzz_encoding_declarations(doc: bytes, encoding: str, bom: bool) -> None:
    body = doc.split(b"?>", 1)[1]
    head = f'<?xml version="1.0" encoding="{encoding}"?>'.encode("utf-8", "surrogatepass")
    _parsed((b"\xef\xbb\xbf" if bom else b"") + head + body)


@settings(max_examples=fewer_examples(10))  # big documents
@given(st.integers(1, 30_000), st.sampled_from(["<a>", "<a b='c'>"]))
def test_fuzz_deep_and_wide_documents(n: int, element: str) -> None:
    """Nesting and width that a hostile server could send within the size cap."""
    inner = (element * n + "</a>" * n).encode()
    _parsed(b'<response protocol="3.0"><app appid="' + APP.encode() + b'">' + inner[:900_000])


@given(
    st.sampled_from(["http://127.0.0.1:8080/v1/update/", "https://u.example/v1/update/"]),
    st.one_of(url_like, st.text(max_size=60)),
)
def test_fuzz_redirect_locations(url: str, location: str) -> None:
    result = parse_or_typed_error(lambda: _redirect_target(url, location, 302))
    assert isinstance(result, str | DownloadError), result
    if isinstance(result, str):  # followed: same scheme, host and port
        here = parse_url(url, lambda why: OmahaError("package_url", why))
        there = parse_url(result, lambda why: OmahaError("package_url", why))
        assert here.origin == there.origin
