-- Merchant feed API, part 2 (issues 6 and 10): roles on API keys, webhooks per merchant.

-- A key has a role. A merchant key is bound to its merchant; a staff key (support,
-- finance, security) is bound to none and reads what the role matrix allows
-- (posflow/security/roles.py).
ALTER TABLE merchant_api_keys
    ALTER COLUMN merchant_id DROP NOT NULL,
    ADD COLUMN role text NOT NULL DEFAULT 'merchant'
        CHECK (role IN ('merchant', 'support_agent', 'support_lead', 'finance', 'security_admin')),
    ADD COLUMN created_by text NOT NULL DEFAULT '',
    ADD CONSTRAINT merchant_api_keys_role_binding
        CHECK ((role = 'merchant') = (merchant_id IS NOT NULL));

-- A merchant's webhook endpoints. The signing secret is not here: it is a merchant
-- secret (merchant_secrets, purpose 'webhook.<endpoint_id>'), AES-GCM under the
-- merchant's key, so revoking the merchant key makes it unreadable.
CREATE TABLE merchant_webhooks (
    endpoint_id  text PRIMARY KEY CHECK (endpoint_id ~ '^wh[0-9a-f]{16}$'),
    merchant_id  text NOT NULL REFERENCES merchants (merchant_id),
    url          text NOT NULL CHECK (url ~ '^https?://'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text NOT NULL
);
CREATE INDEX merchant_webhooks_merchant_idx ON merchant_webhooks (merchant_id);

-- Per endpoint: how far delivery got (cash-flow events are delivered in seq order,
-- one in flight per endpoint), the retry state of the next event, and a lease so
-- several delivery workers never send the same endpoint's events at once.
--   state  active  : delivering (or waiting for next_attempt_at)
--          dead    : gave up on event delivered_seq + 1 after webhook_give_up_s;
--                    nothing later was sent; `posflow api webhooks replay` restarts it
--          revoked : the merchant key was revoked, the signing secret is unreadable
CREATE TABLE webhook_cursors (
    endpoint_id      text PRIMARY KEY REFERENCES merchant_webhooks (endpoint_id) ON DELETE CASCADE,
    delivered_seq    bigint NOT NULL DEFAULT 0 CHECK (delivered_seq >= 0),
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'dead', 'revoked')),
    attempts         integer NOT NULL DEFAULT 0,   -- failed attempts of event delivered_seq + 1
    failing_since    timestamptz,                  -- first failed attempt of that event
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    dead_at          timestamptz,
    lease_owner      text,
    lease_until      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_cursors_due_idx ON webhook_cursors (next_attempt_at) WHERE state = 'active';
