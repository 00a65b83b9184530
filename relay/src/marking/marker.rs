//! One marking connection and its statements: marks rows delivered or failed until every row
//! is marked, waiting for rows whose transaction is not visible yet, and telling the pipeline
//! when Postgres shuts down. A missing grant or column turns readiness red with the fix.

use std::collections::HashMap;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio_postgres::Client;
use uuid::Uuid;

use super::rocketmq::{Settled, execute_keyed};
use super::statements::{Executed, Mark, MarkSql, already_delivered, unchanged, update};
use crate::config::{Config, OnDelivered};
use crate::error::needs_operator;
use crate::pipeline::Completion;
use crate::postgres;
use crate::quote::quote_ident;
use crate::sink::rocketmq::HalfRef;

/// The connection in `slot`, (re)connected when needed.
pub(super) async fn connected<'a>(
    slot: &'a mut Option<Client>,
    pg: &crate::pgtls::PgTarget,
) -> Result<&'a Client, tokio_postgres::Error> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = Some(postgres::connect(pg).await?);
    }
    Ok(slot.as_ref().expect("connected just above"))
}

/// How long a confirmed row whose inserting transaction is unknown may stay invisible to the
/// marking connection before the relay decides it was deleted (see `execute_until_done`).
pub(super) const NOT_VISIBLE_LIMIT: Duration = Duration::from_secs(30);

/// Which of the given transactions (32-bit ids) had ended, committed or aborted, as of this
/// statement's snapshot: `pg_visible_in_snapshot` is true for a transaction the snapshot does
/// not see as running. `pg_xact_status` would not do: it reads the commit log, which says
/// "committed" a moment before the transaction leaves the list of running ones and its rows
/// become visible to other sessions (for as long as a synchronous standby is awaited). Ids are
/// widened to full ids against the snapshot's xmax.
pub(super) const XACT_ENDED_SQL: &str = "SELECT x FROM unnest($1::bigint[]) AS x, \
          (SELECT pg_current_snapshot() AS snap) AS s \
     WHERE pg_visible_in_snapshot( \
          (pg_snapshot_xmax(s.snap)::text::bigint \
           - ((pg_snapshot_xmax(s.snap)::text::bigint - x) % 4294967296))::text::xid8, s.snap)";

pub(super) struct Marker {
    pg: crate::pgtls::PgTarget,
    delivered_sql: String,
    /// `outbox.on_delivered = "record"`: the ledger insert of the plain path.
    record_sql: Option<String>,
    failed_sql: String,
    /// Which of the given rows are already delivered.
    already_sql: String,
    /// RocketMQ sink: the outcome of those of the given oracle keys that are decided.
    keys_sql: String,
    /// RocketMQ sink: records the given oracle keys as committed (in the marking transaction).
    begin_sql: String,
    client: Option<Client>,
}

