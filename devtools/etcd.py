"""Real etcd servers for tests and benchmarks (not part of the agent).

``with EtcdNode() as etcd: etcd.endpoints`` starts one ``etcd`` on free
loopback ports with its data in a temp dir; ``EtcdCluster(size=3)`` starts a
3-member cluster. Both wait until every member is healthy and, whatever
happens, stop every process (SIGTERM, then SIGKILL) and remove the temp dir.
Fault tests kill (SIGKILL) and restart single members: same data dir, same
ports.

Options: client TLS (a throwaway CA, a server certificate for 127.0.0.1 and a
client certificate, made with ``openssl``; ``client_cert_auth`` makes etcd
require the client certificate) and user/password auth (``root`` plus a
least-privilege ``updater`` user that may only read and write the airlock
prefix).

Members can also run in network namespaces of their own, at given addresses
(``EtcdCluster(3, hosts=lab.addresses, netns=lab.netns)`` with a
:class:`devtools.netns.NetLab`): each is then started through ``ip netns
exec`` on the standard ports 2379/2380 of its address. ``leader_index()``
asks the members' status API which of them leads; ``freeze``/``thaw`` stop
and continue one (SIGSTOP, SIGCONT: a hung member that holds its sockets).

Loopback ports are found by binding port 0 and releasing it; another process may take
one in between (two test runs on one machine), so a start that fails with
"address already in use" is retried with new ports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import requests

from devtools.tls import TLSFiles, make_tls
from updater.run import run

ETCD = "etcd"
ETCDCTL = "etcdctl"
IP = "ip"
HOST = "127.0.0.1"
CLIENT_PORT = 2379  # a member in a namespace of its own has the standard ports
PEER_PORT = 2380
ROOT_PASSWORD = "root-secret"  # a throwaway test server
USER = "updater"
USER_PASSWORD = "updater-secret"
USER_PREFIX = "com.coreos.airlock/"  # what the least-privilege user may touch
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 5


class EtcdStartError(RuntimeError):
    """etcd did not come up; the message carries the end of its log."""


def free_port() -> int:
    """A loopback port nobody listens on right now (it may be taken before we use it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdMember:
    """One etcd process of a cluster: its name, ports and data dir outlive the process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    scheme: str
    proc: subprocess.Popen[bytes] | None = None
    host: str = HOST
    netns: str | None = None  # run in this network namespace (ip netns exec)

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """``size`` etcd members on loopback, started on ``__enter__``, gone after ``__exit__``."""

    def __init__(
        self,
        size: int = 3,
        *,
        tls: bool = False,
        client_cert_auth: bool = False,
        auth: bool = False,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        base_dir: Path | None = None,
        hosts: Sequence[str] | None = None,
        netns: Sequence[str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one member")
        if (hosts is None) != (netns is None) or (hosts is not None and len(hosts) != size):
            raise ValueError("hosts and netns go together, one of each per member")
        if (tls or client_cert_auth) and hosts is not None:
            raise ValueError("TLS certificates are made for 127.0.0.1 only")
        self.hosts = tuple(hosts) if hosts is not None else None
        self.netns = tuple(netns) if netns is not None else None
        self.size = size
        self.tls_enabled = tls or client_cert_auth
        self.client_cert_auth = client_cert_auth
        self.auth = auth
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.dir = Path(tempfile.mkdtemp(prefix="updater-etcd-", dir=base_dir))
        self.tls: TLSFiles | None = None
        self.members: list[EtcdMember] = []
        self._lock = threading.Lock()  # a chaos thread restarts members while tests read them
        self._closed = False
        atexit.register(self.close)

    # ---- what clients need -----------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members)

    @property
    def endpoint(self) -> str:
        return self.members[0].client_url

    def _requests_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {}
        if self.tls is not None:
            kwargs["verify"] = str(self.tls.ca_cert)
            kwargs["cert"] = (str(self.tls.client_cert), str(self.tls.client_key))
        return kwargs

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> EtcdCluster:
        try:
            if self.tls_enabled:
                self.tls = make_tls(self.dir / "tls")
            for attempt in range(1, START_ATTEMPTS + 1):
                self._plan_members()
                for m in self.members:
                    self._spawn(m)
                try:
                    self.wait_all_healthy()
                    break
                except EtcdStartError:
                    in_use = any("address already in use" in m.log_tail(200) for m in self.members)
                    self._stop_all()
                    if not in_use or attempt == START_ATTEMPTS:
                        raise
            if self.auth:
                self._enable_auth()
        except BaseException:
            self.close()
            raise
        return self

    def _plan_members(self) -> None:
        for m in self.members:  # a failed attempt's, so its log does not mislead the next
            shutil.rmtree(m.data_dir, ignore_errors=True)
            m.log_file.unlink(missing_ok=True)
        scheme = "https" if self.tls_enabled else "http"
        if self.hosts is not None and self.netns is not None:
            self.members = [
                EtcdMember(
                    name=f"m{i}",
                    client_port=CLIENT_PORT,
                    peer_port=PEER_PORT,
                    data_dir=self.dir / f"m{i}.etcd",
                    log_file=self.dir / f"m{i}.log",
                    scheme=scheme,
                    host=host,
                    netns=ns,
                )
                for i, (host, ns) in enumerate(zip(self.hosts, self.netns, strict=True))
            ]
            return
        ports: set[int] = set()
        while len(ports) < 2 * self.size:
            ports.add(free_port())
        it = iter(sorted(ports))
        self.members = [
            EtcdMember(
                name=f"m{i}",
                client_port=next(it),
                peer_port=next(it),
                data_dir=self.dir / f"m{i}.etcd",
                log_file=self.dir / f"m{i}.log",
                scheme=scheme,
            )
            for i in range(self.size)
        ]

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        wrap = [IP, "netns", "exec", m.netns] if m.netns is not None else []
        argv = [
            *wrap,
            ETCD,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=updater-test-{os.getpid()}-{id(self)}",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            # History must survive the run: the safety test reads every revision.
            "--auto-compaction-retention=0",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls is not None:
            argv += [f"--cert-file={self.tls.server_cert}", f"--key-file={self.tls.server_key}"]
            if self.client_cert_auth:
                argv += ["--client-cert-auth", f"--trusted-ca-file={self.tls.ca_cert}"]
        return argv

    def _spawn(self, m: EtcdMember) -> None:
        with open(m.log_file, "ab") as log:
            m.proc = subprocess.Popen(
                self._argv(m),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Same process group as the test run: whatever kills the whole
                # run (Ctrl-C, a CI timeout) reaches etcd too.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            )

    def healthy(self, m: EtcdMember, timeout_s: float = 1.0) -> bool:
        """The member answers /health with a leader and a linearizable read succeeds."""
        if not m.running:
            return False
        kw = self._requests_kwargs()
        try:
            r = requests.get(f"{m.client_url}/health", timeout=timeout_s, **kw)  # type: ignore[arg-type]
            if r.status_code != 200 or r.json().get("health") not in ("true", True):
                return False
            # /health can be true on a member that still cannot serve a quorum read.
            r = requests.post(
                f"{m.client_url}/v3/kv/range",
                json={"key": "aGVhbHRo", "count_only": True},
                timeout=timeout_s,
                **kw,  # type: ignore[arg-type]
            )
        except (requests.RequestException, ValueError):
            return False
        # With auth on, an unauthenticated read is refused (401) by a working member.
        return r.status_code in (200, 401) or (r.status_code == 400 and "user name" in r.text)

    def wait_healthy(self, m: EtcdMember, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy(m):
            if not m.running:
                raise EtcdStartError(f"etcd {m.name} exited:\n{m.log_tail()}")
            if time.monotonic() > deadline:
                raise EtcdStartError(f"etcd {m.name} not healthy in {timeout_s}s:\n{m.log_tail()}")
            time.sleep(0.05)

    def wait_all_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Every member healthy; fails at once if one exits (a taken port, say)."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.members)
        while waiting:
            for m in waiting:
                if not m.running:
                    raise EtcdStartError(f"etcd {m.name} exited:\n{m.log_tail()}")
            waiting = [m for m in waiting if not self.healthy(m)]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(m.name for m in waiting)
                raise EtcdStartError(
                    f"etcd {names} not healthy in {timeout_s}s:\n{waiting[0].log_tail()}"
                )
            if waiting:
                time.sleep(0.05)

    # ---- faults --------------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL member ``index`` (its data dir and ports stay for a restart)."""
        with self._lock:
            m = self.members[index]
            if m.proc is not None:
                _kill(m.proc, signal.SIGKILL)
                m.proc.wait()

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start member ``index`` again on its old data dir and ports."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the cluster is closed")
            m = self.members[index]
            if m.running:
                raise RuntimeError(f"etcd {m.name} is running")
            self._spawn(m)
        if wait:
            self.wait_healthy(m)

    def freeze(self, index: int) -> None:
        """SIGSTOP member ``index``: it keeps its sockets and answers nothing."""
        with self._lock:
            m = self.members[index]
            if m.proc is not None:
                _kill(m.proc, signal.SIGSTOP)

    def thaw(self, index: int) -> None:
        """SIGCONT member ``index`` after :meth:`freeze`."""
        with self._lock:
            m = self.members[index]
            if m.proc is not None:
                _kill(m.proc, signal.SIGCONT)

    def leader_index(self, timeout_s: float = 1.0) -> int | None:
        """The member that leads, by the status API of the first that answers; None if none."""
        kw = self._requests_kwargs()
        ids: dict[int, int] = {}
        leader: int | None = None
        for i, m in enumerate(self.members):
            if not m.running:
                continue
            try:
                r = requests.post(
                    f"{m.client_url}/v3/maintenance/status",
                    json={},
                    timeout=timeout_s,
                    **kw,  # type: ignore[arg-type]
                )
                doc = r.json()
                ids[int(doc["header"]["member_id"])] = i
                if leader is None and int(doc.get("leader") or 0):
                    leader = int(doc["leader"])
            except (requests.RequestException, ValueError, KeyError, TypeError):
                continue
        return None if leader is None else ids.get(leader)

    def stop_member(self, index: int) -> None:
        """SIGTERM member ``index`` (SIGKILL if it does not exit in time)."""
        with self._lock:
            _stop(self.members[index].proc)

    # ---- admin ---------------------------------------------------------------------------------

    def etcdctl(
        self, *args: str, user: str | None = None, endpoints: Sequence[str] | None = None
    ) -> str:
        """Run etcdctl (v3 API) against the cluster; ``user`` is ``name:password``."""
        argv = [ETCDCTL, f"--endpoints={','.join(endpoints or self.endpoints)}"]
        if self.tls is not None:
            argv += [
                f"--cacert={self.tls.ca_cert}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if user is None and self.auth:
            user = f"root:{ROOT_PASSWORD}"
        if user:
            argv.append(f"--user={user}")
        return run([*argv, *args], env={"ETCDCTL_API": "3"}, timeout=30).text

    def _enable_auth(self) -> None:
        for args in (
            ("role", "add", "root"),
            ("user", "add", f"root:{ROOT_PASSWORD}"),
            ("user", "grant-role", "root", "root"),
            ("role", "add", USER),
            ("role", "grant-permission", USER, "--prefix=true", "readwrite", USER_PREFIX),
            ("user", "add", f"{USER}:{USER_PASSWORD}"),
            ("user", "grant-role", USER, USER),
            ("auth", "enable"),
        ):
            self.etcdctl(*args, user="")  # auth is not on yet: no user

    # ---- teardown ------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        for m in self.members:  # a frozen member would never see the SIGTERM
            if m.proc is not None:
                _kill(m.proc, signal.SIGCONT)
        # One at a time: members stopped together wait for each other to hand
        # over leadership (seconds); one by one each stops in milliseconds.
        for m in self.members:
            _stop(m.proc)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._stop_all()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)
                atexit.unregister(self.close)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EtcdNode(EtcdCluster):
    """A single etcd member."""

    def __init__(
        self,
        *,
        tls: bool = False,
        client_cert_auth: bool = False,
        auth: bool = False,
        base_dir: Path | None = None,
    ) -> None:
        super().__init__(
            1, tls=tls, client_cert_auth=client_cert_auth, auth=auth, base_dir=base_dir
        )

    def __enter__(self) -> EtcdNode:
        self.start()
        return self


def _kill(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:  # not reaped yet, so the pid is still ours
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    _kill(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc, signal.SIGKILL)
        proc.wait()
