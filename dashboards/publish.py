"""Push the dashboards to a running Grafana with grafana-client.

Steps, each failing with one clear :class:`PosflowError`: the health check
(reachable? credentials accepted?), the folder (found by uid, else created),
the two datasources (found by uid, else by name; the dashboards' own uids
``posflow-pg`` / ``posflow-prom`` are rewritten to the ones found), then one
``POST /api/dashboards/db`` per dashboard with ``overwrite``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import niquests
from grafana_client.api import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from dashboards._targets import PG_TYPE, PG_UID, PROM_TYPE, PROM_UID
from posflow.errors import PosflowError
from posflow.settings import GrafanaSettings

__all__ = ["Published", "map_datasources", "publish"]

# The dashboards say "postgres" (Grafana 9's type); Grafana 10+ lists the same datasource
# under its plugin id.
_TYPES = {PG_UID: {PG_TYPE, "grafana-postgresql-datasource"}, PROM_UID: {PROM_TYPE}}


@dataclass(frozen=True)
class Published:
    name: str
    uid: str
    url: str
    version: int


def _client(settings: GrafanaSettings) -> Any:
    credential: str | tuple[str, str]
    if settings.token is not None:
        credential = settings.token.get_secret_value()
    elif settings.password is not None:
        credential = (settings.user, settings.password.get_secret_value())
    else:
        raise PosflowError(
            "no Grafana credentials configured",
            fix="set POSFLOW_GRAFANA__TOKEN (service-account token, Editor role) or "
            "POSFLOW_GRAFANA__USER and POSFLOW_GRAFANA__PASSWORD",
        )
    return GrafanaApi.from_url(settings.url, credential=credential, timeout=settings.timeout_s)


@contextmanager
def _step(settings: GrafanaSettings, what: str) -> Iterator[None]:
    """Turn grafana-client's and niquests' exceptions into one-line errors naming the step."""
    where = f"Grafana at {settings.url}"
    try:
        yield
    except GrafanaUnauthorizedError:
        raise PosflowError(
            f"{where} refused the credentials (401) while {what}",
            fix="check POSFLOW_GRAFANA__TOKEN, or POSFLOW_GRAFANA__USER/__PASSWORD",
        ) from None
    except GrafanaTimeoutError as exc:
        raise PosflowError(
            f"{where} did not answer within {settings.timeout_s:g} s while {what}",
            fix="check that Grafana is up, or raise POSFLOW_GRAFANA__TIMEOUT_S",
            detail=str(exc.message),
        ) from None
    except GrafanaServerError as exc:
        raise PosflowError(
            f"{where} failed with {exc.status_code} while {what}",
            fix="see Grafana's log (docker compose logs grafana)",
            detail=_message(exc),
        ) from None
    except GrafanaClientError as exc:
        fix = "see the detail below"
        if exc.status_code == 403:
            fix = "give the token's service account (or the user) the Editor role"
        elif exc.status_code == 412:
            fix = "someone changed it in Grafana: publish with --overwrite to replace it"
        raise PosflowError(
            f"{where} refused with {exc.status_code} while {what}",
            fix=fix,
            detail=_message(exc),
        ) from None
    except (GrafanaException, niquests.exceptions.RequestException) as exc:
        raise PosflowError(
            f"cannot reach {where} while {what}",
            fix="start Grafana (docker compose up -d grafana) or set POSFLOW_GRAFANA__URL",
            detail=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        ) from None


def _message(exc: GrafanaException) -> str:
    response = exc.response
    if isinstance(response, dict) and "message" in response:
        return str(response["message"])
    return str(exc.message)


def _is_missing(exc: GrafanaClientError) -> bool:
    return bool(exc.status_code == 404)


def _find_datasource(api: Any, settings: GrafanaSettings, ident: str, ours: str) -> Any:
    lookups: list[tuple[str, Callable[[str], Any]]] = [
        ("uid", api.datasource.get_datasource_by_uid),
        ("name", api.datasource.get_datasource_by_name),
    ]
    for kind, lookup in lookups:
        with _step(settings, f"looking up datasource {kind} {ident!r}"):
            try:
                found = lookup(ident)
            except GrafanaClientError as exc:
                if not _is_missing(exc):
                    raise
                found = None
        if found is None:
            continue
        if found.get("type") not in _TYPES[ours]:
            raise PosflowError(
                f"Grafana datasource {ident!r} is of type {found.get('type')!r}, "
                f"expected {' or '.join(sorted(_TYPES[ours]))}",
                fix="point POSFLOW_GRAFANA__POSTGRES_DATASOURCE / __PROMETHEUS_DATASOURCE "
                "at the right datasource",
            )
        return found
    raise PosflowError(
        f"Grafana at {settings.url} has no datasource with uid or name {ident!r}",
        fix="provision it (deploy/grafana/provisioning/datasources) or set "
        "POSFLOW_GRAFANA__POSTGRES_DATASOURCE / __PROMETHEUS_DATASOURCE",
    )


def map_datasources(node: Any, mapping: Mapping[str, Mapping[str, str]]) -> Any:
    """A copy of a dashboard's JSON with every datasource reference of ours replaced."""
    if isinstance(node, dict):
        uid = node.get("uid")
        if set(node) == {"type", "uid"} and isinstance(uid, str) and uid in mapping:
            return dict(mapping[uid])
        return {key: map_datasources(value, mapping) for key, value in node.items()}
    if isinstance(node, list):
        return [map_datasources(item, mapping) for item in node]
    return node


def _ensure_folder(api: Any, settings: GrafanaSettings) -> str:
    with _step(settings, f"looking up folder {settings.folder_uid!r}"):
        try:
            return str(api.folder.get_folder(settings.folder_uid)["uid"])
        except GrafanaClientError as exc:
            if not _is_missing(exc):
                raise
    with _step(settings, f"creating folder {settings.folder!r}"):
        created = api.folder.create_folder(settings.folder, uid=settings.folder_uid)
    return str(created["uid"])


def publish(
    settings: GrafanaSettings,
    dashboards: Mapping[str, dict[str, Any]],
    *,
    overwrite: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Published]:
    """Push ``dashboards`` (file name -> dashboard JSON) into the configured folder."""
    api = _client(settings)
    with _step(settings, "checking its health"):
        info = api.health.check() or {}
    progress(f"Grafana {info.get('version', '?')} at {settings.url}")
    folder_uid = _ensure_folder(api, settings)
    mapping: dict[str, dict[str, str]] = {}
    idents = {PG_UID: settings.postgres_datasource, PROM_UID: settings.prometheus_datasource}
    for ours, ident in idents.items():
        found = _find_datasource(api, settings, ident, ours)
        mapping[ours] = {"type": str(found["type"]), "uid": str(found["uid"])}
        progress(f"datasource {ours} -> {found.get('name', ident)} ({found['uid']})")
    published = []
    for name, dashboard in dashboards.items():
        body = map_datasources(dashboard, mapping)
        body["id"] = None  # Grafana matches on uid; a numeric id would be another instance's
        with _step(settings, f"saving dashboard {name!r}"):
            result = api.dashboard.update_dashboard(
                {
                    "dashboard": body,
                    "folderUid": folder_uid,
                    "overwrite": overwrite,
                    "message": "posflow dashboards publish",
                }
            )
        published.append(
            Published(
                name, str(result["uid"]), str(result.get("url", "")), int(result.get("version", 0))
            )
        )
        progress(f"{name}: {result.get('url', result['uid'])} (version {result.get('version')})")
    return published
