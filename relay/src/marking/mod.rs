//! The marking stage: broker acknowledgements in, rows marked, completions out.
//!
//! Acks are gathered into batches and marked with one `UPDATE ... WHERE id = ANY($1)` on an
//! ordinary connection. A batch is every ack that arrived while the previous UPDATE ran (up to
//! `pipeline.mark_batch_size`), so a lone ack is marked at once and batches grow with load;
//! `pipeline.mark_interval_ms` > 0 waits that much longer for more. A poison row's dead-letter record, once acknowledged, marks its row failed
//! (`attempts`, `last_error`, `failed_at`) instead. Only after the UPDATE committed are the
//! messages reported completed to the pipeline, so the slot never advances past a row that is
//! published but unmarked. A failing UPDATE is retried with backoff (reconnecting as needed) for
//! as long as it takes; meanwhile the pipeline's in-flight bound stops WAL reading. If Postgres
//! says it is shutting down, the pipeline is told at once so the replication connection lets go.
//!
//! RocketMQ sink: acks carry a half message ([`HalfRef`]). Its row is marked in one transaction
//! with `outbox_tx_begin(<its oracle key>)`, then the half message is committed (rolled back for
//! a row delivered before or gone) through the [`Settler`] before the batch is reported. A key a
//! check-back already settled as rolled back is not marked; the batch then reports the sink
//! broken instead of complete, so the relay reads the unconfirmed rows again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;
use crate::error::needs_operator;
use crate::ops::health::Health;
use crate::pipeline::Completion;
use crate::pipeline::watermark::TxSeq;
use crate::postgres;
use crate::postgres::quote::quote_ident;
use crate::rocketmq::client::Resolution;
use crate::sink::rocketmq::{HalfRef, Settler};
use crate::sink::{Delivery, FailureNote};

/// The connection in `slot`, (re)connected when needed.
async fn connected<'a>(
    slot: &'a mut Option<Client>,
    pg: &tokio_postgres::Config,
) -> Result<&'a Client, tokio_postgres::Error> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = Some(postgres::connect(pg).await?);
    }
    Ok(slot.as_ref().expect("connected just above"))
}

/// One write the marking stage makes.
#[derive(Clone, Copy)]
enum Mark<'a> {
    Delivered,
    /// Rows failed (dead-lettered or parked) with the same note.
    Failed(&'a FailureNote),
}

/// How long a confirmed row whose inserting transaction is unknown may stay invisible to the
/// marking connection before the relay decides it was deleted (see `execute_until_done`).
const NOT_VISIBLE_LIMIT: Duration = Duration::from_secs(30);

/// Which of the given transactions (32-bit ids) had ended, committed or aborted, as of this
/// statement's snapshot: `pg_visible_in_snapshot` is true for a transaction the snapshot does
/// not see as running. `pg_xact_status` would not do: it reads the commit log, which says
/// "committed" a moment before the transaction leaves the list of running ones and its rows
/// become visible to other sessions (for as long as a synchronous standby is awaited). Ids are
/// widened to full ids against the snapshot's xmax.
const XACT_ENDED_SQL: &str = "SELECT x FROM unnest($1::bigint[]) AS x, \
          (SELECT pg_current_snapshot() AS snap) AS s \
     WHERE pg_visible_in_snapshot( \
          (pg_snapshot_xmax(s.snap)::text::bigint \
           - ((pg_snapshot_xmax(s.snap)::text::bigint - x) % 4294967296))::text::xid8, s.snap)";

struct Marker {
    pg: tokio_postgres::Config,
    delivered_sql: String,
    failed_sql: String,
    /// Which of the given rows are already delivered.
    already_sql: String,
    /// RocketMQ sink: the outcome of those of the given oracle keys that are decided.
    keys_sql: String,
    /// RocketMQ sink: records the given oracle keys as committed (in the marking transaction).
    begin_sql: String,
    client: Option<Client>,
}

