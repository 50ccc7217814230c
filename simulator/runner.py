"""Driving a run in real (or sped-up) time over MQTT, and the pipeline processes it feeds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
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


Progress = Callable[[float, TransportStats, int, int], None]  # run time, stats, connected, queued


async def drive(
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
) -> DriveResult:
    """Publish ``run`` paced at ``speed`` x real time; then wait for acknowledgements."""
    m = settings.mosquitto
    user, password = gateway_account(settings, fleet.name)
    fan = Fanout(
        terminals={i: (t.terminal_id, t.terminal_id, t.password)
                   for i, t in enumerate(fleet.terminals) if i in run.states},
        host=m.host, port=m.port, max_real=max_real, gateways=gateways,
        gateway_user=user, gateway_password=password, on_sent=on_sent,
        seed=fleet.seed, run_id=run_id,
    )  # fmt: skip
    await fan.start()
    start = time.monotonic()
    last_misc = start
    peak = 0
    try:
        while True:
            now = time.monotonic()
            sim = (now - start) * speed
            for msg in run.until(sim):
                fan.send(msg)
            if now - last_misc > 2.0:
                fan.misc()
                last_misc = now
                connected = fan.connected()
                peak = max(peak, connected)
                if progress is not None:
                    progress(min(sim, run.duration_s), fan.stats, connected, fan.queued())
            if run.done and sim >= run.duration_s:
                break
            await asyncio.sleep(_STEP_S)
        wall = time.monotonic() - start
        deadline = time.monotonic() + drain_s
        # QoS 1: done when the broker acknowledged everything handed to it.
        while time.monotonic() < deadline and (
            fan.stats.acked + fan.stats.abandoned < fan.stats.published or fan.queued()
        ):
            fan.misc()
            await asyncio.sleep(0.1)
        peak = max(peak, fan.connected())
        if progress is not None:
            progress(run.duration_s, fan.stats, fan.connected(), fan.queued())
        unacked = fan.stats.published - fan.stats.acked - fan.stats.abandoned
        return DriveResult(fan.stats, wall, unacked, fan.queued(), peak)
    finally:
        await fan.close()


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

    def start(self, *, worker: bool = True, settlement: bool = False) -> None:
        self.ports = {"ingest": _free_port(), "streams": _free_port(), "settlement": _free_port()}
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
        }
        if self.database is not None:
            env["POSFLOW_POSTGRES__DATABASE"] = self.database
        commands = {"ingest": ["ingest"]}
        if worker:
            commands["streams"] = ["streams", "worker"]
        if settlement:
            commands["settlement"] = ["settlement", "worker"]
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
