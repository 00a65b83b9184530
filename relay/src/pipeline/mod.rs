//! The pipeline: decoded transactions in, broker messages out, the flushable position back.
//!
//! It follows the outbox table's Relation messages, turns each inserted row into a message
//! ([`routing`]), hands it to the sink with a token naming its transaction, and counts completions
//! into the [`watermark`]. It bounds memory: [`Pipeline::has_capacity`] turns false at
//! `pipeline.max_in_flight` uncompleted messages, and the caller stops reading WAL until
//! completions arrive. It never touches Postgres rows itself.
//!
//! Poison rows — rows that cannot become a message, or that the broker rejects for good after
//! `dead_letter.max_attempts` sends — follow `dead_letter.policy`: `dlq` publishes a dead-letter
//! record in the row's place (the row is then marked failed by the marking stage, and the
//! pipeline goes on); `block_key` marks the row failed and parks later rows of its aggregate in
//! the table until it goes through ([`blocking`]); `halt` stops with an error naming the row,
//! before the slot passes it.

pub mod watermark;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;

use backon::BackoffBuilder;

use crate::config::TopicTemplate;
use crate::config::{Config, DeliveryMode, PoisonPolicy};
use crate::dead_letter::blocking::{Aggregate, Blocked};
use crate::dead_letter::record;
use crate::exactly_once::position::{Carried, Origin, SourcePosition};
use crate::exactly_once::{ExactlyOnce, OpenBatch};
use crate::replication::Lsn;
use crate::replication::pgoutput::PgOutput;
use crate::routing::{ColumnMap, OutboxMessage, RawRow, Router, TopicPolicy};
use crate::sink::{AckToken, Delivery, FailureNote, Sink, SinkError};
use watermark::{TxSeq, Watermark};

/// Completions coming back from the marking stage (acknowledged and, if configured, marked).
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// `(transaction, number of its messages)` now completed.
    Completed(Vec<(TxSeq, u64)>),
    /// The broker rejected this message for good; `message` is what was sent.
    Failed {
        token: AckToken,
        error: String,
        message: Box<OutboxMessage>,
    },
    /// Postgres is shutting down (or starting up) and refuses to mark rows. A fast shutdown waits
    /// for the replication connection to confirm all WAL, which cannot happen before marking:
    /// the relay must let go of the stream so the server can stop.
    PostgresStopping(String),
    /// The sink can deliver nothing more; outstanding messages will not be reported.
    SinkBroken(String),
}

/// The pipeline cannot go on without losing or misrouting a row.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "poison row {id}: {error} (after {attempts} attempt(s)); dead_letter.policy is 'halt', so the relay stops here \
         and the slot stays before the row; fix or delete the row, or set RELAY_DEAD_LETTER__POLICY=dlq"
    )]
    Poison {
        id: String,
        error: String,
        attempts: u32,
    },
    #[error(
        "cannot dead-letter row {id} (its error: {error}): {cause}; the slot stays before the row"
    )]
    DeadLetter {
        id: String,
        error: String,
        cause: SinkError,
    },
    #[error("the outbox table changed shape: {0}")]
    Schema(String),
    #[error("protocol order violated: {0}")]
    Order(String),
    #[error("the marking stage stopped")]
    MarkingStopped,
    #[error("Postgres is shutting down ({0}); releasing the replication connection so it can stop")]
    PostgresStopping(String),
    #[error(
        "the sink can deliver nothing more ({0}); a new one takes over and everything unconfirmed is read again from the slot"
    )]
    SinkBroken(String),
    #[error(
        "the Kafka transaction was aborted ({0}); a new producer sends it again from the last committed position"
    )]
    TransactionAborted(String),
    #[error(
        "this relay was fenced: {0}. Another relay started with the same exactly_once.transactional_id \
         and took over; this one stops. Run one relay per transactional id"
    )]
    Fenced(String),
}

/// Prometheus handles of the pipeline's metrics, taken once (see `crate::metrics`).
struct Meters {
    rows_read: metrics::Counter,
    published: metrics::Counter,
    dead_lettered: metrics::Counter,
    refused_retries: metrics::Counter,
    in_flight: metrics::Gauge,
    stages: crate::metrics::SendMetrics,
}

impl Meters {
    fn new() -> Meters {
        use crate::metrics::*;
        Meters {
            rows_read: metrics::counter!(ROWS_READ),
            published: metrics::counter!(MESSAGES_PUBLISHED),
            dead_lettered: metrics::counter!(DEAD_LETTERED),
            refused_retries: metrics::counter!(RETRIES, "stage" => "refused"),
            in_flight: metrics::gauge!(IN_FLIGHT),
            stages: SendMetrics::new(),
        }
    }
}

/// Running totals, for the logs (the metrics count the same events).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub transactions: u64,
    pub rows: u64,
    pub completed: u64,
    pub dead_lettered: u64,
    /// Rows marked failed or held back under `block_key`.
    pub parked: u64,
    /// Rows not sent because a committed Kafka transaction already holds them (exactly-once,
    /// after a restart); they are only marked.
    pub covered: u64,
    /// Kafka transactions committed (exactly-once).
    pub kafka_transactions: u64,
}

