"""The raw sink's storage upkeep: prepare the database at start, then maintain it
periodically (partitions ahead, hourly rollup and retention on plain PostgreSQL; the
policy jobs on TimescaleDB), each run on its own short-lived connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from posflow.errors import PosflowError
from posflow.settings import Settings
from posflow.storage.jobs import job_stats
from posflow.storage.maintenance import maintain
from posflow.storage.migrate import StoragePath
from posflow.storage.setup import prepare_database, retention_of
from streams.rawsink.metrics import RawSinkMetrics

__all__ = ["Upkeep"]

log = logging.getLogger("posflow.rawsink")


class Upkeep:
    def __init__(self, settings: Settings, dsn: str, metrics: RawSinkMetrics) -> None:
        self.settings = settings
        self.dsn = dsn
        self.metrics = metrics

    def prepare(self) -> StoragePath:
        """Migrate and run the first upkeep (blocking: run it in a thread); returns the
        storage path (plain PostgreSQL or TimescaleDB)."""
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                path = prepare_database(conn, self.settings.storage)
        except psycopg.OperationalError as exc:
            pg = self.settings.postgres
            raise PosflowError(
                f"cannot connect to PostgreSQL at {pg.host}:{pg.port} database {pg.database}: "
                f"{str(exc).strip().splitlines()[0]}",
                fix="start it (`posflow stack up postgres`) or set POSFLOW_POSTGRES__HOST/__PORT",
            ) from None
        self.metrics.maintenance.labels("ok").inc()
        return path

    async def run_every_period(self, stop: asyncio.Event) -> None:
        """Maintain once per ``rawsink.maintain_interval_s`` until ``stop`` is set."""
        period = self.settings.rawsink.maintain_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.maintain_once)
                self.metrics.maintenance.labels("ok").inc()
            except psycopg.Error:
                self.metrics.maintenance.labels("failed").inc()
                log.exception("storage upkeep failed; retrying next period")

    def maintain_once(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            result = maintain(conn, retention_of(self.settings.storage))
            if result["path"] == "timescaledb":
                for run in result["jobs"]:  # type: ignore[attr-defined]
                    self.metrics.storage_jobs.labels(run.job, "ok" if run.ok else "failed").inc()
                self.metrics.observe_job_stats(job_stats(conn))
        if result["path"] == "plain":
            log.info("storage upkeep: hourly rollup up to %s", result["rollup_1h_upto"])
