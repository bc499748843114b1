"""A stand-in for systemd's D-Bus API, for tests: a real service on a (private)
bus that owns ``org.freedesktop.systemd1`` and implements just enough of it to
ask a unit's state, as `systemctl is-active` does:

- ``/org/freedesktop/systemd1``, ``org.freedesktop.systemd1.Manager``:
  ``GetUnit(s) -> o`` (error ``org.freedesktop.systemd1.NoSuchUnit`` when the
  unit is not loaded) and ``LoadUnit(s) -> o`` (a unit it does not know is
  loaded as ``not-found`` / ``inactive``, as systemd does);
- per unit ``/org/freedesktop/systemd1/unit/<escaped name>``,
  ``org.freedesktop.systemd1.Unit``: read-only ``Id``, ``LoadState``,
  ``ActiveState``, ``SubState``, with PropertiesChanged when a test changes a state.

In-process: ``async with FakeSystemd(bus.address, {"a.service": "active"}) as fake``
(on the test's event loop) or ``with FakeSystemd(...).running() as fake`` (its
own loop in a thread). As a process::

    python -m devtools.fake_systemd --bus ADDRESS --unit a.service=active ...

prints ``ready`` once it owns the name, then reads ``unit=state`` lines on stdin
to change states, until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import re
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

from dbus_fast import DBusError, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property

from updater.dbuscompat import dbus_method, signature

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
ACTIVE_STATES = ("active", "reloading", "inactive", "failed", "activating", "deactivating")
_SUB_STATE = {"active": "running", "failed": "failed", "inactive": "dead"}
_UNIT_NAME = re.compile(
    r"^[A-Za-z0-9:_.\\@-]+\."
    r"(service|socket|target|device|mount|automount|swap|timer|path|slice|scope)$"
)


def unit_object_path(unit: str) -> str:
    """systemd's object path of a unit: the name with every character other than
    an ASCII letter (or a digit, except first) escaped as ``_xx`` hex."""
    out = []
    for i, ch in enumerate(unit):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return UNIT_PATH_PREFIX + ("".join(out) or "_")


class _Unit(ServiceInterface):
    def __init__(self, fake: FakeSystemd, name: str, loaded: bool) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self._fake = fake
        self._name = name
        self._loaded = loaded

    @dbus_property(access=PropertyAccess.READ)
    @signature("s")
    def Id(self) -> str:
        return self._name

    @dbus_property(access=PropertyAccess.READ)
    @signature("s")
    def LoadState(self) -> str:
        return "loaded" if self._loaded else "not-found"

    @dbus_property(access=PropertyAccess.READ)
    @signature("s")
    def ActiveState(self) -> str:
        return self._fake.states.get(self._name, "inactive")

    @dbus_property(access=PropertyAccess.READ)
    @signature("s")
    def SubState(self) -> str:
        return _SUB_STATE.get(self._fake.states.get(self._name, "inactive"), "")


class _Manager(ServiceInterface):
    def __init__(self, fake: FakeSystemd) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self._fake = fake

    @dbus_method()
    @signature("o", name="s")
    def GetUnit(self, name: str) -> str:
        self._fake.calls.append(("GetUnit", name))
        _check_name(name)
        if name not in self._fake.states:
            raise DBusError(f"{BUS_NAME}.NoSuchUnit", f"Unit {name} not loaded.")
        return self._fake.export_unit(name, loaded=True)

    @dbus_method()
    @signature("o", name="s")
    def LoadUnit(self, name: str) -> str:
        self._fake.calls.append(("LoadUnit", name))
        _check_name(name)
        return self._fake.export_unit(name, loaded=name in self._fake.states)


def _check_name(name: str) -> None:
    if not _UNIT_NAME.match(name):
        raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", f"Unit name {name} is not valid.")


class FakeSystemd:
    """The fake service. ``states`` maps unit names to ActiveState; ``calls``
    records every Manager call as ``(method, unit)``."""

    def __init__(self, bus_address: str, units: Mapping[str, str] | None = None) -> None:
        self.bus_address = bus_address
        self.states: dict[str, str] = dict(units or {})
        self.calls: list[tuple[str, str]] = []
        self._bus: MessageBus | None = None
        self._units: dict[str, _Unit] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> FakeSystemd:
        self._loop = asyncio.get_running_loop()
        bus = await MessageBus(bus_address=self.bus_address).connect()
        try:
            bus.export(MANAGER_PATH, _Manager(self))
            reply = await bus.request_name(BUS_NAME)
            if reply != RequestNameReply.PRIMARY_OWNER:
                raise RuntimeError(f"could not own {BUS_NAME}: {reply}")
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        return self

    async def stop(self) -> None:
        if self._bus is not None:
            bus, self._bus = self._bus, None
            bus.disconnect()
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        self._units.clear()

    def export_unit(self, name: str, loaded: bool) -> str:
        path = unit_object_path(name)
        if name not in self._units and self._bus is not None:
            self._units[name] = _Unit(self, name, loaded)
            self._bus.export(path, self._units[name])
        return path

    def set_state(self, unit: str, state: str) -> None:
        """Change a unit's ActiveState (from any thread)."""
        if state not in ACTIVE_STATES:
            raise ValueError(f"not an ActiveState: {state!r}")
        self.states[unit] = state
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._announce(unit)
        else:
            loop.call_soon_threadsafe(self._announce, unit)

    def _announce(self, unit: str) -> None:
        iface = self._units.get(unit)
        if iface is not None and self._bus is not None:
            iface.emit_properties_changed({"ActiveState": self.states[unit]})

    async def __aenter__(self) -> FakeSystemd:
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeSystemd]:
        """Serve from a thread with its own event loop (for synchronous tests)."""
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            asyncio.set_event_loop(loop)

            async def begin() -> None:
                try:
                    await self.start()
                except BaseException as exc:
                    started.set_exception(exc)
                    raise
                started.set_result(None)

            with contextlib.suppress(BaseException):
                loop.run_until_complete(begin())
            if started.exception() is None:
                loop.run_forever()
                loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=serve, name="fake-systemd", daemon=True)
        thread.start()
        try:
            started.result(timeout=10)
            yield self
        finally:
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)


def _parse_units(items: Sequence[str]) -> dict[str, str]:
    units = {}
    for item in items:
        name, sep, state = item.partition("=")
        if not sep or state not in ACTIVE_STATES:
            raise argparse.ArgumentTypeError(f"expected UNIT=STATE, got {item!r}")
        units[name] = state
    return units


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeSystemd(args.bus, _parse_units(args.unit)) as fake:
        print("ready", flush=True)

        def read_stdin() -> None:
            for line in sys.stdin:
                with contextlib.suppress(argparse.ArgumentTypeError, ValueError):
                    for unit, state in _parse_units([line.strip()]).items():
                        fake.set_state(unit, state)

        threading.Thread(target=read_stdin, name="fake-systemd-stdin", daemon=True).start()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.fake_systemd", description=__doc__)
    p.add_argument("--bus", required=True, help="bus address, e.g. unix:path=/tmp/x/socket")
    p.add_argument("--unit", action="append", default=[], metavar="UNIT=STATE")
    args = p.parse_args(argv)
    try:
        _parse_units(args.unit)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
