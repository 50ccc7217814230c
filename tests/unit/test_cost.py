"""Every service's /metrics says what it costs: CPU seconds and messages handled."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from posflow.cost import Handled, cost_registry, exposition, handled_total
from posflow.http import start_http
from tests.conftest import free_port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_messages_handled_sums_every_label_of_the_named_counters_and_histogram_sums() -> None:
    registry = CollectorRegistry()
    received = Counter("svc_received", "h", ["kind"], registry=registry)
    refused = Counter("svc_refused", "h", registry=registry)
    batch = Histogram("svc_batch_records", "h", buckets=(10, 100), registry=registry)
    Counter("svc_other", "h", registry=registry).inc(1000)  # not named: not counted
    received.labels("telemetry").inc(7)
    received.labels("txn").inc(2)
    refused.inc()
    batch.observe(40)
    batch.observe(60)

    assert handled_total(registry, Handled("svc", ("svc_received", "svc_refused"))) == 10
    assert handled_total(registry, Handled("svc", ("svc_batch_records",))) == 100
    assert handled_total(registry, Handled("svc", ("svc_missing",))) == 0


def test_exposition_adds_the_process_cpu_and_the_uniform_messages_handled_counter() -> None:
    registry = CollectorRegistry()
    Counter("svc_received", "h", registry=registry).inc(5)
    text = exposition(registry, cost_registry(registry, Handled("ingest", ("svc_received",))))
    samples = _samples(text.decode())

    assert samples[("svc_received_total", ())] == 5  # the service's own, unchanged
    assert samples[("posflow_messages_handled_total", (("service", "ingest"),))] == 5
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_without_handled_only_the_process_figures_are_added() -> None:
    registry = CollectorRegistry()
    text = exposition(registry, cost_registry(registry, None)).decode()
    assert "process_cpu_seconds_total" in text
    assert "posflow_messages_handled" not in text


async def test_every_service_endpoint_serves_its_cost_on_metrics() -> None:
    registry = CollectorRegistry()
    handled = Counter("svc_events", "h", ["type"], registry=registry)
    port = free_port()
    runner = await start_http(
        "127.0.0.1", port, registry, lambda: True, handled=Handled("health", ("svc_events",))
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            handled.labels("telemetry").inc(3)
            async with session.get(url) as resp:
                first = _samples(await resp.text())
            handled.labels("status").inc(2)
            async with session.get(url) as resp:
                second = _samples(await resp.text())
        key = ("posflow_messages_handled_total", (("service", "health"),))
        assert (first[key], second[key]) == (3, 5)  # read from the service's own at scrape time
        assert second[("process_cpu_seconds_total", ())] >= first[("process_cpu_seconds_total", ())]
    finally:
        await runner.cleanup()
