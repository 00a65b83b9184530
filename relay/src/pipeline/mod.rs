//! The pipeline: decoded transactions in, broker messages out, the flushable position back.
//!
//! It follows the outbox table's Relation messages, turns each inserted row into a message
//! ([`routing`]), hands it to the sink with a token naming its transaction, and counts completions
//! into the [`watermark`]. It bounds memory: [`Pipeline::has_capacity`] turns false at
//! `pipeline.max_in_flight` uncompleted messages, and the caller stops reading WAL until
//! completions arrive. It never touches Postgres rows itself.

pub mod routing;
pub mod watermark;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::replication::Lsn;
use crate::replication::pgoutput::PgOutput;
use crate::sink::{AckToken, Sink, SinkError};
use routing::{ColumnMap, RawRow, Router, RowError, TopicTemplate};
use watermark::{TxSeq, Watermark};

/// Completions coming back from the progress stage (acknowledged and, if configured, marked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// `(transaction, number of its messages)` now completed.
    Completed(Vec<(TxSeq, u64)>),
    /// The broker will never accept this message.
    Failed { token: AckToken, error: String },
    /// Postgres is shutting down (or starting up) and refuses to mark rows. A fast shutdown waits
    /// for the replication connection to confirm all WAL, which cannot happen before marking:
    /// the relay must let go of the stream so the server can stop.
    PostgresStopping(String),
}

/// The pipeline cannot go on without losing or misrouting a row.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Row(#[from] RowError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the outbox table changed shape: {0}")]
    Schema(String),
    #[error(
        "message for outbox row {id} failed permanently: {error}; the slot stays at its last confirmed position"
    )]
    Delivery { id: uuid::Uuid, error: String },
    #[error("protocol order violated: {0}")]
    Order(String),
    #[error("the progress stage stopped")]
    ProgressClosed,
    #[error("Postgres is shutting down ({0}); releasing the replication connection so it can stop")]
    PostgresStopping(String),
}

/// Running totals, logged and later exported as metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub transactions: u64,
    pub rows: u64,
    pub completed: u64,
}

pub struct Pipeline<S: Sink> {
    sink: S,
    router: Router,
    config: Config,
    /// Relation id → column map; `None` for tables other than the outbox.
    relations: HashMap<u32, Option<ColumnMap>>,
    watermark: Watermark,
    open_tx: Option<TxSeq>,
    in_flight: usize,
    progress: mpsc::UnboundedReceiver<Progress>,
    pub counters: Counters,
}

impl<S: Sink> Pipeline<S> {
    pub fn new(config: &Config, sink: S, progress: mpsc::UnboundedReceiver<Progress>) -> Self {
        let template = TopicTemplate::parse(&config.kafka.topic_template).unwrap_or_else(|_| {
            TopicTemplate::parse("outbox.event.{aggregatetype}").expect("valid")
        });
        Pipeline {
            sink,
            router: Router::new(template),
            config: config.clone(),
            relations: HashMap::new(),
            watermark: Watermark::new(Lsn::ZERO),
            open_tx: None,
            in_flight: 0,
            progress,
            counters: Counters::default(),
        }
    }

    /// Raises the confirmed position to `lsn` (the slot's position at start).
    pub fn start_at(&mut self, lsn: Lsn) {
        self.watermark.observe_idle(lsn);
    }

