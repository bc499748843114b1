"""A private D-Bus system bus for tests: a real dbus-daemon with the system
bus's default policy, our policy files from dist/, and a temp socket that a
non-root test user can reach. Always stopped on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  {root_policy}
  {includes}
</busconfig>
"""

# Test peers (fake logind, fake systemd) run as root and own their names.
_ROOT_PEERS = """<policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow own="org.freedesktop.systemd1"/>
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>"""


class PrivateBus:
    """``with PrivateBus(policy_files=[...]) as bus: bus.address``"""

    def __init__(self, policy_files: tuple[Path, ...] = (), root_peers: bool = True) -> None:
        self.policy_files = policy_files
        self.root_peers = root_peers
        self.dir = Path(tempfile.mkdtemp(prefix="updater-bus-"))
        os.chmod(self.dir, 0o755)  # a non-root test user must reach the socket
        self.socket = self.dir / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateBus:
        policy_dir = self.dir / "system.d"
        policy_dir.mkdir()
        for f in self.policy_files:
            shutil.copy(f, policy_dir / f.name)
        config = self.dir / "system.conf"
        config.write_text(
            _CONFIG.format(
                socket=self.socket,
                root_policy=_ROOT_PEERS if self.root_peers else "",
                includes=f"<includedir>{policy_dir}</includedir>",
            )
        )
        self._proc = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", "--nosyslog", f"--config-file={config}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"dbus-daemon exited: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("dbus-daemon did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """Environment that points libraries at this bus as the system bus."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
