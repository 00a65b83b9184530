//! Destinations for outbox messages: one small trait, one module per broker.
//!
//! ## The contract of a [`Sink`]
//! - **At-least-once.** Once [`Sink::publish`] returns `Ok`, the sink owns the message: it reports
//!   exactly one [`Delivery`] for it on the channel it was built with — `Acked` only after the
//!   broker confirmed it durably (for Kafka: `acks=all`, idempotent producer), or `Failed` when
//!   the broker rejected it for good (after a bounded number of sends), with the message so the
//!   caller can dead-letter it. Transient failures are the sink's to retry (with backoff, without
//!   limit); they never surface as `Failed`.
//! - **Duplicates are tolerated.** After a crash the relay hands a sink messages it may already
//!   have delivered; every message carries its row id (header `id`) so consumers can deduplicate.
//! - **Order.** Messages with the same key are handed over in commit order; a sink must not
//!   reorder them while nothing fails.
//! - Completions may arrive in any order; the pipeline's watermark restores commit order.
//! - **A broken sink is not a bad row.** When the client itself can no longer deliver anything
//!   (librdkafka's fatal idempotence errors), the sink reports [`Delivery::Broken`] once and
//!   `publish` returns [`SinkError::Broken`]; no message is reported `Failed` for it. The relay
//!   then drops the sink, builds a new one and re-reads everything unconfirmed from the slot.
//! - **Exactly-once sinks** (`delivery = "exactly_once"`) group what they are handed into broker
//!   transactions: [`Sink::commit`] commits everything handed over since the previous commit
//!   together with the source position it reaches, atomically, and only then reports those
//!   messages `Acked`. A transaction that cannot commit is aborted and `commit` fails: nothing of
//!   it becomes visible, and the caller re-reads it from its last committed position. A sink
//!   whose transactional identity was taken over by a newer relay reports [`SinkError::Fenced`];
//!   it must not be rebuilt (a new producer would fence the newer relay in turn).

mod confirm;
pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod rocketmq;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use crate::exactly_once::position::SourcePosition;

/// Sequence number the pipeline's watermark gives each source transaction, carried by its
/// messages' ack tokens.
pub type TxSeq = u64;

/// A message ready for a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// The row's id: globally unique, the consumer's deduplication key.
    pub id: Uuid,
    pub topic: String,
    pub key: Bytes,
    /// `None` for a NULL payload (a tombstone).
    pub payload: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
}

/// Travels with a message through the sink and comes back in its [`Delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken {
    /// The Postgres transaction (watermark sequence) the message belongs to.
    pub tx_seq: TxSeq,
    /// The outbox row id, for marking the row delivered.
    pub id: Uuid,
    /// Send attempts so far (1 on the first send).
    pub attempt: u32,
    /// The inserting transaction's id, for rows read from the WAL (the marking stage asks
    /// Postgres whether it is still in progress when the row is not visible yet).
    pub xid: Option<u32>,
    /// The row's `seq` (insertion order) when known: what the delivery ledger records.
    pub row_seq: Option<i64>,
    /// A table-less outbox message (`pg_logical_emit_message`): nothing to mark, delivered or
    /// failed; the slot (and, exactly-once, the progress record) is its delivery record.
    pub emitted: bool,
    /// The inserting transaction's commit time (microseconds since 2000-01-01 UTC, Postgres'
    /// epoch), for rows read from the WAL: the commit → acknowledgement latency metric.
    pub commit_time: Option<i64>,
    /// When the pipeline first handed the message to the broker client (rows read from the
    /// WAL): the `broker` stage of the latency split.
    pub handed_at: Option<std::time::Instant>,
    /// Set when the row is to be marked failed (not delivered) with this note once the report
    /// comes back: on a poison row's dead-letter record, after the broker confirms it, and on a
    /// row parked under the `block_key` policy, which is reported at once without a send.
    pub failure: Option<Box<FailureNote>>,
    /// RocketMQ: the half message holding this row's message, committed once the row is marked
    /// (see [`rocketmq`]).
    pub half: Option<Box<rocketmq::HalfRef>>,
}

impl AckToken {
    pub fn new(tx_seq: TxSeq, id: Uuid) -> Self {
        AckToken {
            tx_seq,
            id,
            attempt: 1,
            xid: None,
            row_seq: None,
            emitted: false,
            commit_time: None,
            handed_at: None,
            failure: None,
            half: None,
        }
    }
}

