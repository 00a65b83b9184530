//! `outbox-relay run`: wires the rooms together and keeps them running.
//!
//! WAL → replication → pipeline → sink → acks → progress (mark delivered) → watermark → standby
//! status update. This task owns the replication stream and the pipeline; the sink's delivery
//! reports and the progress stage run beside it and talk through channels. A lost connection to
//! Postgres is retried with backoff and streaming resumes from the slot; errors that retrying
//! cannot fix stop the relay with a message that names the fix. SIGTERM/SIGINT stop reading,
//! wait (bounded) for in-flight acknowledgements, confirm the final position and exit cleanly.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DeliveryMode, SinkKind, redact_url};
use crate::pipeline::position::SourcePosition;
use crate::pipeline::{Pipeline, PipelineError};
use crate::replication::pgoutput::PgOutput;
use crate::replication::protocol::{ServerMessage, StandbyStatusUpdate};
use crate::replication::{ReplicationClient, ReplicationError, ReplicationStream};
use crate::rocketmq::OwnHalves;
use crate::sink::kafka::{KafkaSink, backoff};
use crate::sink::rocketmq::RocketMqSink;
use crate::sink::{AnySink, Sink, SinkError};
use crate::slot::{self, SlotError};
use crate::{db, leader, progress, redrive};

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Postgres ({url}): {message}")]
    Connect { url: String, message: String },
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(
        "cannot start exactly-once delivery: {0}; check kafka.brokers and that the broker supports \
         transactions (Kafka 2.5 or later), or set delivery = \"at_least_once\""
    )]
    ExactlyOnce(String),
}

impl RunError {
    /// Whether reconnecting may help.
    fn is_transient(&self) -> bool {
        match self {
            RunError::Replication(e) => is_transient_replication(e),
            RunError::Pipeline(PipelineError::PostgresStopping(_)) => true,
            RunError::Slot(SlotError::Replication(e)) => is_transient_replication(e),
            // Connection failures (no SQLSTATE), connection exceptions (08) and shutdowns (57P);
            // SQL errors are permanent.
            RunError::Slot(SlotError::Query { sqlstate, .. }) => sqlstate
                .as_deref()
                .is_none_or(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }
}

fn is_transient_replication(e: &ReplicationError) -> bool {
    match e {
        ReplicationError::Io(_) | ReplicationError::Connect { .. } => true,
        // 55006: slot active in another process; 57P0x: shutdown / cannot connect now; 08: connection.
        ReplicationError::Server(s) => {
            s.code == "55006" || s.code.starts_with("57P") || s.code.starts_with("08")
        }
        _ => false,
    }
}

/// Minimum spacing of status updates sent because the watermark moved.
const FEEDBACK_COALESCE: Duration = Duration::from_millis(100);

/// Runs the relay until `shutdown` is cancelled or an unrecoverable error occurs. `own`: the
/// RocketMQ sink registers its unsettled half messages there (for the check-back responder).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    own: OwnHalves,
    health: std::sync::Arc<crate::health::Health>,
) -> Result<(), RunError> {
    let pg = config.pg_config();
    let url = redact_url(&config.postgres.url);
    let brokers = match config.sink {
        SinkKind::Kafka => config.kafka.brokers.clone(),
        SinkKind::Rocketmq => config.rocketmq.name_server.clone(),
    };
    tracing::info!(
        postgres = %url,
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        sink = ?config.sink,
        %brokers,
        "starting outbox-relay"
    );
    let db = connect_db(&config, &shutdown).await?;
    let Some((db, db_shutdown)) = db else {
        return Ok(());
    };
    slot::preflight(&db, &config).await?;
    // One active relay per slot: wait for the leader lock before building a sink.
    let (mut db, mut db_shutdown) = (db, db_shutdown);
    let mut delays = backoff(&config.retry).build();
    loop {
        match leader::acquire(&db, &config.postgres.slot, &shutdown).await {
            Ok(Some(_)) => break,
            Ok(None) => return Ok(()),
            Err(e) => {
                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %db::describe(&e), retry_in = ?wait, "cannot take the leader lock; reconnecting");
                if sleep_or_shutdown(wait, &shutdown).await {
                    return Ok(());
                }
                match connect_db(&config, &shutdown).await? {
                    Some(c) => (db, db_shutdown) = c,
                    None => return Ok(()),
                }
            }
        }
    }

