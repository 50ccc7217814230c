"""Every dashboard, rendered to the JSON committed in dashboards/json/.

The JSON is what Grafana provisions (docker-compose mounts dashboards/json) and
what ``posflow dashboards publish`` pushes; ``generate`` rewrites it from the
Python, ``generate --check`` says whether the committed files are current.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prom_model

# The builders by module path, not through the package: dashboards/__init__.py
# re-exports this module, so importing from the package here would be a cycle.
from dashboards._targets import PG, Column, SqlQuery
from dashboards.alerts import build as alerts_dashboard
from dashboards.fleet import build as fleet_dashboard
from dashboards.merchant import build as merchant_dashboard
from dashboards.pipeline import build as pipeline_dashboard
from dashboards.terminal import build as terminal_dashboard

__all__ = [
    "BUILDERS",
    "JSON_DIR",
    "PromTarget",
    "SqlTarget",
    "build_all",
    "check",
    "prom_targets",
    "render",
    "sql_targets",
    "write",
]

JSON_DIR = Path(__file__).resolve().parent / "json"

# File name (without .json) -> builder.
BUILDERS: dict[str, Callable[[], db.Dashboard]] = {
    "fleet": fleet_dashboard,
    "terminal": terminal_dashboard,
    "merchant": merchant_dashboard,
    "alerts": alerts_dashboard,
    "pipeline": pipeline_dashboard,
}


def build_all() -> dict[str, model.Dashboard]:
    """Every dashboard, with panel ids numbered in order (stable diffs)."""
    out = {}
    for name, builder in BUILDERS.items():
        dash = builder().build()
        for number, panel in enumerate(dash.panels or [], start=1):
            panel.id_val = number
        out[name] = dash
    return out


def render(dash: model.Dashboard) -> str:
    """The JSON text of a dashboard: sorted keys, two-space indent, newline at the end."""
    data = json.loads(json.dumps(dash, cls=JSONEncoder))
    # A variable's id is Grafana's internal business; the SDK writes a zero UUID.
    for variable in data.get("templating", {}).get("list", []):
        variable.pop("id", None)
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = JSON_DIR) -> list[Path]:
    """(Re)write every dashboard's JSON; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dash in build_all().items():
        path = directory / f"{name}.json"
        path.write_text(render(dash), encoding="utf-8")
        written.append(path)
    return written


def check(directory: Path = JSON_DIR) -> list[str]:
    """The dashboards whose committed JSON differs from the generated (empty: all current)."""
    stale = []
    for name, dash in build_all().items():
        path = directory / f"{name}.json"
        if not path.exists() or path.read_text(encoding="utf-8") != render(dash):
            stale.append(name)
    return stale


@dataclass(frozen=True)
class SqlTarget:
    """One SQL query of a dashboard (a panel's, or a variable's) and the columns it must give."""

    dashboard: str
    where: str  # panel title or "variable <name>"
    sql: str
    fmt: str
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class PromTarget:
    dashboard: str
    where: str
    expr: str


def _panels(dash: model.Dashboard) -> Iterator[Any]:
    for panel in dash.panels or []:
        yield panel
        yield from getattr(panel, "panels", None) or []


def sql_targets() -> list[SqlTarget]:
    """Every SQL query of every dashboard, variables included."""
    found = []
    for name, dash in build_all().items():
        for variable in dash.templating.list_val or []:
            ds = variable.datasource
            if ds is not None and ds.uid == PG.uid and isinstance(variable.query, str):
                found.append(
                    SqlTarget(
                        name,
                        f"variable {variable.name}",
                        variable.query,
                        "table",
                        (Column("__value", "string"), Column("__text", "string")),
                    )
                )
        for panel in _panels(dash):
            for target in getattr(panel, "targets", None) or []:
                if isinstance(target, SqlQuery):
                    found.append(
                        SqlTarget(name, panel.title, target.raw_sql, target.format, target.columns)
                    )
    return found


def prom_targets() -> list[PromTarget]:
    """Every PromQL expression of every dashboard."""
    return [
        PromTarget(name, panel.title, target.expr)
        for name, dash in build_all().items()
        for panel in _panels(dash)
        for target in getattr(panel, "targets", None) or []
        if isinstance(target, prom_model.Dataquery)
    ]
