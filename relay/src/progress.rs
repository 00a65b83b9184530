//! The progress stage: broker acknowledgements in, rows marked delivered, completions out.
//!
//! Acks are gathered into batches (`pipeline.mark_batch_size` ids or `pipeline.mark_interval_ms`,
//! whichever comes first) and marked with one `UPDATE ... WHERE id = ANY($1)` on an ordinary
//! connection. Only after that UPDATE committed are the messages reported completed to the
//! pipeline, so the slot never advances past a row that is published but unmarked. A failing
//! UPDATE is retried with backoff (reconnecting as needed) for as long as it takes; meanwhile the
//! pipeline's in-flight bound stops WAL reading.

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
use crate::sink::Delivery;

struct Marker {
    pg: tokio_postgres::Config,
    sql: String,
    client: Option<Client>,
}

impl Marker {
    async fn mark(&mut self, ids: &[Uuid]) -> Result<u64, tokio_postgres::Error> {
        let client = match &self.client {
            Some(c) if !c.is_closed() => c,
            _ => self.client.insert(db::connect(&self.pg).await?),
        };
        let result = client.execute(&self.sql, &[&ids]).await;
        if result.is_err() {
            self.client = None;
        }
        result
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
/// through as completions.
pub async fn run(
    config: Config,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    completions: mpsc::UnboundedSender<Progress>,
) {
    let cols = &config.outbox.columns;
    let mut marker = config.pipeline.mark_delivered.then(|| Marker {
        pg: config.pg_config(),
        sql: format!(
            "UPDATE {table} SET {d} = now() WHERE {id} = ANY($1) AND {d} IS NULL",
            table = config.outbox_table_sql(),
            d = quote_ident(&cols.delivered_at),
            id = quote_ident(&cols.id),
        ),
        client: None,
    });
    let batch_size = config.pipeline.mark_batch_size;
    let interval = Duration::from_millis(config.pipeline.mark_interval_ms);
    let backoff = crate::sink::kafka::backoff(&config.retry);

    let mut ids: Vec<Uuid> = Vec::with_capacity(batch_size);
    let mut done: Vec<(TxSeq, u64)> = Vec::new();
    let mut failures: Vec<Progress> = Vec::new();
    loop {
        let Some(first) = deliveries.recv().await else {
            return;
        };
        let mut next = Some(first);
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            match next.take() {
                Some(Delivery::Acked(token)) => {
                    ids.push(token.id);
                    push_completion(&mut done, token.tx_seq);
                }
                Some(Delivery::Failed { token, error }) => {
                    failures.push(Progress::Failed { token, error })
                }
                None => {}
            }
            if ids.len() >= batch_size {
                break;
            }
            match deliveries.try_recv() {
                Ok(d) => next = Some(d),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if marker.is_none() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                        Ok(Some(d)) => next = Some(d),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        if let (Some(m), false) = (marker.as_mut(), ids.is_empty()) {
            let n = ids.len();
            let mut delays = backoff.build();
            let mut told_stopping = false;
            loop {
                match m.mark(&ids).await {
                    Ok(updated) => {
                        tracing::trace!(batch = n, updated, "marked delivered");
                        break;
                    }
                    Err(e) => {
                        // SQLSTATE class 57: admin shutdown, crash shutdown, cannot connect now.
                        let stopping = e.code().is_some_and(|c| c.code().starts_with("57P"));
                        if stopping && !told_stopping {
                            told_stopping = true;
                            if completions
                                .send(Progress::PostgresStopping(db::describe(&e)))
                                .is_err()
                            {
                                return;
                            }
                        }
                        let wait = delays.next().unwrap_or(Duration::from_secs(30));
                        tracing::warn!(
                            error = %db::describe(&e),
                            rows = n,
                            retry_in = ?wait,
                            "marking rows delivered failed; retrying (the slot waits)"
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        ids.clear();
        if !done.is_empty()
            && completions
                .send(Progress::Completed(std::mem::take(&mut done)))
                .is_err()
        {
            return;
        }
        for f in failures.drain(..) {
            if completions.send(f).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let t = |seq| AckToken {
            tx_seq: seq,
            id: Uuid::new_v4(),
            attempt: 1,
        };
        dtx.send(Delivery::Acked(t(4))).unwrap();
        dtx.send(Delivery::Acked(t(4))).unwrap();
        let mut total = 0;
        while total < 2 {
            match crx.recv().await.unwrap() {
                Progress::Completed(v) => total += v.iter().map(|(_, n)| n).sum::<u64>(),
                other => panic!("{other:?}"),
            }
        }
        dtx.send(Delivery::Failed {
            token: t(5),
            error: "boom".into(),
        })
        .unwrap();
        assert!(matches!(crx.recv().await.unwrap(), Progress::Failed { .. }));
        drop(dtx);
        task.await.unwrap();
    }
}
