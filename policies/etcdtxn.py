"""etcd v3 JSON gateway requests and answers, as plain data (pure; no client library).

The gateway speaks etcd's protobuf messages as JSON: keys and values base64,
int64 numbers as strings (zero omitted). These build the requests and
compares of a ``kv/txn`` and read the key-values of an answer; the client that
sends them is :class:`policies.etcdclient.EtcdClient`. Modules that only build
requests (policies.failed) use this one and never load etcd3gw.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from updater.errors import LockError

MAX_VALUE_BYTES = 1024 * 1024  # a value or error body we parse; etcd's own cap is 1.5 MiB


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction
    ranges: tuple[list[KeyValue], ...]  # the answers of its range requests, in order


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def gateway_int(value: Any) -> int:
    """An int64 as the gateway writes it (a JSON string; zero omitted)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise LockError("malformed", f"etcd answered a bad number: {value!r}") from None


def key_values(answer: Mapping[str, Any]) -> list[KeyValue]:
    """The ``kvs`` of a range answer."""
    out = []
    kvs = answer.get("kvs")
    for kv in kvs if isinstance(kvs, list) else []:
        try:
            out.append(
                KeyValue(
                    key=base64.b64decode(kv["key"]).decode("utf-8", "replace"),
                    value=base64.b64decode(kv.get("value", "")),
                    create_revision=gateway_int(kv.get("create_revision")),
                    mod_revision=gateway_int(kv.get("mod_revision")),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise LockError("malformed", f"etcd answered a bad key-value: {kv!r}"[:300]) from None
    return out


# ---- the requests and compares of a transaction ------------------------------------------------


def request_put(key: str, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": b64(key), "value": b64(value)}}


def request_delete_range(key: str, *, prefix: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": b64(key)}
    if prefix:
        op["range_end"] = b64(prefix_end(key))
    return {"request_delete_range": op}


def request_range(key: str, *, prefix: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": b64(key)}
    if prefix:
        op["range_end"] = b64(prefix_end(key))
    return {"request_range": op}


def prefix_end(key: str) -> bytes:
    raw = bytearray(key.encode())
    raw[-1] += 1  # our prefixes end in "/", never 0xff
    return bytes(raw)


def compare_mod_revision(key: str, revision: int) -> dict[str, Any]:
    """The key was last changed at ``revision``."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def compare_absent(key: str) -> dict[str, Any]:
    """The key does not exist."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