/// The source transaction of a row read from the WAL.
#[derive(Debug, Clone, Copy)]
struct TxOrigin {
    xid: u32,
    /// Commit time, microseconds since 2000-01-01 UTC (Postgres' epoch).
    commit_time: i64,
}

pub struct Pipeline<S: Sink> {
    sink: S,
    router: Router,
    config: Config,
    /// Relation id → column map; `None` for tables other than the outbox.
    relations: HashMap<u32, Option<ColumnMap>>,
    watermark: Watermark,
    open_tx: Option<TxSeq>,
    /// The open transaction's id and commit time (from its Begin message).
    open_origin: Option<TxOrigin>,
    /// When the walsender sent the WAL message being handled (Postgres' epoch, µs).
    wal_sent_time: Option<i64>,
    in_flight: usize,
    completions: mpsc::UnboundedReceiver<Completion>,
    /// The marking stage's input, for rows parked under `block_key` (marked, never sent).
    parked: mpsc::UnboundedSender<Delivery>,
    blocked: Blocked,
    /// `Some` with `delivery = "exactly_once"`.
    exactly_once: Option<ExactlyOnce>,
    pub counters: Counters,
    meters: Meters,
    /// Readiness: in-flight count and completions, for the stall check.
    health: Option<std::sync::Arc<crate::health::Health>>,
}

impl<S: Sink> Pipeline<S> {
    /// `deliveries` is the channel the sink reports on (parked rows are reported there too);
    /// `completions` brings back what the marking stage completed.
    pub fn new(
        config: &Config,
        sink: S,
        deliveries: mpsc::UnboundedSender<Delivery>,
        completions: mpsc::UnboundedReceiver<Completion>,
    ) -> Self {
        let template = TopicTemplate::parse(&config.kafka.topic_template).unwrap_or_else(|_| {
            TopicTemplate::parse("outbox.event.{aggregatetype}").expect("valid")
        });
        let reserved = vec![
            config.dead_letter.topic.clone(),
            config.exactly_once.progress_topic.clone(),
        ];
        let topics = TopicPolicy::new(
            &config.kafka.allowed_topics,
            template.literal_prefix(),
            reserved,
        );
        Pipeline {
            sink,
            router: Router::new(template, topics),
            config: config.clone(),
            relations: HashMap::new(),
            watermark: Watermark::new(Lsn::ZERO),
            open_tx: None,
            open_origin: None,
            wal_sent_time: None,
            in_flight: 0,
            completions,
            parked: deliveries,
            blocked: Blocked::new(Duration::from_millis(
                config.dead_letter.block_retry_interval_ms,
            )),
            exactly_once: (config.delivery == DeliveryMode::ExactlyOnce).then(ExactlyOnce::default),
            counters: Counters::default(),
            meters: Meters::new(),
            health: None,
        }
    }

    /// Reports in-flight messages and completions to `health` (the stall check of `/readyz`).
    pub fn set_health(&mut self, health: std::sync::Arc<crate::health::Health>) {
        self.health = Some(health);
    }

