"""A fake systemd-logind for tests: it cannot reboot, it records.

A real D-Bus service on a (private) bus: ``org.freedesktop.login1`` at
``/org/freedesktop/login1``, interface ``org.freedesktop.login1.Manager``
with ``Reboot(b)``, ``RebootWithFlags(t)`` and ``ListInhibitors() ->
a(ssssuu)``, refusing a reboot as logind does while a ``shutdown`` block
inhibitor is held. Which logind it plays (the caller is assumed to be root,
the only one the test bus lets talk to it):

- ``current`` (systemd >= 257): a ``block`` inhibitor refuses everyone with
  ``org.freedesktop.login1.BlockedByInhibitorLock``; a ``block-weak`` one
  refuses root only when it passes ``SD_LOGIND_ROOT_CHECK_INHIBITORS``;
- ``root_bypass`` (older, with the flags methods): root passes every
  inhibitor unless it passes ``SD_LOGIND_ROOT_CHECK_INHIBITORS``, then gets
  ``org.freedesktop.DBus.Error.AccessDenied``;
- ``no_flags`` (older still): no ``RebootWithFlags`` (UnknownMethod), and
  ``Reboot`` lets root pass every inhibitor.

Sessions (who is logged in): ``ListSessions() -> a(susso)`` names one object
per session, ``/org/freedesktop/login1/session/<id, path-escaped>``, with the
properties of ``org.freedesktop.login1.Session`` (Id, Name, User, Seat, TTY,
Remote, RemoteHost, Class, Type, State) read through
``org.freedesktop.DBus.Properties``, as logind's are.

Tests add and remove inhibitors and sessions in-process
(:meth:`FakeLogind.add_inhibitor`, :meth:`FakeLogind.add_session`) or over the
bus through the test-only interface ``org.updater.test.FakeLogind1``
(``AddInhibitor(ssss) -> u``, ``RemoveInhibitor(u)``, ``AddSession(susssbss) -> s``,
``RemoveSession(s)``) on the same object.
Every call is recorded (method, args, time, outcome), in memory and, with
``--record FILE``, as JSON lines.

    python -m devtools.fake_logind --bus ADDRESS --record FILE [--logind current]
        [--inhibit shutdown]...

prints ``READY`` once it owns the name and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from dbus_fast import (
    BusType,
    DBusError,
    Message,
    MessageType,
    NameFlag,
    PropertyAccess,
    RequestNameReply,
)
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property

from updater.dbuscompat import dbus_method, signature

# Written from systemd's documentation (org.freedesktop.login1(5)) and
# src/login/logind-dbus.c, not from updater.rebooter, so that a wrong name
# there fails the tests.
BUS_NAME: Final = "org.freedesktop.login1"
OBJECT_PATH: Final = "/org/freedesktop/login1"
MANAGER_INTERFACE: Final = "org.freedesktop.login1.Manager"
CONTROL_INTERFACE: Final = "org.updater.test.FakeLogind1"
SESSION_INTERFACE: Final = "org.freedesktop.login1.Session"
SESSION_PATH_PREFIX: Final = "/org/freedesktop/login1/session/"

BLOCKED_BY_INHIBITOR_LOCK: Final = "org.freedesktop.login1.BlockedByInhibitorLock"
ACCESS_DENIED: Final = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS: Final = "org.freedesktop.DBus.Error.InvalidArgs"

SD_LOGIND_ROOT_CHECK_INHIBITORS: Final = 1 << 0
SD_LOGIND_SKIP_INHIBITORS: Final = 1 << 4
_PUBLIC_FLAGS: Final = 0x1F  # root-check, kexec, soft-reboot, soft-reboot-if-nextroot, skip

Flavour = Literal["current", "root_bypass", "no_flags"]
FLAVOURS: Final[tuple[Flavour, ...]] = ("current", "root_bypass", "no_flags")


@dataclass(frozen=True)
class Call:
    method: str
    args: list[Any]
    time: float  # unix seconds
    outcome: str  # "rebooted", "refused", "listed"
    error: str | None = None  # the D-Bus error name of a refusal

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Inhibitor:
    what: str  # colon-separated, e.g. "shutdown:sleep"
    who: str
    why: str
    mode: str  # "block", "block-weak", "delay"
    uid: int = 0
    pid: int = field(default_factory=os.getpid)

    def blocks_shutdown(self) -> bool:
        return self.mode in ("block", "block-weak") and "shutdown" in self.what.split(":")


@dataclass(frozen=True)
class FakeSession:
    """One logged-in session (logind's properties of it)."""

    id: str
    user: str
    uid: int
    seat: str = ""
    tty: str = ""
    session_class: str = "user"  # user, background, manager, greeter...
    remote: bool = False
    remote_host: str = ""
    state: str = "active"  # online, active, closing

    @property
    def type(self) -> str:
        return "tty" if self.tty else "unspecified"

    @property
    def path(self) -> str:
        return SESSION_PATH_PREFIX + bus_path_encode(self.id)


def bus_path_encode(label: str) -> str:
    """sd_bus_path_encode: an object path label; anything but [A-Za-z0-9] (and a digit
    first) becomes ``_XX``, as logind names ``/org/freedesktop/login1/session/_31``."""
    out = []
    for i, ch in enumerate(label):
        plain = ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0))
        out.append(ch if plain else "".join(f"_{b:02x}" for b in ch.encode()))
    return "".join(out) or "_"


