"""The faust ceiling on this machine: an agent that only counts (bench_streams' baseline).

Usage (bench_streams runs it): python benchmarks/faust_baseline.py TOPIC EVENTS BOOTSTRAP
Prints "BASELINE <events/s> <CPU µs an event>" once EVENTS were consumed, then stops. The
CPU is the whole process's (all threads), from its first batch to its last.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faust

topic_name, wanted, bootstrap = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = faust.App(
    f"baseline-{int(time.time())}",
    broker=f"kafka://{bootstrap}",
    store="memory://",
    datadir=str(Path(tempfile.gettempdir()) / "posflow-faust"),
    web_enabled=False,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
)
source = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
state = {"n": 0, "first": 0.0, "cpu": 0.0}


@app.agent(source)
async def count(stream: Any) -> None:
    async for batch in stream.take(2000, within=0.05):
        if not state["n"]:
            state["first"], state["cpu"] = time.monotonic(), time.process_time()
        state["n"] += len(batch)
        if state["n"] >= wanted:
            counted = state["n"] - len(batch)
            rate = counted / max(time.monotonic() - state["first"], 1e-9)
            cpu_us = (time.process_time() - state["cpu"]) / max(counted, 1) * 1e6
            print(f"BASELINE {rate:.0f} {cpu_us:.0f}", flush=True)
            os._exit(0)  # a measuring helper: no graceful shutdown needed


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]  # no port to share
    app.main()
