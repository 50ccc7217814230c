"""The raw sink's composition root."""

from __future__ import annotations

from posflow.cost import Handled
from posflow.runtime import Endpoints, Service
from posflow.settings import Settings
from streams.rawsink.metrics import RawSinkMetrics
from streams.rawsink.sink import RawSink

__all__ = ["build"]


def build(settings: Settings) -> Service:
    """The raw sink wired whole; ``run()`` runs it until SIGTERM/SIGINT, and the batch in
    flight is written and committed first. Call it inside the running event loop
    (aiokafka clients)."""
    sink = RawSink(settings, RawSinkMetrics())
    s = settings.services
    endpoints = Endpoints(
        s.bind_host, s.rawsink, sink.metrics.registry, sink.is_ready,
        handled=Handled("rawsink", ("posflow_rawsink_batch_records",)),
    )  # fmt: skip
    return Service("raw sink", endpoints, sink.run)
