"""The stack's Grafana: where it comes from, and the files it is started with."""

from __future__ import annotations

import configparser
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from posflow.errors import PosflowError
from posflow.settings import (
    GrafanaSettings,
    PostgresSettings,
    PrometheusSettings,
    SecuritySettings,
    Settings,
    StackSettings,
)
from posflow.stack import Stack
from posflow.stack.grafana import (
    DASHBOARDS_DIR,
    PROVISIONING_DIR,
    GrafanaInstall,
    NoGrafana,
    find_grafana,
    render_dashboard_provider,
    render_datasources,
    render_grafana_ini,
)


def _fake_home(path: Path, binary: str = "grafana-server") -> Path:
    """The layout of a Grafana release: bin/<server>, conf/defaults.ini, public/."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / binary).write_text("#!/bin/sh\necho 'Version 9.9.9 (commit: x)'\n")
    (path / "bin" / binary).chmod(0o755)
    (path / "conf").mkdir()
    (path / "conf" / "defaults.ini").write_text("[server]\n")
    (path / "public").mkdir()
    return path


def _settings(tmp_path: Path, **grafana: Any) -> Settings:
    return Settings(
        stack=StackSettings(dir=tmp_path / "stack", install=False),
        grafana=GrafanaSettings(**grafana),
    )


@pytest.fixture
def no_grafana_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_a_home_folder_setting_is_used_as_is(tmp_path: Path) -> None:
    home = _fake_home(tmp_path / "grafana-9.9.9")
    found = find_grafana(_settings(tmp_path, source=str(home)))
    assert found == GrafanaInstall(
        home, (str(home / "bin" / "grafana-server"),), f"home {home.resolve()}"
    )


def test_an_archive_is_unpacked_once_into_the_cache(tmp_path: Path) -> None:
    home = _fake_home(tmp_path / "src" / "grafana-9.9.9")
    archive = tmp_path / "grafana-9.9.9.linux-amd64.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(home, arcname="grafana-9.9.9")
    settings = _settings(tmp_path, source=str(archive))
    assert find_grafana(settings, unpack=False) == NoGrafana(
        f"{archive.name} is not unpacked yet (`posflow stack up` does)"
    )
    found = find_grafana(settings)
    unpacked = settings.stack.cache / "grafana" / "grafana-9.9.9.linux-amd64"
    assert isinstance(found, GrafanaInstall)
    assert found.home == unpacked
    assert found.command == (str(unpacked / "bin" / "grafana-server"),)
    assert (unpacked / "conf" / "defaults.ini").read_text() == "[server]\n"
    marker = unpacked / "unpacked-once"
    marker.write_text("x")
    assert find_grafana(settings) == found
    assert marker.exists()  # not unpacked again
    assert [p.name for p in unpacked.parent.iterdir()] == [unpacked.name]  # no leftovers


def test_a_source_that_is_not_grafana_is_an_error_not_a_skip(tmp_path: Path) -> None:
    (tmp_path / "not-grafana").mkdir()
    with pytest.raises(PosflowError, match="is not a Grafana home"):
        find_grafana(_settings(tmp_path, source=str(tmp_path / "not-grafana")))
    with pytest.raises(PosflowError, match=r"no such folder or \.tar\.xz/\.tar\.gz archive"):
        find_grafana(_settings(tmp_path, source=str(tmp_path / "missing.tar.xz")))


def test_grafana_server_on_path_is_found_with_its_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fake_home(tmp_path / "opt" / "grafana")
    monkeypatch.setenv("PATH", str(home / "bin"))
    found = find_grafana(_settings(tmp_path))
    assert found == GrafanaInstall(
        home, (str(home / "bin" / "grafana-server"),), "grafana-server on PATH"
    )


def test_the_newer_grafana_binary_runs_as_grafana_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fake_home(tmp_path / "opt" / "grafana", binary="grafana")
    monkeypatch.setenv("PATH", str(home / "bin"))
    found = find_grafana(_settings(tmp_path))
    assert isinstance(found, GrafanaInstall)
    assert found.command == (str(home / "bin" / "grafana"), "server")


@pytest.mark.usefixtures("no_grafana_on_path")
def test_without_any_grafana_the_stack_skips_it_and_says_why(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    found = find_grafana(settings)
    assert isinstance(found, NoGrafana)
    assert "POSFLOW_GRAFANA__SOURCE" in found.reason
    stack = Stack(settings)
    lines: list[str] = []
    stack.up(["grafana"], progress=lines.append)
    assert lines == [f"grafana    skipped: {found.reason}"]
    [row] = [r for r in stack.status() if r.name == "grafana"]
    assert (row.state, row.detail, row.version) == ("not available", found.reason, "not installed")


def test_ini_uses_the_stack_folders_and_loopback_port_with_no_anonymous_access(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, port=13123, user="ops", password=SecretStr("pw-in-env-only"))
    text = render_grafana_ini(settings, tmp_path / "g")
    ini = configparser.ConfigParser()
    ini.read_string(text)
    assert dict(ini["paths"]) == {
        "data": str(tmp_path / "g" / "data"),
        "logs": str(tmp_path / "g" / "logs"),
        "plugins": str(tmp_path / "g" / "plugins"),
        "provisioning": str(tmp_path / "g" / "provisioning"),
    }
    assert (ini["server"]["http_addr"], ini["server"]["http_port"]) == ("127.0.0.1", "13123")
    assert ini["auth.anonymous"]["enabled"] == "false"
    assert ini["security"]["admin_user"] == "ops"
    assert "pw-in-env-only" not in text


def test_datasources_are_deploys_with_the_stack_addresses(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        postgres=PostgresSettings(port=25432, database="pf", user="u"),
        prometheus=PrometheusSettings(port=29090),
    )
    ours = json.loads(render_datasources(settings, timescaledb=False))
    compose = yaml.safe_load((PROVISIONING_DIR / "datasources" / "datasources.yml").read_text())
    pg, prom = ours["datasources"]
    assert (pg["uid"], pg["type"], pg["url"], pg["user"]) == (
        "posflow-pg",
        "postgres",
        "127.0.0.1:25432",
        "u",
    )
    assert pg["jsonData"]["database"] == pg["database"] == "pf"
    assert pg["jsonData"]["timescaledb"] is False
    assert pg["secureJsonData"] == {"password": "${POSFLOW_POSTGRES__PASSWORD}"}
    assert (prom["uid"], prom["url"]) == ("posflow-prom", "http://127.0.0.1:29090")
    # Everything else is docker-compose's file, unchanged.
    for mine, theirs in zip(ours["datasources"], compose["datasources"], strict=True):
        changed = {"url", "user", "database", "jsonData"}
        assert {k: v for k, v in mine.items() if k not in changed} == {
            k: v for k, v in theirs.items() if k not in changed
        }
        assert mine["jsonData"]["timeInterval"] == theirs["jsonData"]["timeInterval"]


def test_dashboards_are_provisioned_from_the_repository_into_folder_posflow() -> None:
    [provider] = json.loads(render_dashboard_provider())["providers"]
    assert provider["options"]["path"] == str(DASHBOARDS_DIR)
    assert (provider["folder"], provider["folderUid"]) == ("posflow", "posflow")
    assert provider["allowUiUpdates"] is False
    assert sorted(p.stem for p in DASHBOARDS_DIR.glob("*.json")) == [
        "alerts",
        "fleet",
        "merchant",
        "pipeline",
        "terminal",
    ]


def test_production_profile_refuses_the_default_admin_password(tmp_path: Path) -> None:
    settings = Settings(
        stack=StackSettings(dir=tmp_path),
        security=SecuritySettings(profile="production"),
    )
    with pytest.raises(PosflowError, match="refuses Grafana's development admin password"):
        Stack(settings).grafana.configure()
    fine = settings.model_copy(update={"grafana": GrafanaSettings(password=SecretStr("long-1"))})
    Stack(fine).grafana.configure()
    assert (tmp_path / "grafana" / "grafana.ini").exists()


def test_grafana_url_defaults_to_the_stacks() -> None:
    assert GrafanaSettings().url == "http://127.0.0.1:13000"
    assert GrafanaSettings(port=14000).url == "http://127.0.0.1:14000"
    assert GrafanaSettings(url="https://grafana.example", port=14000).url == (
        "https://grafana.example"
    )


def test_the_secret_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    service = Stack(_settings(tmp_path)).grafana
    first = service.env()["GF_SECURITY_SECRET_KEY"]
    assert service.env()["GF_SECURITY_SECRET_KEY"] == first
    assert len(first) >= 32
    assert (service.dir / "secret_key").stat().st_mode & 0o777 == 0o600
