-- outbox-relay schema, part 5: the delivery ledger (outbox.on_delivered = "record", the default).
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/005_delivery_ledger.sql
-- Safe to re-run, and the whole migration for an outbox that was marked with delivered_at before:
-- rows whose delivered_at is set stay delivered, nothing is rewritten.
--
-- Why a ledger: with wal_level=logical an UPDATE of the outbox row logs the whole new row
-- (~890 B of WAL and ~9 us per row, measured by bench/marking-cost.sh), which the walsender then
-- decodes and skips. The relay instead records, per marking batch, the `seq` values it delivered
-- as an int8multirange (contiguous seqs collapse into one range): ~1 us and ~0 B of WAL per row.
-- The outbox row is never updated by a delivery.
--
-- What is delivered: a row whose delivered_at is set (marked before, or set by hand to skip it)
-- or whose seq a ledger row holds. The view outbox_status below answers "was it delivered, when".
-- Failed rows are still marked on the row itself (failed_at, attempts, last_error): they are rare.

CREATE TABLE IF NOT EXISTS outbox_delivered (
    seqs         int8multirange NOT NULL,             -- the outbox seq values one batch delivered
    delivered_at timestamptz    NOT NULL DEFAULT now() -- when the batch was marked
);

-- "Was this row delivered" (the view) and the relay's "which batches lie above the watermark".
CREATE INDEX IF NOT EXISTS outbox_delivered_seqs_idx ON outbox_delivered USING gist (seqs);

-- The relay's low watermark: every row whose seq is below it is delivered or failed. It moves
-- only past rows no running transaction can still add (see README "Delivery tracking"), so the
-- rows the relay looks for after losing its slot, and the oldest-undelivered gauge, are read
-- from the watermark up instead of from the start of the table.
ALTER TABLE outbox_relay_state ADD COLUMN IF NOT EXISTS delivered_below bigint NOT NULL DEFAULT 0;

-- Each row with its delivery state: 'delivered' (with the time), 'failed' or 'pending'.
-- For one row or a few, by id; counting a whole large table this way probes the ledger per row.
CREATE OR REPLACE VIEW outbox_status AS
SELECT o.id, o.seq, o.aggregatetype, o.aggregateid, o.type, o.payload, o.headers, o.topic,
       o.created_at,
       coalesce(o.delivered_at, d.delivered_at) AS delivered_at,
       o.failed_at, o.attempts, o.last_error,
       CASE WHEN coalesce(o.delivered_at, d.delivered_at) IS NOT NULL THEN 'delivered'
            WHEN o.failed_at IS NOT NULL THEN 'failed'
            ELSE 'pending' END AS state
FROM outbox o
LEFT JOIN LATERAL (
    SELECT min(l.delivered_at) AS delivered_at FROM outbox_delivered l WHERE l.seqs @> o.seq
) d ON true;

-- Skip a row for good (it will not be sent, nor sent again): SELECT outbox_skip('<id>');
-- Same effect as setting delivered_at by hand; kept as a function so the ledger stays the
-- relay's own.
CREATE OR REPLACE FUNCTION outbox_skip(p_id uuid) RETURNS boolean
LANGUAGE sql
AS $$
    WITH r AS (SELECT seq FROM outbox WHERE id = p_id),
         ins AS (INSERT INTO outbox_delivered (seqs)
                 SELECT int8multirange(int8range(seq, seq, '[]')) FROM r RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM ins)
$$;

-- The relay's role needs, besides what sql/001_outbox.sql lists:
--   GRANT SELECT, INSERT, DELETE ON outbox_delivered TO <role>;
--   GRANT UPDATE (delivered_below) ON outbox_relay_state TO <role>;