    pub fn flushable(&self) -> Lsn {
        self.watermark.flushable()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn has_capacity(&self) -> bool {
        self.in_flight < self.config.pipeline.max_in_flight
    }

    /// The server has sent everything up to `wal_end`.
    pub fn observe_idle(&mut self, wal_end: Lsn) {
        if self.open_tx.is_none() {
            self.watermark.observe_idle(wal_end);
        }
    }

    /// The stream broke: a transaction being read will be read again from the slot.
    pub fn abandon_open_transaction(&mut self) {
        if self.open_tx.take().is_some() {
            self.watermark.abandon_open();
        }
    }

    /// Applies one decoded WAL message.
    pub async fn handle(&mut self, event: PgOutput) -> Result<(), PipelineError> {
        match event {
            PgOutput::Begin(_) => {
                if self.open_tx.is_some() {
                    return Err(PipelineError::Order("Begin inside a transaction".into()));
                }
                self.open_tx = Some(self.watermark.begin());
            }
            PgOutput::Commit(c) => {
                let seq = self
                    .open_tx
                    .take()
                    .ok_or_else(|| PipelineError::Order("Commit without Begin".into()))?;
                self.watermark.commit(seq, c.end_lsn);
                self.counters.transactions += 1;
            }
            PgOutput::Relation(rel) => {
                let outbox = &self.config.outbox;
                let mapped = if rel.namespace == outbox.schema && rel.name == outbox.table {
                    let map =
                        ColumnMap::new(&rel, &outbox.columns).map_err(PipelineError::Schema)?;
                    tracing::info!(
                        relation = %format!("{}.{}", rel.namespace, rel.name),
                        columns = rel.columns.len(),
                        "outbox table definition received"
                    );
                    Some(map)
                } else {
                    None
                };
                self.relations.insert(rel.id, mapped);
            }
            PgOutput::Insert { relation_id, new } => {
                let Some(map) = self.relations.get(&relation_id) else {
                    return Err(PipelineError::Order(format!(
                        "insert into relation {relation_id} before its Relation message"
                    )));
                };
                let Some(map) = map else {
                    return Ok(()); // another table in the publication
                };
                let raw = map.raw_row(new);
                let seq = self
                    .open_tx
                    .ok_or_else(|| PipelineError::Order("Insert outside a transaction".into()))?;
                self.publish_row(seq, raw).await?;
            }
            PgOutput::Truncate { relation_ids, .. } => {
                if relation_ids
                    .iter()
                    .any(|id| matches!(self.relations.get(id), Some(Some(_))))
                {
                    tracing::warn!(
                        "the outbox table was truncated; rows removed by TRUNCATE are not published \
                         (rows already read were published)"
                    );
                }
            }
            PgOutput::Update { .. }
            | PgOutput::Delete { .. }
            | PgOutput::Type { .. }
            | PgOutput::Origin { .. }
            | PgOutput::Message { .. } => {}
        }
        Ok(())
    }

    /// Routes one row and hands it to the sink as part of transaction `seq`.
    pub async fn publish_row(&mut self, seq: TxSeq, raw: RawRow) -> Result<(), PipelineError> {
        let msg = self.router.route(raw)?;
        let token = AckToken {
            tx_seq: seq,
            id: msg.id,
            attempt: 1,
        };
        self.sink.publish(msg, token).await?;
        self.watermark.add_message(seq);
        self.in_flight += 1;
        self.counters.rows += 1;
        Ok(())
    }

    /// Opens a pseudo-transaction (for the first-start snapshot).
    pub fn begin_batch(&mut self) -> TxSeq {
        self.watermark.begin()
    }

    /// Closes a pseudo-transaction at `end`.
    pub fn commit_batch(&mut self, seq: TxSeq, end: Lsn) {
        self.watermark.commit(seq, end);
    }

    /// Next completion report; cancel-safe.
    pub async fn next_progress(&mut self) -> Option<Progress> {
        self.progress.recv().await
    }

    pub fn on_progress(&mut self, p: Option<Progress>) -> Result<(), PipelineError> {
        match p {
            None => Err(PipelineError::ProgressClosed),
            Some(Progress::Completed(done)) => {
                for (seq, n) in done {
                    self.watermark.complete(seq, n);
                    self.in_flight = self.in_flight.saturating_sub(n as usize);
                    self.counters.completed += n;
                }
                Ok(())
            }
            Some(Progress::Failed { token, error }) => Err(PipelineError::Delivery {
                id: token.id,
                error,
            }),
            Some(Progress::PostgresStopping(why)) => Err(PipelineError::PostgresStopping(why)),
        }
    }

    /// Processes completions until there is room for another message.
    pub async fn wait_for_capacity(&mut self) -> Result<(), PipelineError> {
        while !self.has_capacity() {
            let p = self.next_progress().await;
            self.on_progress(p)?;
        }
        Ok(())
    }

    /// Processes completions until nothing is in flight or `timeout` passes; returns what is
    /// still in flight.
    pub async fn drain(&mut self, timeout: Duration) -> Result<usize, PipelineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight > 0 {
            match tokio::time::timeout_at(deadline, self.next_progress()).await {
                Ok(p) => self.on_progress(p)?,
                Err(_) => break,
            }
        }
        if self.in_flight > 0 {
            let left = self.sink.flush(Duration::ZERO).await;
            tracing::debug!(sink_outstanding = left, "drain timed out");
        }
        Ok(self.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::routing::OutboxMessage;
    use crate::replication::pgoutput::encode;

    /// A sink that records what it is handed; completions are driven by the test.
    #[derive(Default)]
    struct RecordingSink {
        sent: Vec<(OutboxMessage, AckToken)>,
    }

    impl Sink for RecordingSink {
        async fn publish(&mut self, msg: OutboxMessage, token: AckToken) -> Result<(), SinkError> {
            self.sent.push((msg, token));
            Ok(())
        }
        async fn flush(&mut self, _: Duration) -> usize {
            0
        }
    }

    const COLS: &[&str] = &["id", "aggregatetype", "aggregateid", "type", "payload"];

    fn row(i: u32) -> Vec<Option<String>> {
        vec![
            Some(format!("00000000-0000-0000-0000-{i:012}")),
            Some("order".into()),
            Some(format!("o-{}", i % 3)),
            Some("Created".into()),
            Some(format!("{{\"n\": {i}}}")),
        ]
    }

    async fn feed(p: &mut Pipeline<RecordingSink>, msg: bytes::Bytes) {
        p.handle(PgOutput::decode(msg).unwrap()).await.unwrap();
    }

    fn insert(rel: u32, i: u32) -> bytes::Bytes {
        let r = row(i);
        let vals: Vec<Option<&str>> = r.iter().map(|v| v.as_deref()).collect();
        encode::insert(rel, &vals)
    }

    #[tokio::test]
    async fn publishes_outbox_inserts_and_advances_only_after_completion() {
        let mut config = Config::default();
        config.pipeline.max_in_flight = 3;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(&config, RecordingSink::default(), rx);
        p.start_at(Lsn(10));

        feed(&mut p, encode::relation(1, "public", "outbox", COLS)).await;
        feed(&mut p, encode::relation(2, "public", "orders", &["id"])).await;
        feed(&mut p, encode::begin(100, 1)).await;
        feed(&mut p, insert(1, 1)).await;
        feed(&mut p, encode::insert(2, &[Some("x")])).await; // other table: ignored
        feed(&mut p, insert(1, 2)).await;
        feed(&mut p, encode::commit(100, 110)).await;
        feed(&mut p, encode::begin(200, 2)).await;
        feed(&mut p, insert(1, 3)).await;
        feed(&mut p, encode::commit(200, 210)).await;

        assert_eq!(p.sink.sent.len(), 3);
        assert!(!p.has_capacity(), "3 in flight with max 3");
        assert_eq!(p.flushable(), Lsn(10));
        let seq_a = p.sink.sent[0].1.tx_seq;
        let seq_b = p.sink.sent[2].1.tx_seq;
        assert_ne!(seq_a, seq_b);

        // The second transaction completes first: the watermark waits for the first.
        tx.send(Progress::Completed(vec![(seq_b, 1)])).unwrap();
        let next = p.next_progress().await;
        p.on_progress(next).unwrap();
        assert_eq!(p.flushable(), Lsn(10));
        assert!(p.has_capacity());
        tx.send(Progress::Completed(vec![(seq_a, 2)])).unwrap();
        assert_eq!(p.drain(Duration::from_secs(1)).await.unwrap(), 0);
        assert_eq!(p.flushable(), Lsn(210));
        assert_eq!(p.sink.sent[0].0.topic, "outbox.event.order");
    }

    #[tokio::test]
    async fn alter_table_is_followed_and_a_broken_shape_is_a_clear_error() {
        let config = Config::default();
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(&config, RecordingSink::default(), rx);
        feed(&mut p, encode::relation(1, "public", "outbox", COLS)).await;
        // ALTER TABLE ... ADD COLUMN extra: a new Relation with the column in the middle.
        feed(
            &mut p,
            encode::relation(
                1,
                "public",
                "outbox",
                &[
                    "id",
                    "extra",
                    "aggregatetype",
                    "aggregateid",
                    "type",
                    "payload",
                ],
            ),
        )
        .await;
        feed(&mut p, encode::begin(1, 1)).await;
        let r = row(7);
        feed(
            &mut p,
            encode::insert(
                1,
                &[
                    r[0].as_deref(),
                    Some("ignored"),
                    r[1].as_deref(),
                    r[2].as_deref(),
                    r[3].as_deref(),
                    r[4].as_deref(),
                ],
            ),
        )
        .await;
        assert_eq!(&p.sink.sent[0].0.key[..], b"o-1");

        let err = p
            .handle(PgOutput::decode(encode::relation(1, "public", "outbox", &["id"])).unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("aggregatetype"), "{err}");
    }

    #[tokio::test]
    async fn permanent_failure_stops_with_the_row_named() {
        let config = Config::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(&config, RecordingSink::default(), rx);
        let token = AckToken {
            tx_seq: 0,
            id: uuid::Uuid::nil(),
            attempt: 1,
        };
        tx.send(Progress::Failed {
            token,
            error: "too large".into(),
        })
        .unwrap();
        let next = p.next_progress().await;
        let err = p.on_progress(next).unwrap_err().to_string();
        assert!(err.contains("too large") && err.contains(&uuid::Uuid::nil().to_string()));
    }
}