    let (mut pipeline, mut progress_task) = build_pipeline(&config, &db, None, &own).await?;

    let mut delays = backoff(&config.retry).build();
    // A new sink and pipeline to build before streaming again: (the last committed Kafka
    // position when known, the position confirmed so far).
    let mut rebuild: Option<(Option<SourcePosition>, crate::replication::Lsn)> = None;
    // Whether the slot was found held by another process (logged once, until it is free).
    let mut standby = false;
    let result = loop {
        if db.is_closed() {
            match db::connect_watched(&pg).await {
                Ok(c) => {
                    (db, db_shutdown) = c;
                    // The lock went with the old session: take it again (waiting, if another
                    // relay took over meanwhile, and then starting afresh from the slot).
                    match leader::acquire(&db, &config.postgres.slot, &shutdown).await {
                        Ok(Some(true)) => rebuild = Some((None, pipeline.flushable())),
                        Ok(Some(false)) => {}
                        Ok(None) => break Ok(()),
                        Err(e) => {
                            tracing::warn!(error = %db::describe(&e), "cannot take the leader lock; reconnecting");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(error = %db::describe(&e), retry_in = ?wait, "Postgres unreachable; retrying");
                    if sleep_or_shutdown(wait, &shutdown).await {
                        break Ok(());
                    }
                    continue;
                }
            }
        }
        if let Some((known, confirmed)) = rebuild.take() {
            progress_task.abort();
            let (mut fresh, task) = build_pipeline(&config, &db, known, &own).await?;
            fresh.start_at(confirmed);
            pipeline = fresh;
            progress_task = task;
        }
        let attempt = async {
            let mut repl = ReplicationClient::connect(&pg).await?;
            let id = repl.identify_system().await?;
            tracing::info!(system_id = %id.system_id, timeline = id.timeline, wal_position = %id.xlog_pos, "replication connection ready");
            let start = slot::prepare(&db, &mut repl, &config, &mut pipeline).await?;
            let stream = repl
                .start_replication(&config.postgres.slot, start, &config.postgres.publication)
                .await?;
            tracing::info!(slot = %config.postgres.slot, from = %pipeline.flushable(), "streaming");
            Ok::<_, RunError>(stream)
        };
        let outcome = match tokio::select! {
            r = attempt => Some(r),
            _ = shutdown.cancelled() => None,
        } {
            None => Ok(()),
            Some(Err(e)) => Err(e),
            Some(Ok(stream)) => {
                delays = backoff(&config.retry).build();
                health.set_streaming(true);
                standby = false;
                let streamed = stream_until_stopped(
                    stream,
                    &mut pipeline,
                    &db,
                    &mut db_shutdown,
                    &config,
                    &shutdown,
                )
                .await;
                health.set_streaming(false);
                streamed
            }
        };
        match outcome {
            Ok(()) => break Ok(()),
            Err(RunError::Pipeline(
                e @ (PipelineError::SinkBroken(_) | PipelineError::TransactionAborted(_)),
            )) if !shutdown.is_cancelled() => {
                // The old producer can deliver nothing more. A new one takes over from the
                // position confirmed so far; whatever was in flight is read again from the slot.
                // After a clean abort the last committed Kafka position is known here; after a
                // broken producer the new one reads it back (a commit may have been cut short).
                let known = match &e {
                    PipelineError::TransactionAborted(_) => pipeline.committed_position(),
                    _ => None,
                };
                let why = e.to_string();
                let confirmed = pipeline.flushable();
                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::error!(error = %why, %confirmed, in_flight = pipeline.in_flight(), retry_in = ?wait,
                    "the sink failed; starting a new one (unconfirmed messages are sent again)");
                if sleep_or_shutdown(wait, &shutdown).await {
                    break Ok(());
                }
                rebuild = Some((known, confirmed));
            }
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                pipeline.abandon_open_transaction();
                if config.delivery == DeliveryMode::ExactlyOnce
                    && (pipeline.counters.rows > 0 || pipeline.in_flight() > 0)
                {
                    // Postgres will send every unconfirmed transaction again; rows already in
                    // the open Kafka transaction would go into it twice. A new producer aborts it
                    // (same transactional id) and resumes from the last committed position.
                    rebuild = Some((pipeline.committed_position(), pipeline.flushable()));
                }
                let mut wait = delays.next().unwrap_or(Duration::from_secs(30));
                let slot_busy = matches!(&e, RunError::Replication(r) if r.sqlstate() == Some("55006"))
                    || matches!(&e, RunError::Slot(SlotError::Replication(r)) if r.sqlstate() == Some("55006"));
                if slot_busy {
                    // Another process still holds the slot (the previous relay's walsender, not
                    // yet gone): ask often.
                    wait = wait.min(leader::STANDBY_POLL);
                    if !standby {
                        standby = true;
                        tracing::info!(slot = %config.postgres.slot, poll = ?wait, "the slot is active in another process; waiting for it to be released");
                    }
                } else {
                    standby = false;
                    tracing::warn!(error = %e, retry_in = ?wait, "lost the replication stream; reconnecting (position kept by the slot)");
                }
                if sleep_or_shutdown(wait, &shutdown).await {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    let c = pipeline.counters;
    tracing::info!(
        transactions = c.transactions,
        rows = c.rows,
        confirmed = c.completed,
        "outbox-relay stopped"
    );
    drop(pipeline);
    progress_task.abort();
    result
}

/// Builds the sink, the progress stage (a task) and the pipeline that joins them, and loads the
/// aggregates blocked under `block_key`.
/// Exactly-once: `known` is the last committed Kafka position when the caller knows it (after a
/// clean abort); otherwise it is read from the progress topic.
async fn build_pipeline(
    config: &Config,
    db: &tokio_postgres::Client,
    known: Option<SourcePosition>,
    own: &OwnHalves,
) -> Result<(Pipeline<AnySink>, tokio::task::JoinHandle<()>), RunError> {
    let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    let (sink, settler, covered) = match config.sink {
        SinkKind::Kafka => {
            let mut sink = KafkaSink::new(config, deliveries_tx.clone())?;
            let covered = match sink.init_transactions(config, known.is_none()).await {
                Ok(covered) => covered,
                Err(SinkError::Fenced(why)) => return Err(PipelineError::Fenced(why).into()),
                Err(e) => return Err(RunError::ExactlyOnce(e.to_string())),
            };
            (AnySink::Kafka(sink), None, covered)
        }
        SinkKind::Rocketmq => {
            let sink = RocketMqSink::new(config, deliveries_tx.clone(), own.clone());
            let settler = sink.settler();
            (AnySink::Rocketmq(sink), Some(settler), None)
        }
    };
    let progress_task = tokio::spawn(progress::run(
        config.clone(),
        deliveries_rx,
        progress_tx,
        settler,
    ));
    let mut pipeline = Pipeline::new(config, sink, deliveries_tx, progress_rx);
    if config.delivery == DeliveryMode::ExactlyOnce {
        let covered = known.or(covered).unwrap_or_default();
        tracing::info!(
            progress_topic = %config.exactly_once.progress_topic,
            committed = %covered,
            "exactly-once: rows the committed Kafka transactions hold are not sent again"
        );
        pipeline.set_covered(covered);
    }
    redrive::load_blocked(db, config, &mut pipeline)
        .await
        .map_err(|e| SlotError::query("reading the aggregates blocked by failed rows", e))?;
    Ok((pipeline, progress_task))
}

/// Connects the ordinary connection, retrying while the server is unreachable; fails fast on
/// errors retrying cannot fix. `None` if shut down while waiting.
async fn connect_db(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(tokio_postgres::Client, db::ShutdownWatch)>, RunError> {
    let pg = config.pg_config();
    let url = redact_url(&config.postgres.url);
    let mut delays = backoff(&config.retry).build();
    loop {
        match db::connect_watched(&pg).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if db::is_permanent(&e) => {
                return Err(RunError::Connect {
                    url,
                    message: format!(
                        "{}; check the user, password and database in postgres.url (RELAY_POSTGRES__URL)",
                        db::describe(&e)
                    ),
                });
            }
            Err(e) => {
                let wait = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(postgres = %url, error = %db::describe(&e), retry_in = ?wait, "Postgres is not reachable yet; retrying");
                if sleep_or_shutdown(wait, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleeps; true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = shutdown.cancelled() => true,
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    flushed: crate::replication::Lsn,
) -> Result<(), ReplicationError> {
    tracing::trace!(%flushed, "standby status update");
    stream.send_status(StandbyStatusUpdate::now(flushed)).await
}

/// The streaming loop: read WAL while there is room, apply completions, report progress.
async fn stream_until_stopped<S: Sink>(
    mut stream: ReplicationStream,
    pipeline: &mut Pipeline<S>,
    db: &tokio_postgres::Client,
    db_shutdown: &mut db::ShutdownWatch,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut status_tick =
        tokio::time::interval(Duration::from_millis(config.postgres.status_interval_ms));
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The ordinary session holds the leader lock: without it another relay may take over.
    let mut leader_tick = tokio::time::interval(leader::STANDBY_POLL);
    leader_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Blocked aggregates (dead_letter.policy = block_key) are tried again on this tick.
    let mut redrive_tick = tokio::time::interval(Duration::from_millis(
        config.dead_letter.block_retry_interval_ms.min(1_000),
    ));
    redrive_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reported = pipeline.flushable();
    let mut reported_at = Instant::now();
    let mut paused_logged = false;
    let mut last_log = Instant::now();
    let mut rows_at_last_log = pipeline.counters.rows;
    // On SIGTERM in the middle of a transaction, read on to its Commit (bounded by the shutdown
    // timeout): rows of it already published would otherwise be sent again after the restart.
    let mut stopping_since: Option<Instant> = None;
    let finish_tx_limit = Duration::from_millis(config.pipeline.shutdown_timeout_ms);
    loop {
        if let Some(since) = stopping_since
            && (!pipeline.in_transaction() || since.elapsed() > finish_tx_limit)
        {
            break;
        }
        let moved = pipeline.flushable() > reported;
        // Exactly-once: when the open Kafka transaction is due for commit.
        let commit_due = pipeline.kafka_transaction_due();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if stopping_since.is_none() => {
                stopping_since = Some(Instant::now());
            }
            // A fast shutdown ends ordinary sessions first, then waits for this stream to
            // confirm all WAL — which cannot happen while nothing can be acknowledged or marked.
            Ok(()) = db_shutdown.changed() => {
                let why = db_shutdown.borrow_and_update().clone();
                if let Some(why) = why {
                    return Err(PipelineError::PostgresStopping(why).into());
                }
            }
            p = pipeline.next_progress() => {
                if let Err(e) = pipeline.on_progress(p).await {
                    return Err(stop_after_error(stream, pipeline, config, e).await);
                }
            }
            _ = leader_tick.tick() => {
                if db.is_closed() {
                    return Err(RunError::Replication(ReplicationError::Io(std::io::Error::other(
                        "the Postgres session holding the leader lock closed; stopping until it is taken again",
                    ))));
                }
            }
            _ = status_tick.tick() => {
                send_status(&mut stream, pipeline.flushable()).await?;
                reported = pipeline.flushable();
                reported_at = Instant::now();
            }
            _ = redrive_tick.tick(), if !pipeline.blocked().is_empty() && stopping_since.is_none() => {
                if let Err(e) = redrive::redrive_due(db, config, pipeline).await {
                    return Err(stop_after_error(stream, pipeline, config, e).await);
                }
            }
            _ = tokio::time::sleep_until(reported_at + FEEDBACK_COALESCE), if moved => {
                send_status(&mut stream, pipeline.flushable()).await?;
                reported = pipeline.flushable();
                reported_at = Instant::now();
            }
            _ = tokio::time::sleep_until(commit_due.unwrap_or_else(Instant::now)), if commit_due.is_some() => {
                if let Err(e) = pipeline.commit_kafka_transaction().await {
                    return Err(stop_after_error(stream, pipeline, config, e).await);
                }
            }
            msg = stream.next(), if pipeline.has_capacity() => {
                paused_logged = false;
                match msg? {
                    None => {
                        return Err(RunError::Replication(ReplicationError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the server ended the replication stream",
                        ))));
                    }
                    Some(ServerMessage::XLogData { data, .. }) => {
                        let event = PgOutput::decode(data).map_err(ReplicationError::from)?;
                        if let Err(e) = pipeline.handle(event).await {
                            return Err(stop_after_error(stream, pipeline, config, e).await);
                        }
                    }
                    Some(ServerMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        pipeline.observe_idle(wal_end);
                        if reply_requested {
                            send_status(&mut stream, pipeline.flushable()).await?;
                            reported = pipeline.flushable();
                            reported_at = Instant::now();
                        }
                    }
                }
            }
        }
        if !pipeline.has_capacity() && !paused_logged {
            paused_logged = true;
            tracing::debug!(
                in_flight = pipeline.in_flight(),
                "in-flight limit reached; pausing WAL reading until the broker confirms"
            );
        }
        if last_log.elapsed() >= Duration::from_secs(30) {
            let c = pipeline.counters;
            let rows_per_sec =
                (c.rows - rows_at_last_log) as f64 / last_log.elapsed().as_secs_f64();
            last_log = Instant::now();
            rows_at_last_log = c.rows;
            tracing::info!(
                transactions = c.transactions,
                rows = c.rows,
                confirmed = c.completed,
                rows_per_sec = rows_per_sec as u64,
                in_flight = pipeline.in_flight(),
                flushed = %pipeline.flushable(),
                "progress"
            );
        }
    }

    stop_gracefully(stream, pipeline, config).await
}

/// The pipeline cannot go on: still confirm what was published before the failure (so a restart
/// repeats as little as possible), then report the error.
async fn stop_after_error<S: Sink>(
    stream: ReplicationStream,
    pipeline: &mut Pipeline<S>,
    config: &Config,
    error: PipelineError,
) -> RunError {
    // Nothing can be confirmed while Postgres stops, and a broken (or fenced) producer or an
    // aborted transaction confirms nothing more.
    if matches!(
        error,
        PipelineError::PostgresStopping(_)
            | PipelineError::SinkBroken(_)
            | PipelineError::TransactionAborted(_)
            | PipelineError::Fenced(_)
    ) {
        return error.into();
    }
    tracing::error!(%error, "stopping: confirming what was published before the failure");
    if let Err(e) = stop_gracefully(stream, pipeline, config).await {
        tracing::warn!(error = %e, "could not confirm the in-flight messages");
    }
    error.into()
}

/// Stops reading, waits (bounded) for what is in flight, then confirms it to Postgres.
async fn stop_gracefully<S: Sink>(
    mut stream: ReplicationStream,
    pipeline: &mut Pipeline<S>,
    config: &Config,
) -> Result<(), RunError> {
    let in_flight = pipeline.in_flight();
    tracing::info!(
        in_flight,
        "stopping: waiting for in-flight messages to be confirmed"
    );
    let left = pipeline
        .drain(Duration::from_millis(config.pipeline.shutdown_timeout_ms))
        .await?;
    if left > 0 {
        tracing::warn!(
            left,
            "shutdown timeout reached; unconfirmed messages will be sent again on the next start"
        );
    }
    let flushed = pipeline.flushable();
    send_status(&mut stream, flushed).await?;
    stream.finish(Duration::from_secs(5)).await;
    tracing::info!(%flushed, "final position confirmed to Postgres");
    Ok(())
}
