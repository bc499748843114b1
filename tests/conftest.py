"""Shared fixtures: partitioned disk images made with the real tools."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

import tests.fuzzing  # noqa: F401  (registers and loads the hypothesis profile)
from devtools.diskimage import DEFAULT_LABELS, DiskLayout, PartitionSpec, make_disk_image
from devtools.etcd import EtcdNode
from devtools.fsimage import make_usr_image
from devtools.gpgkeys import SigningKey, create_key, kill_agents
from devtools.host import Host, provision
from devtools.repo_server import RepoServer
from policies.etcdclient import EtcdClient, EtcdSettings
from tests.toolslist import listed
from updater import cli
from updater.clock import SystemClock
from updater.gpg import sign_detached
from updater.manifest import Compression
from updater.release import Published, ReleaseRequest, publish

SLOT_SIZE = 4 * 1024 * 1024  # bytes; images are sparse, so size costs nothing

MakeImage = Callable[..., DiskLayout]


# ---- every program the session starts has an install step (scripts/tools.list) -----------

_SPAWNED: dict[str, str] = {}  # program -> the test that started it first
_CURRENT_TEST = ["<collection>"]


def _record_spawn(event: str, args: tuple[Any, ...]) -> None:
    if event != "subprocess.Popen":
        return
    executable, argv = args[0], args[1]
    program = executable or (argv[0] if isinstance(argv, (list, tuple)) and argv else argv)
    if isinstance(program, (str, bytes, os.PathLike)):
        _SPAWNED.setdefault(os.fsdecode(program), _CURRENT_TEST[0])


sys.addaudithook(_record_spawn)


def _unlisted_spawns() -> dict[str, str]:
    """Programs started from a system directory that scripts/tools.list does not name."""
    commands, files = listed()
    known = commands | {Path(f).name for f in files}
    out = {}
    for program, test in _SPAWNED.items():
        if "/" in program and not program.startswith(("/usr/", "/bin/", "/sbin/")):
            continue  # a script a test wrote, the venv's python or updatectl
        if Path(program).name not in known and program != sys.executable:
            out[program] = test
    return out


_WORKERS_UNLISTED: dict[str, str] = {}  # under xdist: what the workers found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    unlisted = _unlisted_spawns()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports it
        workeroutput["unlisted_spawns"] = json.dumps(unlisted)
        return
    unlisted.update(_WORKERS_UNLISTED)
    if unlisted:
        sys.stderr.write(
            "\nERROR: the tests started programs that scripts/tools.list does not install:\n"
            + "".join(f"  {p}  (first by {t})\n" for p, t in sorted(unlisted.items()))
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist: a worker finished; keep the programs it started unlisted."""
    found = getattr(node, "workeroutput", {}).get("unlisted_spawns")
    if found:
        _WORKERS_UNLISTED.update(json.loads(found))


# The tests that boot QEMU machines or build their Debian trees, and those that time
# themselves against deadlines or a calibration run under load (kill -9 at random
# points, 52 agents under etcd faults), carry xdist_group("serial"): they run one
# after another in one xdist worker, and first: they are the suite's long pole
# (about two thirds of its time) and share the image cache; the rest of the suite
# runs beside them in the other worker (`make test`: pytest -n 2 --dist loadgroup).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def serial(item: pytest.Item) -> bool:
        return any(m.args[:1] == ("serial",) for m in item.iter_markers("xdist_group"))

    items.sort(key=lambda item: not serial(item))  # stable: the serial group first


def pytest_runtest_setup(item: pytest.Item) -> None:
    _CURRENT_TEST[0] = item.nodeid
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """updatectl configures structlog per process; tests run many in one."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def make_image(tmp_path: Path) -> MakeImage:
    """Build a fresh sparse GPT image in tmp_path; keywords go to make_disk_image."""
    counter = itertools.count(1)

    def make(
        labels: Sequence[str] = DEFAULT_LABELS,
        extra: Sequence[PartitionSpec] = (),
        *,
        leading: Sequence[PartitionSpec] = (),
        slot_size: int = SLOT_SIZE,
    ) -> DiskLayout:
        path = tmp_path / f"disk{next(counter)}.img"
        return make_disk_image(path, slot_size, labels, extra, leading=leading)

    return make


@pytest.fixture
def slot_image(make_image: MakeImage) -> DiskLayout:
    """An image with USR-A (partition 1) and USR-B (partition 2)."""
    return make_image()


# ---- releases, repositories and simulated hosts ---------------------------------------------


HOST_SLOT_SIZE = 16 * 1024 * 1024
USR_IMAGE_SIZE = 8 * 1024 * 1024


def _throwaway_key(factory: pytest.TempPathFactory, name: str, uid: str) -> Iterator[SigningKey]:
    """A fresh key in its own GNUPGHOME; its gpg-agent is killed afterwards, pass or fail."""
    home = factory.mktemp(f"gpg-{name}")
    try:
        yield create_key(home, uid)
    finally:
        kill_agents(home)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    yield from _throwaway_key(tmp_path_factory, "release", "updater release <release@localhost>")


@pytest.fixture(scope="session")
def rogue_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A well-formed key that no host trusts."""
    yield from _throwaway_key(tmp_path_factory, "rogue", "mallory <mallory@localhost>")


