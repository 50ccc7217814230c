"""`publish` against a real HTTP server on loopback that speaks Grafana's API.

The server (aiohttp, in a thread) implements what grafana-client calls:
frontend settings (its health check), folder lookup/create, datasource lookup
by uid and by name, and dashboard save; it records every request so the tests
assert what reached it. Error cases: refused credentials, forbidden, a server
error, nothing listening.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from dashboards import catalog
from dashboards.publish import publish
from posflow.errors import PosflowError
from posflow.settings import GrafanaSettings
from tests.conftest import free_port

TOKEN = "glsa_test_token"


@dataclass
class FakeGrafana:
    port: int
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "uid": "P1A2B3",
                "name": "posflow PostgreSQL",
                "type": "grafana-postgresql-datasource",
            },
            {"uid": "prom-main", "name": "Prometheus", "type": "prometheus"},
        ]
    )
    fail_on: str | None = None  # a path fragment answered with fail_status
    fail_status: int = 500
    accept: set[str] = field(default_factory=lambda: {f"Bearer {TOKEN}"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.json() if request.can_read_body else None
            self.requests.append((request.method, request.path, body))
            if request.headers.get("Authorization") not in self.accept:
                return web.json_response({"message": "invalid API key"}, status=401)
            if self.fail_on and self.fail_on in request.path:
                message = {403: "Access denied", 500: "database is locked"}[self.fail_status]
                return web.json_response({"message": message}, status=self.fail_status)
            response: web.StreamResponse = await handler(request)
            return response

        async def settings(_: web.Request) -> web.Response:
            return web.json_response({"buildInfo": {"version": "11.3.0"}})

        async def folder(request: web.Request) -> web.Response:
            found = self.folders.get(request.match_info["uid"])
            if found is None:
                return web.json_response({"message": "folder not found"}, status=404)
            return web.json_response(found)

        async def create_folder(request: web.Request) -> web.Response:
            body = await request.json()
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            return web.json_response(self.folders[body["uid"]])

        def by(key: str) -> Any:
            async def lookup(request: web.Request) -> web.Response:
                for ds in self.datasources:
                    if ds[key] == request.match_info[key]:
                        return web.json_response(ds)
                return web.json_response({"message": "Data source not found"}, status=404)

            return lookup

        async def save(request: web.Request) -> web.Response:
            body = await request.json()
            uid = body["dashboard"]["uid"]
            old = self.dashboards.get(uid)
            if old is not None and not body["overwrite"]:
                return web.json_response({"message": "version-mismatch"}, status=412)
            version = (old["version"] + 1) if old else 1
            self.dashboards[uid] = {**body, "version": version}
            return web.json_response(
                {"uid": uid, "url": f"/d/{uid}/x", "version": version, "status": "success"}
            )

        app = web.Application(middlewares=[gate])
        app.router.add_get("/api/frontend/settings", settings)
        app.router.add_get("/api/folders/{uid}", folder)
        app.router.add_post("/api/folders", create_folder)
        app.router.add_get("/api/datasources/uid/{uid}", by("uid"))
        app.router.add_get("/api/datasources/name/{name}", by("name"))
        app.router.add_post("/api/dashboards/db", save)
        return app


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    fake = FakeGrafana(port=free_port())
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app())
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", fake.port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _settings(grafana: FakeGrafana, **over: Any) -> GrafanaSettings:
    base: dict[str, Any] = {
        "url": grafana.url,
        "token": SecretStr(TOKEN),
        "postgres_datasource": "posflow PostgreSQL",  # by name
        "prometheus_datasource": "prom-main",  # by uid
        "timeout_s": 5,
    }
    return GrafanaSettings(**{**base, **over})


def _bodies() -> dict[str, dict[str, Any]]:
    return {name: json.loads(catalog.render(d)) for name, d in catalog.build_all().items()}


def _uids(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["uid"]} if set(node) == {"type", "uid"} else set()
        return found.union(*(_uids(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_uids(v) for v in node))
    return set()


def test_publish_creates_the_folder_maps_datasources_and_saves_every_dashboard(
    grafana: FakeGrafana,
) -> None:
    lines: list[str] = []
    done = publish(_settings(grafana), _bodies(), progress=lines.append)

    assert [p.uid for p in done] == [
        "posflow-fleet", "posflow-terminal", "posflow-merchant", "posflow-alerts",
        "posflow-pipeline",
    ]  # fmt: skip
    assert all(p.version == 1 for p in done)
    assert grafana.folders == {"posflow": {"uid": "posflow", "title": "posflow"}}
    saved = grafana.dashboards["posflow-pipeline"]
    assert saved["folderUid"] == "posflow"
    assert saved["overwrite"] is True
    assert saved["dashboard"]["id"] is None
    # Our uids are gone; the target Grafana's are in.
    assert _uids(saved["dashboard"]) == {"P1A2B3", "prom-main"}
    assert _uids(grafana.dashboards["posflow-fleet"]["dashboard"]) == {"P1A2B3"}
    assert lines[0] == f"Grafana 11.3.0 at {grafana.url}"
    # The name lookup followed a uid miss; the uid lookup hit at once.
    paths = [p for _, p, _ in grafana.requests]
    assert any(p.startswith("/api/datasources/uid/posflow") for p in paths)
    assert any(p.startswith("/api/datasources/name/") for p in paths)

    # Again: the folder exists now (not created twice), versions move on.
    again = publish(_settings(grafana), _bodies())
    assert all(p.version == 2 for p in again)
    assert sum(1 for m, p, _ in grafana.requests if (m, p) == ("POST", "/api/folders")) == 1


def test_basic_auth_is_used_without_a_token(grafana: FakeGrafana) -> None:
    creds = base64.b64encode(b"admin:s3cret").decode()
    grafana.accept = {f"Basic {creds}"}
    settings = _settings(grafana, token=None, user="admin", password=SecretStr("s3cret"))
    assert len(publish(settings, _bodies())) == 5


def test_refused_credentials_say_so(grafana: FakeGrafana) -> None:
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana, token=SecretStr("wrong")), _bodies())
    assert str(err.value).startswith(
        f"Grafana at {grafana.url} refused the credentials (401) while checking its health"
    )
    assert "POSFLOW_GRAFANA__TOKEN" in str(err.value)
    assert "wrong" not in str(err.value)


def test_forbidden_dashboard_save_names_the_dashboard_and_the_role(grafana: FakeGrafana) -> None:
    grafana.fail_on, grafana.fail_status = "/api/dashboards/db", 403
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana), _bodies())
    assert "refused with 403 while saving dashboard 'fleet'" in str(err.value)
    assert "Editor role" in str(err.value)
    assert err.value.detail == "Access denied"


def test_server_error_is_reported_with_grafanas_message(grafana: FakeGrafana) -> None:
    grafana.fail_on, grafana.fail_status = "/api/folders", 500
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana), _bodies())
    assert "failed with 500 while looking up folder 'posflow'" in str(err.value)
    assert err.value.detail == "database is locked"


def test_missing_datasource_is_named(grafana: FakeGrafana) -> None:
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana, prometheus_datasource="nope"), _bodies())
    assert "has no datasource with uid or name 'nope'" in str(err.value)
    assert grafana.dashboards == {}


def test_wrong_datasource_type_is_refused(grafana: FakeGrafana) -> None:
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana, postgres_datasource="prom-main"), _bodies())
    assert "is of type 'prometheus', expected" in str(err.value)


def test_no_overwrite_reports_a_dashboard_changed_in_grafana(grafana: FakeGrafana) -> None:
    publish(_settings(grafana), _bodies())
    with pytest.raises(PosflowError) as err:
        publish(_settings(grafana), _bodies(), overwrite=False)
    assert "refused with 412 while saving dashboard 'fleet'" in str(err.value)
    assert "--overwrite" in str(err.value)


def test_unreachable_grafana_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = GrafanaSettings(url=url, token=SecretStr(TOKEN), timeout_s=3)
    with pytest.raises(PosflowError) as err:
        publish(settings, _bodies())
    assert str(err.value).startswith(f"cannot reach Grafana at {url} while checking its health")


def test_no_credentials_is_refused_before_any_request(grafana: FakeGrafana) -> None:
    with pytest.raises(PosflowError, match="no Grafana credentials"):
        publish(_settings(grafana, token=None, password=None), _bodies())
    assert grafana.requests == []
