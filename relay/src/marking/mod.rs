//! The marking stage: broker acknowledgements in, rows marked, completions out.
//!
//! Acks are gathered into batches and marked with one statement on an ordinary connection: by
//! default (`outbox.on_delivered = "record"`) one insert of the batch's `seq` ranges into the
//! delivery ledger, else an `UPDATE ... WHERE id = ANY($1)` or a `DELETE` (see [`crate::delivered`]). A batch is every ack that arrived while the previous UPDATE ran (up to
//! `pipeline.mark_batch_size`), so a lone ack is marked at once and batches grow with load;
//! `pipeline.mark_interval_ms` > 0 waits that much longer for more. A poison row's dead-letter record, once acknowledged, marks its row failed
//! (`attempts`, `last_error`, `failed_at`) instead. Only after the UPDATE committed are the
//! messages reported completed to the pipeline, so the slot never advances past a row that is
//! published but unmarked. A failing UPDATE is retried with backoff (reconnecting as needed) for
//! as long as it takes; meanwhile the pipeline's in-flight bound stops WAL reading. If Postgres
//! says it is shutting down, the pipeline is told at once so the replication connection lets go.
//!
//! RocketMQ sink: acks carry a half message ([`HalfRef`]). Its row is marked in one transaction
//! with `outbox_tx_begin(<its oracle key>)`, then the half message is committed (rolled back for
//! a row delivered before or gone) through the [`Settler`] before the batch is reported. A key a
//! check-back already settled as rolled back is not marked; the batch then reports the sink
//! broken instead of complete, so the relay reads the unconfirmed rows again.

mod marker;
mod rocketmq;
mod statements;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::{Config, OnDelivered};
use crate::health::Health;
use crate::pipeline::Completion;
use crate::pipeline::watermark::TxSeq;
use crate::sink::rocketmq::{HalfRef, Settler};
use crate::sink::{Delivery, FailureNote};
use marker::Marker;
use rocketmq::Settled;
use statements::Mark;

/// Adds one completion to the run-length list of `(transaction, count)`.
fn push_completion(done: &mut Vec<(TxSeq, u64)>, seq: TxSeq) {
    match done.last_mut() {
        Some((s, n)) if *s == seq => *n += 1,
        _ => done.push((seq, 1)),
    }
}

/// What one batch of deliveries became, reported to the pipeline in the order batches began.
struct BatchOutcome {
    marker: Marker,
    done: Vec<(TxSeq, u64)>,
    rejected: Vec<Completion>,
    /// False if the pipeline went away while marking.
    ok: bool,
}

/// Deliveries gathered into one batch.
#[derive(Default)]
struct Batch {
    /// (id, inserting transaction if known).
    delivered: Vec<(Uuid, Option<u32>)>,
    /// The `seq` of delivered rows that came with one (the ledger records it).
    seqs: HashMap<Uuid, i64>,
    failed: Vec<(Uuid, Option<u32>, Box<FailureNote>)>,
    done: Vec<(TxSeq, u64)>,
    rejected: Vec<Completion>,
    /// RocketMQ sink: the half message of each row.
    halves: HashMap<Uuid, Box<HalfRef>>,
    /// RocketMQ sink: half messages of rows acknowledged twice in this batch (read again after a
    /// reconnect), all but the last: rolled back.
    displaced: Vec<HalfRef>,
}

impl Batch {
    fn add(&mut self, d: Delivery, mark_delivered: bool) {
        match d {
            Delivery::Acked(token) if token.emitted => {
                // A table-less message: no row to mark; the slot is its delivery record.
                push_completion(&mut self.done, token.tx_seq);
            }
            Delivery::Acked(mut token) => {
                if let Some(half) = token.half.take()
                    && let Some(earlier) = self.halves.insert(token.id, half)
                {
                    self.displaced.push(*earlier);
                }
                match token.failure {
                    Some(note) => self.failed.push((token.id, token.xid, note)),
                    None if mark_delivered => {
                        if let Some(seq) = token.row_seq {
                            self.seqs.insert(token.id, seq);
                        }
                        self.delivered.push((token.id, token.xid));
                    }
                    None => {}
                }
                push_completion(&mut self.done, token.tx_seq);
            }
            Delivery::Failed {
                token,
                error,
                message,
            } => self.rejected.push(Completion::Failed {
                token,
                error,
                message,
            }),
            // After the marks of what was acknowledged before it.
            Delivery::Broken(why) => self.rejected.push(Completion::SinkBroken(why)),
        }
    }

