//! Kafka sink on rdkafka: idempotent producer with `acks=all`, confirmed sends, topic creation.
//!
//! Guarantees (see the trait's contract in `sink/mod.rs`): a message is reported `Acked` only from
//! librdkafka's delivery report, i.e. after every in-sync replica has it. librdkafka retries
//! transient errors itself, in order (idempotence keeps ordering and drops broker-side
//! duplicates); when it gives up on a transient error (`kafka.message_timeout_ms` > 0) this sink
//! sends the message again after an exponential backoff with jitter. Errors of the message itself
//! (too large, invalid topic name) are retried up to `dead_letter.max_attempts` sends, then
//! reported `Failed` with the message. Conditions of the broker (an authorization error while
//! ACLs roll out, a topic deleted under the relay) are retried without limit; a deleted topic is
//! looked up again and re-created when `kafka.create_topics` allows.
//!
//! At-least-once, `publish` never waits for the broker: a message for a known topic goes to
//! librdkafka at once; one for a topic not seen yet waits in the sink (in order, counted in
//! `flush`) while a task of its own looks the topic up and creates it; a message librdkafka
//! refuses at once goes to the retry task. The relay's and its admin client's metadata requests
//! never auto-create a topic (`allow.auto.create.topics=false`): topics are created by the relay,
//! with the configured partitions and replication, or not at all. A fatal producer
//! error (librdkafka's idempotence guard: the producer cannot go on without risking duplicates
//! or reordering) is not any message's fault: it is reported once as `Broken`, and the relay
//! replaces the producer.
//!
//! With `delivery = "exactly_once"` the producer is transactional (see [`crate::exactly_once::transactions`]):
//! messages go into a Kafka transaction that [`Sink::commit`] closes with the progress record;
//! their delivery reports are held until the commit succeeds and only then passed on. Nothing is
//! retried inside a transaction: any failure aborts it, and the relay re-reads it from the slot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::mpsc;

use super::{AckToken, Delivery, Sink, SinkError};
use super::{OutboxMessage, TxSeq};
use crate::config::{Config, DeliveryMode, KafkaConfig, RetryConfig};
use crate::exactly_once::position::SourcePosition;
use crate::exactly_once::transactions;
use crate::retry::backoff;

/// The transaction "sequence" of a progress record's delivery token: not a source transaction.
const PROGRESS_RECORD: TxSeq = TxSeq::MAX;

/// librdkafka properties the relay derives from its config.
pub fn producer_config(cfg: &KafkaConfig, max_in_flight: usize) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_size.to_string())
        .set("compression.type", &cfg.compression)
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.max_message_bytes.to_string())
        // The relay creates topics itself (kafka.create_topics, with the partitions and
        // replication it is told); a producer's metadata request must not create one with the
        // broker's defaults, nor bring back a deleted topic behind the relay's back.
        .set("allow.auto.create.topics", "false")
        // Room for everything the pipeline may have in flight, plus retries.
        .set(
            "queue.buffering.max.messages",
            (max_in_flight.saturating_mul(2)).max(100_000).to_string(),
        );
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    // librdkafka's `debug` contexts log at debug level; without this they would be filtered out.
    let level = if cfg.properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Warning
    };
    c.set_log_level(level);
    c
}

/// A client configuration for asking the brokers (`check`, the readiness probe): the relay's
/// bootstrap servers and properties, never creating a topic by asking about it.
pub fn probe_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    cc.set("allow.auto.create.topics", "false");
    cc
}

/// A message that failed transiently after librdkafka's own retries, waiting to be sent again.
struct RetryItem {
    code: Option<RDKafkaErrorCode>,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
    token: AckToken,
    error: String,
}

/// Receives librdkafka's callbacks: delivery reports, logs, global errors.
pub struct RelayContext {
    deliveries: mpsc::UnboundedSender<Delivery>,
    retries: mpsc::UnboundedSender<RetryItem>,
    retry_pending: Arc<AtomicUsize>,
    /// Sends of a message the broker rejects for good before it is reported `Failed`.
    max_attempts: u32,
    /// Set once the producer failed fatally and `Broken` was reported.
    broken: Arc<AtomicBool>,
    /// Metric handles, looked up once rather than per message.
    metrics: crate::metrics::AckMetrics,
    /// Exactly-once: every delivery report goes here, to be held until the transaction commits.
    transactional: Option<mpsc::UnboundedSender<Delivery>>,
}

impl RelayContext {
    /// Reports the producer broken, once.
    fn report_broken(&self, reason: String) {
        report_broken(&self.broken, &self.deliveries, reason);
    }
}

fn report_broken(
    broken: &AtomicBool,
    deliveries: &mpsc::UnboundedSender<Delivery>,
    reason: String,
) {
    if !broken.swap(true, Ordering::SeqCst) {
        tracing::error!(%reason, "the Kafka producer failed fatally; it will be replaced");
        let _ = deliveries.send(Delivery::Broken(reason));
    }
}

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.report_broken(reason.to_owned());
            return;
        }
        // librdkafka keeps retrying on its own; the relay keeps its position meanwhile.
        tracing::warn!(target: "librdkafka", %error, "broker problem (retrying): {reason}");
    }
}

