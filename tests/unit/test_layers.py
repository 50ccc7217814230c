"""The layers' imports point down only, and no imports go around in a cycle.

Layers, bottom to top:

* **core**: the ``posflow`` package (settings, contracts, topics, storage, security,
  errors, http, runtime, logs, stack, ...);
* **services**: ingest, streams, alerts, api, dashboards, simulator; each imports
  the core and itself, never another service;
* **composition**: the ``cli`` package: the command line, the main job, its supervisor
  and console, and the load test with its harness; they may import anything below them.

Every import counts: inside functions (the CLI imports lazily), under
``TYPE_CHECKING`` and in ``try`` blocks. The check reads the source (``ast``) and
imports nothing, so it cannot be fooled by what happens to be loaded already.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("posflow", "ingest", "streams", "alerts", "api", "dashboards", "simulator", "cli")
SERVICES = frozenset({"ingest", "streams", "alerts", "api", "dashboards", "simulator"})
COMPOSITION = frozenset({"cli"})


@dataclass(frozen=True, order=True)
class Edge:
    """``source`` imports ``target`` at ``line`` of the source's file."""

    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _known(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` lives in (the longest known prefix), or None (third party)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import between the packages' modules, each with its line."""
    known = modules(root, packages)
    edges: set[Edge] = set()
    for source, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the source's package, up level - 1
                    here = source.split(".") if is_package else source.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join([*here, base] if base else here)
                # `from p import x` runs p/__init__ and reads its namespace; x may be
                # a submodule too.
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                target = _known(name, known)
                if target is not None and target != source:
                    edges.add(Edge(source, target, node.lineno))
    return sorted(edges)


def layer(module: str) -> str:
    """``core``, ``composition``, or the service's package name."""
    if any(module == c or module.startswith(c + ".") for c in COMPOSITION):
        return "composition"
    top = module.split(".", maxsplit=1)[0]
    return top if top in SERVICES else "core"


def layer_violations(edges: list[Edge]) -> list[Edge]:
    """Imports that go up or sideways: core -> service or composition; service -> other
    service or composition."""
    bad = []
    for edge in edges:
        source, target = layer(edge.source), layer(edge.target)
        if source == "composition" or target in {"core", source}:
            continue
        bad.append(edge)
    return bad


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected group of modules (Tarjan)."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, dict[str, Edge]], group: set[str]) -> list[Edge]:
    """A shortest cycle through the group's first module (breadth first)."""
    start = min(group)
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ, edge in sorted(graph[node].items()):
                if succ not in group or succ in came:
                    continue
                came[succ] = edge
                if succ == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle in the strongly connected group {sorted(group)}")


def service_edges(edges: list[Edge]) -> list[Edge]:
    """The same imports with each service collapsed into one node, its package."""

    def node(module: str) -> str:
        found = layer(module)
        return module if found in {"core", "composition"} else found

    out = {Edge(node(e.source), node(e.target), e.line) for e in edges}
    return sorted(e for e in out if e.source != e.target)


def _report(what: str, found: list[str]) -> str:
    return f"{len(found)} {what}:\n" + "\n".join(f"  {line}" for line in found)


# ---------------------------------------------------------------- the tree itself


@functools.cache
def _tree_imports() -> list[Edge]:
    return imports(ROOT)


def test_the_scan_sees_the_trees_imports_including_lazy_and_type_only_ones() -> None:
    edges = {(e.source, e.target) for e in _tree_imports()}
    assert ("cli.main", "posflow.cli_support") in edges  # top level
    assert ("cli.main", "streams.app") in edges  # inside a command function
    assert ("simulator.cli", "simulator.fleet") in edges  # under TYPE_CHECKING
    assert len(modules(ROOT)) > 100


def test_the_core_imports_no_service_and_no_composition_module() -> None:
    bad = [str(e) for e in layer_violations(_tree_imports()) if layer(e.source) == "core"]
    assert not bad, _report("upward imports from the core", bad)


def test_a_service_imports_no_other_service_and_no_composition_module() -> None:
    bad = [str(e) for e in layer_violations(_tree_imports()) if layer(e.source) != "core"]
    assert not bad, _report("sideways or upward imports from a service", bad)


def test_no_module_imports_itself_through_a_cycle() -> None:
    found = [" then ".join(str(e) for e in cycle) for cycle in cycles(_tree_imports())]
    assert not found, _report("import cycles between modules", found)


def test_no_service_imports_itself_through_a_cycle_of_packages() -> None:
    found = [
        " then ".join(str(e) for e in cycle) for cycle in cycles(service_edges(_tree_imports()))
    ]
    assert not found, _report("import cycles through services", found)


# ------------------------------------------------------- the check catches a new one


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Edge]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return imports(tmp_path)


def test_a_lazy_import_of_another_service_is_a_violation(tmp_path: Path) -> None:
    edges = _tree(
        tmp_path,
        {
            "alerts/__init__.py": "",
            "alerts/access.py": "import os\n\n\ndef f():\n    from api.auth import Principal\n",
            "api/__init__.py": "",
            "api/auth.py": "Principal = object\n",
        },
    )
    assert [str(e) for e in layer_violations(edges)] == ["alerts.access -> api.auth (line 5)"]


def test_the_core_importing_a_service_or_the_cli_is_a_violation(tmp_path: Path) -> None:
    edges = _tree(
        tmp_path,
        {
            "posflow/__init__.py": "",
            "cli/__init__.py": "",
            "cli/main.py": "",
            "posflow/settings.py": "import cli.main\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    import streams.app\n",
            "streams/__init__.py": "",
            "streams/app.py": "from posflow.settings import Settings\n",
        },
    )
    assert [str(e) for e in layer_violations(edges)] == [
        "posflow.settings -> cli.main (line 1)",
        "posflow.settings -> streams.app (line 4)",
    ]


def test_composition_may_import_services_and_services_the_core(tmp_path: Path) -> None:
    edges = _tree(
        tmp_path,
        {
            "posflow/__init__.py": "",
            "posflow/errors.py": "",
            "cli/__init__.py": "",
            "cli/main.py": "import simulator.cli\nfrom cli import loadtest\n",
            "simulator/__init__.py": "",
            "simulator/cli.py": "from posflow.errors import x\nfrom . import engine\n",
            "simulator/engine.py": "",
            "cli/loadtest.py": "from simulator.engine import Run\n",
        },
    )
    assert len(edges) == 7
    assert layer_violations(edges) == []
    assert cycles(edges) == []


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    edges = _tree(
        tmp_path,
        {
            "dashboards/__init__.py": "from dashboards.catalog import build_all\n",
            "dashboards/catalog.py": "\n\nfrom dashboards import fleet\n",
            "dashboards/fleet.py": "",
        },
    )
    assert [[str(e) for e in cycle] for cycle in cycles(edges)] == [
        ["dashboards -> dashboards.catalog (line 1)", "dashboards.catalog -> dashboards (line 3)"]
    ]