class FakeLogind:
    """The fake's state; :meth:`start` puts it on a bus."""

    def __init__(
        self,
        *,
        flavour: Flavour = "current",
        record: Path | None = None,
        fail_with: tuple[str, str] | None = None,
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown logind flavour {flavour!r}")
        self.flavour = flavour
        self.record = record
        self.fail_with = fail_with  # (error name, text) every reboot answers, when set
        self.calls: list[Call] = []
        self.inhibitors: dict[int, Inhibitor] = {}
        self.sessions: dict[str, FakeSession] = {}
        self._session_objects: dict[str, ServiceInterface] = {}
        self._next_id = 1
        self._next_session = 1
        self._bus: MessageBus | None = None
        self._interfaces: list[ServiceInterface] = []

    # -- what tests use --------------------------------------------------------------------

    def add_inhibitor(
        self, what: str = "shutdown", who: str = "test", why: str = "testing", mode: str = "block"
    ) -> int:
        handle = self._next_id
        self._next_id += 1
        self.inhibitors[handle] = Inhibitor(what, who, why, mode)
        return handle

    def remove_inhibitor(self, handle: int) -> None:
        self.inhibitors.pop(handle, None)

    def add_session(
        self,
        user: str = "alice",
        uid: int = 1000,
        *,
        seat: str = "",
        tty: str = "pts/0",
        session_class: str = "user",
        remote: bool = False,
        remote_host: str = "",
        state: str = "active",
    ) -> str:
        """Log ``user`` in; returns the session id (logind's are "1", "2", ..., "c1")."""
        sid = str(self._next_session)
        self._next_session += 1
        session = FakeSession(sid, user, uid, seat, tty, session_class, remote, remote_host, state)
        self.sessions[sid] = session
        if self._bus is not None:
            self._export_session(self._bus, session)
        return sid

    def remove_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        interface = self._session_objects.pop(sid, None)
        if session is not None and interface is not None and self._bus is not None:
            self._bus.unexport(session.path, interface)

    def _export_session(self, bus: MessageBus, session: FakeSession) -> None:
        interface = _Session(session)
        bus.export(session.path, interface)
        self._session_objects[session.id] = interface

    @property
    def reboots(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "rebooted"]

    async def start(self, bus: MessageBus) -> FakeLogind:
        manager = _LegacyManager(self) if self.flavour == "no_flags" else _Manager(self)
        self._interfaces = [manager, _Control(self)]
        for interface in self._interfaces:
            bus.export(OBJECT_PATH, interface)
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            raise RuntimeError(f"fake logind could not own {BUS_NAME}: {reply}")
        self._bus = bus
        for session in self.sessions.values():
            self._export_session(bus, session)
        return self

    async def stop(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        for interface in self._interfaces:
            bus.unexport(OBJECT_PATH, interface)
        for sid, interface in self._session_objects.items():
            bus.unexport(self.sessions[sid].path, interface)
        self._session_objects.clear()
        with contextlib.suppress(Exception):
            await bus.release_name(BUS_NAME)

    # -- logind's behaviour ----------------------------------------------------------------

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        if self.record is not None:
            with self.record.open("a") as f:
                f.write(call.to_json() + "\n")

    def reboot(self, method: str, args: list[Any], flags: int, root_check: bool) -> None:
        """Decide one reboot request the way logind does (caller: root)."""
        error: tuple[str, str] | None = self.fail_with
        blocking = [i for i in self.inhibitors.values() if i.blocks_shutdown()]
        if error is None and blocking and not flags & SD_LOGIND_SKIP_INHIBITORS:
            strong = any(i.mode == "block" for i in blocking)
            if self.flavour == "current" and (strong or root_check):
                error = (
                    BLOCKED_BY_INHIBITOR_LOCK,
                    "Operation denied due to active block inhibitor",
                )
            elif self.flavour == "root_bypass" and root_check:
                error = (ACCESS_DENIED, "Access denied to root due to active block inhibitor")
        if error is not None:
            self._record(Call(method, args, time.time(), "refused", error[0]))
            raise DBusError(*error)
        self._record(Call(method, args, time.time(), "rebooted"))

    def list_inhibitors(self) -> list[list[Any]]:
        self._record(Call("ListInhibitors", [], time.time(), "listed"))
        return [[i.what, i.who, i.why, i.mode, i.uid, i.pid] for i in self.inhibitors.values()]

    def list_sessions(self) -> list[list[Any]]:
        self._record(Call("ListSessions", [], time.time(), "listed"))
        return [[s.id, s.uid, s.user, s.seat, s.path] for s in self.sessions.values()]


class _LegacyManager(ServiceInterface):
    """org.freedesktop.login1.Manager without the *WithFlags methods."""

    def __init__(self, state: FakeLogind) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._state = state

    @dbus_method(name="Reboot")
    @signature("", interactive="b")
    def reboot(self, interactive: bool) -> None:
        self._state.reboot("Reboot", [interactive], 0, root_check=False)

    @dbus_method(name="ListInhibitors")
    @signature("a(ssssuu)")
    def list_inhibitors(self) -> list[list[Any]]:
        return self._state.list_inhibitors()

    @dbus_method(name="ListSessions")
    @signature("a(susso)")
    def list_sessions(self) -> list[list[Any]]:
        return self._state.list_sessions()


class _Session(ServiceInterface):
    """org.freedesktop.login1.Session: the read-only properties a session has."""

    def __init__(self, session: FakeSession) -> None:
        super().__init__(SESSION_INTERFACE)
        self._s = session

    @dbus_property(access=PropertyAccess.READ, name="Id")
    @signature("s")
    def id_(self) -> str:
        return self._s.id

    @dbus_property(access=PropertyAccess.READ, name="Name")
    @signature("s")
    def name(self) -> str:
        return self._s.user

    @dbus_property(access=PropertyAccess.READ, name="User")
    @signature("(uo)")
    def user(self) -> list[Any]:
        return [self._s.uid, f"/org/freedesktop/login1/user/_{self._s.uid}"]

    @dbus_property(access=PropertyAccess.READ, name="Seat")
    @signature("(so)")
    def seat(self) -> list[Any]:
        seat = self._s.seat
        return [seat, f"/org/freedesktop/login1/seat/{bus_path_encode(seat)}" if seat else "/"]

    @dbus_property(access=PropertyAccess.READ, name="TTY")
    @signature("s")
    def tty(self) -> str:
        return self._s.tty

    @dbus_property(access=PropertyAccess.READ, name="Remote")
    @signature("b")
    def remote(self) -> bool:
        return self._s.remote

    @dbus_property(access=PropertyAccess.READ, name="RemoteHost")
    @signature("s")
    def remote_host(self) -> str:
        return self._s.remote_host

    @dbus_property(access=PropertyAccess.READ, name="Class")
    @signature("s")
    def session_class(self) -> str:
        return self._s.session_class

    @dbus_property(access=PropertyAccess.READ, name="Type")
    @signature("s")
    def type_(self) -> str:
        return self._s.type

    @dbus_property(access=PropertyAccess.READ, name="State")
    @signature("s")
    def state(self) -> str:
        return self._s.state


class _Manager(_LegacyManager):
    @dbus_method(name="RebootWithFlags")
    @signature("", flags="t")
    def reboot_with_flags(self, flags: int) -> None:
        if flags & ~_PUBLIC_FLAGS:
            raise DBusError(INVALID_ARGS, "Invalid flags parameter")
        self._state.reboot(
            "RebootWithFlags",
            [flags],
            flags,
            root_check=bool(flags & SD_LOGIND_ROOT_CHECK_INHIBITORS),
        )


class _Control(ServiceInterface):
    """Test-only: inhibitors for a fake running in another process."""

    def __init__(self, state: FakeLogind) -> None:
        super().__init__(CONTROL_INTERFACE)
        self._state = state

    @dbus_method(name="AddInhibitor")
    @signature("u", what="s", who="s", why="s", mode="s")
    def add_inhibitor(self, what: str, who: str, why: str, mode: str) -> int:
        return self._state.add_inhibitor(what, who, why, mode)

    @dbus_method(name="RemoveInhibitor")
    @signature("", handle="u")
    def remove_inhibitor(self, handle: int) -> None:
        self._state.remove_inhibitor(handle)

    @dbus_method(name="AddSession")
    @signature(
        "s",
        user="s",
        uid="u",
        seat="s",
        tty="s",
        session_class="s",
        remote="b",
        remote_host="s",
        state="s",
    )
    def add_session(  # noqa: PLR0917 - a D-Bus method takes its arguments in order
        self,
        user: str,
        uid: int,
        seat: str,
        tty: str,
        session_class: str,
        remote: bool,
        remote_host: str,
        state: str,
    ) -> str:
        return self._state.add_session(
            user,
            uid,
            seat=seat,
            tty=tty,
            session_class=session_class,
            remote=remote,
            remote_host=remote_host,
            state=state,
        )

    @dbus_method(name="RemoveSession")
    @signature("", sid="s")
    def remove_session(self, sid: str) -> None:
        self._state.remove_session(sid)


# ---- driving a fake in another process ------------------------------------------------------


async def _control_call(bus_address: str, member: str, signature: str, body: list[Any]) -> Any:
    bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
    try:
        reply = await bus.call(
            Message(
                destination=BUS_NAME,
                path=OBJECT_PATH,
                interface=CONTROL_INTERFACE,
                member=member,
                signature=signature,
                body=body,
            )
        )
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        raise RuntimeError(f"fake logind {member}: {reply.error_name}: {reply.body}")
    return reply.body[0] if reply.body else None


async def add_inhibitor(
    bus_address: str,
    what: str = "shutdown",
    who: str = "test",
    why: str = "testing",
    mode: str = "block",
) -> int:
    """Add an inhibitor to the fake logind on ``bus_address``; returns its handle."""
    return int(await _control_call(bus_address, "AddInhibitor", "ssss", [what, who, why, mode]))


async def remove_inhibitor(bus_address: str, handle: int) -> None:
    await _control_call(bus_address, "RemoveInhibitor", "u", [handle])


async def add_session(
    bus_address: str,
    user: str = "alice",
    uid: int = 1000,
    *,
    seat: str = "",
    tty: str = "pts/0",
    session_class: str = "user",
    remote: bool = False,
    remote_host: str = "",
    state: str = "active",
) -> str:
    """Log ``user`` in on the fake logind on ``bus_address``; returns the session id."""
    body = [user, uid, seat, tty, session_class, remote, remote_host, state]
    return str(await _control_call(bus_address, "AddSession", "susssbss", body))


async def remove_session(bus_address: str, sid: str) -> None:
    await _control_call(bus_address, "RemoveSession", "s", [sid])


def read_record(path: Path) -> list[dict[str, Any]]:
    """The calls a fake recorded in ``path`` (JSON lines), oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FakeLogindProcess:
    """``with FakeLogindProcess(bus.address, record) as fake: ... fake.calls()``"""

    def __init__(
        self,
        bus_address: str,
        record: Path,
        *,
        flavour: Flavour = "current",
        inhibit: Sequence[str] = (),
    ) -> None:
        self.bus_address = bus_address
        self.record = record
        self.argv = [
            sys.executable,
            "-m",
            "devtools.fake_logind",
            "--bus",
            bus_address,
            "--record",
            str(record),
            "--logind",
            flavour,
            *[arg for what in inhibit for arg in ("--inhibit", what)],
        ]
        self.stderr_path = record.with_name(record.name + ".stderr")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> FakeLogindProcess:
        root = Path(__file__).resolve().parent.parent
        pythonpath = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
        # stderr to a file: a pipe nobody drains could stall the fake
        with self.stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout_s
        seen = b""
        while b"READY\n" not in seen:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake logind did not start: {self.stderr_path.read_text()}")
            seen += self._proc.stdout.read() or b""
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def calls(self) -> list[dict[str, Any]]:
        return read_record(self.record)

    def reboots(self) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["outcome"] == "rebooted"]

    def __enter__(self) -> FakeLogindProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ---- as a program ---------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeLogind(flavour=args.logind, record=args.record)
    for what in args.inhibit:
        fake.add_inhibitor(what=what, who="fake_logind --inhibit", why="asked on the command line")
    bus = await MessageBus(bus_address=args.bus, bus_type=BusType.SYSTEM).connect()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await fake.start(bus)
        print("READY", flush=True)
        # the bus going away ends the fake too, so it never outlives its test
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (disconnected, stopping):
            task.cancel()
    finally:
        bus.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fake_logind",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bus", required=True, help="D-Bus address to serve on")
    parser.add_argument("--record", type=Path, help="append every call here as a JSON line")
    parser.add_argument("--logind", choices=FLAVOURS, default="current", help="which logind")
    parser.add_argument(
        "--inhibit",
        action="append",
        default=[],
        metavar="WHAT",
        help="start with a block inhibitor",
    )
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
