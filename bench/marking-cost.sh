#!/usr/bin/env bash
# What one "mark delivered" costs Postgres, per row, for different table layouts.
#
# Starts a throwaway cluster (wal_level=logical, the benchmark's settings), fills an outbox table
# with 200,000 rows shaped like the benchmark's (payloads alternating ~200 B / ~1 KB), then marks
# them the way the relay does: batches of 1,000 ids, one UPDATE ... WHERE id = ANY(...) AND
# delivered_at IS NULL and one COMMIT each (in a procedure, so no client round trips count).
# Prints microseconds per row, how many updates were HOT, and the WAL written.
#
#   bench/marking-cost.sh            # all variants, ~1 minute
#
# Variants:
#   schema        sql/001_outbox.sql as shipped: partial index on seq WHERE delivered_at IS NULL
#                 (the update touches an indexed column's predicate, so it is never HOT)
#   narrow        the same with ~10-byte payloads (how much the row width costs)
#   plain-ff70    a plain index on seq instead, fillfactor 70 (HOT where the page has room)
#   plain-ff50    a plain index on seq, fillfactor 50 (room for every row's new version: all HOT)
#   delete        DELETE instead of UPDATE (what deleting delivered rows would cost)
# Delivery ledgers (issue 19 candidates: the outbox row is never updated; a narrow table records
# what was delivered, and "undelivered" is an anti-join against it):
#   ledger-ids    one row per delivered id: outbox_delivered (id uuid PRIMARY KEY, at timestamptz)
#   ledger-batch  one row per marking batch: (ids uuid[], at), a GIN index for "was id delivered"
#   ledger-seq    one row per marking batch: (seqs int8multirange, at) over the rows' seq, a GiST
#                 index; contiguous seqs collapse into one range
#   ledger-mark   ledger-seq plus a one-row low watermark (every seq below it is delivered),
#                 moved with each batch: "undelivered" reads only the rows from the watermark up
#   record        what the relay runs by default (outbox.on_delivered = "record",
#                 sql/005_delivery_ledger.sql): the ledger-seq insert in the relay's exact
#                 statement (seqs known; an empty by-id lookup for rows without one). The relay
#                 moves its watermark apart, every outbox.watermark_interval_ms, not per batch
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$work"
  as_pg=(runuser -u postgres --)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  "${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"${as_pg[@]}" "$bin/initdb" -D "$work/data" -A trust -U postgres >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
wal_level = logical
fsync = off
full_page_writes = off
shared_buffers = 512MB
autovacuum = off
checkpoint_timeout = 1h
max_wal_size = 10GB
EOF
"${as_pg[@]}" "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
export PGOPTIONS="-c client_min_messages=warning"
psql=(psql -h 127.0.0.1 -p "$port" -U postgres -X -q -At -v ON_ERROR_STOP=1)

run() {
  local name=$1 index=$2 ff=$3 short=$4 long=$5 stmt=$6
  "${psql[@]}" -c "DROP TABLE IF EXISTS outbox, batches, ledger"
  "${psql[@]}" -c "CREATE TABLE outbox (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
      aggregateid text NOT NULL, type text NOT NULL, payload jsonb, headers jsonb, topic text,
      created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz,
      attempts int NOT NULL DEFAULT 0, last_error text, failed_at timestamptz,
      seq bigint GENERATED ALWAYS AS IDENTITY) WITH (fillfactor = $ff)"
  "${psql[@]}" -c "$index"
  "${psql[@]}" -c "INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
      SELECT 'bench', (g % 10000)::text, 'T',
             jsonb_build_object('n', g, 'pad', repeat('x', CASE WHEN g % 2 = 0 THEN $short ELSE $long END))
      FROM generate_series(1, 200000) g"
  "${psql[@]}" -c "VACUUM ANALYZE outbox"
  "${psql[@]}" -c "CREATE TABLE batches AS
      SELECT (seq - 1) / 1000 AS b, array_agg(id ORDER BY seq) AS ids,
             array_agg(seq ORDER BY seq) AS seqs FROM outbox GROUP BY 1"
  [ -n "${ledger:-}" ] && "${psql[@]}" -c "$ledger"
  "${psql[@]}" -c "CREATE OR REPLACE PROCEDURE mark_all() LANGUAGE plpgsql AS \$\$
      DECLARE r record; n bigint;
      BEGIN
        FOR r IN SELECT ids, seqs FROM batches ORDER BY b LOOP $stmt; COMMIT; END LOOP;
      END \$\$"
  local w0 t0 t1 w1
  w0=$("${psql[@]}" -c "SELECT pg_current_wal_lsn()")
  t0=$(date +%s.%N)
  "${psql[@]}" -c "CALL mark_all()"
  t1=$(date +%s.%N)
  w1=$("${psql[@]}" -c "SELECT pg_current_wal_lsn()")
  local stats
  stats=$("${psql[@]}" -c "SELECT n_tup_hot_upd, n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = 'outbox'")
  if [ -n "${ledger:-}" ]; then
    # The question the relay and monitoring ask of a ledger: how many rows are undelivered.
    local u0 u1 undelivered
    u0=$(date +%s.%N)
    undelivered=$("${psql[@]}" -c "$undelivered_sql")
    u1=$(date +%s.%N)
    echo "             undelivered after marking: $undelivered (query $(python3 -c "print(round(($u1 - $u0) * 1000))") ms)"
  fi
  python3 - "$name" "$t0" "$t1" "$stats" "$("${psql[@]}" -c "SELECT pg_wal_lsn_diff('$w1', '$w0')")" <<'PY'
