"""systemd-boot backend: version order, entry names and order (table tests), the backend on
an ESP directory and in a disk image, every broken input refused before anything changes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import pytest
from structlog.testing import capture_logs

from devtools.espimage import esp_store, make_esp_disk
from partitions import bls, sdboot, sdbootplan
from partitions.bls import (
    BootEntry,
    EntryFields,
    EntryName,
    EntryTemplate,
    parse_entry_name,
    parse_entry_text,
)
from partitions.bootcontrol import BootControl, Slot, SlotFlags
from partitions.booted import BootedSlotFinder
from partitions.filestore import DirStore, FileStore
from partitions.mtools import MtoolsStore
from partitions.sdboot import SdBootControl
from partitions.sdbootplan import EspState, Remove, Rename, Write
from updater.errors import DiskError, RefusedError
from updater.run import run

MiB = 1024 * 1024
TEMPLATE = EntryTemplate(
    title="Test OS ({label})",
    linux="/vmlinuz",
    initrd=("/initrd.img",),
    options="mount.usr=PARTUUID={partuuid} ro console=ttyS0",
)
GOOD = SlotFlags(1, 0, True)
BAD = SlotFlags(0, 0, False)

# ---- entry names, text, order ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("updater-USR-A.conf", EntryName("updater-USR-A.conf", "updater-USR-A")),
        ("updater-USR-A+3.conf", EntryName("updater-USR-A+3.conf", "updater-USR-A", 3, 0)),
        ("updater-USR-A+1-0.conf", EntryName("updater-USR-A+1-0.conf", "updater-USR-A", 1, 0)),
        ("updater-USR-A+0-12.conf", EntryName("updater-USR-A+0-12.conf", "updater-USR-A", 0, 12)),
        ("a+b+2-1.conf", EntryName("a+b+2-1.conf", "a+b", 2, 1)),
        ("a+x.conf", EntryName("a+x.conf", "a+x")),  # not a counter
        ("a+1-0.CONF", EntryName("a+1-0.CONF", "a+1-0")),  # counters only before ".conf"
        ("A.CONF", EntryName("A.CONF", "A")),
        (".updater-USR-A.conf", None),
        ("auto-windows.conf", None),
        ("updater-USR-A.conf.new", None),
        ("entries.srel", None),
    ],
)
def test_parse_entry_name(name: str, parsed: EntryName | None) -> None:
    assert parse_entry_name(name) == parsed


def test_entry_name_renamed() -> None:
    n = EntryName("x+1-0.conf", "x", 1, 0)
    assert n.renamed(None) == EntryName("x.conf", "x")
    assert n.renamed(0, 1) == EntryName("x+0-1.conf", "x", 0, 1)
    assert n.renamed(0, 1).bad and not n.bad and n.counting


def test_parse_entry_text() -> None:
    text = (
        "# comment\n\ntitle  Test OS \n version 7\nsort-key updater\nmachine-id abc\n"
        'linux "/vmlinuz"\ninitrd /a\ninitrd /b\noptions root=PARTUUID=x\noptions\tquiet  a\n'
        "options ro\nefi /x.efi\narchitecture x64\nunknown key\n"
    )
    assert parse_entry_text(text) == EntryFields(
        title="Test OS",
        version="7",
        machine_id="abc",
        sort_key="updater",
        linux="/vmlinuz",
        efi="/x.efi",
        initrd=("/a", "/b"),
        options="root=PARTUUID=x quiet  a ro",
        architecture="x64",
    )


def E(
    name: str,
    sort_key: str | None = "updater",
    version: str | None = "1",
    label: str | None = None,
    visible: bool = True,
    machine_id: str | None = None,
) -> BootEntry:
    parsed = parse_entry_name(name)
    assert parsed is not None
    fields = EntryFields(sort_key=sort_key, version=version, linux="/k", machine_id=machine_id)
    gen = int(version) if version and version.isdigit() else 0
    return BootEntry(parsed, fields, visible, label, gen)


@pytest.mark.parametrize(
    ("entries", "order"),
    [
        # version descending under one sort-key
        (
            [E("u-A.conf", version="1"), E("u-B+1-0.conf", version="2")],
            ["u-B+1-0.conf", "u-A.conf"],
        ),
        ([E("u-A.conf", version="9"), E("u-B.conf", version="10")], ["u-B.conf", "u-A.conf"]),
        # bad entries last, whatever their version
        (
            [E("u-A.conf", version="1"), E("u-B+0-1.conf", version="2")],
            ["u-A.conf", "u-B+0-1.conf"],
        ),
        # an entry with a sort-key before one without
        ([E("zz.conf", sort_key=None, version="99"), E("u-A.conf")], ["u-A.conf", "zz.conf"]),
        # sort-key ascending, before version
        ([E("x.conf", sort_key="b", version="9"), E("y.conf", sort_key="a")], ["y.conf", "x.conf"]),
        # machine-id ascending, before version
        (
            [E("x.conf", machine_id="b", version="9"), E("y.conf", machine_id="a", version="1")],
            ["y.conf", "x.conf"],
        ),
        # no sort-key: file name descending (newest-looking first)
        (
            [E("linux-6.1.conf", sort_key=None), E("linux-6.10.conf", sort_key=None)],
            ["linux-6.10.conf", "linux-6.1.conf"],
        ),
        # a tie broken by the counters: more tries left first, then fewer done
        ([E("a+1-2.conf"), E("a+2-0.conf")], ["a+2-0.conf", "a+1-2.conf"]),
        # invisible (kernel missing) entries are not listed at all
        ([E("u-A.conf"), E("u-B.conf", version="2", visible=False)], ["u-A.conf"]),
    ],
)
def test_boot_order(entries: list[BootEntry], order: list[str]) -> None:
    assert [e.name.name for e in bls.boot_order(entries)] == order
    assert [e.name.name for e in bls.boot_order(entries[::-1])] == order


@pytest.mark.parametrize(
    ("entries", "flags", "primary"),
    [
        ([], {"A": BAD, "B": BAD}, None),
        ([E("u-A.conf", label="A")], {"A": GOOD, "B": BAD}, "A"),
        (
            [E("u-A.conf", label="A"), E("u-B+1-0.conf", "updater", "2", "B")],
            {"A": GOOD, "B": SlotFlags(2, 1, False)},
            "B",
        ),
        (  # B booted once on trial: +0-1 is "bad" until blessed
            [E("u-A.conf", label="A"), E("u-B+0-1.conf", "updater", "2", "B")],
            {"A": GOOD, "B": BAD},
            "A",
        ),
        (
            [E("u-A.conf", label="A"), E("u-B.conf", "updater", "2", "B")],
            {"A": GOOD, "B": SlotFlags(2, 0, True)},
            "B",
        ),
        (  # every entry bad: systemd-boot boots the first anyway, we report none
            [E("u-A+0-3.conf", label="A"), E("u-B+0-1.conf", "updater", "2", "B")],
            {"A": BAD, "B": BAD},
            None,
        ),
        (  # many tries left: capped at what the flags carry
            [E("u-A+99-0.conf", label="A")],
            {"A": SlotFlags(1, 15, False), "B": BAD},
            "A",
        ),
        (  # a foreign entry sorting first: systemd-boot boots that, not a slot
            [E("u-A.conf", label="A"), E("rescue.conf", sort_key="aaa")],
            {"A": GOOD, "B": BAD},
            None,
        ),
        (  # ... and one sorting after ours changes nothing
            [E("u-A.conf", label="A"), E("rescue.conf", sort_key=None)],
            {"A": GOOD, "B": BAD},
            "A",
        ),
    ],
)
def test_flags_and_primary(
    entries: list[BootEntry], flags: dict[str, SlotFlags], primary: str | None
) -> None:
    state = EspState(tuple(entries))
    assert sdbootplan.slot_flags(state, ["A", "B"]) == flags
    assert sdbootplan.primary_label(state) == primary


# ---- the template and the plans -------------------------------------------------------------

A_SLOT = Slot("USR-A", 2, UUID(int=0xA), Path("/d.img"), 0, 0)
B_SLOT = Slot("USR-B", 3, UUID(int=0xB), Path("/d.img"), 0, 0)


def test_template_renders_one_entry_per_slot() -> None:
    text = TEMPLATE.render(B_SLOT, 4)
    fields = parse_entry_text(text)
    assert fields == EntryFields(
        title="Test OS (USR-B)",
        version="4",
        sort_key="updater",
        linux="/vmlinuz",
        initrd=("/initrd.img",),
        options=f"mount.usr=PARTUUID={B_SLOT.part_uuid} ro console=ttyS0",
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"options": "root=/dev/sda3"},  # no {partuuid}
        {"options": "{partuuid}"},  # not as a parameter the booted detection reads
        {"options": "root=PARTUUID={partuuid} {extra}"},  # unknown placeholder
        {"title": "two\nlines"},
        {"prefix": "up+dater"},
        {"sort_key": "two words"},
        {"linux": " "},
        {"linux": "\\EFI\\vmlinuz"},
        {"linux": "/../vmlinuz"},
    ],
)
def test_template_refuses(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        replace(TEMPLATE, **changes)  # type: ignore[arg-type]


def ours(name: str, version: int, label: str) -> BootEntry:
    return E(name, version=str(version), label=label)


def test_plan_make_primary_replaces_the_old_entry_last() -> None:
    state = EspState(
        (ours("updater-USR-A.conf", 3, "USR-A"), ours("updater-USR-B+0-1.conf", 2, "USR-B"))
    )
    ops, after = sdbootplan.plan_make_primary(state, B_SLOT, TEMPLATE, 1)
    new = "loader/entries/updater-USR-B+1-0.conf"
    tmp = "loader/entries/.updater-USR-B+1-0.conf.new"
    assert ops == [
        Write(tmp, TEMPLATE.render(B_SLOT, 4).encode()),
        Remove("loader/entries/updater-USR-B+0-1.conf"),
        Rename(tmp, new),
    ]
    assert sdbootplan.primary_label(after) == "USR-B"
    # no old entry: one write; the same name: one write (the store replaces atomically)
    assert sdbootplan.plan_make_primary(EspState(), B_SLOT, TEMPLATE, 2)[0] == [
        Write("loader/entries/updater-USR-B+2-0.conf", TEMPLATE.render(B_SLOT, 1).encode())
    ]
    again, _ = sdbootplan.plan_make_primary(after, B_SLOT, TEMPLATE, 1)
    assert [type(op) for op in again] == [Write] and again[0].path == new  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "after"),
    [
        ("updater-USR-B+1-0.conf", "updater-USR-B.conf"),
        ("updater-USR-B+0-1.conf", "updater-USR-B.conf"),  # blessing the booted trial entry
        ("updater-USR-B+2-3.conf", "updater-USR-B.conf"),
        ("updater-USR-B.conf", None),  # already good: nothing
    ],
)
def test_plan_mark_good(name: str, after: str | None) -> None:
    state = EspState((ours("updater-USR-A.conf", 1, "USR-A"), ours(name, 2, "USR-B")))
    ops, _ = sdbootplan.plan_mark_good(state, B_SLOT, TEMPLATE)
    expected = (
        [] if after is None else [Rename(f"loader/entries/{name}", f"loader/entries/{after}")]
    )
    assert ops == expected


def test_plan_mark_good_without_an_entry_writes_a_good_one_above_the_others() -> None:
    state = EspState((ours("updater-USR-A+0-1.conf", 5, "USR-A"),))
    ops, after = sdbootplan.plan_mark_good(state, B_SLOT, TEMPLATE)
    assert ops == [Write("loader/entries/updater-USR-B.conf", TEMPLATE.render(B_SLOT, 6).encode())]
    assert sdbootplan.slot_flags(after, ["USR-A", "USR-B"])["USR-B"] == GOOD


@pytest.mark.parametrize(
    ("name", "after"),
    [
        ("updater-USR-B.conf", "updater-USR-B+0-0.conf"),
        ("updater-USR-B+1-0.conf", "updater-USR-B+0-0.conf"),
        ("updater-USR-B+2-3.conf", "updater-USR-B+0-3.conf"),
        ("updater-USR-B+0-1.conf", None),  # already bad
    ],
)
def test_plan_mark_bad(name: str, after: str | None) -> None:
    state = EspState((ours("updater-USR-A.conf", 1, "USR-A"), ours(name, 2, "USR-B")))
    ops, _ = sdbootplan.plan_mark_bad(state, B_SLOT)
    expected = (
        [] if after is None else [Rename(f"loader/entries/{name}", f"loader/entries/{after}")]
    )
    assert ops == expected
    assert sdbootplan.plan_mark_bad(EspState(), B_SLOT)[0] == []  # no entry: nothing to do


@pytest.mark.parametrize(
    "a_entry",
    [
        None,  # no other entry at all
        "updater-USR-A+0-1.conf",  # the other one is bad
    ],
)
def test_plan_mark_bad_of_the_last_bootable_entry_is_refused(a_entry: str | None) -> None:
    entries = [ours("updater-USR-B.conf", 2, "USR-B")]
    if a_entry is not None:
        entries.insert(0, ours(a_entry, 1, "USR-A"))
    with pytest.raises(RefusedError) as err:
        sdbootplan.plan_mark_bad(EspState(tuple(entries)), B_SLOT)
    assert err.value.kind == "last_bootable_slot"
    assert "loader/entries/updater-USR-B.conf" in err.value.message


# ---- the backend ----------------------------------------------------------------------------


class Esp:
    """An ESP with kernels, the disk with the slots, and the backend over them."""

    def __init__(self, store: FileStore, disk: Path, tmp_path: Path) -> None:
        self.store = store
        self.disk = disk
        self.cmdline = tmp_path / "cmdline"
        self.efivars = tmp_path / "efivars"
        self.efivars.mkdir()
        store.makedirs("loader/entries")
        store.write("vmlinuz", b"kernel")
        store.write("initrd.img", b"initrd")
        self.tmp_path = tmp_path

    def control(self, **kwargs: object) -> SdBootControl:
        return SdBootControl(
            self.store,
            self.disk,
            finder=BootedSlotFinder(
                self.cmdline, self.tmp_path / "proc", self.tmp_path / "sys", self.tmp_path / "dev"
            ),
            entry=kwargs.pop("entry", TEMPLATE),  # type: ignore[arg-type]
            efivars=self.efivars,
            **kwargs,  # type: ignore[arg-type]
        )

    def entries(self) -> list[str]:
        return self.store.list("loader/entries")

    def snapshot(self) -> dict[str, bytes]:
        return {n: self.store.read(f"loader/entries/{n}") for n in self.entries()}

    def put(self, name: str, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.store.write(f"loader/entries/{name}", data)

    def boot(self, name: str) -> str:
        """What systemd-boot does to a counting entry it boots: +L-D -> +(L-1)-(D+1)."""
        parsed = parse_entry_name(name)
        assert parsed is not None and parsed.left is not None
        new = parsed.renamed(max(parsed.left - 1, 0), (parsed.done or 0) + 1).name
        self.store.rename(f"loader/entries/{name}", f"loader/entries/{new}")
        return new


@pytest.fixture(params=["dir", "mtools"])
def esp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Esp]:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    yield Esp(esp_store(disk, request.param, tmp_path / "mnt"), disk.path, tmp_path)


@pytest.fixture
def dir_esp(tmp_path: Path) -> Esp:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    return Esp(esp_store(disk, "dir", tmp_path / "mnt"), disk.path, tmp_path)


def slots(control: SdBootControl) -> tuple[Slot, Slot]:
    a, b = (s.slot for s in control.slots())
    return a, b


def test_implements_the_port_and_finds_slots_by_label(esp: Esp) -> None:
    control: BootControl = esp.control()
    assert [s.slot.label for s in control.slots()] == ["USR-A", "USR-B"]
    assert [s.flags for s in control.slots()] == [BAD, BAD]
    assert control.primary() is None


def test_update_cycle_on_the_esp(esp: Esp) -> None:
    control = esp.control(tries=2)
    a, b = slots(control)
    control.mark_good(a)  # provisioning
    assert esp.entries() == ["updater-USR-A.conf"]
    assert control.primary() == a
    control.mark_bad(b)  # before writing the image: no entry yet, nothing to do
    assert esp.entries() == ["updater-USR-A.conf"]
    control.make_primary(b)
    assert esp.entries() == ["updater-USR-A.conf", "updater-USR-B+2-0.conf"]
    text = esp.store.read("loader/entries/updater-USR-B+2-0.conf").decode()
    assert f"options mount.usr=PARTUUID={b.part_uuid} ro console=ttyS0\n" in text
    assert "version 2\n" in text and "sort-key updater\n" in text
    assert control.flags(b) == SlotFlags(2, 2, False)
    assert control.flags(a) == GOOD
    assert control.primary() == b
    booted = esp.boot("updater-USR-B+2-0.conf")  # first try
    assert control.flags(b) == SlotFlags(2, 1, False) and control.primary() == b
    booted = esp.boot(booted)  # second try: exhausted
    assert booted == "updater-USR-B+0-2.conf"
    assert control.flags(b) == BAD and control.primary() == a
    control.mark_good(b)  # what systemd-bless-boot does
    assert esp.entries() == ["updater-USR-A.conf", "updater-USR-B.conf"]
    assert control.flags(b) == SlotFlags(2, 0, True) and control.primary() == b
    control.mark_bad(b)
    assert esp.entries() == ["updater-USR-A.conf", "updater-USR-B+0-0.conf"]
    assert control.primary() == a
    control.make_primary(a)  # a rollback to A: a fresh entry, above B
    assert esp.entries() == ["updater-USR-A+2-0.conf", "updater-USR-B+0-0.conf"]
    assert "version 3\n" in esp.store.read("loader/entries/updater-USR-A+2-0.conf").decode()
    assert control.primary() == a


def test_each_verb_changes_only_what_it_must(dir_esp: Esp) -> None:
    control = dir_esp.control()
    a, b = slots(control)
    control.mark_good(a)
    control.make_primary(b)
    before = dir_esp.snapshot()
    with capture_logs() as logs:
        control.mark_good(a)  # already good
        control.make_primary(b)  # already primary: rewritten in place, same content
    assert dir_esp.snapshot() == before
    events = [(e["event"], e["changed"]) for e in logs if e["event"].startswith("slot_")]
    assert events == [("slot_marked_good", False), ("slot_made_primary", True)]
    made = next(e for e in logs if e["event"] == "slot_made_primary")
    assert made["entry_after"] == "updater-USR-B+1-0.conf"


def test_booted_from_the_kernel_command_line(dir_esp: Esp) -> None:
    control = dir_esp.control()
    _, b = slots(control)
    dir_esp.cmdline.write_text(f"initrd=/initrd.img mount.usr=PARTUUID={b.part_uuid} ro\n")
    assert control.booted() == b


def test_booted_from_loader_entry_selected(dir_esp: Esp) -> None:
    control = dir_esp.control()
    a, b = slots(control)
    dir_esp.cmdline.write_text("quiet\n")  # names no slot
    var = dir_esp.efivars / f"LoaderEntrySelected-{sdboot.LOADER_VENDOR_GUID}"
    # systemd-boot stores the entry id: the file name, lower case, as it was when chosen
    var.write_bytes(sdboot.efivar_bytes("updater-usr-b+1-0.conf"))
    assert control.booted() == b
    var.write_bytes(sdboot.efivar_bytes("updater-USR-A.conf"))
    assert control.booted() == a
    var.write_bytes(sdboot.efivar_bytes("debian-6.1.conf"))
    with pytest.raises(DiskError) as err:
        control.booted()
    assert err.value.kind == "booted_unknown" and "LoaderEntrySelected" in err.value.message


def test_the_command_line_wins_over_loader_entry_selected(dir_esp: Esp) -> None:
    control = dir_esp.control()
    a, _ = slots(control)
    dir_esp.cmdline.write_text(f"mount.usr=PARTUUID={a.part_uuid}\n")
    var = dir_esp.efivars / f"LoaderEntrySelected-{sdboot.LOADER_VENDOR_GUID}"
    var.write_bytes(sdboot.efivar_bytes("updater-USR-B.conf"))
    with capture_logs() as logs:
        assert control.booted() == a
    assert any(e["event"] == "booted_sources_disagree" for e in logs)


class Crash(Exception):
    pass


class CrashingStore:
    """A store that dies before its ``n``-th change (write, rename, remove)."""

    def __init__(self, inner: FileStore, n: int) -> None:
        self.inner, self.n = inner, n

    def __getattr__(self, verb: str) -> object:
        attr = getattr(self.inner, verb)
        if verb not in ("write", "rename", "remove"):
            return attr

        def change(*args: object) -> object:
            if self.n == 0:
                raise Crash
            self.n -= 1
            return attr(*args)

        return change


@pytest.mark.parametrize("crash_before", [0, 1, 2])  # write temp, remove old, rename
def test_a_crash_in_make_primary_leaves_a_safe_esp(dir_esp: Esp, crash_before: int) -> None:
    control = dir_esp.control()
    a, b = slots(control)
    control.mark_good(a)
    control.make_primary(b)
    dir_esp.boot("updater-USR-B+1-0.conf")  # B failed its trial: +0-1
    crashing = dir_esp.control()
    crashing.store = CrashingStore(dir_esp.store, crash_before)  # type: ignore[assignment]
    with pytest.raises(Crash):
        crashing.make_primary(b)
    after = control.slots()  # the ESP still reads, A still boots
    assert after[0].flags == GOOD and control.primary() == a
    assert after[1].flags == BAD  # B is never bootable half-made, never twice
    control.make_primary(b)  # the next attempt finishes the job and tidies up
    assert dir_esp.entries() == ["updater-USR-A.conf", "updater-USR-B+1-0.conf"]
    assert control.primary() == b


# ---- broken input: a typed error naming the file, nothing renamed or written ----------------


def refused(esp: Esp, verb: str = "make_primary", slot: int = 1) -> DiskError:
    """Run ``verb`` on slot ``slot``; assert it fails and changed nothing; its error."""
    control = esp.control()
    target = control_slots(esp)[slot]
    before = (esp.store.list(""), esp.snapshot())
    with pytest.raises(DiskError) as err:
        getattr(control, verb)(target)
    assert (esp.store.list(""), esp.snapshot()) == before
    return err.value


def control_slots(esp: Esp) -> tuple[Slot, ...]:
    from partitions import bootcontrol, gpt  # noqa: PLC0415

    return bootcontrol.find_slots(gpt.read_table(esp.disk), esp.disk, bootcontrol.DEFAULT_LABELS)


def entry_text(slot: Slot, generation: int = 1, **override: str) -> str:
    text = TEMPLATE.render(slot, generation)
    for key, value in override.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(key.replace("_", "-") + " ")]
        text = "\n".join(lines + ([f"{key.replace('_', '-')} {value}"] if value else [])) + "\n"
    return text


@pytest.mark.parametrize("verb", ["make_primary", "mark_good", "mark_bad"])
def test_an_esp_without_entries_directory(tmp_path: Path, verb: str) -> None:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    store = disk.esp
    control = Esp.__new__(Esp)
    control.store, control.disk, control.tmp_path = store, disk.path, tmp_path
    control.cmdline, control.efivars = tmp_path / "cmdline", tmp_path / "efivars"
    store.write("vmlinuz", b"k")
    before = store.list("")
    with pytest.raises(DiskError) as err:
        getattr(control.control(), verb)(control_slots(control)[0])
    assert err.value.kind == "esp_invalid"
    assert f"{disk.esp.drive}:/loader/entries" in err.value.message
    assert store.list("") == before
    with pytest.raises(DiskError):
        control.control().slots()


@pytest.mark.parametrize("line", ["default updater-USR-A.conf", "default @saved", "  default *"])
def test_a_default_in_loader_conf_is_refused(esp: Esp, line: str) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a))
    esp.store.write("loader/loader.conf", f"timeout 3\n{line}\n".encode())
    err = refused(esp)
    assert err.kind == "esp_invalid"
    assert "loader/loader.conf" in err.message and line.strip() in err.message
    assert err.hint and "default" in err.hint
    with pytest.raises(DiskError):
        esp.control().primary()


def test_timeout_and_other_loader_conf_lines_are_fine(dir_esp: Esp) -> None:
    dir_esp.store.write("loader/loader.conf", b"timeout 3\n# default x.conf\neditor no\n")
    dir_esp.control().make_primary(control_slots(dir_esp)[0])


def test_a_loader_entry_default_efi_variable_is_refused(dir_esp: Esp) -> None:
    var = dir_esp.efivars / f"LoaderEntryDefault-{sdboot.LOADER_VENDOR_GUID}"
    var.write_bytes(sdboot.efivar_bytes("updater-USR-A.conf"))
    err = refused(dir_esp)
    assert err.kind == "esp_invalid" and str(var) in err.message
    assert err.hint and "bootctl set-default" in err.hint


def test_an_entry_for_an_unknown_slot(esp: Esp) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a))
    esp.put("updater-USR-C+1-0.conf", entry_text(replace(a, label="USR-C")))
    for verb in ("make_primary", "mark_good", "mark_bad"):
        err = refused(esp, verb)
        assert err.kind == "boot_entry_invalid"
        assert "loader/entries/updater-USR-C+1-0.conf" in err.message and "USR-C" in err.message


def test_both_slots_bad_is_refused(esp: Esp) -> None:
    """Marking the last bootable entry bad is refused; nothing is renamed."""
    a, b = control_slots(esp)
    esp.put("updater-USR-A+0-1.conf", entry_text(a))
    esp.put("updater-USR-B.conf", entry_text(b, 2))
    control = esp.control()
    before = (esp.store.list(""), esp.snapshot())
    with pytest.raises(RefusedError) as err:
        control.mark_bad(b)
    assert err.value.kind == "last_bootable_slot"
    assert "loader/entries/updater-USR-B.conf" in err.value.message
    assert (esp.store.list(""), esp.snapshot()) == before
    control.mark_bad(a)  # already bad: nothing to do, no error
    assert (esp.store.list(""), esp.snapshot()) == before
    # An ESP where both are bad already reads fine: nothing is bootable; a good mark repairs it.
    esp.store.remove("loader/entries/updater-USR-B.conf")
    esp.put("updater-USR-B+0-3.conf", entry_text(b, 2))
    assert control.primary() is None
    assert [s.flags for s in control.slots()] == [BAD, BAD]
    control.mark_good(b)
    assert control.primary() == b


def test_an_entry_whose_partuuid_is_not_the_slots(esp: Esp) -> None:
    a, b = control_slots(esp)
    esp.put("updater-USR-A.conf", entry_text(replace(a, part_uuid=UUID(int=99))))
    err = refused(esp)
    assert err.kind == "boot_entry_invalid"
    assert "updater-USR-A.conf" in err.message and "none of the slots" in err.message
    esp.put("updater-USR-A.conf", entry_text(b))  # A's entry boots B's partition
    err = refused(esp)
    assert "slot USR-B's partition" in err.message


def test_two_entries_for_one_slot(esp: Esp) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a))
    esp.put("updater-USR-A+1-0.conf", entry_text(a, 2))
    err = refused(esp, "mark_good", 0)
    assert err.kind == "boot_entry_invalid"
    assert "updater-USR-A+1-0.conf" in err.message and "updater-USR-A.conf" in err.message


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"version": ""}, "version None"),
        ({"version": "1.2"}, "version '1.2'"),
        ({"linux": ""}, "no linux line"),
        ({"sort_key": ""}, "no sort-key line"),
        ({"options": "root=/dev/sda3"}, "name no partition"),
    ],
)
def test_a_malformed_entry(esp: Esp, override: dict[str, str], problem: str) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a, 1, **override))
    err = refused(esp)
    assert err.kind == "boot_entry_invalid"
    assert "updater-USR-A.conf" in err.message and problem in err.message


def test_an_entry_that_is_not_text(esp: Esp) -> None:
    esp.put("updater-USR-A.conf", b"title \xff\xfe\n")
    err = refused(esp)
    assert err.kind == "boot_entry_invalid" and "not UTF-8" in err.message


def test_a_foreign_entry_booting_a_slot(esp: Esp) -> None:
    b = control_slots(esp)[1]
    esp.put(
        "debian-6.1.conf", f"title Debian\nlinux /vmlinuz\noptions root=PARTUUID={b.part_uuid}\n"
    )
    err = refused(esp, "mark_good", 0)
    assert err.kind == "boot_entry_invalid"
    assert "debian-6.1.conf" in err.message and "USR-B" in err.message


def test_a_foreign_entry_sorting_first(esp: Esp) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a))
    esp.put("rescue.conf", "title Rescue\nsort-key aaa\nversion 1\nlinux /vmlinuz\n")
    assert esp.control().primary() is None
    assert esp.control().flags(a) == GOOD
    err = refused(esp)
    assert err.kind == "boot_entry_invalid"
    assert "rescue.conf" in err.message and err.hint and "sort-key" in err.hint
    # without its kernel systemd-boot does not list it: then it does not count
    esp.put("rescue.conf", "title Rescue\nsort-key aaa\nversion 1\nlinux /gone\n")
    esp.control().make_primary(control_slots(esp)[1])
    assert esp.control().primary() == control_slots(esp)[1]


def test_foreign_entries_after_ours_are_left_alone(dir_esp: Esp) -> None:
    a, b = control_slots(dir_esp)
    dir_esp.put("debian-6.1.conf", "title Debian\nlinux /vmlinuz\noptions root=/dev/sda2\n")
    dir_esp.put("odd.conf", "title Odd\nsort-key a\nlinux \\EFI\\odd.efi\n")  # not a path
    dir_esp.put("memtest.conf", "title Memtest\nsort-key zzz\nefi /vmlinuz\n")
    control = dir_esp.control()
    control.mark_good(a)
    control.make_primary(b)
    assert control.primary() == b
    assert dir_esp.store.read("loader/entries/debian-6.1.conf").startswith(b"title Debian")


def test_make_primary_needs_the_kernel_on_the_esp(esp: Esp) -> None:
    esp.store.remove("initrd.img")
    err = refused(esp)
    assert err.kind == "esp_invalid" and "initrd.img" in err.message


def test_per_slot_kernels(dir_esp: Esp) -> None:
    template = replace(TEMPLATE, linux="/{label}/vmlinuz", initrd=())
    control = dir_esp.control(entry=template)
    a, b = slots(control)
    dir_esp.store.makedirs("USR-A")
    dir_esp.store.write("USR-A/vmlinuz", b"k")
    control.mark_good(a)
    with pytest.raises(DiskError) as err:
        control.make_primary(b)
    assert "USR-B/vmlinuz" in err.value.message
    dir_esp.store.makedirs("USR-B")
    dir_esp.store.write("USR-B/vmlinuz", b"k")
    control.make_primary(b)
    assert control.primary() == b


def test_an_entry_whose_kernel_vanished_is_not_bootable(dir_esp: Esp) -> None:
    template = replace(TEMPLATE, linux="/{label}/vmlinuz", initrd=())
    control = dir_esp.control(entry=template)
    a, b = slots(control)
    for label in ("USR-A", "USR-B"):
        dir_esp.store.makedirs(label)
        dir_esp.store.write(f"{label}/vmlinuz", b"k")
    control.mark_good(a)
    control.make_primary(b)
    dir_esp.store.remove("USR-B/vmlinuz")
    with capture_logs() as logs:
        assert control.flags(b) == BAD
        assert control.primary() == a
    assert any(e["event"] == "boot_entry_kernel_missing" for e in logs)


def test_stale_temporaries_are_removed_by_the_next_change(dir_esp: Esp) -> None:
    a, b = control_slots(dir_esp)
    dir_esp.put(".updater-USR-B+1-0.conf.new", "half")
    dir_esp.put(".updater-USR-A.conf.x1y2z3.tmp", "half")
    dir_esp.put(".other.tmp", "not ours")
    control = dir_esp.control()
    assert control.flags(b) == BAD  # read: ignored, left alone
    assert len(dir_esp.entries()) == 3
    control.mark_good(a)
    assert dir_esp.entries() == [".other.tmp", "updater-USR-A.conf"]


def test_a_slot_of_another_disk_is_refused(dir_esp: Esp) -> None:
    control = dir_esp.control()
    for verb in (control.mark_good, control.mark_bad, control.make_primary, control.flags):
        with pytest.raises(DiskError) as err:
            verb(B_SLOT)
        assert err.value.kind == "slot_not_found"
    assert dir_esp.entries() == []


def test_constructor_checks() -> None:
    store = DirStore(Path("/nonexistent"))
    with pytest.raises(ValueError):
        SdBootControl(store, Path("/d"), ("USR-A", "usr-a"), entry=TEMPLATE)
    with pytest.raises(ValueError):
        SdBootControl(store, Path("/d"), ("USR+A", "USR-B"), entry=TEMPLATE)
    with pytest.raises(ValueError):
        SdBootControl(store, Path("/d"), entry=TEMPLATE, tries=0)
    with pytest.raises(ValueError):
        SdBootControl(store, Path("/d"), entry=TEMPLATE, tries=16)


def test_mtools_store_sees_what_systemd_boot_would(tmp_path: Path) -> None:
    """The entries as a FAT reader lists them: long names, counters intact."""
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    esp = Esp(disk.esp, disk.path, tmp_path)
    control = esp.control()
    a, b = slots(control)
    control.mark_good(a)
    control.make_primary(b)
    listing = run(
        ["mdir", "-b", "-i", disk.esp.drive, "::/loader/entries/"], env={"MTOOLS_SKIP_CHECK": "1"}
    ).text.split()
    assert listing == [
        "::/loader/entries/updater-USR-A.conf",
        "::/loader/entries/updater-USR-B+1-0.conf",
    ]
    assert isinstance(disk.esp, MtoolsStore)


# ---- hostile names and contents: a foreign entry never stops the agent ----------------------


def put_raw(esp: Esp, name: str, data: bytes) -> None:
    """Put a file in loader/entries under a name our store refuses (as another tool would)."""
    if isinstance(esp.store, DirStore):
        (esp.store.root / "loader" / "entries" / name).write_bytes(data)
        return
    assert isinstance(esp.store, MtoolsStore)
    source = esp.tmp_path / "raw.conf"
    source.write_bytes(data)
    run(
        ["mcopy", "-i", esp.store.drive, str(source), f"::/loader/entries/{name}"],
        env={"MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"},
    )


def clean_snapshot(esp: Esp) -> tuple[list[str], dict[str, bytes]]:
    names = esp.entries()
    return names, {
        n: esp.store.read(f"loader/entries/{n}") for n in names if "[" not in n and n.isprintable()
    }


def foreign_names(medium: str) -> list[str]:
    names = ["debian[1].conf", "x]y.conf"]  # legal on FAT, globbing characters to mtools
    if medium == "dir":  # FAT refuses these; a /boot (XBOOTLDR) on ext4 does not
        names += ["a*b.conf", "q?.conf", "b\\s.conf", "ctl\x01x.conf", "tab\tx.conf"]
        names += ["esc\x1b[31m.conf", "del\x7f.conf", "nl\nx.conf"]
    return names


@pytest.mark.parametrize("medium", ["dir", "mtools"])
def test_a_foreign_entry_with_an_unusable_name_is_ignored(medium: str, tmp_path: Path) -> None:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    esp = Esp(esp_store(disk, medium, tmp_path / "mnt"), disk.path, tmp_path)
    a, b = control_slots(esp)
    esp.put("updater-USR-A.conf", entry_text(a))
    for name in foreign_names(medium):
        # sorts first if it were read: the agent cannot know, and says so in the log
        put_raw(esp, name, b"title Debian\nsort-key aaa\nlinux /vmlinuz\n")
    control = esp.control()
    with capture_logs() as logs:
        assert [s.flags for s in control.slots()] == [GOOD, BAD]
        assert control.primary() == a
        control.make_primary(b)
    assert control.primary() == b
    ignored = [e for e in logs if e["event"] == "boot_entry_ignored"]
    assert {e["reason"] for e in ignored} == {"unusable file name"}
    for name in foreign_names(medium):
        assert any(repr(name) in e["entry"] for e in ignored), name
        assert name in esp.entries()  # left alone


@pytest.mark.parametrize("medium", ["dir", "mtools"])
def test_our_entry_with_an_unusable_name_is_boot_entry_invalid(medium: str, tmp_path: Path) -> None:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    esp = Esp(esp_store(disk, medium, tmp_path / "mnt"), disk.path, tmp_path)
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a))
    put_raw(esp, "updater-USR-B[1].conf", entry_text(a).encode())
    before = clean_snapshot(esp)
    control = esp.control()
    for call in (control.slots, control.primary, lambda: control.make_primary(a)):
        with pytest.raises(DiskError) as err:
            call()
        assert err.value.kind == "boot_entry_invalid"
        assert "'updater-USR-B[1].conf'" in err.value.message
    assert clean_snapshot(esp) == before


@pytest.mark.parametrize(
    "version", ["²", "٣", "1²", "\U0001d7d9", "1" * 19, "0x1", "-1", "+1", "1_0", "1.0"]
)
def test_our_entry_with_a_version_that_is_no_whole_number(esp: Esp, version: str) -> None:
    a = control_slots(esp)[0]
    esp.put("updater-USR-A.conf", entry_text(a, 1, version=version))
    for verb in ("make_primary", "mark_good", "mark_bad"):
        err = refused(esp, verb, 0)
        assert err.kind == "boot_entry_invalid"
        assert "is not a whole number" in err.message
    with pytest.raises(DiskError):
        esp.control().slots()


@pytest.mark.parametrize("version", ["²", "٣", "1" * 5000, "\u202e", "a-b~c^d"])
def test_a_foreign_entry_with_any_version_is_ordered(dir_esp: Esp, version: str) -> None:
    a, b = control_slots(dir_esp)
    dir_esp.put("updater-USR-A.conf", entry_text(a))
    dir_esp.put("other.conf", f"title X\nsort-key zzz\nversion {version}\nlinux /vmlinuz\n")
    dir_esp.put("other2.conf", f"title Y\nsort-key zzz\nversion 1{version}\nlinux /vmlinuz\n")
    control = dir_esp.control()
    assert control.primary() == a
    control.make_primary(b)
    assert control.primary() == b


def test_an_oversized_entry_is_bounded(dir_esp: Esp) -> None:
    a, b = control_slots(dir_esp)
    big = b"title big\n" + b"#" * sdboot.MAX_ENTRY_BYTES
    dir_esp.put("updater-USR-A.conf", entry_text(a))
    dir_esp.put("huge-foreign.conf", big)
    control = dir_esp.control()
    with capture_logs() as logs:
        assert control.primary() == a
    assert [e["reason"] for e in logs if e["event"] == "boot_entry_ignored"] == [
        f"{dir_esp.tmp_path}/mnt/loader/entries/huge-foreign.conf: larger than "
        f"{sdboot.MAX_ENTRY_BYTES} bytes"
    ]
    dir_esp.put("updater-USR-B+1-0.conf", entry_text(b, 2).encode() + big)
    err = refused(dir_esp, "mark_good", 0)
    assert err.kind == "boot_entry_invalid" and "larger than" in err.message
    dir_esp.store.remove("loader/entries/updater-USR-B+1-0.conf")
    dir_esp.store.write("loader/loader.conf", big)
    err = refused(dir_esp, "mark_good", 0)
    assert err.kind == "esp_invalid" and "loader.conf" in err.message


def test_a_directory_named_like_a_foreign_entry_is_ignored(dir_esp: Esp) -> None:
    a = control_slots(dir_esp)[0]
    dir_esp.put("updater-USR-A.conf", entry_text(a))
    (dir_esp.tmp_path / "mnt" / "loader" / "entries" / "dir.conf").mkdir()
    assert dir_esp.control().primary() == a


def test_an_oversized_loader_entry_selected_variable_is_no_hint(dir_esp: Esp) -> None:
    b = control_slots(dir_esp)[1]
    var = dir_esp.efivars / f"LoaderEntrySelected-{sdboot.LOADER_VENDOR_GUID}"
    var.write_bytes(sdboot.efivar_bytes("updater-USR-B.conf" + "x" * sdboot.MAX_EFIVAR_BYTES))
    dir_esp.cmdline.write_text("quiet\n")
    with pytest.raises(DiskError) as err:
        dir_esp.control().booted()
    assert err.value.kind == "booted_unknown"
    var.write_bytes(sdboot.efivar_bytes("updater-USR-B.conf"))
    assert dir_esp.control().booted() == b
