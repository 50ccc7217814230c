"""CPU per event of one process, from /proc: what travels between runs on a shared machine.

A *mark* is (events consumed so far, wall clock, CPU seconds of the process: utime + stime
of all its threads, from ``/proc/<pid>/stat``). Two marks, one at the first event consumed
and one at the last, give the events/s and the CPU µs an event between them.

Standard library only: the Quix Streams runner imports it from its own environment
(``.venv-bench``), where posflow is not installed. A runner prints its result as one
``FLOOR {json}`` line, which :func:`parse_floor_line` reads back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "FLOOR_PREFIX",
    "Mark",
    "Rate",
    "between",
    "cpu_seconds",
    "floor_line",
    "mark",
    "parse_floor_line",
    "read_cpu",
]

FLOOR_PREFIX = "FLOOR "
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(stat: str, ticks_per_s: int = _TICKS) -> float:
    """utime + stime of a ``/proc/<pid>/stat`` line, in seconds.

    The command name (field 2) is in parentheses and may itself hold spaces or
    parentheses, so the fields are counted from the last ``)``: utime and stime are
    fields 14 and 15 of the line, the 12th and 13th after the name.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def read_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system, all threads) the process ``pid`` has used so far."""
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text("ascii"))


@dataclass(frozen=True)
class Mark:
    """``events`` consumed by ``wall_s`` (monotonic clock), having used ``cpu_s``."""

    events: int
    wall_s: float
    cpu_s: float


def mark(events: int, pid: int | str = "self") -> Mark:
    """A mark of process ``pid`` now."""
    return Mark(events, time.monotonic(), read_cpu(pid))


@dataclass(frozen=True)
class Rate:
    """What a process did between two marks."""

    events: int
    seconds: float
    events_per_s: float
    cpu_us_per_event: float


def between(first: Mark, last: Mark) -> Rate:
    """Events/s and CPU µs an event from ``first`` to ``last``."""
    events = last.events - first.events
    seconds = last.wall_s - first.wall_s
    if events <= 0 or seconds <= 0:
        raise ValueError(
            f"no events between the marks ({first} -> {last}): mark after the first event "
            "consumed and again after the last"
        )
    return Rate(
        events=events,
        seconds=seconds,
        events_per_s=events / seconds,
        cpu_us_per_event=(last.cpu_s - first.cpu_s) / events * 1e6,
    )


def floor_line(rate: Rate) -> str:
    """The line a runner prints for the benchmark to read."""
    return FLOOR_PREFIX + json.dumps(asdict(rate))


def parse_floor_line(output: str) -> Rate | None:
    """The last ``FLOOR`` line in a runner's output, or None if it printed none."""
    found = None
    for line in output.splitlines():
        at = line.find(FLOOR_PREFIX)
        if at >= 0:
            found = Rate(**json.loads(line[at + len(FLOOR_PREFIX) :]))
    return found
