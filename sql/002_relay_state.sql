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
