//! What "delivered" means under `outbox.on_delivered`, as the SQL the snapshot, marking,
//! redrives, the oldest-undelivered gauge and retention share; and the delivery ledger's low
//! watermark.
//!
//! `mark` and `delete`: a row is delivered when its `delivered_at` is set (or, `delete`, when it
//! is gone). `record` (the default): when its `delivered_at` is set (marked before the ledger,
//! or skipped by hand) or a row of the ledger (`outbox.ledger_table`, one per marking batch)
//! holds its `seq` in an `int8multirange`. The outbox row is never updated by a delivery, so a
//! delivery costs one small insert per batch instead of a whole-row UPDATE in the WAL.
//!
//! The ledger's low watermark (`delivered_below` in the state table) bounds the search for rows
//! that are neither delivered nor failed: every row whose `seq` is below it is settled. `seq`
//! is drawn when a row is inserted, not when its transaction commits, so a transaction still
//! running may hold a low `seq` while later ones are delivered; the watermark therefore moves
//! past a `seq` only once every transaction that could hold it has ended (see [`Watermark`]).

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, OnDelivered};
use crate::quote::{quote_ident, quote_literal};

/// SQL that is true when the row `alias` is delivered.
pub fn is_delivered(config: &Config, alias: &str) -> String {
    let c = &config.outbox.columns;
    let d = format!("{alias}.{}", quote_ident(&c.delivered_at));
    match config.outbox.on_delivered {
        OnDelivered::Mark | OnDelivered::Delete => format!("{d} IS NOT NULL"),
        OnDelivered::Record => format!(
            "({d} IS NOT NULL OR EXISTS (SELECT 1 FROM {ledger} l WHERE l.seqs @> {alias}.{seq}))",
            ledger = config.ledger_table_sql(),
            seq = quote_ident(&c.seq),
        ),
    }
}

/// `record`: the watermark of this relay's slot, as an SQL expression.
fn watermark_sql(config: &Config) -> String {
    format!(
        "(SELECT coalesce(max(delivered_below), 0) FROM {state} WHERE slot_name = {slot})",
        state = config.state_table_sql(),
        slot = quote_literal(&config.postgres.slot),
    )
}

/// The condition for rows of `alias` that are neither delivered nor failed. `mark` and
/// `delete`: `delivered_at` and `failed_at` NULL (the partial index on `seq` holds them).
/// `record`: the same, found from the watermark up through the `seq` index, each candidate
/// tested against the ledger rows above the watermark merged into one multirange (computed once
/// per statement; merged range by range: `range_agg` of multiranges is not in Postgres 14).
pub fn pending_condition(config: &Config, alias: &str) -> String {
    let c = &config.outbox.columns;
    let unmarked = format!(
        "{alias}.{d} IS NULL AND {alias}.{f} IS NULL",
        d = quote_ident(&c.delivered_at),
        f = quote_ident(&c.failed_at),
    );
    if config.outbox.on_delivered != OnDelivered::Record {
        return unmarked;
    }
    let seq = format!("{alias}.{}", quote_ident(&c.seq));
    let w = watermark_sql(config);
    format!(
        "{seq} >= {w} AND {unmarked} \
         AND NOT {seq} <@ (SELECT coalesce(range_agg(r), '{{}}'::int8multirange) \
                           FROM {ledger} l, unnest(l.seqs) AS r \
                           WHERE l.seqs && int8range({w}, NULL))",
        ledger = config.ledger_table_sql(),
    )
}

/// The ledger statement of the plain marking path (`record`): the batch's seqs, those known
/// (`$1`) and those looked up by id (`$2`, rows whose seq did not come with them), inserted as
/// one multirange. Returns the ids of `$2` it found (the others are not visible yet, or gone).
pub fn record_sql(config: &Config) -> String {
    let c = &config.outbox.columns;
    format!(
        "WITH found AS (SELECT {id} AS id, {seq} AS seq FROM {table} WHERE {id} = ANY($2)), \
              ins AS (INSERT INTO {ledger} (seqs) \
                      SELECT range_agg(int8range(s, s, '[]')) \
                      FROM (SELECT unnest($1::int8[]) UNION ALL SELECT seq FROM found) AS x(s) \
                      HAVING count(*) > 0 RETURNING 1) \
         SELECT id FROM found",
        id = quote_ident(&c.id),
        seq = quote_ident(&c.seq),
        table = config.outbox_table_sql(),
        ledger = config.ledger_table_sql(),
    )
}

