"""TimescaleDB's policy jobs: run them from a session, and read what the scheduler recorded.

TimescaleDB's background scheduler runs the refresh, compression and
retention policies. On the PostgreSQL 15.20 build tested here it records every
run as failed (``cannot drop portal "" while it is being set up``) although the
work commits, while ``CALL run_job(id)`` from a session runs clean. So posflow
does not rest on the scheduler: ``maintain()`` runs the same jobs itself (the raw
sink every ``rawsink.maintain_interval_s``, and ``posflow db maintain``), and
what the scheduler recorded is exported as metrics, to be read beside the data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg

__all__ = ["JobRun", "JobStat", "job_stats", "run_policy_jobs"]

log = logging.getLogger("posflow.storage")

# The policies posflow adds (policies.py and the TimescaleDB migration), in the order a
# scheduler would want them: aggregates refreshed before the raw chunks they read are
# compressed or dropped.
_ORDER = {
    "policy_refresh_continuous_aggregate": 0,
    "policy_compression": 1,
    "policy_columnstore": 1,
    "policy_retention": 2,
}


@dataclass(frozen=True, slots=True)
class JobRun:
    job_id: int
    job: str  # e.g. "policy_compression telemetry"
    ok: bool
    seconds: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class JobStat:
    job_id: int
    job: str
    last_run_status: str | None
    total_runs: int
    total_failures: int
    last_successful_finish: datetime | None


def _jobs(conn: psycopg.Connection[tuple[object, ...]]) -> list[tuple[int, str]]:
    rows = conn.execute(
        """
        SELECT job_id, proc_name, coalesce(hypertable_name, '')
          FROM timescaledb_information.jobs
         WHERE proc_name = ANY(%s)
        """,
        [list(_ORDER)],
    ).fetchall()
    named = [(int(str(r[0])), f"{r[1]} {r[2]}".strip(), _ORDER[str(r[1])]) for r in rows]
    return [(job_id, name) for job_id, name, _ in sorted(named, key=lambda j: (j[2], j[0]))]


def run_policy_jobs(conn: psycopg.Connection[tuple[object, ...]]) -> list[JobRun]:
    """Run every refresh, compression and retention policy job once, now, in this session.

    ``conn`` must be in autocommit: a job commits as it goes (``run_job`` refuses to run
    inside a transaction block). A failing job is reported, and the others still run.
    """
    if not conn.autocommit:
        conn.commit()
        conn.autocommit = True
    runs = []
    for job_id, name in _jobs(conn):
        started = time.perf_counter()
        try:
            conn.execute("CALL run_job(%s)", [job_id])
        except psycopg.Error as exc:
            if "already in progress" in str(exc):  # the scheduler is refreshing it right now
                runs.append(JobRun(job_id, name, True, time.perf_counter() - started))
                continue
            runs.append(JobRun(job_id, name, False, time.perf_counter() - started, str(exc)))
            log.warning("TimescaleDB job %d (%s) failed: %s", job_id, name, exc)
            continue
        runs.append(JobRun(job_id, name, True, time.perf_counter() - started))
    return runs


def job_stats(conn: psycopg.Connection[tuple[object, ...]]) -> list[JobStat]:
    """What TimescaleDB's scheduler recorded for posflow's policy jobs."""
    names = dict(_jobs(conn))
    rows = conn.execute(
        """
        SELECT job_id, last_run_status, coalesce(total_runs, 0), coalesce(total_failures, 0),
               CASE WHEN isfinite(last_successful_finish) THEN last_successful_finish END
          FROM timescaledb_information.job_stats
         WHERE job_id = ANY(%s)
        """,
        [list(names)],
    ).fetchall()
    return [
        JobStat(
            int(str(r[0])),
            names[int(str(r[0]))],
            None if r[1] is None else str(r[1]),
            int(str(r[2])),
            int(str(r[3])),
            r[4] if isinstance(r[4], datetime) else None,
        )
        for r in rows
    ]
