"""The load test's cost table: CPU microseconds per message, per stage, from /proc.

Each process's CPU (user + system, ``/proc/<pid>/stat``) between two samples, over
the messages it handled in the same interval (a posflow service's
``posflow_messages_handled_total``, see :mod:`posflow.cost`) and over the messages
the run published. The brokers and the simulator have no "handled" of their own here:
their cost is per message published. The posflow services' sum per message published,
and per telemetry message published, is the pipeline's cost (issue 18's target:
<= 200 us per telemetry message).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from posflow.cost import MESSAGES_HANDLED
from simulator.procstat import ProcSample

__all__ = [
    "POSFLOW_STAGES",
    "cost_markdown",
    "cost_table",
    "messages_handled",
    "metrics_text",
    "proc_usage",
    "until_handled_still",
]

# The load test's process group -> the stage it is, in pipeline order.
POSFLOW_STAGES = {
    "ingest": "ingest",
    "streams": "health",
    "sink": "raw sink",
    "settlement": "settlement",
    "alerts": "alerts",
}


def _per(cpu_s: float, count: float) -> float | None:
    return round(cpu_s * 1e6 / count, 1) if count > 0 else None


def proc_usage(
    before: Mapping[str, ProcSample | None],
    after: Mapping[str, ProcSample | None],
    peaks: Mapping[str, float],
) -> dict[str, Any]:
    """CPU % of one core between the two samples, and memory (at the end, peak)."""
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None or b is None:
            continue
        out[name] = {
            "cpu_pct_of_one_core": round(100 * (a.cpu_s - b.cpu_s) / max(a.at - b.at, 1e-9), 1),
            "rss_mb_end": round(a.rss_mb, 1),
            "rss_mb_peak": round(max(peaks.get(name, 0.0), a.rss_mb), 1),
        }
    return out


def cost_table(
    before: Mapping[str, ProcSample | None],
    after: Mapping[str, ProcSample | None],
    handled: Mapping[str, float],
    *,
    published: int,
    telemetry: int,
) -> dict[str, Any]:
    """CPU per message of every process group sampled ``before`` and ``after`` (a group
    missing in either, e.g. one that died, is left out). ``handled``: messages each
    posflow stage handled between the two samples; ``published``, ``telemetry``: what
    the run published (all kinds; telemetry alone)."""
    rows: list[dict[str, Any]] = []
    posflow_cpu = 0.0
    for group, b in before.items():
        a = after.get(group)
        if a is None or b is None:
            continue
        cpu = max(0.0, a.cpu_s - b.cpu_s)
        stage = POSFLOW_STAGES.get(group)
        role = "posflow" if stage else "simulator" if group == "simulator" else "broker"
        count = handled.get(group) if stage else None
        if stage:
            posflow_cpu += cpu
        rows.append({
            "process": stage or group,
            "role": role,
            "cpu_s": round(cpu, 3),
            "cpu_pct_of_one_core": round(100 * cpu / max(a.at - b.at, 1e-9), 1),
            "messages_handled": None if count is None else int(count),
            "cpu_us_per_message_handled": None if count is None else _per(cpu, count),
            "cpu_us_per_message_published": _per(cpu, published),
        })  # fmt: skip
    order = [*POSFLOW_STAGES.values()]
    rows.sort(key=lambda r: (("posflow", "broker", "simulator").index(r["role"]),
                             order.index(r["process"]) if r["process"] in order else 0,
                             r["process"]))  # fmt: skip
    return {
        "published": published,
        "telemetry_published": telemetry,
        "stages": rows,
        "posflow_cpu_s": round(posflow_cpu, 3),
        "posflow_cpu_us_per_message_published": _per(posflow_cpu, published),
        "posflow_cpu_us_per_telemetry_message": _per(posflow_cpu, telemetry),
    }


def cost_markdown(cost: Mapping[str, Any]) -> list[str]:
    """The table as Markdown lines (the report's "Cost per message" section)."""

    def show(value: object) -> str:
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    lines = [
        "## Cost per message (CPU from /proc, user + system)",
        "",
        f"{cost['published']:,} messages published, {cost['telemetry_published']:,} of them "
        "telemetry. Messages handled: each service's `posflow_messages_handled_total` "
        "(posflow/cost.py says which counter that is per service).",
        "",
        "| process | role | CPU s | CPU % of one core | messages handled "
        "| CPU µs per message handled | CPU µs per message published |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in cost["stages"]:
        lines.append(
            f"| {r['process']} | {r['role']} | {r['cpu_s']} | {r['cpu_pct_of_one_core']} "
            f"| {show(r['messages_handled'])} | {show(r['cpu_us_per_message_handled'])} "
            f"| {show(r['cpu_us_per_message_published'])} |"
        )
    lines += [
        f"| **posflow services** | sum | {cost['posflow_cpu_s']} | | | "
        f"| **{show(cost['posflow_cpu_us_per_message_published'])}** |",
        "",
        f"posflow services per telemetry message published: "
        f"**{show(cost['posflow_cpu_us_per_telemetry_message'])} µs** (target <= 200 µs).",
        "",
    ]
    return lines


def metrics_text(port: int) -> str:
    """The /metrics text of the service on ``127.0.0.1:port`` (OSError if it does not answer)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def messages_handled(port: int) -> float | None:
    """The service's ``posflow_messages_handled_total`` now (None: no answer, or none)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = metrics_text(port)
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == MESSAGES_HANDLED:
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return None


async def until_handled_still(
    ports: Mapping[str, int], *, still_s: float, timeout_s: float
) -> None:
    """Wait until no service's ``posflow_messages_handled_total`` moved for ``still_s``
    (every stage caught up), or ``timeout_s``: the cost table's messages and CPU are then
    read at one instant, after the work they belong together with."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    last: dict[str, float | None] = {}
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        now = {n: await asyncio.to_thread(messages_handled, port) for n, port in ports.items()}
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= still_s:
            return
        await asyncio.sleep(1.0)
