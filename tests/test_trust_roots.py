"""Trust roots end to end (issue 15): `updatectl keys rotate` writes signed roots into a
loopback repository, the real `updatectl check --install` walks them from the keyring
(root 0) or the root shipped in the image, and every broken, expired, replayed or
rolled-back chain, too few signatures and a leaked old key is a typed error with nothing
installed: no slot, flag, state or trust-root change. Real gpg keys throughout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devtools.gpgkeys import SigningKey, ceremony_home, kill_agents
from devtools.host import Host
from tests.conftest import CliResult, Repo, updatectl
from tests.omaha_server import Answer, OmahaServer, omaha_release, use_omaha
from tests.test_cycle import Snapshot, assert_refused, check_install, error_of
from updater.errors import ExitCode
from updater.gpg import sign_detached
from updater.trustroot import Root, RootKey, serialize_root

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ceremony(
    tmp_path_factory: pytest.TempPathFactory,
    release_key: SigningKey,
    second_key: SigningKey,
    third_key: SigningKey,
    rogue_key: SigningKey,
) -> Iterator[Path]:
    """One GnuPG home with every test key's secret key (the key ceremony's machine)."""
    home = ceremony_home(
        tmp_path_factory.mktemp("ceremony") / "gnupg", release_key, second_key, third_key, rogue_key
    )
    try:
        yield home
    finally:
        kill_agents(home)


def rotate(repo: Repo, home: Path, sign: list[SigningKey], *args: str) -> CliResult:
    keys = [a for k in sign for a in ("--key", k.fingerprint)]
    return updatectl(
        None, "keys", "rotate", "--json", "--repo", str(repo.root), "--gnupghome", str(home),
        *keys, *args,
    )  # fmt: skip


def release(repo: Repo, home: Path, image: Path, version: str, *sign: SigningKey) -> None:
    keys = [a for k in sign for a in ("--key", k.fingerprint)]
    r = updatectl(
        None, "release", "--image", str(image), "--version", version, "--repo", str(repo.root),
        "--gnupghome", str(home), *keys,
    )  # fmt: skip
    assert r.code == 0, r.err


def root_of(
    version: int, threshold: int, *keys: SigningKey, expires: datetime | None = None
) -> Root:
    return Root(
        version,
        threshold,
        tuple(RootKey(k.fingerprint, k.public_key.read_text()) for k in keys),
        expires or NOW + timedelta(days=365),
    )


def write_root(
    repo: Repo, home: Path, root: Root, *signers: SigningKey, name: int | None = None
) -> None:
    """A root written by hand (what `keys rotate` refuses to write), signed by ``signers``."""
    keys = repo.root / "keys"
    keys.mkdir(exist_ok=True)
    path = keys / f"root.{root.version if name is None else name}.json"
    path.write_bytes(serialize_root(root))
    sign_detached(
        path,
        path.with_name(path.name + ".asc"),
        gnupghome=home,
        key_id=tuple(k.fingerprint for k in signers),
    )


def trust_file(host: Host) -> bytes | None:
    path = host.state_dir / "trust-root.json"
    return path.read_bytes() if path.exists() else None


def trusted(host: Host) -> dict[str, object]:
    doc = updatectl(host, "status", "--json").json()
    root = doc["trust_root"]
    assert isinstance(root, dict), doc["trust_root_error"]
    return root


def refused(
    host: Host, kind: str, before: Snapshot, trust_before: bytes | None
) -> dict[str, object]:
    """`check --install` fails with ``kind``; nothing changed (trust root included)."""
    code, doc = check_install(host)
    assert (code, error_of(doc)) == (ExitCode.VERIFICATION, ("verification", kind)), doc
    assert_refused(host, before)
    assert trust_file(host) == trust_before, "the trust root changed"
    err = doc["error"]
    assert isinstance(err, dict) and err.get("hint")
    return err


# ---- the good paths -----------------------------------------------------------------------------


def test_without_roots_the_keyring_is_root_0(
    host: Host, repo: Repo, usr_images: dict[str, Path], release_key: SigningKey
) -> None:
    assert trusted(host) == {
        "version": 0,
        "threshold": 1,
        "keys": [release_key.fingerprint],
        "expires": None,
        "retired": [],
        "source": "keyring",
    }
    repo.publish("1.1.0", usr_images["1.1.0"])
    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True
    # the host looked for root 1, found none, and stays on its keyring
    assert "/keys/root.1.json" in [r.path for r in repo.server.requests]
    assert trust_file(host) is None
    text = updatectl(host, "status").out
    assert "Trust root:     0 (the [source] keyring" in text and release_key.fingerprint in text


def test_host_that_skipped_roots_walks_them_all(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
    third_key: SigningKey,
) -> None:
    """Roots 1-4 published while the host slept: it walks them in order, learns that the
    keyring's key was revoked, and installs a release signed by two of the newest keys."""
    a, b, c = release_key, second_key, third_key
    steps = [
        rotate(repo, ceremony, [a], "--expires-days", "30"),  # root 1: the keyring's key
        rotate(repo, ceremony, [a, b], "--add", b.fingerprint),  # root 2: A, B
        rotate(repo, ceremony, [a, b, c], "--add", c.fingerprint, "--threshold", "2"),
        rotate(repo, ceremony, [b, c], "--remove", a.fingerprint),  # root 4: B, C; 2 of 2
    ]
    assert [s.code for s in steps] == [0, 0, 0, 0], [s.err for s in steps]
    assert steps[3].json()["removed"] == [a.fingerprint]
    assert steps[3].json()["threshold"] == 2
    release(repo, ceremony, usr_images["1.1.0"], "1.1.0", b, c)

    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True, doc
    roots = [r.path for r in repo.server.requests if r.path.startswith("/keys/")]
    assert roots == [
        "/keys/root.1.json",
        "/keys/root.1.json.asc",
        "/keys/root.2.json",
        "/keys/root.2.json.asc",
        "/keys/root.3.json",
        "/keys/root.3.json.asc",
        "/keys/root.4.json",
        "/keys/root.4.json.asc",
        "/keys/root.5.json",  # none: root 4 is the newest
    ]
    root = trusted(host)
    assert (root["version"], root["threshold"], root["source"]) == (4, 2, "root")
    assert root["keys"] == sorted([b.fingerprint, c.fingerprint])
    assert root["retired"] == [a.fingerprint]
    assert json.loads(trust_file(host) or b"")["version"] == 4
    text = updatectl(host, "status").out
    assert "Trust root:     4 (threshold 2" in text and f"retired {a.fingerprint}" in text

    # the next check walks nothing again: it starts from its floor
    before = len(repo.server.requests)
    assert updatectl(host, "check").code == 0
    assert [r.path for r in repo.server.requests[before:] if "/keys/" in r.path] == [
        "/keys/root.5.json"
    ]


