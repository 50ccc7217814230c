"""The local stack: real Kafka, PostgreSQL, Mosquitto, Prometheus and Grafana on loopback.

``posflow stack up`` installs what is missing, configures each server under
the stack directory (data, logs, pids), starts it as a detached process and
waits until it really answers. ``down`` stops only what it started, by pid.
Grafana runs when one can be had (see :mod:`posflow.stack.grafana`), else
the stack runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from posflow.errors import PosflowError
from posflow.settings import Settings
from posflow.stack._process import check_port_free, log_tail, wait_until
from posflow.stack._service import ServiceStatus, StackService
from posflow.stack.grafana import GrafanaService
from posflow.stack.kafka import KafkaService, ensure_topics
from posflow.stack.mosquitto import MosquittoService, mosquitto_password_hash
from posflow.stack.postgres import PostgresService
from posflow.stack.prometheus import PrometheusService

__all__ = [
    "GrafanaService",
    "KafkaService",
    "MosquittoService",
    "PostgresService",
    "PrometheusService",
    "ServiceStatus",
    "Stack",
    "StackService",
    "ensure_topics",
    "mosquitto_password_hash",
]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


class Stack:
    """The servers of the local stack, in start order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.postgres = PostgresService(settings)
        self.kafka = KafkaService(settings)
        self.mosquitto = MosquittoService(settings)
        self.prometheus = PrometheusService(settings)
        self.grafana = GrafanaService(settings)
        self.services: dict[str, StackService] = {
            s.name: s
            for s in (self.postgres, self.kafka, self.mosquitto, self.prometheus, self.grafana)
        }

    def select(self, names: Iterable[str] | None) -> list[StackService]:
        if not names:
            return list(self.services.values())
        chosen = []
        for name in names:
            if name not in self.services:
                raise PosflowError(
                    f"unknown stack service {name!r}",
                    fix=f"use one of: {', '.join(self.services)}",
                )
            chosen.append(self.services[name])
        return [s for s in self.services.values() if s in chosen]

    def up(self, names: Iterable[str] | None = None, progress: Progress = _quiet) -> None:
        """Install, configure, start and wait for each service; harmless when already up."""
        self.settings.stack.root.mkdir(parents=True, exist_ok=True)
        for service in self.select(names):
            missing = _unavailable(service)
            if missing is not None:
                progress(f"{service.name:<10} skipped: {missing}")
                continue
            started = time.monotonic()
            service._progress = progress
            running = service.process.running()
            if running:
                self._wait_ready(service)
            service.install()
            if running:
                if not service.needs_restart():
                    service.after_ready()
                    progress(f"{service.name:<10} already running on {service.address}")
                    continue
                progress(f"{service.name:<10} restarting to load what was installed")
                service.process.stop(self.settings.stack.stop_timeout_s)
            service.configure()
            for port in service.ports:
                check_port_free(port.host, port.port, service=service.name, setting=port.setting)
            service.process.start(
                service.argv(), cwd=service.dir, env=service.env(), user=service.run_as
            )
            self._wait_ready(service)
            service.after_ready()
            elapsed = time.monotonic() - started
            progress(f"{service.name:<10} ready on {service.address} ({elapsed:.1f} s)")
            for warning in service.warnings():
                progress(f"{service.name:<10} warning: {warning}")

    def _wait_ready(self, service: StackService) -> None:
        timeout = self.settings.stack.start_timeout_s
        if wait_until(service.ready, timeout_s=timeout, alive=service.process.running):
            return
        tail = log_tail(service.log_path)
        if not service.process.running():
            raise PosflowError(
                f"{service.name} exited while starting (log: {service.log_path})",
                fix=f"read the log tail below; `posflow stack logs {service.name}` shows more",
                detail=tail,
            )
        service.process.stop(self.settings.stack.stop_timeout_s)
        raise PosflowError(
            f"{service.name} did not answer on {service.address} within {timeout:.0f} s "
            f"and was stopped (log: {service.log_path})",
            fix="read the log tail below; if the machine is just slow, raise "
            "POSFLOW_STACK__START_TIMEOUT_S",
            detail=tail,
        )

    def down(self, names: Iterable[str] | None = None, progress: Progress = _quiet) -> None:
        """Stop the stack's own processes (by pid), in reverse start order."""
        for service in reversed(self.select(names)):
            if service.process.stop(self.settings.stack.stop_timeout_s):
                progress(f"{service.name:<10} stopped")
            else:
                progress(f"{service.name:<10} was not running")

    def status(self) -> list[ServiceStatus]:
        rows = []
        for service in self.services.values():
            pid = service.process.pid()
            missing = _unavailable(service) if pid is None else None
            if missing is not None:
                state, detail = "not available", missing
            elif pid is None:
                state, detail = "stopped", ""
            elif service.ready():
                state, detail = "running", service.detail()
            else:
                state, detail = "not answering", ""
            rows.append(
                ServiceStatus(
                    name=service.name,
                    state=state,
                    address=service.address,
                    version=_safe_version(service),
                    pid=pid,
                    detail=detail,
                )
            )
        return rows

    def logs(self, name: str, lines: int = 50) -> str:
        service = self.select([name])[0]
        return log_tail(service.log_path, lines)


def _unavailable(service: StackService) -> str | None:
    """Why an optional service cannot run here (None: it can, or it is not optional)."""
    return service.unavailable() if isinstance(service, GrafanaService) else None


def _safe_version(service: StackService) -> str:
    try:
        return service.version()
    except OSError:
        return "not installed"
