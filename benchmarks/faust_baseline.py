"""The faust floor on this machine: an agent that does nothing, or faust's own tumbling table.

Usage (bench_streams and bench_stream_floor run it):

  python benchmarks/faust_baseline.py TOPIC EVENTS BOOTSTRAP [--window] [--partitions N]

Without ``--window`` the agent only counts the events (in batches, as the health worker
takes them). With it, every event updates a faust windowed table: a 60 s tumbling window
per terminal (the record key), event time from the telemetry's ``ts``, holding count, sum
and min of the battery level, on the in-memory store with its changelog topic.

Once EVENTS were consumed it prints "BASELINE <events/s> <CPU µs an event>" and a
``FLOOR {json}`` line
(events/s and CPU µs an event from /proc, first event to last; benchmarks/_procstat.py),
then exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import faust
import orjson
from faust.tables.wrappers import WindowWrapper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._procstat import Mark, between, floor_line, mark

WINDOW_S = 60  # the health worker's window (streams.window.WindowConfig)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("topic")
parser.add_argument("events", type=int)
parser.add_argument("bootstrap")
parser.add_argument("--window", action="store_true", help="faust's tumbling table, not a no-op")
parser.add_argument("--partitions", type=int, default=6, help="of TOPIC (the table's too)")
args = parser.parse_args()

app = faust.App(
    f"baseline-{'window' if args.window else 'noop'}-{time.time_ns()}",
    broker=f"kafka://{args.bootstrap}",
    store="memory://",
    datadir=str(Path(tempfile.gettempdir()) / "posflow-faust"),
    web_enabled=False,
    topic_replication_factor=1,
    topic_partitions=args.partitions,
    consumer_auto_offset_reset="earliest",
)
source = app.topic(args.topic, key_serializer="raw", value_serializer="raw")
state: dict[str, Any] = {"n": 0, "first": None}


def _done(n: int) -> None:
    """After the n-th event: the first mark, or the last one and the result."""
    first: Mark | None = state["first"]
    if first is None:
        state["first"] = mark(n)
        return
    if n < args.events:
        return
    rate = between(first, mark(n))
    print(f"BASELINE {rate.events_per_s:.0f} {rate.cpu_us_per_event:.0f}", flush=True)
    print(floor_line(rate), flush=True)
    os._exit(0)  # a measuring helper: no graceful shutdown needed


if not args.window:

    @app.agent(source)
    async def count(stream: Any) -> None:
        async for batch in stream.take(2000, within=0.05):
            state["n"] += len(batch)
            _done(state["n"])

else:
    # The event time of the event being processed, decoded once by the agent; faust asks
    # for it (relative_to) each time the table is read or written.
    now_ts = {"ts": 0.0}
    tumbling = app.Table("totals", default=list, partitions=args.partitions).tumbling(
        WINDOW_S, expires=timedelta(hours=2)
    )
    totals = cast(WindowWrapper, tumbling).relative_to(lambda _event: now_ts["ts"])

    @app.agent(source)
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            payload = orjson.loads(event.value)["payload"]
            now_ts["ts"] = datetime.fromisoformat(payload["ts"]).timestamp()
            level = payload["battery"]["level_pct"]
            terminal = event.key.decode()
            current = totals[terminal].current()
            if current:
                count_, sum_, min_ = current
                totals[terminal] = [count_ + 1, sum_ + level, min(min_, level)]
            else:
                totals[terminal] = [1, level, level]
            state["n"] += 1
            _done(state["n"])


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
