-- outbox-relay schema, part 6: the table-less outbox.
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/006_emit.sql
-- Safe to re-run.
--
-- outbox_emit() writes an event straight into the WAL, inside the calling transaction, with
-- pg_logical_emit_message(true, 'outbox', <json>): nothing is written to a table, nothing is
-- marked later, nothing needs deleting. The relay reads it from its slot like an inserted row
-- (outbox.message_prefix, default 'outbox') and publishes it with the same routing, headers,
-- dead-lettering, metrics and exactly-once mode. A transaction that rolls back takes its
-- messages with it: they are never decoded, so never published.
--
-- The trade-off: there is no SQL-visible delivery state. The replication slot (and, in
-- exactly-once mode, the progress record in Kafka) is the only record of what was delivered;
-- a lost slot loses the messages not yet delivered, because no table holds them to be read again.
-- Use the outbox table where "was it delivered" must be answerable in SQL or the slot may be lost
-- (failover before Postgres 17 without failover slots).
--
--   BEGIN;
--   INSERT INTO orders ...;
--   SELECT outbox_emit('order', '42', 'OrderPlaced', '{"total": 42.5}');
--   COMMIT;

CREATE OR REPLACE FUNCTION outbox_emit(
    p_aggregatetype text,
    p_aggregateid   text,
    p_type          text,
    p_payload       jsonb,
    p_headers       jsonb DEFAULT NULL,
    p_topic         text  DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_id uuid := gen_random_uuid();
BEGIN
    IF p_aggregatetype IS NULL OR p_aggregateid IS NULL OR p_type IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: aggregatetype, aggregateid and type must not be NULL'
            USING ERRCODE = '22004';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object of string values, got %',
            jsonb_typeof(p_headers)
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_logical_emit_message(
        true,
        'outbox',
        jsonb_build_object(
            'id', v_id,
            'aggregatetype', p_aggregatetype,
            'aggregateid', p_aggregateid,
            'type', p_type,
            'payload', p_payload,
            'headers', p_headers,
            'topic', p_topic
        )::text
    );
    RETURN v_id;
END
$$;
