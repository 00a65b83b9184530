//! Configuration: defaults in code < a TOML file < `RELAY_...` environment variables.
//!
//! Nesting in environment names uses `__`: `RELAY_POSTGRES__URL` sets `postgres.url`. Every key has
//! a default here, a commented line in `config/relay.toml`, and a validation that says how to fix a
//! bad value. This room is a leaf: it uses nothing else of the relay but the SQL quoting leaf
//! (`postgres::quote`), for the table names it renders.

mod template;

pub use template::TopicTemplate;

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where messages go: `kafka` (default) or `rocketmq` (transactional messages; see
    /// [`RocketmqConfig`]).
    pub sink: SinkKind,
    /// `at_least_once` (default) or `exactly_once` (Kafka transactions; see [`ExactlyOnceConfig`]).
    pub delivery: DeliveryMode,
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    pub dead_letter: DeadLetterConfig,
    pub retry: RetryConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub exactly_once: ExactlyOnceConfig,
    pub http: HttpConfig,
    pub transactions: TransactionsConfig,
    pub rocketmq: RocketmqConfig,
    pub nats: NatsConfig,
    pub rabbitmq: RabbitmqConfig,
    pub health: HealthConfig,
    /// `RELAY_*` environment variables that name no configuration key (Kubernetes injects
    /// `RELAY_SERVICE_HOST`, `RELAY_PORT`, … for a Service named `relay`): ignored, and logged
    /// once at start.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// Readiness beyond "streaming and the broker answers".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/readyz` turns 503 when messages are in flight and none has completed (acknowledged and
    /// marked) for this long, in milliseconds (0: never).
    pub stall_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { stall_ms: 120_000 }
    }
}

/// The top-level keys of [`Config`]: a `RELAY_*` variable whose first segment is none of these
/// is not meant for the relay.
const TOP_LEVEL_KEYS: &[&str] = &[
    "sink",
    "delivery",
    "postgres",
    "outbox",
    "kafka",
    "pipeline",
    "dead_letter",
    "retry",
    "log",
    "metrics",
    "retention",
    "exactly_once",
    "http",
    "transactions",
    "rocketmq",
    "nats",
    "rabbitmq",
    "health",
];

/// `sink = "rabbitmq"`: AMQP 0-9-1 with publisher confirms. Each message is published persistent
/// and `mandatory` to `exchange` with the routing key `routing_key` renders; it counts as sent
/// when the broker confirms it, and comes back as a poison message when no queue is bound for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitmqConfig {
    /// `amqp://user:password@host:5672/vhost` (`amqps://` for TLS; vhost `/` is `%2f`). A secret
    /// when it holds a password: set it with RELAY_RABBITMQ__URL_FILE.
    pub url: String,
    /// The exchange rows are published to.
    pub exchange: String,
    /// Its type when the relay declares it: `topic`, `direct`, `fanout` or `headers`.
    pub exchange_type: String,
    /// Declare the exchange (durable) and the dead-letter queue (`dead_letter.topic`, durable) at
    /// start; an existing one is left as it is (a different type is an error).
    pub declare: bool,
    /// The routing key: `{aggregatetype}`, `{aggregateid}` and `{type}` are replaced.
    pub routing_key: String,
    /// Messages larger than this are refused by the relay (dead-lettered) before they reach the
    /// broker; set it to the broker's `max_message_size` (RabbitMQ 4: 16 MiB, 3.x: 128 MiB).
    pub max_message_bytes: usize,
    /// How long a publish waits for its confirm before it is sent again (ms).
    pub ack_timeout_ms: u64,
}

impl Default for RabbitmqConfig {
    fn default() -> Self {
        RabbitmqConfig {
            url: String::new(),
            exchange: "outbox".into(),
            exchange_type: "topic".into(),
            declare: true,
            routing_key: "{aggregatetype}.{type}".into(),
            max_message_bytes: 16 << 20,
            ack_timeout_ms: 10_000,
        }
    }
}

/// `sink = "nats"`: NATS JetStream. Each message is published to the subject the routing gives
/// (`kafka.topic_template`, default `outbox.event.{aggregatetype}`) and counts as sent once the
/// stream's PubAck arrives; `Nats-Msg-Id` is the outbox id, so JetStream drops resends inside the
/// stream's duplicate window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://host:4222`, `tls://host:4222`; user and password
    /// or a token may be given in the URL.
    pub url: String,
    /// A `.creds` file (JWT and NKey seed), for decentralized authentication.
    pub credentials_file: String,
    /// An NKey seed (`SU…`). A secret: set it with RELAY_NATS__NKEY_SEED_FILE.
    pub nkey_seed: String,
    /// A token. A secret: set it with RELAY_NATS__TOKEN_FILE.
    pub token: String,
    /// A PEM file of the authorities the server's certificate is verified against (TLS).
    pub tls_ca_file: String,
    /// Refuse a connection without TLS.
    pub tls_required: bool,
    /// Create the stream at start when it does not exist (an existing stream is left as it is).
    pub create_stream: bool,
    /// The stream the relay creates (and `check` looks at).
    pub stream: String,
    /// Its subjects, comma-separated; they must cover the routed subjects and the dead-letter
    /// subject (`dead_letter.topic`).
    pub stream_subjects: String,
    /// Its replicas (1 to 5).
    pub replicas: usize,
    /// Its duplicate window (ms): resends of a message id inside it are dropped by the server.
    pub duplicate_window_ms: u64,
    /// How long a publish waits for its PubAck before it is sent again (ms).
    pub ack_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: String::new(),
            credentials_file: String::new(),
            nkey_seed: String::new(),
            token: String::new(),
            tls_ca_file: String::new(),
            tls_required: false,
            create_stream: true,
            stream: "OUTBOX".into(),
            stream_subjects: "outbox.>".into(),
            replicas: 1,
            duplicate_window_ms: 120_000,
            ack_timeout_ms: 10_000,
        }
    }
}

impl NatsConfig {
    /// `stream_subjects`, trimmed, without empties.
    pub fn subjects(&self) -> Vec<String> {
        self.stream_subjects
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// RocketMQ check-backs: the relay answers them for these producer groups from the oracle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RocketmqConfig {
    /// Name server `host:port`; "" turns RocketMQ off.
    pub name_server: String,
    /// Producer groups whose check-backs the relay answers, comma-separated.
    pub producer_groups: String,
    /// The message property holding the transaction key; `KEYS`: the message's first key;
    /// `TRANSACTION_ID`: RocketMQ's transaction id (the message's unique client id).
    pub key_property: String,
    /// How often the relay re-registers with each broker (ms; brokers forget after 120 s).
    pub heartbeat_interval_ms: u64,
    /// The client id the relay registers with; "" for `outbox-relay@<host>-<pid>`.
    pub client_id: String,
    /// `sink = "rocketmq"`: the producer group the relay's own transactional messages belong to
    /// (the relay answers its check-backs too).
    pub producer_group: String,
    /// `sink = "rocketmq"`: create missing topics on every master broker.
    pub create_topics: bool,
    /// `sink = "rocketmq"`: read and write queues of the topics the relay creates.
    pub topic_queues: i32,
    /// ACL: the access key (user) every request to name servers and brokers is signed for;
    /// "" for brokers without ACL.
    pub access_key: String,
    /// ACL: the access key's secret. A secret: set it with RELAY_ROCKETMQ__SECRET_KEY_FILE.
    pub secret_key: String,
}

impl Default for RocketmqConfig {
    fn default() -> Self {
        RocketmqConfig {
            name_server: String::new(),
            producer_groups: String::new(),
            key_property: "KEYS".into(),
            heartbeat_interval_ms: 10_000,
            client_id: String::new(),
            producer_group: "outbox-relay".into(),
            create_topics: true,
            topic_queues: 4,
            access_key: String::new(),
            secret_key: String::new(),
        }
    }
}

impl RocketmqConfig {
    /// The producer groups whose check-backs the relay answers, trimmed, without empties or
    /// repeats: `producer_groups`, plus `producer_group` when `sink` is `rocketmq` (`own`).
    pub fn groups(&self, own: bool) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        let listed = self.producer_groups.split(',');
        let own = own.then_some(self.producer_group.as_str());
        for g in listed.chain(own).map(str::trim) {
            if !g.is_empty() && !groups.iter().any(|x| x == g) {
                groups.push(g.to_owned());
            }
        }
        groups
    }

