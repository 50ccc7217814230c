"""Driving a run in real (or sped-up) time over MQTT, and the pipeline processes it feeds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posflow.settings import Settings
from simulator.engine import Message, Run
from simulator.fleet import Fleet
from simulator.metrics import SimMetrics
from simulator.register import gateway_account
from simulator.transport import Fanout, TransportStats

__all__ = ["DriveResult", "Pipeline", "drive"]

_STEP_S = 0.05


@dataclass
class DriveResult:
    stats: TransportStats
    wall_s: float
    unacked: int
    queued: int
    peak_connected: int
    stopped: bool = False  # ended by ``stop`` before the run's duration
    unsent: int = 0  # buffered for an offline terminal when stopped, never handed to MQTT


Progress = Callable[[float, TransportStats, int, int], None]  # run time, stats, connected, queued


async def drive(  # noqa: PLR0912, PLR0915 - one paced loop, then the drain
    settings: Settings,
    fleet: Fleet,
    run: Run,
    *,
    on_sent: Callable[[Message], None],
    max_real: int,
    gateways: int,
    speed: float = 1.0,
    run_id: str = "sim",
    progress: Progress | None = None,
    drain_s: float = 30.0,
    metrics: SimMetrics | None = None,
    stop: asyncio.Event | None = None,
    stop_drain_s: float = 2.0,
    tls: bool = False,
) -> DriveResult:
    """Publish ``run`` paced at ``speed`` x real time; then wait for acknowledgements.

    ``stop`` set: nothing more is handed to MQTT, the PUBACKs of what is in flight are
    awaited for at most ``stop_drain_s``, and every connection ends with a clean
    DISCONNECT, so the broker publishes no Last Will (the retained status stays
    "online"; the health worker marks the terminals offline when they stay silent).

    ``tls``: every terminal (and gateway) connects to the TLS listener with its own
    certificate (`posflow fleet register --certificates`) instead of its password.
    """
    m = settings.mosquitto
    port, contexts = m.port, None
    if tls:
        from posflow.security.tls import terminal_mqtt_tls

        port = m.tls_port

        def contexts(name: str) -> ssl.SSLContext:
            return terminal_mqtt_tls(settings, name)

    user, password = gateway_account(settings, fleet.name)
    if metrics is not None:
        sent = on_sent

        def on_sent(msg: Message) -> None:
            metrics.on_sent(msg)
            sent(msg)

    fan = Fanout(
        terminals={i: (t.terminal_id, t.terminal_id, t.password)
                   for i, t in enumerate(fleet.terminals) if i in run.states},
        host=m.host, port=port, max_real=max_real, gateways=gateways,
        gateway_user=user, gateway_password=password, on_sent=on_sent,
        seed=fleet.seed, run_id=run_id, tls=contexts,
    )  # fmt: skip
    if metrics is not None:
        metrics.stats = fan.stats
        metrics.connected = fan.terminals_connected
        metrics.queued = fan.queued
    # Fault starts in run time, counted per terminal hit when the run reaches them.
    starts = sorted((s.start, s.fault.kind, len(s.terminals & run.states.keys()))
                    for s in run.faults)  # fmt: skip
    starts.reverse()
    stopped = False
    try:
        await fan.start(stop)  # inside the try: a stop while gateways connect still closes them
        start = time.monotonic()
        last_misc = start
        peak = 0
        while not (stopped := stop is not None and stop.is_set()):
            now = time.monotonic()
            sim = (now - start) * speed
            for msg in run.until(sim):
                fan.send(msg)
            while starts and starts[-1][0] <= sim:
                _, kind, hit = starts.pop()
                if metrics is not None:
                    metrics.fault_started(kind, hit)
            if metrics is not None:
                metrics.simulated_s = min(sim, run.duration_s)
            if now - last_misc > 2.0:
                fan.misc()
                last_misc = now
                connected = fan.connected()
                peak = max(peak, connected)
                if metrics is not None:
                    metrics.sample_connected()
                if progress is not None:
                    progress(min(sim, run.duration_s), fan.stats, connected, fan.queued())
            if run.done and sim >= run.duration_s:
                break
            await asyncio.sleep(_STEP_S)
        wall = time.monotonic() - start
        if stopped:
            fan.halt()
            drain_s = stop_drain_s
        deadline = time.monotonic() + drain_s
        # QoS 1: done when the broker acknowledged everything handed to it.
        while time.monotonic() < deadline and (
            fan.stats.acked + fan.stats.abandoned < fan.stats.published or fan.queued()
        ):
            fan.misc()
            await asyncio.sleep(0.05 if stopped else 0.1)
        peak = max(peak, fan.connected())
        if metrics is not None:
            metrics.sample_connected()
        if progress is not None:
            progress(min(wall * speed, run.duration_s), fan.stats, fan.connected(), fan.queued())
        unacked = fan.stats.published - fan.stats.acked - fan.stats.abandoned
        return DriveResult(fan.stats, wall, unacked, fan.queued(), peak, stopped, fan.unsent)
    finally:
        await fan.close()
        if metrics is not None:
            metrics.connected = lambda: 0


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), which thousands of MQTT
    client sockets would otherwise race a late-binding service for."""
    rng = random.Random()
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
                    [sys.executable, "-m", "posflow.cli", *argv],
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
        url = f"http://127.0.0.1:{self.ports[name]}{path}"
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see its log in {self.log_dir}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{name} not ready within {seconds:.0f} s")

    def exited(self) -> dict[str, int]:
        """Processes that are no longer running, with their exit codes."""
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
