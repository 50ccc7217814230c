"""Every query of every dashboard runs through the stack's real Grafana without an error.

The database is test_dashboards_sql's: a small fleet written through the real
writers, in which every SQL panel has rows. Grafana gets a datasource of its own
for that database (like the provisioned one); the dashboards are the ones it
serves from provisioning, their variables resolved as the dashboard resolves
them, every target sent to ``/api/ds/query``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

from dashboards import catalog
from dashboards.query import PanelResult, grafana_client, postgres_datasource, query_dashboards
from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from posflow.storage.databases import create_database
from tests.conftest import unique
from tests.integration.test_dashboards_sql import NOW, _fill

UIDS = [f"posflow-{name}" for name in catalog.BUILDERS]


@pytest.fixture(scope="module")
def results(settings: Settings, stack: Stack) -> Iterator[list[PanelResult]]:
    missing = stack.grafana.unavailable()
    if missing is not None:
        pytest.skip(f"the stack runs without Grafana here: {missing}")
    name = unique("dashg").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, name)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    try:
        _fill(pg)
        with grafana_client(settings.grafana) as client, postgres_datasource(client, pg) as uid:
            yield query_dashboards(
                settings.grafana,
                UIDS,
                NOW - timedelta(hours=1),
                NOW + timedelta(minutes=15),
                variables={"terminal": "T-dash-2", "merchant": "M-dash-a"},
                datasources={"posflow-pg": uid},
                client=client,
            )
    finally:
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def test_every_target_of_every_dashboard_runs_through_grafana_without_an_error(
    results: list[PanelResult],
) -> None:
    errors = [(r.dashboard, r.panel, r.ref_id, r.error) for r in results if r.error]
    assert errors == []
    sql = {(r.dashboard.removeprefix("posflow-"), r.panel) for r in results if r.language == "sql"}
    expected = {(t.dashboard, t.where) for t in catalog.sql_targets()}
    assert sql == expected
    promql = [r for r in results if r.language == "promql"]
    assert len(promql) == len(catalog.prom_targets())


def test_every_sql_panel_has_rows_through_grafana(results: list[PanelResult]) -> None:
    empty = [(r.dashboard, r.panel) for r in results if r.language == "sql" and r.rows == 0]
    assert empty == []