    /// The name servers (`name_server` may list several, separated by `;` or `,`).
    pub fn name_servers(&self) -> Vec<String> {
        self.name_server
            .split([';', ','])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `client_id`, or `outbox-relay@<host>-<pid>`.
    pub fn client_id(&self) -> String {
        if !self.client_id.is_empty() {
            return self.client_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("outbox-relay@{host}-{}", std::process::id())
    }
}

/// The relay's admin HTTP listener: transaction checks (`GET /v1/transactions/{key}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// IP:port to listen on; "" turns the listener off.
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:8080".into(),
        }
    }
}

/// The transaction oracle (`sql/003_transactions.sql`), asked by broker check-backs and HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransactionsConfig {
    /// How long a check waits for a transaction in flight before answering unknown (ms).
    pub lock_timeout_ms: u64,
    /// Postgres connections the oracle uses at most (checks beyond wait for one).
    pub max_connections: usize,
    /// Keys older than this are purged (hours; 0: never). Must exceed the broker's check horizon.
    pub retention_hours: u64,
    /// How often the purge runs (ms).
    pub purge_interval_ms: u64,
    /// Where the oracle answers over HTTP (`GET /v1/transactions/{key}`, DTM's
    /// `/v1/dtm/query-prepared`): `host:port`, or empty (off, the default).
    pub http_addr: String,
    /// The bearer token every request to `http_addr` must present (at least 16 characters).
    /// A secret: set it with RELAY_TRANSACTIONS__HTTP_TOKEN_FILE.
    pub http_token: String,
    /// Checks served over HTTP at once (more get 503); below `max_connections`, so RocketMQ
    /// check-backs always keep an oracle connection.
    pub http_max_concurrent: usize,
    /// Requests a second over HTTP (more get 429).
    pub http_rate_per_sec: u32,
    /// Connections to `http_addr` at once (more wait to be accepted).
    pub http_max_connections: usize,
    /// A request is answered within this (ms); a connection lives at most six times it.
    pub http_timeout_ms: u64,
}

impl Default for TransactionsConfig {
    fn default() -> Self {
        TransactionsConfig {
            lock_timeout_ms: 2_000,
            max_connections: 4,
            retention_hours: 24,
            purge_interval_ms: 60_000,
            http_addr: String::new(),
            http_token: String::new(),
            http_max_concurrent: 2,
            http_rate_per_sec: 50,
            http_max_connections: 16,
            http_timeout_ms: 5_000,
        }
    }
}

/// The broker the relay publishes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Kafka (or any Kafka-protocol broker), through librdkafka.
    #[default]
    Kafka,
    /// RocketMQ transactional messages: each row's message becomes visible if and only if the
    /// row is marked delivered (the oracle decides what the relay could not say).
    Rocketmq,
    /// NATS JetStream: published with `Nats-Msg-Id`, sent once the stream's PubAck arrives.
    Nats,
    /// RabbitMQ (AMQP 0-9-1): persistent, mandatory, sent once the broker confirms it.
    Rabbitmq,
}

/// What the relay promises about each row's message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Every row reaches the broker at least once; after a crash, messages in flight are sent
    /// again (consumers deduplicate by the `id` header).
    #[default]
    AtLeastOnce,
    /// Messages are produced in Kafka transactions together with the relay's source position, so
    /// a `read_committed` consumer sees every row exactly once, across crashes.
    ExactlyOnce,
}

/// `delivery = "exactly_once"`: Kafka transactions with the source position inside them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExactlyOnceConfig {
    /// librdkafka `transactional.id`: stable for one relay deployment (one slot). A relay that
    /// starts with it fences any older one still running and aborts that one's open transaction.
    pub transactional_id: String,
    /// Compacted topic (one partition) holding each slot's last committed source position.
    pub progress_topic: String,
    /// A Kafka transaction is committed once it holds this many messages (at the end of the
    /// Postgres transaction that reaches it, or earlier when `pipeline.max_in_flight` is reached).
    pub batch_max_messages: usize,
    /// ... or once it has been open this long, in milliseconds.
    pub batch_max_ms: u64,
    /// librdkafka `transaction.timeout.ms`: the broker aborts a transaction open longer.
    pub transaction_timeout_ms: u64,
}

impl Default for ExactlyOnceConfig {
    fn default() -> Self {
        ExactlyOnceConfig {
            transactional_id: String::new(),
            progress_topic: "outbox-relay.progress".into(),
            batch_max_messages: 5_000,
            batch_max_ms: 100,
            transaction_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string; the relay opens one replication connection and one
    /// ordinary connection with it.
    pub url: String,
    /// Logical replication slot (pgoutput). Created on first start if missing.
    pub slot: String,
    /// Publication of the outbox table (`publish = 'insert, truncate'`).
    pub publication: String,
    /// Interval of standby status updates sent to Postgres, in milliseconds.
    pub status_interval_ms: u64,
    /// The replication connection counts as dead when Postgres sent nothing for this long
    /// although the relay was reading (ms; like libpq's `wal_receiver_timeout`). At half of it
    /// the relay asks the server for a reply. Also the socket's `TCP_USER_TIMEOUT`.
    pub replication_timeout_ms: u64,
    /// Create the slot as a failover slot (Postgres 17+: `FAILOVER`), so a standby with
    /// `sync_replication_slots = on` keeps a copy and the relay continues from it after a
    /// promotion; an existing slot is switched on. Ignored before Postgres 17.
    pub failover_slot: bool,
    /// The largest message the relay accepts from Postgres on the replication connection
    /// (bytes): a length announced above it stops the relay with this key named, instead of the
    /// relay reserving memory for it. Postgres sends at most 1 GiB.
    pub max_message_bytes: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@localhost:5432/postgres".into(),
            slot: "outbox_relay".into(),
            publication: "outbox_pub".into(),
            status_interval_ms: 10_000,
            replication_timeout_ms: 60_000,
            failover_slot: true,
            max_message_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Schema of the outbox table and the relay's state table.
    pub schema: String,
    /// The outbox table.
    pub table: String,
    /// Table where the relay records whether its first-start snapshot completed.
    pub state_table: String,
    /// What the relay writes once the broker confirmed a row: `record` (a range of `seq` in
    /// the delivery ledger, the row untouched), `mark` (`UPDATE ... SET delivered_at`) or
    /// `delete` (the row is deleted).
    pub on_delivered: OnDelivered,
    /// `record`: the delivery ledger (sql/005_delivery_ledger.sql), in `outbox.schema`.
    pub ledger_table: String,
    /// `record`: how often the ledger's low watermark (every seq below it delivered or failed)
    /// is moved up. It moves past a seq only two intervals after the seq was drawn at the
    /// earliest (see `delivered::Watermark`).
    pub watermark_interval_ms: u64,
    /// The prefix of table-less outbox messages (`pg_logical_emit_message(true, prefix, ...)`,
    /// written by `outbox_emit()` of sql/006_emit.sql); empty: messages are not read.
    pub message_prefix: String,
    pub columns: ColumnNames,
}

/// What marks a row delivered (`outbox.on_delivered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelivered {
    /// One ledger row per marking batch holding the batch's `seq` values as ranges: the outbox
    /// row is never updated (~1 us and ~0 B of WAL per row). Delivered state: `outbox_status`.
    Record,
    /// `UPDATE outbox SET delivered_at = now()` (the whole row rewritten into the WAL).
    Mark,
    /// `DELETE` the row (Debezium's pattern; failed rows stay, marked failed).
    Delete,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            schema: "public".into(),
            table: "outbox".into(),
            state_table: "outbox_relay_state".into(),
            on_delivered: OnDelivered::Record,
            ledger_table: "outbox_delivered".into(),
            watermark_interval_ms: 5_000,
            message_prefix: "outbox".into(),
            columns: ColumnNames::default(),
        }
    }
}