    /// Whether a batch was begun and never closed (a first-start snapshot cut short): the
    /// watermark would never pass it.
    pub fn has_unfinished_batch(&self) -> bool {
        self.watermark.has_unfinished()
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

    /// Whether a transaction has begun and its Commit not been read yet.
    pub fn in_transaction(&self) -> bool {
        self.open_tx.is_some()
    }

    /// The stream broke: a transaction being read will be read again from the slot.
    pub fn abandon_open_transaction(&mut self) {
        self.open_origin = None;
        if self.open_tx.take().is_some() {
            self.watermark.abandon_open();
        }
    }

    /// The next message [`Pipeline::handle`] applies was sent by the walsender at `send_time`
    /// (the XLogData header; Postgres' epoch, µs): the latency split by stage.
    pub fn wal_sent_at(&mut self, send_time: i64) {
        self.wal_sent_time = Some(send_time);
    }

    /// Applies one decoded WAL message.
    pub async fn handle(&mut self, event: PgOutput) -> Result<(), PipelineError> {
        match event {
            PgOutput::Begin(b) => {
                if self.open_tx.is_some() {
                    return Err(PipelineError::Order("Begin inside a transaction".into()));
                }
                self.open_tx = Some(self.watermark.begin());
                self.open_origin = Some(TxOrigin {
                    xid: b.xid,
                    commit_time: b.commit_time,
                });
                if let Some(eo) = &mut self.exactly_once {
                    eo.open_final_lsn = b.final_lsn;
                    eo.open_rows = 0;
                    eo.handled_rows = 0;
                }
            }
            PgOutput::Commit(c) => {
                let seq = self
                    .open_tx
                    .take()
                    .ok_or_else(|| PipelineError::Order("Commit without Begin".into()))?;
                self.open_origin = None;
                self.watermark.commit(seq, c.end_lsn);
                self.counters.transactions += 1;
                if let Some(eo) = &mut self.exactly_once {
                    eo.handed_end = c.end_lsn;
                    let full = eo
                        .batch
                        .is_some_and(|b| b.messages >= self.config.exactly_once.batch_max_messages);
                    if full {
                        self.commit_kafka_transaction().await?;
                    }
                }
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
                self.handle_row(raw).await?;
            }
            PgOutput::Message {
                transactional,
                lsn,
                prefix,
                content,
            } if !self.config.outbox.message_prefix.is_empty()
                && prefix == self.config.outbox.message_prefix =>
            {
                if !transactional {
                    tracing::warn!(
                        %lsn,
                        prefix,
                        "a non-transactional outbox message is not published (it would be sent even \
                         if its transaction rolled back): write it with pg_logical_emit_message(true, ...) \
                         or outbox_emit() (sql/006_emit.sql)"
                    );
                    return Ok(());
                }
                self.handle_row(RawRow::from_message(&content, lsn.0))
                    .await?;
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

    /// One row of the open transaction: an inserted outbox row or a table-less message.
    async fn handle_row(&mut self, raw: RawRow) -> Result<(), PipelineError> {
        let seq = self
            .open_tx
            .ok_or_else(|| PipelineError::Order("Insert outside a transaction".into()))?;
        if let Some(eo) = &mut self.exactly_once {
            eo.open_rows += 1;
            if eo.covered.covers(eo.open_final_lsn, eo.open_rows) {
                eo.handled_rows = eo.open_rows;
                self.mark_covered(seq, &raw);
                return Ok(());
            }
        }
        self.publish_row_of(seq, raw, self.open_origin).await?;
        if let Some(eo) = &mut self.exactly_once {
            eo.handled_rows = eo.open_rows;
        }
        Ok(())
    }

    /// Routes one row and hands it to the sink as part of transaction `seq`. A row that cannot
    /// become a message, or that the broker refuses `dead_letter.max_attempts` times, is poison.
    /// Under `block_key`, a row of a blocked aggregate is parked instead.
    pub async fn publish_row(&mut self, seq: TxSeq, raw: RawRow) -> Result<(), PipelineError> {
        self.publish_row_of(seq, raw, None).await
    }

    /// [`Pipeline::publish_row`] for a row inserted by the transaction `origin` (read from the
    /// WAL).
    async fn publish_row_of(
        &mut self,
        seq: TxSeq,
        raw: RawRow,
        origin: Option<TxOrigin>,
    ) -> Result<(), PipelineError> {
        self.counters.rows += 1;
        self.meters.rows_read.increment(1);
        // Table-less messages have no row to park: block_key does not hold them back.
        if !self.blocked.is_empty() && !raw.emitted {
            let aggregate = Aggregate::of_row(&raw);
            if let Some(blocker) = self.blocked.blocker(&aggregate)
                && let Some(id) = raw.uuid()
            {
                let note = FailureNote {
                    error: format!(
                        "held back: aggregate {aggregate} is blocked by failed row {blocker} \
                         (dead_letter.policy = block_key)"
                    ),
                    attempts: 0,
                };
                self.park(seq, id, note, false);
                return Ok(());
            }
        }
        self.send_row(seq, raw, origin).await
    }

    /// Publishes a parked row of a blocked aggregate again (see `app/redrive.rs`).
    pub async fn redrive_row(&mut self, seq: TxSeq, raw: RawRow) -> Result<(), PipelineError> {
        self.send_row(seq, raw, None).await
    }

    async fn send_row(
        &mut self,
        seq: TxSeq,
        raw: RawRow,
        origin: Option<TxOrigin>,
    ) -> Result<(), PipelineError> {
        let msg = match self.router.route(&raw) {
            Ok(msg) => msg,
            Err(e) => {
                let record = record::for_row(&self.config, &self.router, &raw, &e.problem);
                return self
                    .poison(seq, e.id, record, e.problem, 0, false, raw.emitted)
                    .await;
            }
        };
        let mut delays = crate::retry::backoff(&self.config.retry).build();
        let mut attempt = 1;
        let handed_at = origin.map(|o| {
            if let Some(sent) = self.wal_sent_time {
                self.meters.stages.handing(o.commit_time, sent);
            }
            std::time::Instant::now()
        });
        loop {
            let mut token = AckToken::new(seq, msg.id);
            token.attempt = attempt;
            token.xid = origin.map(|o| o.xid);
            token.row_seq = raw.seq;
            token.emitted = raw.emitted;
            token.commit_time = origin.map(|o| o.commit_time);
            token.handed_at = handed_at;
            match self.sink.publish(&msg, token).await {
                Ok(()) => {
                    self.track(seq);
                    self.handed_to_sink();
                    return Ok(());
                }
                Err(SinkError::Broken(why)) => return Err(PipelineError::SinkBroken(why)),
                Err(SinkError::Fenced(why)) => return Err(PipelineError::Fenced(why)),
                Err(SinkError::Aborted(why)) => return Err(PipelineError::TransactionAborted(why)),
                Err(e @ SinkError::Unavailable { .. }) => {
                    // Not the row's fault (authorization, a deleted topic): retried without
                    // limit. The stream loop runs this step guarded, so SIGTERM, status updates
                    // and the leader check are served meanwhile.
                    let wait = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(id = %msg.id, topic = %msg.topic, error = %e, retry_in = ?wait, "the broker cannot take the message now; trying again");
                    self.meters.refused_retries.increment(1);
                    tokio::time::sleep(wait).await;
                }
                Err(e) if attempt < self.config.dead_letter.max_attempts => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(id = %msg.id, topic = %msg.topic, attempt, error = %e, retry_in = ?wait, "the broker refused the message; trying again");
                    self.meters.refused_retries.increment(1);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    let error = e.to_string();
                    let record = record::for_message(&self.config, &msg, &error, attempt);
                    let id = msg.id.to_string();
                    return self
                        .poison(seq, id, Some(record), error, attempt, false, raw.emitted)
                        .await;
                }
            }
        }
    }

    fn track(&mut self, seq: TxSeq) {
        self.watermark.add_message(seq);
        self.in_flight += 1;
        self.meters.in_flight.set(self.in_flight as f64);
        if let Some(h) = &self.health {
            h.set_in_flight(self.in_flight, false);
        }
    }

    /// Counts a message handed to the sink, and (exactly-once) into the open Kafka transaction.
    fn handed_to_sink(&mut self) {
        self.meters.published.increment(1);
        if let Some(eo) = &mut self.exactly_once {
            eo.batch
                .get_or_insert(OpenBatch {
                    opened: tokio::time::Instant::now(),
                    messages: 0,
                })
                .messages += 1;
        }
    }

    /// A row a committed Kafka transaction already holds (read again after a restart): it is
    /// not sent, only marked delivered (the relay may have stopped before marking it).
    fn mark_covered(&mut self, seq: TxSeq, raw: &RawRow) {
        self.counters.covered += 1;
        let Some(id) = raw.uuid() else {
            return; // a row without a usable id never made it into a transaction
        };
        let mut token = AckToken::new(seq, id);
        token.xid = self.open_origin.map(|o| o.xid);
        token.row_seq = raw.seq;
        token.emitted = raw.emitted;
        self.track(seq);
        // The marking stage outlives the pipeline; a closed channel surfaces as MarkingStopped.
        let _ = self.parked.send(Delivery::Acked(token));
    }

    /// Exactly-once: rows that committed Kafka transactions hold (read from the progress topic
    /// at start, or kept from the pipeline a broken producer left) are not sent again.
    pub fn set_covered(&mut self, covered: SourcePosition) {
        if let Some(eo) = &mut self.exactly_once {
            eo.covered = covered;
            eo.committed = covered;
        }
    }

    /// Exactly-once: the pipeline streams from server `here` from now on. A covered position
    /// from another server or timeline is cut back to the history `here` shares with it
    /// (`switch_point`: where its timeline ended in `here`'s history) or dropped: an LSN of
    /// another server says nothing about which of this server's rows were sent.
    pub fn enter_server(&mut self, here: Origin, switch_point: Option<Lsn>) -> Option<Carried> {
        let eo = self.exactly_once.as_mut()?;
        let (covered, how) = eo.covered.moved_to(here, switch_point);
        let (committed, _) = eo.committed.moved_to(here, switch_point);
        if how != Carried::Kept {
            tracing::error!(
                from = ?eo.covered.origin,
                to = %here,
                before = %eo.covered,
                after = %covered,
                outcome = ?how,
                "EXACTLY-ONCE POSITION FROM ANOTHER SERVER: the progress record was written while \
                 streaming another server or timeline; only the history this server shares with it \
                 counts as sent, rows beyond are sent again"
            );
        }
        // A position kept without an origin is taken as this server's from now on.
        eo.covered = SourcePosition {
            origin: Some(here),
            ..covered
        };
        eo.committed = SourcePosition {
            origin: Some(here),
            ..committed
        };
        eo.handed_end = eo.handed_end.min(committed.committed_end);
        eo.origin = Some(here);
        Some(how)
    }

    /// Exactly-once: rows are covered by a record that does not say which server it is from.
    pub fn covers_without_origin(&self) -> bool {
        self.exactly_once.as_ref().is_some_and(|eo| {
            eo.covered.origin.is_none() && eo.covered != SourcePosition::default()
        })
    }

    /// Exactly-once: takes `origin` as the server of a covered position whose record named none.
    pub fn assume_covered_origin(&mut self, origin: Option<Origin>) {
        if let Some(eo) = &mut self.exactly_once
            && eo.covered.origin.is_none()
        {
            eo.covered.origin = origin;
            if eo.committed.origin.is_none() {
                eo.committed.origin = origin;
            }
        }
    }

    /// Exactly-once: the server the covered position came from, if the record said.
    pub fn covered_origin(&self) -> Option<Origin> {
        self.exactly_once.as_ref()?.covered.origin
    }

    /// Exactly-once: the last position committed to Kafka.
    pub fn committed_position(&self) -> Option<SourcePosition> {
        self.exactly_once.as_ref().map(|eo| eo.committed)
    }

    /// Exactly-once: when the open Kafka transaction is due for commit — at once when the
    /// in-flight bound is reached (its messages complete only after the commit), else
    /// `exactly_once.batch_max_ms` after it opened. `None` when no transaction is open.
    pub fn kafka_transaction_due(&self) -> Option<tokio::time::Instant> {
        let batch = self.exactly_once.as_ref()?.batch?;
        if self.has_capacity() {
            Some(batch.opened + Duration::from_millis(self.config.exactly_once.batch_max_ms))
        } else {
            Some(tokio::time::Instant::now())
        }
    }

    /// Exactly-once: commits the open Kafka transaction with the position it reaches; its
    /// messages are acknowledged (and marked) only after. Nothing to do without one.
    pub async fn commit_kafka_transaction(&mut self) -> Result<(), PipelineError> {
        let in_transaction = self.open_tx.is_some();
        let Some(eo) = &mut self.exactly_once else {
            return Ok(());
        };
        let Some(batch) = eo.batch.take() else {
            return Ok(());
        };
        let position = SourcePosition {
            committed_end: eo.handed_end.max(eo.committed.committed_end),
            partial: in_transaction.then_some((eo.open_final_lsn, eo.handled_rows)),
            origin: eo.origin,
        };
        let started = tokio::time::Instant::now();
        match self.sink.commit(position).await {
            Ok(()) => {}
            Err(SinkError::Fenced(why)) => return Err(PipelineError::Fenced(why)),
            Err(SinkError::Aborted(why)) => return Err(PipelineError::TransactionAborted(why)),
            Err(e) => return Err(PipelineError::SinkBroken(e.to_string())),
        }
        if let Some(eo) = &mut self.exactly_once {
            eo.committed = position;
        }
        self.counters.kafka_transactions += 1;
        tracing::debug!(
            messages = batch.messages,
            %position,
            open_ms = batch.opened.elapsed().as_millis() as u64,
            commit_ms = started.elapsed().as_millis() as u64,
            "Kafka transaction committed"
        );
        Ok(())
    }

    /// Marks row `id` failed with `note` without sending it; it completes like a delivery once
    /// the mark is written. `counted`: the row is already in flight.
    fn park(&mut self, seq: TxSeq, id: uuid::Uuid, note: FailureNote, counted: bool) {
        let mut token = AckToken::new(seq, id);
        token.failure = Some(Box::new(note));
        if !counted {
            self.track(seq);
        }
        self.counters.parked += 1;
        // The marking stage outlives the pipeline; a closed channel surfaces as MarkingStopped.
        let _ = self.parked.send(Delivery::Acked(token));
    }

    /// Aggregates held back under `block_key`, with the row that blocks each (loaded at start).
    pub fn load_blocked(&mut self, blocked: Vec<(Aggregate, uuid::Uuid)>) {
        let now = tokio::time::Instant::now();
        for (aggregate, row) in blocked {
            self.blocked.block(aggregate, row, now);
        }
    }

    pub fn blocked(&self) -> &Blocked {
        &self.blocked
    }

    pub fn blocked_mut(&mut self) -> &mut Blocked {
        &mut self.blocked
    }

    /// Applies `dead_letter.policy` to a poison row. `counted`: the row's original message is
    /// already in flight (its dead-letter record takes its place). `emitted`: a table-less
    /// message, which has no row to park: `block_key` dead-letters it.
    #[allow(clippy::too_many_arguments)]
    async fn poison(
        &mut self,
        seq: TxSeq,
        id: String,
        record: Option<OutboxMessage>,
        error: String,
        attempts: u32,
        counted: bool,
        emitted: bool,
    ) -> Result<(), PipelineError> {
        let policy = match self.config.dead_letter.policy {
            PoisonPolicy::BlockKey if emitted => PoisonPolicy::Dlq,
            policy => policy,
        };
        let record = match (policy, record) {
            (PoisonPolicy::Halt, _) => {
                return Err(PipelineError::Poison {
                    id,
                    error,
                    attempts,
                });
            }
            (PoisonPolicy::Dlq, None) => {
                return Err(PipelineError::Poison {
                    id,
                    error: format!(
                        "{error}; without a usable id the row can be neither dead-lettered nor marked"
                    ),
                    attempts,
                });
            }
            (PoisonPolicy::BlockKey, None) => {
                return Err(PipelineError::Poison {
                    id,
                    error: format!(
                        "{error}; without a usable id the row can be neither held back nor marked"
                    ),
                    attempts,
                });
            }
            (PoisonPolicy::BlockKey, Some(record)) => {
                let aggregate = Aggregate::of_message(&record);
                let first = self.blocked.blocker(&aggregate).is_none();
                self.blocked
                    .block(aggregate.clone(), record.id, tokio::time::Instant::now());
                let note = FailureNote {
                    error: error.clone(),
                    attempts,
                };
                self.park(seq, record.id, note, counted);
                if first {
                    tracing::warn!(
                        id,
                        error,
                        attempts,
                        %aggregate,
                        "poison row marked failed; later rows of its aggregate are held back until it goes through \
                         (fix the row with an UPDATE, or skip it: UPDATE ... SET delivered_at = now())"
                    );
                } else {
                    tracing::debug!(id, error, %aggregate, "a row of a blocked aggregate failed again");
                }
                return Ok(());
            }
            (PoisonPolicy::Dlq, Some(record)) => record,
        };
        let mut token = AckToken::new(seq, record.id);
        token.emitted = emitted;
        token.failure = Some(Box::new(FailureNote {
            error: error.clone(),
            attempts,
        }));
        match self.sink.publish(&record, token).await {
            Ok(()) => self.handed_to_sink(),
            Err(SinkError::Broken(why)) => return Err(PipelineError::SinkBroken(why)),
            Err(SinkError::Fenced(why)) => return Err(PipelineError::Fenced(why)),
            Err(SinkError::Aborted(why)) => return Err(PipelineError::TransactionAborted(why)),
            Err(cause) => return Err(PipelineError::DeadLetter { id, error, cause }),
        }
        if !counted {
            self.track(seq);
        }
        self.counters.dead_lettered += 1;
        self.meters.dead_lettered.increment(1);
        tracing::warn!(
            id,
            error,
            attempts,
            dead_letter_topic = %self.config.dead_letter.topic,
            "poison row sent to the dead-letter topic; it will be marked failed"
        );
        Ok(())
    }

    /// Opens a pseudo-transaction (for the first-start snapshot and redrives).
    pub fn begin_batch(&mut self) -> TxSeq {
        self.watermark.begin()
    }

    /// Closes a pseudo-transaction at `end`.
    pub fn commit_batch(&mut self, seq: TxSeq, end: Lsn) {
        self.watermark.commit(seq, end);
    }

    /// Next completion report; cancel-safe.
    pub async fn next_completion(&mut self) -> Option<Completion> {
        self.completions.recv().await
    }

    pub async fn on_completion(&mut self, p: Option<Completion>) -> Result<(), PipelineError> {
        match p {
            None => Err(PipelineError::MarkingStopped),
            Some(Completion::Completed(done)) => {
                for (seq, n) in done {
                    self.watermark.complete(seq, n);
                    self.in_flight = self.in_flight.saturating_sub(n as usize);
                    self.counters.completed += n;
                }
                self.meters.in_flight.set(self.in_flight as f64);
                if let Some(h) = &self.health {
                    h.set_in_flight(self.in_flight, true);
                }
                Ok(())
            }
            Some(Completion::Failed {
                token,
                error,
                message,
            }) => {
                if let Some(note) = token.failure {
                    // The dead-letter record itself was rejected: nowhere left to put the row.
                    return Err(PipelineError::DeadLetter {
                        id: token.id.to_string(),
                        error: note.error,
                        cause: SinkError::Rejected {
                            id: token.id,
                            topic: message.topic,
                            reason: error,
                        },
                    });
                }
                let record = record::for_message(&self.config, &message, &error, token.attempt);
                self.poison(
                    token.tx_seq,
                    token.id.to_string(),
                    Some(record),
                    error,
                    token.attempt,
                    true,
                    token.emitted,
                )
                .await
            }
            Some(Completion::PostgresStopping(why)) => Err(PipelineError::PostgresStopping(why)),
            Some(Completion::SinkBroken(why)) => Err(match self.sink.fenced() {
                Some(fenced) => PipelineError::Fenced(fenced),
                None => PipelineError::SinkBroken(why),
            }),
        }
    }

    /// Processes completions until there is room for another message.
    pub async fn wait_for_capacity(&mut self) -> Result<(), PipelineError> {
        if !self.has_capacity() {
            self.commit_kafka_transaction().await?;
        }
        while !self.has_capacity() {
            let p = self.next_completion().await;
            self.on_completion(p).await?;
        }
        Ok(())
    }

    /// Processes completions until nothing is in flight or `timeout` passes; returns what is
    /// still in flight.
    pub async fn drain(&mut self, timeout: Duration) -> Result<usize, PipelineError> {
        self.commit_kafka_transaction().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight > 0 {
            match tokio::time::timeout_at(deadline, self.next_completion()).await {
                Ok(p) => self.on_completion(p).await?,
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
    use crate::replication::pgoutput::encode;
    use crate::routing::OutboxMessage;
    use bytes::Bytes;

    /// A sink that records what it is handed; completions are driven by the test. Messages for
    /// `refuse_topic` are refused, as a broker refuses a message it will never accept.
    #[derive(Default)]
    struct RecordingSink {
        sent: Vec<(OutboxMessage, AckToken)>,
        refuse_topic: Option<String>,
        refused: u32,
    }

    impl Sink for RecordingSink {
        async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
            if self.refuse_topic.as_deref() == Some(msg.topic.as_str()) {
                self.refused += 1;
                return Err(SinkError::Rejected {
                    id: msg.id,
                    topic: msg.topic.clone(),
                    reason: "Broker: Message size too large".into(),
                });
            }
            self.sent.push((msg.clone(), token));
            Ok(())
        }
        async fn flush(&mut self, _: Duration) -> usize {
            0
        }
    }

    /// The deliveries channel for tests that park nothing.
    fn no_parking() -> mpsc::UnboundedSender<Delivery> {
        mpsc::unbounded_channel().0
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
        let mut p = Pipeline::new(&config, RecordingSink::default(), no_parking(), rx);
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
        tx.send(Completion::Completed(vec![(seq_b, 1)])).unwrap();
        let next = p.next_completion().await;
        p.on_completion(next).await.unwrap();
        assert_eq!(p.flushable(), Lsn(10));
        assert!(p.has_capacity());
        tx.send(Completion::Completed(vec![(seq_a, 2)])).unwrap();
        assert_eq!(p.drain(Duration::from_secs(1)).await.unwrap(), 0);
        assert_eq!(p.flushable(), Lsn(210));
        assert_eq!(p.sink.sent[0].0.topic, "outbox.event.order");
    }

    #[tokio::test]
    async fn alter_table_is_followed_and_a_broken_shape_is_a_clear_error() {
        let config = Config::default();
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(&config, RecordingSink::default(), no_parking(), rx);
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

    fn poison_config(policy: PoisonPolicy) -> Config {
        let mut config = Config::default();
        config.dead_letter.policy = policy;
        config.retry.initial_delay_ms = 1;
        config.retry.max_delay_ms = 2;
        config
    }

    fn header<'a>(m: &'a OutboxMessage, name: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| &v[..])
    }

    #[tokio::test]
    async fn a_row_that_cannot_become_a_message_is_dead_lettered_and_the_stream_goes_on() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(
            &poison_config(PoisonPolicy::Dlq),
            RecordingSink::default(),
            no_parking(),
            rx,
        );
        let cols = &[
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "headers",
        ];
        feed(&mut p, encode::relation(1, "public", "outbox", cols)).await;
        feed(&mut p, encode::begin(10, 1)).await;
        let id = "00000000-0000-0000-0000-000000000042";
        let bad = [
            Some(id),
            Some("order"),
            Some("o-1"),
            Some("T"),
            Some("{}"),
            Some("{\"n\": 1}"),
        ];
        feed(&mut p, encode::insert(1, &bad)).await;
        let good = row(7);
        let vals: Vec<Option<&str>> = good.iter().map(|v| v.as_deref()).chain([None]).collect();
        feed(&mut p, encode::insert(1, &vals)).await;
        feed(&mut p, encode::commit(10, 20)).await;

        assert_eq!(
            p.sink.sent.len(),
            2,
            "the bad row's dead-letter record, then the good row"
        );
        let (dlq, token) = &p.sink.sent[0];
        assert_eq!(dlq.topic, "outbox.dlq");
        assert_eq!(dlq.id.to_string(), id);
        assert_eq!(&dlq.key[..], b"o-1");
        assert_eq!(
            header(dlq, "dlq.original_topic"),
            Some(&b"outbox.event.order"[..])
        );
        assert_eq!(header(dlq, "dlq.original_key"), Some(&b"o-1"[..]));
        let error = String::from_utf8_lossy(header(dlq, "dlq.error").unwrap()).into_owned();
        assert!(error.contains("object of strings"), "{error}");
        let note = token
            .failure
            .as_ref()
            .expect("marked as a dead-letter record");
        assert_eq!(note.error, error);
        assert_eq!(p.sink.sent[1].0.topic, "outbox.event.order");
        assert_eq!(p.in_flight(), 2);
        assert_eq!(p.counters.dead_lettered, 1);
    }

    #[tokio::test]
    async fn a_refused_message_is_retried_a_bounded_number_of_times_then_dead_lettered() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let sink = RecordingSink {
            refuse_topic: Some("outbox.event.order".into()),
            ..Default::default()
        };
        let mut p = Pipeline::new(&poison_config(PoisonPolicy::Dlq), sink, no_parking(), rx);
        feed(&mut p, encode::relation(1, "public", "outbox", COLS)).await;
        feed(&mut p, encode::begin(10, 1)).await;
        feed(&mut p, insert(1, 3)).await;
        assert_eq!(p.sink.refused, 3, "dead_letter.max_attempts sends");
        let (dlq, token) = &p.sink.sent[0];
        assert_eq!(dlq.topic, "outbox.dlq");
        assert_eq!(header(dlq, "dlq.attempts"), Some(&b"3"[..]));
        assert_eq!(header(dlq, "type"), Some(&b"Created"[..]));
        assert_eq!(token.failure.as_ref().unwrap().attempts, 3);
    }

    #[tokio::test]
    async fn a_delivery_rejected_later_is_dead_lettered_in_its_place() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(
            &poison_config(PoisonPolicy::Dlq),
            RecordingSink::default(),
            no_parking(),
            rx,
        );
        feed(&mut p, encode::relation(1, "public", "outbox", COLS)).await;
        feed(&mut p, encode::begin(10, 1)).await;
        feed(&mut p, insert(1, 3)).await;
        feed(&mut p, encode::commit(10, 20)).await;
        let (msg, mut token) = p.sink.sent[0].clone();
        token.attempt = 3;
        tx.send(Completion::Failed {
            token,
            error: "Broker: Invalid topic".into(),
            message: Box::new(msg),
        })
        .unwrap();
        let next = p.next_completion().await;
        p.on_completion(next).await.unwrap();
        assert_eq!(
            p.in_flight(),
            1,
            "the record replaces the message, it is not counted twice"
        );
        let (dlq, token) = &p.sink.sent[1];
        assert_eq!(dlq.topic, "outbox.dlq");
        assert_eq!(
            header(dlq, "dlq.original_topic"),
            Some(&b"outbox.event.order"[..])
        );
        let seq = token.tx_seq;
        tx.send(Completion::Completed(vec![(seq, 1)])).unwrap();
        assert_eq!(p.drain(Duration::from_secs(1)).await.unwrap(), 0);
        assert_eq!(p.flushable(), Lsn(20));
    }

    #[tokio::test]
    async fn halt_policy_stops_with_the_row_named_and_does_not_advance() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(
            &poison_config(PoisonPolicy::Halt),
            RecordingSink::default(),
            no_parking(),
            rx,
        );
        feed(&mut p, encode::relation(1, "public", "outbox", COLS)).await;
        feed(&mut p, encode::begin(10, 1)).await;
        feed(&mut p, insert(1, 3)).await;
        let (msg, token) = p.sink.sent[0].clone();
        let id = msg.id.to_string();
        tx.send(Completion::Failed {
            token,
            error: "too large".into(),
            message: Box::new(msg),
        })
        .unwrap();
        let next = p.next_completion().await;
        let err = p.on_completion(next).await.unwrap_err().to_string();
        assert!(
            err.contains("too large")
                && err.contains(&id)
                && err.contains("RELAY_DEAD_LETTER__POLICY"),
            "{err}"
        );
        assert_eq!(p.sink.sent.len(), 1, "nothing dead-lettered under halt");
        assert_eq!(p.flushable(), Lsn::ZERO);
    }

