"""Fuzzing the partition side (hypothesis): whatever a disk or an ESP holds, the GPT
reader, its layout check, the grub-env and systemd-boot backends return an answer or
a typed error (DiskError, RefusedError), nothing else, no hang, bounded memory.

The GPT examples get their CRCs recomputed (tests/gptcraft.py), so that the fuzzing
reaches the header fields, the entries and the layout check instead of stopping at
the CRC. The ESP is an in-memory store that refuses the paths the real stores
refuse (filestore.clean_path), so names FAT allows but our paths do not are covered.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitions import bootcontrol, gpt, gpttable
from partitions.bls import EntryTemplate, parse_entry_name, parse_entry_text
from partitions.bootcontrol import SlotStatus
from partitions.booted import BootedSlotFinder
from partitions.filestore import TooLarge, check_read_size, clean_path
from partitions.grubenv import (
    BLOCK_SIZE,
    HEADER,
    EnvProblem,
    GrubEnvControl,
    GrubEnvFormatError,
    format_env,
    parse_env,
    read_state,
)
from partitions.sdboot import SdBootControl
from tests.fuzzing import fewer_examples, parse_or_typed_error
from tests.gptcraft import SECTOR, edit_entries, fix_crcs, set_entry
from updater.errors import DiskError, RefusedError, UpdaterError
from updater.run import run

pytestmark = pytest.mark.fuzz

USR_TYPE = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6"
SECTORS = 256  # a 128 KiB disk: 34 sectors of primary GPT, usable 34..222, 33 of backup
SFDISK_SCRIPT = (
    "label: gpt\nfirst-lba: 34\n"
    f'start=40, size=64, type={USR_TYPE}, name="USR-A"\n'
    f'start=104, size=64, type={USR_TYPE}, name="USR-B"\n'
    'start=168, size=16, name="ROOT"\n'
)
TEMPLATE = EntryTemplate(
    title="Fuzz OS ({label})",
    linux="/vmlinuz",
    initrd=(),
    options="mount.usr=PARTUUID={partuuid} ro",
)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A tiny GPT disk made by sfdisk: USR-A 1, USR-B 2, ROOT 3."""
    path = tmp_path_factory.mktemp("fuzz-gpt") / "small.img"
    with path.open("wb") as fh:
        fh.truncate(SECTORS * SECTOR)
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=SFDISK_SCRIPT.encode(),
    )
    table = gpt.read_table(path)
    assert [e.name for e in table.entries] == ["USR-A", "USR-B", "ROOT"]
    return path.read_bytes()


@pytest.fixture
def disk_file(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


def _read(path: Path) -> gpttable.GptTable | UpdaterError:
    return parse_or_typed_error(lambda: gpt.read_table(path), timeout_s=5.0)


def _check_sane(table: gpttable.GptTable) -> None:
    """What a table read without error promises (checked by brute force, independently)."""
    seen_guids = set()
    for e in table.entries:
        assert table.first_usable_lba <= e.first_lba <= e.last_lba <= table.last_usable_lba
        assert e.part_uuid not in seen_guids
        seen_guids.add(e.part_uuid)
    for i, a in enumerate(table.entries):
        for b in table.entries[i + 1 :]:
            assert a.last_lba < b.first_lba or b.last_lba < a.first_lba, (a, b)


def _use(path: Path) -> None:
    """Read it; if it reads, find slots and write attributes: a result or a typed error."""
    result = _read(path)
    if isinstance(result, UpdaterError):
        assert isinstance(result, DiskError), result
        return
    _check_sane(result)
    slots = parse_or_typed_error(
        lambda: bootcontrol.find_slots(result, path, bootcontrol.DEFAULT_LABELS)
    )
    if isinstance(slots, UpdaterError):
        assert isinstance(slots, DiskError) and slots.kind in ("gpt_invalid", "slot_not_found")
        return
    assert slots[0].size == slots[1].size
    written = parse_or_typed_error(
        lambda: gpt.write_attributes(path, {slots[1].index: 1 << 56}), timeout_s=5.0
    )
    assert isinstance(written, gpttable.GptTable | DiskError), written


# ---- the GPT ----------------------------------------------------------------------------------

lbas = st.one_of(
    st.integers(0, SECTORS + 2),
    st.sampled_from([0, 1, 2, 33, 34, 39, 40, 103, 104, 167, 168, 222, 223, 255, 2**63, 2**64 - 1]),
)
guids = st.sampled_from([uuid.UUID(int=0), uuid.UUID(int=1), uuid.UUID(int=2), uuid.uuid4()])
names = st.sampled_from(["USR-A", "USR-B", "ROOT", "", "usr-a", "USR-A\0x", "\ud7ff"])
entry_edits = st.lists(
    st.tuples(
        st.integers(1, 6), st.one_of(st.none(), lbas), st.one_of(st.none(), lbas), guids, names
    ),
    max_size=6,
)


@settings(max_examples=fewer_examples(1))
@given(edits=entry_edits)
def test_mutated_entries(small_disk: bytes, disk_file: Path, edits: list[tuple]) -> None:  # type: ignore[type-arg]
    disk_file.write_bytes(small_disk)

    def edit(entries: bytearray) -> None:
        for index, first, last, guid, name in edits:
            if index > 3 and not any(entries[(index - 1) * 128 : (index - 1) * 128 + 16]):
                entries[(index - 1) * 128 : (index - 1) * 128 + 16] = uuid.UUID(USR_TYPE).bytes_le
            set_entry(entries, index, first_lba=first, last_lba=last, part_guid=guid)
            if name != "\ud7ff":
                set_entry(entries, index, name=name)

    edit_entries(disk_file, edit)
    _use(disk_file)


HEADER_FIELDS = {  # byte offset in the header, struct format
    "revision": (8, "<I"),
    "header_size": (12, "<I"),
    "my_lba": (24, "<Q"),
    "alternate_lba": (32, "<Q"),
    "first_usable": (40, "<Q"),
    "last_usable": (48, "<Q"),
    "entries_lba": (72, "<Q"),
    "num_entries": (80, "<I"),
    "entry_size": (84, "<I"),
}
header_values = st.one_of(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 2, 33, 34, 91, 92, 93, 127, 128, 129, 222, 223, 255, 256, 512, 32768]),
)