/// What one marking statement (or transaction) did.
#[derive(Default)]
struct Executed {
    /// Rows neither marked now nor marked before: not visible (yet), or gone.
    missing: Vec<Uuid>,
    /// Rows with half messages: marked (now, or by an earlier attempt whose outcome was lost),
    /// their oracle keys committed with the mark.
    marked: Vec<Uuid>,
    /// Rows with half messages that were marked before (a repeat after a restart).
    already: Vec<Uuid>,
    /// Rows whose half message a check-back settled as rolled back before it was marked.
    fenced: Vec<Uuid>,
}

impl Marker {
    fn new(config: &Config) -> Marker {
        let c = &config.outbox.columns;
        let table = config.outbox_table_sql();
        let d = quote_ident(&c.delivered_at);
        let id = quote_ident(&c.id);
        let schema = quote_ident(&config.outbox.schema);
        Marker {
            pg: config.pg_config(),
            delivered_sql: format!(
                "UPDATE {table} SET {d} = now() WHERE {id} = ANY($1) AND {d} IS NULL RETURNING {id}"
            ),
            failed_sql: format!(
                "UPDATE {table} SET {f} = now(), {a} = {a} + $2, {e} = $3 WHERE {id} = ANY($1) AND {d} IS NULL RETURNING {id}",
                f = quote_ident(&c.failed_at),
                a = quote_ident(&c.attempts),
                e = quote_ident(&c.last_error),
            ),
            already_sql: format!(
                "SELECT {id} FROM {table} WHERE {id} = ANY($1) AND {d} IS NOT NULL"
            ),
            keys_sql: format!(
                "SELECT tx_key, outcome FROM {schema}.outbox_tx WHERE tx_key = ANY($1)"
            ),
            begin_sql: format!("SELECT {schema}.outbox_tx_begin(k) FROM unnest($1::text[]) AS k"),
            client: None,
        }
    }