/// Errors after which sending the same message again cannot succeed: the message itself is
/// refused (its size, its topic's name, its contents).
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | InvalidRecord
            | InvalidTopic
            | MessageBatchTooLarge
            | InvalidArgument
    )
}

/// The topic is gone from the broker (deleted, or never created): look it up (re-create it
/// when allowed) before sending again.
fn is_topic_gone(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        UnknownTopic | UnknownPartition | UnknownTopicOrPartition
    )
}

/// Conditions of the broker, not of the message: an ACL not rolled out yet, a deleted topic.
/// Retried without limit, never dead-lettered.
fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    is_topic_gone(code) || matches!(code, TopicAuthorizationFailed | ClusterAuthorizationFailed)
}

/// Errors librdkafka returns at once for one message, whatever the producer's state.
fn is_message_error(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | UnknownTopic
            | UnknownPartition
            | InvalidArgument
    )
}

fn error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = Box<AckToken>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<AckToken>) {
        let token = *token;
        if let Some(reports) = &self.transactional {
            let report = match result {
                Ok(_) => Delivery::Acked(token),
                Err((err, _)) if error_code(err) == Some(RDKafkaErrorCode::Fatal) => {
                    self.report_broken(err.to_string());
                    Delivery::Broken(err.to_string())
                }
                Err((err, msg)) => Delivery::Failed {
                    message: Box::new(owned_message(token.id, msg)),
                    token,
                    error: err.to_string(),
                },
            };
            let _ = reports.send(report);
            return;
        }
        let report = match result {
            Ok(_) => {
                self.metrics.acked(token.commit_time, token.handed_at);
                Delivery::Acked(token)
            }
            Err((err, _)) if error_code(err) == Some(RDKafkaErrorCode::Fatal) => {
                // Every outstanding message fails this way; the first one reports it.
                self.report_broken(err.to_string());
                return;
            }
            Err((err, msg)) => {
                let permanent = error_code(err).is_some_and(is_permanent);
                if !permanent || token.attempt < self.max_attempts {
                    self.retry_pending.fetch_add(1, Ordering::SeqCst);
                    metrics::counter!(crate::metrics::RETRIES, "stage" => "broker").increment(1);
                    let item = RetryItem {
                        code: error_code(err),
                        topic: msg.topic().to_owned(),
                        key: msg.key().map(<[u8]>::to_vec),
                        payload: msg.payload().map(<[u8]>::to_vec),
                        headers: msg.headers().map(|h| h.detach()),
                        token,
                        error: err.to_string(),
                    };
                    match self.retries.send(item) {
                        Ok(()) => return,
                        Err(mpsc::error::SendError(item)) => {
                            self.retry_pending.fetch_sub(1, Ordering::SeqCst);
                            // Shutting down: nobody is left to report to.
                            let _ = item;
                            return;
                        }
                    }
                }
                Delivery::Failed {
                    message: Box::new(owned_message(token.id, msg)),
                    token,
                    error: err.to_string(),
                }
            }
        };
        // The receiver is gone only while the relay shuts down; nothing to report to then.
        let _ = self.deliveries.send(report);
    }
}

