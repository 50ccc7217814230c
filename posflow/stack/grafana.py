"""Grafana, with the PostgreSQL and Prometheus datasources and the dashboards provisioned.

No registry these machines reach has Grafana, so the stack runs one only when
it can be had: ``POSFLOW_GRAFANA__SOURCE`` naming a Grafana home folder or a
release archive (``grafana-*.tar.xz``/``.tar.gz``, unpacked once into the
stack's cache), else a ``grafana-server`` or ``grafana`` binary on PATH. With
none of these the stack runs without it (``stack up`` says so in one line); a
source that is set but unusable is an error, never silently skipped.

Provisioning is docker-compose's own (``deploy/grafana/provisioning``), with
the addresses of the compose network replaced by the stack's loopback ones.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from posflow.errors import PosflowError
from posflow.settings import Settings
from posflow.stack._service import DEPLOY_DIR, REPO_ROOT, Port, StackService

__all__ = [
    "DASHBOARDS_DIR",
    "PROVISIONING_DIR",
    "GrafanaInstall",
    "GrafanaService",
    "NoGrafana",
    "basic_auth",
    "find_grafana",
    "render_dashboard_provider",
    "render_datasources",
    "render_grafana_ini",
]

PROVISIONING_DIR = DEPLOY_DIR / "grafana" / "provisioning"
DASHBOARDS_DIR = REPO_ROOT / "dashboards" / "json"
# Where a distribution package keeps Grafana's home (conf/defaults.ini, public/).
_PACKAGE_HOMES = (Path("/usr/share/grafana"), Path("/usr/local/share/grafana"))
_ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class GrafanaInstall:
    """A Grafana server that can run: its home folder and the command that starts it."""

    home: Path
    command: tuple[str, ...]  # ("…/grafana-server",) or ("…/grafana", "server")
    origin: str  # how it was found, for `stack status`


@dataclass(frozen=True)
class NoGrafana:
    """No Grafana to be had; ``reason`` is the one line `stack up` prints."""

    reason: str


def _is_home(path: Path) -> bool:
    return (path / "conf" / "defaults.ini").is_file() and (path / "public").is_dir()


def _command_in(home: Path) -> tuple[str, ...] | None:
    # Grafana 9 ships grafana-server; since 10 `grafana server` is the way (the old name remains).
    if (home / "bin" / "grafana-server").is_file():
        return (str(home / "bin" / "grafana-server"),)
    if (home / "bin" / "grafana").is_file():
        return (str(home / "bin" / "grafana"), "server")
    return None


def _unpacked_home(archive: Path, cache: Path) -> Path:
    """Where an archive is (or will be) unpacked: <cache>/grafana/<archive name>/<top folder>."""
    name = archive.name
    for suffix in _ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return cache / "grafana" / name


def _unpack(archive: Path, target: Path) -> None:
    """Unpack once, atomically: a half-unpacked folder is never taken for a home."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        entries = list(Path(tmp).iterdir())
        # Release archives hold one top folder (grafana-9.3.2/); that folder is the home.
        if len(entries) == 1 and entries[0].is_dir():
            entries[0].rename(target)
        else:
            shutil.copytree(tmp, target)


def find_grafana(settings: Settings, *, unpack: bool = True) -> GrafanaInstall | NoGrafana:
    """The Grafana the stack runs, by setting first, then on PATH.

    A ``source`` that is set but unusable raises :class:`PosflowError` (the
    operator asked for it); nothing found anywhere is a :class:`NoGrafana`.
    ``unpack=False`` never unpacks (for `stack status`): an archive not yet
    unpacked is reported missing.
    """
    source = settings.grafana.source
    if source is not None:
        path = Path(source).expanduser().resolve()
        if path.is_dir():
            command = _command_in(path)
            if command is None or not _is_home(path):
                raise PosflowError(
                    f"POSFLOW_GRAFANA__SOURCE={source} is not a Grafana home "
                    "(bin/grafana-server, conf/defaults.ini and public/ expected)",
                    fix="point it at an unpacked Grafana release or at its .tar.xz archive",
                )
            return GrafanaInstall(path, command, f"home {path}")
        if path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
            home = _unpacked_home(path, settings.stack.cache)
            if not home.exists():
                if not unpack:
                    return NoGrafana(f"{path.name} is not unpacked yet (`posflow stack up` does)")
                _unpack(path, home)
            command = _command_in(home)
            if command is None or not _is_home(home):
                raise PosflowError(
                    f"{path} unpacked into {home} holds no Grafana server",
                    fix="use a Grafana release archive (grafana-<version>.linux-amd64.tar.gz)",
                )
            return GrafanaInstall(home, command, f"archive {path.name}")
        raise PosflowError(
            f"POSFLOW_GRAFANA__SOURCE={source}: no such folder or .tar.xz/.tar.gz archive",
            fix="correct it, or unset it to use a grafana-server found on PATH",
        )
    for binary, extra in (("grafana-server", ()), ("grafana", ("server",))):
        found = shutil.which(binary)
        if found is None:
            continue
        real = Path(found).resolve()
        candidates = (real.parent.parent, *_PACKAGE_HOMES)
        package_home = next((h for h in candidates if _is_home(h)), None)
        if package_home is not None:
            return GrafanaInstall(package_home, (found, *extra), f"{binary} on PATH")
    return NoGrafana(
        "no Grafana server found: set POSFLOW_GRAFANA__SOURCE to a Grafana home or "
        "release archive, or install grafana (grafana-server on PATH)"
    )