impl Marker {
    pub(super) fn new(config: &Config) -> Marker {
        let c = &config.outbox.columns;
        let table = config.outbox_table_sql();
        let id = quote_ident(&c.id);
        let schema = quote_ident(&config.outbox.schema);
        let delivered = crate::delivered::is_delivered(config, "o");
        Marker {
            pg: config.pg_target(),
            delivered_sql: crate::delivered::mark_delivered_sql(config),
            record_sql: (config.outbox.on_delivered == OnDelivered::Record)
                .then(|| crate::delivered::record_sql(config)),
            failed_sql: format!(
                "UPDATE {table} o SET {f} = now(), {a} = o.{a} + $2, {e} = $3 \
                 WHERE o.{id} = ANY($1) AND NOT {delivered} RETURNING o.{id}",
                f = quote_ident(&c.failed_at),
                a = quote_ident(&c.attempts),
                e = quote_ident(&c.last_error),
            ),
            already_sql: format!(
                "SELECT o.{id} FROM {table} o WHERE o.{id} = ANY($1) AND {delivered}"
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
    pub(super) async fn ended(
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
    /// `seqs`: the rows' `seq` where known (the ledger of `outbox.on_delivered = "record"`).
    pub(super) async fn execute(
        &mut self,
        mark: Mark<'_>,
        ids: &[Uuid],
        halves: &HashMap<Uuid, Box<HalfRef>>,
        seqs: &HashMap<Uuid, i64>,
    ) -> Result<Executed, tokio_postgres::Error> {
        let Marker {
            pg,
            delivered_sql,
            record_sql,
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
            match (mark, record_sql.as_deref()) {
                (Mark::Delivered, Some(record)) => execute_record(client, record, ids, seqs).await,
                _ => execute_plain(client, &sql, mark, ids).await,
            }
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
    pub(super) async fn execute_until_done(
        &mut self,
        mark: Mark<'_>,
        rows: &[(Uuid, Option<u32>)],
        how: &super::MarkWith<'_>,
    ) -> Option<Settled> {
        let &super::MarkWith {
            halves,
            seqs,
            config,
            health,
            ..
        } = how;
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
            match self.execute(mark, &pending, halves, seqs).await {
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
                Err(e) => {
                    if !after_failure(&e, how, &mut delays, &mut told_stopping).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// Waits out a failed marking statement as its error says; false if the pipeline is gone.
async fn after_failure(
    e: &tokio_postgres::Error,
    how: &super::MarkWith<'_>,
    delays: &mut impl Iterator<Item = Duration>,
    told_stopping: &mut bool,
) -> bool {
    match e.code().map(|c| c.code()) {
        Some("OB001") => {
            // A check-back settled a key between reading the keys and beginning them; the next
            // attempt finds it settled (fenced).
            tracing::debug!("a check-back settled a key while marking; marking again");
        }
        Some(code) if needs_operator(code) => {
            // A missing grant or column: nothing is marked (so nothing is confirmed) until an
            // operator fixes it; readiness says so meanwhile.
            let wait = delays.next().unwrap_or(Duration::from_secs(30));
            let advice = marking_advice(how.config, &postgres::describe(e));
            tracing::error!(error = %advice, retry_in = ?wait, "cannot mark rows in the outbox; the slot waits and /readyz is 503 until this is fixed");
            how.health.set_marking(Some(advice));
            tokio::time::sleep(wait).await;
        }
        _ => {
            if postgres::is_shutdown(e) && !*told_stopping {
                *told_stopping = true;
                let why = postgres::describe(e);
                if how
                    .completions
                    .send(Completion::PostgresStopping(why))
                    .is_err()
                {
                    return false;
                }
            }
            let wait = delays.next().unwrap_or(Duration::from_secs(30));
            tracing::warn!(
                error = %postgres::describe(e),
                retry_in = ?wait,
                "marking rows in the outbox failed; retrying (the slot waits)"
            );
            tokio::time::sleep(wait).await;
        }
    }
    true
}

/// What to do about a marking statement refused for a privilege or a column.
pub(super) fn marking_advice(config: &Config, error: &str) -> String {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let rows = format!(
        "the relay's role needs SELECT and UPDATE on {table} (GRANT SELECT, UPDATE ON {table} \
         TO <role>) and the columns {d}, {f}, {a}, {e} must exist (outbox.columns.*, apply \
         sql/001_outbox.sql)",
        d = c.delivered_at,
        f = c.failed_at,
        a = c.attempts,
        e = c.last_error,
    );
    match config.outbox.on_delivered {
        OnDelivered::Record => format!(
            "{error}; deliveries are recorded in {ledger} (outbox.on_delivered = \"record\"): the \
             relay's role needs GRANT SELECT, INSERT, DELETE ON {ledger} TO <role> (apply \
             sql/005_delivery_ledger.sql); for failed rows {rows}",
            ledger = config.ledger_table_sql(),
        ),
        OnDelivered::Delete => format!(
            "{error}; delivered rows are deleted (outbox.on_delivered = \"delete\"): the relay's \
             role needs GRANT DELETE ON {table} TO <role>; and {rows}"
        ),
        OnDelivered::Mark => format!("{error}; {rows}"),
    }
}

/// Marks `ids` with one UPDATE (no half messages involved).
pub(super) async fn execute_plain(
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

/// Records `ids` delivered in the ledger (`outbox.on_delivered = "record"`) with one insert: the
/// rows whose `seq` came with them as they are, the others looked up by id. The row itself is
/// not touched, so a row whose transaction is not visible yet is recorded all the same when its
/// `seq` is known; one looked up by id and not found is reported missing (waited for, like an
/// UPDATE that found nothing). Recording a row twice (sent again after a reconnect) is harmless.
pub(super) async fn execute_record(
    client: &Client,
    sql: &str,
    ids: &[Uuid],
    seqs: &HashMap<Uuid, i64>,
) -> Result<Executed, tokio_postgres::Error> {
    let mut known: Vec<i64> = Vec::with_capacity(ids.len());
    let mut unknown: Vec<Uuid> = Vec::new();
    for id in ids {
        match seqs.get(id) {
            Some(seq) => known.push(*seq),
            None => unknown.push(*id),
        }
    }
    let found: Vec<Uuid> = client
        .query(sql, &[&known, &unknown])
        .await?
        .iter()
        .map(|r| r.get::<_, Uuid>(0))
        .collect();
    Ok(Executed {
        missing: unchanged(&unknown, &found),
        ..Executed::default()
    })
}
