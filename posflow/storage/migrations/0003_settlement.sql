-- Settlement (issue 6): what each ledger row did to the money, pending -> available,
-- payouts, and outboxes for the cash-flow and integrity topics.
-- Column meanings are documented in docs/architecture.md (Settlement).

-- gross/fee/net are what the transaction posts when applied; `effect` says whether it did.
ALTER TABLE ledger_entries
    ADD COLUMN status           text NOT NULL DEFAULT 'approved',
    ADD COLUMN original_txn_id  text,
    ADD COLUMN effect           text NOT NULL DEFAULT 'applied'
                                CHECK (effect IN ('applied', 'no_money', 'parked', 'flagged')),
    ADD COLUMN flag_reason      text,
    -- on a preauth: sum captured; on a sale/capture: sum refunded
    ADD COLUMN consumed_minor   bigint NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_by     text,
    ADD COLUMN available_at     timestamptz,
    ADD COLUMN released         boolean NOT NULL DEFAULT true,
    ADD COLUMN received_at      timestamptz;
-- Children (refund/capture/void/reversal) waiting for their original.
CREATE INDEX ledger_entries_parked_idx ON ledger_entries (original_txn_id)
    WHERE effect = 'parked';
-- Applied money still pending, by when it becomes available.
CREATE INDEX ledger_entries_unreleased_idx ON ledger_entries (available_at)
    WHERE NOT released;

-- Per merchant and currency: captured and refunded totals (cap of unlinked refunds).
ALTER TABLE merchant_balances
    ADD COLUMN captured_minor  bigint NOT NULL DEFAULT 0,
    ADD COLUMN refunded_minor  bigint NOT NULL DEFAULT 0;

-- The payment's receive time (ingest envelope), for end-to-end latency.
ALTER TABLE cashflow_events ADD COLUMN received_at timestamptz;

-- One payout per (merchant, idempotency key), ever.
CREATE TABLE payouts (
    merchant_id      text NOT NULL,
    idempotency_key  text NOT NULL,
    currency         char(3) NOT NULL,
    amount_minor     bigint NOT NULL CHECK (amount_minor > 0),
    seq              bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, idempotency_key)
);

-- Outbox watermark: cash-flow events up to published_seq are acknowledged by Kafka.
CREATE TABLE cashflow_published (
    merchant_id    text PRIMARY KEY,
    published_seq  bigint NOT NULL
);

-- Outbox of pos.integrity.v1 (event_id stable: a replayed finding is stored once).
CREATE TABLE integrity_events (
    event_id      text PRIMARY KEY,
    merchant_id   text NOT NULL,
    kind          text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX integrity_events_unpublished_idx ON integrity_events (created_at)
    WHERE published_at IS NULL;
