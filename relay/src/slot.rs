//! The replication slot's lifecycle and the first-start snapshot.
//!
//! First start (no slot): record in the state table that a snapshot is under way, create the slot
//! with an exported snapshot, publish every undelivered row that snapshot shows, wait until all
//! are confirmed, then record the snapshot as done. Streaming starts at the slot's consistent
//! point, so a row is either in the snapshot or in the stream, never both, never neither.
//! If the relay dies mid-snapshot, the next start finds the state row unfinished, drops the slot
//! and does it again (rows already marked delivered are skipped; the rest may be sent twice,
//! which consumers deduplicate by id).
//!
//! Slot lost: when the slot was invalidated (`wal_status = 'lost'`, WAL removed under
//! `max_slot_wal_keep_size`) or dropped after a finished snapshot, the relay says so loudly and
//! recovers the same way as a first start: a new slot, and every row still undelivered in the
//! table published from its snapshot. The outbox table is the source of truth; nothing committed
//! is silently skipped.

use bytes::Bytes;
use tokio_postgres::Client;

use crate::config::Config;
use crate::pipeline::routing::RawRow;
use crate::pipeline::{Pipeline, PipelineError};
use crate::replication::client::{CreatedSlot, quote_ident, quote_literal};
use crate::replication::{Lsn, ReplicationClient, ReplicationError};
use crate::sink::Sink;

/// Something about the slot or the schema stops the relay; the text says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("Postgres query failed ({context}): {message}")]
    Query {
        context: String,
        message: String,
        /// SQLSTATE, when the server answered; `None` for connection failures.
        sqlstate: Option<String>,
    },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    Setup(String),
}

impl SlotError {
    pub(crate) fn query(context: &str, e: tokio_postgres::Error) -> SlotError {
        SlotError::Query {
            context: context.to_owned(),
            message: crate::db::describe(&e),
            sqlstate: e.code().map(|c| c.code().to_owned()),
        }
    }
}

/// What the slot looks like now.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` (at risk) or `lost` (invalidated).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is at risk of invalidation
    /// (`None` without a `max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// Bytes of WAL the slot keeps on the server (from its restart position to the WAL end).
    pub retained_bytes: Option<i64>,
    /// Bytes between the slot's confirmed position and the WAL end.
    pub lag_bytes: Option<i64>,
}

pub async fn slot_info(db: &Client, slot: &str) -> Result<Option<SlotInfo>, SlotError> {
    let row = db
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
                 wal_status, safe_wal_size, \
                 (pg_current_wal_lsn() - restart_lsn)::bigint, \
                 (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SlotError::query("reading pg_replication_slots", e))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        wal_status: r.get(4),
        safe_wal_size: r.get(5),
        retained_bytes: r.get(6),
        lag_bytes: r.get(7),
    }))
}

/// Checks the database is set up for the relay; each failure names its fix.
pub async fn preflight(db: &Client, config: &Config) -> Result<(), SlotError> {
    let wal_level: String = db
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| SlotError::query("SHOW wal_level", e))?
        .get(0);
    if wal_level != "logical" {
        return Err(SlotError::Setup(format!(
            "wal_level is '{wal_level}'; set wal_level=logical in postgresql.conf and restart Postgres"
        )));
    }
    let table = config.outbox_table_sql();
    require_table(db, &table, "outbox table", "outbox.schema/outbox.table").await?;
    let state = config.state_table_sql();
    require_table(db, &state, "relay state table", "outbox.state_table").await?;
    if config.sink == crate::config::SinkKind::Rocketmq {
        let schema = &config.outbox.schema;
        let found = crate::oracle::installed_functions(db, schema)
            .await
            .map_err(|e| SlotError::query("looking up the transaction oracle", e))?;
        if !["outbox_tx_begin", "outbox_tx_check"]
            .iter()
            .all(|f| found.iter().any(|x| x == f))
        {
            return Err(SlotError::Setup(format!(
                "sink = rocketmq needs the transaction oracle in schema {schema}: apply \
                 sql/003_transactions.sql there (psql \"$DATABASE_URL\" -f sql/003_transactions.sql)"
            )));
        }
    }
    let publication = &config.postgres.publication;
    let row = db
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[publication, &config.outbox.schema, &config.outbox.table],
        )
        .await
        .map_err(|e| SlotError::query("looking up the publication", e))?;
    match row {
        None => Err(SlotError::Setup(format!(
            "publication '{publication}' does not exist; run: CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert, truncate');",
            quote_ident(publication)
        ))),
        Some(r) if !r.get::<_, bool>(0) => Err(SlotError::Setup(format!(
            "publication '{publication}' does not publish inserts; run: ALTER PUBLICATION {} SET (publish = 'insert, truncate');",
            quote_ident(publication)
        ))),
        Some(r) if !r.get::<_, bool>(1) => Err(SlotError::Setup(format!(
            "publication '{publication}' does not include {table}; run: ALTER PUBLICATION {} ADD TABLE {table};",
            quote_ident(publication)
        ))),
        Some(_) => Ok(()),
    }
}

