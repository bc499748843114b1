"""A fleet of OS images under QEMU rolling out a release under the etcd reboot
lock: what tests/test_os_fleet.py and ``make demo-fleet`` share.

- :class:`Node`: one machine (devtools.osupdate.Machine), booted again after
  every reboot of its guest (a fresh QEMU per boot) until told to stop; its
  service (port 8080 in the guest) forwarded to a port on this machine's
  loopback; what its console says, as it says it.
- :class:`Client`: requests in a loop to the machines' services, failing over
  from one to the next as a load balancer would; a request fails only when no
  machine answered it.
- :func:`fleet_config`: the agent's lock settings (``strategy = "lock"``, the
  etcd members on this machine's loopback, 10.0.2.2 in the guests).
- :func:`fleet_status`: ``updatectl fleet status`` run on this side.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devtools import osimage, osupdate
from devtools.etcd import EtcdCluster, free_port
from devtools.lockhistory import holders_over_time, most_holders, semaphore_history
from devtools.repo_server import RepoServer
from policies.etcdclient import EtcdClient, EtcdSettings
from policies.fleet import HostRecord, read_hosts
from updater import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
GROUP = "fleet"
GUEST_CPUS = 1  # two machines on two cores: one virtual CPU each
# The fleet's machines take the full download: what the fleet tests is the rollout
# under the lock; under TCG a delta install's scan of the slots (Python hashing 4 KiB
# pieces on an emulated CPU) takes longer than the download over the loopback link.
# The delta path inside the OS image: tests/test_os_update.py.
FULL_DOWNLOAD = "\n[install]\ndelta = false\n"
NODE_BOOT_LIMIT_S = 3600.0  # one boot may wait long for the lock; stop() ends it
POLL_INTERVAL_S = 30  # a fleet test publishes a second release while the machines run


def guest_endpoint(endpoint: str) -> str:
    """An etcd member's loopback URL as a guest reaches it (QEMU user networking)."""
    return re.sub(r"//127\.0\.0\.1:", f"//{osupdate.GUEST_HOST}:", endpoint)


def fleet_config(
    endpoints: Sequence[str], *, group: str = GROUP, fleetlock_url: str | None = None
) -> str:
    """The TOML a guest's credential adds: reboot under the etcd lock, one slot; with
    ``fleetlock_url`` (this machine's loopback) through that FleetLock server instead."""
    if fleetlock_url is not None:
        return (
            "\n[reboot]\n"
            'strategy = "lock"\n'
            'lock = "fleetlock"\n'
            f'group = "{group}"\n'
            "retry_s = 5\n"
            "\n[fleetlock]\n"
            f'url = "{guest_endpoint(fleetlock_url)}"\n'
        )
    quoted = ", ".join(f'"{guest_endpoint(e)}"' for e in endpoints)
    return (
        "\n[reboot]\n"
        'strategy = "lock"\n'
        'lock = "etcd"\n'
        f'group = "{group}"\n'
        "retry_s = 5\n"
        "\n[etcd]\n"
        f"endpoints = [{quoted}]\n"
        "slots = 1\n"
        "timeout_s = 5\n"
    )


def host_config(path: Path, endpoints: Sequence[str], *, group: str = GROUP) -> Path:
    """The admin's side: ``updatectl --config PATH fleet status`` against the same etcd."""
    quoted = ", ".join(f'"{e}"' for e in endpoints)
    path.write_text(
        f'[reboot]\nstrategy = "lock"\ngroup = "{group}"\n\n[etcd]\nendpoints = [{quoted}]\n'
    )
    return path


@contextlib.contextmanager
def fleetlock_server(
    endpoints: Sequence[str], workdir: Path, *, group: str = GROUP
) -> Iterator[str]:
    """``updatectl fleetlock serve`` over the fleet's etcd, as an admin runs it (a process
    of its own on this machine's loopback); its URL for the ``with`` block, then SIGTERM."""
    port = free_port()
    config = workdir / "fleetlockd.toml"
    config.write_text(f'[reboot]\ngroup = "{group}"\n')
    log = workdir / "fleetlockd.log"
    argv = [
        sys.executable, "-m", "updater.cli", "--config", str(config),
        "fleetlock", "serve", "--listen", f"127.0.0.1:{port}", "--group", f"{group}=1",
        *[f"--etcd={e}" for e in endpoints],
    ]  # fmt: skip
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("FleetLock serving on "):
            raise RuntimeError(f"fleetlock serve did not start: {line!r} {log.read_text()}")
        yield line.removeprefix("FleetLock serving on ").strip()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def fleet_status(config: Path, *, as_json: bool = False) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(
        ["--config", str(config), "fleet", "status", *(["--json"] if as_json else [])],
        out=out,
        err=err,
    )
    return code, out.getvalue() if code == 0 else out.getvalue() + err.getvalue()