@settings(max_examples=fewer_examples(1))
@given(
    fields=st.dictionaries(st.sampled_from(sorted(HEADER_FIELDS)), header_values, max_size=4),
    copy=st.sampled_from(["primary", "backup", "both"]),
)
def test_mutated_headers(
    small_disk: bytes, disk_file: Path, fields: dict[str, int], copy: str
) -> None:
    image = bytearray(small_disk)
    for lba in {"primary": [1], "backup": [SECTORS - 1], "both": [1, SECTORS - 1]}[copy]:
        for name, value in fields.items():
            at, fmt = HEADER_FIELDS[name]
            struct.pack_into(
                fmt, image, lba * SECTOR + at, value % (1 << (8 * struct.calcsize(fmt)))
            )
    fix_crcs(image)
    disk_file.write_bytes(image)
    _use(disk_file)


@settings(max_examples=fewer_examples(1))
@given(
    flips=st.lists(
        st.tuples(
            st.one_of(
                st.integers(SECTOR, 34 * SECTOR - 1),
                st.integers((SECTORS - 33) * SECTOR, SECTORS * SECTOR - 1),
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=16,
    ),
    recompute=st.booleans(),
)
def test_random_bytes_in_the_tables(
    small_disk: bytes, disk_file: Path, flips: list[tuple[int, int]], recompute: bool
) -> None:
    image = bytearray(small_disk)
    for at, value in flips:
        image[at] = value
    if recompute:
        fix_crcs(image)
    disk_file.write_bytes(image)
    _use(disk_file)


@settings(max_examples=fewer_examples(3))
@given(data=st.binary(min_size=0, max_size=40 * SECTOR), size=st.integers(0, 300))
def test_random_disks(disk_file: Path, data: bytes, size: int) -> None:
    image = bytearray(data[: size * SECTOR].ljust(size * SECTOR, b"\0"))
    if size > 3 and data:
        image[SECTOR : SECTOR + 8] = gpttable.SIGNATURE
        fix_crcs(image)
    disk_file.write_bytes(image)
    _use(disk_file)


# ---- the layout check, against a brute-force oracle -------------------------------------------


layout_entries = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(0, 4)), max_size=12
)