    /// Of `xids`, those whose transaction had ended (committed or aborted) as of now: a statement
    /// that starts after this one sees their final outcome.
    async fn ended(
        &mut self,
        xids: &[u32],
    ) -> Result<std::collections::HashSet<u32>, tokio_postgres::Error> {
        let client = connected(&mut self.client, &self.pg).await?;
        let wide: Vec<i64> = xids.iter().map(|x| i64::from(*x)).collect();
        let rows = client.query(XACT_ENDED_SQL, &[&wide]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| u32::try_from(r.get::<_, i64>(0)).ok())
            .collect())
    }

    /// Marks `ids`. Rows with a half message in `halves` (RocketMQ sink) are marked in one
    /// transaction with `outbox_tx_begin` of their oracle keys (see [`Marker::execute_keyed`]).
    async fn execute(
        &mut self,
        mark: Mark<'_>,
        ids: &[Uuid],
        halves: &HashMap<Uuid, Box<HalfRef>>,
    ) -> Result<Executed, tokio_postgres::Error> {
        let Marker {
            pg,
            delivered_sql,
            failed_sql,
            already_sql,
            keys_sql,
            begin_sql,
            client: slot,
        } = self;
        let client = connected(slot, pg).await?;
        let sql = MarkSql {
            delivered: delivered_sql,
            failed: failed_sql,
            already: already_sql,
            keys: keys_sql,
            begin: begin_sql,
        };
        let result = if halves.is_empty() {
            execute_plain(client, &sql, mark, ids).await
        } else {
            execute_keyed(client, &sql, mark, ids, halves).await
        };
        if result.is_err() {
            // With a transaction open, dropping the connection rolls it back.
            *slot = None;
        }
        result
    }

    /// Runs `mark` on `ids` until every row is marked. Returns false if the pipeline is gone.
    ///
    /// A row the broker confirmed may not be visible yet: logical decoding hands over a
    /// transaction once its commit record is in the WAL, a moment before the transaction is
    /// visible to other sessions (longer while the commit waits for a synchronous standby). An
    /// UPDATE then finds nothing; counting the row done would leave it unmarked for good. So a
    /// row not found is given up only when an UPDATE that started after its transaction had
    /// ended (seen by `ended`) still does not find it: it was deleted, or inserted and deleted in
    /// one transaction. Rows whose transaction is unknown (snapshot, redrive) are tried again
    /// for up to `NOT_VISIBLE_LIMIT`, then given up with a warning.
    ///
    /// `rows` are (id, inserting transaction if known); the lookup by id is built only when an
    /// UPDATE misses, which is rare. `halves`: see [`Marker::execute`]; the outcome for those
    /// rows is returned for settling their half messages. `None` if the pipeline is gone.
    async fn execute_until_done(
        &mut self,
        mark: Mark<'_>,
        rows: &[(Uuid, Option<u32>)],
        halves: &HashMap<Uuid, Box<HalfRef>>,
        config: &Config,
        completions: &mpsc::UnboundedSender<Completion>,
        health: &Health,
    ) -> Option<Settled> {
        let mut delays = crate::retry::backoff(&config.retry).build();
        let mut told_stopping = false;
        let mut pending: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
        let mut xids: Option<HashMap<Uuid, u32>> = None;
        // Rows whose transaction had ended before the latest UPDATE began.
        let mut ended_rows: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
        let mut invisible_since: Option<tokio::time::Instant> = None;
        let mut invisible_wait = Duration::from_millis(1);
        let mut settled = Settled::default();
        loop {
            match self.execute(mark, &pending, halves).await {
                Ok(done) => {
                    health.set_marking(None);
                    let Executed {
                        missing: mut rest,
                        marked,
                        already,
                        fenced,
                    } = done;
                    settled.marked.extend(marked);
                    settled.skipped.extend(already);
                    settled.fenced.extend(fenced);
                    if rest.is_empty() {
                        return Some(settled);
                    }
                    // Gone: their transaction had ended before an UPDATE that still missed them.
                    let gone = rest.iter().filter(|id| ended_rows.contains(id));
                    settled
                        .skipped
                        .extend(gone.filter(|id| halves.contains_key(id)));
                    rest.retain(|id| !ended_rows.contains(id));
                    if rest.is_empty() {
                        return Some(settled);
                    }
                    let xids = xids.get_or_insert_with(|| {
                        rows.iter()
                            .filter_map(|(id, x)| x.map(|x| (*id, x)))
                            .collect()
                    });
                    let known: Vec<u32> =
                        rest.iter().filter_map(|id| xids.get(id)).copied().collect();
                    let mut waiting = rest.len();
                    if !known.is_empty() {
                        match self.ended(&known).await {
                            Ok(ended) => {
                                for id in &rest {
                                    if xids.get(id).is_some_and(|x| ended.contains(x)) {
                                        ended_rows.insert(*id);
                                        waiting -= 1;
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %postgres::describe(&e), "cannot read transaction status")
                            }
                        }
                    }
                    pending = rest;
                    if waiting == 0 {
                        // Every transaction has ended: one more UPDATE settles these rows.
                        continue;
                    }
                    if pending.iter().all(|id| xids.contains_key(id)) {
                        tracing::debug!(
                            rows = waiting,
                            "confirmed rows of transactions whose commit is not visible yet; waiting"
                        );
                    } else {
                        let since = *invisible_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > NOT_VISIBLE_LIMIT {
                            tracing::warn!(
                                rows = pending.len(),
                                first = %pending[0],
                                "rows the broker confirmed are not in the outbox table (deleted?); not marking them"
                            );
                            settled
                                .skipped
                                .extend(pending.iter().filter(|id| halves.contains_key(id)));
                            return Some(settled);
                        }
                        tracing::debug!(
                            rows = pending.len(),
                            "confirmed rows not visible yet; marking them again shortly"
                        );
                    }
                    tokio::time::sleep(invisible_wait).await;
                    invisible_wait = (invisible_wait * 2).min(Duration::from_millis(100));
                }
                Err(e) if e.code().is_some_and(|c| c.code() == "OB001") => {
                    // A check-back settled a key between reading the keys and beginning them;
                    // the next attempt finds it settled (fenced).
                    tracing::debug!("a check-back settled a key while marking; marking again");
                }
                Err(e) if e.code().is_some_and(|c| needs_operator(c.code())) => {
                    // A missing grant or column: nothing is marked (so nothing is confirmed)
                    // until an operator fixes it; readiness says so meanwhile.
                    let wait = delays.next().unwrap_or(Duration::from_secs(30));
                    let advice = marking_advice(config, &postgres::describe(&e));
                    tracing::error!(error = %advice, retry_in = ?wait, "cannot mark rows in the outbox; the slot waits and /readyz is 503 until this is fixed");
                    health.set_marking(Some(advice));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let stopping = postgres::is_shutdown(&e);
                    if stopping && !told_stopping {
                        told_stopping = true;
                        let why = postgres::describe(&e);
                        if completions.send(Completion::PostgresStopping(why)).is_err() {
                            return None;
                        }
                    }
                    let wait = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        error = %postgres::describe(&e),
                        retry_in = ?wait,
                        "marking rows in the outbox failed; retrying (the slot waits)"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// What to do about a marking statement refused for a privilege or a column.
fn marking_advice(config: &Config, error: &str) -> String {
    let c = &config.outbox.columns;
    format!(
        "{error}; the relay's role needs SELECT and UPDATE on {table} (GRANT SELECT, UPDATE ON {table} \
         TO <role>) and the columns {d}, {f}, {a}, {e} must exist (outbox.columns.*, apply \
         sql/001_outbox.sql)",
        table = config.outbox_table_sql(),
        d = c.delivered_at,
        f = c.failed_at,
        a = c.attempts,
        e = c.last_error,
    )
}

/// The statements of one [`Marker`].
struct MarkSql<'a> {
    delivered: &'a str,
    failed: &'a str,
    already: &'a str,
    keys: &'a str,
    begin: &'a str,
}

/// The marking UPDATE for `ids`; returns the rows it changed.
async fn update(
    client: &Client,
    sql: &MarkSql<'_>,
    mark: Mark<'_>,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let rows = match mark {
        Mark::Delivered => client.query(sql.delivered, &[&ids]).await?,
        Mark::Failed(note) => {
            let attempts = i32::try_from(note.attempts).unwrap_or(i32::MAX);
            client
                .query(sql.failed, &[&ids, &attempts, &note.error])
                .await?
        }
    };
    Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
}

/// Of `rest` (rows the UPDATE did not change), those marked delivered before.
async fn already_delivered(
    client: &Client,
    sql: &MarkSql<'_>,
    rest: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, tokio_postgres::Error> {
    if rest.is_empty() {
        return Ok(Default::default());
    }
    let rows = client.query(sql.already, &[&rest]).await?;
    Ok(rows.iter().map(|r| r.get::<_, Uuid>(0)).collect())
}

/// The rows of `live` the UPDATE did not change.
fn unchanged(live: &[Uuid], updated: &[Uuid]) -> Vec<Uuid> {
    if updated.len() == live.len() {
        return Vec::new();
    }
    let updated: std::collections::HashSet<&Uuid> = updated.iter().collect();
    live.iter()
        .filter(|id| !updated.contains(id))
        .copied()
        .collect()
}

/// Marks `ids` with one UPDATE (no half messages involved).
async fn execute_plain(
    client: &Client,
    sql: &MarkSql<'_>,
    mark: Mark<'_>,
    ids: &[Uuid],
) -> Result<Executed, tokio_postgres::Error> {
    let updated = update(client, sql, mark, ids).await?;
    let rest = unchanged(ids, &updated);
    let already = already_delivered(client, sql, &rest).await?;
    Ok(Executed {
        missing: rest
            .into_iter()
            .filter(|id| !already.contains(id))
            .collect(),
        ..Executed::default()
    })
}

/// Marks rows with half messages in one transaction with `outbox_tx_begin` of their keys.
///
/// Everything is read inside the transaction, so a retry after any failure (a lost COMMIT
/// reply included) decides the same way: a key already committed means an earlier attempt
/// marked the row (commit its message, mark nothing again); a key settled as rolled back means
/// a check-back came first (fenced: not marked, the row is sent again).
async fn execute_keyed(
    client: &Client,
    sql: &MarkSql<'_>,
    mark: Mark<'_>,
    ids: &[Uuid],
    halves: &HashMap<Uuid, Box<HalfRef>>,
) -> Result<Executed, tokio_postgres::Error> {
    let mut out = Executed::default();
    client.batch_execute("BEGIN").await?;
    let keys: Vec<&str> = ids
        .iter()
        .filter_map(|id| halves.get(id).map(|h| h.key.as_str()))
        .collect();
    let outcomes: HashMap<String, String> = client
        .query(sql.keys, &[&keys])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut live = Vec::with_capacity(ids.len());
    for id in ids {
        match halves.get(id).and_then(|h| outcomes.get(&h.key)) {
            Some(outcome) if outcome == "rollback" => out.fenced.push(*id),
            Some(_) => out.marked.push(*id),
            None => live.push(*id),
        }
    }
    let updated = update(client, sql, mark, &live).await?;
    let begin: Vec<&str> = updated
        .iter()
        .filter_map(|id| halves.get(id).map(|h| h.key.as_str()))
        .collect();
    if !begin.is_empty() {
        client.execute(sql.begin, &[&begin]).await?;
    }
    let rest = unchanged(&live, &updated);
    let already = already_delivered(client, sql, &rest).await?;
    client.batch_execute("COMMIT").await?;
    out.marked
        .extend(updated.iter().filter(|id| halves.contains_key(id)));
    out.already = already
        .iter()
        .filter(|id| halves.contains_key(id))
        .copied()
        .collect();
    out.missing = rest
        .into_iter()
        .filter(|id| !already.contains(id))
        .collect();
    Ok(out)
}

/// What marking decided for rows with half messages (RocketMQ sink).
#[derive(Default)]
struct Settled {
    /// Marked now: commit their half messages.
    marked: Vec<Uuid>,
    /// Marked before, or gone from the table: roll their half messages back.
    skipped: Vec<Uuid>,
    /// Settled as rolled back by a check-back before they could be marked: roll their half
    /// messages back (if the check's answer has not yet) and send the rows again.
    fenced: Vec<Uuid>,
}

/// Adds one completion to the run-length list of `(transaction, count)`.
fn push_completion(done: &mut Vec<(TxSeq, u64)>, seq: TxSeq) {
    match done.last_mut() {
        Some((s, n)) if *s == seq => *n += 1,
        _ => done.push((seq, 1)),
    }
}

/// What one batch of deliveries became, reported to the pipeline in the order batches began.
struct BatchOutcome {
    marker: Marker,
    done: Vec<(TxSeq, u64)>,
    rejected: Vec<Completion>,
    /// False if the pipeline went away while marking.
    ok: bool,
}

/// Deliveries gathered into one batch.
#[derive(Default)]
struct Batch {
    /// (id, inserting transaction if known).
    delivered: Vec<(Uuid, Option<u32>)>,
    failed: Vec<(Uuid, Option<u32>, Box<FailureNote>)>,
    done: Vec<(TxSeq, u64)>,
    rejected: Vec<Completion>,
    /// RocketMQ sink: the half message of each row.
    halves: HashMap<Uuid, Box<HalfRef>>,
    /// RocketMQ sink: half messages of rows acknowledged twice in this batch (read again after a
    /// reconnect), all but the last: rolled back.
    displaced: Vec<HalfRef>,
}

impl Batch {
    fn add(&mut self, d: Delivery, mark_delivered: bool) {
        match d {
            Delivery::Acked(mut token) => {
                if let Some(half) = token.half.take()
                    && let Some(earlier) = self.halves.insert(token.id, half)
                {
                    self.displaced.push(*earlier);
                }
                match token.failure {
                    Some(note) => self.failed.push((token.id, token.xid, note)),
                    None if mark_delivered => self.delivered.push((token.id, token.xid)),
                    None => {}
                }
                push_completion(&mut self.done, token.tx_seq);
            }
            Delivery::Failed {
                token,
                error,
                message,
            } => self.rejected.push(Completion::Failed {
                token,
                error,
                message,
            }),
            // After the marks of what was acknowledged before it.
            Delivery::Broken(why) => self.rejected.push(Completion::SinkBroken(why)),
        }
    }

    /// Marks the batch's rows with `marker`.
    async fn mark(
        self,
        mut marker: Marker,
        config: Arc<Config>,
        completions: mpsc::UnboundedSender<Completion>,
        settler: Option<Settler>,
        health: Arc<Health>,
    ) -> BatchOutcome {
        let Batch {
            delivered,
            failed,
            mut done,
            mut rejected,
            mut halves,
            displaced,
        } = self;
        let mut settled = Settled::default();
        let mut ok = true;
        let mut merge = |s: Option<Settled>| match s {
            Some(s) => {
                settled.marked.extend(s.marked);
                settled.skipped.extend(s.skipped);
                settled.fenced.extend(s.fenced);
                true
            }
            None => false,
        };
        if !halves.is_empty() {
            crate::failpoint::pause_point("rocketmq-before-mark").await;
        }
        if !delivered.is_empty() {
            ok = merge(
                marker
                    .execute_until_done(
                        Mark::Delivered,
                        &delivered,
                        &halves,
                        &config,
                        &completions,
                        &health,
                    )
                    .await,
            );
            if ok {
                tracing::trace!(rows = delivered.len(), "marked delivered");
                metrics::counter!(crate::ops::metrics::ROWS_MARKED, "state" => "delivered")
                    .increment(delivered.len() as u64);
                metrics::histogram!(crate::ops::metrics::MARK_BATCH_ROWS)
                    .record(delivered.len() as f64);
            }
        }
        // Rows with the same note (a blocked aggregate's parked rows) share one UPDATE.
        let mut rest = &failed[..];
        while ok && let Some((_, _, note)) = rest.first() {
            let n = rest
                .iter()
                .take_while(|(_, _, other)| other == note)
                .count();
            let rows: Vec<(Uuid, Option<u32>)> =
                rest[..n].iter().map(|(id, xid, _)| (*id, *xid)).collect();
            ok = merge(
                marker
                    .execute_until_done(
                        Mark::Failed(note),
                        &rows,
                        &halves,
                        &config,
                        &completions,
                        &health,
                    )
                    .await,
            );
            if ok {
                metrics::counter!(crate::ops::metrics::ROWS_MARKED, "state" => "failed")
                    .increment(n as u64);
                tracing::info!(rows = n, first = %rows[0].0, error = %note.error, attempts = note.attempts, "rows marked failed");
            }
            rest = &rest[n..];
        }
        if ok && !halves.is_empty() {
            crate::failpoint::crash_point("rocketmq-after-mark");
            let mut settle: Vec<(HalfRef, Resolution)> = displaced
                .into_iter()
                .map(|h| (h, Resolution::Rollback))
                .collect();
            for (ids, resolution) in [
                (&settled.marked, Resolution::Commit),
                (&settled.skipped, Resolution::Rollback),
                (&settled.fenced, Resolution::Rollback),
            ] {
                settle.extend(
                    ids.iter()
                        .filter_map(|id| halves.remove(id))
                        .map(|h| (*h, resolution)),
                );
            }
            if !settled.skipped.is_empty() {
                tracing::info!(
                    rows = settled.skipped.len(),
                    first = %settled.skipped[0],
                    "rolling back the RocketMQ messages of rows delivered before (read again after a restart) or no longer in the outbox"
                );
            }
            if let Some(settler) = &settler {
                settler.settle(settle).await;
            }
            if let Some(first) = settled.fenced.first() {
                // Their messages are gone. Completing the batch would let the slot pass them:
                // report nothing of it and have the relay read everything unconfirmed again
                // (rows marked meanwhile are recognised as delivered and not sent twice).
                done.clear();
                rejected.push(Completion::SinkBroken(format!(
                    "a check-back settled the message of row {first} (and {} more) as rolled back \
                     before the relay marked it: another relay of producer group {} answered it, \
                     or marking took longer than the broker's transactionTimeout; sending the \
                     unconfirmed rows again (if this repeats, raise the broker's \
                     transactionTimeout)",
                    settled.fenced.len() - 1,
                    config.rocketmq.producer_group,
                )));
            }
        }
        BatchOutcome {
            marker,
            done,
            rejected,
            ok,
        }
    }
}

/// How long acknowledgements are gathered before they are passed on when nothing is marked:
/// completions only move the slot's confirmed position (reported every 100 ms at most), so a
/// few milliseconds cost nothing and spare a cross-thread wake-up per message.
const PASS_THROUGH_GATHER: Duration = Duration::from_millis(5);

/// Runs until `deliveries` closes. With `pipeline.mark_delivered` off, acks pass straight
/// through as completions (dead-lettered rows are still marked failed).
///
/// Up to `pipeline.mark_connections` batches are marked at once, each on its own connection;
/// their completions (and any failure reports gathered with them) go to the pipeline in the
/// order the batches began.
pub async fn run(
    config: Config,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    completions: mpsc::UnboundedSender<Completion>,
    settler: Option<Settler>,
    health: Arc<Health>,
) {
    let mark_delivered = config.pipeline.mark_delivered;
    let batch_size = config.pipeline.mark_batch_size;
    let interval = if mark_delivered {
        Duration::from_millis(config.pipeline.mark_interval_ms)
    } else {
        PASS_THROUGH_GATHER
    };
    let connections = if mark_delivered {
        config.pipeline.mark_connections.max(1)
    } else {
        1
    };
    let config = Arc::new(config);
    let mut idle: Vec<Marker> = (0..connections).map(|_| Marker::new(&config)).collect();
    let mut marking = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(outcome) = marking.next(), if !marking.is_empty() => {
                let BatchOutcome { marker, done, rejected, ok } = outcome;
                if !ok {
                    return;
                }
                idle.push(marker);
                if !done.is_empty() && completions.send(Completion::Completed(done)).is_err() {
                    return;
                }
                for r in rejected {
                    if completions.send(r).is_err() {
                        return;
                    }
                }
            }
            first = deliveries.recv(), if open && !idle.is_empty() => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut batch = Batch::default();
                batch.add(first, mark_delivered);
                let deadline = tokio::time::Instant::now() + interval;
                while batch.delivered.len() < batch_size {
                    let next = match deliveries.try_recv() {
                        Ok(d) => d,
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            if interval.is_zero() {
                                break;
                            }
                            match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                                Ok(Some(d)) => d,
                                Ok(None) | Err(_) => break,
                            }
                        }
                    };
                    batch.add(next, mark_delivered);
                }
                let marker = idle.pop().expect("a marker is idle");
                marking.push_back(batch.mark(
                    marker,
                    config.clone(),
                    completions.clone(),
                    settler.clone(),
                    health.clone(),
                ));
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::routing::OutboxMessage;
    use crate::sink::AckToken;

    #[test]
    fn completions_are_run_length_encoded() {
        let mut done = Vec::new();
        for s in [1, 1, 2, 1, 3, 3] {
            push_completion(&mut done, s);
        }
        assert_eq!(done, vec![(1, 2), (2, 1), (1, 1), (3, 2)]);
    }

    #[tokio::test]
    async fn without_marking_acks_pass_straight_through() {
        let mut config = Config::default();
        config.pipeline.mark_delivered = false;
        let (dtx, drx) = mpsc::unbounded_channel();
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(config, drx, ctx, None, Default::default()));
        let t = |seq| AckToken::new(seq, Uuid::new_v4());
        dtx.send(Delivery::Acked(t(4))).unwrap();
        dtx.send(Delivery::Acked(t(4))).unwrap();
        let mut total = 0;
        while total < 2 {
            match crx.recv().await.unwrap() {
                Completion::Completed(v) => total += v.iter().map(|(_, n)| n).sum::<u64>(),
                other => panic!("{other:?}"),
            }
        }
        let message = OutboxMessage {
            id: Uuid::nil(),
            topic: "t".into(),
            key: bytes::Bytes::new(),
            payload: None,
            headers: vec![],
        };
        dtx.send(Delivery::Failed {
            token: t(5),
            error: "boom".into(),
            message: Box::new(message),
        })
        .unwrap();
        assert!(matches!(
            crx.recv().await.unwrap(),
            Completion::Failed { .. }
        ));
        drop(dtx);
        task.await.unwrap();
    }
}