def test_threshold_two_needs_two_signatures(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
) -> None:
    a, b = release_key, second_key
    r = rotate(repo, ceremony, [a, b], "--add", b.fingerprint, "--threshold", "2")
    assert r.code == 0, r.err
    release(repo, ceremony, usr_images["1.1.0"], "1.1.0", a)  # one signature
    before, trust_before = Snapshot.take(host), trust_file(host)
    code, doc = check_install(host)
    assert (code, error_of(doc)) == (ExitCode.VERIFICATION, ("verification", "signature_threshold"))
    err = doc["error"]
    assert isinstance(err, dict) and "--key A --key B" in str(err["hint"])
    assert "1 valid signature(s), 2 needed" in str(err["message"])
    # nothing installed; the root walked to (1) is kept, the manifest refused
    assert_refused(host, before)
    assert json.loads(trust_file(host) or b"")["version"] == 1 and trust_before is None

    release(repo, ceremony, usr_images["1.1.0"], "1.1.0", a, b)
    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True, doc


def test_root_signed_by_too_few_old_keys(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    rogue_key: SigningKey,
) -> None:
    """Mallory publishes a root of her own key, signed by her key only."""
    write_root(repo, ceremony, root_of(1, 1, rogue_key), rogue_key)
    repo.publish("1.1.0", usr_images["1.1.0"], key=rogue_key)
    err = refused(host, "root_signature", Snapshot.take(host), trust_file(host))
    assert "0 valid signature(s) by the previous root's keys (root 0)" in str(err["message"])
    assert trusted(host)["version"] == 0


