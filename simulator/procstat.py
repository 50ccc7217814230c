"""CPU and memory of processes, read from /proc (no extra dependency)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcSample", "backends_of", "children_of", "sample", "works_for"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    at: float
    cpu_s: float  # user + system seconds since the process started
    rss_mb: float


def sample(pids: list[int]) -> ProcSample | None:
    """The summed CPU time and resident memory of ``pids`` (None if none is alive)."""
    cpu, rss, alive = 0.0, 0.0, False
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        alive = True
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
                break
    return ProcSample(time.monotonic(), cpu, rss) if alive else None


def children_of(pid: int) -> list[int]:
    """``pid`` and its direct children (PostgreSQL's backends are the postmaster's)."""
    out = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def backends_of(postmaster: int, database: str) -> list[int]:
    """PostgreSQL's processes that work for ``database``: the postmaster, its background
    processes (checkpointer, WAL writer, TimescaleDB's workers, ...) and the client
    backends connected to that database, not those of other databases on the server."""
    out = []
    for pid in children_of(postmaster):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid == postmaster or works_for(cmdline, database):
            out.append(pid)
    return out


def works_for(cmdline: bytes, database: str) -> bool:
    """Whether a PostgreSQL child process (its ``/proc/<pid>/cmdline``) works for
    ``database``: a server process does, a client backend only for its own database."""
    words = cmdline.replace(b"\0", b" ").split()
    # A client backend: "postgres: <user> <database> <host>(<port>) <state>".
    client = len(words) >= 4 and (b"(" in words[3] or words[3].startswith(b"[local]"))
    return not client or words[2].decode(errors="replace") == database
