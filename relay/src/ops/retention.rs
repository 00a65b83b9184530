//! Housekeeping: rows delivered more than `retention.delivered_hours` ago are deleted, oldest
//! first, `retention.batch_size` rows per statement (with the delivery ledger, then the ledger
//! rows that recorded only rows now deleted). Each DELETE is its own short transaction
//! that locks only the rows it deletes and skips rows locked by others (`FOR UPDATE SKIP
//! LOCKED`), so writers inserting rows and the relay marking them never wait on it. Rows not
//! delivered (pending or failed) are never deleted. The publication does not publish DELETEs, so
//! the deletions never reach the relay's stream. `sql/004_retention.sql` adds the index on
//! `created_at` that lets each batch start at the oldest rows.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OnDelivered};
use crate::metrics::ROWS_DELETED;
use crate::postgres;

/// Deletes every delivered row past the retention, in batches; returns how many went.
pub async fn delete_expired(
    client: &Client,
    config: &Config,
) -> Result<u64, tokio_postgres::Error> {
    let sql = crate::delivered::expired_rows_sql(config);
    let ledger_sql = (config.outbox.on_delivered == OnDelivered::Record)
        .then(|| crate::delivered::expired_ledger_sql(config));
    let secs = config.retention.delivered_hours * 3600.0;
    let batch = config.retention.batch_size;
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut total = 0u64;
    loop {
        let n = client.execute(&sql, &[&secs, &batch]).await?;
        total += n;
        metrics::counter!(ROWS_DELETED).increment(n);
        if n < batch as u64 {
            if let Some(ledger) = &ledger_sql {
                // Then the ledger rows that only recorded rows now gone.
                while client.execute(ledger, &[&secs, &batch]).await? == batch as u64 {}
            }
            return Ok(total);
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            let rate = total as f64 / started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                deleted = total,
                rows_per_sec = rate as u64,
                "deleting delivered rows past their retention"
            );
        }
    }
}

/// Runs until `shutdown` (returns at once when `retention.delivered_hours` is 0).
pub async fn run(config: Config, shutdown: CancellationToken) {
    if config.retention.delivered_hours == 0.0 {
        return;
    }
    let pg = config.pg_target();
    let every = Duration::from_millis(config.retention.interval_ms);
    let mut client: Option<Client> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = postgres::connect(&pg).await.ok();
        }
        let Some(c) = &client else { continue };
        let started = Instant::now();
        match delete_expired(c, &config).await {
            Ok(0) => failing = false,
            Ok(n) => {
                failing = false;
                tracing::info!(
                    deleted = n,
                    seconds = started.elapsed().as_secs_f64(),
                    hours = config.retention.delivered_hours,
                    "deleted delivered rows past their retention"
                );
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %postgres::describe(&e), "cannot delete delivered rows past their retention; retrying every retention.interval_ms");
                    failing = true;
                }
            }
        }
    }
}
