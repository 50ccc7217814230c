"""Run every query of every dashboard through a real Grafana, as its browser would.

For each dashboard Grafana serves (``GET /api/dashboards/uid/…``), the template
variables are resolved the way the dashboard resolves them: a value given for
it (what ``?var-<name>=`` in a link does), else the saved current value, else
the first option of the variable's own query, which runs through Grafana too.
Then each panel target goes to ``POST /api/ds/query`` with the panel's interval
and data points: Grafana's backend expands the SQL macros and runs the SQL on
PostgreSQL, or runs the PromQL on Prometheus. What the browser does before that
request (replacing ``$variables``, ``$__interval`` and friends in SQL) is
:func:`dashboards.macros.replace_variables`; the macros are left to Grafana.

``datasources`` maps the dashboards' datasource uids to others (for example, a
datasource of a test's own database), as ``posflow dashboards publish`` does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg

from dashboards._targets import PG_UID
from dashboards.macros import TimeRange, Variable, parse_interval, replace_variables
from dashboards.publish import map_datasources
from posflow.errors import PosflowError
from posflow.settings import GrafanaSettings, PostgresSettings

__all__ = ["PanelResult", "grafana_client", "postgres_datasource", "query_dashboards"]

# The browser sends the panel's width in pixels as maxDataPoints; a typical panel.
DEFAULT_DATA_POINTS = 1000


@dataclass(frozen=True)
class PanelResult:
    """One target's answer from Grafana: an error, or how many rows its frames hold."""

    dashboard: str  # uid
    panel: str  # title, or "variable <name>"
    ref_id: str
    language: str  # "sql" or "promql"
    query: str  # as sent, variables replaced
    error: str | None
    rows: int
    fields: tuple[str, ...] = ()  # the first frame's field names (a table's columns)


def grafana_client(settings: GrafanaSettings) -> httpx.Client:
    """An HTTP client for Grafana's API with the configured token or user/password."""
    headers = {"Content-Type": "application/json"}
    auth: tuple[str, str] | None = None
    if settings.token is not None:
        headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
    elif settings.password is not None:
        auth = (settings.user, settings.password.get_secret_value())
    else:
        raise PosflowError(
            "no Grafana credentials configured",
            fix="set POSFLOW_GRAFANA__TOKEN or POSFLOW_GRAFANA__USER and __PASSWORD",
        )
    return httpx.Client(
        base_url=settings.url.rstrip("/"), headers=headers, auth=auth, timeout=settings.timeout_s
    )


@contextmanager
def postgres_datasource(
    client: httpx.Client, database: PostgresSettings, *, like: str = PG_UID
) -> Iterator[str]:
    """A datasource like ``like`` (the provisioned one) on another database; yields its uid.

    Its TimescaleDB switch follows that database (``$__timeGroup`` becomes
    ``time_bucket()`` only when the extension is there). It is deleted afterwards. The
    password goes in Grafana's encrypted secure fields.
    """
    model = _ok(client.get(f"/api/datasources/uid/{like}"), f"datasource {like}")
    with psycopg.connect(database.dsn()) as conn:
        timescaledb = (
            conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
            is not None
        )
    uid = f"posflow-tmp-{secrets.token_hex(4)}"
    body = {
        "uid": uid,
        "name": f"posflow {database.database} {uid}",
        "type": model["type"],
        "access": "proxy",
        "url": f"{database.host}:{database.port}",
        "user": database.user,
        # Grafana 9 reads the database here, Grafana 10+ from jsonData.
        "database": database.database,
        "jsonData": {
            **model.get("jsonData", {}),
            "database": database.database,
            "timescaledb": timescaledb,
        },
        "secureJsonData": {"password": database.password.get_secret_value()},
    }
    _ok(client.post("/api/datasources", json=body), f"creating datasource {uid}")
    try:
        yield uid
    finally:
        client.delete(f"/api/datasources/uid/{uid}")


def _ok(response: httpx.Response, what: str) -> Any:
    if response.status_code >= 400:
        raise PosflowError(
            f"Grafana answered {response.status_code} to {what}",
            fix="see the detail, and the Grafana log (`posflow stack logs grafana`)",
            detail=response.text[:500],
        )
    return response.json()


def _rows(result: Mapping[str, Any]) -> int:
    rows = 0
    for frame in result.get("frames") or []:
        values = frame.get("data", {}).get("values") or []
        rows += len(values[0]) if values else 0
    return rows


def _fields(result: Mapping[str, Any]) -> tuple[str, ...]:
    frames = result.get("frames") or []
    return tuple(f["name"] for f in frames[0]["schema"].get("fields", [])) if frames else ()


def _frame_column(result: Mapping[str, Any], name: str) -> list[str]:
    for frame in result.get("frames") or []:
        fields = [f["name"] for f in frame["schema"]["fields"]]
        if name in fields:
            return [str(v) for v in frame["data"]["values"][fields.index(name)]]
    return []