/// Checks the relay can mark rows: the marking columns exist and its role may read the outbox
/// and update them. Without this a revoked grant or a misnamed column would only show once rows
/// are in flight, as a relay that never confirms anything.
pub async fn marking_preflight(db: &Client, config: &Config) -> Result<(), SlotError> {
    let c = &config.outbox.columns;
    let table = config.outbox_table_sql();
    let mut columns = vec![
        ("outbox.columns.failed_at", c.failed_at.as_str()),
        ("outbox.columns.attempts", c.attempts.as_str()),
        ("outbox.columns.last_error", c.last_error.as_str()),
    ];
    if config.pipeline.mark_delivered {
        columns.insert(0, ("outbox.columns.delivered_at", c.delivered_at.as_str()));
    }
    let names: Vec<&str> = columns.iter().map(|(_, n)| *n).collect();
    let rows = db
        .query(
            "SELECT n.name, a.attname IS NOT NULL, \
                 a.attname IS NOT NULL AND has_column_privilege($1::text::regclass, n.name, 'UPDATE'), \
                 has_table_privilege($1::text::regclass, 'SELECT'), current_user::text \
             FROM unnest($2::text[]) AS n(name) \
             LEFT JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attname = n.name \
                 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table, &names],
        )
        .await
        .map_err(|e| SlotError::query("checking the marking columns and grants", e))?;
    for r in &rows {
        let name: String = r.get(0);
        let user: String = r.get(4);
        let key = columns
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(k, _)| *k)
            .unwrap_or("outbox.columns");
        if !r.get::<_, bool>(1) {
            return Err(SlotError::Setup(format!(
                "column {name} of {table} does not exist, and the relay marks rows with it; apply \
                 sql/001_outbox.sql or set {key} ({}) to the column's name",
                crate::config::env_name(key)
            )));
        }
        if !r.get::<_, bool>(3) {
            return Err(SlotError::Setup(format!(
                "role {user} may not SELECT from {table}; run: GRANT SELECT, UPDATE ON {table} TO {};",
                quote_ident(&user)
            )));
        }
        if !r.get::<_, bool>(2) {
            return Err(SlotError::Setup(format!(
                "role {user} may not UPDATE column {name} of {table}, so it cannot mark rows \
                 delivered or failed; run: GRANT SELECT, UPDATE ON {table} TO {};",
                quote_ident(&user)
            )));
        }
    }
    Ok(())
}

async fn require_table(db: &Client, table: &str, what: &str, keys: &str) -> Result<(), SlotError> {
    let exists: bool = db
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(|e| SlotError::query(&format!("looking up the {what}"), e))?
        .get(0);
    if exists {
        Ok(())
    } else {
        Err(SlotError::Setup(format!(
            "{what} {table} does not exist; apply sql/*.sql (psql -f) or set {keys}"
        )))
    }
}

async fn drop_slot(db: &Client, slot: &str, active_pid: Option<i32>) -> Result<(), SlotError> {
    if let Some(pid) = active_pid {
        return Err(SlotError::Setup(format!(
            "slot '{slot}' is in use by process {pid}; stop the other relay first"
        )));
    }
    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(|e| SlotError::query("dropping the slot", e))?;
    Ok(())
}

/// Whether a finished first-start snapshot is recorded for `slot`: `None` if no record exists.
async fn snapshot_done(db: &Client, config: &Config) -> Result<Option<bool>, SlotError> {
    let row = db
        .query_opt(
            &format!(
                "SELECT snapshot_done_at IS NOT NULL FROM {} WHERE slot_name = $1",
                config.state_table_sql()
            ),
            &[&config.postgres.slot],
        )
        .await
        .map_err(|e| SlotError::query("reading the relay state table", e))?;
    Ok(row.map(|r| r.get(0)))
}

