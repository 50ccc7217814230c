-- Chunk intervals sized for 50,000 terminals, and compression of the health windows.
--
-- TimescaleDB's guidance: the chunks being written (with their indexes) should fit
-- in about a quarter of the server's memory. At 50,000 terminals:
--   telemetry        one reading / 30 s  -> 6.0 M rows/h, ~1.2 GB/h with its index
--   terminal_health  one window / minute -> 3.0 M rows/h, ~0.9 GB/h (jsonb details)
--   transactions     ~200 payments / terminal / day -> 10 M rows/day, ~3 GB/day
-- so 2-hour chunks for the two per-terminal series (~2.4 GB and ~1.8 GB, in a 16 GB
-- server's quarter with room) and 1-day chunks for payments. Smaller chunks also
-- let compression and retention work in finer steps. A new interval applies to
-- chunks created from now on; existing chunks keep theirs.
SELECT set_chunk_time_interval('telemetry', INTERVAL '2 hours');
SELECT set_chunk_time_interval('terminal_health', INTERVAL '2 hours');

-- Health windows compress like telemetry: one terminal's windows together, newest
-- first (the drill-down reads one terminal's recent windows). The policy's age
-- comes from the settings (posflow.storage.policies).
ALTER TABLE terminal_health SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'terminal_id',
    timescaledb.compress_orderby = 'window_start DESC'
);