/// The statement that marks rows `$1` delivered and returns those it marked now (not those
/// delivered before, not those it cannot see): `mark` an UPDATE, `delete` a DELETE, `record`
/// a ledger insert of the rows found undelivered (the RocketMQ sink's path, which must tell a
/// row marked now from one marked before).
pub fn mark_delivered_sql(config: &Config) -> String {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let d = quote_ident(&c.delivered_at);
    let id = quote_ident(&c.id);
    match config.outbox.on_delivered {
        OnDelivered::Mark => format!(
            "UPDATE {table} SET {d} = now() WHERE {id} = ANY($1) AND {d} IS NULL RETURNING {id}"
        ),
        OnDelivered::Delete => {
            format!("DELETE FROM {table} WHERE {id} = ANY($1) AND {d} IS NULL RETURNING {id}")
        }
        OnDelivered::Record => format!(
            "WITH r AS (SELECT o.{id} AS id, o.{seq} AS seq FROM {table} o \
                        WHERE o.{id} = ANY($1) AND NOT {delivered}), \
                  ins AS (INSERT INTO {ledger} (seqs) \
                          SELECT range_agg(int8range(seq, seq, '[]')) FROM r \
                          HAVING count(*) > 0 RETURNING 1) \
             SELECT id FROM r",
            seq = quote_ident(&c.seq),
            delivered = is_delivered(config, "o"),
            ledger = config.ledger_table_sql(),
        ),
    }
}

/// Rows deleted past their retention (`$1` seconds, at most `$2` rows per statement): delivered
/// longer ago than the retention, oldest first, skipping rows others hold locked.
pub fn expired_rows_sql(config: &Config) -> String {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let id = quote_ident(&c.id);
    let d = quote_ident(&c.delivered_at);
    let delivered_long_ago = match config.outbox.on_delivered {
        OnDelivered::Mark | OnDelivered::Delete => {
            format!("o.{d} < now() - make_interval(secs => $1)")
        }
        OnDelivered::Record => format!(
            "(o.{d} < now() - make_interval(secs => $1) OR EXISTS (SELECT 1 FROM {ledger} l \
               WHERE l.seqs @> o.{seq} AND l.delivered_at < now() - make_interval(secs => $1)))",
            ledger = config.ledger_table_sql(),
            seq = quote_ident(&c.seq),
        ),
    };
    format!(
        "DELETE FROM {table} WHERE {id} IN (\
           SELECT o.{id} FROM {table} o \
           WHERE o.created_at < now() - make_interval(secs => $1) AND {delivered_long_ago} \
           ORDER BY o.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
    )
}

/// `record`: ledger rows past the retention (`$1` seconds, at most `$2` per statement) that are
/// wholly below the watermark and hold no row still in the outbox (deleted by retention before,
/// or never visible). What they recorded stays settled by the watermark.
pub fn expired_ledger_sql(config: &Config) -> String {
    let c = &config.outbox.columns;
    format!(
        "DELETE FROM {ledger} WHERE ctid IN (\
           SELECT l.ctid FROM {ledger} l \
           WHERE l.delivered_at < now() - make_interval(secs => $1) \
             AND upper(l.seqs) <= {w} \
             AND NOT EXISTS (SELECT 1 FROM {table} o WHERE o.{seq} >= lower(l.seqs) \
                             AND o.{seq} < upper(l.seqs) AND o.{seq} <@ l.seqs) \
           LIMIT $2)",
        ledger = config.ledger_table_sql(),
        table = config.outbox_table_sql(),
        seq = quote_ident(&c.seq),
        w = watermark_sql(config),
    )
}

/// One reading of the server, for moving the watermark: the oldest transaction still running
/// (`xmin`), the first transaction id not yet assigned (`xmax`) and the highest `seq` visible.
#[derive(Debug, Clone, Copy)]
struct Reading {
    xmin: i64,
    xmax: i64,
    top_seq: Option<i64>,
}

/// A `seq` the watermark may move up to once every transaction that could hold a `seq` at or
/// below it has ended.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    top_seq: i64,
    /// The first unassigned transaction id, read one interval after `top_seq`.
    xmax: Option<i64>,
}