def render_grafana_ini(settings: Settings, directory: Path) -> str:
    """grafana.ini: the stack's own folders and loopback port, no anonymous access.

    Secrets (admin password, secret key, the database password) are not in it:
    they reach the server through its environment.
    """
    g = settings.grafana
    sections: dict[str, dict[str, str]] = {
        "paths": {
            "data": str(directory / "data"),
            "logs": str(directory / "logs"),
            "plugins": str(directory / "plugins"),
            "provisioning": str(directory / "provisioning"),
        },
        "server": {
            "http_addr": g.host,
            "http_port": str(g.port),
            "domain": g.host,
            "root_url": f"http://{g.host}:{g.port}/",
        },
        "security": {"admin_user": g.user, "disable_gravatar": "true"},
        "auth.anonymous": {"enabled": "false"},
        "users": {"allow_sign_up": "false", "allow_org_create": "false"},
        "analytics": {
            "reporting_enabled": "false",
            "check_for_updates": "false",
            "check_for_plugin_updates": "false",
        },
        "news": {"news_feed_enabled": "false"},
        # The support team's alerts come from posflow's own engine, not Grafana's.
        "alerting": {"enabled": "false"},
        "unified_alerting": {"enabled": "false"},
        "log": {"mode": "console", "level": "info"},
    }
    lines = ["; written by `posflow stack up`; edits are overwritten on the next start"]
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def render_datasources(settings: Settings, *, timescaledb: bool) -> str:
    """deploy/'s datasources, pointed at the stack's PostgreSQL and Prometheus."""
    config: dict[str, Any] = yaml.safe_load(
        (PROVISIONING_DIR / "datasources" / "datasources.yml").read_text()
    )
    pg, prom = settings.postgres, settings.prometheus
    for source in config["datasources"]:
        if source["type"] in ("postgres", "grafana-postgresql-datasource"):
            source["url"] = f"{pg.host}:{pg.port}"
            source["user"] = pg.user
            source["database"] = source["jsonData"]["database"] = pg.database
            # $__timeGroup uses time_bucket() only when the database has TimescaleDB.
            source["jsonData"]["timescaledb"] = timescaledb
        elif source["type"] == "prometheus":
            source["url"] = f"http://{prom.host}:{prom.port}"
    # JSON is a YAML subset: no YAML writer, and the ${...} secret reference stays as is.
    return json.dumps(config, indent=2) + "\n"


def render_dashboard_provider(dashboards_dir: Path = DASHBOARDS_DIR) -> str:
    """deploy/'s dashboard provider, reading the repository's dashboards/json."""
    config: dict[str, Any] = yaml.safe_load(
        (PROVISIONING_DIR / "dashboards" / "dashboards.yml").read_text()
    )
    for provider in config["providers"]:
        provider["options"]["path"] = str(dashboards_dir)
    return json.dumps(config, indent=2) + "\n"


def _has_timescaledb(settings: Settings) -> bool:
    try:
        with psycopg.connect(settings.postgres.dsn()) as conn:
            row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
            return row.fetchone() is not None
    except psycopg.Error:
        return False