import sys
name, t0, t1, stats, wal = sys.argv[1:]
hot, total = stats.split("|")
print(f"{name:<12} {(float(t1) - float(t0)) * 1e6 / 200000:6.2f} us/row   HOT {hot:>6}/{total:<6}  WAL {float(wal) / 200000:6.0f} B/row")
PY
}

update='UPDATE outbox SET delivered_at = now() WHERE id = ANY(r.ids) AND delivered_at IS NULL'
partial='CREATE INDEX ON outbox (seq) WHERE delivered_at IS NULL'
plain='CREATE INDEX ON outbox (seq)'
echo "marking 200,000 rows in batches of 1,000 (PostgreSQL $("$bin/postgres" --version | awk '{print $3}'), wal_level=logical)"
run schema "$partial" 100 150 950 "$update"
run narrow "$partial" 100 10 10 "$update"
run plain-ff70 "$plain" 70 150 950 "$update"
run plain-ff50 "$plain" 50 150 950 "$update"
run delete "$partial" 100 150 950 'DELETE FROM outbox WHERE id = ANY(r.ids)'

ledger='CREATE TABLE ledger (id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())'
undelivered_sql='SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.id = o.id)'
run ledger-ids "$plain" 100 150 950 'INSERT INTO ledger (id) SELECT unnest(r.ids)'
ledger='CREATE TABLE ledger (ids uuid[] NOT NULL, at timestamptz NOT NULL DEFAULT now()); CREATE INDEX ON ledger USING gin (ids)'
undelivered_sql='SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.ids @> ARRAY[o.id])'
run ledger-batch "$plain" 100 150 950 'INSERT INTO ledger (ids) VALUES (r.ids)'
ledger='CREATE TABLE ledger (seqs int8multirange NOT NULL, at timestamptz NOT NULL DEFAULT now()); CREATE INDEX ON ledger USING gist (seqs)'
undelivered_sql='SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.seqs @> o.seq)'
run ledger-seq "$plain" 100 150 950 'INSERT INTO ledger (seqs) SELECT range_agg(int8range(s, s, '"'"'[]'"'"')) FROM unnest(r.seqs) s'
ledger='CREATE TABLE ledger (seqs int8multirange NOT NULL, at timestamptz NOT NULL DEFAULT now()); CREATE INDEX ON ledger USING gist (seqs); DROP TABLE IF EXISTS low; CREATE TABLE low (below bigint NOT NULL); INSERT INTO low VALUES (0)'
undelivered_sql='SELECT count(*) FROM outbox o WHERE o.seq >= (SELECT below FROM low) AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.seqs @> o.seq)'
# The relay knows the lowest seq it has not confirmed; in this run batches arrive in seq order, so
# the watermark is the batch's last seq + 1 (the best case: a hole keeps it back).
run ledger-mark "$plain" 100 150 950 'INSERT INTO ledger (seqs) SELECT range_agg(int8range(s, s, '"'"'[]'"'"')) FROM unnest(r.seqs) s; UPDATE low SET below = r.seqs[array_upper(r.seqs, 1)] + 1'
ledger='CREATE TABLE ledger (seqs int8multirange NOT NULL, delivered_at timestamptz NOT NULL DEFAULT now()); CREATE INDEX ON ledger USING gist (seqs)'
undelivered_sql='SELECT count(*) FROM outbox o WHERE NOT o.seq <@ (SELECT coalesce(range_agg(seqs), '"'"'{}'"'"'::int8multirange) FROM ledger)'
run record "$partial" 100 150 950 'WITH found AS (SELECT id, seq FROM outbox WHERE id = ANY('"'"'{}'"'"'::uuid[])), ins AS (INSERT INTO ledger (seqs) SELECT range_agg(int8range(s, s, '"'"'[]'"'"')) FROM (SELECT unnest(r.seqs) UNION ALL SELECT seq FROM found) AS x(s) HAVING count(*) > 0 RETURNING 1) SELECT count(*) INTO n FROM found'
