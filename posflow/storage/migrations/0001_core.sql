-- posflow core tables: the same on TimescaleDB and on plain PostgreSQL.
-- Money tables are plain tables (never hypertables): the transaction id is
-- unique by itself, so no duplicate can slip past (DESIGN.md principle 2).

CREATE TABLE merchants (
    merchant_id      text PRIMARY KEY,
    name             text NOT NULL,
    category         text,
    lat              double precision CHECK (lat BETWEEN -90 AND 90),
    lon              double precision CHECK (lon BETWEEN -180 AND 180),
    timezone         text NOT NULL DEFAULT 'UTC',
    opening_hours    jsonb NOT NULL DEFAULT '{}'::jsonb,   -- {"mon": [["08:00","18:00"]], ...}
    fee_plan         jsonb NOT NULL DEFAULT '{}'::jsonb,   -- percentage + fixed per scheme / entry mode
    settlement_rule  jsonb NOT NULL DEFAULT '{"kind": "instant"}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE terminals (
    terminal_id    text PRIMARY KEY,
    merchant_id    text NOT NULL REFERENCES merchants (merchant_id),
    model          text,
    lat            double precision,
    lon            double precision,
    registered_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX terminals_merchant_idx ON terminals (merchant_id);

-- Current state per terminal (one row each), kept by the stream workers.
CREATE TABLE terminal_state (
    terminal_id        text PRIMARY KEY,
    merchant_id        text NOT NULL,
    online             boolean NOT NULL,
    last_seen          timestamptz NOT NULL,
    status_changed_at  timestamptz,
    battery_level_pct  smallint,
    charging           boolean,
    signal_type        text,
    signal_dbm         smallint,
    carrier            text,
    printer_paper      text,
    lat                double precision,
    lon                double precision,
    app_version        text,
    firmware_version   text,
    health_score       smallint CHECK (health_score BETWEEN 0 AND 100),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX terminal_state_merchant_idx ON terminal_state (merchant_id);

-- The merchant ledger: one row per transaction id, ever.
CREATE TABLE ledger_entries (
    entry_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_id            text NOT NULL UNIQUE,
    merchant_id       text NOT NULL,
    terminal_id       text NOT NULL,
    txn_type          text NOT NULL,
    currency          char(3) NOT NULL,
    gross_minor       bigint NOT NULL,
    fee_minor         bigint NOT NULL,
    net_minor         bigint NOT NULL,
    body_sha256       text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    source_topic      text,
    source_partition  integer,
    source_offset     bigint
);
CREATE INDEX ledger_entries_merchant_time_idx ON ledger_entries (merchant_id, occurred_at);

-- A transaction id seen again with a different body: kept aside, never applied.
CREATE TABLE ledger_quarantine (
    quarantine_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_id             text NOT NULL,
    merchant_id        text NOT NULL,
    body_sha256        text NOT NULL,
    first_body_sha256  text NOT NULL,
    body               jsonb NOT NULL,
    reason             text NOT NULL,
    source_topic       text,
    source_partition   integer,
    source_offset      bigint,
    recorded_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (txn_id, body_sha256)
);

CREATE TABLE merchant_balances (
    merchant_id      text NOT NULL,
    currency         char(3) NOT NULL,
    pending_minor    bigint NOT NULL DEFAULT 0,
    available_minor  bigint NOT NULL DEFAULT 0,
    paid_out_minor   bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, currency)
);

-- One cash-flow event per ledger change, numbered per merchant (only grows).
CREATE TABLE merchant_cashflow_seq (
    merchant_id  text PRIMARY KEY,
    last_seq     bigint NOT NULL
);

CREATE TABLE cashflow_events (
    merchant_id      text NOT NULL,
    seq              bigint NOT NULL,
    txn_id           text,
    kind             text NOT NULL,
    currency         char(3) NOT NULL,
    amount_minor     bigint NOT NULL,
    pending_minor    bigint NOT NULL,
    available_minor  bigint NOT NULL,
    paid_out_minor   bigint NOT NULL,
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, seq)
);

-- Kafka offsets stored with the data they produced ("storing offsets outside Kafka").
CREATE TABLE consumer_offsets (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    partition       integer NOT NULL,
    next_offset     bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

CREATE TABLE alerts (
    alert_id          text PRIMARY KEY,
    rule              text NOT NULL,
    severity          text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    subject_kind      text NOT NULL CHECK (subject_kind IN ('terminal', 'merchant', 'area', 'fleet')),
    subject_id        text NOT NULL,
    merchant_id       text,
    state             text NOT NULL
                      CHECK (state IN ('pending', 'firing', 'acknowledged', 'resolved')),
    summary           text NOT NULL DEFAULT '',
    labels            jsonb NOT NULL DEFAULT '{}'::jsonb,
    annotations       jsonb NOT NULL DEFAULT '{}'::jsonb,
    started_at        timestamptz NOT NULL,
    fired_at          timestamptz,
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    resolved_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- One open alert per (rule, subject).
CREATE UNIQUE INDEX alerts_one_open_idx ON alerts (rule, subject_kind, subject_id)
    WHERE state <> 'resolved';
CREATE INDEX alerts_state_idx ON alerts (state, started_at);

CREATE TABLE deadletter_counts (
    bucket  timestamptz NOT NULL,
    reason  text NOT NULL,
    count   bigint NOT NULL,
    PRIMARY KEY (bucket, reason)
);
