//! Marking for the RocketMQ sink: a row with a half message is marked in one Postgres
//! transaction with `outbox_tx_begin(<its oracle key>)`, and its half message is then committed
//! (rolled back for a row delivered before, gone, or settled by a check-back first). Everything
//! is read inside the marking transaction, so a retry after any failure decides the same way.

use std::collections::HashMap;

use tokio_postgres::Client;
use uuid::Uuid;

use super::statements::{Executed, Mark, MarkSql, already_delivered, unchanged, update};
use crate::config::Config;
use crate::pipeline::Completion;
use crate::rocketmq::client::Resolution;
use crate::sink::rocketmq::{HalfRef, Settler};

/// Marks rows with half messages in one transaction with `outbox_tx_begin` of their keys.
///
/// Everything is read inside the transaction, so a retry after any failure (a lost COMMIT
/// reply included) decides the same way: a key already committed means an earlier attempt
/// marked the row (commit its message, mark nothing again); a key settled as rolled back means
/// a check-back came first (fenced: not marked, the row is sent again).
pub(super) async fn execute_keyed(
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
pub(super) struct Settled {
    /// Marked now: commit their half messages.
    pub(super) marked: Vec<Uuid>,
    /// Marked before, or gone from the table: roll their half messages back.
    pub(super) skipped: Vec<Uuid>,
    /// Settled as rolled back by a check-back before they could be marked: roll their half
    /// messages back (if the check's answer has not yet) and send the rows again.
    pub(super) fenced: Vec<Uuid>,
}

impl Settled {
    pub(super) fn merge(&mut self, other: Settled) {
        self.marked.extend(other.marked);
        self.skipped.extend(other.skipped);
        self.fenced.extend(other.fenced);
    }
}

/// Commits the half messages of rows marked now and rolls back the others (rows delivered
/// before, gone, or settled by a check-back first, and copies displaced by a later one). `Some`:
/// a check-back came first for some row, so the batch must not complete (the relay reads the
/// unconfirmed rows again).
pub(super) async fn settle(
    settled: Settled,
    halves: &mut HashMap<Uuid, Box<HalfRef>>,
    displaced: Vec<HalfRef>,
    settler: Option<&Settler>,
    config: &Config,
) -> Option<Completion> {
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
    if let Some(settler) = settler {
        settler.settle(settle).await;
    }
    let first = settled.fenced.first()?;
    // Their messages are gone. Completing the batch would let the slot pass them: report
    // nothing of it and have the relay read everything unconfirmed again (rows marked meanwhile
    // are recognised as delivered and not sent twice).
    Some(Completion::SinkBroken(format!(
        "a check-back settled the message of row {first} (and {} more) as rolled back \
         before the relay marked it: another relay of producer group {} answered it, \
         or marking took longer than the broker's transactionTimeout; sending the \
         unconfirmed rows again (if this repeats, raise the broker's \
         transactionTimeout)",
        settled.fenced.len() - 1,
        config.rocketmq.producer_group,
    )))
}
