"""Network namespaces for fault tests (root only; not part of the agent).

``with NetLab(3) as lab:`` makes one namespace per member (``lab.netns[i]``,
address ``lab.addresses[i]``), joined by veth pairs to a bridge in a hub
namespace of their own, and one veth from this (the root) namespace into the
hub, so processes here reach the members at their addresses::

    root ns  --veth--  hub ns: bridge  --veth--  member ns 0: eth0 10.213.S.11
    10.213.S.1                         --veth--  member ns 1: eth0 10.213.S.12
                                       --veth--  member ns 2: eth0 10.213.S.13

The /24 is 10.213.S.0/24 with S picked so that no route here uses it. Nothing
is routed beyond it: traffic stays inside these namespaces and the one veth.

``lab.cut(i)`` puts an nftables table in member i's namespace that drops
every packet to or from the other members (clients still reach it: a
minority member that answers, or rather does not, as in a real partition);
``lab.heal(i)`` removes it. ``close()`` (and ``__exit__``, and an atexit hook)
deletes the namespaces, which takes their veths with them, pass or fail.
Namespaces left behind by a run that was SIGKILLed are removed by the next
lab (their names carry the dead process's pid).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
from pathlib import Path
from types import TracebackType

from updater.run import run

IP = "ip"
NFT = "nft"
NS_PREFIX = "updater-lab-"
SUBNET_BASE = "10.213"
HUB_BRIDGE = "br0"
CUT_TABLE = "updater_cut"
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)-")


def ip(*args: str) -> str:
    return run([IP, *args], timeout=30).text


def nft(netns: str, script: str) -> None:
    run([IP, "netns", "exec", netns, NFT, "-f", "-"], input=script.encode(), timeout=30)


def _existing_netns() -> list[str]:
    out = ip("netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> None:
    """Delete labs whose process is gone (a run killed before it could clean up)."""
    for name in _existing_netns():
        m = _NS_RE.match(name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        with contextlib.suppress(Exception):
            ip("netns", "delete", name)


def _free_subnet(rng: random.Random) -> int:
    used = ip("-4", "route", "show", "table", "all") + ip("-4", "addr", "show")
    for _ in range(200):
        s = rng.randrange(1, 255)
        if f"{SUBNET_BASE}.{s}." not in used:
            return s
    raise RuntimeError(f"no free {SUBNET_BASE}.x.0/24 here")


class NetLab:
    """``size`` member namespaces on one bridge, reachable from here; see the module doc."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        tag = f"{os.getpid()}-{random.randrange(1 << 16):04x}"
        self.hub = f"{NS_PREFIX}{tag}-hub"
        self.netns = [f"{NS_PREFIX}{tag}-m{i}" for i in range(size)]
        self.host_if = f"ulab{tag.replace('-', '')[-10:]}"[:15]  # an interface name, <= 15
        self.subnet = 0
        self.addresses: list[str] = []
        self.gateway = ""
        self._made: list[str] = []
        self._closed = False

    def start(self) -> NetLab:
        remove_stale()
        try:
            self.subnet = _free_subnet(random.Random())
            net = f"{SUBNET_BASE}.{self.subnet}"
            self.gateway = f"{net}.1"
            self.addresses = [f"{net}.{11 + i}" for i in range(self.size)]
            self._add_netns(self.hub)
            ip("-n", self.hub, "link", "add", HUB_BRIDGE, "type", "bridge")
            ip("-n", self.hub, "link", "set", HUB_BRIDGE, "up")
            for i, ns in enumerate(self.netns):
                self._add_netns(ns)
                port = f"m{i}"
                ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns)
                ip("-n", self.hub, "link", "set", port, "master", HUB_BRIDGE, "up")
                ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
            # this namespace's way in: its end here, the other end on the bridge
            ip("link", "add", self.host_if, "type", "veth", "peer", "uplink", "netns", self.hub)
            ip("-n", self.hub, "link", "set", "uplink", "master", HUB_BRIDGE, "up")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.host_if)
            ip("link", "set", self.host_if, "up")
            atexit.register(self.close)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def exec_prefix(self, index: int) -> list[str]:
        """argv prefix that runs a command in member ``index``'s namespace."""
        return [IP, "netns", "exec", self.netns[index]]

    def cut(self, index: int) -> None:
        """Drop every packet between member ``index`` and the other members."""
        others = ", ".join(a for i, a in enumerate(self.addresses) if i != index)
        nft(
            self.netns[index],
            f"table inet {CUT_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {{ {others} }} drop; }}\n"
            f"  chain output {{ type filter hook output priority 0; policy accept;\n"
            f"    ip daddr {{ {others} }} drop; }}\n"
            "}\n",
        )

    def heal(self, index: int) -> None:
        nft(self.netns[index], f"delete table inet {CUT_TABLE}\n")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # deleting a namespace deletes the veths in it, and so their peers here
        for name in reversed(self._made):
            with contextlib.suppress(Exception):
                ip("netns", "delete", name)
        with contextlib.suppress(Exception):
            if Path(f"/sys/class/net/{self.host_if}").exists():
                ip("link", "delete", self.host_if)

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