    /// Marks the batch's rows with `marker`, then settles their half messages (RocketMQ sink).
    async fn mark(
        self,
        mut marker: Marker,
        config: Arc<Config>,
        completions: mpsc::UnboundedSender<Completion>,
        settler: Option<Settler>,
        health: Arc<Health>,
    ) -> BatchOutcome {
        let Batch {
            delivered,
            seqs,
            failed,
            mut done,
            mut rejected,
            mut halves,
            displaced,
        } = self;
        if !halves.is_empty() {
            crate::failpoint::pause_point("rocketmq-before-mark").await;
        }
        let how = MarkWith {
            halves: &halves,
            seqs: &seqs,
            config: &config,
            completions: &completions,
            health: &health,
        };
        let settled = mark_rows(&mut marker, &delivered, &failed, &how).await;
        let ok = settled.is_some();
        if let Some(settled) = settled
            && !halves.is_empty()
            && let Some(broken) =
                rocketmq::settle(settled, &mut halves, displaced, settler.as_ref(), &config).await
        {
            done.clear();
            rejected.push(broken);
        }
        BatchOutcome {
            marker,
            done,
            rejected,
            ok,
        }
    }
}

/// What marking a batch needs besides its rows.
struct MarkWith<'a> {
    halves: &'a HashMap<Uuid, Box<HalfRef>>,
    seqs: &'a HashMap<Uuid, i64>,
    config: &'a Config,
    completions: &'a mpsc::UnboundedSender<Completion>,
    health: &'a Health,
}

