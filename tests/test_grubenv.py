"""grub-env backend: the environment block (cross-checked with grub-editenv), the RAUC-style
decisions (table tests), the backend on a directory and a FAT image, every broken input
refused before anything is written, and the shipped GRUB fragment run by a real GRUB."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from uuid import UUID

import pytest
from structlog.testing import capture_logs

from devtools.espimage import esp_store, format_fat, make_esp_disk
from partitions import grubenv
from partitions.bootcontrol import BootControl, Slot, SlotFlags
from partitions.booted import BootedSlotFinder
from partitions.filestore import DirStore, FileStore
from partitions.grubenv import (
    BLOCK_SIZE,
    EnvProblem,
    GrubEnvControl,
    GrubEnvFormatError,
    GrubState,
    SlotVars,
    format_env,
    new_env_block,
    parse_env,
    read_state,
)
from tests.fuzzing import parse_or_typed_error
from updater.errors import CommandError, DiskError, RefusedError, UpdaterError
from updater.run import Completed, run

MiB = 1024 * 1024
HEADER = b"# GRUB Environment Block\n"
BAD = SlotFlags(0, 0, False)
ONLY = SlotFlags(1, 1, True)  # the one bootable slot

needs_editenv = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="needs grub-editenv (grub2-common)"
)


def block(body: bytes, size: int = BLOCK_SIZE) -> bytes:
    return body + b"#" * (size - len(body))


def editenv(path: Path, *args: str) -> str:
    return run(["grub-editenv", str(path), *args]).text


# ---- the block ------------------------------------------------------------------------------


@needs_editenv
def test_a_new_block_is_what_grub_editenv_creates(tmp_path: Path) -> None:
    editenv(tmp_path / "env", "create")
    assert (tmp_path / "env").read_bytes() == new_env_block()
    assert parse_env(new_env_block()) == {}


VARIABLE_SETS = [
    {},
    {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"},
    {"ORDER": "B A", "A_PARTUUID": str(UUID(int=1)), "B_PARTUUID": str(UUID(int=2))},
    {"x": "back\\slash", "nl": "two\nlines", "eq": "a=b=c", "sp": " spaced ", "empty": ""},
    {"hash": "#not a comment", "utf8": "gr\u00fc\u00dfe"},
]


@needs_editenv
@pytest.mark.parametrize("variables", VARIABLE_SETS)
def test_format_and_parse_agree_with_grub_editenv(
    tmp_path: Path, variables: dict[str, str]
) -> None:
    ours = tmp_path / "ours"
    ours.write_bytes(format_env(variables))
    theirs = tmp_path / "theirs"
    editenv(theirs, "create")
    if variables:
        editenv(theirs, "set", *(f"{k}={v}" for k, v in variables.items()))
    assert ours.read_bytes() == theirs.read_bytes()  # byte for byte
    assert parse_env(theirs.read_bytes()) == variables
    # and grub-editenv reads ours the same way (its list prints escapes as the raw text)
    listed = editenv(ours, "list")
    assert listed == "".join(f"{k}={v}\n" for k, v in variables.items())


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (block(HEADER, 1023), "is 1023 bytes"),
        (block(HEADER, 1025), "is 1025 bytes"),
        (block(HEADER, 2048), "is 2048 bytes"),
        (b"", "is 0 bytes"),
        (block(b"# GRUB Environment Blocks\n"), "does not start with"),
        (block(b"garbage"), "does not start with"),
        (block(HEADER + b"A_OK=1\n\0\n"), "NUL byte"),
        (block(HEADER + b"A_OK=\xff\n"), "not UTF-8"),
        (block(HEADER + b"A_OK=1\nnoequals\n"), "no name=value"),
        (block(HEADER + b"=1\n"), "no name=value"),
        (block(HEADER + b"A_OK=1\nA_OK=0\n"), "sets A_OK twice"),
        (HEADER + b"#" * (BLOCK_SIZE - len(HEADER) - 1) + b"\\", "middle of an escape"),
    ],
)
def test_corrupt_blocks(data: bytes, problem: str) -> None:
    with pytest.raises(GrubEnvFormatError) as err:
        parse_env(data)
    assert problem in str(err.value)


def test_format_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        format_env({"big": "x" * BLOCK_SIZE})
    for name in ("", "a=b", "a\nb", "#a"):
        with pytest.raises(ValueError):
            format_env({name: "1"})


# ---- the slot state and the decisions -------------------------------------------------------

NAMES = ("A", "B")


def S(order: str, a: tuple[int, int], b: tuple[int, int]) -> GrubState:
    return GrubState(
        tuple(order.split()),
        {"A": SlotVars(bool(a[0]), bool(a[1])), "B": SlotVars(bool(b[0]), bool(b[1]))},
    )


@pytest.mark.parametrize(
    ("variables", "state"),
    [
        (
            {},
            GrubState(
                ("A", "B"), {"A": SlotVars(False, False), "B": SlotVars(False, False)}, False
            ),
        ),
        ({"ORDER": "B A", "A_OK": "1", "B_OK": "1", "B_TRY": "1"}, S("B A", (1, 0), (1, 1))),
        ({"ORDER": "B", "A_OK": "1", "A_TRY": "0"}, S("B", (1, 0), (0, 0))),
        ({"ORDER": "", "A_OK": "1"}, S("", (1, 0), (0, 0))),
        ({"ORDER": "  A   B ", "X": "ignored"}, S("A B", (0, 0), (0, 0))),
    ],
)
def test_read_state(variables: dict[str, str], state: GrubState) -> None:
    assert read_state(variables, NAMES) == state


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"ORDER": "A C"}, "names C"),
        ({"ORDER": "a b"}, "names a, b"),
        ({"ORDER": "A A B"}, "twice"),
        ({"A_OK": "yes"}, "A_OK='yes'"),
        ({"B_TRY": "2"}, "B_TRY='2'"),
        ({"B_TRY": ""}, "B_TRY=''"),
    ],
)
def test_read_state_refuses(variables: dict[str, str], problem: str) -> None:
    with pytest.raises(EnvProblem) as err:
        read_state(variables, NAMES)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("state", "flags", "primary"),
    [
        (S("A B", (1, 0), (0, 0)), {"A": ONLY, "B": BAD}, "A"),
        (S("B A", (1, 0), (1, 0)), {"A": SlotFlags(1, 1, True), "B": SlotFlags(2, 1, True)}, "B"),
        (S("B A", (1, 0), (1, 1)), {"A": ONLY, "B": BAD}, "A"),  # B on trial
        (S("B A", (1, 1), (1, 0)), {"A": BAD, "B": ONLY}, "B"),  # A on trial (every boot)
        (S("B A", (1, 1), (1, 1)), {"A": BAD, "B": BAD}, None),  # GRUB: last resort B
        (S("A B", (0, 0), (0, 0)), {"A": BAD, "B": BAD}, None),
        (S("B", (1, 0), (1, 0)), {"A": SlotFlags(0, 0, True), "B": ONLY}, "B"),  # A not in ORDER
        (S("A B", (0, 1), (1, 0)), {"A": BAD, "B": ONLY}, "B"),
    ],
)
def test_flags_and_primary(
    state: GrubState, flags: dict[str, SlotFlags], primary: str | None
) -> None:
    assert grubenv.slot_flags(state) == flags
    assert grubenv.primary_name(state) == primary


@pytest.mark.parametrize(
    ("state", "name", "good", "bad", "made_primary"),
    [
        (
            S("A B", (1, 0), (0, 0)),
            "B",
            {"B_OK": "1", "B_TRY": "0", "ORDER": "A B"},
            {"B_OK": "0", "B_TRY": "0", "ORDER": "A B"},
            {"B_OK": "1", "B_TRY": "0", "ORDER": "B A"},
        ),
        (
            S("B", (1, 1), (1, 0)),  # A missing from ORDER: every change puts it back
            "A",
            {"A_OK": "1", "A_TRY": "0", "ORDER": "B A"},
            {"A_OK": "0", "A_TRY": "0", "ORDER": "B A"},
            {"A_OK": "1", "A_TRY": "0", "ORDER": "A B"},
        ),
    ],
)
def test_decisions(
    state: GrubState,
    name: str,
    good: dict[str, str],
    bad: dict[str, str],
    made_primary: dict[str, str],
) -> None:
    assert grubenv.decide_mark_good(state, name) == good
    assert grubenv.decide_mark_bad(state, name) == bad
    assert grubenv.decide_make_primary(state, name) == made_primary


@pytest.mark.parametrize(
    "state",
    [
        S("A B", (0, 0), (1, 0)),  # B is the last slot with OK=1
        S("A B", (0, 0), (1, 1)),  # ... even on trial: GRUB's last resort boots it
        S("B", (1, 0), (1, 0)),  # A is OK but not in ORDER: GRUB never boots it
    ],
)
def test_mark_bad_of_the_last_slot_grub_can_boot_is_refused(state: GrubState) -> None:
    with pytest.raises(RefusedError) as err:
        grubenv.decide_mark_bad(state, "B", "/esp/grub/grubenv")
    assert err.value.kind == "last_bootable_slot"
    assert "/esp/grub/grubenv" in err.value.message


def test_changes() -> None:
    assert grubenv.changes({"A_OK": "1", "ORDER": "A B"}, {"A_OK": "1", "A_TRY": "0"}) == {
        "A_TRY": "0"
    }


# ---- the backend ----------------------------------------------------------------------------


class Env:
    """A grubenv in a store, the disk with the slots, and the backend over them."""

    def __init__(self, store: FileStore, disk: Path, tmp_path: Path) -> None:
        self.store, self.disk, self.tmp_path = store, disk, tmp_path
        self.cmdline = tmp_path / "cmdline"
        store.makedirs("grub")

    def create(self) -> None:
        self.store.write("grub/grubenv", new_env_block())

    def control(self, **kwargs: object) -> GrubEnvControl:
        return GrubEnvControl(
            self.store,
            self.disk,
            finder=BootedSlotFinder(
                self.cmdline, self.tmp_path / "proc", self.tmp_path / "sys", self.tmp_path / "dev"
            ),
            **kwargs,  # type: ignore[arg-type]
        )

    def variables(self) -> dict[str, str]:
        return parse_env(self.store.read("grub/grubenv"))

    def bytes(self) -> bytes | None:
        return self.store.read("grub/grubenv") if self.store.exists("grub/grubenv") else None

    def boot(self, name: str) -> None:
        """What the GRUB fragment does when it picks ``name``: <name>_TRY=1, save_env."""
        copy = self.tmp_path / "grubenv.boot"
        copy.write_bytes(self.store.read("grub/grubenv"))
        editenv(copy, "set", f"{name}_TRY=1")
        self.store.write("grub/grubenv", copy.read_bytes())


@pytest.fixture(params=["dir", "mtools"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    yield Env(esp_store(disk, request.param, tmp_path / "mnt"), disk.path, tmp_path)


@pytest.fixture
def dir_env(tmp_path: Path) -> Env:
    disk = make_esp_disk(tmp_path / "disk.img", slot_size=MiB)
    return Env(esp_store(disk, "dir", tmp_path / "mnt"), disk.path, tmp_path)


def slots(control: GrubEnvControl) -> tuple[Slot, Slot]:
    a, b = (s.slot for s in control.slots())
    return a, b


@needs_editenv
def test_update_cycle(env: Env) -> None:
    env.create()
    control: BootControl = env.control()
    assert isinstance(control, GrubEnvControl)
    a, b = slots(control)
    assert [s.flags for s in control.slots()] == [BAD, BAD] and control.primary() is None
    control.mark_good(a)  # provisioning, on a block fresh from `grub-editenv create`
    assert env.variables() == {
        "A_OK": "1",
        "A_TRY": "0",
        "ORDER": "A B",
        "A_PARTUUID": str(a.part_uuid),
        "B_PARTUUID": str(b.part_uuid),
    }
    assert control.primary() == a
    control.mark_bad(b)  # before writing the image
    control.make_primary(b)
    assert env.variables()["ORDER"] == "B A"
    assert control.primary() == b
    assert control.flags(b) == SlotFlags(2, 1, True)  # RAUC: staged reads like blessed
    assert control.flags(a) == SlotFlags(1, 1, True)
    env.boot("B")  # the fragment picked B
    assert control.flags(b) == BAD and control.primary() == a
    control.mark_good(b)
    assert control.flags(b) == SlotFlags(2, 1, True) and control.primary() == b
    env.boot("B")  # every boot is a trial until blessed (as with RAUC)
    control.mark_good(b)
    control.mark_bad(b)
    assert env.variables()["B_OK"] == "0" and control.primary() == a
    with pytest.raises(RefusedError):
        control.mark_bad(a)  # the last one GRUB could boot


@needs_editenv
def test_each_verb_writes_once_and_only_what_changes(dir_env: Env) -> None:
    dir_env.create()
    control = dir_env.control()
    a, b = slots(control)
    control.mark_good(a)
    before = dir_env.bytes()
    with capture_logs() as logs:
        control.mark_good(a)  # already good: nothing written
    assert dir_env.bytes() == before
    assert next(e for e in logs if e["event"] == "slot_marked_good")["changed"] == {}
    with capture_logs() as logs:
        control.make_primary(b)
    made = next(e for e in logs if e["event"] == "slot_made_primary")
    assert made["changed"] == {"B_OK": "1", "B_TRY": "0", "ORDER": "B A"}


class RecordingRunner:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: object) -> Completed:
        self.calls.append(list(argv))
        return run(argv, **kwargs)  # type: ignore[arg-type]


@needs_editenv
def test_changes_are_made_by_grub_editenv_on_a_copy(dir_env: Env) -> None:
    dir_env.create()
    runner = RecordingRunner()
    control = dir_env.control(runner=runner)
    a, _ = slots(control)
    control.mark_good(a)
    assert len(runner.calls) == 1
    argv = runner.calls[0]
    assert argv[0] == "grub-editenv" and argv[2] == "set"
    assert not argv[1].startswith(str(dir_env.tmp_path / "mnt"))  # a private copy
    assert sorted(argv[3:]) == sorted(f"{k}={v}" for k, v in dir_env.variables().items())


def test_missing_grub_editenv_is_named(dir_env: Env) -> None:
    dir_env.create()

    def missing(argv: Sequence[str], **_kwargs: object) -> Completed:
        raise CommandError(
            "command_missing", "grub-editenv: not installed", argv=list(argv), returncode=None
        )

    control = dir_env.control(runner=missing)
    before = dir_env.bytes()
    with pytest.raises(DiskError) as err:
        control.mark_good(slots(control)[0])
    assert (
        err.value.kind == "grubenv_invalid" and err.value.hint and "grub2-common" in err.value.hint
    )
    assert dir_env.bytes() == before


def test_booted_from_the_partition_on_the_command_line(dir_env: Env) -> None:
    control = dir_env.control()
    _, b = control_slots(dir_env)
    dir_env.cmdline.write_text(f"mount.usr=PARTUUID={b.part_uuid} updater.slot=B ro\n")
    assert control.booted() == b


@pytest.mark.parametrize("param", ["updater.slot", "rauc.slot"])
def test_booted_from_the_slot_name_on_the_command_line(dir_env: Env, param: str) -> None:
    control = dir_env.control()
    a, _ = control_slots(dir_env)
    dir_env.cmdline.write_text(f"root=/dev/mapper/usr {param}=A quiet\n")
    assert control.booted() == a
    dir_env.cmdline.write_text(f"{param}=C\n")
    with pytest.raises(DiskError) as err:
        control.booted()
    assert err.value.kind == "booted_unknown"


def test_configured_names(dir_env: Env) -> None:
    dir_env.store.write("grub/grubenv", format_env({"ORDER": "system1 system0", "system1_OK": "1"}))
    control = dir_env.control(names=("system0", "system1"))
    a, b = slots(control)
    assert control.primary() == b
    dir_env.cmdline.write_text("updater.slot=system0\n")
    assert control.booted() == a


def test_constructor_checks(tmp_path: Path) -> None:
    store = DirStore(tmp_path)
    for names in (("A",), ("A", "A"), ("A", "B-1"), ("A", "")):
        with pytest.raises(ValueError):
            GrubEnvControl(store, tmp_path / "d", names=names)  # type: ignore[arg-type]


# ---- broken input: a typed error naming the file, nothing written ---------------------------


def refused(env: Env, verb: str, slot: int = 0) -> UpdaterError:
    control = env.control()
    target = slots(control)[slot] if verb != "slots" else None
    before = (env.store.list("grub"), env.bytes())
    with pytest.raises((DiskError, RefusedError)) as err:
        if target is None:
            control.slots()
        else:
            getattr(control, verb)(target)
    assert (env.store.list("grub"), env.bytes()) == before
    return err.value


def control_slots(env: Env) -> tuple[Slot, Slot]:
    from partitions import bootcontrol, gpt  # noqa: PLC0415

    a, b = bootcontrol.find_slots(gpt.read_table(env.disk), env.disk, bootcontrol.DEFAULT_LABELS)
    return a, b


VERBS = ["slots", "mark_good", "mark_bad", "make_primary"]


@pytest.mark.parametrize("verb", VERBS)
def test_a_missing_grubenv(env: Env, verb: str) -> None:
    err = refused_without_slots(env, verb)
    assert err.kind == "grubenv_invalid"
    assert "grub/grubenv: missing" in err.message and err.hint and "grub-editenv" in err.hint


def refused_without_slots(env: Env, verb: str) -> UpdaterError:
    control = env.control()
    target = control_slots(env)[0]
    before = env.store.list("grub")
    with pytest.raises((DiskError, RefusedError)) as err:
        if verb == "slots":
            control.slots()
        else:
            getattr(control, verb)(target)
    assert env.store.list("grub") == before
    return err.value


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (block(HEADER, 2048), "larger than 1024 bytes"),
        (block(HEADER, 1025), "larger than 1024 bytes"),
        (block(HEADER, 1000), "is 1000 bytes"),
        (b"", "is 0 bytes"),
        (block(HEADER + b"A_OK=\xb2\n"), "not UTF-8"),
        (block(HEADER + b"A_OK=\xc2\xb2\n"), "A_OK='\xb2'"),
        (block(HEADER + b"A_OK=1\x00\n"), "NUL byte"),
        (block(HEADER + b"A_OK=1\nA_OK=1\n"), "sets A_OK twice"),
        (HEADER + b"X=" + b"#" * (BLOCK_SIZE - len(HEADER) - 3) + b"\\", "middle of an escape"),
        (block(HEADER + b"ORDER=A\xe2\x80\xa8B\n"), "names"),  # a Unicode line separator
        (block(b"#GRUB Environment Block\n"), "does not start with"),
        (block(HEADER + b"ORDER=A B\nrubbish\n"), "no name=value"),
        (block(HEADER + b"ORDER=A C\n"), "names C"),
        (block(HEADER + b"A_OK=true\n"), "A_OK='true'"),
    ],
)
@pytest.mark.parametrize("verb", VERBS)
def test_a_corrupt_grubenv(env: Env, data: bytes, problem: str, verb: str) -> None:
    env.store.write("grub/grubenv", data)
    err = refused_without_slots(env, verb)
    assert err.kind == "grubenv_invalid"
    assert "grub/grubenv" in err.message and problem in err.message
    assert env.store.read("grub/grubenv") == data


@needs_editenv
def test_both_slots_bad_is_refused(env: Env) -> None:
    env.store.write(
        "grub/grubenv", format_env({"ORDER": "A B", "A_OK": "0", "B_OK": "1", "B_TRY": "1"})
    )
    err = refused(env, "mark_bad", 1)
    assert isinstance(err, RefusedError) and err.kind == "last_bootable_slot"
    assert "grub/grubenv" in err.message
    control = env.control()  # reading such a block is fine: nothing is bootable
    assert control.primary() is None
    control.mark_good(control_slots(env)[0])  # and a good slot repairs it
    assert control.primary() == control_slots(env)[0]


@needs_editenv
def test_a_stale_partuuid_is_reported_and_rewritten(dir_env: Env) -> None:
    dir_env.store.write("grub/grubenv", format_env({"A_OK": "1", "A_PARTUUID": str(UUID(int=7))}))
    control = dir_env.control()
    a, _ = slots(control)
    with capture_logs() as logs:
        control.slots()
    assert any(e["event"] == "grubenv_partuuid_stale" for e in logs)
    control.mark_good(a)
    assert dir_env.variables()["A_PARTUUID"] == str(a.part_uuid)


def test_a_slot_of_another_disk_is_refused(dir_env: Env) -> None:
    dir_env.create()
    other = Slot("USR-B", 9, UUID(int=9), Path("/other"), 0, 0)
    control = dir_env.control()
    for verb in (control.mark_good, control.mark_bad, control.make_primary, control.flags):
        with pytest.raises(DiskError) as err:
            verb(other)
        assert err.value.kind == "slot_not_found"
    assert dir_env.bytes() == new_env_block()


# ---- the shipped fragment, run by GRUB 2 under QEMU -----------------------------------------

FRAGMENT = Path(__file__).resolve().parent.parent / "dist" / "grub" / "updater.cfg"
GRUB_I386 = Path("/usr/lib/grub/i386-pc")
UA, UB = UUID(int=0xA), UUID(int=0xB)

# (environment, the slot GRUB boots, what it leaves in the environment)
FRAGMENT_CASES: list[tuple[Mapping[str, str], str | None, Mapping[str, str]]] = [
    ({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0"}, "A", {"A_TRY": "1"}),
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"}, "B", {"B_TRY": "1"}),
    # B's trial was not blessed: fall back to A
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}, "A", {"A_TRY": "1"}),
    # a missing TRY reads as 0, as the agent reads it
    ({"ORDER": "B A", "A_OK": "1", "B_OK": "1"}, "B", {"B_TRY": "1"}),
    # nothing qualifies (a power cut before mark-good): the first OK slot, env untouched
    ({"ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1", "B_TRY": "1"}, "B", {}),
    # nothing has OK=1: it stops at the GRUB prompt, saying why
    ({"ORDER": "A B", "A_OK": "0", "B_OK": "0"}, None, {}),
    # other slot names, as configured
    ({"ORDER": "s1 s0", "s0_OK": "1", "s1_OK": "0"}, "s0", {"s0_TRY": "1"}),
]


@pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None
    or shutil.which("grub-mkimage") is None
    or not (GRUB_I386 / "boot.img").exists(),
    reason="needs qemu-system-x86 and grub-pc-bin",
)
def test_the_grub_fragment_boots_what_the_agent_says(tmp_path: Path) -> None:
    """One BIOS boot of GRUB runs the fragment on each environment in turn; the kernel is
    missing on purpose, so each case ends after GRUB chose and saved, and the next one runs."""
    image = tmp_path / "grub.img"
    with open(image, "wb") as f:
        f.truncate(24 * MiB)
    run(["sfdisk", "-q", str(image)], input=b"label: dos\nstart=2048, type=c\n")
    esp = format_fat(image, MiB, 23 * MiB, volume="BOOT")
    core = tmp_path / "core.img"
    modules = (
        "biosdisk part_msdos fat normal configfile loadenv test eval echo true halt serial "
        "terminal linux"
    )
    run(
        [
            "grub-mkimage",
            "-O",
            "i386-pc",
            "-o",
            str(core),
            "-p",
            "(hd0,msdos1)/grub",
            *modules.split(),
        ]
    )
    with open(image, "r+b") as f:  # boot.img's code (not its partition table), then core.img
        f.write((GRUB_I386 / "boot.img").read_bytes()[:440])
        f.seek(512)
        f.write(core.read_bytes())
    esp.makedirs("grub")
    esp.write("grub/updater.cfg", FRAGMENT.read_bytes())
    names = sorted({k.split("_")[0] for env, _, _ in FRAGMENT_CASES for k in env if "_" in k})
    cases = []
    for i, (variables, _, _) in enumerate(FRAGMENT_CASES):
        parts = {f"{n}_PARTUUID": str(UA if n in ("A", "s0") else UB) for n in names}
        esp.write(f"grub/env{i}", format_env({**variables, **parts}))
        unset = "\n".join(f"  unset {n}_{v}" for n in names for v in ("OK", "TRY", "PARTUUID"))
        cases.append(
            f'echo "CASE {i}"\n  unset ORDER\n{unset}\n  unset updater_partuuid\n'
            f'  set updater_slot=""\n  set updater_grubenv="(hd0,msdos1)/grub/env{i}"\n'
            "  source /grub/updater.cfg\n"
            f'  echo "CHOSE {i} ${{updater_slot}} '
            '${updater_usr_param}=PARTUUID=${updater_partuuid}"'
        )
    esp.write(
        "grub/grub.cfg",
        (
            "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
            'set updater_linux="/no-kernel-here"\n'
            + "\n".join(cases)
            + '\necho "ALL CASES DONE"\nhalt\n'
        ).encode(),
    )
    log = tmp_path / "serial.log"
    run(
        [
            "qemu-system-x86_64",
            "-m",
            "128",
            "-drive",
            f"file={image},format=raw",
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{log}",
        ],
        timeout=60,
    )
    text = log.read_bytes().replace(b"\r", b"").decode("utf-8", "replace")
    assert "ALL CASES DONE" in text, text[-2000:]
    for i, (variables, expected, saved) in enumerate(FRAGMENT_CASES):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"CHOSE {i} "))
        chosen = line.split()[2] if len(line.split()) > 3 else None
        assert chosen == expected, (i, line)
        if expected is not None:
            uuid = UA if expected in ("A", "s0") else UB
            assert line.endswith(f"mount.usr=PARTUUID={uuid}"), line
        after = parse_env(esp.read(f"grub/env{i}"))
        assert {k: v for k, v in after.items() if not k.endswith("_PARTUUID")} == {
            **variables,
            **saved,
        }
        # the agent reading the same block agrees, where GRUB did not fall to its last resort
        if set(variables) <= {"ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY"}:
            agent = grubenv.primary_name(read_state(variables, NAMES))
            assert agent == expected or (agent is None and not saved), (i, agent, expected)
    assert "no slot in ORDER (A B) has OK=1" in text
    assert "booting B again (last resort)" in text


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="needs grub2-common")
def test_the_grub_fragment_parses() -> None:
    done = run(["grub-script-check", str(FRAGMENT)], check=False)
    assert done.returncode == 0, done.stderr.decode()


def test_a_huge_grubenv_is_read_bounded(dir_env: Env) -> None:
    """A 64 MiB file where the 1024-byte block should be: refused after reading 1025 bytes."""
    path = dir_env.tmp_path / "mnt" / "grub" / "grubenv"
    with path.open("wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    control = dir_env.control()
    result = parse_or_typed_error(control.read_variables, max_bytes=1024 * 1024)
    assert isinstance(result, DiskError) and result.kind == "grubenv_invalid"
    assert "larger than 1024 bytes" in result.message