@given(entries=layout_entries)
def test_layout_problems_against_brute_force(entries: list[tuple[int, int, int]]) -> None:
    table = gpttable.GptTable(
        sector_size=SECTOR,
        disk_guid=uuid.UUID(int=0),
        entries=tuple(
            gpttable.GptEntry(i + 1, uuid.UUID(USR_TYPE), uuid.UUID(int=g), f, last, 0, "")
            for i, (f, last, g) in enumerate(entries)
        ),
        first_usable_lba=5,
        last_usable_lba=50,
        num_entries=128,
        entry_size=128,
        primary_valid=True,
        backup_valid=True,
    )
    problems = parse_or_typed_error(lambda: gpttable.layout_problems(table))
    assert isinstance(problems, tuple)
    placed = [e for e in table.entries if 5 <= e.first_lba <= e.last_lba <= 50]
    bad_range = {e.index for e in table.entries} - {e.index for e in placed}
    overlapping = {
        (a.index, b.index)
        for a in placed
        for b in placed
        if a.index < b.index and not (a.last_lba < b.first_lba or b.last_lba < a.first_lba)
    }
    dup_guid = len({e.part_uuid for e in table.entries}) != len(table.entries)
    named = {i for p in problems for i in p.partitions}
    assert bad_range <= named
    overlap_named = {p.partitions for p in problems if "overlap" in p.reason}
    assert bool(overlapping) == bool(overlap_named)
    assert overlap_named <= overlapping  # only true overlaps are reported
    for a, b in overlapping:  # every overlapping entry is named in some overlap
        assert any(a in pair for pair in overlap_named) and any(b in pair for pair in overlap_named)
    assert dup_guid == any("GUID" in p.reason for p in problems)
    assert bool(problems) == bool(bad_range or overlapping or dup_guid)


# ---- an ESP in memory ---------------------------------------------------------------------------


