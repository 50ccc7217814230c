"""What a service costs, on every service's /metrics, under the same names everywhere.

* ``process_cpu_seconds_total`` (user + system), ``process_resident_memory_bytes``,
  open file descriptors, ...: prometheus_client's ``ProcessCollector``, read from
  /proc when /metrics is scraped;
* ``posflow_messages_handled_total{service}``: the messages the service handled,
  summed at scrape time from the service's own counters (:class:`Handled` names
  them), so the hot path pays nothing for it.

CPU seconds over messages handled, between two scrapes, is what a message costs the
service; `posflow loadtest` reads the same two figures (CPU from /proc, messages from
/metrics) into its per-stage table.

Which counters are a service's "messages handled":

| service (``service`` label) | messages handled = the total of |
|---|---|
| `posflow ingest` (ingest) | ``posflow_ingest_received``: MQTT messages received |
| `posflow streams worker` (health) | ``posflow_streams_events``: events processed |
| `posflow streams sink` (rawsink) | ``posflow_rawsink_batch_records``' sum: records written |
| `posflow settlement worker` (settlement) | ``posflow_settlement_records`` (decided) and |
| | ``posflow_settlement_invalid_records`` (refused) |
| `posflow alerts run` (alerts) | ``posflow_alerts_records``: records consumed |
| `posflow api` (api) | ``posflow_api_requests``: HTTP requests |
| `posflow api webhooks deliver` (webhooks) | ``posflow_webhook_attempts``: POSTs tried |
| `posflow simulate` (simulator) | ``posflow_sim_published``: messages handed to MQTT |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

__all__ = ["MESSAGES_HANDLED", "Handled", "cost_registry", "exposition"]

MESSAGES_HANDLED = "posflow_messages_handled"


@dataclass(frozen=True)
class Handled:
    """The service's ``service`` label and the metric families whose totals count the
    messages it handled: counters (their ``_total``) or histograms (their ``_sum``, e.g.
    records per batch)."""

    service: str
    metrics: tuple[str, ...]


class _HandledCollector:
    def __init__(self, registry: CollectorRegistry, handled: Handled) -> None:
        self.registry = registry
        self.handled = handled

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            MESSAGES_HANDLED, "messages this service handled (see posflow.cost)", labels=["service"]
        )
        family.add_metric([self.handled.service], handled_total(self.registry, self.handled))
        yield family


def handled_total(registry: CollectorRegistry, handled: Handled) -> float:
    """The sum of ``handled.metrics``' totals in ``registry`` now."""
    total = 0.0
    for family in registry.collect():
        if family.name not in handled.metrics:
            continue
        wanted = family.name + ("_sum" if family.type in ("histogram", "summary") else "_total")
        total += sum(s.value for s in family.samples if s.name == wanted)
    return total


def cost_registry(registry: CollectorRegistry, handled: Handled | None) -> CollectorRegistry:
    """A registry of the process's own figures (and of ``handled`` over ``registry``),
    served beside ``registry``: the service's registry itself is left as it is."""
    cost = CollectorRegistry(auto_describe=True)
    cost.register(ProcessCollector(registry=None))
    if handled is not None:
        cost.register(_HandledCollector(registry, handled))
    return cost


def exposition(registry: CollectorRegistry, cost: CollectorRegistry) -> bytes:
    """The text of /metrics: the service's metrics, then what it costs."""
    return generate_latest(registry) + generate_latest(cost)
