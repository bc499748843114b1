"""``<state_dir>/hostpolicy.json``: this host's hold, skipped versions and downgrade
allowance (:mod:`updater.hostpolicy`), written atomically by `updatectl` and read by
the agent at every check (and on D-Bus ``Reload``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from updater import jsonutil
from updater.errors import StateError
from updater.fsutil import atomic_write, read_bounded
from updater.hostpolicy import HostPolicy, PolicyInvalid, from_json, to_json

log = structlog.get_logger(__name__)

POLICY_FILE = "hostpolicy.json"
MAX_POLICY_BYTES = 64 * 1024


class HostPolicyStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / POLICY_FILE
        self._lock = threading.Lock()

    def load(self) -> HostPolicy:
        """The policy; none when there is no file. A file that cannot be read is
        ``policy_corrupt``: whoever installs must stop (fail closed)."""
        try:
            data = read_bounded(self.path, MAX_POLICY_BYTES)
        except FileNotFoundError:
            return HostPolicy()
        except OSError as exc:
            raise self._corrupt(exc.strerror or str(exc)) from None
        try:
            return from_json(jsonutil.loads(data, PolicyInvalid, max_bytes=MAX_POLICY_BYTES))
        except PolicyInvalid as exc:
            raise self._corrupt(str(exc)) from None

    def _corrupt(self, why: str) -> StateError:
        return StateError(
            "policy_corrupt",
            f"{self.path} cannot be read ({why}): no installs until it is fixed",
            hint="`updatectl hold` or `updatectl unhold` writes it anew (skips are lost)",
        )

    def update(
        self, change: Callable[[HostPolicy], HostPolicy], *, replace_corrupt: bool = False
    ) -> HostPolicy:
        """Load, change, save. ``replace_corrupt``: an unreadable file counts as empty
        (hold and unhold: what the admin says now is the whole policy)."""
        with self._lock:
            corrupt = False
            try:
                before = self.load()
            except StateError as exc:
                if not replace_corrupt:
                    raise
                log.warning("host_policy_replaced", path=str(self.path), error=exc.message)
                before, corrupt = HostPolicy(), True
            after = change(before)
            if after != before or corrupt:
                self.save(after)
            return after

    def save(self, policy: HostPolicy) -> None:
        data = (json.dumps(to_json(policy), indent=2) + "\n").encode()
        try:
            atomic_write(self.path, data, mode=0o644)
        except OSError as exc:
            raise StateError(
                "unwritable",
                f"cannot write {self.path}: {exc.strerror}",
                hint="run as root; check that [agent] state_dir exists and is writable",
            ) from None
