"""Small pieces every dashboard uses: thresholds, reductions, links, variables."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as model

from dashboards._targets import PG

__all__ = [
    "HEALTH_STEPS",
    "TAGS",
    "fixed_colour",
    "health_thresholds",
    "link",
    "links_to",
    "reduce_last",
    "sql_variable",
    "steps",
    "value_colours",
]

TAGS = ["posflow"]
# Health score colours: the same bands everywhere (score.py calls below 50 poor).
HEALTH_STEPS: list[tuple[float | None, str]] = [(None, "red"), (50, "orange"), (80, "green")]


def steps(pairs: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=v, color=c) for v, c in pairs])
    )


def health_thresholds() -> db.ThresholdsConfig:
    return steps(HEALTH_STEPS)


def fixed_colour(colour: str) -> list[model.DynamicConfigValue]:
    """Override properties: one fixed colour for a field."""
    return [model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": colour})]


def value_colours(colours: dict[str, str]) -> list[model.DynamicConfigValue]:
    """Override properties: a colour per text value (state timelines)."""
    options = {
        value: {"color": colour, "index": i, "text": value}
        for i, (value, colour) in enumerate(colours.items())
    }
    return [
        model.DynamicConfigValue(id_val="mappings", value=[{"type": "value", "options": options}])
    ]


def reduce_last(*, values: bool = False) -> common_builders.ReduceDataOptions:
    """Stat/pie reduction: the last value of each field, or every row with ``values``."""
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(values)


def link(title: str, dashboard_uid: str, query: str) -> db.DashboardLink:
    """A data link to another posflow dashboard, keeping the time range."""
    return (
        db.DashboardLink(title)
        .url(f"/d/{dashboard_uid}?{query}&${{__url_time_range}}")
        .target_blank(False)
    )


def links_to(*links: db.DashboardLink) -> list[model.DynamicConfigValue]:
    """Override properties: data links on a field's cells."""
    return [model.DynamicConfigValue(id_val="links", value=[x.build() for x in links])]


def sql_variable(name: str, label: str, query: str) -> db.QueryVariable:
    """A single-value variable from SQL (columns __value, __text), refreshed on load."""
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(PG)
        .query(query)
        .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(model.VariableSort.DISABLED)  # the query orders
        .multi(False)
        .include_all(False)
    )
