"""Driving a run in real (or sped-up) time over MQTT.

The pipeline processes a run feeds (`posflow ingest`, `streams worker`, ...) are started
by the composition layer's harness, :class:`cli.harness.Pipeline`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from posflow.settings import Settings
from simulator.engine import Message, Run
from simulator.fleet import Fleet
from simulator.metrics import SimMetrics
from simulator.register import gateway_account
from simulator.transport import Fanout, TransportStats

__all__ = ["DriveResult", "drive"]

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
            fan.send_many(run.until(sim))
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