/// Prepares the slot for streaming and returns the position to start from.
/// On first start this publishes the snapshot through `pipeline` and waits for it to complete.
pub async fn prepare<S: Sink>(
    db: &Client,
    repl: &mut ReplicationClient,
    config: &Config,
    pipeline: &mut Pipeline<S>,
) -> Result<Lsn, SlotError> {
    let slot = &config.postgres.slot;
    let mut info = slot_info(db, slot).await?;
    if let Some(i) = &info {
        if i.plugin.as_deref() != Some("pgoutput") {
            return Err(SlotError::Setup(format!(
                "slot '{slot}' exists with plugin {:?}, not pgoutput; drop it (SELECT pg_drop_replication_slot('{slot}')) or set postgres.slot to another name",
                i.plugin
            )));
        }
        let current_db: String = db
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| SlotError::query("current_database()", e))?
            .get(0);
        if i.database.as_deref() != Some(current_db.as_str()) {
            return Err(SlotError::Setup(format!(
                "slot '{slot}' belongs to database {:?}, but postgres.url names '{current_db}'; use another slot name",
                i.database
            )));
        }
        if i.wal_status.as_deref() == Some("lost") {
            tracing::error!(
                slot,
                "SLOT LOST: Postgres invalidated the replication slot (it removed WAL the slot still \
                 needed, see max_slot_wal_keep_size); changes in that WAL can no longer be streamed. \
                 Recovering: dropping the slot, creating a new one and publishing every row that is \
                 still undelivered in the outbox table. Rows published but not yet marked may be sent \
                 twice. Raise max_slot_wal_keep_size or alert on wal_status to avoid this."
            );
            drop_slot(db, slot, i.active_pid).await?;
            info = None;
        } else if snapshot_done(db, config).await? == Some(false) {
            tracing::warn!(
                slot,
                "the first-start snapshot of this slot did not finish; dropping the slot and starting over"
            );
            drop_slot(db, slot, i.active_pid).await?;
            info = None;
        }
    } else if snapshot_done(db, config).await? == Some(true) {
        tracing::error!(
            slot,
            "SLOT LOST: the replication slot this relay streamed from no longer exists (dropped?). \
             Changes committed since it vanished cannot be streamed. Recovering: creating a new slot \
             and publishing every row that is still undelivered in the outbox table. Rows published \
             but not yet marked may be sent twice."
        );
    }
    if let Some(i) = info {
        // After a Postgres crash the slot's position may be older than what this process already
        // confirmed (the slot is only saved at checkpoints); starting from our own position makes
        // the server skip transactions we completed instead of sending them again.
        let slot_position = i.confirmed_flush.unwrap_or(Lsn::ZERO);
        let start = slot_position.max(pipeline.flushable());
        tracing::info!(slot, confirmed_flush = %slot_position, start = %start, "resuming from the existing slot");
        pipeline.start_at(start);
        return Ok(start);
    }
    first_start(db, repl, config, pipeline).await
}

async fn first_start<S: Sink>(
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

    let created: CreatedSlot = repl.create_slot(slot, true).await?;
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
    let mut db = crate::db::connect(&config.pg_config())
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

    // Optional columns the table lacks are read as NULL.
    let c = &config.outbox.columns;
    let present: Vec<String> = tx
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attnum > 0 AND NOT attisdropped",
            &[&config.outbox_table_sql()],
        )
        .await
        .map_err(|e| SlotError::query("reading the outbox columns", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let col = |name: &str| {
        if present.iter().any(|p| p == name) {
            format!("{}::text", quote_ident(name))
        } else {
            "NULL::text".to_owned()
        }
    };
    // Commit order is what consumers need per aggregate. The optional sequence column gives
    // insertion order; without it, transaction start time and then physical order approximate it.
    let order = if present.iter().any(|p| p == &c.seq) {
        quote_ident(&c.seq)
    } else if present.iter().any(|p| p == "created_at") {
        "created_at, ctid".to_owned()
    } else {
        "ctid".to_owned()
    };
    let sql = format!(
        "DECLARE outbox_snapshot NO SCROLL CURSOR FOR \
         SELECT {id}, {at}, {aid}, {ty}, {payload}, {headers}, {topic} FROM {table} \
         WHERE {delivered} IS NULL{not_failed} ORDER BY {order}",
        id = col(&c.id),
        at = col(&c.aggregatetype),
        aid = col(&c.aggregateid),
        ty = col(&c.event_type),
        payload = col(&c.payload),
        headers = col(&c.headers),
        topic = col(&c.topic),
        table = config.outbox_table_sql(),
        delivered = quote_ident(&c.delivered_at),
        not_failed = if present.iter().any(|p| p == &c.failed_at) {
            format!(" AND {} IS NULL", quote_ident(&c.failed_at))
        } else {
            String::new()
        },
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
            let text = |i: usize| r.get::<_, Option<String>>(i).map(Bytes::from);
            let raw = RawRow {
                id: text(0),
                aggregatetype: text(1),
                aggregateid: text(2),
                event_type: text(3),
                payload: text(4),
                headers: text(5),
                topic: text(6),
            };
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
