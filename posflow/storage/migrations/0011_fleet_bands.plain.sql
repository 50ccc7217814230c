-- Fleet-wide banded aggregates for the fleet dashboard's heatmaps (issue 15), with the
-- names and columns of TimescaleDB's continuous aggregates (a unit test compares them).
-- Computed on read from the 1-minute rollup the writers keep: each terminal's minute
-- falls in the band of its average, and counts its readings. (TimescaleDB bands each
-- reading; with one reading per terminal and minute the two are equal.)

CREATE VIEW fleet_battery_1m AS
SELECT bucket,
       (least(floor(battery_sum::double precision / battery_samples / 10), 9) * 10)::smallint AS band,
       sum(battery_samples)::bigint AS readings
  FROM telemetry_rollup_1m
 WHERE battery_samples > 0
 GROUP BY 1, 2;

CREATE VIEW fleet_signal_1m AS
SELECT bucket,
       greatest(least(floor(signal_sum::double precision / signal_samples / 10) * 10, -50), -130)::smallint AS band,
       sum(signal_samples)::bigint AS readings
  FROM telemetry_rollup_1m
 WHERE signal_samples > 0
 GROUP BY 1, 2;
