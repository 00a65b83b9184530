-- outbox-relay schema, part 3: the transaction oracle, for broker check-backs.
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/003_transactions.sql
-- Safe to re-run. Only needed when something asks the relay what became of a local transaction:
-- RocketMQ check-backs (half messages), the HTTP endpoint GET /v1/transactions/{key} (DTM-style
-- "query prepared"), or the relay's own RocketMQ sink.
--
-- Why not "row exists -> commit, else rollback": a transaction still in flight has no visible
-- row yet, so the check would answer rollback and then the transaction commits: the broker drops
-- a message whose business change happened. Barrier fencing instead:
--   * the app's business transaction starts with  SELECT outbox_tx_begin('<key>');
--     which records the key as 'commit' (visible when, and only when, the transaction commits);
--   * a check inserts (key, 'rollback') ON CONFLICT DO NOTHING, then reads the outcome.
--     - business transaction committed earlier: the insert does nothing, the check reads commit;
--     - in flight: the insert waits on the key's row lock; when the transaction commits the check
--       reads commit, when it aborts the check's rollback goes in;
--     - the check came first (or the transaction never ran): rollback is recorded, and a business
--       transaction that starts later fails in outbox_tx_begin, so it can never commit.
--   A check that cannot decide in time (lock_timeout, Postgres down, any error) answers UNKNOWN,
--   never ROLLBACK; brokers ask again later.
-- Keys are kept for a retention (outbox_tx_purge, default 24 h in the relay), which must be longer
-- than the broker's check horizon (RocketMQ: transactionCheckMax x transactionCheckInterval).

CREATE TABLE IF NOT EXISTS outbox_tx (
    tx_key     text        PRIMARY KEY,
    outcome    text        NOT NULL CHECK (outcome IN ('commit', 'rollback')),
    created_at timestamptz NOT NULL DEFAULT now(),
    owner      xid8        -- the transaction that wrote the row (a second call in it is allowed)
);

CREATE INDEX IF NOT EXISTS outbox_tx_created_at_idx ON outbox_tx (created_at);

-- The first statement of a business transaction whose message a broker may check back on.
-- Raises SQLSTATE OB001 if a check already settled the key as rolled back (the transaction must
-- abort: its message is gone), OB002 if another transaction already committed under this key.
-- Calling it twice with the same key in one transaction is allowed.
CREATE OR REPLACE FUNCTION outbox_tx_begin(p_key text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    v_outcome text;
    v_owner   xid8;
    v_xmin    xid;
BEGIN
    IF p_key IS NULL OR p_key = '' OR octet_length(p_key) > 1024 THEN
        RAISE EXCEPTION 'outbox_tx_begin: the transaction key must be 1 to 1024 bytes'
            USING ERRCODE = '22023',
                  HINT = 'pass the key the broker will check back on, e.g. the message key';
    END IF;
    INSERT INTO outbox_tx (tx_key, outcome, owner) VALUES (p_key, 'commit', pg_current_xact_id())
        ON CONFLICT (tx_key) DO NOTHING
        RETURNING xmin INTO v_xmin;
    IF FOUND THEN
        -- Inside a savepoint the row belongs to the subtransaction: rolling back to the savepoint
        -- would drop the barrier while the transaction goes on to commit. Refuse.
        IF v_xmin::text <> pg_current_xact_id()::xid::text THEN
            RAISE EXCEPTION 'outbox_tx_begin(%) ran inside a savepoint (subtransaction)', p_key
                USING ERRCODE = '25001',
                      HINT = 'call it as the first statement of the transaction, outside any SAVEPOINT or nested atomic block';
        END IF;
        RETURN;
    END IF;
    -- The key exists: settled by a check, or written by a transaction that committed (or by
    -- this one, in an earlier call).
    SELECT outcome, owner INTO v_outcome, v_owner FROM outbox_tx WHERE tx_key = p_key;
    IF v_outcome IS NULL THEN
        RAISE EXCEPTION 'outbox transaction % was purged while starting; retry the transaction', p_key
            USING ERRCODE = '40001';
    ELSIF v_outcome = 'rollback' THEN
        RAISE EXCEPTION 'outbox transaction % was already settled as rolled back by a check-back', p_key
            USING ERRCODE = 'OB001',
                  HINT = 'the broker dropped this transaction''s message; roll back and retry with a new key';
    ELSIF v_owner IS DISTINCT FROM pg_current_xact_id() THEN
        RAISE EXCEPTION 'outbox transaction % already committed', p_key
            USING ERRCODE = 'OB002',
                  HINT = 'transaction keys are single-use; this key''s message was already committed';
    END IF;
END
$$;

-- What happened to the transaction with this key: 'committed' or 'rolled_back'. Settles the
-- key as rolled back if no transaction committed it; waits for one in flight. Run it in its own
-- transaction with a lock_timeout: a timeout means "unknown, ask again".
CREATE OR REPLACE FUNCTION outbox_tx_check(p_key text) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    v_outcome text;
BEGIN
    INSERT INTO outbox_tx (tx_key, outcome) VALUES (p_key, 'rollback')
        ON CONFLICT (tx_key) DO NOTHING;
    SELECT outcome INTO v_outcome FROM outbox_tx WHERE tx_key = p_key;
    IF v_outcome IS NULL THEN
        -- Purged between the insert and the read: undecided, ask again.
        RAISE EXCEPTION 'outbox transaction % vanished during the check', p_key USING ERRCODE = '40001';
    END IF;
    RETURN CASE v_outcome WHEN 'commit' THEN 'committed' WHEN 'rollback' THEN 'rolled_back' END;
END
$$;

-- Deletes up to p_batch keys older than p_retention; returns how many. Small batches, and
-- SKIP LOCKED, so it never waits on (or blocks) a business transaction or a check.
CREATE OR REPLACE FUNCTION outbox_tx_purge(p_retention interval, p_batch int DEFAULT 1000)
RETURNS bigint
LANGUAGE sql
AS $$
    WITH doomed AS (
        SELECT tx_key FROM outbox_tx
         WHERE created_at < now() - p_retention
         ORDER BY created_at
         LIMIT p_batch
         FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM outbox_tx t USING doomed d WHERE t.tx_key = d.tx_key RETURNING 1
    )
    SELECT count(*) FROM gone;
$$;

-- The functions find outbox_tx in the schema this script was applied in, whatever the caller's
-- search_path (and never a temporary table of the same name).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_tx_begin(text) SET search_path = %I, pg_catalog, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION outbox_tx_check(text) SET search_path = %I, pg_catalog, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION outbox_tx_purge(interval, int) SET search_path = %I, pg_catalog, pg_temp', current_schema());
END
$$;
