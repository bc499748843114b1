"""The failed-version block: a version that rolled back on one host of a group
stops there.

One key per group and version::

    updater/v1/groups/<group>/failed/<version> =
        {"version":"1.2.0","failures":[{"host":"<id>","kind":"check_failed","at":1764300000}]}

A host that rolls back from a version (its trial boot failed a health check,
or never got blessed and the firmware fell back) adds itself to that list
before it gives its reboot slot back; the version is *blocked* once
``[reboot] max_failures`` distinct hosts are on it. Every agent of the group
refuses to install a blocked version and to reboot into one it has staged,
until an admin deletes the key (`updatectl fleet unblock VERSION`).

The record model and the decision are pure (:class:`FailedRecord`,
:func:`decide`); :class:`FailedVersions` is the small store over
:class:`policies.etcdclient.EtcdClient`. Adding a failure is a compare-and-swap
transaction (create if absent, else compare the key's ``mod_revision``): two
hosts recording at once both count, and a host recording twice counts once.
A value that is not such a record (hand-written, truncated, hostile) is a
``LockError("malformed")`` naming the key; it is never overwritten by an
agent, and it blocks the version (fail safe: someone wrote that key) until
unblocked.

This module imports no etcd client library (the requests are
:mod:`policies.etcdtxn`'s plain data): the agent's decision code uses the
model without loading etcd3gw (the client is passed in).
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import structlog

from policies.etcdtxn import (
    KeyValue,
    compare_absent,
    compare_mod_revision,
    request_delete_range,
    request_put,
    request_range,
)
from policies.rebootlock import check_group
from updater.errors import LockError, RefusedError, UpdaterError
from updater.jsonutil import loads as load_json
from updater.versions import VERSION_RE

if TYPE_CHECKING:
    from policies.etcdclient import EtcdClient

log = structlog.get_logger(__name__)

PREFIX = "updater/v1/groups/"
MAX_FAILURES_KEPT = 100  # hosts listed per version; more add nothing (it is blocked long before)
MAX_MAX_FAILURES = MAX_FAILURES_KEPT  # the highest [reboot] max_failures that can ever block
MAX_RECORD_BYTES = 64 * 1024  # a full list is ~10 KiB; etcd's own cap is 1.5 MiB
MAX_HOST_LEN = 256
MAX_KIND_LEN = 64


def failed_prefix(group: str) -> str:
    return f"{PREFIX}{check_group(group)}/failed/"


def failed_key(group: str, version: str) -> str:
    return failed_prefix(group) + check_version(version)


def check_version(version: str) -> str:
    """A release version as manifests carry it (no ``/``: it is a key's last part)."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise LockError(
            "bad_argument",
            f"invalid version {str(version)[:80]!r}: a release version such as 1.2.0",
        )
    return version


# ---- the record (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    host: str  # the holder id of the host (policies.identity.host_id)
    kind: str  # why: "rolled_back" or the health check's error kind
    at: float  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "kind": self.kind, "at": self.at}


@dataclass(frozen=True)
class FailedRecord:
    version: str
    failures: tuple[Failure, ...] = ()

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(f.host for f in self.failures)

    def with_failure(self, failure: Failure) -> FailedRecord:
        """This record with ``failure`` added; itself if the host is on it or the list is full."""
        if failure.host in self.hosts or len(self.failures) >= MAX_FAILURES_KEPT:
            return self
        return FailedRecord(self.version, (*self.failures, failure))

    def encode(self) -> bytes:
        doc = {"version": self.version, "failures": [f.as_dict() for f in self.failures]}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "failures": [f.as_dict() for f in self.failures]}

    @classmethod
    def decode(cls, raw: bytes, key: str, version: str) -> FailedRecord:
        """The record stored at ``key`` (for ``version``), or ``LockError("malformed")``."""

        def bad(why: str) -> LockError:
            shown = raw[:200].decode("utf-8", "replace")
            return LockError(
                "malformed",
                f"etcd key {key}: {why}: {shown!r}",
                hint=f"it blocks {version}; `updatectl fleet unblock {version}` deletes it",
            )

        doc = load_json(raw, bad, max_bytes=MAX_RECORD_BYTES)
        if not isinstance(doc, dict):
            raise bad("not a JSON object")
        if doc.get("version", version) != version:
            raise bad("its version is not the key's")
        items = doc.get("failures")
        if not isinstance(items, list):
            raise bad("failures is not a list")
        if len(items) > MAX_FAILURES_KEPT:
            raise bad(f"more than {MAX_FAILURES_KEPT} failures")
        failures: list[Failure] = []
        for item in items:
            if not isinstance(item, dict):
                raise bad("a failure is not an object")
            host, kind, at = item.get("host"), item.get("kind"), item.get("at")
            if not _text(host, MAX_HOST_LEN) or not _text(kind, MAX_KIND_LEN):
                raise bad("a failure needs a host and a kind (printable strings)")
            if not _finite(at):
                raise bad("a failure's time is not a number of seconds")
            failures.append(Failure(host, kind, float(at)))
        if len({f.host for f in failures}) != len(failures):
            raise bad("a host is listed twice")
        return cls(version, tuple(failures))


