-- The alert engine's state (alerts/): open alerts live in `alerts` (also for Grafana);
-- per-terminal facts, silences and the notification outbox are the engine's own.
-- Written in one transaction with the consumed offsets (consumer_offsets), so a
-- restarted engine resumes exactly where its state was.

ALTER TABLE alerts
    ADD COLUMN notified       boolean NOT NULL DEFAULT false,
    ADD COLUMN suppressed_by  text,
    ADD COLUMN last_event_at  timestamptz,
    ADD COLUMN value          double precision;
CREATE INDEX alerts_rule_state_idx ON alerts (rule, state);

CREATE TABLE alert_terminal_facts (
    terminal_id  text PRIMARY KEY,
    facts        jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alert_silences (
    silence_id  text PRIMARY KEY,
    matchers    jsonb NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    created_by  text NOT NULL DEFAULT '',
    comment     text NOT NULL DEFAULT ''
);
CREATE INDEX alert_silences_ends_idx ON alert_silences (ends_at);

-- One row per (notification, channel); delivered once by notification_id, retried with
-- backoff, 'dead' (the dead letter) after the last retry.
CREATE TABLE alert_notifications (
    notification_id  text NOT NULL,
    channel          text NOT NULL,
    alert_id         text NOT NULL,
    event            text NOT NULL,
    payload          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    PRIMARY KEY (notification_id, channel)
);
CREATE INDEX alert_notifications_due_idx ON alert_notifications (next_attempt_at)
    WHERE state = 'pending';