    #[tokio::test]
    async fn block_key_parks_later_rows_of_the_aggregate_and_lets_others_flow() {
        let (parked_tx, mut parked) = mpsc::unbounded_channel();
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(
            &poison_config(PoisonPolicy::BlockKey),
            RecordingSink::default(),
            parked_tx,
            rx,
        );
        let cols = &[
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "headers",
        ];
        let row = |id: &'static str, aggregate: &'static str, headers: Option<&'static str>| {
            [
                Some(id),
                Some("order"),
                Some(aggregate),
                Some("T"),
                Some("{}"),
                headers,
            ]
        };
        let (bad, held, other) = (
            "00000000-0000-0000-0000-000000000001",
            "00000000-0000-0000-0000-000000000002",
            "00000000-0000-0000-0000-000000000003",
        );
        feed(&mut p, encode::relation(1, "public", "outbox", cols)).await;
        feed(&mut p, encode::begin(10, 1)).await;
        feed(
            &mut p,
            encode::insert(1, &row(bad, "o-1", Some("{\"n\": 1}"))),
        )
        .await;
        feed(&mut p, encode::insert(1, &row(held, "o-1", None))).await;
        feed(&mut p, encode::insert(1, &row(other, "o-2", None))).await;
        feed(&mut p, encode::commit(10, 20)).await;

