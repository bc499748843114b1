"""Every external program the code runs has an install step.

A tool installed by hand on a developer's machine and never added to
``scripts/tools.list`` passes every test there and fails on a fresh one. This
test reads the source of the agent, its tests, demos and benchmarks, finds
every program they start (argv lists handed to the runner or to subprocess,
``shutil.which`` look-ups, the wrappers that take a program name) and asserts
each is listed, with its Debian package, in ``scripts/tools.list``.

A call site whose program cannot be read from the source (argv built at run
time) must be declared in ``DYNAMIC`` with the programs it can run; a stale
declaration fails too. ``conftest.py`` checks the same at run time with an
audit hook: every process the test session starts is listed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.toolslist import listed

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("updater", "partitions", "policies", "devtools", "bench", "tests")

# Functions that start a process from an argv list (first positional argument).
SPAWN_ARGV = {"run", "runner", "_runner", "Popen", "check_output", "check_call", "mtools"}
# Functions whose first positional argument is the program itself.
SPAWN_PROGRAM = {"create_subprocess_exec", "_mtools", "sh", "which"}
# ``run`` names many things (asyncio.run, loop.run_*); only these receivers spawn.
RUN_RECEIVERS = {None, "subprocess"}
# Programs that are not Debian packages of ours: the interpreter running the suite.
INTERPRETER = "<python>"
ENTRY_POINT = "<updatectl>"  # the project's own console script, installed into the venv

# Call sites whose argv is built at run time: "path::function" -> the programs
# it can start. Each must still exist (a stale entry fails the test).
DYNAMIC: dict[str, tuple[str, ...]] = {
    "updater/health.py::_run_check": (),  # the admin's health.d executables
    "tests/test_dbus_api.py::python_for": ("python3.11",),  # /usr/bin/python3.X, X of ours
    "tests/test_filestore.py::killed": ("mmd", "mcopy", "mren", "mdir"),  # MtoolsStore's runner
    "devtools/etcd.py::_argv": ("etcd", "ip"),  # etcd, or etcd in a namespace (ip netns exec)
}


@dataclass(frozen=True)
class Site:
    where: str  # path::function
    line: int
    programs: frozenset[str] | None  # None: not readable from the source


def _callee(node: ast.Call) -> tuple[str | None, str | None]:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id, None
    if isinstance(f, ast.Attribute):
        recv = f.value
        if isinstance(recv, ast.Name):
            return f.attr, recv.id
        if isinstance(recv, ast.Attribute):
            return f.attr, recv.attr
        return f.attr, "?"
    return None, None


class _Scanner(ast.NodeVisitor):
    """Finds the call sites that start programs in one module, and what they start."""

    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.stack: list[ast.AST] = [tree]
        self.sites: list[Site] = []
        self.imported = {
            a.asname or a.name: node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            for a in node.names
        }
        self.functions = {
            n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }

    def _where(self) -> str:
        scope = self.stack[-1]
        name = getattr(scope, "name", "<module>")
        return f"{self.path}::{name}"

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def _assigned(self, name: str) -> list[ast.expr]:
        """What ``name`` is bound to in the enclosing function, else the module."""
        if name.startswith("self."):  # an attribute: its assignments anywhere in the module
            attr = name[len("self.") :]
            return [
                node.value
                for node in ast.walk(self.stack[0])
                if isinstance(node, ast.Assign)
                and any(ast.unparse(t) == f"self.{attr}" for t in node.targets)
            ]
        for scope in reversed(self.stack):
            found = [
                node.value
                for node in ast.walk(scope)
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                and node.value is not None
                and any(
                    isinstance(t, ast.Name) and t.id == name
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                )
            ]
            found += [
                elt
                for node in ast.walk(scope)
                if isinstance(node, (ast.For, ast.comprehension))
                and isinstance(node.target, ast.Name)
                and node.target.id == name
                and isinstance(node.iter, (ast.Tuple, ast.List))
                for elt in node.iter.elts
            ]
            if found:
                return found
        return []

    def _program(self, node: ast.expr, depth: int = 0) -> frozenset[str] | None:
        if depth > 5:
            return None
        text = ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            return frozenset({Path(value).name if value.startswith("/") else value})
        if "sys.executable" in text:
            return frozenset({ENTRY_POINT if "updatectl" in text else INTERPRETER})
        if self._passed_through(node):
            return frozenset()
        if isinstance(node, ast.Name):
            if self.imported.get(node.id) == "devtools.etcd":
                return frozenset({node.id.lower()})  # ETCD, ETCDCTL
            bound = [self._program(v, depth + 1) for v in self._assigned(node.id)]
            if bound and all(b is not None for b in bound):
                return frozenset().union(*(b for b in bound if b is not None))
        return None

    def _argv(self, node: ast.expr, depth: int = 0) -> frozenset[str] | None:
        if depth > 5:
            return None
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Starred):
                return self._argv(first.value, depth + 1)
            return self._program(first)
        if self._passed_through(node):
            return frozenset()  # a wrapper's parameter: its callers are sites of their own
        if isinstance(node, ast.ListComp) and len(node.generators) == 1:
            return self._argv(node.generators[0].iter, depth + 1)  # [str(a) for a in argv]
        if isinstance(node, ast.Name) or (
            isinstance(node, ast.Attribute) and ast.unparse(node).startswith("self.")
        ):
            bound = [self._argv(v, depth + 1) for v in self._assigned(ast.unparse(node))]
            if bound and all(b is not None for b in bound):
                return frozenset().union(*(b for b in bound if b is not None))
            return None
        if isinstance(node, ast.BinOp):  # [..] + [..]
            return self._argv(node.left, depth + 1)
        if isinstance(node, ast.Call):
            name, _ = _callee(node)
            if name is not None and name.endswith("argv") and name in self.functions:
                return frozenset()  # that function's return is a site of its own
        return None

    def _passed_through(self, node: ast.expr) -> bool:
        """``node`` is a parameter of a wrapper whose own callers are scanned."""
        scope = self.stack[-1]
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return False
        wrapper = scope.name in SPAWN_ARGV | SPAWN_PROGRAM | {"__call__"}
        params = {a.arg for a in (*scope.args.posonlyargs, *scope.args.args)}
        if scope.args.vararg is not None:
            params.add(scope.args.vararg.arg)
        return wrapper and isinstance(node, ast.Name) and node.id in params

    def _add(self, node: ast.AST, programs: frozenset[str] | None) -> None:
        self.sites.append(Site(self._where(), getattr(node, "lineno", 0), programs))

    def visit_Return(self, node: ast.Return) -> None:
        scope = self.stack[-1]
        if getattr(scope, "name", "").endswith("argv") and node.value is not None:
            self._add(node, self._argv(node.value))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name, receiver = _callee(node)
        first = node.args[0] if node.args else None
        spawns = name in SPAWN_ARGV or name in SPAWN_PROGRAM
        if name == "run":
            spawns = receiver == "subprocess" or (
                receiver is None and self.imported.get("run") == "updater.run"
            )
        if spawns and first is not None:
            if name in SPAWN_PROGRAM:
                self._add(node, self._program(first))
            else:
                self._add(node, self._argv(first))
        self.generic_visit(node)


def scan() -> Iterator[Site]:
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "tests/test_tools.py":
                continue
            tree = ast.parse(path.read_text(), rel)
            scanner = _Scanner(rel, tree)
            scanner.visit(tree)
            yield from scanner.sites


def test_tools_list_is_well_formed_and_read_by_bootstrap() -> None:
    commands, files = listed()
    assert commands and files
    assert "scripts/tools.list" in (ROOT / "scripts" / "bootstrap.sh").read_text()


def test_every_program_the_code_runs_has_an_install_step() -> None:
    commands, files = listed()
    known = commands | {Path(f).name for f in files} | {INTERPRETER, ENTRY_POINT}
    unlisted: dict[str, str] = {}
    unreadable: list[str] = []
    seen_dynamic: set[str] = set()
    for site in scan():
        if site.programs is None:
            if site.where in DYNAMIC:
                seen_dynamic.add(site.where)
                programs = frozenset(DYNAMIC[site.where])
            else:
                unreadable.append(f"{site.where} (line {site.line})")
                continue
        else:
            programs = site.programs
        for program in programs - known:
            unlisted[program] = f"{site.where} (line {site.line})"
    assert not unlisted, f"programs run but not in scripts/tools.list: {unlisted}"
    assert not unreadable, (
        "these call sites start a program the test cannot read from the source; "
        f"declare what they run in DYNAMIC: {unreadable}"
    )
    stale = set(DYNAMIC) - seen_dynamic
    assert not stale, f"DYNAMIC names call sites that no longer exist: {sorted(stale)}"


def test_the_scan_finds_what_it_should() -> None:
    """The scanner itself: each way of starting a program is seen."""
    source = """
import shutil, subprocess, asyncio
from updater.run import run
TOOL = "frobnicate"
def f(runner):
    run(["alpha", "-x"])
    runner(["beta"], check=False)
    subprocess.Popen(["gamma"])
    shutil.which("delta")
    asyncio.run(main())
    argv = [TOOL, "--flag"]
    runner(argv)
    asyncio.create_subprocess_exec("epsilon")
    runner(built_at_run_time())
    missing = [t for t in ("eta", "theta") if not shutil.which(t)]
def qemu_argv():
    return ["zeta", "-m", "512"]
"""
    tree = ast.parse(source)
    scanner = _Scanner("x.py", tree)
    scanner.visit(tree)
    found = {p for s in scanner.sites if s.programs for p in s.programs}
    assert found == {
        "alpha", "beta", "gamma", "delta", "frobnicate", "epsilon", "zeta", "eta", "theta"
    }  # fmt: skip
    assert [s.where for s in scanner.sites if s.programs is None] == ["x.py::f"]