def test_root_not_signed_by_its_own_keys(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
) -> None:
    """The old key alone cannot hand the trust to a key that did not sign (a typo'd key)."""
    write_root(repo, ceremony, root_of(1, 1, second_key), release_key)
    repo.publish("1.1.0", usr_images["1.1.0"], key=second_key)
    err = refused(host, "root_signature", Snapshot.take(host), trust_file(host))
    assert "by its own keys" in str(err["message"])


def test_keys_rotate_refuses_to_publish_a_root_hosts_would_refuse(
    repo: Repo, ceremony: Path, release_key: SigningKey, second_key: SigningKey
) -> None:
    assert rotate(repo, ceremony, [release_key]).code == 0
    # root 2 of B only, signed by B only: root 1's key did not sign
    r = rotate(repo, ceremony, [second_key], "--add", second_key.fingerprint, "--remove",
               release_key.fingerprint)  # fmt: skip
    assert r.code == ExitCode.VERIFICATION and error_of(r.json()) == (
        "verification",
        "root_signature",
    )
    assert sorted(p.name for p in (repo.root / "keys").iterdir()) == [
        "root.1.json",
        "root.1.json.asc",
    ]
    bad = rotate(repo, ceremony, [release_key], "--remove", second_key.fingerprint)
    assert bad.code == ExitCode.CONFIG and "has no key" in bad.err
    bad = rotate(repo, ceremony, [release_key], "--threshold", "2")
    assert bad.code == ExitCode.CONFIG and "threshold 2" in bad.err


@pytest.mark.parametrize("rotated_before", [False, True], ids=["fresh-host", "host-on-root-1"])
def test_leaked_old_key_after_rotation(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
    rotated_before: bool,
) -> None:
    """The keyring's key leaked; root 1 revokes it. A release the thief signs with it is
    refused, by a host that walks the revocation now (a root that removes the key that
    signed the manifest) and by one that knew it before (a leaked old key)."""
    a, b = release_key, second_key
    r = rotate(repo, ceremony, [a, b], "--add", b.fingerprint, "--remove", a.fingerprint)
    assert r.code == 0, r.err
    if rotated_before:
        repo.publish("1.1.0", usr_images["1.1.0"], key=b)
        assert updatectl(host, "check").code == 0
        assert trusted(host)["version"] == 1
    repo.publish("1.2.0", usr_images["1.2.0"], key=a)  # the thief's release
    before, trust_before = Snapshot.take(host), trust_file(host)
    if not rotated_before:
        code, doc = check_install(host)  # the walk to root 1 is kept; the manifest refused
        assert code == ExitCode.VERIFICATION
        assert error_of(doc) == ("verification", "key_rotated_out")
        assert_refused(host, before)
        before, trust_before = Snapshot.take(host), trust_file(host)
    err = refused(host, "key_rotated_out", before, trust_before)
    assert a.fingerprint[-16:] in str(err["message"]) and "rotation removed" in str(err["message"])


