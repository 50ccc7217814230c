-- Time series on TimescaleDB (2.13+): hypertables, continuous aggregates.
-- Compression and retention policies take their ages from settings and are
-- applied by posflow.storage.policies after the migrations (not here, so a
-- changed setting takes effect without a new migration).
-- Column lists equal the plain path's (a unit test compares them), so every
-- read query works on both.

CREATE TABLE telemetry (
    ts                 timestamptz NOT NULL,
    terminal_id        text NOT NULL,
    merchant_id        text NOT NULL,
    seq                bigint NOT NULL,
    received_at        timestamptz NOT NULL,
    battery_level_pct  smallint,
    charging           boolean,
    battery_temp_c     real,
    battery_health     text,
    signal_type        text,
    signal_dbm         smallint,
    rssi_dbm           smallint,
    rsrp_dbm           smallint,
    sinr_db            real,
    wifi_rssi_dbm      smallint,
    carrier            text,
    printer_paper      text,
    lat                double precision,
    lon                double precision,
    accuracy_m         real,
    app_version        text,
    firmware_version   text,
    uptime_s           bigint,
    tamper             boolean,
    PRIMARY KEY (terminal_id, ts, seq)
);
SELECT create_hypertable('telemetry', by_range('ts', INTERVAL '1 day'));
-- No per-merchant index on raw telemetry: it cost ~15% of insert speed, and
-- merchant views read the rollups and terminal_state instead.
ALTER TABLE telemetry SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'terminal_id',
    timescaledb.compress_orderby = 'ts DESC, seq DESC'
);

CREATE TABLE transactions (
    ts               timestamptz NOT NULL,
    txn_id           text NOT NULL,
    merchant_id      text NOT NULL,
    terminal_id      text NOT NULL,
    txn_type         text NOT NULL,
    status           text NOT NULL,
    amount_minor     bigint NOT NULL,
    tip_minor        bigint NOT NULL,
    currency         char(3) NOT NULL,
    decline_code     text,
    auth_latency_ms  integer NOT NULL,
    scheme           text NOT NULL,
    entry_mode       text NOT NULL,
    card_last4       char(4),
    received_at      timestamptz NOT NULL,
    PRIMARY KEY (txn_id, ts)
);
SELECT create_hypertable('transactions', by_range('ts', INTERVAL '1 day'));
CREATE INDEX transactions_merchant_ts_idx ON transactions (merchant_id, ts);
CREATE INDEX transactions_terminal_ts_idx ON transactions (terminal_id, ts);

CREATE TABLE terminal_health (
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    terminal_id      text NOT NULL,
    merchant_id      text NOT NULL,
    score            smallint NOT NULL CHECK (score BETWEEN 0 AND 100),
    signal_score     smallint,
    battery_score    smallint,
    txn_score        smallint,
    printer_score    smallint,
    details          jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (terminal_id, window_start)
);
SELECT create_hypertable('terminal_health', by_range('window_start', INTERVAL '1 day'));

-- Rollups: continuous aggregates with the same names and columns as the plain
-- path's views.
CREATE MATERIALIZED VIEW telemetry_1m WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket,
       terminal_id,
       merchant_id,
       count(*) AS samples,
       avg(battery_level_pct)::double precision AS battery_avg,
       min(battery_level_pct) AS battery_min,
       max(battery_level_pct) AS battery_max,
       avg(signal_dbm)::double precision AS signal_avg_dbm,
       min(signal_dbm) AS signal_min_dbm,
       max(signal_dbm) AS signal_max_dbm,
       count(*) FILTER (WHERE charging) AS charging_samples
  FROM telemetry
 GROUP BY bucket, terminal_id, merchant_id
  WITH NO DATA;

CREATE MATERIALIZED VIEW telemetry_1h WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', ts) AS bucket,
       terminal_id,
       merchant_id,
       count(*) AS samples,
       avg(battery_level_pct)::double precision AS battery_avg,
       min(battery_level_pct) AS battery_min,
       max(battery_level_pct) AS battery_max,
       avg(signal_dbm)::double precision AS signal_avg_dbm,
       min(signal_dbm) AS signal_min_dbm,
       max(signal_dbm) AS signal_max_dbm,
       count(*) FILTER (WHERE charging) AS charging_samples
  FROM telemetry
 GROUP BY bucket, terminal_id, merchant_id
  WITH NO DATA;

-- Real-time aggregation: recent buckets are computed on read, so dashboards
-- see rows the refresh policy has not materialised yet.
ALTER MATERIALIZED VIEW telemetry_1m SET (timescaledb.materialized_only = false);
ALTER MATERIALIZED VIEW telemetry_1h SET (timescaledb.materialized_only = false);

SELECT add_continuous_aggregate_policy('telemetry_1m',
    start_offset => INTERVAL '2 hours', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('telemetry_1h',
    start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes');
