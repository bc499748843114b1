"""An Omaha server for tests (not a product): answers update checks from the
real protocol documents and records what it receives.

The answers are the real documents of ``tests/fixtures/omaha`` (see
SOURCES.md there) with this test's values substituted: Nebraska's update
response (first package = the payload, its extra packages kept, the base64
SHA-256 on the postinstall action) and update_engine's "noupdate". The
appid is echoed as Nebraska does. Hostile and broken answers are switchable
(:class:`Answer`), per server or queued for the next requests.

Every request is recorded parsed (:class:`SeenRequest`: attributes of each
element, the events) together with the answer given and the body bytes
actually sent, so tests can assert on the traffic, including how much of a
100 MB answer the client took before hanging up.

``with OmahaServer(release=...) as srv: srv.url`` listens on a free loopback
port; leaving the block shuts it down.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import defusedxml.ElementTree

from devtools.loopback import LoopbackHTTPServer, LoopbackServer
from updater.release import Published

ROOT = Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path:
    """The real documents, kept in the repository (tests/fixtures/omaha, see SOURCES.md)."""
    return ROOT / "tests" / "fixtures" / "omaha"


FIXTURES = fixtures_dir()
HUGE_BYTES = 100 * 1024 * 1024
MAX_REQUEST = 1024 * 1024
DEFAULT_DEFERRAL = "error-maxUpdatesPerPeriodLimitReached"


class Answer(enum.StrEnum):
    REAL_NOUPDATE = "real_noupdate"  # the fixture's bytes, verbatim
    REAL_UPDATE = "real_update"  # the fixture's bytes, verbatim (Flatcar's appid, 3732.0.0)
    NOUPDATE = "noupdate"  # update_engine's noupdate document
    UPDATE = "update"  # Nebraska's update document
    UPDATE_HEX_HASH = "update_hex_hash"  # ... the payload hash only as the package's hash_sha256
    DEFERRED = "deferred"  # Nebraska's rollout policy: <app status="error-...">
    UNKNOWN_STATUS = "unknown_status"  # app ok, updatecheck status="error-internal"
    MALFORMED = "malformed"  # the update document cut in half
    EMPTY = "empty"  # 200 with no body
    BILLION_LAUGHS = "billion_laughs"  # entity expansion bomb
    XXE = "xxe"  # an external entity reading a local file
    HUGE = "huge"  # 100 MB, streamed, no Content-Length
    HUGE_DECLARED = "huge_declared"  # 100 MB, streamed, with Content-Length
    NO_CODEBASE = "no_codebase"  # <url> without codebase
    SIZE_ZERO = "size_zero"
    HASH_MISSING = "hash_missing"  # no postinstall sha256, no hash_sha256
    FOREIGN_PACKAGE = "foreign_package"  # the package name is a URL on another host
    HTTP_ERROR = "http_error"  # 500
    REDIRECT_SAME = "redirect_same"  # 307 to this server's other path
    REDIRECT_AWAY = "redirect_away"  # 302 to another host name
    REDIRECT_MALFORMED = "redirect_malformed"  # 302 to state.location, a broken URL
    BAD_CODEBASE = "bad_codebase"  # the codebase a malformed URL (an unclosed IPv6 literal)
    WRONG_PROTOCOL = "wrong_protocol"  # <response protocol="2.0">


@dataclass(frozen=True)
class Release:
    version: str
    codebase: str
    package: str
    size: int
    sha256: str  # hex


@dataclass(frozen=True)
class SeenEvent:
    type: int
    result: int
    error_code: int | None
    previous_version: str | None


@dataclass(frozen=True)
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    elements: dict[str, dict[str, str]]  # tag -> attributes (request, os, app, ping, updatecheck)
    events: tuple[SeenEvent, ...]
    answer: Answer
    status: int
    sent: int  # body bytes sent

    @property
    def app(self) -> dict[str, str]:
        return self.elements.get("app", {})

    @property
    def has_updatecheck(self) -> bool:
        return "updatecheck" in self.elements

    @property
    def has_ping(self) -> bool:
        return "ping" in self.elements


def parse_request(body: bytes) -> tuple[dict[str, dict[str, str]], tuple[SeenEvent, ...]]:
    root = defusedxml.ElementTree.fromstring(body)
    assert root.tag == "request", root.tag
    elements = {"request": dict(root.attrib)}
    for path, tag in (
        ("os", "os"),
        ("app", "app"),
        ("app/ping", "ping"),
        ("app/updatecheck", "updatecheck"),
    ):
        element = root.find(path)
        if element is not None:
            elements[tag] = dict(element.attrib)
    events = []
    for e in root.findall("app/event"):
        code = e.get("errorcode")
        events.append(
            SeenEvent(
                int(e.get("eventtype", "-1")),
                int(e.get("eventresult", "-1")),
                int(code) if code is not None else None,
                e.get("previousversion"),
            )
        )
    return elements, tuple(events)


def _doc(name: str) -> ET.Element:
    root: ET.Element = defusedxml.ElementTree.fromstring((FIXTURES / name).read_bytes())
    return root


def _bytes(root: ET.Element) -> bytes:
    body: bytes = ET.tostring(root, encoding="utf-8")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def _found(element: ET.Element | None) -> ET.Element:
    assert element is not None
    return element


def update_document(
    app_id: str, release: Release, poll_interval_s: int | None = None, *, hex_hash: bool = False
) -> ET.Element:
    """Nebraska's update response with ``release`` substituted."""
    root = _doc("response-nebraska-update.xml")
    app = _found(root.find("app"))
    app.set("appid", app_id)
    check = _found(app.find("updatecheck"))
    if poll_interval_s is not None:
        check.set("PollInterval", str(poll_interval_s))
    _found(check.find("urls/url")).set("codebase", release.codebase)
    manifest = _found(check.find("manifest"))
    manifest.set("version", release.version)
    package = manifest.findall("packages/package")[0]
    package.set("name", release.package)
    package.set("size", str(release.size))
    package.attrib.pop("hash", None)  # the fixture's SHA-1 is not this payload's
    action = _found(manifest.find("actions/action[@event='postinstall']"))
    if hex_hash:
        action.attrib.pop("sha256")
        package.set("hash_sha256", release.sha256)
    else:
        action.set("sha256", base64.b64encode(bytes.fromhex(release.sha256)).decode())
    return root


