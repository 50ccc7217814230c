"""The declared runtime dependencies are exactly the distributions the shipped code imports.

Every import of the shipped packages is read with ``ast`` (as tests/unit/test_layers.py
does: lazy, ``TYPE_CHECKING`` ones too), its top-level name mapped to the installed
distribution that provides it (``importlib.metadata.packages_distributions()``) and
compared with ``[project] dependencies`` of pyproject.toml, both ways:

* imported but not declared: it works here only because something else pulled it in;
* declared but not imported: a runtime dependency every user installs for nothing
  (benchmark-only or test-only ones belong in an extra).

An import inside ``try`` whose ``except`` catches ``ImportError`` is optional and needs
no declaration (the code runs without it).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.unit.test_layers import PACKAGES, ROOT

_OPTIONAL = frozenset({"ImportError", "ModuleNotFoundError"})


@dataclass(frozen=True, order=True)
class Use:
    """``module`` (a top-level name) is imported at ``where`` (``path:line``)."""

    module: str
    where: str


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> set[str]:
    """The normalized names of ``[project] dependencies`` (extras and versions dropped)."""
    project = tomllib.loads(pyproject.read_text("utf-8"))["project"]
    names = set()
    for spec in project.get("dependencies", []):
        found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
        assert found is not None, f"unreadable dependency {spec!r}"
        names.add(normalize(found.group(0)))
    return names


def _optional_lines(tree: ast.AST) -> set[int]:
    """Lines of imports inside ``try`` blocks that fall back on ImportError."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {k.id for k in kinds if isinstance(k, ast.Name)}
        if caught & _OPTIONAL:
            for stmt in node.body:
                lines |= {n.lineno for n in ast.walk(stmt) if isinstance(n, ast.stmt)}
    return lines


def third_party_imports(root: Path, packages: Iterable[str] = PACKAGES) -> list[Use]:
    """Every import of a module outside the standard library and the packages themselves."""
    ours = set(packages)
    uses: set[Use] = set()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text("utf-8"), str(path))
            optional = _optional_lines(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                if node.lineno in optional:
                    continue
                for name in names:
                    top = name.split(".", maxsplit=1)[0]
                    if top in sys.stdlib_module_names or top in ours or top == "__future__":
                        continue
                    uses.add(Use(top, f"{path.relative_to(root)}:{node.lineno}"))
    return sorted(uses)


def mismatches(
    uses: Iterable[Use], declared_names: set[str], providers: Mapping[str, list[str]]
) -> tuple[list[str], list[str]]:
    """(imported but undeclared, declared but never imported), each a readable line."""
    undeclared: dict[str, str] = {}
    used: set[str] = set()
    for use in uses:
        dists = {normalize(d) for d in providers.get(use.module, [])}
        if not dists:
            undeclared.setdefault(use.module, f"{use.module} ({use.where}): no installed "
                                              "distribution provides it")  # fmt: skip
        elif dists & declared_names:
            used |= dists & declared_names
        else:
            undeclared.setdefault(
                use.module, f"{use.module} ({use.where}) from {', '.join(sorted(dists))}"
            )
    unused = sorted(declared_names - used)
    return sorted(undeclared.values()), unused


# ---------------------------------------------------------------- the tree itself


def test_every_imported_distribution_is_declared_and_every_declared_one_imported() -> None:
    undeclared, unused = mismatches(
        third_party_imports(ROOT), declared(ROOT / "pyproject.toml"), packages_distributions()
    )
    assert not undeclared, "imported, not in [project] dependencies:\n  " + "\n  ".join(undeclared)
    assert not unused, f"in [project] dependencies, imported nowhere (an extra?): {unused}"


def test_benchmark_and_test_tools_are_extras_not_runtime_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    runtime = declared(ROOT / "pyproject.toml")
    assert {"aiomqtt", "testcontainers", "pytest"}.isdisjoint(runtime)
    extras = project["optional-dependencies"]
    assert any(spec.startswith("aiomqtt") for spec in extras["bench"])
    assert any(spec.startswith("testcontainers") for spec in extras["dev"])
    assert "posflow[bench]" in extras["dev"]  # `make install` still gets what benchmarks need


# ------------------------------------------------------- the check catches a new one


def _tree(tmp_path: Path, files: dict[str, str]) -> list[Use]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return third_party_imports(tmp_path, ("posflow", "alerts"))


def test_lazy_and_type_only_imports_count_and_optional_ones_do_not(tmp_path: Path) -> None:
    uses = _tree(
        tmp_path,
        {
            "posflow/__init__.py": "import json\nfrom posflow import x\n",
            "posflow/http.py": "def f():\n    from aiohttp import web\n",
            "alerts/cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    import psycopg\ntry:\n    import click\nexcept ImportError:\n    pass\n",
        },
    )
    assert uses == [Use("aiohttp", "posflow/http.py:2"), Use("psycopg", "alerts/cli.py:3")]


def test_an_undeclared_import_and_an_unused_declaration_are_both_named() -> None:
    uses = [Use("aiohttp", "posflow/http.py:7"), Use("yaml", "alerts/rules.py:3")]
    providers = {"aiohttp": ["aiohttp"], "yaml": ["PyYAML"]}
    undeclared, unused = mismatches(uses, {"pyyaml", "aiomqtt"}, providers)
    assert undeclared == ["aiohttp (posflow/http.py:7) from aiohttp"]
    assert unused == ["aiomqtt"]
    undeclared, _ = mismatches([Use("nowhere", "api/x.py:1")], set(), {})
    assert undeclared == ["nowhere (api/x.py:1): no installed distribution provides it"]
