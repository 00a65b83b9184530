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

use tokio_postgres::Client;

use crate::config::Config;
use crate::pipeline::{Pipeline, PipelineError};
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
            message: crate::postgres::describe(&e),
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
    /// Postgres 17+: a failover slot (standbys with `sync_replication_slots` keep a copy).
    /// `None` before 17.
    pub failover: Option<bool>,
    /// Postgres 17+: the slot was synced from a primary (this server is, or was, its standby).
    pub synced: Option<bool>,
}

/// The server's major version (`server_version_num` / 10000).
pub async fn server_major(db: &Client) -> Result<u32, SlotError> {
    let num: i32 = db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| SlotError::query("reading server_version_num", e))?
        .get(0);
    Ok(u32::try_from(num / 10_000).unwrap_or(0))
}

pub async fn slot_info(db: &Client, slot: &str) -> Result<Option<SlotInfo>, SlotError> {
    // `failover` and `synced` exist from Postgres 17: read through the row as JSON, they are
    // NULL before, in one query on every version.
    let row = db
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
                 wal_status, safe_wal_size, \
                 (pg_current_wal_lsn() - restart_lsn)::bigint, \
                 (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, \
                 (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool \
             FROM pg_replication_slots s WHERE slot_name = $1",
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
        failover: r.get(8),
        synced: r.get(9),
    }))
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
/// `server`: the (system id, timeline) of the server `repl` is connected to.
pub async fn prepare<S: Sink>(
    db: &Client,
    repl: &mut ReplicationClient,
    config: &Config,
    pipeline: &mut Pipeline<S>,
    server: (&str, u32),
) -> Result<Lsn, SlotError> {
    let start = prepare_slot(db, repl, config, pipeline, server).await?;
    record_server(db, config, server).await;
    Ok(start)
}

/// The server the state table says the slot was on when a relay last started streaming from it
/// (`None`: not recorded, or the table predates the columns).
pub async fn recorded_server(db: &Client, config: &Config) -> Option<(String, i32)> {
    let row = db
        .query_opt(
            &format!(
                "SELECT system_id, timeline FROM {} WHERE slot_name = $1",
                config.state_table_sql()
            ),
            &[&config.postgres.slot],
        )
        .await
        .ok()??;
    Some((
        row.get::<_, Option<String>>(0)?,
        row.get::<_, Option<i32>>(1)?,
    ))
}

/// Records in the state table which server the slot is streamed from. Only a note for the
/// operator and the slot-loss message: a failure (a table from before the columns) is logged,
/// never fatal.
async fn record_server(db: &Client, config: &Config, server: (&str, u32)) {
    let timeline = i32::try_from(server.1).unwrap_or(i32::MAX);
    let result = db
        .execute(
            &format!(
                "UPDATE {} SET system_id = $2, timeline = $3 WHERE slot_name = $1 \
                 AND (system_id IS DISTINCT FROM $2 OR timeline IS DISTINCT FROM $3)",
                config.state_table_sql()
            ),
            &[&config.postgres.slot, &server.0, &timeline],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(
            error = %crate::postgres::describe(&e),
            "cannot record the server in {}; apply sql/002_relay_state.sql again (it adds the \
             system_id and timeline columns)",
            config.state_table_sql()
        );
    }
}

async fn prepare_slot<S: Sink>(
    db: &Client,
    repl: &mut ReplicationClient,
    config: &Config,
    pipeline: &mut Pipeline<S>,
    server: (&str, u32),
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
        let recorded = recorded_server(db, config).await;
        if let Some((system_id, timeline)) = recorded
            .as_ref()
            .filter(|(id, tli)| (id.as_str(), *tli) != (server.0, server.1 as i32))
        {
            tracing::error!(
                slot,
                was_on_system = %system_id,
                was_on_timeline = timeline,
                system = server.0,
                timeline = server.1,
                "the slot was last streamed on another server or timeline: a failover to a \
                 standby without a copy of the slot (Postgres before 17, or no failover slot), or \
                 a restored backup"
            );
        }
        tracing::error!(
            slot,
            "SLOT LOST: the replication slot this relay streamed from no longer exists (dropped?). \
             Changes committed since it vanished cannot be streamed. Recovering: creating a new slot \
             and publishing every row that is still undelivered in the outbox table. Rows published \
             but not yet marked may be sent twice."
        );
    }
    if let Some(i) = info {
        // `synced` stays true on a promoted server: say it once, when the server changed.
        let moved = recorded_server(db, config)
            .await
            .is_some_and(|(id, tli)| (id.as_str(), tli) != (server.0, server.1 as i32));
        if i.synced == Some(true) && moved {
            tracing::info!(
                slot,
                confirmed_flush = ?i.confirmed_flush,
                "continuing from a failover slot synced from the former primary (this server was \
                 promoted); rows published after the copy's position are sent again"
            );
        }
        // Only a free slot: ALTER_REPLICATION_SLOT waits for a slot another process holds.
        if config.postgres.failover_slot && i.failover == Some(false) && i.active_pid.is_none() {
            repl.set_slot_failover(slot, true).await?;
            tracing::info!(
                slot,
                "made the slot a failover slot (postgres.failover_slot); standbys with \
                 sync_replication_slots = on keep a copy"
            );
        }
        // After a Postgres crash the slot's position may be older than what this process already
        // confirmed (the slot is only saved at checkpoints); starting from our own position makes
        // the server skip transactions we completed instead of sending them again.
        let slot_position = i.confirmed_flush.unwrap_or(Lsn::ZERO);
        let start = slot_position.max(pipeline.flushable());
        tracing::info!(slot, confirmed_flush = %slot_position, start = %start, "resuming from the existing slot");
        pipeline.start_at(start);
        return Ok(start);
    }
    super::snapshot::first_start(db, repl, config, pipeline).await
}
