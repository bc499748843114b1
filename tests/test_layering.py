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
    "updater.httperrors",
}

# Pure modules: no network, bus, subprocess or file-system library, directly or through
# another module of ours (python-tuf's trusted_metadata_set, Zincati's pure strategy).
PURE = {
    "updater.omaha": "the Omaha answer",
    "updater.omaha_request": "the Omaha request document and events",
    "updater.omaha_codes": "the Omaha error codes",
    "updater.settings": "the configuration's model",
    "updater.chunkindex": "the chunk index of a delta update",
    "updater.deltaplan": "the delta planner",
    "updater.trustroot": "the trust roots and the rules of their chain",
    "policies.fleetview": "the fleet dashboard's views",
    "updater.hostpolicy": "the admin's decisions for one host (hold, skips, pin, floor)",
}
IMPURE_LIBRARIES = ("requests", "urllib3", "socket", "subprocess", "dbus_fast", "http", "shutil")

# Who may import whom among the modules of one job (the rest follow the cycle rule):
# a command module of the CLI, the D-Bus client and the CoreOS interface stand alone.
FORBIDDEN = {
    "updater.cli_host": {
        "updater.cli",
        "updater.cli_fleet",
        "updater.cli_release",
        "updater.cli_admin",
    },
    "updater.cli_fleet": {
        "updater.cli",
        "updater.cli_host",
        "updater.cli_release",
        "updater.cli_admin",
    },
    "updater.cli_release": {
        "updater.cli",
        "updater.cli_host",
        "updater.cli_fleet",
        "updater.cli_admin",
    },
    "updater.cli_admin": {
        "updater.cli",
        "updater.cli_host",
        "updater.cli_fleet",
        "updater.cli_release",
    },
    "updater.dbus_client": {"updater.dbus_api", "updater.dbus_coreos"},
    "updater.dbus_coreos": {"updater.dbus_api", "updater.dbus_client"},
    "updater.dbus_wire": {"updater.dbus_api", "updater.dbus_client", "updater.dbus_coreos"},
    "updater.configfiles": {"updater.config", "updater.settings"},
    "updater.settings": {"updater.config", "updater.configfiles"},
    "updater.httperrors": {"updater.transport"},
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
    "updater.updatesettings": {"updater", "partitions", "policies"},
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


def top_level_imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_pure_modules_do_no_io() -> None:
    mods = modules()
    seen: set[str] = set()
    todo = list(PURE)
    while todo:  # the pure modules and every module of ours they import
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        used = top_level_imports(mods[name])
        impure = {m for m in used if m.split(".")[0] in IMPURE_LIBRARIES}
        assert not impure, f"{name} (reached from a pure module) imports {sorted(impure)}"
        todo += [m for m in used if m in mods]


def test_modules_of_one_job_keep_apart() -> None:
    mods = modules()
    for name, forbidden in FORBIDDEN.items():
        used = imports(mods[name], set(mods))
        assert not used & forbidden, f"{name} imports {sorted(used & forbidden)}"


def test_decisions_are_pure() -> None:
    found = top_level_imports(ROOT / "updater" / "decisions.py")
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


# Pure policy modules: decisions and wire formats, no client library or network I/O
# (the agent decides on failed versions without loading etcd3gw; etcd's requests
# are plain data). An import under ``if TYPE_CHECKING:`` is only for annotations.
PURE_POLICIES = (
    "policies.etcdtxn",
    "policies.semaphore",
    "policies.failed",
    "policies.fleetlockproto",
)
IO_LIBRARIES = ("etcd3gw", "requests", "urllib3", "http", "socket", "ssl", "policies.etcdclient")


def runtime_imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs (not those under ``if TYPE_CHECKING:``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_pure_policies_load_no_client_library() -> None:
    mods = modules()
    for name in PURE_POLICIES:
        used = runtime_imports(mods[name])
        bad = {m for m in used if any(m == lib or m.startswith(lib + ".") for lib in IO_LIBRARIES)}
        assert not bad, f"{name} imports {sorted(bad)} at run time"


# partitions/: the decisions and formats that are pure (no I/O of their own), and the
# boot loader backends, which share only the port (bootcontrol), the booted-slot
# finder and the stores, never one another.
PURE_PARTITIONS = {
    "partitions.bootcontrol",
    "partitions.bls",
    "partitions.sdbootplan",
    "partitions.gpttable",
}
IO_IMPORTS = {"os", "io", "subprocess", "tempfile", "fcntl", "shutil", "socket", "updater.run"}
BACKENDS = {"partitions.gptprio", "partitions.sdboot", "partitions.grubenv"}


def top_imports(path: Path) -> set[str]:
    """Every module ``path`` imports (standard library too), by its full name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_pure_partitions_modules_do_no_io() -> None:
    mods = modules()
    assert set(mods) >= PURE_PARTITIONS, sorted(PURE_PARTITIONS - set(mods))
    for name in sorted(PURE_PARTITIONS):
        used = top_imports(mods[name]) & IO_IMPORTS
        assert not used, f"{name} is pure but imports {sorted(used)}"


def test_backends_do_not_import_one_another() -> None:
    mods = modules()
    assert set(mods) >= BACKENDS
    for name in sorted(BACKENDS):
        used = imports(mods[name], set(mods)) & (BACKENDS - {name})
        assert not used, f"{name} imports the backend(s) {sorted(used)}"


# The agent (updater.agent) is a shell around a pure machine; its parts are below it.
MACHINE = {"updater.machine", "updater.machinemodel", "updater.machinerecord"}
AGENT_PARTS = {
    "updater.rebootpath",
    "updater.fleetrecord",
    "updater.agentports",
    "updater.blocking",
    *MACHINE,
}
IMPURE_STDLIB = {"asyncio", "os", "subprocess", "threading", "socket", "time", "random", "pathlib"}


def test_the_agents_machine_is_pure() -> None:
    """No I/O, clock or randomness in the machine: it imports only leaf modules."""
    mods = modules()
    for name in MACHINE:
        used = imports(mods[name], set(mods)) - {"updater"}  # `from updater import versions`
        assert used <= LEAVES | MACHINE, f"{name} imports {sorted(used - LEAVES - MACHINE)}"
        impure = imports(mods[name], IMPURE_STDLIB)
        assert not impure, f"{name} imports {sorted(impure)}"


def test_the_agents_parts_are_below_it() -> None:
    mods = modules()
    for name in AGENT_PARTS:
        used = imports(mods[name], set(mods))
        assert "updater.agent" not in used, f"{name} imports updater.agent"
        assert "updater.compose" not in used, f"{name} imports updater.compose"
