//! The replication stream on its own task: WAL messages in, standby status updates out, and a
//! read deadline, so that nothing the relay waits for (a broker, Postgres marking rows) can stop
//! it from answering the walsender.
//!
//! Guarantees:
//! - A status update with the latest confirmed position goes out every
//!   `postgres.status_interval_ms`, within [`FEEDBACK_COALESCE`] of the position moving, and at
//!   once when the server asks for a reply — whether or not the stream loop is taking messages.
//!   The walsender therefore never reaches `wal_sender_timeout` because the relay is busy.
//! - Messages reach the stream loop through a bounded channel, in order. When the loop does not
//!   take them, the task stops reading the socket (TCP backpressure to the walsender) and only
//!   keeps the status updates flowing.
//! - While the task is reading, a server silent for half of `postgres.replication_timeout_ms`
//!   is asked for a reply (a status update with `reply_requested`); silent for the whole of it,
//!   the connection is reported dead ([`ReplicationError::Silent`]), as libpq's walreceiver does
//!   with `wal_receiver_timeout`. A black-holed connection or a frozen server is noticed within
//!   that time instead of the kernel's ~15 minutes.
//! - [`StreamDriver::finish`] sends the final position, ends the stream politely and closes.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::client::{ReplicationError, ReplicationStream};
use super::lsn::Lsn;
use super::protocol::{ServerMessage, StandbyStatusUpdate};

/// Minimum spacing of status updates sent because the confirmed position moved.
pub const FEEDBACK_COALESCE: Duration = Duration::from_millis(100);

/// Batches read ahead of the stream loop.
const READ_AHEAD: usize = 8;
/// Most messages per batch: what one socket read brought, handed over with one channel send
/// and one wake-up instead of one per message.
const BATCH_MAX: usize = 512;

/// How the driver paces itself.
#[derive(Debug, Clone, Copy)]
pub struct DriverSettings {
    pub status_interval: Duration,
    pub timeout: Duration,
}

/// A batch of messages (never empty), in order, or the error that ended the stream.
type Item = Result<Vec<ServerMessage>, ReplicationError>;

/// The stream loop's handle on the driver task. Dropping it aborts the task (and closes the
/// connection).
pub struct StreamDriver {
    messages: mpsc::Receiver<Item>,
    confirmed: watch::Sender<Lsn>,
    finish: Option<oneshot::Sender<(Lsn, Duration)>>,
    task: JoinHandle<()>,
}

impl StreamDriver {
    /// Starts driving `stream`, confirming `start` until told otherwise.
    pub fn spawn(stream: ReplicationStream, start: Lsn, settings: DriverSettings) -> StreamDriver {
        let (tx, messages) = mpsc::channel(READ_AHEAD);
        let (confirmed, confirmed_rx) = watch::channel(start);
        let (finish, finish_rx) = oneshot::channel();
        let task = tokio::spawn(drive(stream, tx, confirmed_rx, finish_rx, settings));
        StreamDriver {
            messages,
            confirmed,
            finish: Some(finish),
            task,
        }
    }

    /// The next batch of messages (never empty), or the error that ended the stream.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Item {
        match self.messages.recv().await {
            Some(item) => item,
            None => Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the replication stream ended",
            ))),
        }
    }

    /// Everything up to `lsn` is confirmed: the next status updates report it.
    pub fn confirm(&self, lsn: Lsn) {
        self.confirmed.send_if_modified(|at| {
            let moved = *at != lsn;
            *at = lsn;
            moved
        });
    }

    /// Sends `flushed` as the final position, ends the stream (waiting up to `wait` for the
    /// server) and closes the connection.
    pub async fn finish(mut self, flushed: Lsn, wait: Duration) {
        if let Some(finish) = self.finish.take()
            && finish.send((flushed, wait)).is_ok()
        {
            let task = &mut self.task;
            let _ = tokio::time::timeout(wait + Duration::from_secs(1), task).await;
        }
    }
}

impl Drop for StreamDriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends one status update; `Err` ends the task.
async fn status(
    stream: &mut ReplicationStream,
    at: Lsn,
    ask: bool,
) -> Result<(), ReplicationError> {
    let mut update = StandbyStatusUpdate::now(at);
    update.reply_requested = ask;
    tracing::trace!(flushed = %at, ask, "standby status update");
    stream.send_status(update).await
}