/// Why a row failed (dead-lettered or parked), recorded on the row: `last_error`, `attempts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureNote {
    pub error: String,
    pub attempts: u32,
}

/// The outcome of one published message.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Acked(AckToken),
    /// Rejected for good; `message` is what was sent, for the dead-letter topic.
    Failed {
        token: AckToken,
        error: String,
        message: Box<OutboxMessage>,
    },
    /// The sink can deliver nothing more (e.g. the producer hit a fatal error); the reports of
    /// messages still outstanding will not come. Sent once.
    Broken(String),
}

/// A sink could not take a message; retrying the same call will not help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "topic '{topic}' does not exist and kafka.create_topics is off; create it on the broker or set RELAY_KAFKA__CREATE_TOPICS=true"
    )]
    MissingTopic { topic: String },
    #[error("cannot create topic '{topic}': {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("broker refused message {id} for topic '{topic}': {reason}")]
    Rejected {
        id: Uuid,
        topic: String,
        reason: String,
    },
    #[error(
        "the broker cannot take messages for topic '{topic}' now: {reason}; retrying (check the \
         relay's ACLs, or whether the topic was deleted)"
    )]
    Unavailable { topic: String, reason: String },
    #[error("the sink has stopped: {0}")]
    Closed(String),
    #[error("the producer failed and can send nothing more: {0}")]
    Broken(String),
    #[error("the transaction was aborted and will be sent again: {0}")]
    Aborted(String),
    #[error("{0}")]
    Fenced(String),
}

/// A broker the relay publishes to. See the module documentation for the contract.
pub trait Sink: Send {
    /// Hands one message over and reports its outcome later. Never waits for the broker's
    /// acknowledgement; a sink may wait for room in its queue or for a one-time setup (the
    /// RocketMQ sink's send of a half message, an exactly-once sink's topic lookup): the stream
    /// loop runs every call guarded, so such waits hold up WAL reading, never status updates,
    /// SIGTERM or the leader check.
    fn publish(
        &mut self,
        msg: &OutboxMessage,
        token: AckToken,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Waits up to `timeout` for every handed-over message to be reported; returns how many
    /// are still outstanding.
    fn flush(&mut self, timeout: Duration) -> impl Future<Output = usize> + Send;

    /// Exactly-once sinks: commits every message handed over since the last commit together
    /// with `position`; see the module documentation. Others have nothing to commit.
    fn commit(
        &mut self,
        position: SourcePosition,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = position;
        async { Ok(()) }
    }

    /// Why the sink was fenced by a newer instance, if it was.
    fn fenced(&self) -> Option<String> {
        None
    }
}

/// The sink the configuration names (`sink`), behind one type for the pipeline.
// One value per relay, never moved in a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnySink {
    Kafka(kafka::KafkaSink),
    Rocketmq(rocketmq::RocketMqSink),
    Nats(nats::NatsSink),
    Rabbitmq(rabbitmq::RabbitmqSink),
}

impl Sink for AnySink {
    async fn publish(&mut self, msg: &OutboxMessage, token: AckToken) -> Result<(), SinkError> {
        match self {
            AnySink::Kafka(s) => s.publish(msg, token).await,
            AnySink::Rocketmq(s) => s.publish(msg, token).await,
            AnySink::Nats(s) => s.publish(msg, token).await,
            AnySink::Rabbitmq(s) => s.publish(msg, token).await,
        }
    }

    async fn flush(&mut self, timeout: Duration) -> usize {
        match self {
            AnySink::Kafka(s) => s.flush(timeout).await,
            AnySink::Rocketmq(s) => s.flush(timeout).await,
            AnySink::Nats(s) => s.flush(timeout).await,
            AnySink::Rabbitmq(s) => s.flush(timeout).await,
        }
    }

    async fn commit(&mut self, position: SourcePosition) -> Result<(), SinkError> {
        match self {
            AnySink::Kafka(s) => s.commit(position).await,
            AnySink::Rocketmq(s) => s.commit(position).await,
            AnySink::Nats(s) => s.commit(position).await,
            AnySink::Rabbitmq(s) => s.commit(position).await,
        }
    }

    fn fenced(&self) -> Option<String> {
        match self {
            AnySink::Kafka(s) => s.fenced(),
            AnySink::Rocketmq(s) => s.fenced(),
            AnySink::Nats(s) => s.fenced(),
            AnySink::Rabbitmq(s) => s.fenced(),
        }
    }
}
