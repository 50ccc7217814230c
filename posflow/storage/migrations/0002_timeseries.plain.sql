-- Time series on plain PostgreSQL: native range partitioning by day.
-- Partitions are created ahead by posflow.storage.partitions (at migrate and
-- at writer start); a DEFAULT partition catches rows outside them (a terminal
-- with a wrong clock) so no insert ever fails for its timestamp. Retention
-- drops whole partitions. Rollups are tables kept by the writers; read them
-- through the views of the same names as TimescaleDB's continuous aggregates.
-- The writers keep the 1-minute rollup; hours are materialised from it by
-- posflow.storage.maintenance (like a continuous-aggregate refresh policy),
-- and the telemetry_1h view adds the hours not materialised yet (like
-- TimescaleDB's real-time aggregation), so reads never miss recent data.

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
) PARTITION BY RANGE (ts);
CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
-- No per-merchant index on raw telemetry: it cost ~15% of insert speed, and
-- merchant views read the rollups and terminal_state instead.

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
) PARTITION BY RANGE (ts);
CREATE TABLE transactions_default PARTITION OF transactions DEFAULT;
CREATE INDEX transactions_merchant_ts_idx ON transactions (merchant_id, ts);
CREATE INDEX transactions_terminal_ts_idx ON transactions (terminal_id, ts);

-- Health records of the stream workers (one per terminal and window).
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
) PARTITION BY RANGE (window_start);
CREATE TABLE terminal_health_default PARTITION OF terminal_health DEFAULT;

-- Rollup state: sums and counts, so that adding a batch is an exact upsert.
CREATE TABLE telemetry_rollup_1m (
    bucket           timestamptz NOT NULL,
    terminal_id      text NOT NULL,
    merchant_id      text NOT NULL,
    samples          bigint NOT NULL,
    battery_samples  bigint NOT NULL,
    battery_sum      bigint NOT NULL,
    battery_min      smallint,
    battery_max      smallint,
    signal_samples   bigint NOT NULL,
    signal_sum       bigint NOT NULL,
    signal_min_dbm   smallint,
    signal_max_dbm   smallint,
    charging_samples bigint NOT NULL,
    PRIMARY KEY (terminal_id, bucket)
) PARTITION BY RANGE (bucket);
CREATE TABLE telemetry_rollup_1m_default PARTITION OF telemetry_rollup_1m DEFAULT;

CREATE TABLE telemetry_rollup_1h (LIKE telemetry_rollup_1m INCLUDING ALL)
    PARTITION BY RANGE (bucket);
CREATE TABLE telemetry_rollup_1h_default PARTITION OF telemetry_rollup_1h DEFAULT;

CREATE VIEW telemetry_1m AS
SELECT bucket, terminal_id, merchant_id, samples,
       battery_sum::double precision / NULLIF(battery_samples, 0) AS battery_avg,
       battery_min, battery_max,
       signal_sum::double precision / NULLIF(signal_samples, 0) AS signal_avg_dbm,
       signal_min_dbm, signal_max_dbm, charging_samples
  FROM telemetry_rollup_1m;

-- Up to where telemetry_rollup_1h is materialised (exclusive).
CREATE TABLE rollup_watermarks (
    rollup  text PRIMARY KEY,
    upto    timestamptz NOT NULL
);
INSERT INTO rollup_watermarks VALUES ('telemetry_1h', '1970-01-01 00:00:00+00');

CREATE VIEW telemetry_1h AS
WITH mark AS (SELECT upto FROM rollup_watermarks WHERE rollup = 'telemetry_1h'),
rows AS (
    SELECT bucket, terminal_id, merchant_id, samples, battery_samples, battery_sum,
           battery_min, battery_max, signal_samples, signal_sum, signal_min_dbm,
           signal_max_dbm, charging_samples
      FROM telemetry_rollup_1h
     WHERE bucket < (SELECT upto FROM mark)
    UNION ALL
    SELECT date_trunc('hour', bucket, 'UTC'), terminal_id, max(merchant_id), sum(samples),
           sum(battery_samples), sum(battery_sum), min(battery_min), max(battery_max),
           sum(signal_samples), sum(signal_sum), min(signal_min_dbm), max(signal_max_dbm),
           sum(charging_samples)
      FROM telemetry_rollup_1m
     WHERE bucket >= (SELECT upto FROM mark)
     GROUP BY 1, terminal_id
)
SELECT bucket, terminal_id, merchant_id, samples::bigint AS samples,
       battery_sum::double precision / NULLIF(battery_samples, 0) AS battery_avg,
       battery_min, battery_max,
       signal_sum::double precision / NULLIF(signal_samples, 0) AS signal_avg_dbm,
       signal_min_dbm, signal_max_dbm, charging_samples::bigint AS charging_samples
  FROM rows;