/// Copies a rejected message out of librdkafka, for the dead-letter topic.
fn owned_message(id: uuid::Uuid, msg: &rdkafka::message::BorrowedMessage<'_>) -> OutboxMessage {
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|hdr| {
                    (
                        hdr.key.to_owned(),
                        bytes::Bytes::copy_from_slice(hdr.value.unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    OutboxMessage {
        id,
        topic: msg.topic().to_owned(),
        key: bytes::Bytes::copy_from_slice(msg.key().unwrap_or_default()),
        payload: msg.payload().map(bytes::Bytes::copy_from_slice),
        headers,
    }
}

type RelayProducer = ThreadedProducer<RelayContext>;

/// The Kafka implementation of [`Sink`].
pub struct KafkaSink {
    producer: Arc<RelayProducer>,
    topics: Arc<Topics>,
    cfg: KafkaConfig,
    retry_cfg: RetryConfig,
    retry_pending: Arc<AtomicUsize>,
    broken: Arc<AtomicBool>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    /// Where a message librdkafka refused at once goes: the retry task.
    handoff: Handoff,
    /// `Some` with `delivery = "exactly_once"`.
    txn: Option<Transactions>,
}

/// What a task needs to send a message or pass it to the retry task.
#[derive(Clone)]
struct Handoff {
    producer: Weak<RelayProducer>,
    retries: mpsc::UnboundedSender<RetryItem>,
    /// Messages held by the sink outside librdkafka (waiting for a retry or for their topic).
    pending: Arc<AtomicUsize>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    broken: Arc<AtomicBool>,
}

impl Handoff {
    /// Sends `item` (counted in `pending`), waiting while librdkafka's queue is full (so what
    /// waits for one topic keeps its order); a refusal goes to the retry task, which backs off
    /// and reports the message `Failed` after `dead_letter.max_attempts` sends when the broker
    /// refuses it for good.
    async fn deliver(&self, mut item: RetryItem) {
        let Some(producer) = self.producer.upgrade() else {
            return; // the sink is gone: nobody is left to report to
        };
        match send_item(&producer, &mut item).await {
            Ok(()) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
            Err(e) => self.refused(&producer, item, &e),
        }
    }

    /// librdkafka refused `item` at once: a fatal error breaks the sink, anything else goes to
    /// the retry task.
    fn refused(&self, producer: &RelayProducer, mut item: RetryItem, e: &KafkaError) {
        if error_code(e) == Some(RDKafkaErrorCode::Fatal) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            report_broken(&self.broken, &self.deliveries, fatal_reason(producer, e));
            return;
        }
        item.code = error_code(e);
        item.error = e.to_string();
        if self.retries.send(item).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Looks `topic` up (creating it when missing and allowed) apart from the stream loop, then
/// sends what waited for it, in order; when the topic cannot be had (missing with
/// `kafka.create_topics` off, creation refused) the waiting messages are reported `Failed` with
/// the reason, for the poison path.
async fn resolve_topic(topics: Arc<Topics>, handoff: Handoff, topic: String) {
    let outcome = topics
        .ensure_fresh(&topic, topics.cfg.topic_partitions, false)
        .await;
    if let Err(SinkError::Closed(_)) = outcome {
        return; // the sink was dropped
    }
    loop {
        let waiting = topics.take_waiting(&topic, outcome.is_ok());
        if waiting.is_empty() {
            return;
        }
        for item in waiting {
            match &outcome {
                Ok(()) => handoff.deliver(item).await,
                Err(e) => {
                    handoff.pending.fetch_sub(1, Ordering::SeqCst);
                    report_failed(&handoff.deliveries, item, e.to_string());
                }
            }
        }
    }
}

/// The transactional side of an exactly-once sink.
struct Transactions {
    transactional_id: String,
    progress_topic: String,
    slot: String,
    /// Bound of each blocking transaction call (`transaction.timeout.ms`).
    timeout: Duration,
    /// Whether a Kafka transaction is open.
    open: bool,
    /// Records produced in the open transaction (the progress record included).
    sent: usize,
    /// Delivery reports of the open transaction, held until it commits.
    reports: mpsc::UnboundedReceiver<Delivery>,
    /// Acknowledgement metrics, recorded when a commit makes messages visible.
    metrics: crate::metrics::AckMetrics,
}

impl KafkaSink {
    /// Builds the producer; every message's outcome is sent to `deliveries`.
    pub fn new(
        config: &Config,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> Result<KafkaSink, KafkaError> {
        let (cfg, retry_cfg) = (&config.kafka, &config.retry);
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let retry_tx_sink = retry_tx.clone();
        let retry_pending = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let exactly_once = config.delivery == DeliveryMode::ExactlyOnce;
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let ctx = RelayContext {
            deliveries: deliveries.clone(),
            retries: retry_tx,
            retry_pending: retry_pending.clone(),
            max_attempts: config.dead_letter.max_attempts,
            broken: broken.clone(),
            metrics: crate::metrics::AckMetrics::new(),
            transactional: exactly_once.then_some(reports_tx),
        };
        let mut client_config = producer_config(cfg, config.pipeline.max_in_flight);
        if exactly_once {
            transactions::apply_transactional(&mut client_config, config);
        }
        let txn = exactly_once.then(|| Transactions {
            transactional_id: config.exactly_once.transactional_id.clone(),
            progress_topic: config.exactly_once.progress_topic.clone(),
            slot: config.postgres.slot.clone(),
            timeout: Duration::from_millis(config.exactly_once.transaction_timeout_ms),
            open: false,
            sent: 0,
            reports: reports_rx,
            metrics: crate::metrics::AckMetrics::new(),
        });
        let producer: RelayProducer = client_config.create_with_context(ctx)?;
        let producer = Arc::new(producer);
        let topics = Arc::new(Topics {
            admin: transactions::connection_config(config)
                .set("allow.auto.create.topics", "false")
                .create()?,
            producer: Arc::downgrade(&producer),
            cfg: cfg.clone(),
            retry_cfg: retry_cfg.clone(),
            known: std::sync::Mutex::new(HashMap::new()),
        });
        let handoff = Handoff {
            producer: Arc::downgrade(&producer),
            retries: retry_tx_sink,
            pending: retry_pending.clone(),
            deliveries: deliveries.clone(),
            broken: broken.clone(),
        };
        tokio::spawn(retry_loop(
            handoff.clone(),
            topics.clone(),
            retry_rx,
            backoff(retry_cfg),
            config.dead_letter.max_attempts,
        ));
        Ok(KafkaSink {
            producer,
            topics,
            cfg: cfg.clone(),
            retry_cfg: retry_cfg.clone(),
            retry_pending,
            broken,
            deliveries,
            handoff,
            txn,
        })
    }

    /// Exactly-once: makes sure the progress topic exists, fences any older relay with the same
    /// `transactional.id` (aborting its open transaction), then (if `read_position`) reads back
    /// the last position committed for this slot. `None` in at-least-once mode, before the first
    /// commit, or when not asked to read.
    pub async fn init_transactions(
        &mut self,
        config: &Config,
        read_position: bool,
    ) -> Result<Option<SourcePosition>, SinkError> {
        let Some(t) = &self.txn else {
            return Ok(None);
        };
        let (topic, timeout, id) = (
            t.progress_topic.clone(),
            t.timeout,
            t.transactional_id.clone(),
        );
        self.topics.ensure(&topic, 1, true).await?;
        let producer = self.producer.clone();
        let mut delays = backoff(&self.retry_cfg).with_max_times(8).build();
        loop {
            let p = producer.clone();
            let result = tokio::task::spawn_blocking(move || p.init_transactions(timeout))
                .await
                .map_err(|e| SinkError::Broken(format!("init_transactions task: {e}")))?;
            match result {
                Ok(()) => break,
                Err(KafkaError::Transaction(e)) if e.is_retriable() => match delays.next() {
                    Some(wait) => {
                        tracing::warn!(transactional_id = %id, error = %e, retry_in = ?wait, "cannot initialise Kafka transactions yet; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(SinkError::Broken(format!("init_transactions: {e}"))),
                },
                Err(e) => {
                    return Err(self.transaction_error("initialising transactions", e));
                }
            }
        }
        tracing::info!(transactional_id = %id, "Kafka transactions initialised (older relays with this id are fenced)");
        if !read_position {
            return Ok(None);
        }
        let config = config.clone();
        tokio::task::spawn_blocking(move || transactions::read_committed_position(&config, timeout))
            .await
            .map_err(|e| SinkError::Broken(format!("progress reader task: {e}")))?
            .map_err(SinkError::Closed)
    }

    /// At-least-once: takes `msg` without waiting for the broker. Its topic known, it goes to
    /// librdkafka at once (waiting only while librdkafka's own queue is full); otherwise it waits
    /// (in order, counted as pending) while a task of its own looks the topic up and creates it.
    /// A refusal goes to the retry task.
    async fn accept(&mut self, msg: &OutboxMessage, token: AckToken) {
        if !self.topics.is_known(&msg.topic) {
            self.retry_pending.fetch_add(1, Ordering::SeqCst);
            match self.topics.admit(retry_item(msg, token)) {
                Admit::SendNow(item) => self.handoff.deliver(*item).await,
                Admit::Queued => {}
                Admit::Resolve => {
                    tokio::spawn(resolve_topic(
                        self.topics.clone(),
                        self.handoff.clone(),
                        msg.topic.clone(),
                    ));
                }
            }
            return;
        }
        let sent = enqueue(
            &self.producer,
            &msg.topic,
            None,
            Some(&msg.key[..]),
            msg.payload.as_deref(),
            build_headers(&msg.headers),
            token,
        )
        .await;
        if let Err((e, token)) = sent {
            // Rare: hand it to the retry task (or report the producer broken).
            self.retry_pending.fetch_add(1, Ordering::SeqCst);
            self.handoff
                .refused(&self.producer, retry_item(msg, token), &e);
        }
    }

    /// What a failed transactional call means: fenced, or the producer is unusable.
    fn transaction_error(&self, what: &str, e: KafkaError) -> SinkError {
        let id = self
            .txn
            .as_ref()
            .map(|t| t.transactional_id.as_str())
            .unwrap_or_default();
        if error_code(&e).is_some_and(transactions::is_fencing) || self.fenced().is_some() {
            return SinkError::Fenced(format!(
                "{what} failed for transactional id '{id}': {}",
                fatal_reason(&self.producer, &e)
            ));
        }
        SinkError::Broken(format!("{what}: {}", fatal_reason(&self.producer, &e)))
    }

    /// Gathers the delivery reports of the open transaction's `sent` records.
    async fn gather_reports(&mut self) -> Result<Vec<Delivery>, SinkError> {
        let Some(t) = self.txn.as_mut() else {
            return Ok(Vec::new());
        };
        let mut reports = Vec::with_capacity(t.sent);
        let deadline = tokio::time::Instant::now() + t.timeout;
        while reports.len() < t.sent {
            match tokio::time::timeout_at(deadline, t.reports.recv()).await {
                Ok(Some(r)) => reports.push(r),
                Ok(None) | Err(_) => {
                    return Err(SinkError::Broken(format!(
                        "{} of {} delivery reports of the transaction did not come",
                        t.sent - reports.len(),
                        t.sent
                    )));
                }
            }
        }
        t.sent = 0;
        Ok(reports)
    }

    /// The open transaction failed with `e`: aborts it (nothing of it becomes visible) and says
    /// why; fenced and fatal errors cannot be aborted and are reported as such.
    async fn abort(&mut self, e: KafkaError) -> SinkError {
        let abortable = matches!(&e, KafkaError::Transaction(r) if r.txn_requires_abort())
            || !matches!(&e, KafkaError::Transaction(r) if r.is_fatal());
        if !abortable || self.fenced().is_some() {
            return self.transaction_error("the Kafka transaction", e);
        }
        // The first refused message says more than the state error a later call returns.
        let mut cause = e.to_string();
        if let Some(t) = &mut self.txn {
            while let Ok(report) = t.reports.try_recv() {
                if let Delivery::Failed { error, token, .. } = report {
                    cause = format!("message {} was refused: {error}", token.id);
                    break;
                }
            }
        }
        self.abort_with(cause).await
    }

    /// Aborts the open transaction, which failed because of `cause`.
    async fn abort_with(&mut self, cause: String) -> SinkError {
        if let Some(fenced) = self.fenced() {
            return SinkError::Fenced(fenced);
        }
        let Some(t) = &self.txn else {
            return SinkError::Aborted(cause);
        };
        let (producer, timeout) = (self.producer.clone(), t.timeout);
        tracing::warn!(error = %cause, "aborting the Kafka transaction; its messages will be sent again");
        let aborted =
            tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await;
        // The reports of an aborted transaction mean nothing; drop them.
        if let Some(t) = &mut self.txn {
            t.open = false;
            t.sent = 0;
            while t.reports.try_recv().is_ok() {}
        }
        match aborted {
            Ok(Ok(())) => SinkError::Aborted(cause),
            Ok(Err(abort_error)) => self.transaction_error(
                &format!("aborting the Kafka transaction (after: {cause})"),
                abort_error,
            ),
            Err(join) => SinkError::Broken(format!("abort task: {join}")),
        }
    }
}

/// The topics the sink knows exist, and how it makes sure of the others: shared by the sink
/// and its retry task (which re-creates a topic deleted under it).
struct Topics {
    admin: AdminClient<DefaultClientContext>,
    /// Lookups go through the producer's own client, so its metadata cache learns at once that
    /// a (re-)created topic exists.
    producer: Weak<RelayProducer>,
    cfg: KafkaConfig,
    retry_cfg: RetryConfig,
    known: std::sync::Mutex<HashMap<String, TopicState>>,
}

/// What the sink knows of a topic (absent: nothing yet).
enum TopicState {
    /// It exists: messages go straight to librdkafka.
    Ready,
    /// A task is looking it up (and creating it); messages wait here, in order.
    Resolving(VecDeque<RetryItem>),
}

/// What [`Topics::admit`] decided for a message.
enum Admit {
    /// The topic exists: send it now.
    SendNow(Box<RetryItem>),
    /// It waits for the topic's resolution, already under way.
    Queued,
    /// It waits, and nobody is resolving the topic yet: start that.
    Resolve,
}

impl Topics {
    fn is_known(&self, topic: &str) -> bool {
        self.known
            .lock()
            .is_ok_and(|k| matches!(k.get(topic), Some(TopicState::Ready)))
    }

    /// Takes `item` for its topic: to send now if the topic is known, else to wait (in order)
    /// for the topic's resolution.
    fn admit(&self, item: RetryItem) -> Admit {
        let Ok(mut known) = self.known.lock() else {
            return Admit::SendNow(Box::new(item)); // poisoned: librdkafka will say
        };
        match known.get_mut(&item.topic) {
            Some(TopicState::Ready) => Admit::SendNow(Box::new(item)),
            Some(TopicState::Resolving(waiting)) => {
                waiting.push_back(item);
                Admit::Queued
            }
            None => {
                let topic = item.topic.clone();
                known.insert(topic, TopicState::Resolving(VecDeque::from([item])));
                Admit::Resolve
            }
        }
    }

    /// The messages waiting for `topic`; when none are left, the topic is marked ready (if
    /// `ready`) or forgotten, so later messages go straight through or start a new resolution.
    fn take_waiting(&self, topic: &str, ready: bool) -> VecDeque<RetryItem> {
        let Ok(mut known) = self.known.lock() else {
            return VecDeque::new();
        };
        let waiting = match known.get_mut(topic) {
            Some(TopicState::Resolving(waiting)) => std::mem::take(waiting),
            _ => VecDeque::new(),
        };
        if waiting.is_empty() {
            if ready {
                known.insert(topic.to_owned(), TopicState::Ready);
            } else {
                known.remove(topic);
            }
        }
        waiting
    }

    /// The broker said the topic is gone: look it up (and create it, if allowed) before the
    /// next send.
    fn forget(&self, topic: &str) {
        if let Ok(mut k) = self.known.lock()
            && matches!(k.get(topic), Some(TopicState::Ready))
            && k.remove(topic).is_some()
        {
            tracing::warn!(
                topic,
                "the broker no longer knows the topic; looking it up again (and creating it, if kafka.create_topics allows)"
            );
        }
    }

    /// Whether `topic` exists, asked through the producer's client; retried while the brokers
    /// cannot answer. `Closed` once the sink is gone.
    async fn lookup(self: &Arc<Self>, topic: &str) -> Result<bool, SinkError> {
        let ask = || {
            let producer = self.producer.clone();
            let name = topic.to_owned();
            async move {
                let Some(producer) = producer.upgrade() else {
                    return Err((false, "the sink was dropped".to_owned()));
                };
                tokio::task::spawn_blocking(move || {
                    let md = producer
                        .client()
                        .fetch_metadata(Some(&name), Duration::from_secs(10))?;
                    Ok::<bool, KafkaError>(md.topics().iter().any(|t| {
                        t.name() == name && t.error().is_none() && !t.partitions().is_empty()
                    }))
                })
                .await
                .map_err(|e| (true, e.to_string()))?
                .map_err(|e| (true, e.to_string()))
            }
        };
        ask.retry(backoff(&self.retry_cfg))
            .when(|(retryable, _)| *retryable)
            .notify(|(_, e), d| {
                tracing::warn!(topic, error = %e, retry_in = ?d, "cannot read broker metadata; retrying")
            })
            .await
            .map_err(|(_, e)| SinkError::Closed(e))
    }

    /// Makes sure `topic` exists: looks it up (retrying while the brokers cannot answer), and
    /// creates it with `partitions` (compacted if `compacted`) when missing and allowed.
    async fn ensure(
        self: &Arc<Self>,
        topic: &str,
        partitions: i32,
        compacted: bool,
    ) -> Result<(), SinkError> {
        if self.is_known(topic) {
            return Ok(());
        }
        self.ensure_fresh(topic, partitions, compacted).await
    }

    /// [`Topics::ensure`] without asking what is known first.
    async fn ensure_fresh(
        self: &Arc<Self>,
        topic: &str,
        partitions: i32,
        compacted: bool,
    ) -> Result<(), SinkError> {
        let exists = self.lookup(topic).await?;
        if !exists {
            if !self.cfg.create_topics {
                return Err(SinkError::MissingTopic {
                    topic: topic.to_owned(),
                });
            }
            self.create(topic, partitions, compacted).await?;
            // The producer learns the new topic now, not at its next metadata refresh.
            let _ = self.lookup(topic).await;
        }
        if let Ok(mut k) = self.known.lock() {
            // A topic being resolved by its task stays so: the task sends what waits for it.
            k.entry(topic.to_owned()).or_insert(TopicState::Ready);
        }
        Ok(())
    }

    async fn create(&self, topic: &str, partitions: i32, compacted: bool) -> Result<(), SinkError> {
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.cfg.topic_replication_factor),
        );
        if compacted {
            new = new.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let create = || async {
            let results = self
                .admin
                .create_topics([&new], &opts)
                .await
                .map_err(|e| (true, e.to_string()))?;
            for r in results {
                match r {
                    Ok(_) => {}
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        let transient = matches!(
                            code,
                            RDKafkaErrorCode::RequestTimedOut
                                | RDKafkaErrorCode::NotController
                                | RDKafkaErrorCode::BrokerNotAvailable
                                | RDKafkaErrorCode::LeaderNotAvailable
                                | RDKafkaErrorCode::OperationTimedOut
                        );
                        return Err((transient, code.to_string()));
                    }
                }
            }
            Ok(())
        };
        create
            .retry(backoff(&self.retry_cfg).with_max_times(8))
            .when(|(transient, _)| *transient)
            .notify(|(_, e), d| {
                tracing::warn!(topic, error = %e, retry_in = ?d, "topic creation failed; retrying")
            })
            .await
            .map_err(|(_, reason)| SinkError::CreateTopic {
                topic: topic.to_owned(),
                reason: format!(
                    "{reason}; create it yourself (partitions {partitions}, replication {}{}) or check the \
                     broker's permissions",
                    self.cfg.topic_replication_factor,
                    if compacted { ", cleanup.policy=compact" } else { "" }
                ),
            })?;
        tracing::info!(
            topic,
            partitions,
            compacted,
            replication = self.cfg.topic_replication_factor,
            "created topic"
        );
        Ok(())
    }
}

/// `msg` as the sink holds it while it waits (for its topic, or for a retry).
fn retry_item(msg: &OutboxMessage, token: AckToken) -> RetryItem {
    RetryItem {
        code: None,
        topic: msg.topic.clone(),
        key: Some(msg.key.to_vec()),
        payload: msg.payload.as_ref().map(|p| p.to_vec()),
        headers: Some(build_headers(&msg.headers)),
        token,
        error: String::new(),
    }
}

fn build_headers(headers: &[(String, bytes::Bytes)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(&v[..]),
            })
        },
    )
}

/// Enqueues one record, waiting while librdkafka's local queue is full.
async fn enqueue(
    producer: &RelayProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    mut headers: OwnedHeaders,
    token: AckToken,
) -> Result<(), (KafkaError, AckToken)> {
    let mut token = Box::new(token);
    loop {
        let mut record = BaseRecord::with_opaque_to(topic, token).headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                token = record.delivery_opaque;
                headers = record.headers.unwrap_or_default();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, record)) => return Err((e, *record.delivery_opaque)),
        }
    }
}