/// Marks `delivered` rows delivered and `failed` rows failed (rows with the same note share one
/// UPDATE); `None` if the pipeline went away meanwhile.
async fn mark_rows(
    marker: &mut Marker,
    delivered: &[(Uuid, Option<u32>)],
    failed: &[(Uuid, Option<u32>, Box<FailureNote>)],
    how: &MarkWith<'_>,
) -> Option<Settled> {
    let mut settled = Settled::default();
    if !delivered.is_empty() {
        settled.merge(
            marker
                .execute_until_done(Mark::Delivered, delivered, how)
                .await?,
        );
        tracing::trace!(rows = delivered.len(), "marked delivered");
        metrics::counter!(crate::metrics::ROWS_MARKED, "state" => "delivered")
            .increment(delivered.len() as u64);
        metrics::histogram!(crate::metrics::MARK_BATCH_ROWS).record(delivered.len() as f64);
    }
    let mut rest = failed;
    while let Some((_, _, note)) = rest.first() {
        let n = rest
            .iter()
            .take_while(|(_, _, other)| other == note)
            .count();
        let rows: Vec<(Uuid, Option<u32>)> =
            rest[..n].iter().map(|(id, xid, _)| (*id, *xid)).collect();
        settled.merge(
            marker
                .execute_until_done(Mark::Failed(note), &rows, how)
                .await?,
        );
        metrics::counter!(crate::metrics::ROWS_MARKED, "state" => "failed").increment(n as u64);
        tracing::info!(rows = n, first = %rows[0].0, error = %note.error, attempts = note.attempts, "rows marked failed");
        rest = &rest[n..];
    }
    Some(settled)
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long acknowledgements are gathered before they are passed on when nothing is marked:
/// completions only move the slot's confirmed position (reported every 100 ms at most), so a
/// few milliseconds cost nothing and spare a cross-thread wake-up per message.
const PASS_THROUGH_GATHER: Duration = Duration::from_millis(5);

/// Runs until `deliveries` closes. With `pipeline.mark_delivered` off, acks pass straight
/// through as completions (dead-lettered rows are still marked failed).
///
/// Up to `pipeline.mark_connections` batches are marked at once, each on its own connection;
/// their completions (and any failure reports gathered with them) go to the pipeline in the
/// order the batches began.
pub async fn run(
    config: Config,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    completions: mpsc::UnboundedSender<Completion>,
    settler: Option<Settler>,
    health: Arc<Health>,
) {
    let mark_delivered = config.pipeline.mark_delivered;
    let batch_size = config.pipeline.mark_batch_size;
    let interval = if mark_delivered {
        Duration::from_millis(config.pipeline.mark_interval_ms)
    } else {
        PASS_THROUGH_GATHER
    };
    let connections = if mark_delivered {
        config.pipeline.mark_connections.max(1)
    } else {
        1
    };
    // The ledger's watermark moves while this stage runs (the leader's), and stops with it.
    let _watermark =
        (mark_delivered && config.outbox.on_delivered == OnDelivered::Record).then(|| {
            AbortOnDrop(tokio::spawn(crate::delivered::keep_watermark(
                config.clone(),
            )))
        });
    let config = Arc::new(config);
    let mut idle: Vec<Marker> = (0..connections).map(|_| Marker::new(&config)).collect();
    let mut marking = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(outcome) = marking.next(), if !marking.is_empty() => {
                let BatchOutcome { marker, done, rejected, ok } = outcome;
                if !ok {
                    return;
                }
                idle.push(marker);
                if !done.is_empty() && completions.send(Completion::Completed(done)).is_err() {
                    return;
                }
                for r in rejected {
                    if completions.send(r).is_err() {
                        return;
                    }
                }
            }
            first = deliveries.recv(), if open && !idle.is_empty() => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut batch = Batch::default();
                batch.add(first, mark_delivered);
                let deadline = tokio::time::Instant::now() + interval;
                while batch.delivered.len() < batch_size {
                    let next = match deliveries.try_recv() {
                        Ok(d) => d,
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            if interval.is_zero() {
                                break;
                            }
                            match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                                Ok(Some(d)) => d,
                                Ok(None) | Err(_) => break,
                            }
                        }
                    };
                    batch.add(next, mark_delivered);
                }
                let marker = idle.pop().expect("a marker is idle");
                marking.push_back(batch.mark(
                    marker,
                    config.clone(),
                    completions.clone(),
                    settler.clone(),
                    health.clone(),
                ));
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::OutboxMessage;
    use crate::sink::AckToken;

    #[test]
    fn completions_are_run_length_encoded() {
        let mut done = Vec::new();
        for s in [1, 1, 2, 1, 3, 3] {
            push_completion(&mut done, s);
        }
        assert_eq!(done, vec![(1, 2), (2, 1), (1, 1), (3, 2)]);
    }

    #[tokio::test]
    async fn without_marking_acks_pass_straight_through() {
        let mut config = Config::default();
        config.pipeline.mark_delivered = false;
        let (dtx, drx) = mpsc::unbounded_channel();
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(config, drx, ctx, None, Default::default()));
        let t = |seq| AckToken::new(seq, Uuid::new_v4());
        dtx.send(Delivery::Acked(t(4))).unwrap();
        dtx.send(Delivery::Acked(t(4))).unwrap();
        let mut total = 0;
        while total < 2 {
            match crx.recv().await.unwrap() {
                Completion::Completed(v) => total += v.iter().map(|(_, n)| n).sum::<u64>(),
                other => panic!("{other:?}"),
            }
        }
        let message = OutboxMessage {
            id: Uuid::nil(),
            topic: "t".into(),
            key: bytes::Bytes::new(),
            payload: None,
            headers: vec![],
        };
        dtx.send(Delivery::Failed {
            token: t(5),
            error: "boom".into(),
            message: Box::new(message),
        })
        .unwrap();
        assert!(matches!(
            crx.recv().await.unwrap(),
            Completion::Failed { .. }
        ));
        drop(dtx);
        task.await.unwrap();
    }
}
