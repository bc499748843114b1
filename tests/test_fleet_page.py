"""The dashboard page in headless Chromium (devtools/chromium.py, over
--remote-debugging-pipe; loopback only): it renders 200 hosts from a real etcd,
follows a host that changes, shows a stale holder, and shows hostile records as
text without running them. Screenshots go to test-output/ for a person to look at."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.chromium import Chromium, Page
from devtools.etcd import EtcdNode
from devtools.fleetsim import IMG, NEW, SCRIPT, FleetWriter, fleet, host_id, hostile
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.fleet import HostRecord
from policies.fleetserve import EtcdReads, FleetCache, FleetServer, ServeSettings, serving
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
N = 200


@pytest.fixture
def dashboard(etcd: EtcdNode) -> Iterator[tuple[FleetServer, FleetWriter, list[HostRecord]]]:
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    now = time.time()
    hosts = fleet(N, now)
    w = FleetWriter(client)
    w.put_all(hosts)
    w.take_slot("db", host_id(3), since=now - 2 * 3600 - 125)  # a host that never came back
    w.take_slot("db", host_id(11), since=now - 300)
    w.fail("web", "1.2.0", host_id(0), "check_failed", now - 100)
    cache = FleetCache(EtcdReads(client, 1), refresh_s=0.3, stale_after_s=3600)
    srv = FleetServer(ServeSettings(port=0), cache)
    with contextlib.closing(client), serving(srv):
        yield srv, w, hosts


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    with Chromium(tmp_path) as b:
        yield b


def text(page: Page, selector: str) -> str:
    value = page.evaluate(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
        " return e ? e.textContent : null; })()"
    )
    return "" if value is None else str(value)


def host_cells(page: Page, hostname: str) -> list[str]:
    cells = page.evaluate(
        f"[...document.querySelectorAll('#hosts tbody tr')]"
        f".filter(r => r.dataset.host === {json.dumps(hostname)})"
        ".map(r => [...r.cells].map(c => c.textContent))[0] || []"
    )
    return [str(c) for c in cells]


def rows(page: Page) -> int:
    return int(page.evaluate("document.querySelectorAll('#hosts tbody tr[data-host]').length"))


def test_page_renders_the_fleet_follows_changes_and_shows_a_stale_holder(
    dashboard: tuple[FleetServer, FleetWriter, list[HostRecord]], browser: Chromium
) -> None:
    srv, writer, hosts = dashboard
    page = browser.open(srv.url + "/")
    wait_for(lambda: rows(page) == N, 30, "the page shows every host")
    assert text(page, "#target") == NEW
    on_new = sum(1 for h in hosts if h.booted_version == NEW)
    assert text(page, "#progress-text").startswith(f"{on_new} of {N} hosts on target")
    versions = page.evaluate(
        "[...document.querySelectorAll('#versions tbody tr')].map(r => r.dataset.version)"
    )
    assert versions == [NEW, "1.0.0"]
    assert text(page, "#status").startswith("live")
    # the stale holder: named, its age shown, marked
    stale = page.evaluate("[...document.querySelectorAll('.holder.stale')].map(e => e.textContent)")
    assert len(stale) == 1 and stale[0].startswith("host-003 (2h 0")
    fresh = page.evaluate("[...document.querySelectorAll('.holder:not(.stale)')].length")
    assert fresh == 1  # host-011, five minutes in
    failing = page.evaluate(
        "[...document.querySelectorAll('#failures tbody tr')].map(r => r.dataset.host)"
    )
    by_group = sorted(hosts, key=lambda h: (h.group, h.hostname))
    assert failing == [h.hostname for h in by_group if h.last_error_kind]
    assert "1.2.0" in text(page, "#failed-versions")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(OUTPUT / "fleet-serve.png")
    page.screenshot(OUTPUT / "fleet-serve-full.png", full_page=True)

    # a host changes in etcd: the page follows without a reload
    before = host_cells(page, "host-001")
    assert before[3] == "1.0.0" and before[5] == "behind"
    writer.change(hosts[1], booted_version=NEW, booted_slot="USR-B")
    wait_for(lambda: host_cells(page, "host-001")[3] == NEW, 20, "the page shows the new version")
    assert host_cells(page, "host-001")[5] == "current"
    wait_for(
        lambda: text(page, "#progress-text").startswith(f"{on_new + 1} of {N}"),
        20,
        "the rollout's progress moves",
    )
    assert not page.events("Runtime.exceptionThrown")


def test_hostile_records_are_text_and_never_run(tmp_path: Path, browser: Chromium) -> None:
    with EtcdNode() as node:
        client = EtcdClient(EtcdSettings(endpoints=node.endpoints, timeout_s=5))
        now = time.time()
        w = FleetWriter(client)
        w.put_all(fleet(20, now))
        hostile(w, now)
        cache = FleetCache(EtcdReads(client, 1), refresh_s=0.3, stale_after_s=3600)
        srv = FleetServer(ServeSettings(port=0), cache)
        with contextlib.closing(client), serving(srv):
            page = browser.open(srv.url + "/")
            wait_for(lambda: rows(page) == 21, 30, "the page shows every readable host")
            time.sleep(1.0)  # a few polls more: anything injected would have run by now
            evil = host_cells(page, IMG)
            assert evil[0] == IMG and evil[3] == SCRIPT and evil[4] == "<b>IDLE</b>"
            # no element came from a record: the page's own script is the only one, no images
            assert page.evaluate("document.querySelectorAll('img').length") == 0
            assert page.evaluate("document.querySelectorAll('script').length") == 1
            assert page.evaluate("document.querySelectorAll('b, td td').length") == 0
            unreadable = page.evaluate(
                "[...document.querySelectorAll('.unreadable')].map(e => e.textContent)"
            )
            assert len(unreadable) == 7 and any("not-json" in u for u in unreadable)
            assert "total_slots" in text(page, "#groups")  # the broken semaphore, as text
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(OUTPUT / "fleet-serve-hostile.png")
            asked = [p for _, p in srv.requests]
            assert "/api/v1/fleet" in asked
            assert not [p for p in asked if "pwned" in p]  # no payload ever fetched anything
            assert not page.events("Runtime.exceptionThrown")


def test_the_page_with_a_token(etcd: EtcdNode, browser: Chromium) -> None:
    """With --token-file the page takes the token from its address's fragment (never sent
    to the server), drops it from the address bar and sends it as a bearer token."""
    client = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    FleetWriter(client).put_all(fleet(5, time.time()))
    cache = FleetCache(EtcdReads(client, 1), refresh_s=0.3, stale_after_s=3600)
    srv = FleetServer(ServeSettings(port=0, token="page-t0ken"), cache)
    with contextlib.closing(client), serving(srv):
        without = browser.open(srv.url + "/")
        wait_for(lambda: text(without, "#status").startswith("needs a token"), 20, "a 401 shown")
        assert rows(without) == 0
        page = browser.open(srv.url + "/#token=page-t0ken")
        wait_for(lambda: rows(page) >= 5, 20, "the page shows the hosts")
        assert page.evaluate("location.hash") == ""
        assert not [p for _, p in srv.requests if "page-t0ken" in p]