class MemStore:
    """A FileStore in a dict; paths are cleaned (and refused) as the real stores do."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read(self, path: str, max_size: int | None = None) -> bytes:
        key = clean_path(path)
        if key not in self.files:
            raise DiskError("io", f"{key}: no such file or directory")
        return check_read_size(self.files[key], key, max_size)

    def write(self, path: str, data: bytes) -> None:
        self.files[clean_path(path)] = data

    def rename(self, src: str, dst: str) -> None:
        s, d = clean_path(src), clean_path(dst)
        if s not in self.files or d in self.files:
            raise DiskError("io", f"cannot rename {s} to {d}")
        self.files[d] = self.files.pop(s)

    def list(self, directory: str) -> list[str]:
        prefix = clean_path(directory) + "/"
        out = {k[len(prefix) :].split("/")[0] for k in self.files if k.startswith(prefix)}
        return sorted(out)

    def exists(self, path: str) -> bool:
        key = clean_path(path)
        return key in self.files or any(k.startswith(key + "/") for k in self.files)

    def remove(self, path: str) -> None:
        self.files.pop(clean_path(path), None)

    def makedirs(self, path: str) -> None:
        pass


@pytest.fixture
def slot_disk(small_disk: bytes, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "slots.img"
    path.write_bytes(small_disk)
    yield path


def _backend_answers(calls: list[object]) -> None:
    for call in calls:
        result = parse_or_typed_error(call, timeout_s=5.0, max_bytes=8 * 1024 * 1024)  # type: ignore[arg-type]
        if isinstance(result, UpdaterError):
            assert isinstance(result, DiskError | RefusedError), result


# ---- grub-env -----------------------------------------------------------------------------------

grub_vars = st.dictionaries(
    st.sampled_from(["ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY", "A_PARTUUID", "X", "A_OK\n"]),
    st.one_of(
        st.sampled_from(["0", "1", "A B", "B A", "A", "A A", "C", "", "²", "A\u2028B", "\\"]),
        st.text(max_size=20),
    ),
    max_size=6,
)


def _block_from(variables: dict[str, str]) -> bytes:
    try:
        return format_env({k: v for k, v in variables.items() if "\n" not in k})
    except ValueError:
        return format_env({})


@settings(max_examples=fewer_examples(1))
@given(
    variables=grub_vars,
    flips=st.lists(st.tuples(st.integers(0, BLOCK_SIZE + 8), st.integers(0, 255)), max_size=6),
    tail=st.binary(max_size=8),
)
def test_grubenv(
    slot_disk: Path, variables: dict[str, str], flips: list[tuple[int, int]], tail: bytes
) -> None:
    data = bytearray(_block_from(variables))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    block = bytes(data) + tail
    parsed = parse_or_typed_error(lambda: _pure_grubenv(block))
    assert parsed is None
    store = MemStore({"grub/grubenv": block})
    control = GrubEnvControl(
        store, slot_disk, finder=BootedSlotFinder(slot_disk.with_name("cmdline"))
    )
    _backend_answers([control.slots, control.primary, control.read_variables])


def _pure_grubenv(block: bytes) -> None:
    """parse_env and read_state raise only their own ValueErrors, which the backend types."""
    try:
        variables = parse_env(block)
    except GrubEnvFormatError:
        return
    assert len(block) == BLOCK_SIZE and block.startswith(HEADER)
    try:
        read_state(variables, ("A", "B"))
    except EnvProblem:
        return


@given(data=st.binary(max_size=2 * BLOCK_SIZE))
def test_grubenv_random_bytes(data: bytes) -> None:
    assert (
        parse_or_typed_error(lambda: _pure_grubenv(HEADER + data[: BLOCK_SIZE - len(HEADER)]))
        is None
    )
    assert parse_or_typed_error(lambda: _pure_grubenv(data)) is None


# ---- systemd-boot -------------------------------------------------------------------------------

entry_names = st.one_of(
    st.sampled_from(
        [
            "updater-USR-A.conf",
            "updater-USR-B+1-0.conf",
            "updater-USR-A+0-3.conf",
            "updater-USR-B+99999999999999999999-0.conf",
            "updater-USR-C.conf",
            "updater-USR-A[1].conf",
            "debian[1].conf",
            "ctl\x01.conf",
            "a\\b.conf",
            "x*.conf",
            "auto-windows.conf",
            ".updater-USR-A.conf.new",
            "UPDATER-usr-a.CONF",
            "rescue.conf",
            "sub/dir.conf",
        ]
    ),
    st.text(min_size=1, max_size=12).map(lambda t: t.replace("/", "_") + ".conf"),
)


def _entry_text(kind: int, version: str, extra: str) -> str:
    uuids = ["00000000-0000-0000-0000-000000000001", str(uuid.uuid4())]
    lines = [
        "title T",
        f"version {version}",
        "sort-key " + ["updater", "aaa", "zzz", ""][kind % 4],
        "linux /vmlinuz",
        f"options mount.usr=PARTUUID={uuids[kind % 2]} ro",
        extra,
    ]
    return "\n".join(lines[: 3 + kind % 4] + lines[3:])


entry_bodies = st.one_of(
    st.builds(
        lambda kind, version, extra: _entry_text(kind, version, extra).encode(),
        st.integers(0, 7),
        st.one_of(st.sampled_from(["1", "2", "²", "٣", "1" * 30, "", "1.0"]), st.text(max_size=8)),
        st.text(max_size=30),
    ),
    st.binary(max_size=200),
    st.just(b"#" * (70 * 1024)),
)


@settings(max_examples=fewer_examples(1))
@given(
    entries=st.dictionaries(entry_names, entry_bodies, max_size=5),
    loader_conf=st.one_of(
        st.none(), st.binary(max_size=64), st.sampled_from([b"default x\n", b"timeout 3\n"])
    ),
    selected=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_sdboot(
    slot_disk: Path,
    tmp_path_factory: pytest.TempPathFactory,
    entries: dict[str, bytes],
    loader_conf: bytes | None,
    selected: bytes | None,
) -> None:
    files = {"vmlinuz": b"k", "loader/entries/.keep": b""}
    for name, body in entries.items():
        files["loader/entries/" + name] = body  # unclean names too: the listing shows them
    if loader_conf is not None:
        files["loader/loader.conf"] = loader_conf
    efivars = tmp_path_factory.mktemp("efivars")
    if selected is not None:
        (efivars / "LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f").write_bytes(selected)
    store = MemStore(files)
    control = SdBootControl(
        store,
        slot_disk,
        finder=BootedSlotFinder(slot_disk.with_name("none")),
        entry=TEMPLATE,
        efivars=efivars,
    )
    slots = parse_or_typed_error(control.slots)
    calls: list[object] = [control.primary, control.booted]
    if isinstance(slots, tuple):
        assert all(isinstance(s, SlotStatus) for s in slots)
        b = slots[1].slot
        calls += [
            lambda: control.make_primary(b),
            lambda: control.mark_good(b),
            lambda: control.mark_bad(b),
        ]
    _backend_answers(calls)


@given(name=st.text(max_size=40), text=st.text(max_size=300))
def test_entry_name_and_text_parsers_never_raise(name: str, text: str) -> None:
    parsed = parse_entry_name(name)
    if parsed is not None:
        assert parsed.left is None or parsed.left >= 0
    fields = parse_entry_text(text)
    assert isinstance(fields.options, str)


def test_an_oversized_store_read_is_too_large() -> None:
    with pytest.raises(TooLarge):
        MemStore({"a": b"xx"}).read("a", 1)
