"""Every metric a PromQL panel names is exported by a real service (or by Prometheus).

`posflow ingest` and `posflow streams worker` run as subprocesses on their own
ports, topics and app id; their /metrics are scraped directly (the stack's
Prometheus scrapes only the fixed default ports). Names come from the
exposition's metric families, with the suffixes each type exposes (a counter
``x`` is ``x_total``, a histogram ``x_bucket``/``x_sum``/``x_count``). Every
expression must also parse in the stack's real Prometheus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboards import catalog
from dashboards.promql import metric_names
from posflow.settings import KafkaSettings, Settings
from posflow.stack import Stack, ensure_topics
from tests.conftest import ROOT, free_port, unique

pytestmark = pytest.mark.slow

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
# Series Prometheus itself adds to every scrape target.
_PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _get(url: str, timeout: float = 2) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def exported_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def scraped(settings: Settings, stack: Stack) -> Iterator[set[str]]:
    prefix = unique("d").replace("-", "")
    ingest_port, streams_port = free_port(), free_port()
    env = {
        **os.environ,
        "POSFLOW_KAFKA__TOPIC_PREFIX": prefix,
        "POSFLOW_KAFKA__DEFAULT_PARTITIONS": "1",
        "POSFLOW_INGEST__CLIENT_ID": unique("ingest"),
        "POSFLOW_INGEST__SHARE_GROUP": unique("g"),
        "POSFLOW_INGEST__TOPIC_FILTER": f"pos/v1/{unique('M')}/+/+",
        "POSFLOW_SERVICES__INGEST": str(ingest_port),
        "POSFLOW_STREAMS__APP_ID": unique("dash-health"),
        "POSFLOW_SERVICES__STREAMS": str(streams_port),
    }
    isolated = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                **{**settings.kafka.model_dump(), "topic_prefix": prefix, "default_partitions": 1}
            )
        }
    )
    import asyncio

    asyncio.run(ensure_topics(isolated))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "posflow.cli", *command],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for command in (["ingest"], ["streams", "worker"])
    ]
    try:
        names: set[str] = set()
        for port in (ingest_port, streams_port):
            deadline = time.monotonic() + 90
            status, text = 0, ""
            while time.monotonic() < deadline and status != 200:
                status, text = _get(f"http://127.0.0.1:{port}/metrics")
                if status != 200:
                    time.sleep(0.3)
            assert status == 200, f"no /metrics on port {port}"
            names |= exported_names(text)
        yield names
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_every_promql_metric_is_exported_by_a_running_service(scraped: set[str]) -> None:
    assert "posflow_ingest_received_total" in scraped  # the scrape itself worked
    assert "posflow_streams_end_to_end_seconds_bucket" in scraped
    missing = {
        (t.dashboard, t.where, name)
        for t in catalog.prom_targets()
        for name in metric_names(t.expr)
        if name not in scraped and name not in _PROMETHEUS_OWN
    }
    assert not missing


def test_prometheus_own_series_exist_in_the_stack_prometheus(settings: Settings) -> None:
    base = f"http://{settings.prometheus.host}:{settings.prometheus.port}"
    status, body = _get(f"{base}/api/v1/label/__name__/values", timeout=10)
    assert status == 200
    known = set(json.loads(body)["data"])
    used = {n for t in catalog.prom_targets() for n in metric_names(t.expr)} & _PROMETHEUS_OWN
    assert used == {"up"}
    assert used <= known


def test_every_promql_expression_parses_in_the_real_prometheus(settings: Settings) -> None:
    base = f"http://{settings.prometheus.host}:{settings.prometheus.port}"
    errors = []
    for target in catalog.prom_targets():
        # Grafana replaces $__rate_interval with at least 4 scrape intervals.
        expr = target.expr.replace("$__rate_interval", "1m")
        status, body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200 or json.loads(body)["status"] != "success":
            errors.append((target.where, expr, body[:200]))
    assert not errors
