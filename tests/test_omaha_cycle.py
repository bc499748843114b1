"""Full cycles against an Omaha server (the test server answering from the real
documents) through the real install path to a GPT disk image: noupdate, an
update with every event in order, the reboot and rollback reports, deferral,
events kept while the server is unreachable, and every hostile answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.diskimage import cgpt_flags
from devtools.host import Host
from partitions.bootcontrol import SlotFlags
from tests.conftest import Repo, updatectl
from tests.omaha_server import (
    Answer,
    OmahaServer,
    Release,
    SeenEvent,
    omaha_release,
    use_omaha,
)
from tests.test_cycle import Snapshot, assert_refused
from updater.errors import ExitCode
from updater.manifest import Compression


@pytest.fixture
def omaha(host: Host, repo: Repo, usr_images: dict[str, Path]) -> Iterator[OmahaServer]:
    published = repo.publish("1.1.0", usr_images["1.1.0"], compression=Compression.ZSTD)
    with OmahaServer(release=omaha_release(repo.url, published), answer=Answer.NOUPDATE) as server:
        use_omaha(host.config, server.url)
        yield server


def events(server: OmahaServer) -> list[tuple[int, int, int | None, str | None]]:
    return [(e.type, e.result, e.error_code, e.previous_version) for e in server.events()]


def image_gets(repo: Repo) -> int:
    return len([r for r in repo.server.requests if r.path.endswith(".zst")])


def test_noupdate(host: Host, repo: Repo, omaha: OmahaServer) -> None:
    omaha.state.poll_interval_s = 1800
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    assert r.json()["update_available"] is False
    assert r.json()["poll_interval_s"] == 1800  # the agent's next poll (machine.next_delay)
    seen = omaha.requests[-1]
    assert seen.has_updatecheck and seen.has_ping
    app = seen.app
    assert app["version"] == "1.0.0" and app["track"] == "stable"
    assert app["bootid"].startswith("{") and len(app["machineid"]) == 32
    assert events(omaha) == []
    assert repo.server.requests == []  # nothing fetched beyond the check


def test_update_with_every_event_in_order(
    host: Host, repo: Repo, omaha: OmahaServer, usr_images: dict[str, Path]
) -> None:
    omaha.answer(Answer.UPDATE)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert cgpt_flags(host.disk, 2) == SlotFlags(2, 1, False)
    assert events(omaha) == [(13, 1, None, None), (14, 1, None, None), (3, 1, None, None)]
    # the manifest came from beside the package, on the codebase
    paths = [q.path for q in repo.server.requests]
    assert "/images/1.1.0/usr-1.1.0.img.zst.json" in paths
    assert "/images/1.1.0/usr-1.1.0.img.zst.json.asc" in paths

    # the reboot; the boot is blessed; the first check after it says so (3/2)
    assert host.reboot() == "USR-B"
    assert updatectl(host, "mark-good").code == 0
    omaha.answer(Answer.NOUPDATE)
    assert updatectl(host, "check").code == 0
    assert events(omaha)[-1] == (3, 2, None, "1.0.0")
    assert omaha.requests[-1].app["version"] == "1.1.0"
    assert updatectl(host, "check").code == 0  # said once
    assert events(omaha).count((3, 2, None, "1.0.0")) == 1


def test_rollback_is_reported(host: Host, omaha: OmahaServer) -> None:
    omaha.answer(Answer.UPDATE)
    assert updatectl(host, "check", "--install").code == 0
    assert host.reboot() == "USR-B"  # trial boot, never blessed ...
    assert host.reboot() == "USR-A"  # ... the firmware falls back
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    assert r.json()["update_available"] is False  # 1.1.0 failed here: not again
    assert (3, 0, 44, None) in events(omaha)
    assert (3, 2, None, "1.0.0") not in events(omaha)


def test_deferral(host: Host, repo: Repo, omaha: OmahaServer) -> None:
    omaha.answer(Answer.DEFERRED)
    before = Snapshot.take(host)
    for _ in range(2):
        r = updatectl(host, "check", "--install", "--json")
        assert r.code == 0, r.err
        assert r.json()["deferred"] == "error-maxUpdatesPerPeriodLimitReached"
    assert updatectl(host, "check").out.startswith("The update server holds an update back")
    assert Snapshot.take(host).flags_b == before.flags_b
    assert repo.server.requests == []
    assert [e for e in events(omaha) if e[1] == 9] == [(3, 9, 36, None)]  # once, not per poll


def test_events_wait_for_an_unreachable_server(host: Host, omaha: OmahaServer) -> None:
    omaha.answer(Answer.UPDATE)
    omaha.queue(Answer.UPDATE, Answer.HTTP_ERROR, Answer.HTTP_ERROR, Answer.HTTP_ERROR)
    assert updatectl(host, "check", "--install").code == 0  # the install does not wait
    assert [r.status for r in omaha.requests] == [200, 500, 500, 500]
    assert '"type": 3' in (host.state_dir / "omaha-events.json").read_text()
    omaha.answer(Answer.NOUPDATE)
    assert updatectl(host, "check").code == 0
    carried = omaha.requests[-1]
    assert carried.has_updatecheck
    assert [(e.type, e.result) for e in carried.events] == [(13, 1), (14, 1), (3, 1)]
    assert not (host.state_dir / "omaha-events.json").read_text().strip("[] \n")


@pytest.mark.parametrize(
    ("answer", "category", "kind"),
    [
        (Answer.MALFORMED, "download", "xml_parse"),
        (Answer.BILLION_LAUGHS, "download", "xml_forbidden"),
        (Answer.XXE, "download", "xml_forbidden"),
        (Answer.HUGE, "download", "too_large"),
        (Answer.HUGE_DECLARED, "download", "too_large"),
        (Answer.NO_CODEBASE, "download", "missing_codebase"),
        (Answer.SIZE_ZERO, "download", "size_invalid"),
        (Answer.UNKNOWN_STATUS, "download", "unknown_status"),
        (Answer.FOREIGN_PACKAGE, "download", "package_url"),
        (Answer.HASH_MISSING, "download", "hash_missing"),
        (Answer.EMPTY, "download", "empty_response"),
        (Answer.HTTP_ERROR, "download", "http_status"),
        (Answer.REDIRECT_AWAY, "download", "http_status"),
        (Answer.BAD_CODEBASE, "download", "package_url"),
        (Answer.WRONG_PROTOCOL, "download", "unsupported_protocol"),
        (Answer.REDIRECT_MALFORMED, "download", "unsupported_url"),
    ],
)
def test_hostile_answers(
    host: Host, repo: Repo, omaha: OmahaServer, answer: Answer, category: str, kind: str
) -> None:
    omaha.answer(answer)
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.DOWNLOAD, r.err
    assert (r.json()["error"]["category"], r.json()["error"]["kind"]) == (category, kind)
    assert image_gets(repo) == 0  # nothing downloaded ...
    assert_refused(host, before, state_unchanged=False)  # ... and nothing written
    assert Snapshot.take(host).flags_b == before.flags_b


def test_a_registration_refusal_is_an_error_with_a_hint_not_a_silent_deferral(
    host: Host, repo: Repo, omaha: OmahaServer
) -> None:
    """Nebraska answers error-instanceRegistrationFailed to a version that is not
    semver: the host must say so (and back off), not wait for ever."""
    omaha.state.deferral = "error-instanceRegistrationFailed"
    omaha.answer(Answer.DEFERRED)
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.DOWNLOAD, r.err
    error = r.json()["error"]
    assert error["kind"] == "server_refused"
    assert "semver" in error["hint"] and "1.0.0" in error["hint"]
    assert image_gets(repo) == 0
    assert_refused(host, before, state_unchanged=False)
    assert (3, 0, 34, None) in events(omaha)  # the server hears it as a failed check


def test_event_reports_that_fail_any_way_never_stop_an_install(
    host: Host, omaha: OmahaServer, usr_images: dict[str, Path]
) -> None:
    omaha.answer(Answer.REDIRECT_MALFORMED)  # every event POST: a redirect to a broken URL
    omaha.queue(Answer.UPDATE)  # ... after the update check
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == 0, r.err
    assert r.json()["installed"] is True
    raw = usr_images["1.1.0"].read_bytes()
    assert host.slot_bytes("USR-B", len(raw)) == raw
    assert '"type": 3' in (host.state_dir / "omaha-events.json").read_text()  # kept for later


def test_a_poll_interval_of_decades_is_capped(host: Host, omaha: OmahaServer) -> None:
    omaha.state.poll_interval_s = 999_999_999
    r = updatectl(host, "check", "--json")
    assert r.code == 0, r.err
    assert r.json()["poll_interval_s"] == 4 * 3600  # update_engine's ceiling; config: 1 h


def test_server_hash_disagrees_with_the_signed_manifest(
    host: Host, repo: Repo, omaha: OmahaServer
) -> None:
    rel = omaha.state.release
    assert rel is not None
    omaha.answer(
        Answer.UPDATE, release=Release(rel.version, rel.codebase, rel.package, rel.size, "0" * 64)
    )
    before = Snapshot.take(host)
    r = updatectl(host, "check", "--install", "--json")
    assert r.code == ExitCode.VERIFICATION, r.err
    assert r.json()["error"]["kind"] == "source_mismatch"
    assert image_gets(repo) == 0
    assert_refused(host, before, state_unchanged=False)
    assert (3, 0, 12, None) in events(omaha)  # the server hears why


def test_the_real_nebraska_document_drives_the_agent(host: Host, omaha: OmahaServer) -> None:
    """Flatcar's own update response (its app id, 3732.0.0, its codebase): parsed and
    followed as far as the signed manifest, which its server does not have."""
    host.config.write_text(
        host.config.read_text().replace(
            "[omaha]\n", '[omaha]\napp_id = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"\n'
        )
    )
    omaha.answer(Answer.REAL_UPDATE)
    r = updatectl(host, "check", "--json")
    assert r.code == ExitCode.DOWNLOAD  # its codebase is not reachable from here
    assert r.json()["error"]["kind"] in ("connection", "http_status")
    assert _seen_is_update_engine_shaped(omaha.requests[-1].events)


def _seen_is_update_engine_shaped(seen: tuple[SeenEvent, ...]) -> bool:
    return all(e.type in (3, 13, 14) for e in seen)
