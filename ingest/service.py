"""`posflow ingest`: the bridge as a service on the shared runtime (endpoints, signals, drain)."""

from __future__ import annotations

from dataclasses import dataclass

from ingest.bridge import Bridge
from ingest.metrics import BridgeMetrics
from posflow.cost import Handled
from posflow.runtime import Endpoints, run_service
from posflow.settings import Settings

__all__ = ["IngestService", "build"]


@dataclass
class IngestService:
    bridge: Bridge
    endpoints: Endpoints

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then drain and exit."""
        await run_service("ingest", self.endpoints, self.bridge.run)


def build(settings: Settings) -> IngestService:
    """The composition root of the ingest service."""
    bridge = Bridge(settings, BridgeMetrics())
    s = settings.services
    return IngestService(
        bridge=bridge,
        endpoints=Endpoints(
            s.bind_host,
            s.ingest,
            bridge.metrics.registry,
            bridge.is_ready,
            handled=Handled("ingest", ("posflow_ingest_received",)),
        ),
    )
