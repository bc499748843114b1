"""dbus-fast across the versions the agent runs on (Debian bookworm's 1.84 and up).

The service decorators were renamed in 2.x: ``method`` and ``signal`` became
:func:`dbus_method` and :func:`dbus_signal` (same arguments); this module
exports the new names on both. D-Bus signatures of service members go through
:func:`signature`, the one form both read.

dbus-fast 2.x gave its exceptions a common base, ``DBusFastError``; Debian
bookworm ships 1.84, where they are unrelated ``ValueError``, ``TypeError`` and
``Exception`` subclasses. :data:`DBUS_ERRORS` is every exception class
``dbus_fast.errors`` defines, which is that base and its children on new
versions and the separate classes on old ones: catching it catches the same
failures on both (and nothing outside dbus-fast, such as a bare ValueError).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from dbus_fast import errors as _errors
from dbus_fast import service as _service

if TYPE_CHECKING:
    from dbus_fast.service import dbus_method, dbus_signal
else:
    dbus_method = getattr(_service, "dbus_method", None) or _service.method
    dbus_signal = getattr(_service, "dbus_signal", None) or _service.signal

__all__ = ["BUS_FAILURES", "DBUS_ERRORS", "dbus_method", "dbus_signal", "signature"]

_F = TypeVar("_F", bound=Callable[..., Any])

DBUS_ERRORS: Final[tuple[type[Exception], ...]] = tuple(
    cls
    for cls in vars(_errors).values()
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == _errors.__name__
)
# What talking to a bus that is absent, refuses us or goes away raises.
BUS_FAILURES: Final[tuple[type[Exception], ...]] = (OSError, EOFError, *DBUS_ERRORS)


def signature(out: str = "", **args: str) -> Callable[[_F], _F]:
    """Give a service member its D-Bus signatures: ``out`` for what it returns
    (``""``: nothing), one keyword per in argument. Apply it below the dbus-fast
    decorator.

    dbus-fast reads them from the annotations. Written as quoted string
    literals, the one form every dbus-fast since Debian bookworm's 1.84 reads
    (``typing.Annotated`` signatures came in 4.0, a bare ``-> None`` is read as
    "no annotation"), while the annotations the type checker sees stay the
    real Python types.
    """

    def apply(fn: _F) -> _F:
        missing = set(args) - set(fn.__annotations__)
        if missing:
            raise TypeError(f"{fn.__qualname__} has no argument {sorted(missing)}")
        fn.__annotations__.update({name: repr(sig) for name, sig in args.items()})
        fn.__annotations__["return"] = repr(out)
        return fn

    return apply
