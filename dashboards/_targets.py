"""Panel queries: SQL for the PostgreSQL datasource, PromQL for Prometheus.

The Foundation SDK has no builder for Grafana's PostgreSQL datasource, so
:class:`SqlQuery` is one: a ``cogvariants.Dataquery`` that serialises to the
JSON Grafana's SQL query editor writes in code mode. Each query also states
the columns (and their kinds) its panel reads; that list never reaches the
JSON, it is what the tests check the real database returns.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from grafana_foundation_sdk.builders import prometheus as prom_builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef
from grafana_foundation_sdk.models.prometheus import QueryEditorMode

__all__ = [
    "PG",
    "PG_TYPE",
    "PG_UID",
    "PROM",
    "PROM_TYPE",
    "PROM_UID",
    "Column",
    "Kind",
    "Sql",
    "SqlQuery",
    "prom",
]

# "postgres": the type Grafana 9 knows, and an alias that Grafana 10+ still accepts (its
# plugin id is now grafana-postgresql-datasource), so the dashboards import into both.
PG_TYPE = "postgres"
PROM_TYPE = "prometheus"
# The uids of deploy/grafana/provisioning/datasources/datasources.yml; `publish` maps
# them to the datasources of another Grafana.
PG_UID = "posflow-pg"
PROM_UID = "posflow-prom"
PG = DataSourceRef(type_val=PG_TYPE, uid=PG_UID)
PROM = DataSourceRef(type_val=PROM_TYPE, uid=PROM_UID)

# What a panel needs of a column: a time (timestamptz, or epoch seconds as Grafana's SQL
# engine accepts for a column named "time"), a number, a string, a boolean.
Kind = typing.Literal["time", "number", "string", "bool"]
Format = typing.Literal["time_series", "table"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


class SqlQuery(cogvariants.Dataquery):
    """A raw SQL target of the PostgreSQL datasource."""

    def __init__(self, ref_id: str, raw_sql: str, fmt: Format, columns: tuple[Column, ...]) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format = fmt
        self.columns = columns

    def to_json(self) -> dict[str, object]:
        return {
            "datasource": PG.to_json(),
            "editorMode": "code",
            "format": self.format,
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }


class Sql(cogbuilder.Builder[SqlQuery]):
    """``Sql("SELECT ...", time="time", value="number")``: the columns in order, with kinds."""

    def __init__(
        self, raw_sql: str, *, fmt: Format = "table", ref_id: str = "A", **columns: Kind
    ) -> None:
        # Keyword order is the column order; "time" is spelt time_ when it would clash.
        cols = tuple(Column(name.rstrip("_"), kind) for name, kind in columns.items())
        self._query = SqlQuery(ref_id, _dedent(raw_sql), fmt, cols)

    def build(self) -> SqlQuery:
        return self._query


def prom(expr: str, legend: str = "", ref_id: str = "A") -> prom_builders.Dataquery:
    """A range query in code mode; ``legend`` is Grafana's legend template."""
    query = (
        prom_builders.Dataquery()
        .expr(expr)
        .ref_id(ref_id)
        .range()
        .editor_mode(QueryEditorMode.CODE)
        .datasource(PROM)
    )
    return query.legend_format(legend) if legend else query


def _dedent(sql: str) -> str:
    """One line per clause, no common indentation: readable in Grafana's editor and in diffs."""
    lines = [line.rstrip() for line in sql.strip("\n").splitlines()]
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines).strip()
