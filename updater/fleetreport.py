"""Publishes the agent's status as its fleet record in etcd (policies.fleet)."""

from __future__ import annotations

import socket
import time

from policies.fleet import LAST_ERROR_CHARS, FleetPublisher, HostRecord
from updater.agentapi import AgentStatus


class EtcdFleetReporter:
    """The agent's FleetReporter port over etcd; blocking, called from a thread."""

    def __init__(
        self, publisher: FleetPublisher, host_id: str, group: str, strategy: str = ""
    ) -> None:
        self.publisher = publisher
        self.host_id = host_id
        self.group = group
        self.strategy = strategy
        self.hostname = socket.gethostname()

    def report(
        self, status: AgentStatus, lock_held: bool | None, blocked_version: str = ""
    ) -> None:
        self.publisher.publish(
            HostRecord(
                id=self.host_id,
                hostname=self.hostname,
                group=self.group,
                booted_slot=status.booted_slot,
                booted_version=status.booted_version,
                state=status.state,
                staged_version=status.staged_version,
                last_check=status.last_check_time,
                last_error_kind=status.last_error_kind,
                lock_held=lock_held,
                updated=time.time(),
                blocked_version=blocked_version,
                strategy=self.strategy,
                last_error=status.last_error_message[:LAST_ERROR_CHARS],
                held=status.held,
                held_until=status.held_until,
            )
        )