@pytest.fixture(scope="session")
def second_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A second release key (key rotation, thresholds)."""
    yield from _throwaway_key(tmp_path_factory, "second", "updater second <second@localhost>")


@pytest.fixture(scope="session")
def third_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    yield from _throwaway_key(tmp_path_factory, "third", "updater third <third@localhost>")


@pytest.fixture(scope="session")
def usr_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("usr-images")
    return {
        v: make_usr_image(d / f"usr-{v}.img", v, size=USR_IMAGE_SIZE, payload=2 * 1024 * 1024)
        for v in ("1.0.0", "1.1.0", "1.2.0")
    }


@dataclass
class Repo:
    root: Path
    server: RepoServer
    key: SigningKey

    @property
    def url(self) -> str:
        return self.server.url

    def publish(
        self,
        version: str,
        image: Path,
        *,
        compression: Compression = Compression.ZSTD,
        channel: str = "stable",
        key: SigningKey | None = None,
        expires_in: timedelta = timedelta(days=30),
        boot_files: tuple[tuple[str, Path], ...] = (),
    ) -> Published:
        k = key or self.key
        return publish(
            ReleaseRequest(
                image=image,
                version=version,
                repo=self.root,
                gnupghome=k.gnupghome,
                key_id=k.fingerprint,
                channel=channel,
                compression=compression,
                expires_in=expires_in,
                boot_files=boot_files,
            ),
            SystemClock().now(),
        )

    def manifest_path(self, channel: str = "stable") -> Path:
        return self.root / channel / "release.json"

    def manifest(self, channel: str = "stable") -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.manifest_path(channel).read_bytes())
        return doc

    def sign_manifest(
        self, body: bytes, channel: str = "stable", key: SigningKey | None = None
    ) -> None:
        """Replace the channel's manifest with ``body``, validly signed (by ``key``)."""
        k = key or self.key
        path = self.manifest_path(channel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        sign_detached(
            path, path.with_name("release.json.asc"), gnupghome=k.gnupghome, key_id=k.fingerprint
        )

    def boot_path(self, name: str, channel: str = "stable") -> str:
        """The URL path of one of the channel's boot files, as the server sees it."""
        boot = self.manifest(channel)["boot"]
        assert isinstance(boot, list)
        url = next(str(b["url"]) for b in boot if b["name"] == name)
        return "/" + str(Path(channel, url)).replace(f"{channel}/../", "")

    def image_path(self, channel: str = "stable") -> str:
        """The URL path of the channel's current image, as the server sees it."""
        image = self.manifest(channel)["image"]
        assert isinstance(image, dict)
        return "/" + str(Path(channel, str(image["url"]))).replace(f"{channel}/../", "")


@pytest.fixture
def repo(tmp_path: Path, release_key: SigningKey) -> Iterator[Repo]:
    root = tmp_path / "repo"
    root.mkdir()
    with RepoServer(root) as server:
        yield Repo(root, server, release_key)


@pytest.fixture
def host(tmp_path: Path, usr_images: dict[str, Path], repo: Repo, release_key: SigningKey) -> Host:
    """A host booted from USR-A with 1.0.0 that follows ``repo``'s stable channel."""
    return provision(
        tmp_path / "host",
        slot_size=HOST_SLOT_SIZE,
        first_image=usr_images["1.0.0"],
        first_version="1.0.0",
        repo_url=repo.url,
        keyring=release_key.public_key,
    )


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def updatectl(host: Host | None, *args: str) -> CliResult:
    """Run updatectl in-process against ``host``'s config."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config", str(host.config), *args] if host is not None else list(args)
    with contextlib.suppress(SystemExit):
        code = cli.main(argv, out=out, err=err)
        return CliResult(code, out.getvalue(), err.getvalue())
    return CliResult(2, out.getvalue(), err.getvalue())


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET sees, read as it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def assignments(self, key: str) -> list[str]:
        """The values of every ``KEY=`` sent so far, in order."""
        return [
            line[len(key) + 1 :]
            for message in list(self.messages)
            for line in message.split("\n")
            if line.startswith(key + "=")
        ]

    def drain(self) -> list[str]:
        time.sleep(0.2)
        return list(self.messages)

    def close(self) -> None:
        self._closing.set()
        self._reader.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


# ---- waiting: the one polling helper --------------------------------------------------------


def _polls(cond: Callable[[], bool], timeout: float, what: str) -> Iterator[None]:
    """Yield while ``cond`` does not hold; AssertionError once ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'the condition'}")
        yield


async def reboot_now_when_free(agent: Any, attempts: int = 200) -> None:
    """``agent.reboot_now()``, asked again while the agent's own reboot attempt (the
    policy's, after staging) is under way: the refusal says to ask again."""
    from updater.errors import RefusedError  # noqa: PLC0415

    for _ in range(attempts - 1):
        try:
            await agent.reboot_now()
            return
        except RefusedError as exc:
            if "under way" not in exc.message:
                raise
        await asyncio.sleep(0.05)
    await agent.reboot_now()


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait (in the event loop) until ``cond()`` holds."""
    for _ in _polls(cond, timeout, what):
        await asyncio.sleep(0.02)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait (blocking: the thing waited for runs in another thread or process)."""
    for _ in _polls(cond, timeout, what):
        time.sleep(0.05)


# ---- etcd -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdNode]:
    """A real single-node etcd on loopback for the test module, gone after it."""
    with EtcdNode() as node:
        yield node


@pytest.fixture
def group() -> str:
    """A lock group of the test's own, so tests sharing one etcd never meet."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(etcd: EtcdNode) -> Iterator[EtcdClient]:
    c = EtcdClient(EtcdSettings(endpoints=etcd.endpoints, timeout_s=5))
    yield c
    c.close()
