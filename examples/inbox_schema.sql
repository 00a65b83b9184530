-- The consumer side of "at-least-once + idempotence": an inbox table that remembers which
-- messages a consumer has processed, written in the same transaction as the consumer's business
-- change. Apply in the consumer's database (here the same database, for the example):
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/inbox_schema.sql
-- A message delivered twice (the relay's in-flight window after a crash, a consumer restarted
-- before it committed its offset) finds its (consumer, message_id) already there and changes
-- nothing.

CREATE TABLE IF NOT EXISTS inbox (
    consumer    text        NOT NULL,  -- the consumer (group) that processed it
    message_id  uuid        NOT NULL,  -- the message's "id" header: the outbox row id
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- The example consumer's business change: orders and revenue per customer.
CREATE TABLE IF NOT EXISTS customer_totals (
    customer text    PRIMARY KEY,
    orders   int     NOT NULL,
    total    numeric NOT NULL
);
