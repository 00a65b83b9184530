//! Trying blocked aggregates again (`dead_letter.policy = block_key`).
//!
//! A blocked aggregate's rows wait in the outbox table, marked failed (`failed_at` set,
//! `delivered_at` NULL). At start the relay reads which aggregates are blocked. Every
//! `dead_letter.block_retry_interval_ms` it takes each due aggregate's parked rows afresh from the
//! table, oldest first (by `seq`), so a fix made with an UPDATE takes effect: it sends the first
//! one and waits for the broker; if that fails again the aggregate stays blocked, else the rest
//! follow in order and, once none is left, the aggregate is unblocked. An operator skips a row
//! for good by setting its `delivered_at` (or `SELECT outbox_skip('<id>')`). Redrives run
//! between transactions with nothing else in flight, so they never interleave with the live
//! stream's rows of the same aggregate.

use std::time::Duration;

use tokio_postgres::Client;

use bytes::Bytes;

use crate::config::{Config, PoisonPolicy};
use crate::dead_letter::blocking::Aggregate;
use crate::pipeline::{Pipeline, PipelineError};
use crate::quote::quote_ident;
use crate::routing::RawRow;
use crate::sink::Sink;
use crate::source::rows::parked_rows;

/// How long a redrive waits for the broker before leaving the rest for the next turn.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// Reads the blocked aggregates (each with its oldest failed row) into the pipeline.
pub async fn load_blocked<S: Sink>(
    db: &Client,
    config: &Config,
    pipeline: &mut Pipeline<S>,
) -> Result<usize, tokio_postgres::Error> {
    if config.dead_letter.policy != PoisonPolicy::BlockKey {
        return Ok(0);
    }
    let c = &config.outbox.columns;
    let sql = format!(
        "SELECT DISTINCT ON ({at}, {aid}) {at}::text, {aid}::text, {id}::text FROM {table} o \
         WHERE {failed} IS NOT NULL AND NOT {delivered} ORDER BY {at}, {aid}, {seq}",
        at = quote_ident(&c.aggregatetype),
        aid = quote_ident(&c.aggregateid),
        id = quote_ident(&c.id),
        table = config.outbox_table_sql(),
        failed = quote_ident(&c.failed_at),
        delivered = crate::delivered::is_delivered(config, "o"),
        seq = quote_ident(&c.seq),
    );
    let rows = db.query(&sql, &[]).await?;
    let blocked: Vec<(Aggregate, uuid::Uuid)> = rows
        .iter()
        .filter_map(|r| {
            let text = |i: usize| r.get::<_, Option<String>>(i).map(Bytes::from);
            let id = r
                .get::<_, Option<String>>(2)
                .and_then(|s| uuid::Uuid::parse_str(&s).ok())?;
            Some((
                Aggregate {
                    aggregatetype: text(0).unwrap_or_default(),
                    aggregateid: text(1).unwrap_or_default(),
                },
                id,
            ))
        })
        .collect();
    let n = blocked.len();
    if n > 0 {
        tracing::warn!(
            aggregates = n,
            "aggregates blocked by failed rows (dead_letter.policy = block_key); their rows stay \
             held back until the failed row goes through or is skipped"
        );
    }
    pipeline.load_blocked(blocked);
    Ok(n)
}

/// Tries every due blocked aggregate once. Database errors are logged and left for the next
/// turn; pipeline errors (the relay cannot go on) are returned.
pub async fn redrive_due<S: Sink>(
    db: &Client,
    config: &Config,
    pipeline: &mut Pipeline<S>,
) -> Result<(), PipelineError> {
    for aggregate in pipeline.blocked().due(tokio::time::Instant::now()) {
        if pipeline.in_transaction() {
            return Ok(()); // between transactions only; the next turn comes soon
        }
        if pipeline.drain(CONFIRM_WAIT).await? > 0 {
            return Ok(()); // the broker is slow or away: try later
        }
        let rows = match parked_rows(
            db,
            config,
            &String::from_utf8_lossy(&aggregate.aggregatetype),
            &String::from_utf8_lossy(&aggregate.aggregateid),
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(%aggregate, error = %crate::postgres::describe(&e), "cannot read the held-back rows; trying later");
                let now = tokio::time::Instant::now();
                pipeline.blocked_mut().tried(&aggregate, now, false);
                continue;
            }
        };
        let outcome = redrive_aggregate(pipeline, &aggregate, rows).await?;
        let now = tokio::time::Instant::now();
        match outcome {
            Outcome::Unblocked(n) => {
                pipeline.blocked_mut().unblock(&aggregate);
                tracing::info!(%aggregate, rows = n, "aggregate unblocked: its held-back rows went through");
            }
            Outcome::StillFailing => {
                tracing::info!(%aggregate, retry_in = ?Duration::from_millis(config.dead_letter.block_retry_interval_ms), "the blocking row failed again; the aggregate stays blocked");
                pipeline.blocked_mut().tried(&aggregate, now, false);
            }
            Outcome::MoreLeft(n) => {
                tracing::info!(%aggregate, rows = n, "sent held-back rows; more remain");
                pipeline.blocked_mut().tried(&aggregate, now, true);
            }
            Outcome::Unconfirmed => pipeline.blocked_mut().tried(&aggregate, now, false),
        }
    }
    Ok(())
}

enum Outcome {
    Unblocked(usize),
    StillFailing,
    MoreLeft(usize),
    /// The broker did not confirm in time; tried again later (the rows may arrive twice).
    Unconfirmed,
}

async fn redrive_aggregate<S: Sink>(
    pipeline: &mut Pipeline<S>,
    aggregate: &Aggregate,
    rows: Vec<RawRow>,
) -> Result<Outcome, PipelineError> {
    let total = rows.len();
    let mut rows = rows.into_iter();
    let Some(first) = rows.next() else {
        return Ok(Outcome::Unblocked(0)); // skipped or deleted by an operator
    };
    let failures = pipeline.blocked().failures(aggregate);
    // The oldest row first, alone: if it fails again, nothing after it may go.
    for batch in [vec![first], rows.collect::<Vec<_>>()] {
        if batch.is_empty() {
            continue;
        }
        let seq = pipeline.begin_batch();
        for raw in batch {
            pipeline.wait_for_capacity().await?;
            pipeline.redrive_row(seq, raw).await?;
        }
        // Nothing else is pending, so closing at the confirmed position moves nothing.
        let at = pipeline.flushable();
        pipeline.commit_batch(seq, at);
        if pipeline.drain(CONFIRM_WAIT).await? > 0 {
            return Ok(Outcome::Unconfirmed);
        }
        if pipeline.blocked().failures(aggregate) != failures {
            return Ok(Outcome::StillFailing);
        }
    }
    if total as i64 >= crate::source::rows::PARKED_PER_TRY {
        Ok(Outcome::MoreLeft(total))
    } else {
        Ok(Outcome::Unblocked(total))
    }
}
