"""Real agents whose only fake part is the reboot, for the lock safety test.

``python -m devtools.reboot_agent --deadline UNIX ROOT...`` runs one agent
per host root (a :func:`devtools.host.provision`-ed host: a GPT disk image
with USR-A/USR-B, its config in ``ROOT/updater.toml``), each an asyncio task
of this process with its own objects and its own etcd clients, built by the
composition root (:func:`updater.compose.build_agent`, what ``updatectl
agent`` runs): the config's update source, install, reboot strategy (the
etcd lock), pre-reboot hooks, metrics and fleet record. Its lock holder id
is the root's name.

Only the reboot is not real. :class:`MachineRebooter` implements the
agent's Rebooter port: it records that it was asked (and what the firmware
would boot next) and the host then "reboots": the agent is stopped as
logind's shutdown would stop it, the machine stays down for a moment
(``--down-ms``), the firmware emulation boots the disk image (gpt-prio:
the staged slot, on trial), ``updatectl mark-good``'s steps run as
updater-mark-good.service would run them (health checks, then bless), and a
new agent starts as updater.service would, whose steady step gives the
slot back. Once it has, the host is done.

What happens is appended to ``ROOT/events.jsonl``, one JSON object a line
with ``event`` and ``t`` (``time.time_ns()``: one clock for every process
here): ``started``, ``staged``, ``reboot`` (``next``: the slot the firmware
picks), ``down`` / ``booted`` (``slot``), ``blessed``, ``steady``
(the agent's status). Past ``--deadline`` the process exits with code 3;
it also dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from devtools.host import LABELS
from devtools.lock_agent import die_with_parent
from partitions.booted import BootedSlotFinder
from partitions.firmware import boot_disk_image
from partitions.gptprio import GptPrioBootControl
from updater import compose, config
from updater.agent import Agent
from updater.agentapi import AgentStatus
from updater.metrics import Metrics
from updater.sdnotify import Notifier

EXIT_DEADLINE = 3
POLL_S = 0.05


class Events:
    """``ROOT/events.jsonl``, a line per event, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "t": time.time_ns(), **fields}, sort_keys=True)
        with self.path.open("a") as fh:
            fh.write(line + "\n")


class MachineRebooter:
    """The Rebooter port of an emulated machine: records the request; the machine
    then goes down (see :func:`life`)."""

    def __init__(self, events: Events, disk: Path, cmdline: Path) -> None:
        self.events = events
        self.disk = disk
        self.cmdline = cmdline
        self.asked = asyncio.Event()

    async def reboot(self) -> None:
        primary = GptPrioBootControl(self.disk, LABELS, BootedSlotFinder(self.cmdline)).primary()
        self.events.write("reboot", next=primary.label if primary else None)
        self.asked.set()


def status_dict(st: AgentStatus) -> dict[str, object]:
    return {
        "state": st.state,
        "booted_slot": st.booted_slot,
        "booted_version": st.booted_version,
        "staged_version": st.staged_version,
        "last_error_kind": st.last_error_kind,
    }


async def life(root: Path, rng: random.Random, down_s: tuple[float, float]) -> None:
    """One host, from its first boot until it is steady on the update."""
    holder = root.name
    structlog.contextvars.bind_contextvars(host=holder)
    events = Events(root / "events.jsonl")
    cfg = config.load(root / "updater.toml")
    disk, cmdline = cfg.disk.device, cfg.disk.kernel_cmdline
    assert disk is not None
    boots = 0
    staged_seen = False
    while True:
        if boots:
            # updater-mark-good.service, before updater.service starts the agent
            slot = await compose.mark_good(cfg)
            events.write("blessed", slot=slot.label)
        up = compose.updater(cfg)
        rebooter = MachineRebooter(events, disk, cmdline)
        metrics = Metrics()
        server = metrics.serve(cfg.metrics.listen) if cfg.metrics.listen else None
        agent: Agent = compose.build_agent(
            cfg, up, rebooter, metrics, Notifier(env={}), holder=holder
        )
        if agent.fleet is not None:
            agent.fleet.hostname = holder  # type: ignore[attr-defined]
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop), name=f"agent-{holder}")
        events.write("started", boot=boots)
        steady = False
        try:
            while not rebooter.asked.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rebooter.asked.wait(), POLL_S)
                if task.done():
                    task.result()  # raises what ended it
                    raise RuntimeError("the agent stopped by itself")
                st = agent.status()
                if not staged_seen and st.state == "UPDATED_NEED_REBOOT":
                    staged_seen = True
                    events.write("staged", version=st.staged_version)
                if boots and agent.strategy.holding is False and st.state == "IDLE":
                    steady = True  # the steady step gave the slot back
                    break
        finally:
            stop.set()  # logind's shutdown: SIGTERM to the agent
            await task
            if server is not None:
                server.close()
        if steady:
            events.write("steady", **status_dict(agent.status()))
            return
        events.write("down")
        await asyncio.sleep(rng.uniform(*down_s))
        booted = await asyncio.to_thread(boot_disk_image, disk, LABELS, cmdline)
        boots += 1
        events.write("booted", slot=booted.slot.label)


async def fleet(roots: list[Path], deadline: float, seed: int, down_s: tuple[float, float]) -> int:
    tasks = [
        asyncio.create_task(life(root, random.Random(seed + i), down_s))
        for i, root in enumerate(roots)
    ]
    left = deadline - time.time()
    done, pending = await asyncio.wait(tasks, timeout=max(0.1, left))
    for t in pending:
        t.cancel()
    failed = 0
    for t in done:
        if t.exception() is not None:
            failed += 1
            print(f"agent failed: {t.exception()!r}", file=sys.stderr)
    if pending:
        print(f"deadline passed: {len(pending)} agents not steady", file=sys.stderr)
        return EXIT_DEADLINE
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.reboot_agent")
    p.add_argument("roots", type=Path, nargs="+", help="host roots (devtools.host.provision)")
    p.add_argument("--deadline", type=float, required=True, help="unix seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--down-ms", type=int, nargs=2, default=(200, 600), metavar=("MIN", "MAX"))
    args = p.parse_args(argv)

    die_with_parent()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    os.environ.pop("NOTIFY_SOCKET", None)
    down_s = (args.down_ms[0] / 1000, args.down_ms[1] / 1000)
    return asyncio.run(fleet(args.roots, args.deadline, args.seed, down_s))


if __name__ == "__main__":
    sys.exit(main())
