"""The stack's Grafana serves the provisioned datasources and dashboards, nothing anonymously."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from dashboards import catalog
from dashboards.query import grafana_client
from posflow.settings import Settings
from posflow.stack import Stack
from posflow.stack.grafana import basic_auth
from posflow.stack.smoke import run_checks


@pytest.fixture(scope="module")
def grafana(stack: Stack) -> Stack:
    missing = stack.grafana.unavailable()
    if missing is not None:
        pytest.skip(f"the stack runs without Grafana here: {missing}")
    return stack


def _get(settings: Settings, path: str, *, auth: bool = True) -> Any:
    request = urllib.request.Request(settings.grafana.url + path)
    if auth:
        request.add_header("Authorization", basic_auth(settings))
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def test_grafana_serves_the_five_dashboards_provisioned_from_the_repository(
    settings: Settings, grafana: Stack
) -> None:
    found = _get(settings, "/api/search?type=dash-db&folderUIDs=posflow")
    committed = {
        name: json.loads((catalog.JSON_DIR / f"{name}.json").read_text())
        for name in catalog.BUILDERS
    }
    assert sorted(d["uid"] for d in found) == sorted(d["uid"] for d in committed.values())
    for name, body in committed.items():
        served = _get(settings, f"/api/dashboards/uid/{body['uid']}")
        assert served["meta"]["provisioned"] is True, name
        assert served["meta"]["folderUid"] == "posflow", name
        dashboard = served["dashboard"]
        assert dashboard["title"] == body["title"]
        assert dashboard["schemaVersion"] == body["schemaVersion"] == 36
        assert [p["title"] for p in dashboard["panels"]] == [p["title"] for p in body["panels"]]


def test_grafana_has_the_datasources_the_dashboards_name(
    settings: Settings, grafana: Stack
) -> None:
    pg = _get(settings, "/api/datasources/uid/posflow-pg")
    prom = _get(settings, "/api/datasources/uid/posflow-prom")
    assert (pg["type"], pg["url"], pg["jsonData"]["database"]) == (
        "postgres",
        f"{settings.postgres.host}:{settings.postgres.port}",
        settings.postgres.database,
    )
    assert pg["database"] == settings.postgres.database  # Grafana 9 reads it here
    assert pg["secureJsonFields"] == {"password": True}
    # Queries really run on that database (not libpq's default, the user's name).
    with grafana_client(settings.grafana) as client:
        answer = client.post(
            "/api/ds/query",
            json={
                "from": "now-5m",
                "to": "now",
                "queries": [
                    {
                        "refId": "A",
                        "datasource": {"uid": "posflow-pg"},
                        "rawSql": "SELECT current_database() AS db",
                        "format": "table",
                    }
                ],
            },
        ).json()
    assert answer["results"]["A"]["frames"][0]["data"]["values"] == [[settings.postgres.database]]
    assert (prom["type"], prom["url"]) == (
        "prometheus",
        f"http://{settings.prometheus.host}:{settings.prometheus.port}",
    )


def test_grafana_refuses_anonymous_and_wrong_credentials(
    settings: Settings, grafana: Stack
) -> None:
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        _get(settings, "/api/search", auth=False)
    assert anonymous.value.code == 401
    wrong = settings.model_copy(
        update={"grafana": settings.grafana.model_copy(update={"user": "nobody"})}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(wrong, "/api/search")
    assert refused.value.code == 401


def test_stack_check_queries_a_panel_through_grafana(settings: Settings, grafana: Stack) -> None:
    [result] = [r for r in run_checks(settings) if r.service == "grafana"]
    assert result.ok, result.what
    assert result.what.startswith("dashboard posflow-fleet fetched;")
    assert "queried through /api/ds/query" in result.what
