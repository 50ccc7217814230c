"""The faust ceiling on this machine: an agent that only counts (bench_streams' baseline).

Usage (bench_streams runs it): python benchmarks/faust_baseline.py TOPIC EVENTS BOOTSTRAP
Prints "BASELINE <events/s>" once EVENTS were consumed, then stops.
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
state = {"n": 0, "first": 0.0}


@app.agent(source)
async def count(stream: Any) -> None:
    async for batch in stream.take(2000, within=0.05):
        if not state["n"]:
            state["first"] = time.monotonic()
        state["n"] += len(batch)
        if state["n"] >= wanted:
            rate = (state["n"] - len(batch)) / max(time.monotonic() - state["first"], 1e-9)
            print(f"BASELINE {rate:.0f}", flush=True)
            os._exit(0)  # a measuring helper: no graceful shutdown needed


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
