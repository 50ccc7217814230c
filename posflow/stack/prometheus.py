"""Prometheus, scraping itself and every posflow service's /metrics."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from typing import Any

from posflow.settings import Settings
from posflow.stack._install import ensure_debian_packages
from posflow.stack._service import Port, StackService

__all__ = ["PrometheusService", "render_prometheus_config", "scrape_jobs"]


def scrape_jobs(settings: Settings) -> dict[str, str]:
    """Job name -> target address of each posflow service's metrics endpoint."""
    ports = settings.services
    return {
        "posflow-ingest": f"127.0.0.1:{ports.ingest}",
        "posflow-streams": f"127.0.0.1:{ports.streams}",
        "posflow-alerts": f"127.0.0.1:{ports.alerts}",
        "posflow-api": f"127.0.0.1:{ports.api}",
        "posflow-simulator": f"127.0.0.1:{ports.simulator}",
        "posflow-rawsink": f"127.0.0.1:{ports.rawsink}",
        "posflow-settlement": f"127.0.0.1:{ports.settlement}",
        "posflow-webhooks": f"127.0.0.1:{settings.api.webhook_port}",
    }


def render_prometheus_config(settings: Settings) -> str:
    """prometheus.yml as JSON (a YAML subset), so no YAML writer is needed."""
    prom = settings.prometheus
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "prometheus",
            "static_configs": [{"targets": [f"{prom.host}:{prom.port}"]}],
        }
    ]
    jobs += [
        {"job_name": job, "static_configs": [{"targets": [target]}]}
        for job, target in scrape_jobs(settings).items()
    ]
    config = {
        "global": {
            "scrape_interval": f"{prom.scrape_interval_s}s",
            "evaluation_interval": f"{prom.scrape_interval_s}s",
            "external_labels": {"stack": "posflow-local"},
        },
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2) + "\n"


class PrometheusService(StackService):
    name = "prometheus"

    @property
    def ports(self) -> list[Port]:
        p = self.settings.prometheus
        return [Port(p.host, p.port, "POSFLOW_PROMETHEUS__PORT")]

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def install(self) -> None:
        ensure_debian_packages(
            {"/usr/bin/prometheus": "prometheus"},
            install=self.settings.stack.install,
            log_path=self.settings.stack.root / "logs" / "install.log",
        )

    def configure(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(render_prometheus_config(self.settings))

    def argv(self) -> list[str]:
        return [
            "/usr/bin/prometheus",
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            "--storage.tsdb.retention.time=7d",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def version(self) -> str:
        out = subprocess.run(
            ["/usr/bin/prometheus", "--version"], capture_output=True, text=True, check=False
        )
        text = (out.stdout or out.stderr).splitlines()
        return text[0].split(" (")[0].replace("prometheus, version", "Prometheus") if text else ""