/// Sends messages that failed transiently again, in the order they failed, after a backoff.
/// A message whose topic is gone has its topic looked up (and re-created, when allowed) first;
/// one the broker cannot take for now (authorization) is kept and tried again after a longer
/// backoff. Ends with the producer (it holds no strong reference while it waits: the producer's
/// context holds this loop's channel, so a strong one would keep both alive forever).
async fn retry_loop(
    handoff: Handoff,
    topics: Arc<Topics>,
    mut items: mpsc::UnboundedReceiver<RetryItem>,
    backoff: ExponentialBuilder,
    max_attempts: u32,
) {
    let Handoff {
        producer,
        pending,
        deliveries,
        broken,
        retries,
    } = handoff;
    // The loop's own sender would keep its channel open for ever.
    drop(retries);
    // Each message waits its own backoff: one retried for ever (an authorization error) does
    // not hold up the others.
    let mut waiting: Vec<(tokio::time::Instant, RetryItem)> = Vec::new();
    let schedule = |item: RetryItem, waiting: &mut Vec<(tokio::time::Instant, RetryItem)>| {
        let delay = backoff
            .build()
            .nth(item.token.attempt.saturating_sub(1) as usize)
            .unwrap_or(Duration::from_secs(1));
        tracing::warn!(
            id = %item.token.id,
            topic = %item.topic,
            attempt = item.token.attempt,
            error = %item.error,
            retry_in = ?delay,
            "delivery failed; sending again"
        );
        waiting.push((tokio::time::Instant::now() + delay, item));
    };
    loop {
        // The first of the earliest due (equal times keep the order they failed in).
        let next = waiting
            .iter()
            .enumerate()
            .min_by_key(|(i, (due, _))| (*due, *i))
            .map(|(i, (due, _))| (i, *due));
        let due_at = next.map(|(_, due)| due);
        tokio::select! {
            got = items.recv() => match got {
                Some(item) => schedule(item, &mut waiting),
                None => return,
            },
            _ = tokio::time::sleep_until(due_at.unwrap_or_else(tokio::time::Instant::now)), if due_at.is_some() => {}
        }
        let Some((i, due)) = next else { continue };
        if due > tokio::time::Instant::now() {
            continue;
        }
        if producer.strong_count() == 0 {
            return; // the sink was dropped (shutdown, or a broken producer replaced)
        }
        let (_, mut item) = waiting.remove(i);
        item.token.attempt += 1;
        if item.code.is_some_and(is_topic_gone) {
            topics.forget(&item.topic);
            if let Err(e) = topics
                .ensure(&item.topic, topics.cfg.topic_partitions, false)
                .await
            {
                // Not allowed to create it (or the broker refuses): the poison path says why.
                pending.fetch_sub(1, Ordering::SeqCst);
                report_failed(&deliveries, item, e.to_string());
                continue;
            }
        }
        let Some(producer) = producer.upgrade() else {
            return;
        };
        match send_item(&producer, &mut item).await {
            Ok(()) => {
                pending.fetch_sub(1, Ordering::SeqCst);
            }
            Err(e) if error_code(&e) == Some(RDKafkaErrorCode::Fatal) => {
                pending.fetch_sub(1, Ordering::SeqCst);
                report_broken(&broken, &deliveries, fatal_reason(&producer, &e));
            }
            // Refused for the message itself, `dead_letter.max_attempts` times: the poison path.
            Err(e)
                if error_code(&e).is_some_and(is_permanent)
                    && item.token.attempt >= max_attempts =>
            {
                pending.fetch_sub(1, Ordering::SeqCst);
                report_failed(&deliveries, item, e.to_string());
            }
            Err(e) => {
                item.code = error_code(&e);
                item.error = e.to_string();
                schedule(item, &mut waiting);
            }
        }
    }
}

