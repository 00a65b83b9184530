-- outbox-relay schema, part 4: an index for deleting delivered rows past their retention.
-- Apply with: psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/004_retention.sql
-- Safe to re-run. The relay deletes rows delivered more than retention.delivered_hours ago (24 h by
-- default), oldest first, in small batches; this index lets each batch start at the oldest rows
-- instead of scanning the table. created_at is never updated, so marking rows delivered stays as
-- cheap as before (and HOT with sql/optional/hot_marking.sql). Without it the deletion still works,
-- by scanning.

CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);
