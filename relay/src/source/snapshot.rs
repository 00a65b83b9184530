//! The first-start snapshot: the rows that were undelivered when the slot was created, published
//! from the slot's exported snapshot so that each row comes from exactly one of the snapshot or
//! the stream. See [`super::slot`] for when it runs.

use tokio_postgres::Client;

use super::SlotError;
use super::rows::{Columns, raw_row};
use crate::config::{Config, OnDelivered};
use crate::delivered;
use crate::pipeline::Pipeline;
use crate::quote::{quote_ident, quote_literal};
use crate::replication::client::CreatedSlot;
use crate::replication::{Lsn, ReplicationClient};
use crate::sink::Sink;

pub(super) async fn first_start<S: Sink>(
    db: &Client,
    repl: &mut ReplicationClient,
    config: &Config,
    pipeline: &mut Pipeline<S>,
) -> Result<Lsn, SlotError> {
    let slot = &config.postgres.slot;
    let state = config.state_table_sql();
    db.execute(
        &format!(
            "INSERT INTO {state} (slot_name, snapshot_started_at) VALUES ($1, now()) \
             ON CONFLICT (slot_name) DO UPDATE SET snapshot_started_at = now(), \
                 snapshot_done_at = NULL, snapshot_lsn = NULL, snapshot_rows = NULL"
        ),
        &[slot],
    )
    .await
    .map_err(|e| SlotError::query("recording the snapshot start", e))?;

    let created: CreatedSlot = repl
        .create_slot(slot, true, config.postgres.failover_slot)
        .await?;
    let snapshot = created
        .snapshot_name
        .clone()
        .ok_or_else(|| SlotError::Setup("CREATE_REPLICATION_SLOT exported no snapshot".into()))?;
    tracing::info!(
        slot,
        consistent_point = %created.consistent_point,
        snapshot = %snapshot,
        "created replication slot; publishing rows that were already undelivered"
    );

    let rows = publish_snapshot(config, &snapshot, created.consistent_point, pipeline).await?;

    db.execute(
        &format!(
            "UPDATE {state} SET snapshot_done_at = now(), snapshot_lsn = $2::text::pg_lsn, \
                 snapshot_rows = $3 WHERE slot_name = $1"
        ),
        &[slot, &created.consistent_point.to_string(), &(rows as i64)],
    )
    .await
    .map_err(|e| SlotError::query("recording the snapshot as done", e))?;
    pipeline.start_at(created.consistent_point);
    Ok(created.consistent_point)
}

/// Reads the undelivered rows the exported snapshot shows and publishes them as one batch that
/// completes at `consistent_point`. Returns how many rows it published.
async fn publish_snapshot<S: Sink>(
    config: &Config,
    snapshot: &str,
    consistent_point: Lsn,
    pipeline: &mut Pipeline<S>,
) -> Result<u64, SlotError> {
    let mut db = crate::postgres::connect(&config.pg_target())
        .await
        .map_err(|e| SlotError::query("opening the snapshot connection", e))?;
    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| SlotError::query("starting the snapshot transaction", e))?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await
    .map_err(|e| SlotError::query("importing the slot's snapshot", e))?;

    let columns = Columns::read(&tx, config)
        .await
        .map_err(|e| SlotError::query("reading the outbox columns", e))?;
    let c = &config.outbox.columns;
    // Commit order is what consumers need per aggregate. The optional sequence column gives
    // insertion order; without it, transaction start time and then physical order approximate it.
    // Qualified: the select list has a column named like `seq` too (its text), and an unqualified
    // ORDER BY name means the output column — text order (1333 before 134).
    let order = if columns.has(&c.seq) {
        format!("o.{}", quote_ident(&c.seq))
    } else if columns.has("created_at") {
        "created_at, ctid".to_owned()
    } else {
        "ctid".to_owned()
    };
    let pending = if config.outbox.on_delivered != OnDelivered::Record && !columns.has(&c.failed_at)
    {
        // A table without failed_at (`mark`, `delete`): undelivered is all there is to ask.
        format!("o.{} IS NULL", quote_ident(&c.delivered_at))
    } else {
        // `record`: from the ledger's watermark up (seq is required there).
        delivered::pending_condition(config, "o")
    };
    let sql = format!(
        "DECLARE outbox_snapshot NO SCROLL CURSOR FOR SELECT {select} FROM {table} o \
         WHERE {pending} ORDER BY {order}",
        select = columns.select_list(config),
        table = config.outbox_table_sql(),
    );
    tx.batch_execute(&sql)
        .await
        .map_err(|e| SlotError::query("declaring the snapshot cursor", e))?;

    let seq = pipeline.begin_batch();
    let mut published = 0u64;
    let started = std::time::Instant::now();
    loop {
        let rows = tx
            .query("FETCH 1000 FROM outbox_snapshot", &[])
            .await
            .map_err(|e| SlotError::query("reading the snapshot", e))?;
        if rows.is_empty() {
            break;
        }
        if published == 0 {
            crate::failpoint::pause_point("snapshot-fetched").await;
        }
        for r in &rows {
            let raw = raw_row(r);
            pipeline.wait_for_capacity().await?;
            pipeline.publish_row(seq, raw).await?;
            published += 1;
        }
        if published.is_multiple_of(100_000) {
            tracing::info!(
                published,
                rate = published as f64 / started.elapsed().as_secs_f64().max(0.001),
                "snapshot progress (rows, rows/s)"
            );
        }
    }
    tx.commit()
        .await
        .map_err(|e| SlotError::query("closing the snapshot transaction", e))?;
    pipeline.commit_batch(seq, consistent_point);
    // The snapshot counts as done only when every row is confirmed (and marked).
    loop {
        let left = pipeline.drain(std::time::Duration::from_secs(30)).await?;
        if left == 0 {
            break;
        }
        tracing::info!(left, "waiting for the broker to confirm snapshot rows");
    }
    tracing::info!(
        rows = published,
        seconds = started.elapsed().as_secs_f64(),
        "snapshot published and confirmed"
    );
    Ok(published)
}
