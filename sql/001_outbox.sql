-- outbox-relay schema, part 1: the outbox table and its publication.
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/001_outbox.sql
-- Safe to re-run. Column names match Debezium's outbox event router defaults.

CREATE TABLE IF NOT EXISTS outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(), -- message id; consumers dedupe on it
    aggregatetype text        NOT NULL,  -- routes to topic outbox.event.<aggregatetype> by default
    aggregateid   text        NOT NULL,  -- message key: per-aggregate order is kept
    type          text        NOT NULL,  -- event type, sent as header "type"
    payload       jsonb,                 -- message value (NULL: tombstone)
    headers       jsonb,                 -- extra headers: a JSON object of string values
    topic         text,                  -- optional per-row topic override
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz,           -- set by the relay after the broker confirmed the message
    attempts      int         NOT NULL DEFAULT 0,  -- failed send attempts (poison rows)
    last_error    text,                  -- why the row could not be published
    failed_at     timestamptz,           -- set when the row went to the dead-letter topic instead
    seq           bigint      GENERATED ALWAYS AS IDENTITY -- insertion order; orders the first-start snapshot
);

-- Undelivered rows, in insertion order: what the relay reads on first start (and after losing
-- its slot) and what monitoring watches. Small, because delivered rows leave it.
CREATE INDEX IF NOT EXISTS outbox_undelivered_idx
    ON outbox (seq)
    WHERE delivered_at IS NULL;

-- Inserts, and TRUNCATE so the relay can report one; never UPDATE or DELETE, so the relay's own
-- UPDATEs (delivered_at) never come back to it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_pub') THEN
        CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert, truncate');
    END IF;
END
$$;
