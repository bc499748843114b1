"""CoreOS update_engine's ``com.coreos.update1.Manager`` at ``/com/coreos/update1``
(bus name ``com.coreos.update1``), signature for signature, so that locksmith and
FLUO's update-agent work unchanged: ``AttemptUpdate()``, ``ResetStatus()``,
``GetStatus() -> xdssx`` and the signal ``StatusUpdate(xdssx)``. Served beside
``org.updater.Agent1`` (:mod:`updater.dbus_api`) with ``[agent] coreos_compat``.
"""

from __future__ import annotations

from typing import Final

from dbus_fast.service import ServiceInterface

from updater.agentapi import AgentControl, AgentStatus
from updater.dbus_wire import forward
from updater.dbuscompat import dbus_method, dbus_signal, signature

COREOS_BUS_NAME: Final = "com.coreos.update1"
COREOS_OBJECT_PATH: Final = "/com/coreos/update1"
COREOS_INTERFACE: Final = "com.coreos.update1.Manager"
COREOS_STATUS_PREFIX: Final = "UPDATE_STATUS_"


def coreos_status(status: AgentStatus) -> tuple[int, float, str, str, int]:
    """update_engine's GetStatus tuple (x last_checked_time, d progress,
    s current_operation, s new_version, x new_size)."""
    return (
        int(status.last_check_time),
        float(status.progress),
        COREOS_STATUS_PREFIX + status.state,
        status.new_version,
        int(status.new_size),
    )


class CoreOSInterface(ServiceInterface):
    """``com.coreos.update1.Manager``, as update_engine exports it."""

    def __init__(self, control: AgentControl) -> None:
        super().__init__(COREOS_INTERFACE)
        self._control = control
        self._last = coreos_status(control.status())

    def update(self, status: AgentStatus) -> None:
        """Take a new status; emit StatusUpdate when what GetStatus says changed."""
        now = coreos_status(status)
        if now != self._last:
            self._last = now
            self.status_update(now)

    @dbus_signal(name="StatusUpdate")
    @signature("xdssx")
    def status_update(self, status: tuple[int, float, str, str, int]) -> list[object]:
        return list(status)  # dbus-fast < 4 takes several out arguments only as a list

    @dbus_method(name="GetStatus")
    @signature("xdssx")
    def get_status(self) -> list[object]:
        return list(self._last)

    @dbus_method(name="AttemptUpdate")
    @signature("")
    async def attempt_update(self) -> None:
        await forward("AttemptUpdate", self._control.install_now)

    @dbus_method(name="ResetStatus")
    @signature("")
    async def reset_status(self) -> None:
        await forward("ResetStatus", self._control.reset_status)