/// Column names of the outbox table. Defaults match Debezium's outbox event router.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnNames {
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: String,
    pub headers: String,
    pub topic: String,
    pub delivered_at: String,
    /// Failed send attempts of a poison row.
    pub attempts: String,
    /// Why a poison row could not be published.
    pub last_error: String,
    /// Set when a poison row went to the dead-letter topic.
    pub failed_at: String,
    /// Optional insertion-order column (`bigint generated always as identity`); orders the
    /// first-start snapshot. Without it the snapshot is ordered by `created_at` then physical order.
    pub seq: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        ColumnNames {
            id: "id".into(),
            aggregatetype: "aggregatetype".into(),
            aggregateid: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            topic: "topic".into(),
            delivered_at: "delivered_at".into(),
            attempts: "attempts".into(),
            last_error: "last_error".into(),
            failed_at: "failed_at".into(),
            seq: "seq".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Topic for rows whose `topic` column is empty. Placeholders: `{aggregatetype}`,
    /// `{aggregateid}`, `{type}`.
    pub topic_template: String,
    /// Topics rows may publish to, comma-separated: exact names, or prefixes ending in `*`
    /// (`payments,orders.*`). Empty: only topics starting with the template's text before its
    /// first placeholder (`outbox.event.` by default), whether from the template or the row's
    /// `topic` column. The dead-letter and progress topics and `__` topics are always refused.
    pub allowed_topics: String,
    /// Create a missing topic through the admin API before its first message.
    pub create_topics: bool,
    /// Partitions of topics the relay creates.
    pub topic_partitions: i32,
    /// Replication factor of topics the relay creates.
    pub topic_replication_factor: i32,
    /// librdkafka `linger.ms`.
    pub linger_ms: u64,
    /// librdkafka `batch.size` (bytes).
    pub batch_size: u64,
    /// librdkafka `compression.type`: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// librdkafka `message.timeout.ms`; 0 retries forever inside librdkafka (keeps order).
    pub message_timeout_ms: u64,
    /// librdkafka `client.id`.
    pub client_id: String,
    /// librdkafka `message.max.bytes`: the largest message the producer sends. Keep it at or
    /// below the broker's/topic's `max.message.bytes`; larger rows are dead-lettered.
    pub max_message_bytes: u64,
    /// Any other librdkafka property, passed through unchanged (`acks` and
    /// `enable.idempotence` cannot be weakened here).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic_template: "outbox.event.{aggregatetype}".into(),
            allowed_topics: String::new(),
            create_topics: true,
            topic_partitions: 1,
            topic_replication_factor: 1,
            linger_ms: 5,
            batch_size: 1_000_000,
            compression: "none".into(),
            message_timeout_ms: 0,
            client_id: "outbox-relay".into(),
            max_message_bytes: 1_000_000,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Messages handed to the broker but not yet confirmed (and marked). At this bound the relay
    /// stops reading WAL until acknowledgements catch up.
    pub max_in_flight: usize,
    /// Set `delivered_at` on each row after the broker confirmed it.
    pub mark_delivered: bool,
    /// Most ids per `UPDATE ... WHERE id = ANY($1)`.
    pub mark_batch_size: usize,
    /// Extra wait for more acknowledgements before a partial batch of marks is written, in
    /// milliseconds. 0: write as soon as the previous UPDATE finished (batches grow with load).
    pub mark_interval_ms: u64,
    /// Marking UPDATEs run at once, each on its own connection.
    pub mark_connections: usize,
    /// On SIGTERM/SIGINT, how long to wait for in-flight acknowledgements, in milliseconds.
    pub shutdown_timeout_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_in_flight: 10_000,
            mark_delivered: true,
            mark_batch_size: 1_000,
            mark_interval_ms: 0,
            mark_connections: 1,
            shutdown_timeout_ms: 30_000,
        }
    }
}

/// What happens to a row the broker will never accept (a poison row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Send it to the dead-letter topic, mark it failed, keep going.
    Dlq,
    /// Mark it failed and hold back later rows of the same aggregate (parked in the table) until
    /// it goes through; other aggregates keep flowing.
    BlockKey,
    /// Stop with a clear error; the slot does not advance past the row.
    Halt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// `dlq`, `block_key` or `halt`.
    pub policy: PoisonPolicy,
    /// Topic that receives poison rows, with the original topic, key, error and attempts as headers.
    pub topic: String,
    /// Sends of a message the broker rejects before it is dead-lettered (rows that cannot even
    /// be turned into a message go to the dead-letter topic at once).
    pub max_attempts: u32,
    /// `block_key` only: how often a blocked aggregate's failed row is tried again (read afresh
    /// from the table, so a fix by UPDATE takes effect), in milliseconds.
    pub block_retry_interval_ms: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            policy: PoisonPolicy::Dlq,
            topic: "outbox.dlq".into(),
            max_attempts: 3,
            block_retry_interval_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First delay of the exponential backoff (with jitter), in milliseconds.
    pub initial_delay_ms: u64,
    /// Cap of the backoff delay, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_delay_ms: 100,
            max_delay_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: String,
    /// Filter in `tracing` syntax, e.g. `info` or `outbox_relay=debug`. `RUST_LOG` overrides.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How often the slot's lag, retained WAL, `safe_wal_size` and the oldest undelivered row's
    /// age are read from Postgres for the gauges (ms).
    pub poll_interval_ms: u64,
    /// Log a warning and raise `outbox_relay_slot_retained_wal_warning` while the slot retains
    /// more WAL than this (bytes; 0: never).
    pub retained_wal_warn_bytes: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            poll_interval_ms: 10_000,
            retained_wal_warn_bytes: 1 << 30,
        }
    }
}

/// Housekeeping: delivered rows are deleted once they are older than the retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete rows delivered more than this long ago (hours; 0: keep them).
    pub delivered_hours: f64,
    /// How often the deletion runs (ms).
    pub interval_ms: u64,
    /// Rows per DELETE (each its own short transaction; rows locked by others are skipped).
    pub batch_size: i64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            delivered_hours: 24.0,
            interval_ms: 60_000,
            batch_size: 1_000,
        }
    }
}

