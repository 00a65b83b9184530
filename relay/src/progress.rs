//! The progress stage: broker acknowledgements in, rows marked, completions out.
//!
//! Acks are gathered into batches (`pipeline.mark_batch_size` ids or `pipeline.mark_interval_ms`,
//! whichever comes first) and marked with one `UPDATE ... WHERE id = ANY($1)` on an ordinary
//! connection. A poison row's dead-letter record, once acknowledged, marks its row failed
//! (`attempts`, `last_error`, `failed_at`) instead. Only after the UPDATE committed are the
//! messages reported completed to the pipeline, so the slot never advances past a row that is
//! published but unmarked. A failing UPDATE is retried with backoff (reconnecting as needed) for
//! as long as it takes; meanwhile the pipeline's in-flight bound stops WAL reading. If Postgres
//! says it is shutting down, the pipeline is told at once so the replication connection lets go.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;
use crate::db;
use crate::pipeline::Progress;
use crate::pipeline::watermark::TxSeq;
use crate::replication::client::quote_ident;
use crate::sink::{DeadLetterNote, Delivery};

/// One write the progress stage makes.
enum Mark<'a> {
    Delivered(&'a [Uuid]),
    Failed(Uuid, &'a DeadLetterNote),
}

struct Marker {
    pg: tokio_postgres::Config,
    delivered_sql: String,
    failed_sql: String,
    client: Option<Client>,
}

impl Marker {
    fn new(config: &Config) -> Marker {
        let c = &config.outbox.columns;
        let table = config.outbox_table_sql();
        Marker {
            pg: config.pg_config(),
            delivered_sql: format!(
                "UPDATE {table} SET {d} = now() WHERE {id} = ANY($1) AND {d} IS NULL",
                d = quote_ident(&c.delivered_at),
                id = quote_ident(&c.id),
            ),
            failed_sql: format!(
                "UPDATE {table} SET {f} = now(), {a} = {a} + $2, {e} = $3 WHERE {id} = $1",
                f = quote_ident(&c.failed_at),
                a = quote_ident(&c.attempts),
                e = quote_ident(&c.last_error),
                id = quote_ident(&c.id),
            ),
            client: None,
        }
    }

    async fn execute(&mut self, mark: &Mark<'_>) -> Result<u64, tokio_postgres::Error> {
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => self.client.insert(db::connect(&self.pg).await?),
        };
        let result = match mark {
            Mark::Delivered(ids) => client.execute(&self.delivered_sql, &[ids]).await,
            Mark::Failed(id, note) => {
                let attempts = i32::try_from(note.attempts).unwrap_or(i32::MAX);
                client
                    .execute(&self.failed_sql, &[id, &attempts, &note.error])
                    .await
            }
        };
        if result.is_err() {
            self.client = None;
        }
        result
    }

    /// Runs `mark` until it succeeds. Returns false if the pipeline is gone.
    async fn execute_until_done(
        &mut self,
        mark: Mark<'_>,
        config: &Config,
        completions: &mpsc::UnboundedSender<Progress>,
    ) -> bool {
        let mut delays = crate::sink::kafka::backoff(&config.retry).build();
        let mut told_stopping = false;
        loop {
            match self.execute(&mark).await {
                Ok(_) => return true,
                Err(e) => {
                    // SQLSTATE class 57: admin shutdown, crash shutdown, cannot connect now.
                    let stopping = e.code().is_some_and(|c| c.code().starts_with("57P"));
                    if stopping && !told_stopping {
                        told_stopping = true;
                        let why = db::describe(&e);
                        if completions.send(Progress::PostgresStopping(why)).is_err() {
                            return false;
                        }
                    }
                    let wait = delays.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        error = %db::describe(&e),
                        retry_in = ?wait,
                        "marking rows in the outbox failed; retrying (the slot waits)"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Adds one completion to the run-length list of `(transaction, count)`.
fn push_completion(done: &mut Vec<(TxSeq, u64)>, seq: TxSeq) {
    match done.last_mut() {
        Some((s, n)) if *s == seq => *n += 1,
        _ => done.push((seq, 1)),
    }
}

/// Runs until `deliveries` closes. With `pipeline.mark_delivered` off, acks pass straight
/// through as completions (dead-lettered rows are still marked failed).
pub async fn run(
    config: Config,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    completions: mpsc::UnboundedSender<Progress>,
) {
    let mark_delivered = config.pipeline.mark_delivered;
    let mut marker = Marker::new(&config);
    let batch_size = config.pipeline.mark_batch_size;
    let interval = Duration::from_millis(config.pipeline.mark_interval_ms);

    let mut delivered: Vec<Uuid> = Vec::with_capacity(batch_size);
    let mut failed: Vec<(Uuid, Box<DeadLetterNote>)> = Vec::new();
    let mut done: Vec<(TxSeq, u64)> = Vec::new();
    let mut rejected: Vec<Progress> = Vec::new();
    loop {
        let Some(first) = deliveries.recv().await else {
            return;
        };
        let mut next = Some(first);
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            match next.take() {
                Some(Delivery::Acked(token)) => {
                    match token.dead_letter {
                        Some(note) => failed.push((token.id, note)),
                        None if mark_delivered => delivered.push(token.id),
                        None => {}
                    }
                    push_completion(&mut done, token.tx_seq);
                }
                Some(Delivery::Failed {
                    token,
                    error,
                    message,
                }) => rejected.push(Progress::Failed {
                    token,
                    error,
                    message,
                }),
                None => {}
            }
            if delivered.len() >= batch_size {
                break;
            }
            match deliveries.try_recv() {
                Ok(d) => next = Some(d),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !mark_delivered {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                        Ok(Some(d)) => next = Some(d),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        if !delivered.is_empty() {
            let ok = marker
                .execute_until_done(Mark::Delivered(&delivered), &config, &completions)
                .await;
            if !ok {
                return;
            }
            tracing::trace!(rows = delivered.len(), "marked delivered");
            delivered.clear();
        }
        for (id, note) in failed.drain(..) {
            if !marker
                .execute_until_done(Mark::Failed(id, &note), &config, &completions)
                .await
            {
                return;
            }
            tracing::info!(%id, error = %note.error, "row marked failed (dead-lettered)");
        }
        if !done.is_empty()
            && completions
                .send(Progress::Completed(std::mem::take(&mut done)))
                .is_err()
        {
            return;
        }
        for r in rejected.drain(..) {
            if completions.send(r).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::routing::OutboxMessage;
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
        let task = tokio::spawn(run(config, drx, ctx));
        let t = |seq| AckToken::new(seq, Uuid::new_v4());
        dtx.send(Delivery::Acked(t(4))).unwrap();
        dtx.send(Delivery::Acked(t(4))).unwrap();
        let mut total = 0;
        while total < 2 {
            match crx.recv().await.unwrap() {
                Progress::Completed(v) => total += v.iter().map(|(_, n)| n).sum::<u64>(),
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
        assert!(matches!(crx.recv().await.unwrap(), Progress::Failed { .. }));
        drop(dtx);
        task.await.unwrap();
    }
}
