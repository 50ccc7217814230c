"""Quix Streams on the same topic: a no-op, or the same tumbling count/sum/min per terminal.

Runs in its own environment (``make bench-tools`` makes ``.venv-bench``; Quix Streams pins
pydantic below what posflow runs on), started by bench_stream_floor.py:

  .venv-bench/bin/python benchmarks/quix_floor.py TOPIC EVENTS BOOTSTRAP [--window]
      [--state-dir DIR]

With ``--window``: a 60 s tumbling window per terminal (the record key), event time from
the telemetry's ``ts``, 10 s grace (the health worker's), count, sum and min of the
battery level, results emitted when a window closes (``final()``), state in RocksDB with
its changelog topic (Quix Streams' defaults). Once EVENTS were consumed it prints a
``FLOOR {json}`` line (benchmarks/_procstat.py) and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from quixstreams import Application
from quixstreams.dataframe.windows.aggregations import Count, Min, Sum

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._procstat import Mark, between, floor_line, mark

WINDOW_S = 60
GRACE_S = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topic")
    parser.add_argument("events", type=int)
    parser.add_argument("bootstrap")
    parser.add_argument("--window", action="store_true", help="the tumbling aggregation")
    parser.add_argument("--state-dir", default=None, help="for RocksDB (default: a new temp)")
    args = parser.parse_args()

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"quix-floor-{'window' if args.window else 'noop'}-{time.time_ns()}",
        auto_offset_reset="earliest",
        state_dir=args.state_dir or tempfile.mkdtemp(prefix="posflow-quix-"),
        loglevel="WARNING",
    )

    def event_time_ms(value: Any, _headers: Any, _timestamp: int, _type: Any) -> int:
        return int(datetime.fromisoformat(value["payload"]["ts"]).timestamp() * 1000)

    topic = app.topic(
        args.topic,
        value_deserializer="json",
        timestamp_extractor=event_time_ms if args.window else None,
    )
    seen = {"n": 0}
    first: list[Mark] = []

    def counted(_value: Any) -> None:
        seen["n"] += 1
        if not first:
            first.append(mark(seen["n"]))
        elif seen["n"] >= args.events:
            print(floor_line(between(first[0], mark(seen["n"]))), flush=True)
            os._exit(0)  # a measuring helper: no graceful shutdown needed

    sdf = app.dataframe(topic).update(counted)
    if args.window:
        sdf = (
            sdf.apply(lambda value: value["payload"]["battery"]["level_pct"])
            .tumbling_window(timedelta(seconds=WINDOW_S), grace_ms=timedelta(seconds=GRACE_S))
            .agg(count=Count(), sum=Sum(), min=Min())
            .final()
        )
    app.run()


if __name__ == "__main__":
    main()
