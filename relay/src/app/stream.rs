//! The stream loop: WAL messages into the pipeline, completions back, until told to stop.
//!
//! What it guarantees, whatever a broker or Postgres does:
//! - Status updates never wait for it: the replication connection runs on its own task
//!   ([`StreamDriver`]), which reports the confirmed position this loop publishes through
//!   [`StreamDriver::confirm`].
//! - Every step that may wait (applying a message, a completion, a Kafka commit, a redrive) runs
//!   against [`guarded`]: SIGTERM ends it within [`SHUTDOWN_GRACE`], losing the leader lock or
//!   Postgres stopping ends it within [`super::session::LOCK_CHECK`]. A step cut short leaves its
//!   transaction uncommitted in the watermark, so the slot never passes it.
//! - Backpressure: no WAL message is taken while `pipeline.max_in_flight` messages are unconfirmed.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::RunError;
use super::redrive;
use super::session::{Interrupt, Session};
use crate::config::Config;
use crate::pipeline::{Pipeline, PipelineError};
use crate::replication::ReplicationError;
use crate::replication::driver::StreamDriver;
use crate::replication::pgoutput::PgOutput;
use crate::replication::protocol::ServerMessage;
use crate::sink::Sink;

/// How long a step may go on after SIGTERM before it is cut short (most take microseconds; this
/// lets a transaction being read reach its Commit).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// How a stream ended without an error.
pub enum Ended {
    /// SIGTERM: the loop stopped reading; the caller drains and confirms.
    Shutdown,
}

/// Runs `work` unless an interrupt comes first.
pub async fn guarded<T>(
    work: impl Future<Output = Result<T, PipelineError>>,
    session: &Session,
    shutdown: &CancellationToken,
) -> Result<Result<T, PipelineError>, Interrupt> {
    let late = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    // The work first: a step that can finish now always does (a completion already taken from
    // its channel must be applied, not dropped).
    tokio::select! {
        biased;
        r = work => Ok(r),
        _ = late => Err(Interrupt::Shutdown),
        i = session.interrupted() => Err(i),
    }
}

/// What an interrupt means for the supervisor (`Shutdown` is not an error).
pub fn interrupt_error(i: Interrupt) -> Option<RunError> {
    match i {
        Interrupt::Shutdown => None,
        Interrupt::PostgresStopping(why) => Some(PipelineError::PostgresStopping(why).into()),
        Interrupt::LockLost => Some(RunError::LockLost),
    }
}

/// Streams until SIGTERM (then stops gracefully) or an error.
pub async fn run<S: Sink>(
    mut driver: StreamDriver,
    pipeline: &mut Pipeline<S>,
    session: &Session,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    match read_until_stopped(&mut driver, pipeline, session, config, shutdown).await {
        Ok(Ended::Shutdown) => stop_gracefully(driver, pipeline, config).await,
        Err(e) => {
            use crate::error::{Action, Classify};
            // Confirm what was published before a failure the relay stops on, so a restart
            // repeats as little as possible; nothing can be confirmed when Postgres is going
            // away or the sink is broken.
            if e.action() == Action::Stop
                && !matches!(e, RunError::Pipeline(PipelineError::Fenced(_)))
            {
                tracing::error!(error = %e, "stopping: confirming what was published before the failure");
                if let Err(e) = stop_gracefully(driver, pipeline, config).await {
                    tracing::warn!(error = %e, "could not confirm the in-flight messages");
                }
            }
            Err(e)
        }
    }
}

/// Applies a pipeline step's outcome: an interrupt or an error ends the loop.
macro_rules! step {
    ($outcome:expr) => {
        match $outcome {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(RunError::from(e)),
            // A step cut short may leave the pipeline's books open (a completion not applied, a
            // redrive batch not closed): the supervisor rebuilds it.
            Err(i) => match interrupt_error(i) {
                Some(e) => return Err(RunError::CutShort(Box::new(e))),
                None => return Ok(Ended::Shutdown),
            },
        }
    };
}

