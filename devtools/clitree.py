"""``updatectl``'s commands and options as plain data, read from its argparse parser
(:func:`updater.cli.build_parser`): what the man page (devtools/manpage.py) and the
shell completions (devtools/completion.py) are generated from, so that neither can
drift from ``updatectl --help``.

argparse keeps its sub-commands and actions in attributes it does not document
(``_actions``, ``_SubParsersAction.choices`` and ``_choices_actions``); they
have been stable since Python 3.2, and this is the one place that reads them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from updater.cli import build_parser


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]  # "-v", "--verbose"
    help: str
    metavar: str | None  # None: a switch, takes no value
    choices: tuple[str, ...] = ()
    path: bool = False  # its value is a file name


@dataclass(frozen=True)
class Positional:
    name: str  # as --help shows it (its metavar)
    help: str
    optional: bool  # nargs="?"


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () for updatectl itself, ("lock", "status")...
    help: str  # the one line the parent's --help shows
    description: str  # its own --help's ("" when it has none)
    usage: str  # as `updatectl ... --help` prints it, without "usage: "
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    commands: tuple[Command, ...]

    @property
    def name(self) -> str:
        return " ".join(("updatectl", *self.path))

    def walk(self) -> list[Command]:
        """This command and every command under it, depth first, in --help's order."""
        out = [self]
        for c in self.commands:
            out.extend(c.walk())
        return out


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    """The help as --help prints it: ``%(default)s`` and friends expanded."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = parser.prog
    return text % params


def _option(action: argparse.Action, parser: argparse.ArgumentParser) -> Option:
    takes_value = action.nargs != 0
    metavar: str | None = None
    if takes_value:
        mv = action.metavar if action.metavar is not None else action.dest.upper()
        metavar = mv if isinstance(mv, str) else " ".join(mv)
    choices = tuple(str(c) for c in action.choices) if action.choices else ()
    if choices and action.metavar is None:
        metavar = "{" + ",".join(choices) + "}"
    return Option(
        flags=tuple(action.option_strings),
        help=_help(action, parser),
        metavar=metavar,
        choices=choices,
        path=action.type is Path,
    )


def _usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip()
    return " ".join(text.removeprefix("usage:").split())


def command_tree(
    parser: argparse.ArgumentParser | None = None,
    path: tuple[str, ...] = (),
    help_: str = "",
) -> Command:
    """The tree of ``parser`` (default: updatectl's)."""
    parser = parser or build_parser()
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue  # hidden from --help: hidden here too
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue  # an alias of a command listed already
                seen.add(id(sub))
                commands.append(command_tree(sub, (*path, name), helps.get(name, "")))
        elif action.option_strings:
            options.append(_option(action, parser))
        else:
            mv = action.metavar if isinstance(action.metavar, str) else action.dest
            positionals.append(Positional(mv, _help(action, parser), action.nargs in ("?", "*")))
    return Command(
        path=path,
        help=help_ or (parser.description or ""),
        description=parser.description or "",
        usage=_usage(parser),
        options=tuple(options),
        positionals=tuple(positionals),
        commands=tuple(commands),
    )
