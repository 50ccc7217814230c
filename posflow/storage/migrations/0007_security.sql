-- Security baseline (issue 10): per-merchant keys (crypto-shredding), merchant
-- secrets encrypted at rest, and the hash-chained audit trail.

-- One row per merchant key version. The key itself is never stored: it is derived
-- from the master key (HKDF-SHA256) with this version's random seed, which is kept
-- here only wrapped (AES-GCM under a key derived from the master key). Revoking
-- deletes the wrapped seed, so the key cannot be derived again even with the master.
CREATE TABLE merchant_keys (
    merchant_id   text NOT NULL REFERENCES merchants (merchant_id),
    version       integer NOT NULL CHECK (version >= 1),
    status        text NOT NULL CHECK (status IN ('active', 'retiring', 'retired', 'revoked')),
    wrapped_seed  bytea,             -- NULL once retired or revoked (shredded)
    master_key_id text NOT NULL,     -- which master key wrapped it (for master rotation)
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL,
    retired_at    timestamptz,
    revoked_at    timestamptz,
    revoked_by    text,
    PRIMARY KEY (merchant_id, version),
    CHECK ((status IN ('active', 'retiring')) = (wrapped_seed IS NOT NULL))
);
-- At most one active version per merchant.
CREATE UNIQUE INDEX merchant_keys_one_active ON merchant_keys (merchant_id)
    WHERE status = 'active';

-- Merchant secrets at rest (webhook signing secrets, payout account details):
-- AES-256-GCM under the merchant key of key_version; the AAD binds merchant id,
-- purpose and version, so a ciphertext moved to another row does not decrypt.
CREATE TABLE merchant_secrets (
    merchant_id  text NOT NULL REFERENCES merchants (merchant_id),
    purpose      text NOT NULL CHECK (purpose ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    key_version  integer NOT NULL,
    nonce        bytea NOT NULL CHECK (octet_length(nonce) = 12),
    ciphertext   bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, purpose),
    FOREIGN KEY (merchant_id, key_version) REFERENCES merchant_keys (merchant_id, version)
);
CREATE INDEX merchant_secrets_version ON merchant_secrets (merchant_id, key_version);

-- The audit trail: append-only, each record's hash covers the previous record's
-- hash and the canonical JSON of the record (see posflow/security/audit.py).
CREATE TABLE audit_log (
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    role       text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    source     text NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb,
    prev_hash  text NOT NULL,
    hash       text NOT NULL
);
CREATE INDEX audit_log_target ON audit_log (target, seq);
CREATE INDEX audit_log_at ON audit_log (at);

-- The chain head: one row, locked FOR UPDATE by every writer, so concurrent
-- writers append one after the other and the chain never forks. It also holds the
-- last hash, so deleting the newest records is detected too.
CREATE TABLE audit_chain_head (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq   bigint NOT NULL,
    hash  text NOT NULL
);
INSERT INTO audit_chain_head (id, seq, hash) VALUES (true, 0, repeat('0', 64));
