"""Who is logged in: logind's sessions, and which of them a reboot waits for.

Like Zincati, the agent does not reboot under an interactive user: a person
at a seat (a console or a graphical login) or on a terminal (a serial
console, an SSH login with a pty). Sessions of services, cron jobs and user
managers (logind classes ``background``, ``manager``...) and sessions that
are closing (the user logged out, a process lingers) do not count.

logind's ``ListSessions() -> a(susso)`` names each session's object; its
properties (``org.freedesktop.login1.Session``: Class, State, TTY, Seat,
Remote, RemoteHost) decide. :func:`is_interactive` is the decision (pure);
:class:`LogindSessions` asks logind.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from updater.dbuscompat import BUS_FAILURES
from updater.errors import RefusedError

LOGIND_BUS_NAME: Final = "org.freedesktop.login1"
LOGIND_OBJECT_PATH: Final = "/org/freedesktop/login1"
MANAGER_INTERFACE: Final = "org.freedesktop.login1.Manager"
SESSION_INTERFACE: Final = "org.freedesktop.login1.Session"
PROPERTIES_INTERFACE: Final = "org.freedesktop.DBus.Properties"
# a session that ended between ListSessions and the question about it
GONE: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.UnknownObject",
        "org.freedesktop.DBus.Error.UnknownMethod",
        "org.freedesktop.DBus.Error.UnknownInterface",
        "org.freedesktop.login1.NoSuchSession",
    }
)
DEFAULT_TIMEOUT_S: Final = 25.0


@dataclass(frozen=True)
class Session:
    """One logind session, as much of it as the decision and the log need."""

    id: str
    user: str
    uid: int
    seat: str = ""  # "seat0" for a console or graphical login
    tty: str = ""  # "tty1", "ttyS0", "pts/0"
    remote: bool = False
    remote_host: str = ""
    session_class: str = "user"  # user, user-early, greeter, background, manager...
    state: str = "active"  # online, active, closing

    def describe(self) -> str:
        """``alice on pts/0 from 10.0.0.5``, for people."""
        where = self.tty or self.seat or "no terminal"
        origin = f" from {self.remote_host}" if self.remote and self.remote_host else ""
        return f"{self.user} on {where}{origin}"


def is_interactive(s: Session) -> bool:
    """Does a reboot wait for this session? A user's (not a service's) open session at
    a seat or on a terminal."""
    if not s.session_class.startswith("user") or s.state == "closing":
        return False
    return bool(s.seat or s.tty)


def parse_session_list(body: Any) -> list[tuple[str, str]]:
    """``ListSessions()``'s reply body, validated: (session id, object path) pairs."""
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], list):
        raise ValueError("ListSessions reply is not a(susso)")
    out = []
    for entry in body[0]:
        if not isinstance(entry, (list, tuple)) or len(entry) != 5:
            raise ValueError("ListSessions entry is not (susso)")
        sid, uid, user, seat, path = entry
        if not all(isinstance(v, str) for v in (sid, user, seat, path)) or not isinstance(uid, int):
            raise ValueError("ListSessions entry is not (susso)")
        out.append((sid, path))
    return out


def _value(props: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    v = props.get(name)
    v = v.value if isinstance(v, Variant) else v
    if v is None:
        return default
    if kind is str and isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
        return v[0]  # Seat (so), User (uo): the first member
    if kind is int and isinstance(v, (list, tuple)) and v and isinstance(v[0], int):
        return v[0]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"session property {name} is not a {kind.__name__}")
    return v


def parse_session(sid: str, props: Any) -> Session:
    """A session from its ``GetAll(org.freedesktop.login1.Session)`` properties."""
    if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
        raise ValueError("session properties are not a{sv}")
    return Session(
        id=_value(props, "Id", str, sid),
        user=_value(props, "Name", str, ""),
        uid=_value(props, "User", int, -1),
        seat=_value(props, "Seat", str, ""),
        tty=_value(props, "TTY", str, ""),
        remote=_value(props, "Remote", bool, False),
        remote_host=_value(props, "RemoteHost", str, ""),
        session_class=_value(props, "Class", str, "user"),
        state=_value(props, "State", str, "active"),
    )


class UserSessions(Protocol):
    async def interactive(self) -> list[Session]:
        """The sessions a reboot waits for now; RefusedError when logind cannot say."""
        ...


class LogindSessions:
    """Asks logind on ``bus`` (the system bus) for its sessions."""

    def __init__(self, bus: MessageBus, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._bus = bus
        self._timeout_s = timeout_s

    async def interactive(self) -> list[Session]:
        return [s for s in await self.sessions() if is_interactive(s)]

    async def sessions(self) -> list[Session]:
        reply = await self._call(LOGIND_OBJECT_PATH, MANAGER_INTERFACE, "ListSessions", "", [])
        listed = self._parsed(reply, parse_session_list, "ListSessions")
        out = []
        for sid, path in listed:
            reply = await self._call(path, PROPERTIES_INTERFACE, "GetAll", "s", [SESSION_INTERFACE])
            if reply.message_type == MessageType.ERROR and reply.error_name in GONE:
                continue  # logged out meanwhile
            out.append(
                self._parsed(reply, lambda body, sid=sid: parse_session(sid, body[0]), "GetAll")
            )
        return out

    @staticmethod
    def _parsed(reply: Message, parse: Any, member: str) -> Any:
        if reply.message_type == MessageType.ERROR:
            raise _unknown(f"logind answered {member} with {reply.error_name}: {reply.body}")
        try:
            return parse(reply.body)
        except (ValueError, IndexError) as err:
            raise _unknown(f"logind's {member} reply: {err}") from err

    async def _call(
        self, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> Message:
        msg = Message(
            destination=LOGIND_BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._bus.call(msg)
        except TimeoutError as err:
            raise _unknown(f"logind did not answer {member} within {self._timeout_s:g} s") from err
        except BUS_FAILURES as err:
            raise _unknown(f"cannot reach logind: {err}") from err


def _unknown(message: str) -> RefusedError:
    # Fails closed: who is logged in is not known, so the reboot waits (and is retried).
    return RefusedError(
        "reboot_refused",
        f"cannot tell who is logged in: {message}",
        hint="the reboot is retried later; [reboot] wait_for_users = false stops asking",
    )
