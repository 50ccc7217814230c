-- Merchant feed API: per-merchant API keys, and the index its history pages read.
--
-- A key is shown once as `pf_<key_id>_<secret>`; only SHA-256(secret) is stored.
-- The secret is 32 random bytes (256 bits), so a plain hash cannot be brute-forced
-- and no server-side pepper has to be kept and rotated.

CREATE TABLE merchant_api_keys (
    key_id         text PRIMARY KEY,
    merchant_id    text NOT NULL,
    secret_sha256  bytea NOT NULL CHECK (length(secret_sha256) = 32),
    label          text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
CREATE INDEX merchant_api_keys_merchant_idx ON merchant_api_keys (merchant_id);

-- Keyset pagination of a merchant's transactions, newest first: (occurred_at, entry_id).
CREATE INDEX ledger_entries_merchant_page_idx
    ON ledger_entries (merchant_id, occurred_at DESC, entry_id DESC);