# ---- one machine ------------------------------------------------------------------------------

_EVENT = re.compile(r"^EVENT (?P<unit>\S+) (?P<name>[a-z_]+)(?: (?P<rest>.*))?$")
_STATE = re.compile(r"(?:^| )state=(\S+)")


@dataclass
class Seen:
    """What a machine's console said, when (seconds since the fleet started)."""

    at: float
    node: str
    text: str


@dataclass
class Node:
    name: str
    machine: osupdate.Machine
    port: int  # this machine's loopback port forwarded to the guest's service
    lock: str = "etcd"  # how its agent takes the reboot slot: etcd, or fleetlock
    t0: float = field(default_factory=time.monotonic)
    version: str = "-"  # of the boot under way
    slot: str = "-"
    state: str = "OFF"  # the agent's, from its state_changed events
    blessed: bool = False  # updater-mark-good marked this boot's slot good
    timeline: list[Seen] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    on_line: Callable[[Seen], None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"vm-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Pull the plug (a test's end) and wait for QEMU to be gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    @property
    def host_id(self) -> str | None:
        """The id its agent takes the lock and publishes its record under (from its log)."""
        with self._lock:
            for seen in self.timeline:
                m = re.search(r"\bholder=([0-9a-f]+)", seen.text)
                if m is not None:
                    return m.group(1)
        return None

    def saw(self, text: str) -> bool:
        """Its console said ``text`` (a substring of a noted line) at some point."""
        with self._lock:
            return any(text in seen.text for seen in self.timeline)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def boots(self) -> list[osupdate.Boot]:
        return list(self.machine.boots)

    def _note(self, text: str) -> None:
        seen = Seen(time.monotonic() - self.t0, self.name, text)
        with self._lock:
            self.timeline.append(seen)
        if self.on_line is not None:
            self.on_line(seen)

    def _watch(self, line: str) -> bool:
        if line.startswith("BOOT version="):
            self.version = line.removeprefix("BOOT version=")
            self.blessed = False
            self._note(f"booted {self.slot} version {self.version}")
        elif line.startswith("BOOT slot="):
            self.slot = line.removeprefix("BOOT slot=")
        elif (m := _EVENT.match(line)) is not None:
            name, rest = m["name"], m["rest"] or ""
            if name == "state_changed":
                s = _STATE.search(rest)
                if s is not None:
                    self.state = s.group(1)
            elif name == "marked_good" and m["unit"] == "updater-mark-good":
                self.blessed = True
            if name not in osupdate.BOOKKEEPING:
                self._note(f"{m['unit']}: {name} {rest}".rstrip()[:160])
        return self._stop.is_set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.state = "BOOTING"
                boot = self.machine.boot(timeout_s=NODE_BOOT_LIMIT_S, watch=self._watch)
                self.state = "OFF"
                self._note(f"QEMU ended: {boot.ended} after {boot.log.seconds:.0f}s")
                if boot.ended != "reboot":
                    break
        except BaseException as exc:  # reported by the test
            self.error = exc
            self._note(f"crashed: {exc!r}")


# ---- the client -------------------------------------------------------------------------------


@dataclass
class Answer:
    at: float
    port: int
    body: str


class Client(threading.Thread):
    """A load balancer's view: each request goes to the next machine in turn and,
    when that one does not answer, to the one after; it fails only when none did."""

    def __init__(
        self, ports: Sequence[int], *, interval_s: float = 0.25, timeout_s: float = 2.0
    ) -> None:
        super().__init__(name="fleet-client", daemon=True)
        self.ports = list(ports)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.answered = 0
        self.failed = 0
        self.failovers = 0  # requests a second machine answered
        self.by_version: Counter[str] = Counter()
        self.failures: list[tuple[float, str]] = []
        self.stopping = threading.Event()

    def _ask(self, port: int) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout_s)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read(4096).decode("utf-8", "replace")
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            return body
        finally:
            conn.close()

    def run(self) -> None:
        turn = 0
        while not self.stopping.is_set():
            errors = []
            for k in range(len(self.ports)):
                port = self.ports[(turn + k) % len(self.ports)]
                try:
                    body = self._ask(port)
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(f"{port}: {exc!r}")
                    continue
                self.answered += 1
                self.failovers += k > 0
                m = re.search(r"version=(\S+)", body)
                self.by_version[m.group(1) if m else "?"] += 1
                break
            else:
                self.failed += 1
                self.failures.append((time.monotonic() - self.t0, "; ".join(errors)))
            turn += 1
            self.stopping.wait(self.interval_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def wait_answering(self, timeout_s: float) -> bool:
        """Every machine answers once (before the client's count starts to matter)."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.ports)
        while pending and time.monotonic() < deadline:
            for port in list(pending):
                try:
                    self._ask(port)
                    pending.discard(port)
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(1)
        return not pending

    def summary(self) -> str:
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(self.by_version.items()))
        return (
            f"client: {self.answered} requests answered ({versions}), {self.failed} failed, "
            f"{self.failovers} answered by the next machine"
        )


# ---- the fleet --------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Machines booted from one image, one repository, a 3-member etcd cluster."""

    workdir: Path
    cluster: EtcdCluster
    server: RepoServer
    repo: Path
    nodes: list[Node]
    admin_config: Path

    @classmethod
    def create(
        cls,
        workdir: Path,
        image: osimage.OsImage,
        cluster: EtcdCluster,
        server: RepoServer,
        repo: Path,
        *,
        count: int = 2,
        ports: Sequence[int],
        fleetlock_url: str | None = None,
    ) -> Fleet:
        """``fleetlock_url``: the last machine takes its slot through that FleetLock
        server (over the same etcd semaphore) instead of from etcd itself."""
        port = server.url.rsplit(":", 1)[1]
        url = f"http://{osupdate.GUEST_HOST}:{port}"
        nodes = []
        t0 = time.monotonic()
        for i in range(count):
            via_fleetlock = fleetlock_url is not None and i == count - 1
            extra = (
                fleet_config(
                    cluster.endpoints, fleetlock_url=fleetlock_url if via_fleetlock else None
                )
                + FULL_DOWNLOAD
            )
            machine = osupdate.Machine.create(workdir / f"vm{i + 1}", image, url)
            machine.cpus = GUEST_CPUS
            machine.report = False  # the machines keep running (and serving) once settled
            machine.extra_config = extra
            machine.poll_interval_s = POLL_INTERVAL_S
            machine.forwards = ((ports[i], osupdate.WEB_PORT),)
            lock = "fleetlock" if via_fleetlock else "etcd"
            nodes.append(Node(f"vm{i + 1}", machine, ports[i], lock=lock, t0=t0))
        admin = host_config(workdir / "admin.toml", cluster.endpoints)
        return cls(workdir, cluster, server, repo, nodes, admin)

    def client(self) -> EtcdClient:
        return EtcdClient(EtcdSettings(endpoints=self.cluster.endpoints, timeout_s=5))

    def records(self) -> dict[str, HostRecord]:
        client = self.client()
        try:
            return {r.id: r for r in read_hosts(client)}
        finally:
            client.close()

    def holders(self) -> tuple[str, ...]:
        client = self.client()
        try:
            history = semaphore_history(client, GROUP)
        finally:
            client.close()
        return history[-1].semaphore.holders if history else ()

    def lock_history(self) -> tuple[int, list[tuple[int, tuple[str, ...]]]]:
        """(most holders ever, the holders at each change) from etcd's own history."""
        client = self.client()
        try:
            history = semaphore_history(client, GROUP)
        finally:
            client.close()
        return most_holders(history), holders_over_time(history)

    def settled_on(self, version: str) -> bool:
        """Every machine booted ``version``, blessed it, and nobody holds a slot."""
        if not all(n.version == version and n.blessed for n in self.nodes):
            return False
        records = self.records()  # only the etcd-lock machines publish one
        if len(records) != len([n for n in self.nodes if n.lock == "etcd"]):
            return False
        if any(r.booted_version != version or r.lock_held for r in records.values()):
            return False
        return not self.holders()

    def stop(self) -> None:
        for n in self.nodes:
            n._stop.set()
        for n in self.nodes:
            n.stop()


def wait_for(
    what: Callable[[], bool],
    timeout_s: float,
    *,
    every_s: float = 3.0,
    tick: Callable[[], None] | None = None,
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if what():
            return True
        if tick is not None:
            tick()
        time.sleep(every_s)
    return what()


# ---- make demo-fleet --------------------------------------------------------------------------

DEMO_DIR = Path("build/fleet-demo")


def run_demo(workdir: Path, count: int, *, fleetlock: bool = True) -> int:
    t0 = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    with osupdate.cached_signing_key() as key:
        keyring = key.public_key.read_bytes()
        print("== The OS image 1.0.0 and its next release 1.1.0 (built once, then cached)")
        images = {
            v: osimage.build_image(osupdate.test_settings(v, keyring=keyring))
            for v in ("1.0.0", "1.1.0")
        }
        repo = workdir / "repo"
        repo.mkdir()
        with contextlib.ExitStack() as stack:
            cluster = stack.enter_context(EtcdCluster(3))
            server = stack.enter_context(RepoServer(repo))
            url = None
            if fleetlock:
                url = stack.enter_context(fleetlock_server(cluster.endpoints, workdir))
            ports = [free_port() for _ in range(count)]
            fleet = Fleet.create(
                workdir,
                images["1.0.0"],
                cluster,
                server,
                repo,
                count=count,
                ports=ports,
                fleetlock_url=url,
            )
            for n in fleet.nodes:
                n.on_line = lambda s: print(f"{s.at:6.0f}s {s.node}: {s.text}", flush=True)
            print(f"== {count} machines boot 1.0.0; etcd members: {', '.join(cluster.endpoints)}")
            for n in fleet.nodes:
                how = f"through the FleetLock server {url}" if n.lock == "fleetlock" else "in etcd"
                print(f"   {n.name}: service on 127.0.0.1:{n.port}, takes its reboot slot {how}")
            client = Client(ports)
            try:
                for n in fleet.nodes:
                    n.start()
                if not client.wait_answering(300):
                    print("the machines' services did not answer", file=sys.stderr)
                    return 1
                client.start()
                print("== Every machine answers; the vendor publishes 1.1.0")
                osupdate.publish(repo, images["1.1.0"], key)
                last = [0.0]

                def tick() -> None:
                    if time.monotonic() - last[0] > 30:
                        last[0] = time.monotonic()
                        print(f"-- updatectl fleet status  ({client.summary()})")
                        print(
                            "   "
                            + fleet_status(fleet.admin_config)[1].strip().replace("\n", "\n   "),
                            flush=True,
                        )

                ok = wait_for(lambda: fleet.settled_on("1.1.0"), 1500, tick=tick)
            finally:
                client.stop()
                fleet.stop()
            peak, changes = fleet.lock_history()
            print("== Summary")
            print(fleet_status(fleet.admin_config)[1].strip())
            print(
                "reboot slot holders, from etcd's history:",
                " -> ".join(",".join(h) or "-" for _, h in changes),
            )
            print(f"most holders at once: {peak} (slots: 1)")
            print(client.summary())
    ok = ok and peak <= 1 and client.failed == 0
    verdict = "The fleet updated itself" if ok else "The fleet did NOT update as expected"
    print(f"\n{verdict} in {time.monotonic() - t0:.0f}s; consoles in {workdir}/vm*/console-*.log")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.osfleet", description=__doc__)
    p.add_argument("--workdir", type=Path, default=DEMO_DIR)
    p.add_argument("--machines", type=int, default=2)
    p.add_argument(
        "--no-fleetlock",
        action="store_true",
        help="every machine takes its slot in etcd (default: the last one through "
        "`updatectl fleetlock serve`, on the same semaphore)",
    )
    args = p.parse_args(argv)
    return run_demo(args.workdir.resolve(), args.machines, fleetlock=not args.no_fleetlock)


if __name__ == "__main__":
    sys.exit(main())