class _Run:
    def __init__(
        self,
        client: httpx.Client,
        start: datetime,
        end: datetime,
        min_interval: timedelta,
    ) -> None:
        self.client, self.start, self.end = client, start, end
        self.min_interval = min_interval

    def query(
        self, dashboard: str, where: str, target: Mapping[str, Any], panel: Mapping[str, Any],
        variables: Mapping[str, Variable],
    ) -> tuple[PanelResult, Mapping[str, Any]]:  # fmt: skip
        points = int(panel.get("maxDataPoints") or DEFAULT_DATA_POINTS)
        floor = parse_interval(panel["interval"]) if panel.get("interval") else self.min_interval
        time_range = TimeRange(self.start, self.end, points, floor)
        query = dict(target)
        if "rawSql" in query:
            language, text = "sql", replace_variables(query["rawSql"], time_range, variables)
            query["rawSql"] = text
        else:
            # Prometheus' backend replaces $__interval, $__rate_interval and $__range itself.
            language, text = "promql", replace_variables(query.get("expr", ""), time_range, {})
            query["expr"] = text
        query |= {
            "intervalMs": int(time_range.interval.total_seconds() * 1000),
            "maxDataPoints": points,
        }
        body = {
            "from": str(int(self.start.timestamp() * 1000)),
            "to": str(int(self.end.timestamp() * 1000)),
            "queries": [query],
        }
        response = self.client.post("/api/ds/query", json=body)
        if response.status_code not in (200, 400, 500):  # failed queries still say why
            _ok(response, f"the query of {dashboard} / {where}")
        result = response.json().get("results", {}).get(query["refId"], {})
        error = result.get("error") or (None if response.status_code == 200 else response.text)
        ref = str(query["refId"])
        answer = PanelResult(
            dashboard, where, ref, language, text, error, _rows(result), _fields(result)
        )
        return answer, result


def _panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def query_dashboards(
    settings: GrafanaSettings,
    uids: list[str],
    start: datetime,
    end: datetime,
    *,
    variables: Mapping[str, str] | None = None,
    datasources: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
) -> list[PanelResult]:
    """Every target of each dashboard (by uid), run through Grafana over ``start``-``end``.

    ``variables`` are values chosen for template variables (as ``?var-<name>=``): each
    must be one of the options the variable's query offers. ``datasources`` maps a
    dashboard datasource uid to another one.
    """
    own = client is None
    http = grafana_client(settings) if client is None else client
    try:
        mapping = {
            ours: {"type": _ok(http.get(f"/api/datasources/uid/{uid}"), uid)["type"], "uid": uid}
            for ours, uid in (datasources or {}).items()
        }
        pg = _ok(http.get(f"/api/datasources/uid/{mapping.get(PG_UID, {}).get('uid', PG_UID)}"),
                 "the PostgreSQL datasource")  # fmt: skip
        min_interval = parse_interval(pg.get("jsonData", {}).get("timeInterval") or "1ms")
        run = _Run(http, start, end, min_interval)
        results: list[PanelResult] = []
        for uid in uids:
            served = _ok(http.get(f"/api/dashboards/uid/{uid}"), f"dashboard {uid}")
            dashboard = map_datasources(served["dashboard"], mapping)
            chosen = _resolve(run, uid, dashboard, variables or {}, results)
            for panel in _panels(dashboard):
                for target in panel.get("targets") or []:
                    # A target without its own datasource uses the panel's.
                    query = {"datasource": panel.get("datasource"), **target}
                    results.append(run.query(uid, panel["title"], query, panel, chosen)[0])
        return results
    finally:
        if own:
            http.close()


def _resolve(
    run: _Run,
    uid: str,
    dashboard: Mapping[str, Any],
    wanted: Mapping[str, str],
    results: list[PanelResult],
) -> dict[str, Variable]:
    """Each template variable's value: the one asked for, else current, else the first."""
    chosen: dict[str, Variable] = {}
    for variable in dashboard.get("templating", {}).get("list") or []:
        name = variable["name"]
        if variable.get("type") != "query":
            continue
        target = {
            "refId": f"var-{name}",
            "datasource": variable["datasource"],
            "rawSql": variable.get("query") if isinstance(variable.get("query"), str) else "",
            "format": "table",
        }
        result, raw = run.query(uid, f"variable {name}", target, {}, chosen)
        results.append(result)
        options = _frame_column(raw, "__value")
        current = (variable.get("current") or {}).get("value")
        if name in wanted:
            if wanted[name] not in options:
                raise PosflowError(
                    f"{uid}: {wanted[name]!r} is not an option of variable {name} "
                    f"({len(options)} options)",
                    fix="choose a value the variable's query returns",
                )
            value = wanted[name]
        elif isinstance(current, str) and current in options:
            value = current
        elif options:
            value = options[0]
        else:
            value = ""
        chosen[name] = Variable(
            value, multi=bool(variable.get("multi")), include_all=bool(variable.get("includeAll"))
        )
    return chosen