class GrafanaService(StackService):
    name = "grafana"

    def _install(self, *, unpack: bool = True) -> GrafanaInstall:
        found = find_grafana(self.settings, unpack=unpack)
        if isinstance(found, NoGrafana):
            raise PosflowError(found.reason, fix="see docs/operations.md, 'Grafana'")
        return found

    def unavailable(self) -> str | None:
        """Why the stack runs without Grafana (None: it can run one, or already does)."""
        if self.process.running():
            return None
        found = find_grafana(self.settings, unpack=False)
        if isinstance(found, NoGrafana) and self.settings.grafana.source is None:
            return found.reason
        return None

    @property
    def ports(self) -> list[Port]:
        g = self.settings.grafana
        return [Port(g.host, g.port, "POSFLOW_GRAFANA__PORT")]

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def install(self) -> None:
        self._install()

    def configure(self) -> None:
        settings = self.settings
        if settings.grafana.password is None:
            raise PosflowError(
                "the stack's Grafana needs an admin password",
                fix="set POSFLOW_GRAFANA__PASSWORD",
            )
        if settings.security.profile == "production":
            from posflow.security.production import dev_default_settings

            if "POSFLOW_GRAFANA__PASSWORD" in dev_default_settings(settings):
                raise PosflowError(
                    "the production profile refuses Grafana's development admin password",
                    fix="set POSFLOW_GRAFANA__PASSWORD",
                )
        for sub in ("data", "logs", "plugins", "provisioning/datasources",
                    "provisioning/dashboards", "provisioning/plugins",
                    "provisioning/notifiers", "provisioning/alerting"):  # fmt: skip
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "grafana.ini").write_text(render_grafana_ini(settings, self.dir))
        provisioning = self.dir / "provisioning"
        (provisioning / "datasources" / "posflow.yml").write_text(
            render_datasources(settings, timescaledb=_has_timescaledb(settings))
        )
        (provisioning / "dashboards" / "posflow.yml").write_text(render_dashboard_provider())

    def _secret_key(self) -> str:
        """Grafana encrypts stored datasource secrets with it: one per stack, kept."""
        path = self.dir / "secret_key"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def argv(self) -> list[str]:
        found = self._install()
        return [
            *found.command,
            f"--homepath={found.home}",
            f"--config={self.dir / 'grafana.ini'}",
        ]

    def env(self) -> dict[str, str]:
        g = self.settings.grafana
        password = g.password.get_secret_value() if g.password is not None else ""
        return {
            "GF_SECURITY_ADMIN_USER": g.user,
            "GF_SECURITY_ADMIN_PASSWORD": password,
            "GF_SECURITY_SECRET_KEY": self._secret_key(),
            # Read by the datasource provisioning file, as in docker-compose.
            "POSFLOW_POSTGRES__PASSWORD": self.settings.postgres.password.get_secret_value(),
        }

    def _get(self, path: str, *, auth: bool = False) -> Any:
        request = urllib.request.Request(f"{self.url}{path}")  # noqa: S310 - our loopback URL
        if auth:
            request.add_header("Authorization", basic_auth(self.settings))
        with urllib.request.urlopen(request, timeout=3) as resp:  # noqa: S310
            return json.load(resp)

    def ready(self) -> bool:
        try:
            health = self._get("/api/health")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return bool(health.get("database") == "ok")

    def warnings(self) -> list[str]:
        try:
            self._get("/api/org", auth=True)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return [
                    "the admin password differs from POSFLOW_GRAFANA__PASSWORD (Grafana keeps "
                    f"the one of its first start; remove {self.dir / 'data'} to reset it)"
                ]
        except (urllib.error.URLError, OSError):
            pass
        return []

    def version(self) -> str:
        if self.process.running():  # the running server knows best
            try:
                return f"Grafana {self._get('/api/health')['version']}"
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
        try:
            found = find_grafana(self.settings, unpack=False)
        except PosflowError as exc:
            raise OSError(str(exc)) from None
        if isinstance(found, NoGrafana):
            raise OSError(found.reason)
        out = subprocess.run(
            [found.command[0], "-v"], capture_output=True, text=True, check=False, timeout=10
        )
        # "Version 9.3.2 (commit: …)" or "grafana version 11.3.0"
        words = (out.stdout or out.stderr).split()
        return "Grafana " + next((w for w in words if w[:1].isdigit()), "?")

    def detail(self) -> str:
        return f"admin {self.settings.grafana.user}, dashboards in folder posflow"


def basic_auth(settings: Settings) -> str:
    """The Authorization header of the stack's Grafana admin (never logged)."""
    g = settings.grafana
    password = g.password.get_secret_value() if g.password is not None else ""
    return "Basic " + base64.b64encode(f"{g.user}:{password}".encode()).decode()
