-- outbox-relay schema, part 2: the relay's own bookkeeping.
-- One row per replication slot: whether the first-start snapshot (rows that existed before the
-- slot) was published completely. If the relay dies mid-snapshot, the next start sees
-- snapshot_done_at IS NULL, drops the slot and does the snapshot again, so no row is skipped.
-- Safe to re-run.

CREATE TABLE IF NOT EXISTS outbox_relay_state (
    slot_name           text PRIMARY KEY,
    snapshot_started_at timestamptz,
    snapshot_done_at    timestamptz,
    snapshot_lsn        pg_lsn,
    snapshot_rows       bigint
);

-- The server the slot lives on, as IDENTIFY_SYSTEM reports it (system id; the timeline changes at
-- each promotion). The relay records it each time it starts streaming, so after a failover or a
-- restore it can say on which server the slot was lost. Added to existing tables here.
ALTER TABLE outbox_relay_state ADD COLUMN IF NOT EXISTS system_id text;
ALTER TABLE outbox_relay_state ADD COLUMN IF NOT EXISTS timeline integer;