/// The configuration could not be loaded or is invalid; the message names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist; pass an existing file to --config")]
    MissingFile { path: String },
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key {key} (env {env}) = {value:?} is invalid: {fix}")]
    Invalid {
        key: &'static str,
        env: String,
        value: String,
        fix: String,
    },
}

/// Whether an environment key (after `RELAY_`, lower-cased, `__` not yet split) belongs to a
/// configuration section: its first segment is a top-level key. Keys inside a known section
/// are still validated (a typo there is an error).
fn is_config_key(key: &str) -> bool {
    // Before figment's split the nesting is `__`, after it `.`.
    let first = key
        .split("__")
        .next()
        .and_then(|k| k.split('.').next())
        .unwrap_or_default()
        .to_ascii_lowercase();
    first == "config" || TOP_LEVEL_KEYS.contains(&first.as_str())
}

/// Of the environment variable names `vars`, the `RELAY_*` ones that name no configuration key.
fn foreign_env_keys(vars: impl Iterator<Item = String>) -> Vec<String> {
    let mut foreign: Vec<String> = vars
        .filter(|k| {
            k.strip_prefix("RELAY_")
                .is_some_and(|rest| !is_config_key(rest))
        })
        .collect();
    foreign.sort();
    foreign
}

/// `RELAY_…_FILE`: the variable names a file holding the value (the Docker and Kubernetes
/// secrets convention), for any key.
fn is_file_variant(key: &str) -> bool {
    key.len() > 5 && key[key.len() - 5..].eq_ignore_ascii_case("_file")
}

/// The values of every `RELAY_<KEY>_FILE` variable among `vars`, read from their files, as
/// (config path, value): one trailing newline is dropped. Setting both `RELAY_<KEY>` and
/// `RELAY_<KEY>_FILE`, or naming a file that cannot be read, is an error naming the variable.
fn secrets_from_files(
    vars: impl Iterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let vars: Vec<(String, String)> = vars.collect();
    let mut out = Vec::new();
    for (name, file) in &vars {
        let Some(rest) = name.strip_prefix("RELAY_") else {
            continue;
        };
        if !is_file_variant(rest) || !is_config_key(rest) {
            continue;
        }
        let direct = &name[..name.len() - 5];
        if vars.iter().any(|(n, _)| n == direct) {
            return Err(ConfigError::Load(format!(
                "both {direct} and {name} are set; keep one (the _FILE variant reads the value \
                 from a file)"
            )));
        }
        let mut value = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::Load(format!(
                "{name}={file}: cannot read the file ({e}); mount the secret there or unset {name}"
            ))
        })?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        let path = rest[..rest.len() - 5]
            .to_ascii_lowercase()
            .replace("__", ".");
        out.push((path, value));
    }
    Ok(out)
}

/// A character RocketMQ allows in topic and group names.
pub fn rocketmq_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')
}

/// Whether `name` is a valid RocketMQ group name.
pub fn rocketmq_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.chars().all(rocketmq_name_char)
}

/// The error for `key` set to `value`, with the fix.
fn invalid(key: &'static str, value: impl ToString, fix: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        env: env_name(key),
        value: value.to_string(),
        fix: fix.into(),
    }
}

/// The environment variable that sets `key`, e.g. `kafka.brokers` → `RELAY_KAFKA__BROKERS`.
pub fn env_name(key: &str) -> String {
    format!("RELAY_{}", key.to_uppercase().replace('.', "__"))
}