/// Sends a held message, waiting while librdkafka's queue is full; on a refusal the message
/// keeps its headers for the next try.
async fn send_item(producer: &RelayProducer, item: &mut RetryItem) -> Result<(), KafkaError> {
    let headers = item.headers.take().unwrap_or_default();
    let sent = enqueue(
        producer,
        &item.topic,
        None,
        item.key.as_deref(),
        item.payload.as_deref(),
        headers.clone(),
        item.token.clone(),
    )
    .await;
    sent.map_err(|(e, _)| {
        item.headers = Some(headers);
        e
    })
}

/// Reports a message the retry task gives up on, for the poison path.
fn report_failed(deliveries: &mpsc::UnboundedSender<Delivery>, item: RetryItem, error: String) {
    let headers = item.headers.unwrap_or_default();
    let message = OutboxMessage {
        id: item.token.id,
        topic: item.topic,
        key: item.key.map(bytes::Bytes::from).unwrap_or_default(),
        payload: item.payload.map(bytes::Bytes::from),
        headers: headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    bytes::Bytes::copy_from_slice(h.value.unwrap_or_default()),
                )
            })
            .collect(),
    };
    let _ = deliveries.send(Delivery::Failed {
        token: item.token,
        error,
        message: Box::new(message),
    });
}

/// The producer's own account of a fatal error, or `e`.
fn fatal_reason(producer: &RelayProducer, e: &KafkaError) -> String {
    producer
        .client()
        .fatal_error()
        .map(|(code, reason)| format!("{code}: {reason}"))
        .unwrap_or_else(|| e.to_string())
}

