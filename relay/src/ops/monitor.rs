//! Gauges read from Postgres every `metrics.poll_interval_ms`: the slot's replication lag,
//! retained WAL and `safe_wal_size`, and the age of the oldest undelivered row. Warns while the
//! slot retains more WAL than `metrics.retained_wal_warn_bytes`: a slot that falls behind keeps
//! WAL on the server until its disk fills (or, with `max_slot_wal_keep_size`, until the slot is
//! invalidated).

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{
    OLDEST_UNDELIVERED, REPLICATION_LAG, RETAINED_WAL, RETAINED_WAL_WARNING, SAFE_WAL_SIZE,
};
use crate::postgres;
use crate::quote::quote_ident;

/// How often the warning is repeated while the retained WAL stays above the threshold.
const WARN_EVERY: Duration = Duration::from_secs(300);

/// What one poll read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotGauges {
    pub lag_bytes: f64,
    pub retained_bytes: f64,
    pub safe_wal_size: Option<f64>,
}

/// Runs until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) {
    let pg = config.pg_target();
    let every = Duration::from_millis(config.metrics.poll_interval_ms);
    let c = &config.outbox.columns;
    let pending = crate::delivered::pending_condition(&config, "o");
    let oldest_sql = format!(
        "SELECT COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM \
         (SELECT o.created_at FROM {table} o WHERE {pending} ORDER BY o.{seq} LIMIT 1) t",
        table = config.outbox_table_sql(),
        seq = quote_ident(&c.seq),
    );
    let mut client: Option<Client> = None;
    let mut warned_at: Option<Instant> = None;
    let mut oldest_failing = false;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = postgres::connect(&pg).await.ok();
            if let Some(c) = &client {
                // A poll must never become a long-running query on a big outbox.
                let _ = c.batch_execute("SET statement_timeout = '5s'").await;
            }
        }
        if let Some(c) = &client {
            match slot_gauges(c, &config.postgres.slot).await {
                Ok(Some(g)) => {
                    metrics::gauge!(REPLICATION_LAG).set(g.lag_bytes);
                    metrics::gauge!(RETAINED_WAL).set(g.retained_bytes);
                    if let Some(safe) = g.safe_wal_size {
                        metrics::gauge!(SAFE_WAL_SIZE).set(safe);
                    }
                    warn_if_retaining(&config, g, &mut warned_at);
                }
                Ok(None) => {
                    // No slot (not created yet, or dropped): it keeps no WAL.
                    metrics::gauge!(REPLICATION_LAG).set(0.0);
                    metrics::gauge!(RETAINED_WAL).set(0.0);
                }
                Err(e) => {
                    tracing::debug!(error = %postgres::describe(&e), "cannot read the slot's position")
                }
            }
            match c.query_one(&oldest_sql, &[]).await {
                Ok(row) => {
                    oldest_failing = false;
                    metrics::gauge!(OLDEST_UNDELIVERED).set(row.get::<_, f64>(0));
                }
                Err(e) if !oldest_failing => {
                    oldest_failing = true;
                    tracing::warn!(error = %postgres::describe(&e), "cannot read the age of the oldest undelivered row (the outbox needs a created_at column)");
                }
                Err(_) => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The slot's gauges; `None` while the slot does not exist.
pub async fn slot_gauges(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotGauges>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8, \
                    (pg_current_wal_lsn() - restart_lsn)::float8, \
                    safe_wal_size::float8, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(r) = &row
        && r.get::<_, Option<String>>(3).as_deref() == Some("lost")
    {
        tracing::warn!(
            slot,
            "the replication slot is invalidated (wal_status = lost: max_slot_wal_keep_size was exceeded); the relay recreates it and republishes undelivered rows from a snapshot on its next connect"
        );
    }
    Ok(row.map(|r| SlotGauges {
        lag_bytes: r.get::<_, Option<f64>>(0).unwrap_or(0.0),
        retained_bytes: r.get::<_, Option<f64>>(1).unwrap_or(0.0),
        safe_wal_size: r.get(2),
    }))
}

fn warn_if_retaining(config: &Config, g: SlotGauges, warned_at: &mut Option<Instant>) {
    let limit = config.metrics.retained_wal_warn_bytes;
    let over = limit > 0 && g.retained_bytes > limit as f64;
    metrics::gauge!(RETAINED_WAL_WARNING).set(if over { 1.0 } else { 0.0 });
    if over {
        if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned_at = Some(Instant::now());
            tracing::warn!(
                slot = %config.postgres.slot,
                retained_bytes = g.retained_bytes as u64,
                threshold_bytes = limit,
                lag_bytes = g.lag_bytes as u64,
                safe_wal_size = ?g.safe_wal_size.map(|s| s as i64),
                "the replication slot retains more WAL than metrics.retained_wal_warn_bytes: the relay is \
                 behind or stopped; WAL piles up on the Postgres server until the relay catches up \
                 (see README \"Operations\")"
            );
        }
    } else if warned_at.take().is_some() {
        tracing::info!(slot = %config.postgres.slot, retained_bytes = g.retained_bytes as u64, "retained WAL is back under the threshold");
    }
}
