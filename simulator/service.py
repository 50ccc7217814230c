"""`posflow simulate` as a service: /metrics while it runs, a clean stop on SIGTERM / SIGINT.

The main job runs the simulator next to the pipeline and reads its counters from
``/metrics`` on ``services.simulator`` (9405). A stop publishes nothing more, waits
briefly for the PUBACKs of what is in flight, and disconnects every terminal with a
clean MQTT DISCONNECT: stopping the simulator is not the terminals failing, so the
broker publishes no Last Will. Their retained status stays "online"; a pipeline that
keeps running sees them go silent and marks them offline by its own timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from posflow.cost import Handled
from posflow.errors import PosflowError
from posflow.http import start_http
from posflow.runtime import install_stop_signals
from posflow.settings import Settings
from simulator.engine import Message, Run
from simulator.fleet import Fleet
from simulator.metrics import SimMetrics
from simulator.register import register_fleet
from simulator.runner import DriveResult, drive

__all__ = ["SimulateOptions", "Simulation", "build", "serve_metrics"]

log = logging.getLogger("posflow.simulator")


@dataclass(frozen=True)
class SimulateOptions:
    speed: float = 1.0
    max_real: int = 19_000
    gateways: int = 8
    register: bool = True
    run_id: str = "sim"
    tls: bool = False  # certificates on the TLS listener instead of passwords


async def serve_metrics(
    settings: Settings, metrics: SimMetrics, ready: Callable[[], bool], *, required: bool
) -> web.AppRunner | None:
    """/metrics /healthz /readyz on ``services.simulator``; a busy port is an error only
    when ``required`` (``posflow simulate``; the load test carries on without)."""
    s = settings.services
    try:
        handled = Handled("simulator", ("posflow_sim_published",))
        return await start_http(s.bind_host, s.simulator, metrics.registry, ready, handled=handled)
    except OSError as exc:
        if required:
            raise PosflowError(
                f"cannot serve the simulator's metrics on {s.bind_host}:{s.simulator}: "
                f"{exc.strerror or exc}",
                fix="stop the other `posflow simulate` / `loadtest`, or set "
                "POSFLOW_SERVICES__SIMULATOR to a free port",
            ) from None
        log.warning("simulator metrics port %d busy (%s): no /metrics for this run",
                    s.simulator, exc.strerror or exc)  # fmt: skip
        return None


@dataclass
class Simulation:
    """One fleet run: its metrics endpoint, its stop signal, the drive over MQTT."""

    settings: Settings
    fleet: Fleet
    run: Run
    options: SimulateOptions
    metrics: SimMetrics
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stopped_by: str | None = None
    registered: bool = False
    result: DriveResult | None = None
    started: float = field(default_factory=time.monotonic)

    def request_stop(self, why: str) -> None:
        if not self.stop.is_set():
            log.info("stopping on %s: no more messages, clean disconnects", why)
            self.stopped_by = why
            self.stop.set()

    def ready(self) -> bool:
        return self.registered and not self.stop.is_set()

    async def run_until_done(self) -> DriveResult | None:
        """Until the run's duration passes or SIGTERM / SIGINT; None if stopped before it began."""
        install_stop_signals(self.stop, on_stop=self.request_stop)
        runner = None
        try:
            runner = await serve_metrics(self.settings, self.metrics, self.ready, required=True)
            s = self.settings.services
            log.info("simulating %d terminals of fleet %s; metrics on http://%s:%d/metrics",
                     self.metrics.terminals_total, self.fleet.name, s.bind_host,
                     s.simulator)  # fmt: skip
            if self.options.register:
                # Not interruptible (a few seconds for thousands of accounts): a stop
                # during it takes effect right after, before anything is published.
                await asyncio.to_thread(
                    register_fleet, self.settings, self.fleet, certificates=self.options.tls
                )
            self.registered = True
            if self.stop.is_set():
                return None
            self.result = await drive(
                self.settings, self.fleet, self.run, on_sent=_ignore,
                max_real=self.options.max_real, gateways=self.options.gateways,
                speed=self.options.speed, run_id=self.options.run_id,
                metrics=self.metrics, stop=self.stop, tls=self.options.tls,
            )  # fmt: skip
            return self.result
        finally:
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()

    def summary(self) -> str:
        line = self.metrics.summary()
        took = time.monotonic() - self.started
        if self.stopped_by:
            return f"{line}; stopped by {self.stopped_by} after {took:.1f} s"
        return f"{line}; finished after {took:.1f} s"


def _ignore(_m: Message) -> None:
    pass


def build(settings: Settings, fleet: Fleet, run: Run, options: SimulateOptions) -> Simulation:
    """The composition root of ``posflow simulate``."""
    return Simulation(settings, fleet, run, options, SimMetrics(terminals_total=len(run.states)))