def noupdate_document(app_id: str, poll_interval_s: int | None = None) -> ET.Element:
    root = _doc("response-noupdate.xml")
    app = _found(root.find("app"))
    app.set("appid", app_id)
    if poll_interval_s is not None:
        _found(app.find("updatecheck")).set("PollInterval", str(poll_interval_s))
    return root


def deferred_document(app_id: str, reason: str) -> ET.Element:
    """What Nebraska answers when its policy holds the update back."""
    root = noupdate_document(app_id)
    root.set("server", "nebraska")
    app = _found(root.find("app"))
    app.set("status", reason)
    _found(app.find("updatecheck")).set("status", "error-internal")
    for ping in app.findall("ping"):
        app.remove(ping)
    return root


def billion_laughs() -> bytes:
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE response [", '  <!ENTITY lol0 "lol">']
    lines += [f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    lines += ["]>", '<response protocol="3.0"><app appid="x">&lol9;</app></response>']
    return "\n".join(lines).encode()


def xxe(app_id: str, release: Release, target: Path) -> bytes:
    """The update document whose version is a local file's content."""
    body = _bytes(update_document(app_id, release)).decode()
    body = body.replace(f'version="{release.version}"', 'version="&xxe;"')
    head, rest = body.split("\n", 1)
    doctype = f'<!DOCTYPE response [<!ENTITY xxe SYSTEM "file://{target}">]>'
    return f"{head}\n{doctype}\n{rest}".encode()


def huge_chunks(total: int = HUGE_BYTES, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A well-formed document of ``total`` bytes, generated as it is sent."""
    head = b'<?xml version="1.0"?><response protocol="3.0"><!--'
    tail = b"--></response>"
    yield head
    left = total - len(head) - len(tail)
    filler = b"x" * chunk
    while left > 0:
        n = min(chunk, left)
        yield filler[:n]
        left -= n
    yield tail


@dataclass
class _State:
    release: Release | None
    answer: Answer
    deferral: str
    poll_interval_s: int | None
    xxe_target: Path
    location: str = "http://[::1/"  # where REDIRECT_MALFORMED points
    queued: list[Answer] = field(default_factory=list)
    seen: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(default_factory=threading.Condition)
    in_flight: int = 0

    def next_answer(self) -> Answer:
        with self.lock:
            return self.queued.pop(0) if self.queued else self.answer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        state = self.server.state
        with state.idle:
            state.in_flight += 1
        try:
            self._post(state)
        finally:
            with state.idle:
                state.in_flight -= 1
                state.idle.notify_all()

    def _post(self, state: _State) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(min(length, MAX_REQUEST))
        elements, events = parse_request(body)
        app_id = elements.get("app", {}).get("appid", "")
        answer = state.next_answer()
        status, sent = self._answer(state, answer, app_id)
        with state.lock:
            state.seen.append(
                SeenRequest(
                    self.path,
                    dict(self.headers.items()),
                    body,
                    elements,
                    events,
                    answer,
                    status,
                    sent,
                )
            )

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        return len(body)

    def _stream(self, declared: bool) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        if declared:
            self.send_header("Content-Length", str(HUGE_BYTES))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0
        try:
            for chunk in huge_chunks():
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client hung up, as it should
            pass
        return sent

    def _answer(self, state: _State, answer: Answer, app_id: str) -> tuple[int, int]:
        release = state.release
        poll = state.poll_interval_s

        def update(*, hex_hash: bool = False) -> ET.Element:
            assert release is not None, "an update answer needs a release"
            return update_document(app_id, release, poll, hex_hash=hex_hash)

        match answer:
            case Answer.REAL_NOUPDATE:
                return 200, self._send(200, (FIXTURES / "response-noupdate.xml").read_bytes())
            case Answer.REAL_UPDATE:
                body = (FIXTURES / "response-nebraska-update.xml").read_bytes()
                return 200, self._send(200, body)
            case Answer.NOUPDATE:
                return 200, self._send(200, _bytes(noupdate_document(app_id, poll)))
            case Answer.UPDATE:
                return 200, self._send(200, _bytes(update()))
            case Answer.UPDATE_HEX_HASH:
                return 200, self._send(200, _bytes(update(hex_hash=True)))
            case Answer.DEFERRED:
                return 200, self._send(200, _bytes(deferred_document(app_id, state.deferral)))
            case Answer.UNKNOWN_STATUS:
                doc = update()
                _found(doc.find("app/updatecheck")).set("status", "error-internal")
                return 200, self._send(200, _bytes(doc))
            case Answer.MALFORMED:
                whole = _bytes(update())
                return 200, self._send(200, whole[: len(whole) // 2])
            case Answer.EMPTY:
                return 200, self._send(200, b"")
            case Answer.BILLION_LAUGHS:
                return 200, self._send(200, billion_laughs())
            case Answer.XXE:
                assert release is not None
                return 200, self._send(200, xxe(app_id, release, state.xxe_target))
            case Answer.HUGE | Answer.HUGE_DECLARED:
                return 200, self._stream(declared=answer is Answer.HUGE_DECLARED)
            case Answer.NO_CODEBASE:
                doc = update()
                _found(doc.find("app/updatecheck/urls/url")).attrib.pop("codebase")
                return 200, self._send(200, _bytes(doc))
            case Answer.SIZE_ZERO:
                doc = update()
                doc.findall("app/updatecheck/manifest/packages/package")[0].set("size", "0")
                return 200, self._send(200, _bytes(doc))
            case Answer.HASH_MISSING:
                doc = update()
                _found(doc.find("app/updatecheck/manifest/actions/action")).attrib.pop("sha256")
                return 200, self._send(200, _bytes(doc))
            case Answer.FOREIGN_PACKAGE:
                doc = update()
                package = doc.findall("app/updatecheck/manifest/packages/package")[0]
                package.set("name", "https://evil.invalid/payload.gz")
                return 200, self._send(200, _bytes(doc))
            case Answer.HTTP_ERROR:
                return 500, self._send(500, b"")
            case Answer.REDIRECT_SAME:
                return 307, self._send(307, b"", {"Location": "/v1/update/redirected"})
            case Answer.BAD_CODEBASE:
                doc = update()
                _found(doc.find("app/updatecheck/urls/url")).set("codebase", "https://[::1/x/")
                return 200, self._send(200, _bytes(doc))
            case Answer.WRONG_PROTOCOL:
                doc = update()
                doc.set("protocol", "2.0")
                return 200, self._send(200, _bytes(doc))
            case Answer.REDIRECT_MALFORMED:
                return 302, self._send(302, b"", {"Location": state.location})
            case Answer.REDIRECT_AWAY:
                port = self.server.server_address[1]
                target = f"http://localhost:{port}/v1/update/"
                return 302, self._send(302, b"", {"Location": target})


class _Server(LoopbackHTTPServer):
    state: _State


class OmahaServer(LoopbackServer[_Server]):
    def __init__(
        self,
        *,
        release: Release | None = None,
        answer: Answer = Answer.NOUPDATE,
        deferral: str = DEFAULT_DEFERRAL,
        poll_interval_s: int | None = None,
        xxe_target: Path = Path("/etc/hostname"),
    ) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = _State(release, answer, deferral, poll_interval_s, xxe_target)
        super().__init__(server)

    @property
    def url(self) -> str:
        return f"{self.origin}/v1/update/"

    @property
    def state(self) -> _State:
        return self._server.state

    def answer(self, answer: Answer, *, release: Release | None = None) -> None:
        """Answer every request like this from now on."""
        with self.state.lock:
            self.state.answer = answer
            if release is not None:
                self.state.release = release

    def queue(self, *answers: Answer) -> None:
        """Answer the next requests like these, in order, then as before."""
        with self.state.lock:
            self.state.queued.extend(answers)

    @property
    def requests(self) -> list[SeenRequest]:
        """Every answered request; waits (briefly) for those still being answered."""
        with self.state.idle:
            self.state.idle.wait_for(lambda: self.state.in_flight == 0, timeout=10)
        with self.state.lock:
            return list(self.state.seen)

    def events(self) -> list[SeenEvent]:
        return [e for r in self.requests for e in r.events]


def omaha_release(repo_url: str, published: Published) -> Release:
    """What an Omaha server offers for a release published into the repository at
    ``repo_url``: its package under ``images/<version>/``."""
    data = published.image_path.read_bytes()
    version = published.manifest.version
    return Release(
        version=version,
        codebase=f"{repo_url}/images/{version}/",
        package=published.image_path.name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def use_omaha(config: Path, server_url: str) -> None:
    """Point the host's config at the Omaha server (group stable, no update.conf)."""
    config.write_text(
        config.read_text().replace("[source]\n", '[source]\nkind = "omaha"\n')
        + f'\n[omaha]\nserver = "{server_url}"\ngroup = "stable"\nflatcar_conf = false\n'
    )
