"""The raw storage sink: pos.telemetry.v1 and pos.txn.v1 -> the time-series tables.

An aiokafka consumer group reads both topics in batches and writes each batch
through :class:`~posflow.storage.writers.TelemetryWriter` and
:class:`~posflow.storage.writers.TransactionWriter` (binary COPY, then
``INSERT ... ON CONFLICT DO NOTHING`` on the natural key, plus the 1-minute
rollup of exactly the inserted rows). Kafka offsets are committed only after the
database commit *and* after the commit is on disk: telemetry commits with
``synchronous_commit = off``, so the sink remembers the WAL position of each batch
and commits its offsets once PostgreSQL reports the WAL flushed past it. A crash
anywhere re-reads at most the uncommitted batches, and re-writing them inserts
nothing: at least once + idempotent writes = every record once in the tables.

A record that cannot be written (not JSON, breaks the contract, wrong kind for its
topic, card data, or refused by the database) goes to the dead-letter topic with a
reason before its offset is committed; the sink keeps going. On plain PostgreSQL the
upkeep (partitions ahead, hourly rollup, retention) runs at start and periodically.

Modules: ``records`` (Kafka records -> envelopes or dead letters, pure), ``database``
(the connection, its writers, isolating refused records), ``commit`` (offsets after
the WAL flush), ``upkeep`` (prepare and maintain the storage), ``metrics``, ``sink``
(the consuming loop) and ``service`` (the composition root).
"""

from streams.rawsink.metrics import RawSinkMetrics
from streams.rawsink.service import build
from streams.rawsink.sink import RawSink

__all__ = ["RawSink", "RawSinkMetrics", "build"]