def test_rolled_back_repository_keeps_the_floor(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
    tmp_path: Path,
) -> None:
    """The host accepted root 1 (A revoked). The repository is rolled back to before the
    rotation (no keys/, a release signed by A), and the OS image ships root 1's
    predecessor: the host still trusts root 1 and refuses A."""
    a, b = release_key, second_key
    assert rotate(repo, ceremony, [a]).code == 0  # root 1: A
    assert (
        rotate(repo, ceremony, [a, b], "--add", b.fingerprint, "--remove", a.fingerprint).code == 0
    )
    repo.publish("1.1.0", usr_images["1.1.0"], key=b)
    assert updatectl(host, "check").code == 0
    assert trusted(host)["version"] == 2
    shipped = tmp_path / "root.1.json"
    shipped.write_bytes((repo.root / "keys" / "root.1.json").read_bytes())
    host.config.write_text(
        host.config.read_text().replace("[source]\n", f'[source]\ntrust_root = "{shipped}"\n')
    )
    for p in (repo.root / "keys").iterdir():
        p.unlink()
    repo.publish("1.2.0", usr_images["1.2.0"], key=a)
    assert trusted(host)["version"] == 2  # the older shipped root does not lower the floor
    refused(host, "key_rotated_out", Snapshot.take(host), trust_file(host))


def test_replayed_old_root(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
) -> None:
    """root.3.json replaced by a copy of root 1 (its valid signatures included)."""
    for _ in range(2):
        assert rotate(repo, ceremony, [release_key]).code == 0
    repo.publish("1.1.0", usr_images["1.1.0"])
    assert updatectl(host, "check").code == 0 and trusted(host)["version"] == 2
    keys = repo.root / "keys"
    for suffix in (".json", ".json.asc"):
        (keys / f"root.3{suffix}").write_bytes((keys / f"root.1{suffix}").read_bytes())
    err = refused(host, "root_rollback", Snapshot.take(host), trust_file(host))
    assert "root.3.json holds root 1" in str(err["message"])


def test_broken_chain_and_missing_root(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
) -> None:
    a, b = release_key, second_key
    # root.1.json holds a root 3: the file names skip a version
    write_root(repo, ceremony, root_of(3, 1, a), a, name=1)
    repo.publish("1.1.0", usr_images["1.1.0"])
    err = refused(host, "root_chain_broken", Snapshot.take(host), None)
    assert "root.1.json holds root 3" in str(err["message"])

    # roots 1 and 3 published, 2 deleted; the release is signed by root 3's key
    write_root(repo, ceremony, root_of(1, 1, a), a)
    write_root(repo, ceremony, root_of(3, 1, b), b)
    repo.publish("1.1.0", usr_images["1.1.0"], key=b)
    before = Snapshot.take(host)
    code, doc = check_install(host)  # root 1 accepted, root 2 absent
    assert (code, error_of(doc)) == (ExitCode.VERIFICATION, ("verification", "root_missing"))
    assert_refused(host, before)
    missing = doc["error"]
    assert isinstance(missing, dict) and "root.2.json is missing" in str(missing["message"])
    assert trusted(host)["version"] == 1


def test_expired_root(
    host: Host, repo: Repo, usr_images: dict[str, Path], ceremony: Path, release_key: SigningKey
) -> None:
    """Root 1 is validly signed but expired (the publisher missed its renewal, or the server
    freezes the host on it): the walk keeps it (a valid rotation, as TUF does), the manifest
    is not even read, nothing installed. The next root, published in time, heals it."""
    expired = root_of(1, 1, release_key, expires=NOW - timedelta(days=1))
    write_root(repo, ceremony, expired, release_key)
    repo.publish("1.1.0", usr_images["1.1.0"])
    before = Snapshot.take(host)
    code, doc = check_install(host)
    assert (code, error_of(doc)) == (ExitCode.VERIFICATION, ("verification", "root_expired"))
    assert_refused(host, before)
    err = doc["error"]
    assert isinstance(err, dict) and "expired at" in str(err["message"])
    assert "keys rotate" in str(err["hint"])
    assert trusted(host)["version"] == 1
    refused(host, "root_expired", Snapshot.take(host), trust_file(host))  # again, every check

    assert rotate(repo, ceremony, [release_key], "--expires-days", "30").code == 0
    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True, doc
    assert trusted(host)["version"] == 2


