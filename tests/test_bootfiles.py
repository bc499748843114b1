"""Boot files in the manifest (parsing, bounds) and the ESP writer (crash-safe, never the
booted slot's directory), on a mounted directory and inside a disk image through mtools."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from updater.errors import VerificationError
from updater.manifest import (
    MAX_BOOT_FILE_BYTES,
    MAX_BOOT_FILES,
    BootFileRef,
    Compression,
    ImageRef,
    Manifest,
    parse,
    serialize,
)

T0 = datetime(2026, 11, 28, tzinfo=UTC)
KERNEL = b"\x7fkernel 1.1.0 " * 1000
INITRD = b"initrd 1.1.0 " * 3000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(*boot: BootFileRef) -> Manifest:
    return Manifest(
        channel="stable",
        version="1.1.0",
        created=T0,
        expires=T0.replace(year=2027),
        image=ImageRef("../images/1.1.0/usr.img", 10, "1" * 64, Compression.NONE, 10, "1" * 64),
        boot=boot,
    )


def boot_ref(name: str, data: bytes) -> BootFileRef:
    return BootFileRef(name, f"../images/1.1.0/boot/{name}", len(data), sha(data))


# ---- the manifest ----------------------------------------------------------------------------


def test_boot_files_round_trip() -> None:
    m = manifest(boot_ref("vmlinuz", KERNEL), boot_ref("initrd.img", INITRD))
    doc = json.loads(serialize(m))
    assert doc["boot"][0] == {
        "name": "vmlinuz",
        "url": "../images/1.1.0/boot/vmlinuz",
        "size": len(KERNEL),
        "sha256": sha(KERNEL),
    }
    assert parse(serialize(m)) == m


def test_no_boot_key_without_boot_files() -> None:
    m = manifest()
    assert "boot" not in json.loads(serialize(m))
    assert parse(serialize(m)).boot == ()


def with_boot(boot: Any) -> bytes:
    doc = json.loads(serialize(manifest()))
    doc["boot"] = boot
    return json.dumps(doc).encode()


GOOD = {"name": "vmlinuz", "url": "boot/vmlinuz", "size": 10, "sha256": "a" * 64}


@pytest.mark.parametrize(
    ("boot", "words"),
    [
        ({"name": "vmlinuz"}, "field boot must be list"),
        ([1], "boot[0] must be dict"),
        ([{**GOOD, "name": ".vmlinuz"}], "not a plain file name"),
        ([{**GOOD, "name": "../vmlinuz"}], "not a plain file name"),
        ([{**GOOD, "name": "a/b"}], "not a plain file name"),
        ([{**GOOD, "name": ""}], "not a plain file name"),
        ([{**GOOD, "name": "x" * 65}], "not a plain file name"),
        ([{**GOOD, "name": "vmlinuz*"}], "not a plain file name"),
        ([{**GOOD, "name": "vmlinuz\n"}], "not a plain file name"),
        ([GOOD, {**GOOD, "name": "VMLINUZ"}], "listed twice"),
        ([{**GOOD, "size": 0}], "boot[0].size must be positive"),
        ([{**GOOD, "size": True}], "boot[0].size must be int"),
        ([{**GOOD, "size": MAX_BOOT_FILE_BYTES + 1}], "above the cap"),
        ([{**GOOD, "sha256": "A" * 64}], "lowercase hex"),
        ([{**GOOD, "url": ""}], "boot[0].url is empty"),
        ([{**GOOD, "url": "a b"}], "white space"),
        ([{k: v for k, v in GOOD.items() if k != "sha256"}], "missing field boot[0].sha256"),
        (
            [{**GOOD, "name": f"f{i}"} for i in range(MAX_BOOT_FILES + 1)],
            f"at most {MAX_BOOT_FILES}",
        ),
    ],
)
def test_bad_boot_files_are_malformed(boot: Any, words: str) -> None:
    with pytest.raises(VerificationError) as err:
        parse(with_boot(boot))
    assert err.value.kind == "manifest_malformed"
    assert words in err.value.message


def test_the_cap_and_the_count_are_allowed() -> None:
    boot = [{**GOOD, "name": f"f{i}", "size": MAX_BOOT_FILE_BYTES} for i in range(MAX_BOOT_FILES)]
    assert len(parse(with_boot(boot)).boot) == MAX_BOOT_FILES


def test_unknown_keys_in_a_boot_file_are_ignored() -> None:
    assert parse(with_boot([{**GOOD, "cmdline": "quiet"}])).boot == (
        BootFileRef("vmlinuz", "boot/vmlinuz", 10, "a" * 64),
    )
