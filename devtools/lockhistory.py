"""etcd's own history of a group's reboot semaphore: every stored value, read
back revision by revision (``Range(revision=R)``), so an observer that trusts
neither the agents nor the lock code can say how many hosts ever held a slot
at once. Compaction would lose it: the test clusters never compact."""

from __future__ import annotations

from dataclasses import dataclass

from policies.etcdclient import EtcdClient
from policies.semaphore import Semaphore, semaphore_key


@dataclass(frozen=True)
class Revision:
    revision: int
    semaphore: Semaphore


def semaphore_history(client: EtcdClient, group: str) -> list[Revision]:
    """Every value the group's semaphore had since it was created, oldest first
    (empty: never created). One range request per revision of the cluster."""
    key = semaphore_key(group)
    final = client.range(key)
    if final is None:
        return []
    found: list[Revision] = []
    for r in range(final.create_revision, final.mod_revision + 1):
        kv = client.range(key, revision=r)
        if kv is None or kv.mod_revision != r:
            continue  # another key changed at r
        found.append(Revision(r, Semaphore.decode(kv.value, key)))
    return found


def most_holders(history: list[Revision]) -> int:
    return max((len(r.semaphore.holders) for r in history), default=0)


def holders_over_time(history: list[Revision]) -> list[tuple[int, tuple[str, ...]]]:
    """(revision, holders) at each change of the holders."""
    out: list[tuple[int, tuple[str, ...]]] = []
    for r in history:
        if not out or out[-1][1] != r.semaphore.holders:
            out.append((r.revision, r.semaphore.holders))
    return out
