"""Each dashboard, loaded in a real headless Chromium from the stack's Grafana, shows no panel
error over a filled database.

The database is test_dashboards_sql's (every SQL panel has rows). The dashboards go to
Grafana through ``posflow dashboards publish`` (the real server, not a loopback fake):
copies with their own uids, in a folder of their own, their PostgreSQL datasource one
made for this database. Each is loaded with the time range and variables in its URL,
as a link would; the page is tall enough that every panel is in view (Grafana loads
panels lazily) and waits until no panel is loading. Screenshots go to
``POSFLOW_TEST_SCREENSHOTS`` when set (docs/screenshots holds the committed ones).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dashboards import catalog
from dashboards.publish import publish
from dashboards.query import grafana_client, postgres_datasource
from posflow.settings import PostgresSettings, Settings
from posflow.stack import Stack
from posflow.stack.grafana import basic_auth
from posflow.storage.databases import create_database
from tests.conftest import unique
from tests.integration._browser import browser, chromium_binary, settle
from tests.integration.test_dashboards_sql import NOW, _fill

START, END = NOW - timedelta(hours=1), NOW + timedelta(minutes=15)
VARIABLES = {"terminal": "T-dash-2", "merchant": "M-dash-a"}
GRID_PX = 38  # one grid row: 30 px and the margin

# Panels, panels still loading, and the titles of panels showing an error (Grafana 9's
# header corner; Grafana 10+'s status indicator); null until panels are there and none
# is loading (the app itself loads first: seconds on a busy machine).
PROBE = """(s => s.panels && !s.loading ? JSON.stringify(s) : null)({
  panels: document.querySelectorAll('.react-grid-item').length,
  loading: document.querySelectorAll('.panel-loading, [aria-label="Panel loading bar"]').length,
  errors: [...document.querySelectorAll(
      '.panel-info-corner--error, [data-testid="data-testid Panel status error"]')]
    .map(e => (e.closest('.react-grid-item') || e).querySelector('h2, .panel-title-text'))
    .map(t => t ? t.textContent.trim() : '?'),
})"""


@pytest.fixture(scope="module")
def published(settings: Settings, stack: Stack) -> Iterator[dict[str, dict[str, Any]]]:
    """name -> the published copy's dashboard JSON, over a filled database of its own."""
    if chromium_binary() is None:
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    missing = stack.grafana.unavailable()
    if missing is not None:
        pytest.skip(f"the stack runs without Grafana here: {missing}")
    name = unique("dashb").replace("-", "_")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
        create_database(admin, name)
    pg = PostgresSettings(**{**settings.postgres.model_dump(), "database": name})
    suffix = secrets.token_hex(3)
    folder = f"posflow-test-{suffix}"
    try:
        _fill(pg)
        with grafana_client(settings.grafana) as client, postgres_datasource(client, pg) as uid:
            bodies = {}
            for dash, builder in catalog.BUILDERS.items():
                body = json.loads(catalog.render(builder().build()))
                body["uid"] = f"{body['uid']}-{suffix}"
                bodies[dash] = body
            grafana = settings.grafana.model_copy(
                update={"folder": folder, "folder_uid": folder, "postgres_datasource": uid}
            )
            done = publish(grafana, bodies)
            assert [p.uid for p in done] == [b["uid"] for b in bodies.values()]
            try:
                yield bodies
            finally:
                client.delete(f"/api/folders/{folder}")
    finally:
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


async def _load(
    settings: Settings, dashboards: dict[str, dict[str, Any]], shots: Path
) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for name, body in dashboards.items():
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in body["panels"])
        height = min(rows * GRID_PX + 200, 16_000)
        async with browser(basic_auth(settings), 1600, height) as page:
            query = "&".join(f"var-{k}={v}" for k, v in VARIABLES.items())
            url = (
                f"{settings.grafana.url}/d/{body['uid']}?orgId=1&kiosk"
                f"&from={int(START.timestamp() * 1000)}&to={int(END.timestamp() * 1000)}&{query}"
            )
            await page.call("Page.navigate", url=url)
            state = await settle(page, PROBE.replace("\n", " "))
            seen[name] = json.loads(state) if state else {}
            png = await page.screenshot()
            await asyncio.to_thread((shots / f"{name}.png").write_bytes, png)
    return seen


def test_no_dashboard_shows_a_panel_error_in_chromium(
    settings: Settings, published: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    shots = Path(os.environ.get("POSFLOW_TEST_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = asyncio.run(_load(settings, published, shots))
    for name, body in published.items():
        state = seen[name]
        assert state.get("panels") == len(body["panels"]), (name, state)
        assert state.get("loading") == 0, (name, state)
        assert state.get("errors") == [], (name, state)
        assert (shots / f"{name}.png").stat().st_size > 10_000