async fn read_until_stopped<S: Sink>(
    driver: &mut StreamDriver,
    pipeline: &mut Pipeline<S>,
    session: &Session,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Ended, RunError> {
    // Blocked aggregates (dead_letter.policy = block_key) are tried again on this tick.
    let mut redrive_tick = tokio::time::interval(Duration::from_millis(
        config.dead_letter.block_retry_interval_ms.min(1_000),
    ));
    redrive_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut log = ProgressLog::new(pipeline);
    // Messages of the batch being applied (the driver hands them over a socket read at a time).
    let mut queued: VecDeque<ServerMessage> = VecDeque::new();
    // On SIGTERM in the middle of a transaction, read on to its Commit (bounded by the shutdown
    // timeout): rows of it already published would otherwise be sent again after the restart.
    let mut stopping_since: Option<Instant> = None;
    let finish_tx_limit = Duration::from_millis(config.pipeline.shutdown_timeout_ms);
    loop {
        if let Some(since) = stopping_since
            && (!pipeline.in_transaction() || since.elapsed() > finish_tx_limit)
        {
            return Ok(Ended::Shutdown);
        }
        // Exactly-once: when the open Kafka transaction is due for commit.
        let commit_due = pipeline.kafka_transaction_due();
        // Stopping: the loop top ends it by then, even when nothing else wakes the loop.
        let stop_by = stopping_since.map(|since| since + finish_tx_limit);
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if stopping_since.is_none() => {
                stopping_since = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(stop_by.unwrap_or_else(Instant::now)), if stop_by.is_some() => {}
            i = session.interrupted() => {
                return Err(interrupt_error(i).unwrap_or(RunError::LockLost));
            }
            p = pipeline.next_completion() => {
                step!(guarded(pipeline.on_completion(p), session, shutdown).await);
            }
            _ = tokio::time::sleep_until(commit_due.unwrap_or_else(Instant::now)), if commit_due.is_some() => {
                step!(guarded(pipeline.commit_kafka_transaction(), session, shutdown).await);
            }
            _ = redrive_tick.tick(), if !pipeline.blocked().is_empty() && stopping_since.is_none() => {
                step!(guarded(redrive::redrive_due(&session.db, config, pipeline), session, shutdown).await);
            }
            msg = next_message(&mut queued, driver), if pipeline.has_capacity() => {
                let mut msg = msg?;
                loop {
                    match msg {
                        ServerMessage::XLogData { data, send_time, .. } => {
                            let event = PgOutput::decode(data).map_err(ReplicationError::from)?;
                            pipeline.wal_sent_at(send_time);
                            step!(guarded(pipeline.handle(event), session, shutdown).await);
                        }
                        ServerMessage::Keepalive { wal_end, .. } => pipeline.observe_idle(wal_end),
                    }
                    // The rest of the socket read's batch (at most the driver's BATCH_MAX) goes
                    // in now rather than once round this select! per message, which polls the
                    // shutdown, interrupt and completion arms and reads the clock every time.
                    // Stopping, or at the in-flight bound, the select! decides again.
                    if stopping_since.is_some() || !pipeline.has_capacity() {
                        break;
                    }
                    let Some(next) = queued.pop_front() else { break };
                    msg = next;
                }
            }
        }
        driver.confirm(pipeline.flushable());
        log.tick(pipeline);
    }
}

/// The next WAL message: from the batch being applied, else from the driver's next batch.
/// Cancel-safe (only the driver's receive waits).
async fn next_message(
    queued: &mut VecDeque<ServerMessage>,
    driver: &mut StreamDriver,
) -> Result<ServerMessage, ReplicationError> {
    if let Some(m) = queued.pop_front() {
        return Ok(m);
    }
    queued.extend(driver.recv().await?);
    queued.pop_front().ok_or_else(|| {
        ReplicationError::Protocol("the stream driver handed over an empty batch".into())
    })
}

/// Stops reading, waits (bounded) for what is in flight, then confirms it to Postgres.
async fn stop_gracefully<S: Sink>(
    driver: StreamDriver,
    pipeline: &mut Pipeline<S>,
    config: &Config,
) -> Result<(), RunError> {
    tracing::info!(
        in_flight = pipeline.in_flight(),
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
    driver.finish(flushed, Duration::from_secs(5)).await;
    tracing::info!(%flushed, "final position confirmed to Postgres");
    Ok(())
}

/// Logs throughput every 30 s and once when the in-flight bound pauses reading.
struct ProgressLog {
    last: Instant,
    rows_at_last: u64,
    paused_logged: bool,
}

impl ProgressLog {
    fn new<S: Sink>(pipeline: &Pipeline<S>) -> ProgressLog {
        ProgressLog {
            last: Instant::now(),
            rows_at_last: pipeline.counters.rows,
            paused_logged: false,
        }
    }

    fn tick<S: Sink>(&mut self, pipeline: &Pipeline<S>) {
        if pipeline.has_capacity() {
            self.paused_logged = false;
        } else if !self.paused_logged {
            self.paused_logged = true;
            tracing::debug!(
                in_flight = pipeline.in_flight(),
                "in-flight limit reached; pausing WAL reading until the broker confirms"
            );
        }
        if self.last.elapsed() < Duration::from_secs(30) {
            return;
        }
        let c = pipeline.counters;
        let rows_per_sec = (c.rows - self.rows_at_last) as f64 / self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        self.rows_at_last = c.rows;
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
