"""`posflow ingest`: the bridge as a service, with its HTTP endpoints and signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from posflow.http import start_http
from posflow.settings import Settings

__all__ = ["IngestService", "build"]

log = logging.getLogger("posflow.ingest")


@dataclass
class IngestService:
    settings: Settings
    bridge: Bridge

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and exit."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = await start_http(
            self.settings.services.bind_host,
            self.settings.services.ingest,
            self.bridge.metrics.registry,
            self.bridge.is_ready,
        )
        log.info(
            "metrics on http://%s:%d/metrics",
            self.settings.services.bind_host,
            self.settings.services.ingest,
        )
        try:
            await self.bridge.start()
            log.info("bridge running")
            await stop.wait()
            log.info("stopping: draining in-flight messages")
            await self.bridge.stop()
        finally:
            await runner.cleanup()


def build(settings: Settings) -> IngestService:
    """The composition root of the ingest service."""
    return IngestService(settings=settings, bridge=Bridge(settings, BridgeMetrics()))
