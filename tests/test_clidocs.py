"""updatectl(8) and the bash and zsh completions, generated from the parser: every
command and option is in them, the man page says what ``updatectl --help`` says
(rendered by man(1), compared word for word), and the real shells load the
completions the way the .deb installs them (bash-completion's loader, zsh's
compinit) and complete with them."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import completion, manpage
from devtools.clitree import Command, command_tree
from updater.run import run

ROOT = Path(__file__).resolve().parent.parent
TREE = command_tree()
COMMANDS = TREE.walk()
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def words(text: str) -> str:
    return " ".join(text.split())


def help_text(path: tuple[str, ...]) -> str:
    """``updatectl PATH... --help``, as a person runs it."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return run(
        [sys.executable, "-m", "updater.cli", *path, "--help"],
        env={**os.environ, "COLUMNS": "100", "PYTHONPATH": pythonpath},
    ).text


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("man") / "updatectl.8"
    path.write_text(manpage.render("9.9.9"))
    return path


@pytest.fixture(scope="module")
def rendered(page: Path) -> str:
    """The page as man(1) shows it, plain text, every run of blanks one space; groff's
    warnings are errors."""
    result = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        env={**os.environ, "MANWIDTH": "120", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stderr == ""
    plain = subprocess.run(
        ["col", "-b"], input=result.stdout, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return words(plain)


def test_the_tree_has_every_command(rendered: str) -> None:
    names = {c.name for c in COMMANDS}
    for must in ("updatectl check", "updatectl lock status", "updatectl fleetlock serve"):
        assert must in names
    assert len(names) == len(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_man_page_and_help_agree(cmd: Command, rendered: str) -> None:
    """What `updatectl ... --help` prints is in the man page: the usage line, every
    option with its help, every sub-command with its help."""
    text = help_text(cmd.path)
    usage = words(text.split("\n\n")[0].removeprefix("usage:"))
    assert usage in rendered, usage
    flags = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", text))
    # its own options, and those of its sub-commands (their one-line help may name one)
    below = [c for c in COMMANDS if c.path[: len(cmd.path)] == cmd.path]
    known = {f for c in below for o in c.options for f in o.flags}
    assert flags <= known | {"-vv"}, flags - known  # --help names no option the tree lacks
    for o in cmd.options:
        for f in o.flags:
            assert f in rendered
        if o.help and "--help" not in o.flags:
            assert words(o.help) in rendered, o.help
            assert words(o.help) in words(text), o.help
    for sub in cmd.commands:
        assert f"updatectl {' '.join(sub.path)}" in rendered
        assert words(sub.help) in words(text)
        assert words(sub.description or sub.help) in rendered
    if cmd.description and cmd.path:
        assert words(cmd.description) in words(text)


def test_man_page_sections_and_exit_codes(rendered: str, page: Path) -> None:
    head = page.read_text().splitlines()[0]
    assert head.startswith(".TH UPDATECTL 8 ") and "updater 9.9.9" in head
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS"):
        assert f" {section} " in rendered
    assert "7 refused: " in rendered and "users_logged_in" in rendered
    assert "10 lock: bad_argument" in rendered
    assert "updatectl - A/B OS updates" in rendered  # NAME: what whatis/apropos read


@pytest.mark.parametrize(
    ("text", "roff"),
    [
        ("--json", "\\-\\-json"),
        ("a\\b", "a\\eb"),
        (".hidden request", "\\&.hidden request"),
        ("'quote", "\\(aqquote"),  # escaped: no request either
        ('say "x" `y`', "say \\(dqx\\(dq \\(gay\\(ga"),
    ],
)
def test_roff_escapes(text: str, roff: str) -> None:
    assert manpage.roff(text) == roff


# ---- bash ---------------------------------------------------------------------------------------


def completions_bash(tmp_path: Path, cases: list[list[str]]) -> list[list[str]]:
    """COMPREPLY for each command line (the last word is being completed), with the
    script installed where the .deb puts it and loaded by bash-completion on demand."""
    share = tmp_path / "share"
    target = share / "bash-completion" / "completions" / "updatectl"
    target.parent.mkdir(parents=True)
    target.write_text(completion.bash())
    lines = [
        f"source {BASH_COMPLETION}",
        # bash-completion's on-demand loader (2.11: __load_completion, 2.12: _comp_load)
        "if declare -F _comp_load >/dev/null; then _comp_load updatectl;"
        " else __load_completion updatectl; fi",
        "complete -p updatectl",
    ]
    for case in cases:
        quoted = " ".join(shlex.quote(w) for w in case)
        lines.append(
            f"COMP_WORDS=(updatectl {quoted}); COMP_CWORD={len(case)}; COMPREPLY=();"
            ' _updatectl; echo "R:${COMPREPLY[*]}"'
        )
    result = run(
        ["bash", "--norc", "--noprofile", "-c", "\n".join(lines)],
        env={**os.environ, "XDG_DATA_DIRS": str(share)},
    )
    out = result.text.splitlines()
    assert out[0] == "complete -F _updatectl updatectl"
    return [line.removeprefix("R:").split() for line in out[1:]]


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="needs bash-completion")
def test_bash_completes_every_command_and_option(tmp_path: Path) -> None:
    cases: list[list[str]] = []
    expected: list[set[str]] = []
    for c in COMMANDS:
        cases.append([*c.path, "-"])
        expected.append({f for o in c.options for f in o.flags if f.startswith("-")})
        if c.commands:
            cases.append([*c.path, ""])
            expected.append({s.path[-1] for s in c.commands})
    got = completions_bash(tmp_path, cases)
    for case, want, have in zip(cases, expected, got, strict=True):
        assert set(have) == want, case


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="needs bash-completion")
def test_bash_completes_values(tmp_path: Path) -> None:
    (tmp_path / "image.raw").write_text("")
    got = completions_bash(
        tmp_path,
        [
            ["agent", "--log", ""],
            ["release", "--image", f"{tmp_path}/ima"],
            ["--config", "/etc/x.toml", "lo"],  # a global option's value is skipped
            ["-v", "fleet", "un"],
            ["release", "--version", ""],  # a free value: nothing to offer
            ["lock", "status", "--group", "g", "--j"],
            ["nonsense", ""],
        ],
    )
    assert got == [
        ["auto", "journal", "console", "json"],
        [f"{tmp_path}/image.raw"],
        ["lock"],
        ["unblock"],
        [],
        ["--json"],
        [],
    ]


# ---- zsh ----------------------------------------------------------------------------------------


def zsh(script: str, fpath: Path) -> str:
    return run(
        ["zsh", "-f", "-c", f"fpath=({fpath} $fpath)\n{script}"],
        env={**os.environ, "HOME": str(fpath)},
        timeout=60,
    ).text


def test_zsh_loads_the_completion_and_computes_candidates(tmp_path: Path) -> None:
    (tmp_path / "_updatectl").write_text(completion.zsh())
    lines = [
        f"autoload -Uz compinit && compinit -u -d {tmp_path}/.zcompdump",
        'print -r -- "comp:$_comps[updatectl]"',
        f"source {tmp_path}/_updatectl",  # the helpers, without completing
    ]
    cases = [[*c.path, ""] for c in COMMANDS] + [[*c.path, "-"] for c in COMMANDS]
    cases.append(["release", "--kernel", ""])
    for case in cases:
        lines.append(f"__updatectl_complete {' '.join(shlex.quote(w) for w in case)}")
    out = zsh("\n".join(lines), tmp_path).splitlines()
    assert out[0] == "comp:_updatectl"
    results = out[1:]
    n = len(COMMANDS)
    for c, line in zip(COMMANDS, results[:n], strict=True):
        assert line.split()[1:] == [s.path[-1] for s in c.commands], c.name
    for c, line in zip(COMMANDS, results[n : 2 * n], strict=True):
        assert line.split()[1:] == [f for o in c.options for f in o.flags], c.name
    assert results[-1] == "files"


def test_zsh_completes_on_an_interactive_line(tmp_path: Path) -> None:
    """A real interactive zsh (on a pty, zsh/zpty): `updatectl lock se<TAB>` becomes
    `updatectl lock set-max `, which runs."""
    (tmp_path / "_updatectl").write_text(completion.zsh())
    driver = f"""
zmodload zsh/zpty
zpty -b shell 'zsh -f -i'
zpty -w shell 'PS1="> "; fpath=({tmp_path} $fpath); autoload -Uz compinit; \\
compinit -u -d {tmp_path}/.zcompdump; updatectl() {{ print -r -- "ARGS:$*:END" }}'
zpty -w -n shell $'updatectl lock se\\t'
zpty -r -m shell seen '*set-max*' || exit 3
zpty -w shell $'9'
zpty -r -m shell seen '*ARGS:lock set-max 9:END*' || exit 4
print -r -- ran
zpty -d shell
"""
    assert zsh(driver, tmp_path).strip() == "ran"


def test_the_tree_reads_what_help_shows_of_any_parser() -> None:
    """Hidden options stay hidden, %(default)s is expanded, an alias is not a second
    command, a command without help is still one (a parser updatectl may grow into)."""
    p = argparse.ArgumentParser(prog="updatectl", description="d")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    p.add_argument("--tries", type=int, default=3, help="this many (default %(default)s)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("hold", help="stop installs", aliases=["pause"])
    plain = sub.add_parser("skip")
    plain.add_argument("version", metavar="VERSION", help="the version")
    tree = command_tree(p)
    assert [o.flags for o in tree.options] == [("-h", "--help"), ("--tries",)]
    assert tree.options[1].help == "this many (default 3)"
    assert tree.options[1].metavar == "TRIES"
    assert [(c.path, c.help) for c in tree.commands] == [
        (("hold",), "stop installs"),
        (("skip",), ""),
    ]
    assert tree.commands[1].positionals[0].name == "VERSION"
    page = manpage.render("1", tree)
    assert "hidden" not in page and "skip" in page and "pause" not in page
    assert "__updatectl_value" in completion.bash(tree)
