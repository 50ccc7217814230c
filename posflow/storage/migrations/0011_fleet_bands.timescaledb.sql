-- Fleet-wide banded aggregates for the fleet dashboard's heatmaps (issue 15): readings
-- per minute and band, so a heatmap reads O(time buckets x bands) rows whatever the
-- fleet's size (telemetry_1m has one row per terminal and minute). A band is named by
-- its lower bound: battery 0, 10, ... 90 (90 holds 90-100); signal -130 (and below),
-- -120, ... -50 (and above), 10 dB each. Column lists equal the plain path's views
-- (a unit test compares them). Retention: posflow.storage.policies.

CREATE MATERIALIZED VIEW fleet_battery_1m WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket,
       (least(battery_level_pct / 10, 9) * 10)::smallint AS band,
       count(*) AS readings
  FROM telemetry
 WHERE battery_level_pct IS NOT NULL
 GROUP BY time_bucket(INTERVAL '1 minute', ts), (least(battery_level_pct / 10, 9) * 10)::smallint
  WITH NO DATA;

CREATE MATERIALIZED VIEW fleet_signal_1m WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 minute', ts) AS bucket,
       greatest(least((signal_dbm + 200) / 10 * 10 - 200, -50), -130)::smallint AS band,
       count(*) AS readings
  FROM telemetry
 WHERE signal_dbm IS NOT NULL
 GROUP BY time_bucket(INTERVAL '1 minute', ts),
          greatest(least((signal_dbm + 200) / 10 * 10 - 200, -50), -130)::smallint
  WITH NO DATA;

-- Real-time aggregation, as telemetry_1m: the minutes not materialised yet are computed
-- on read, so the heatmaps never lag the refresh policy.
ALTER MATERIALIZED VIEW fleet_battery_1m SET (timescaledb.materialized_only = false);
ALTER MATERIALIZED VIEW fleet_signal_1m SET (timescaledb.materialized_only = false);

SELECT add_continuous_aggregate_policy('fleet_battery_1m',
    start_offset => INTERVAL '2 hours', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('fleet_signal_1m',
    start_offset => INTERVAL '2 hours', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
