"""Architecture rules: partitions/ and policies/ use only updater's leaf modules,
the update core is layered (pure decisions, slots, installer, updater), and no
module imports itself back through others (no import cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("updater", "partitions", "policies")
LEAVES = {
    "updater.errors",
    "updater.run",
    "updater.clock",
    "updater.fsutil",
    "updater.versions",
    "updater.urls",
    "updater.jsonutil",
    "updater.httpbody",
}

# The update core, bottom up. The decisions are pure: they name data types and
# nothing that reaches the host. The slots need no update server, the installer
# is handed a checked manifest, and only the updater checks.
DECISIONS_MAY_IMPORT = {
    "__future__",
    "dataclasses",
    "typing",
    "partitions.bootcontrol",
    "updater.errors",
    "updater.manifest",
    "updater.source",  # ImageClaim, a data type
    "updater.state",
}
CORE_MUST_NOT_IMPORT = {
    "updater.settings": {"updater", "partitions", "policies"},
    "updater.hostports": {"updater.slots", "updater.installer", "updater.update"},
    "updater.hostlock": {"updater.slots", "updater.installer", "updater.update"},
    "updater.slots": {
        "updater.update",
        "updater.installer",
        "updater.source",
        "updater.transport",
        "updater.download",
        "updater.install",
        "updater.gpg",
        "updater.verify",
    },
    "updater.installer": {"updater.update", "updater.gpg", "updater.verify"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in known)
    return found


def test_partitions_and_policies_use_only_leaf_modules() -> None:
    mods = modules()
    for name, path in mods.items():
        if name.split(".")[0] in ("partitions", "policies"):
            used = {m for m in imports(path, set(mods)) if m.startswith("updater")}
            assert used <= LEAVES, f"{name} imports {sorted(used - LEAVES)}"


def test_decisions_are_pure() -> None:
    path = ROOT / "updater" / "decisions.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    extra = found - DECISIONS_MAY_IMPORT
    assert not extra, f"updater.decisions imports {sorted(extra)}"


def test_update_core_layers() -> None:
    mods = modules()
    for name, banned in CORE_MUST_NOT_IMPORT.items():
        used = imports(mods[name], set(mods))
        bad = {m for m in used if any(m == b or m.startswith(b + ".") for b in banned)}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    for pkg in PACKAGES:  # a package's __init__ importing nothing is the norm
        graph[pkg] = graph.get(pkg, set())
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