/// Moves the ledger's low watermark (`record`), one step per `outbox.watermark_interval_ms`.
///
/// Why two readings: a transaction takes its `seq` when it inserts the row and gets its
/// transaction id a moment later, in the same statement (unless it had one already). At reading
/// k the highest visible `seq` is S; at reading k+1, one interval later, every transaction that
/// drew a `seq` up to S before reading k has its id, all below that reading's `xmax` X. Once the
/// oldest running transaction is at or above X, none of them is running: every row with a
/// `seq` up to S is committed (visible) or never will be. The watermark then moves to the
/// lowest such visible row that is neither delivered nor failed, or past S if there is none.
/// This holds for the shipped `seq` (an identity column, `CACHE 1`); a sequence cache above 1
/// lets a session use old values late, and `outbox-relay check` warns about it.
pub struct Watermark {
    read_sql: String,
    advance_sql: String,
    candidate: Option<Candidate>,
}

impl Watermark {
    pub fn new(config: &Config) -> Watermark {
        let c = &config.outbox.columns;
        let seq = quote_ident(&c.seq);
        let table = config.outbox_table_sql();
        let read_sql = format!(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint, \
                    (SELECT max({seq}) FROM {table} WHERE {d} IS NULL) \
             FROM pg_current_snapshot() AS s",
            d = quote_ident(&c.delivered_at),
        );
        let advance_sql = format!(
            "UPDATE {state} SET delivered_below = greatest(delivered_below, coalesce(( \
                 SELECT o.{seq} FROM {table} o \
                 WHERE o.{seq} <= $2 AND {pending} ORDER BY o.{seq} LIMIT 1), $2 + 1)) \
             WHERE slot_name = $1 RETURNING delivered_below",
            state = config.state_table_sql(),
            pending = pending_condition(config, "o"),
        );
        Watermark {
            read_sql,
            advance_sql,
            candidate: None,
        }
    }

    /// One step; returns the watermark when it was moved.
    pub async fn step(
        &mut self,
        client: &Client,
        slot: &str,
    ) -> Result<Option<i64>, tokio_postgres::Error> {
        let row = client.query_one(&self.read_sql, &[]).await?;
        let now = Reading {
            xmin: row.get(0),
            xmax: row.get(1),
            top_seq: row.get(2),
        };
        let mut moved = None;
        match self.candidate {
            None => {}
            Some(Candidate {
                xmax: None,
                top_seq,
            }) => {
                self.candidate = Some(Candidate {
                    top_seq,
                    xmax: Some(now.xmax),
                });
                return Ok(None);
            }
            Some(Candidate {
                xmax: Some(x),
                top_seq,
            }) => {
                if now.xmin < x {
                    return Ok(None); // a transaction that may hold a seq up to top_seq runs
                }
                let row = client
                    .query_opt(&self.advance_sql, &[&slot, &top_seq])
                    .await?;
                moved = row.map(|r| r.get::<_, i64>(0));
            }
        }
        self.candidate = now.top_seq.map(|top_seq| Candidate {
            top_seq,
            xmax: None,
        });
        Ok(moved)
    }
}

/// Keeps the watermark moving until dropped (the marking stage holds it while it runs).
pub async fn keep_watermark(config: Config) {
    let pg = config.pg_target();
    let every = Duration::from_millis(config.outbox.watermark_interval_ms);
    let mut watermark = Watermark::new(&config);
    let mut client: Option<Client> = None;
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        if client.as_ref().is_none_or(Client::is_closed) {
            client = crate::postgres::connect(&pg).await.ok();
            if let Some(c) = &client {
                let _ = c.batch_execute("SET statement_timeout = '30s'").await;
            }
        }
        let Some(c) = &client else { continue };
        match watermark.step(c, &config.postgres.slot).await {
            Ok(Some(below)) => {
                failing = false;
                metrics::gauge!(crate::metrics::DELIVERED_BELOW).set(below as f64);
                tracing::trace!(below, "delivery ledger watermark moved");
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(
                        error = %crate::postgres::describe(&e),
                        "cannot move the delivery ledger's watermark (apply sql/005_delivery_ledger.sql; \
                         the relay's role needs UPDATE (delivered_below) ON {}); rows are still marked, \
                         only the search for undelivered rows grows",
                        config.state_table_sql()
                    );
                }
            }
        }
    }
}
