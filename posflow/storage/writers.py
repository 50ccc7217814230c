"""Batched, idempotent writers for the time series (telemetry, transactions).

A batch is COPYed into a session-local staging table, then inserted with
``ON CONFLICT DO NOTHING`` on the natural key, so writing a batch twice (a
replay after a crash) changes nothing. On plain PostgreSQL the same statement
adds exactly the newly inserted rows to the 1-minute rollup (sums and
counts, so the views' averages are exact; hours are materialised from
minutes by ``maintenance.py``); on TimescaleDB the continuous aggregates do
that. Rows go over binary COPY.

Telemetry is written with ``synchronous_commit = off`` for that transaction:
a crash of the database server may lose the last few hundred milliseconds of
acknowledged telemetry, which the sink re-reads from Kafka because its
offsets are committed only after the database commit. Money never takes
that trade (see ``ledger.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg

from posflow.contracts import Telemetry, Transaction
from posflow.contracts.internal import BridgeTelemetry, BridgeTransaction, DecodedEnvelope
from posflow.storage.migrate import StoragePath

__all__ = ["TELEMETRY_COLUMNS", "TRANSACTION_COLUMNS", "TelemetryWriter", "TransactionWriter"]

# Each column with its PostgreSQL type, for binary COPY, in the order of the rows below.
# char(3)/char(4) columns go over the wire as text: bpchar's binary form is text's.
_TELEMETRY_TYPES = {
    "ts": "timestamptz", "terminal_id": "text", "merchant_id": "text", "seq": "int8",
    "received_at": "timestamptz",
    "battery_level_pct": "int2", "charging": "bool", "battery_temp_c": "float4",
    "battery_health": "text",
    "signal_type": "text", "signal_dbm": "int2", "rssi_dbm": "int2", "rsrp_dbm": "int2",
    "sinr_db": "float4", "wifi_rssi_dbm": "int2", "carrier": "text",
    "printer_paper": "text", "lat": "float8", "lon": "float8", "accuracy_m": "float4",
    "app_version": "text", "firmware_version": "text", "uptime_s": "int8", "tamper": "bool",
}  # fmt: skip
_TRANSACTION_TYPES = {
    "ts": "timestamptz", "txn_id": "text", "merchant_id": "text", "terminal_id": "text",
    "txn_type": "text", "status": "text", "amount_minor": "int8", "tip_minor": "int8",
    "currency": "text", "decline_code": "text", "auth_latency_ms": "int4", "scheme": "text",
    "entry_mode": "text", "card_last4": "text", "received_at": "timestamptz",
}  # fmt: skip
TELEMETRY_COLUMNS = tuple(_TELEMETRY_TYPES)
TRANSACTION_COLUMNS = tuple(_TRANSACTION_TYPES)

_ROLLUP = """
{name} AS (
    INSERT INTO telemetry_rollup_{width} AS r (
        bucket, terminal_id, merchant_id, samples, battery_samples, battery_sum, battery_min,
        battery_max, signal_samples, signal_sum, signal_min_dbm, signal_max_dbm, charging_samples)
    SELECT date_trunc('{unit}', ts, 'UTC'), terminal_id, max(merchant_id), count(*),
           count(battery_level_pct), coalesce(sum(battery_level_pct), 0),
           min(battery_level_pct), max(battery_level_pct),
           count(signal_dbm), coalesce(sum(signal_dbm), 0), min(signal_dbm), max(signal_dbm),
           count(*) FILTER (WHERE charging)
      FROM inserted
     GROUP BY 1, terminal_id
    ON CONFLICT (terminal_id, bucket) DO UPDATE SET
        merchant_id = excluded.merchant_id,
        samples = r.samples + excluded.samples,
        battery_samples = r.battery_samples + excluded.battery_samples,
        battery_sum = r.battery_sum + excluded.battery_sum,
        battery_min = least(r.battery_min, excluded.battery_min),
        battery_max = greatest(r.battery_max, excluded.battery_max),
        signal_samples = r.signal_samples + excluded.signal_samples,
        signal_sum = r.signal_sum + excluded.signal_sum,
        signal_min_dbm = least(r.signal_min_dbm, excluded.signal_min_dbm),
        signal_max_dbm = greatest(r.signal_max_dbm, excluded.signal_max_dbm),
        charging_samples = r.charging_samples + excluded.charging_samples
    RETURNING 1
)"""


def _signal_dbm(t: Telemetry | BridgeTelemetry) -> int | None:
    """One strength figure per sample: RSRP for LTE/5G, else RSSI, else Wi-Fi RSSI."""
    s = t.signal
    if s.rsrp_dbm is not None:
        return s.rsrp_dbm
    if s.rssi_dbm is not None:
        return s.rssi_dbm
    return s.wifi_rssi_dbm


def telemetry_row(envelope: DecodedEnvelope) -> tuple[object, ...]:
    t = envelope.payload
    assert isinstance(t, Telemetry | BridgeTelemetry)  # noqa: S101 - the caller routes by kind
    loc = t.location
    return (
        t.ts, t.terminal_id, t.merchant_id, t.seq, envelope.received_at,
        t.battery.level_pct, t.battery.charging, t.battery.temperature_c, t.battery.health,
        t.signal.type, _signal_dbm(t), t.signal.rssi_dbm, t.signal.rsrp_dbm, t.signal.sinr_db,
        t.signal.wifi_rssi_dbm, t.signal.carrier,
        t.printer.paper,
        loc.lat if loc else None, loc.lon if loc else None, loc.accuracy_m if loc else None,
        t.app_version, t.firmware_version, t.uptime_s, t.tamper,
    )  # fmt: skip


def transaction_row(envelope: DecodedEnvelope) -> tuple[object, ...]:
    t = envelope.payload
    assert isinstance(t, Transaction | BridgeTransaction)  # noqa: S101 - the caller routes by kind
    return (
        t.ts, t.txn_id, t.merchant_id, t.terminal_id, t.type, t.status, t.amount_minor,
        t.tip_minor, t.currency, t.decline_code, t.auth_latency_ms, t.scheme, t.entry_mode,
        t.card_last4, envelope.received_at,
    )  # fmt: skip


class _CopyInsert:
    """Binary COPY into a staging table, then one idempotent INSERT ... SELECT."""

    table: str
    column_types: Mapping[str, str]  # each column with its PostgreSQL type, for binary COPY
    conflict: str  # the natural key
    synchronous: bool

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.column_types)

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], path: StoragePath) -> None:
        self.conn = conn
        self.path = path
        self._staged = False
        cols = ", ".join(self.columns)
        self._copy_sql = f"COPY {self.table}_stage ({cols}) FROM STDIN (FORMAT BINARY)"
        self._insert = self._insert_sql().encode()

    def _insert_sql(self) -> str:
        cols = ", ".join(self.columns)
        return (
            f"INSERT INTO {self.table} ({cols}) SELECT {cols} FROM {self.table}_stage "
            f"ON CONFLICT ({self.conflict}) DO NOTHING"
        )

    def _write(self, rows: Sequence[tuple[object, ...]]) -> int:
        """One transaction: stage the rows, insert the new ones; returns how many were new."""
        if not rows:
            return 0
        try:
            return self._write_in_transaction(rows)
        except BaseException:
            # A rolled-back transaction takes the staging table it created with it.
            if self._created_in_last_attempt:
                self._staged = False
            raise

    _created_in_last_attempt = False

    def _write_in_transaction(self, rows: Sequence[tuple[object, ...]]) -> int:
        self._created_in_last_attempt = False
        with self.conn.transaction():
            if not self.synchronous:
                self.conn.execute("SET LOCAL synchronous_commit = off")
            if not self._staged:
                self.conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {self.table}_stage "
                    f"(LIKE {self.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                self._staged = True
                self._created_in_last_attempt = True
            with self.conn.cursor() as cur:
                with cur.copy(self._copy_sql.encode()) as copy:
                    copy.set_types(list(self.column_types.values()))
                    for row in rows:
                        copy.write_row(row)
                cur.execute(self._insert)
                if cur.description is None:
                    return cur.rowcount
                result = cur.fetchone()
                return int(str(result[0])) if result else 0


class TelemetryWriter(_CopyInsert):
    """Raw telemetry (+ the 1-minute rollup on plain PostgreSQL); returns rows newly inserted."""

    table = "telemetry"
    column_types = _TELEMETRY_TYPES
    conflict = "terminal_id, ts, seq"
    synchronous = False

    def _insert_sql(self) -> str:
        if self.path == "timescaledb":
            return super()._insert_sql()
        cols = ", ".join(self.columns)
        return (
            "WITH inserted AS ("
            f"INSERT INTO telemetry ({cols}) SELECT {cols} FROM telemetry_stage "
            "ON CONFLICT (terminal_id, ts, seq) DO NOTHING "
            "RETURNING ts, terminal_id, merchant_id, battery_level_pct, signal_dbm, charging),"
            + _ROLLUP.format(name="m", width="1m", unit="minute")
            + " SELECT (SELECT count(*) FROM inserted)"
        )

    def write(self, envelopes: Sequence[DecodedEnvelope]) -> int:
        return self._write([telemetry_row(e) for e in envelopes])


class TransactionWriter(_CopyInsert):
    """Payment outcomes as a time series (analytics; the money is in the ledger)."""

    table = "transactions"
    column_types = _TRANSACTION_TYPES
    conflict = "txn_id, ts"
    synchronous = True

    def write(self, envelopes: Sequence[DecodedEnvelope]) -> int:
        return self._write([transaction_row(e) for e in envelopes])