async fn drive(
    mut stream: ReplicationStream,
    out: mpsc::Sender<Item>,
    mut confirmed: watch::Receiver<Lsn>,
    mut finish: oneshot::Receiver<(Lsn, Duration)>,
    settings: DriverSettings,
) {
    match drive_until_done(&mut stream, &out, &mut confirmed, &mut finish, settings).await {
        // The loop may be busy; it reads the error when it comes back.
        Err(e) => {
            let _ = out.send(Err(e)).await;
        }
        Ok(Some((flushed, wait))) => {
            if status(&mut stream, flushed, false).await.is_ok() {
                stream.finish(wait).await;
            }
        }
        Ok(None) => {}
    }
}

/// Runs until the stream loop asks to finish (`Ok(Some(final position, wait))`), goes away
/// (`Ok(None)`), or the connection fails (`Err`).
async fn drive_until_done(
    stream: &mut ReplicationStream,
    out: &mpsc::Sender<Item>,
    confirmed: &mut watch::Receiver<Lsn>,
    finish: &mut oneshot::Receiver<(Lsn, Duration)>,
    settings: DriverSettings,
) -> Result<Option<(Lsn, Duration)>, ReplicationError> {
    let mut tick = tokio::time::interval(settings.status_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A batch the stream loop had no room for yet; nothing more is read until it is taken.
    let mut held: Option<Vec<ServerMessage>> = None;
    let mut heard = Instant::now();
    let mut asked = false;
    let mut sent_at = Instant::now();
    let mut moved = false;
    let ask_after = settings.timeout / 2;
    loop {
        let reading = held.is_none();
        tokio::select! {
            biased;
            // The sender half is dropped without a request when the loop goes away: stop too.
            done = &mut *finish => return Ok(done.ok()),
            permit = out.reserve(), if held.is_some() => {
                let Ok(permit) = permit else { return Ok(None) };
                permit.send(Ok(held.take().expect("held")));
                // The server was not being read: its silence meanwhile means nothing.
                heard = Instant::now();
                asked = false;
            }
            _ = tick.tick() => {
                let at = *confirmed.borrow_and_update();
                status(stream, at, false).await?;
                sent_at = Instant::now();
                moved = false;
            }
            Ok(()) = confirmed.changed() => moved = true,
            _ = tokio::time::sleep_until(sent_at + FEEDBACK_COALESCE), if moved => {
                let at = *confirmed.borrow_and_update();
                status(stream, at, false).await?;
                sent_at = Instant::now();
                moved = false;
            }
            // After the status updates (a socket that always has data must not starve them),
            // before the silence timers (data waiting is no silence).
            msg = stream.next(), if reading => {
                let msg = msg?.ok_or_else(|| {
                    ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server ended the replication stream",
                    ))
                })?;
                heard = Instant::now();
                asked = false;
                let mut batch = vec![msg];
                while batch.len() < BATCH_MAX
                    && let Some(more) = stream.next_buffered()?
                {
                    batch.push(more);
                }
                let reply = batch.iter().any(|m| {
                    matches!(m, ServerMessage::Keepalive { reply_requested: true, .. })
                });
                if reply {
                    let at = *confirmed.borrow();
                    status(stream, at, false).await?;
                    sent_at = Instant::now();
                }
                match out.try_send(Ok(batch)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Ok(batch))) => held = Some(batch),
                    Err(_) => return Ok(None),
                }
            }
            _ = tokio::time::sleep_until(heard + ask_after), if reading && !asked => {
                tracing::debug!(silent_ms = ask_after.as_millis() as u64, "Postgres is silent on the replication connection; asking for a reply");
                let at = *confirmed.borrow();
                status(stream, at, true).await?;
                sent_at = Instant::now();
                asked = true;
            }
            _ = tokio::time::sleep_until(heard + settings.timeout), if reading => {
                return Err(ReplicationError::Silent {
                    silent_ms: settings.timeout.as_millis() as u64,
                });
            }
        }
    }
}
