"""The harness that runs posflow's services for a run: the demo's and the load test's.

* :func:`posflow_command`: a ``posflow`` subcommand as its own process, exactly as an
  operator runs it (the supervisor, the pipeline below and the main job all use it).
* :func:`answers_ready`: one probe of a service's ``/readyz`` (or ``/healthz``).
* :class:`Pipeline`: the services a load test (or a test) feeds, on their own topics,
  consumer groups, ports and database, started and awaited until ready.
* :func:`stop_processes`: SIGTERM, then a bounded wait (and a kill) for each process.
* :func:`count_rows`: how many of the readings and payments a run published are stored,
  against how many must be (the loss both the demo and the load test report).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from posflow.settings import Settings
from simulator.accounting import expected_rows, wait_for_rows

__all__ = [
    "Pipeline",
    "RowCount",
    "answers_ready",
    "count_rows",
    "posflow_command",
    "stop_processes",
]


def posflow_command(*args: str) -> list[str]:
    """The argv that runs ``posflow <args>`` with this interpreter (and its environment)."""
    return [sys.executable, "-m", "cli", *args]


def answers_ready(port: int, path: str = "/readyz", *, timeout_s: float = 0.5) -> bool:
    """True when the service on ``127.0.0.1:port`` answers 200 on ``path``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            return int(r.status) == 200
    except OSError:
        return False


@dataclass(frozen=True)
class RowCount:
    """A run's readings and payments: expected in the database, and stored there
    (-1: the database never answered)."""

    expected: int
    stored: int

    @property
    def lost(self) -> int:
        return max(0, self.expected - max(0, self.stored))


def count_rows(
    dsn: str,
    fleet: str,
    counts: Mapping[str, Any],
    *,
    timeout_s: float,
    still_s: float,
    since: datetime | None = None,
) -> RowCount:
    """What the simulator's final ``counts`` say must be stored, and what is, once the raw
    sink has it all or stopped moving (see :func:`simulator.accounting.wait_for_rows`)."""
    expected = expected_rows(counts)
    stored = wait_for_rows(dsn, fleet, expected, timeout_s=timeout_s, still_s=still_s, since=since)
    return RowCount(expected, stored)


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), which thousands of MQTT
    client sockets would otherwise race a late-binding service for."""
    rng = random.Random()  # noqa: S311 - a port to try, not a secret
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in 20000-32000")


@dataclass
class Pipeline:
    """`posflow ingest`, `posflow streams worker` (and `posflow settlement worker`) as
    subprocesses on their own topics and database."""

    settings: Settings
    prefix: str
    run_id: str
    database: str | None = None
    log_dir: Path = Path(tempfile.gettempdir())
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(
        self,
        *,
        worker: bool = True,
        settlement: bool = False,
        alerts: bool = False,
        sink: bool = False,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        """Start the services and wait until each is ready; ``alerts``: `posflow alerts run`
        too (its own offsets group, this run's database), ``sink``: `posflow streams sink`
        (telemetry and payments into the time-series tables), ``env_extra``: more settings."""
        names = ("ingest", "streams", "settlement", "alerts", "sink")
        self.ports = {name: _free_port() for name in names}
        env = {
            **os.environ,
            "POSFLOW_KAFKA__TOPIC_PREFIX": self.prefix,
            "POSFLOW_INGEST__CLIENT_ID": f"posflow-ingest-{self.run_id}",
            "POSFLOW_INGEST__SHARE_GROUP": f"sim{self.run_id}",
            "POSFLOW_INGEST__SESSION_EXPIRY_S": "0",
            "POSFLOW_SERVICES__INGEST": str(self.ports["ingest"]),
            "POSFLOW_SERVICES__STREAMS": str(self.ports["streams"]),
            "POSFLOW_STREAMS__APP_ID": f"posflow-health-{self.run_id}",
            "POSFLOW_SERVICES__SETTLEMENT": str(self.ports["settlement"]),
            "POSFLOW_SETTLEMENT__GROUP": f"posflow-settlement-{self.run_id}",
            "POSFLOW_SERVICES__ALERTS": str(self.ports["alerts"]),
            "POSFLOW_ALERTS__GROUP": f"posflow-alerts-{self.run_id}",
            "POSFLOW_SERVICES__RAWSINK": str(self.ports["sink"]),
            "POSFLOW_RAWSINK__GROUP": f"posflow-rawsink-{self.run_id}",
            **(env_extra or {}),
        }
        if self.database is not None:
            env["POSFLOW_POSTGRES__DATABASE"] = self.database
        commands = {"ingest": ["ingest"]}
        if worker:
            commands["streams"] = ["streams", "worker"]
        if settlement:
            commands["settlement"] = ["settlement", "worker"]
        if alerts:
            commands["alerts"] = ["alerts", "run"]
        if sink:
            commands["sink"] = ["streams", "sink"]
        for name, argv in commands.items():
            with (self.log_dir / f"posflow-sim-{self.run_id}-{name}.log").open("wb") as log:
                self.procs[name] = subprocess.Popen(
                    posflow_command(*argv),
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
        try:
            self.wait_ready("ingest", 60)
            if settlement:
                self.wait_ready("settlement", 60)
            if alerts:
                self.wait_ready("alerts", 60)
            if sink:
                self.wait_ready("sink", 60)
            if worker:
                self.wait_ready("streams", 90, path="/healthz")
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, name: str, seconds: float, path: str = "/readyz") -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see its log in {self.log_dir}"
                )
            if answers_ready(self.ports[name], path, timeout_s=1.0):
                return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not ready within {seconds:.0f} s")

    def exited(self) -> dict[str, int]:
        """Processes that are no longer running, with their exit codes."""
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def stop(self) -> None:
        stop_processes(self.procs.values())


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM to each running process, then wait; one not gone in ``timeout`` s is killed."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