def _finite(value: Any) -> TypeGuard[int | float]:
    """A JSON number that is a finite float (an integer of 400 digits is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _text(value: Any, limit: int) -> TypeGuard[str]:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON, but no text
        return False
    return True


@dataclass(frozen=True)
class Verdict:
    """Whether a version may be installed or rebooted into, and why not."""

    version: str
    blocked: bool
    record: FailedRecord | None = None  # what is stored (None: nothing, or unreadable)
    malformed: LockError | None = None  # the stored value cannot be read (blocks: fail safe)

    @property
    def hosts(self) -> int:
        return 0 if self.record is None else len(self.record.hosts)

    def describe(self) -> str:
        if self.malformed is not None:
            return f"{self.version} is blocked: {self.malformed.message}"
        if self.record is None:
            return f"{self.version} is not blocked"
        who = ", ".join(f"{f.host} ({f.kind})" for f in self.record.failures[:5])
        more = len(self.record.failures) - 5
        if more > 0:
            who += f" and {more} more"
        state = "blocked" if self.blocked else "not blocked yet"
        return f"{self.version} is {state}: it failed on {who}"


def decide(version: str, stored: FailedRecord | LockError | None, max_failures: int) -> Verdict:
    """The block decision. Pure.

    Blocked when at least ``max_failures`` distinct hosts failed on it, or when
    the stored value cannot be read (someone wrote the key: fail safe).
    """
    if max_failures < 1:
        raise ValueError("max_failures must be >= 1")
    if isinstance(stored, LockError):
        return Verdict(version, True, None, stored)
    if stored is None:
        return Verdict(version, False)
    return Verdict(version, len(stored.hosts) >= max_failures, stored)


def refusal(verdict: Verdict) -> RefusedError:
    """The typed refusal of a blocked version (install or reboot)."""
    return RefusedError(
        "version_blocked",
        verdict.describe(),
        hint=f"find out why it failed; once it is fixed or known good, "
        f"`updatectl fleet unblock {verdict.version}` lets the group take it",
    )


# ---- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unblocked:
    version: str
    key: str
    removed: FailedRecord | LockError  # what the key held (a malformed value as its error)


class FailedVersions:
    """A group's failed versions in etcd (blocking calls; run them in a thread).

    Every method raises ``LockError`` when etcd cannot be asked
    (``unavailable``), refuses (``refused``) or keeps changing the key
    (``conflict``).
    """

    def __init__(
        self,
        client: EtcdClient,
        group: str,
        max_failures: int = 1,
        *,
        attempts: int = 32,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_failures <= MAX_MAX_FAILURES:
            raise LockError("bad_argument", f"max_failures must be 1..{MAX_MAX_FAILURES}")
        self.client = client
        self.group = check_group(group)
        self.max_failures = max_failures
        self.prefix = failed_prefix(group)
        self._attempts = attempts
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    def key(self, version: str) -> str:
        return failed_key(self.group, version)

    def verdict(self, version: str) -> Verdict:
        """May ``version`` be installed or rebooted into? (One etcd read.)"""
        key = self.key(version)
        kv = self.client.range(key)
        return decide(version, None if kv is None else self._decode(kv, version), self.max_failures)

    def record(self, version: str, host: str, kind: str, at: float) -> FailedRecord | LockError:
        """Add ``host``'s failure of ``version``; what the key holds afterwards.

        Idempotent per host. A malformed stored value is left as it is (and
        returned): it blocks the version already.
        """
        failure = Failure(host, kind, round(at, 3))
        if not _text(host, MAX_HOST_LEN) or not _text(kind, MAX_KIND_LEN):
            raise LockError("bad_argument", f"invalid host {host!r} or kind {kind!r}")
        key = self.key(version)
        kv = self.client.range(key)
        for attempt in range(self._attempts):
            if kv is None:
                new = FailedRecord(version, (failure,))
                guard = compare_absent(key)
            else:
                current = self._decode(kv, version)
                if isinstance(current, LockError):
                    log.warning(
                        "failed_version_record_malformed",
                        group=self.group,
                        version=version,
                        key=key,
                        error=current.message,
                    )
                    return current
                new = current.with_failure(failure)
                if new is current:
                    return current  # this host is on it already (or the list is full)
                guard = compare_mod_revision(key, kv.mod_revision)
            result = self.client.txn(
                [guard], [request_put(key, new.encode())], [request_range(key)]
            )
            if result.succeeded:
                log.warning(
                    "failed_version_recorded",
                    group=self.group,
                    version=version,
                    host=host,
                    failure_kind=kind,
                    hosts=len(new.hosts),
                    blocked=len(new.hosts) >= self.max_failures,
                    revision=result.revision,
                )
                return new
            now = result.ranges[0] if result.ranges else []
            kv = now[0] if now else None
            if attempt:
                self._backoff(attempt)
                kv = self.client.range(key)
        raise LockError(
            "conflict",
            f"etcd key {key} kept changing ({self._attempts} attempts)",
            hint="it is retried later",
        )

    def read(self) -> dict[str, FailedRecord | LockError]:
        """Every failed version of the group (version -> record, or why it cannot be read)."""
        out: dict[str, FailedRecord | LockError] = {}
        for kv in self.client.range_prefix(self.prefix):
            version = urllib.parse.unquote(kv.key[len(self.prefix) :])
            out[version] = self._decode(kv, version)
        return out

    def verdicts(self) -> list[Verdict]:
        """Every failed version of the group, decided, in version order."""
        return [decide(v, r, self.max_failures) for v, r in sorted(self.read().items())]

    def unblock(self, version: str) -> Unblocked | None:
        """Delete ``version``'s record; what it held, or None if there was none.

        The delete compares the revision read, so what is returned is exactly
        what was removed (a failure recorded in between is read again).
        """
        key = self.key(version)
        for attempt in range(self._attempts):
            kv = self.client.range(key)
            if kv is None:
                return None
            result = self.client.txn(
                [compare_mod_revision(key, kv.mod_revision)], [request_delete_range(key)]
            )
            if result.succeeded:
                removed = self._decode(kv, version)
                log.warning(
                    "failed_version_unblocked",
                    group=self.group,
                    version=version,
                    key=key,
                    hosts=None if isinstance(removed, LockError) else len(removed.hosts),
                )
                return Unblocked(version, key, removed)
            self._backoff(attempt)
        raise LockError("conflict", f"etcd key {key} kept changing ({self._attempts} attempts)")

    def _decode(self, kv: KeyValue, version: str) -> FailedRecord | LockError:
        try:
            check_version(version)
            return FailedRecord.decode(kv.value, kv.key, version)
        except LockError as exc:
            if exc.kind != "malformed":
                return LockError("malformed", f"etcd key {kv.key}: {exc.message}")
            return exc

    def _backoff(self, attempt: int) -> None:
        self._sleep(self._rng.uniform(0, min(0.5, 0.01 * 2**attempt)))


class GroupBlocks:
    """One host's view of its group's failed versions: the agent's port
    (updater.update.VersionBlocks). The store and the host id are made on first
    use: a status query reads neither etcd's password file nor the machine id."""

    def __init__(
        self, group: str, store: Callable[[], FailedVersions], host: Callable[[], str]
    ) -> None:
        self.group = check_group(group)
        self._make_store = store
        self._store: FailedVersions | None = None
        self.host = host

    @property
    def store(self) -> FailedVersions:
        if self._store is None:
            self._store = self._make_store()
        return self._store

    def verdict(self, version: str) -> Verdict:
        return self.store.verdict(version)

    def record(self, version: str, kind: str, at: float) -> FailedRecord | UpdaterError:
        return self.store.record(version, self.host(), kind, at)


def verdicts_as_dict(verdicts: list[Verdict]) -> list[Mapping[str, Any]]:
    return [
        {
            "version": v.version,
            "blocked": v.blocked,
            "failures": [] if v.record is None else [f.as_dict() for f in v.record.failures],
            "malformed": None if v.malformed is None else v.malformed.message,
        }
        for v in verdicts
    ]