        assert_eq!(
            p.sink.sent.len(),
            1,
            "only the other aggregate's row is sent"
        );
        assert_eq!(p.sink.sent[0].0.id.to_string(), other);
        assert_eq!(p.in_flight(), 3, "parked rows complete once marked");
        let mut notes = Vec::new();
        while let Ok(Delivery::Acked(token)) = parked.try_recv() {
            notes.push((token.id.to_string(), token.failure.expect("marked failed")));
        }
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].0, bad);
        assert!(
            notes[0].1.error.contains("object of strings"),
            "{:?}",
            notes[0]
        );
        assert_eq!(notes[1].0, held);
        assert!(
            notes[1].1.error.contains("held back")
                && notes[1].1.error.contains("order/o-1")
                && notes[1].1.error.contains(bad),
            "{:?}",
            notes[1]
        );
        assert_eq!(p.counters.parked, 2);
        assert_eq!(p.blocked().len(), 1);

        // A redrive sends the (fixed) row although its aggregate is still blocked.
        let seq = p.begin_batch();
        let fixed = RawRow {
            id: Some(Bytes::from_static(bad.as_bytes())),
            aggregatetype: Some(Bytes::from_static(b"order")),
            aggregateid: Some(Bytes::from_static(b"o-1")),
            event_type: Some(Bytes::from_static(b"T")),
            payload: Some(Bytes::from_static(b"{}")),
            ..Default::default()
        };
        p.redrive_row(seq, fixed).await.unwrap();
        assert_eq!(p.sink.sent.len(), 2);
        assert_eq!(p.sink.sent[1].0.id.to_string(), bad);
    }

    #[test]
    fn a_legacy_covered_position_is_judged_by_the_server_the_state_table_names() {
        let config = Config {
            delivery: DeliveryMode::ExactlyOnce,
            ..Default::default()
        };
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut p = Pipeline::new(&config, RecordingSink::default(), no_parking(), rx);
        let legacy = SourcePosition {
            committed_end: Lsn(5_000),
            partial: None,
            origin: None,
        };
        p.set_covered(legacy);
        assert!(p.covers_without_origin());
        let a = Origin {
            system_id: 1,
            timeline: 1,
        };
        let b = Origin {
            system_id: 2,
            timeline: 1,
        };
        // The state table says the slot was streamed on A; the relay now reaches B.
        p.assume_covered_origin(Some(a));
        assert_eq!(p.enter_server(b, None), Some(Carried::Dropped));
        assert_eq!(
            p.committed_position().map(|c| c.committed_end),
            Some(Lsn::ZERO)
        );
        assert!(!p.covers_without_origin());

        // Nothing recorded: trusted, as relays before did.
        p.set_covered(legacy);
        p.assume_covered_origin(None);
        assert_eq!(p.enter_server(b, None), Some(Carried::Kept));
        assert_eq!(
            p.committed_position().map(|c| c.committed_end),
            Some(Lsn(5_000))
        );
        assert_eq!(p.committed_position().and_then(|c| c.origin), Some(b));
    }
}