impl Config {
    /// Loads defaults, then `path` (or `config/relay.toml` if present), then `RELAY_*`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError::MissingFile {
                    path: p.display().to_string(),
                });
            }
            Some(p) => figment = figment.merge(Toml::file(p)),
            None => {
                let default = Path::new("config/relay.toml");
                if default.exists() {
                    figment = figment.merge(Toml::file(default));
                }
            }
        }
        let ignored_env = foreign_env_keys(std::env::vars().map(|(k, _)| k));
        figment = figment.merge(
            Env::prefixed("RELAY_")
                .split("__")
                .ignore(&["config"])
                .filter(|key| is_config_key(key.as_str()) && !is_file_variant(key.as_str())),
        );
        for (path, value) in secrets_from_files(std::env::vars())? {
            figment = figment.merge(Serialized::default(&path, value));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        config.ignored_env = ignored_env;
        // Environment variables cannot hold dots: RELAY_KAFKA__PROPERTIES__SASL_PASSWORD sets
        // `sasl.password` (librdkafka's property names have no underscores).
        config.kafka.properties = std::mem::take(&mut config.kafka.properties)
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        config.validate()?;
        Ok(config)
    }

    /// Checks every value a user can get wrong, naming the key and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_postgres()?;
        self.validate_outbox()?;
        self.validate_kafka()?;
        self.validate_exactly_once()?;
        self.validate_pipeline()?;
        self.validate_operations()?;
        self.validate_rocketmq()?;
        self.validate_nats()?;
        self.validate_rabbitmq()?;
        self.validate_log()?;
        Ok(())
    }

    /// Validates the replication and ordinary connections.
    fn validate_postgres(&self) -> Result<(), ConfigError> {
        let p = &self.postgres;
        let url = match crate::pgtls::split(&p.url) {
            Ok((url, tls)) => {
                // A certificate file that cannot be read fails here, naming it, not at connect.
                if tls.mode != crate::pgtls::SslMode::Disable
                    && let Err(fix) = tls.connector()
                {
                    return Err(invalid("postgres.url", redact_url(&p.url), fix));
                }
                url
            }
            Err(fix) => return Err(invalid("postgres.url", redact_url(&p.url), fix)),
        };
        if let Err(e) = url.parse::<tokio_postgres::Config>() {
            return Err(invalid(
                "postgres.url",
                redact_url(&p.url),
                format!(
                    "{e}; use a URL like postgres://user:password@host:5432/dbname \
                     (special characters in the password percent-encoded)"
                ),
            ));
        }
        let slot_ok = !p.slot.is_empty()
            && p.slot.len() <= 63
            && p.slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return Err(invalid(
                "postgres.slot",
                &p.slot,
                "slot names may contain only lower-case letters, digits and '_' (at most 63)",
            ));
        }
        if !(1024 * 1024..=(1 << 31) - 1).contains(&p.max_message_bytes) {
            return Err(invalid(
                "postgres.max_message_bytes",
                p.max_message_bytes,
                "use a size between 1048576 (1 MiB) and 2147483647 bytes; Postgres sends at \
                 most 1 GiB in one message",
            ));
        }
        if p.publication.is_empty() {
            return Err(invalid(
                "postgres.publication",
                "",
                "name the publication of the outbox table",
            ));
        }
        if p.status_interval_ms == 0 {
            return Err(invalid(
                "postgres.status_interval_ms",
                0,
                "must be at least 1; 10000 is usual, and it must stay below the server's wal_sender_timeout",
            ));
        }
        if p.replication_timeout_ms < 1_000 || p.replication_timeout_ms <= p.status_interval_ms {
            return Err(invalid(
                "postgres.replication_timeout_ms",
                p.replication_timeout_ms,
                "must be at least 1000 and above postgres.status_interval_ms; 60000 is usual \
                 (like wal_receiver_timeout)",
            ));
        }
        Ok(())
    }

    /// Validates table, column and topic names.
    fn validate_outbox(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("outbox.schema", &self.outbox.schema),
            ("outbox.table", &self.outbox.table),
            ("outbox.state_table", &self.outbox.state_table),
            ("outbox.ledger_table", &self.outbox.ledger_table),
            ("outbox.columns.id", &self.outbox.columns.id),
            (
                "outbox.columns.aggregatetype",
                &self.outbox.columns.aggregatetype,
            ),
            (
                "outbox.columns.aggregateid",
                &self.outbox.columns.aggregateid,
            ),
            ("outbox.columns.type", &self.outbox.columns.event_type),
            ("outbox.columns.payload", &self.outbox.columns.payload),
            ("outbox.columns.headers", &self.outbox.columns.headers),
            ("outbox.columns.topic", &self.outbox.columns.topic),
            (
                "outbox.columns.delivered_at",
                &self.outbox.columns.delivered_at,
            ),
            ("outbox.columns.attempts", &self.outbox.columns.attempts),
            ("outbox.columns.last_error", &self.outbox.columns.last_error),
            ("outbox.columns.failed_at", &self.outbox.columns.failed_at),
            ("outbox.columns.seq", &self.outbox.columns.seq),
            ("dead_letter.topic", &self.dead_letter.topic),
        ] {
            if v.is_empty() {
                return Err(invalid(key, "", "must not be empty"));
            }
        }
        Ok(())
    }

    /// Validates the Kafka sink.
    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if self.sink == SinkKind::Kafka && k.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                "",
                "list the bootstrap servers as host:port[,host:port]",
            ));
        }
        if let Err(fix) = TopicTemplate::parse(&k.topic_template) {
            return Err(invalid("kafka.topic_template", &k.topic_template, fix));
        }
        for entry in k.allowed_topics.split(',').map(str::trim) {
            let stem = entry.strip_suffix('*').unwrap_or(entry);
            if (entry.is_empty() && !k.allowed_topics.trim().is_empty()) || stem.contains('*') {
                return Err(invalid(
                    "kafka.allowed_topics",
                    &k.allowed_topics,
                    "list topic names or prefixes ending in '*', separated by commas \
                     (payments,orders.*); '*' only at the end",
                ));
            }
        }
        if k.topic_partitions < 1 {
            return Err(invalid(
                "kafka.topic_partitions",
                k.topic_partitions,
                "must be at least 1",
            ));
        }
        if k.topic_replication_factor < 1 && k.topic_replication_factor != -1 {
            return Err(invalid(
                "kafka.topic_replication_factor",
                k.topic_replication_factor,
                "must be at least 1 (or -1 for the broker's default)",
            ));
        }
        if !(1_000..=1_000_000_000).contains(&k.max_message_bytes) {
            return Err(invalid(
                "kafka.max_message_bytes",
                k.max_message_bytes,
                "must be between 1000 and 1000000000 (librdkafka's message.max.bytes range)",
            ));
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&k.compression.as_str()) {
            return Err(invalid(
                "kafka.compression",
                &k.compression,
                "expected one of none, gzip, snappy, lz4, zstd",
            ));
        }
        for (key, value) in &k.properties {
            let weakens = match key.as_str() {
                "acks" | "request.required.acks" => !matches!(value.as_str(), "all" | "-1"),
                "enable.idempotence" => value != "true",
                "transactional.id" => true,
                _ => false,
            };
            if weakens {
                return Err(ConfigError::Invalid {
                    key: "kafka.properties",
                    env: env_name("kafka.properties"),
                    value: format!("{key}={value}"),
                    fix: format!(
                        "the relay needs acks=all and enable.idempotence=true for confirmed \
                         sends, and sets transactional.id itself (from exactly_once.transactional_id \
                         when delivery = exactly_once); remove '{key}'"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Validates exactly-once delivery.
    fn validate_exactly_once(&self) -> Result<(), ConfigError> {
        if self.delivery == DeliveryMode::ExactlyOnce {
            let e = &self.exactly_once;
            if e.transactional_id.trim().is_empty() {
                return Err(invalid(
                    "exactly_once.transactional_id",
                    "",
                    "delivery = exactly_once needs a transactional id that stays the same across \
                     restarts of this relay (one per slot), e.g. outbox-relay-orders",
                ));
            }
            if e.progress_topic.is_empty() {
                return Err(invalid(
                    "exactly_once.progress_topic",
                    "",
                    "name the topic that keeps the relay's committed position, e.g. outbox-relay.progress",
                ));
            }
            if e.batch_max_messages == 0 {
                return Err(invalid(
                    "exactly_once.batch_max_messages",
                    0,
                    "must be at least 1 (5000 is usual; at most half of pipeline.max_in_flight lets \
                     one transaction fill while the previous one is being marked)",
                ));
            }
            if self.dead_letter.policy == PoisonPolicy::BlockKey {
                return Err(invalid(
                    "dead_letter.policy",
                    "block_key",
                    "block_key holds rows back and sends them later, out of the WAL's order, which \
                     exactly-once delivery cannot track; use dlq or halt with delivery = exactly_once",
                ));
            }
            if e.batch_max_ms == 0 || e.batch_max_ms >= e.transaction_timeout_ms {
                return Err(invalid(
                    "exactly_once.batch_max_ms",
                    e.batch_max_ms,
                    format!(
                        "must be at least 1 and below exactly_once.transaction_timeout_ms ({}); 100 is usual",
                        e.transaction_timeout_ms
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Validates the pipeline and the dead-letter policy.
    fn validate_pipeline(&self) -> Result<(), ConfigError> {
        let pl = &self.pipeline;
        if pl.max_in_flight == 0 {
            return Err(invalid(
                "pipeline.max_in_flight",
                0,
                "must be at least 1 (10000 is usual)",
            ));
        }
        if pl.mark_batch_size == 0 {
            return Err(invalid(
                "pipeline.mark_batch_size",
                0,
                "must be at least 1 (1000 is usual)",
            ));
        }
        if pl.mark_connections == 0 || pl.mark_connections > 16 {
            return Err(invalid(
                "pipeline.mark_connections",
                pl.mark_connections,
                "must be between 1 and 16 (2 is usual)",
            ));
        }
        if self.dead_letter.max_attempts == 0 {
            return Err(invalid(
                "dead_letter.max_attempts",
                0,
                "must be at least 1 (3 is usual)",
            ));
        }
        if self.dead_letter.block_retry_interval_ms == 0 {
            return Err(invalid(
                "dead_letter.block_retry_interval_ms",
                0,
                "must be at least 1 (10000 is usual)",
            ));
        }
        if self.dead_letter.policy == PoisonPolicy::BlockKey && self.outbox.columns.seq.is_empty() {
            return Err(invalid(
                "dead_letter.policy",
                "block_key",
                "block_key needs the outbox.columns.seq column to replay held rows in commit order; \
                 add the seq column (sql/001_outbox.sql) or use dlq or halt",
            ));
        }
        if self.outbox.watermark_interval_ms < 100 {
            return Err(invalid(
                "outbox.watermark_interval_ms",
                self.outbox.watermark_interval_ms,
                "must be at least 100 (5000 is usual)",
            ));
        }
        if self.outbox.on_delivered == OnDelivered::Record && self.outbox.columns.seq.is_empty() {
            return Err(invalid(
                "outbox.on_delivered",
                "record",
                "record keeps the delivered rows' outbox.columns.seq values; add the seq column \
                 (sql/001_outbox.sql) or set outbox.on_delivered = \"mark\"",
            ));
        }
        Ok(())
    }

    /// Validates retries, metrics, retention, the admin listener and the oracle.
    fn validate_operations(&self) -> Result<(), ConfigError> {
        let r = &self.retry;
        if r.initial_delay_ms == 0 || r.max_delay_ms < r.initial_delay_ms {
            return Err(invalid(
                "retry.max_delay_ms",
                r.max_delay_ms,
                format!(
                    "retry.initial_delay_ms ({}) must be at least 1 and at most retry.max_delay_ms",
                    r.initial_delay_ms
                ),
            ));
        }
        if self.metrics.poll_interval_ms < 100 {
            return Err(invalid(
                "metrics.poll_interval_ms",
                self.metrics.poll_interval_ms,
                "must be at least 100; 10000 is usual",
            ));
        }
        let rt = &self.retention;
        if !rt.delivered_hours.is_finite() || rt.delivered_hours < 0.0 {
            return Err(invalid(
                "retention.delivered_hours",
                rt.delivered_hours,
                "must be 0 (keep delivered rows) or a positive number of hours; 24 is usual",
            ));
        }
        if rt.interval_ms < 100 {
            return Err(invalid(
                "retention.interval_ms",
                rt.interval_ms,
                "must be at least 100; 60000 is usual",
            ));
        }
        if !(1..=100_000).contains(&rt.batch_size) {
            return Err(invalid(
                "retention.batch_size",
                rt.batch_size,
                "must be between 1 and 100000; 1000 is usual (small batches keep locks short)",
            ));
        }
        let h = &self.http.addr;
        if !h.is_empty() && h.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.addr",
                h,
                "expected an address and port such as 127.0.0.1:8080 (an IP address, not a host name), or \"\" to turn the admin listener off",
            ));
        }
        let t = &self.transactions;
        if t.lock_timeout_ms == 0 || t.lock_timeout_ms > 600_000 {
            return Err(invalid(
                "transactions.lock_timeout_ms",
                0,
                "must be 1 to 600000; 2000 is usual (a check waits this long for a transaction in flight)",
            ));
        }
        if t.max_connections == 0 {
            return Err(invalid(
                "transactions.max_connections",
                0,
                "must be at least 1",
            ));
        }
        if t.purge_interval_ms == 0 {
            return Err(invalid(
                "transactions.purge_interval_ms",
                0,
                "must be at least 1; 60000 is usual (set transactions.retention_hours = 0 to never purge)",
            ));
        }
        if !t.http_addr.is_empty() {
            if t.http_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "transactions.http_addr",
                    &t.http_addr,
                    "expected an address and port such as 127.0.0.1:8081, or \"\" (off)",
                ));
            }
            if t.http_token.chars().count() < 16 {
                return Err(invalid(
                    "transactions.http_token",
                    if t.http_token.is_empty() {
                        ""
                    } else {
                        "(hidden)"
                    },
                    "the oracle's HTTP listener answers only callers with this bearer token; \
                     set one of at least 16 characters, e.g. from a secret file: \
                     RELAY_TRANSACTIONS__HTTP_TOKEN_FILE=/run/secrets/oracle-token",
                ));
            }
        }
        if t.http_max_concurrent == 0 || t.http_max_concurrent >= t.max_connections {
            return Err(invalid(
                "transactions.http_max_concurrent",
                t.http_max_concurrent,
                format!(
                    "must be 1 to {} (below transactions.max_connections, so RocketMQ \
                     check-backs always keep an oracle connection)",
                    t.max_connections.saturating_sub(1).max(1)
                ),
            ));
        }
        if t.http_rate_per_sec == 0 || t.http_max_connections == 0 || t.http_timeout_ms == 0 {
            return Err(invalid(
                "transactions.http_rate_per_sec",
                t.http_rate_per_sec,
                "transactions.http_rate_per_sec, http_max_connections and http_timeout_ms must \
                 each be at least 1",
            ));
        }
        Ok(())
    }

    /// Validates RocketMQ check-backs and the RocketMQ sink.
    fn validate_rocketmq(&self) -> Result<(), ConfigError> {
        let r = &self.rocketmq;
        match (r.access_key.is_empty(), r.secret_key.is_empty()) {
            (false, true) => {
                return Err(invalid(
                    "rocketmq.secret_key",
                    "",
                    "rocketmq.access_key is set but its secret is empty; set \
                     RELAY_ROCKETMQ__SECRET_KEY (or RELAY_ROCKETMQ__SECRET_KEY_FILE) too, or clear \
                     the access key if the brokers do not check ACLs",
                ));
            }
            (true, false) => {
                return Err(invalid(
                    "rocketmq.access_key",
                    "",
                    "rocketmq.secret_key is set but the access key is empty; set \
                     RELAY_ROCKETMQ__ACCESS_KEY to the user the secret belongs to",
                ));
            }
            _ => {}
        }
        if !r.name_server.is_empty() {
            let bad = r.name_servers().into_iter().find(|a| {
                a.rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            });
            if let Some(bad) = bad {
                return Err(invalid(
                    "rocketmq.name_server",
                    &r.name_server,
                    format!(
                        "{bad:?} is not host:port; list name servers as host:port[;host:port], e.g. 127.0.0.1:9876"
                    ),
                ));
            }
            if r.groups(self.sink == SinkKind::Rocketmq).is_empty() {
                return Err(invalid(
                    "rocketmq.producer_groups",
                    &r.producer_groups,
                    "name the producer groups whose check-backs the relay answers, comma-separated",
                ));
            }
            if r.key_property.is_empty() {
                return Err(invalid(
                    "rocketmq.key_property",
                    "",
                    "name the message property holding the transaction key (KEYS: the message key)",
                ));
            }
            if !(1_000..=60_000).contains(&r.heartbeat_interval_ms) {
                return Err(invalid(
                    "rocketmq.heartbeat_interval_ms",
                    r.heartbeat_interval_ms,
                    "must be between 1000 and 60000 (brokers forget a producer after 120 s without one)",
                ));
            }
        }
        if self.sink == SinkKind::Rocketmq {
            if r.name_server.is_empty() {
                return Err(invalid(
                    "rocketmq.name_server",
                    "",
                    "sink = rocketmq needs the name server(s), host:port[;host:port]",
                ));
            }
            if !rocketmq_name_ok(&r.producer_group) {
                return Err(invalid(
                    "rocketmq.producer_group",
                    &r.producer_group,
                    "a RocketMQ group name: 1 to 255 letters, digits, '_', '-', '%' or '|'",
                ));
            }
            if !(1..=1024).contains(&r.topic_queues) {
                return Err(invalid(
                    "rocketmq.topic_queues",
                    r.topic_queues,
                    "must be between 1 and 1024 (4 is usual)",
                ));
            }
            if self.delivery == DeliveryMode::ExactlyOnce {
                return Err(invalid(
                    "delivery",
                    "exactly_once",
                    "exactly_once uses Kafka transactions; with sink = rocketmq every message is \
                     already visible once, as a transactional message: set delivery = at_least_once",
                ));
            }
            if !self.pipeline.mark_delivered {
                return Err(invalid(
                    "pipeline.mark_delivered",
                    "false",
                    "sink = rocketmq commits each message in the transaction that marks its row \
                     delivered; set pipeline.mark_delivered = true",
                ));
            }
        }
        Ok(())
    }

    /// Validates the NATS sink's settings (`sink = "nats"`).
    fn validate_nats(&self) -> Result<(), ConfigError> {
        if self.sink != SinkKind::Nats {
            return Ok(());
        }
        let n = &self.nats;
        if n.url.trim().is_empty() {
            return Err(invalid(
                "nats.url",
                "",
                "sink = nats needs the server URL, e.g. nats://127.0.0.1:4222",
            ));
        }
        if self.delivery == DeliveryMode::ExactlyOnce {
            return Err(invalid(
                "delivery",
                "exactly_once",
                "exactly_once uses Kafka transactions; with sink = nats JetStream drops resends of \
                 a message id inside the stream's duplicate window: set delivery = at_least_once",
            ));
        }
        if n.stream.is_empty() || n.stream.contains(['.', ' ', '*', '>', '/', '\\']) {
            return Err(invalid(
                "nats.stream",
                &n.stream,
                "a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'",
            ));
        }
        if n.create_stream && n.subjects().is_empty() {
            return Err(invalid(
                "nats.stream_subjects",
                &n.stream_subjects,
                "list the subjects the stream captures, e.g. outbox.>",
            ));
        }
        if !(1..=5).contains(&n.replicas) {
            return Err(invalid(
                "nats.replicas",
                n.replicas,
                "must be between 1 and 5",
            ));
        }
        if n.duplicate_window_ms < 1_000 {
            return Err(invalid(
                "nats.duplicate_window_ms",
                n.duplicate_window_ms,
                "at least 1000; resends after a relay restart must fall inside it (120000 is \
                 JetStream's default)",
            ));
        }
        if !(100..=600_000).contains(&n.ack_timeout_ms) {
            return Err(invalid(
                "nats.ack_timeout_ms",
                n.ack_timeout_ms,
                "must be between 100 and 600000",
            ));
        }
        Ok(())
    }

    /// Validates the RabbitMQ sink's settings (`sink = "rabbitmq"`).
    fn validate_rabbitmq(&self) -> Result<(), ConfigError> {
        if self.sink != SinkKind::Rabbitmq {
            return Ok(());
        }
        let r = &self.rabbitmq;
        if !(r.url.starts_with("amqp://") || r.url.starts_with("amqps://")) {
            return Err(invalid(
                "rabbitmq.url",
                redact_url(&r.url),
                "sink = rabbitmq needs amqp://user:password@host:5672/%2f (amqps:// for TLS)",
            ));
        }
        if self.delivery == DeliveryMode::ExactlyOnce {
            return Err(invalid(
                "delivery",
                "exactly_once",
                "exactly_once uses Kafka transactions; with sink = rabbitmq set delivery = \
                 at_least_once (consumers deduplicate on message_id)",
            ));
        }
        if r.exchange.len() > 255 {
            return Err(invalid(
                "rabbitmq.exchange",
                &r.exchange,
                "at most 255 bytes",
            ));
        }
        if !["topic", "direct", "fanout", "headers"].contains(&r.exchange_type.as_str()) {
            return Err(invalid(
                "rabbitmq.exchange_type",
                &r.exchange_type,
                "one of topic, direct, fanout, headers",
            ));
        }
        if let Err(e) = TopicTemplate::parse(&r.routing_key) {
            return Err(invalid("rabbitmq.routing_key", &r.routing_key, e));
        }
        if r.max_message_bytes == 0 {
            return Err(invalid(
                "rabbitmq.max_message_bytes",
                0,
                "set it to the broker's max_message_size (RabbitMQ 4: 16777216)",
            ));
        }
        if !(100..=600_000).contains(&r.ack_timeout_ms) {
            return Err(invalid(
                "rabbitmq.ack_timeout_ms",
                r.ack_timeout_ms,
                "must be between 100 and 600000",
            ));
        }
        Ok(())
    }

    /// Validates logging.
    fn validate_log(&self) -> Result<(), ConfigError> {
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(invalid(
                "log.format",
                &self.log.format,
                "expected text or json",
            ));
        }
        Ok(())
    }

    /// The parsed `postgres.url` (validated at load).
    /// The parsed `postgres.url`. A URL naming several hosts without `target_session_attrs`
    /// gets `read-write`: the relay marks rows, so of a primary and its standbys it must reach
    /// the primary, wherever a failover put it (libpq's own default would be `any`). Without
    /// `connect_timeout`, 10 s per server.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let url = crate::pgtls::split(&self.postgres.url)
            .map(|(url, _)| url)
            .unwrap_or_default();
        let mut pg: tokio_postgres::Config = url
            .parse()
            .unwrap_or_else(|_| tokio_postgres::Config::new());
        let hosts = pg.get_hosts().len().max(pg.get_hostaddrs().len());
        if hosts > 1 && !self.postgres.url.contains("target_session_attrs") {
            pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        // A server that drops packets (a dead primary) costs each attempt this long, not the
        // kernel's minutes of SYN retries, before the next host is tried.
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(std::time::Duration::from_secs(10));
        }
        pg
    }

    /// Where and how the relay's connections reach Postgres: [`Config::pg_config`] and
    /// [`Config::pg_tls`] together.
    pub fn pg_target(&self) -> crate::pgtls::PgTarget {
        crate::pgtls::PgTarget {
            config: self.pg_config(),
            tls: self.pg_tls(),
        }
    }

    /// The TLS settings of `postgres.url` (libpq's sslmode, sslrootcert, sslcert, sslkey).
    pub fn pg_tls(&self) -> crate::pgtls::PgTls {
        crate::pgtls::split(&self.postgres.url)
            .map(|(_, tls)| tls)
            .unwrap_or_default()
    }

    /// `schema.table`, quoted for SQL.
    pub fn outbox_table_sql(&self) -> String {
        format!(
            "{}.{}",
            crate::quote::quote_ident(&self.outbox.schema),
            crate::quote::quote_ident(&self.outbox.table)
        )
    }

    /// `schema.ledger_table`, quoted for SQL.
    pub fn ledger_table_sql(&self) -> String {
        format!(
            "{}.{}",
            crate::quote::quote_ident(&self.outbox.schema),
            crate::quote::quote_ident(&self.outbox.ledger_table)
        )
    }

    /// `schema.state_table`, quoted for SQL.
    pub fn state_table_sql(&self) -> String {
        format!(
            "{}.{}",
            crate::quote::quote_ident(&self.outbox.schema),
            crate::quote::quote_ident(&self.outbox.state_table)
        )
    }
}

/// One line per problem, each naming the key, its environment variable and where it was set.
fn describe_figment_error(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| format!(" (set in {})", m.name))
                .unwrap_or_default();
            let problem = e.kind.to_string();
            if key.is_empty() {
                format!("{problem}{source}")
            } else {
                format!("key {key} (env {}){source}: {problem}", env_name(&key))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Hides the password of a Postgres URL or key=value string, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let secret = |key: &str| {
        let key = key.trim().to_ascii_lowercase();
        key == "password" || key == "sslpassword"
    };
    if let Some((scheme, rest)) = url.split_once("://") {
        // A password may hold a raw '@' (or '?', '/'): the host starts after the last '@'.
        let (rest, hidden_user) = match rest.rsplit_once('@') {
            Some((auth, host)) => match auth.split_once(':') {
                Some((user, _)) => (host, Some(format!("{user}:***@"))),
                None => (host, Some(format!("{auth}@"))),
            },
            None => (rest, None),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let mut out = format!("{scheme}://{}{rest}", hidden_user.unwrap_or_default());
        if let Some(q) = query {
            let params: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if secret(k) => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
        return out;
    }
    match crate::pgtls::conninfo_pairs(url) {
        Some(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if secret(&k) {
                    format!("{k}=***")
                } else {
                    crate::pgtls::conninfo_pair(&k, &v)
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => "(a connection string that cannot be parsed; not shown)".into(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn env_names_use_double_underscore() {
        assert_eq!(env_name("postgres.url"), "RELAY_POSTGRES__URL");
        assert_eq!(env_name("kafka.brokers"), "RELAY_KAFKA__BROKERS");
    }

    #[test]
    fn errors_name_key_env_and_fix() {
        let mut c = Config::default();
        c.kafka.compression = "brotli".into();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("kafka.compression"), "{msg}");
        assert!(msg.contains("RELAY_KAFKA__COMPRESSION"), "{msg}");
        assert!(msg.contains("zstd"), "{msg}");

        let mut c = Config::default();
        c.postgres.slot = "Bad-Slot".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("postgres.slot")
        );

        let mut c = Config::default();
        c.kafka.properties.insert("acks".into(), "1".into());
        assert!(c.validate().unwrap_err().to_string().contains("acks=all"));

        let mut c = Config::default();
        c.kafka.topic_template = "events.{nope}".into();
        assert!(c.validate().unwrap_err().to_string().contains("{nope}"));
    }

    /// `config/relay.toml` documents every key, and its values are the defaults in code.
    #[test]
    fn example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/relay.toml");
        let file = Figment::from(Toml::file(&path));
        let mut keys = Vec::new();
        config_keys(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut keys,
        );
        for key in keys.iter().filter(|k| !k.ends_with("properties")) {
            assert!(
                file.find_value(key).is_ok(),
                "config/relay.toml lacks {key}"
            );
        }
        let from_file: Config = file.extract().unwrap();
        assert_eq!(
            serde_json::to_value(from_file).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
    }

    /// The README's configuration table has a row for every key, with its environment name.
    #[test]
    fn readme_lists_every_key_with_its_environment_name() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let mut keys = Vec::new();
        config_keys(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut keys,
        );
        for key in keys {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("README.md's configuration table lacks {key}"));
            assert!(
                key.ends_with("properties") || row.contains(&format!("`{}`", env_name(&key))),
                "{row}"
            );
        }
    }

    /// Every leaf key of `v` (`kafka.properties` counts as one).
    fn config_keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) if !prefix.ends_with("properties") => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    config_keys(v, &key, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3cret"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgresql://app:p%40ss@db:5432/x?application_name=r"),
            "postgresql://app:***@db:5432/x?application_name=r"
        );
        assert_eq!(
            redact_url("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
        // What the old redaction let through: spaces around '=', a quoted password with a
        // space, a raw '@' in the password, an sslpassword.
        for (url, secret) in [
            ("host=db password = s3cret user=app", "s3cret"),
            ("host=db password='a b' user=app", "a b"),
            ("host=db password='it\\'s' user=app", "it"),
            ("postgres://app:p@ss@db:5432/x", "ss@"),
            ("postgres://app:p@ss?w@db:5432/x?sslmode=require", "ss?w"),
            ("postgres://app@db/x?PASSWORD=s3cret", "s3cret"),
            ("postgres://app@db/x?sslpassword=s3cret", "s3cret"),
            ("host=db sslpassword=s3cret", "s3cret"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("***"), "{url} -> {shown}");
        }
        assert_eq!(
            redact_url("host=db password='a b' user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert!(redact_url("host=db password='unterminated").contains("not shown"));
    }

    #[test]
    fn secrets_come_from_files_and_kafka_properties_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("pg-url", "postgres://u:from-file@h:1/d\n")?;
            jail.create_file("sasl", "s3cret")?;
            let dir = jail.directory().to_owned();
            jail.set_env("RELAY_POSTGRES__URL_FILE", dir.join("pg-url").display());
            jail.set_env(
                "RELAY_KAFKA__PROPERTIES__SASL_PASSWORD_FILE",
                dir.join("sasl").display(),
            );
            jail.set_env("RELAY_KAFKA__PROPERTIES__SASL_USERNAME", "relay");
            jail.set_env("RELAY_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL");
            let c = Config::load(None).unwrap();
            assert_eq!(c.postgres.url, "postgres://u:from-file@h:1/d");
            let props = &c.kafka.properties;
            assert_eq!(
                props.get("sasl.password").map(String::as_str),
                Some("s3cret")
            );
            assert_eq!(
                props.get("sasl.username").map(String::as_str),
                Some("relay")
            );
            assert_eq!(
                props.get("security.protocol").map(String::as_str),
                Some("SASL_SSL")
            );
            assert!(c.ignored_env.is_empty(), "{:?}", c.ignored_env);
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("RELAY_POSTGRES__URL_FILE", "/nonexistent/secret");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("RELAY_POSTGRES__URL_FILE") && err.contains("cannot read"),
                "{err}"
            );
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.create_file("pg-url", "postgres://u@h/d")?;
            let file = jail.directory().join("pg-url");
            jail.set_env("RELAY_POSTGRES__URL_FILE", file.display());
            jail.set_env("RELAY_POSTGRES__URL", "postgres://u@other/d");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("keep one"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                "[kafka]\nbrokers = \"file:9092\"\nlinger_ms = 7\n",
            )?;
            jail.set_env("RELAY_KAFKA__BROKERS", "env:9092");
            jail.set_env("RELAY_POSTGRES__URL", "postgres://u:p@h:1/d");
            let c = Config::load(Some(Path::new("relay.toml"))).unwrap();
            assert_eq!(c.kafka.brokers, "env:9092");
            assert_eq!(c.kafka.linger_ms, 7);
            assert_eq!(c.postgres.url, "postgres://u:p@h:1/d");
            assert_eq!(c.postgres.slot, "outbox_relay");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_types_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RELAY_PIPELINE__MAX_IN_FLIGHT", "lots");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("max_in_flight"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("RELAY_KAFKA__BROKRES", "x:1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("brokres"), "{err}");
            Ok(())
        });
    }

    /// Kubernetes injects `RELAY_SERVICE_HOST`, `RELAY_PORT`, `RELAY_PORT_8080_TCP_ADDR`, … for
    /// a Service named `relay`: they are not configuration keys and must not stop the relay.
    #[test]
    fn service_variables_of_kubernetes_are_ignored_and_reported() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("RELAY_SERVICE_HOST", "10.0.0.9");
            jail.set_env("RELAY_PORT", "tcp://10.0.0.9:8080");
            jail.set_env("RELAY_PORT_8080_TCP_ADDR", "10.0.0.9");
            jail.set_env("RELAY_KAFKA__BROKERS", "env:9092");
            let c = Config::load(None).unwrap();
            assert_eq!(c.kafka.brokers, "env:9092");
            assert_eq!(
                c.ignored_env,
                [
                    "RELAY_PORT",
                    "RELAY_PORT_8080_TCP_ADDR",
                    "RELAY_SERVICE_HOST"
                ]
            );
            Ok(())
        });
    }

    /// The list of top-level keys the environment filter knows is the configuration's own.
    #[test]
    fn top_level_keys_match_the_configuration() {
        let value = serde_json::to_value(Config::default()).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        let mut known = TOP_LEVEL_KEYS.to_vec();
        known.sort();
        assert_eq!(keys, known);
    }
}