def test_malformed_root_and_missing_shipped_root(
    host: Host, repo: Repo, usr_images: dict[str, Path], ceremony: Path, release_key: SigningKey,
    tmp_path: Path,
) -> None:  # fmt: skip
    keys = repo.root / "keys"
    keys.mkdir()
    (keys / "root.1.json").write_bytes(b'{"schema": 1, "type": "updater-root", "version": [[[')
    sign_detached(keys / "root.1.json", keys / "root.1.json.asc", gnupghome=ceremony,
                  key_id=release_key.fingerprint)  # fmt: skip
    repo.publish("1.1.0", usr_images["1.1.0"])
    refused(host, "root_malformed", Snapshot.take(host), None)
    (keys / "root.1.json").unlink()
    # an image whose [source] trust_root is not there
    host.config.write_text(
        host.config.read_text().replace(
            "[source]\n", f'[source]\ntrust_root = "{tmp_path / "absent.json"}"\n'
        )
    )
    err = refused(host, "root_missing", Snapshot.take(host), None)
    assert "trust_root" in str(err["hint"])
    assert "unknown" in updatectl(host, "status").out.split("Trust root:")[1].splitlines()[0]


def test_shipped_root_replaces_the_keyring(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
    tmp_path: Path,
) -> None:
    """An image that ships root 1 (B only) needs no keyring; the walk starts there."""
    a, b = release_key, second_key
    assert (
        rotate(repo, ceremony, [a, b], "--add", b.fingerprint, "--remove", a.fingerprint).code == 0
    )
    shipped = tmp_path / "root.json"
    shipped.write_bytes((repo.root / "keys" / "root.1.json").read_bytes())
    text = host.config.read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("keyring"))
    host.config.write_text(text.replace("[source]\n", f'[source]\ntrust_root = "{shipped}"\n'))
    assert trusted(host)["keys"] == [b.fingerprint]
    repo.publish("1.1.0", usr_images["1.1.0"], key=b)
    code, doc = check_install(host)
    assert code == 0 and doc["installed"] is True, doc
    assert [r.path for r in repo.server.requests if "/keys/" in r.path] == ["/keys/root.2.json"]


# ---- Omaha: the roots beside the package ---------------------------------------------------------


def test_omaha_walks_the_roots_beside_the_package(
    host: Host,
    repo: Repo,
    usr_images: dict[str, Path],
    ceremony: Path,
    release_key: SigningKey,
    second_key: SigningKey,
) -> None:
    """An Omaha server offers the package; the roots come from its codebase's keys/ (the
    link updatectl release makes); a rotation revokes A there too."""
    a, b = release_key, second_key
    assert (
        rotate(repo, ceremony, [a, b], "--add", b.fingerprint, "--remove", a.fingerprint).code == 0
    )
    good = repo.publish("1.1.0", usr_images["1.1.0"], key=b)
    assert (repo.root / "images" / "1.1.0" / "keys").readlink() == Path("../../keys")
    with OmahaServer(release=omaha_release(repo.url, good), answer=Answer.UPDATE) as server:
        use_omaha(host.config, server.url)
        # the thief's 1.2.0, signed by the revoked key, offered by a compromised server
        leaked = repo.publish("1.2.0", usr_images["1.2.0"], key=a)
        server.answer(Answer.UPDATE, release=omaha_release(repo.url, leaked))
        before = Snapshot.take(host)
        code, doc = check_install(host)
        assert (code, error_of(doc)) == (ExitCode.VERIFICATION, ("verification", "key_rotated_out"))
        assert_refused(host, before)
        roots = [r.path for r in repo.server.requests if "/keys/" in r.path]
        assert roots == [
            "/images/1.2.0/keys/root.1.json",
            "/images/1.2.0/keys/root.1.json.asc",
            "/images/1.2.0/keys/root.2.json",
            "/images/1.2.0/keys/root.3.json",  # refused: is a root missing? (no)
        ]
        # reported as update_engine's public key verification error (18)
        assert [(e.type, e.result, e.error_code) for e in server.events()] == [(3, 0, 18)]

        server.answer(Answer.UPDATE, release=omaha_release(repo.url, good))
        code, doc = check_install(host)
        assert code == 0 and doc["installed"] is True, doc
        assert trusted(host)["version"] == 1
