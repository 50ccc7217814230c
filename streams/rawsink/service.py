"""The raw sink as a service: its composition root and the shared runtime around it."""

from __future__ import annotations

from dataclasses import dataclass

from posflow.runtime import Endpoints, run_service
from posflow.security import refuse_dev_defaults
from posflow.settings import Settings
from streams.rawsink.metrics import RawSinkMetrics
from streams.rawsink.sink import RawSink

__all__ = ["RawSinkService", "build"]


@dataclass
class RawSinkService:
    settings: Settings
    sink: RawSink

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; the batch in flight is written and committed first."""
        services = self.settings.services
        endpoints = Endpoints(
            services.bind_host, services.rawsink, self.sink.metrics.registry, self.sink.is_ready
        )
        await run_service("raw sink", endpoints, self.sink.run)


def build(settings: Settings) -> RawSinkService:
    """The composition root; call it inside the running event loop (aiokafka clients)."""
    refuse_dev_defaults(settings)
    return RawSinkService(settings, RawSink(settings, RawSinkMetrics()))