impl Sink for KafkaSink {
    async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(SinkError::Broken(fatal_reason(
                &self.producer,
                &KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
            )));
        }
        if self.txn.is_none() {
            self.accept(msg, token).await;
            return Ok(());
        }
        self.topics
            .ensure(&msg.topic, self.cfg.topic_partitions, false)
            .await?;
        if let Some(t) = &mut self.txn
            && !t.open
        {
            self.producer
                .begin_transaction()
                .map_err(|e| self.transaction_error("begin_transaction", e))?;
            if let Some(t) = &mut self.txn {
                t.open = true;
            }
        }
        let result = enqueue(
            &self.producer,
            &msg.topic,
            None,
            Some(&msg.key[..]),
            msg.payload.as_deref(),
            build_headers(&msg.headers),
            token,
        )
        .await;
        match result {
            Ok(()) => {
                if let Some(t) = &mut self.txn {
                    t.sent += 1;
                }
                Ok(())
            }
            Err((e, _)) if error_code(&e) == Some(RDKafkaErrorCode::Fatal) => {
                if let Some(why) = self.fenced() {
                    return Err(SinkError::Fenced(why));
                }
                let reason = fatal_reason(&self.producer, &e);
                report_broken(&self.broken, &self.deliveries, reason.clone());
                Err(SinkError::Broken(reason))
            }
            // Inside a transaction, a send refused for anything but the message itself (the
            // transaction already failed: librdkafka's "Erroneous state") means abort.
            Err((e, _)) if self.txn.is_some() && !error_code(&e).is_some_and(is_message_error) => {
                Err(self.abort(e).await)
            }
            Err((e, _)) if error_code(&e).is_some_and(is_unavailable) => {
                if error_code(&e).is_some_and(is_topic_gone) {
                    self.topics.forget(&msg.topic);
                }
                Err(SinkError::Unavailable {
                    topic: msg.topic.clone(),
                    reason: e.to_string(),
                })
            }
            Err((e, _)) => Err(SinkError::Rejected {
                id: msg.id,
                topic: msg.topic.clone(),
                reason: e.to_string(),
            }),
        }
    }

    async fn commit(&mut self, position: SourcePosition) -> Result<(), SinkError> {
        let Some(t) = &self.txn else {
            return Ok(());
        };
        if !t.open {
            return Ok(());
        }
        let (topic, key, timeout) = (t.progress_topic.clone(), t.slot.clone(), t.timeout);
        let value = position.to_record(&t.slot, &t.transactional_id);
        let token = AckToken::new(PROGRESS_RECORD, uuid::Uuid::nil());
        // Partition 0, where the reader looks, whatever the topic's partition count.
        let queued = enqueue(
            &self.producer,
            &topic,
            Some(0),
            Some(key.as_bytes()),
            Some(&value),
            OwnedHeaders::new(),
            token,
        )
        .await;
        if let Err((e, _)) = queued {
            return Err(self.abort(e).await);
        }
        if let Some(t) = &mut self.txn {
            t.sent += 1;
        }
        // Every record's report first: a refused one means abort, and once all are in,
        // commit_transaction has nothing left to flush (rdkafka's flush there polls in steps of
        // 100 ms while the producer's own thread serves the reports: +100 ms per commit).
        let reports = self.gather_reports().await?;
        if let Some(Delivery::Failed { token, error, .. }) = reports
            .iter()
            .find(|r| matches!(r, Delivery::Failed { .. }))
        {
            let cause = format!("message {} was refused: {error}", token.id);
            return Err(self.abort_with(cause).await);
        }
        // librdkafka may still hold the reports' events for a moment; rdkafka's flush would
        // then wait out a 100 ms poll.
        let settle = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.producer.in_flight_count() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut delays = backoff(&self.retry_cfg).with_max_times(8).build();
        let committed = loop {
            let producer = self.producer.clone();
            let result = tokio::task::spawn_blocking(move || producer.commit_transaction(timeout))
                .await
                .map_err(|e| SinkError::Broken(format!("commit task: {e}")))?;
            match result {
                Err(KafkaError::Transaction(e)) if e.is_retriable() => match delays.next() {
                    Some(wait) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "Kafka transaction commit did not complete; retrying");
                        tokio::time::sleep(wait).await;
                    }
                    None => break Err(KafkaError::Transaction(e)),
                },
                other => break other,
            }
        };
        if let Err(e) = committed {
            return Err(self.abort(e).await);
        }
        let Some(t) = &mut self.txn else {
            return Ok(());
        };
        t.open = false;
        for report in reports {
            // A commit succeeds only when every record of the transaction was delivered.
            if let Delivery::Acked(token) = report
                && token.tx_seq != PROGRESS_RECORD
            {
                t.metrics.acked(token.commit_time, token.handed_at);
                // The receiver is gone only while the relay shuts down.
                let _ = self.deliveries.send(Delivery::Acked(token));
            }
        }
        Ok(())
    }

    fn fenced(&self) -> Option<String> {
        let t = self.txn.as_ref()?;
        let (code, reason) = self.producer.client().fatal_error()?;
        transactions::is_fencing(code).then(|| {
            format!(
                "transactional id '{}' is now used by a newer producer ({reason})",
                t.transactional_id
            )
        })
    }

    async fn flush(&mut self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let outstanding = usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
                + self.retry_pending.load(Ordering::SeqCst);
            if outstanding == 0 || tokio::time::Instant::now() >= deadline {
                return outstanding;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_is_confirmed_and_idempotent_whatever_the_passthrough() {
        let mut cfg = KafkaConfig::default();
        cfg.properties
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = producer_config(&cfg, 10_000);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        assert!(is_permanent(RDKafkaErrorCode::MessageSizeTooLarge));
        // An ACL not rolled out yet, a deleted topic: the broker's condition, not the row's.
        for code in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(!is_permanent(code) && is_unavailable(code), "{code:?}");
        }
        assert!(!is_permanent(RDKafkaErrorCode::NotEnoughReplicas));
        assert!(!is_permanent(RDKafkaErrorCode::RequestTimedOut));
        assert!(!is_permanent(RDKafkaErrorCode::MessageTimedOut));
    }
}
