//! outbox-relay: a transactional-outbox relay from Postgres logical replication to Kafka and
//! RocketMQ.
//!
//! ```text
//! WAL ─► replication ─► pipeline ─► sink ─► (broker ack) ─► marking ─► watermark ─► slot
//!        (wire, pgoutput,  (apply, route,  (kafka, rocketmq:      (delivered in   (contiguous
//!         stream driver)    backpressure)   accept now, report     Postgres)       confirmed
//!                                           the ack later)                         prefix)
//!  beside the flow: source (slot, first-start snapshot, rows read back) · dead_letter ·
//!                   exactly_once · oracle (check-backs) · rocketmq (remoting, responder)
//!  around it:       app (supervisor, stream loop, shutdown) · error (one policy) · retry ·
//!                   config · quote · metrics · postgres (connections, leader lock) · ops
//! ```
//!
//! | room | what it does |
//! |---|---|
//! | [`app`] | the supervisor: session, leader lock, pipeline, stream, redrives; applies the error policy |
//! | [`error`] | what each failure means: retry, reconnect Postgres, rebuild the sink, stop |
//! | [`retry`] | the one backoff |
//! | [`config`] | defaults < file < `RELAY_*`, validation naming the key and the fix (a leaf) |
//! | [`quote`] | quoting names and values into SQL (a leaf) |
//! | [`metrics`] | metric names and the recorder (a leaf) |
//! | [`health`] | what readiness reports (a leaf the stages write to) |
//! | [`postgres`] | ordinary connections, the leader lock |
//! | [`replication`] | the replication wire client, pgoutput decoder, the stream driver (knows no broker) |
//! | [`source`] | the schema preflight, the slot's lifecycle, the first-start snapshot, outbox rows read back by SQL |
//! | [`routing`] | an outbox row → a message (topic, key, headers); a leaf the pipeline and dead-lettering share |
//! | [`pipeline`] | applying decoded transactions, the watermark, backpressure, completions |
//! | [`dead_letter`] | dead-letter records, `block_key`: the blocked aggregates |
//! | [`exactly_once`] | the source position and the Kafka transactions that carry it |
//! | [`sink`] | the `Sink` contract; Kafka and RocketMQ |
//! | [`marking`] | acknowledged rows marked delivered/failed; completions back to the pipeline |
//! | [`delivered`] | what counts as delivered under `outbox.on_delivered` (the SQL the stages share), the ledger's watermark |
//! | [`rocketmq`] | RocketMQ remoting codec, client and check-back responder |
//! | [`oracle`] | what happened to a local transaction (check-backs, HTTP) |
//! | [`ops`] | admin HTTP, the broker probe, slot gauges, retention, `outbox-relay check` |
//! | [`failpoint`] | crash and pause points for tests |
//!
//! Rooms the binary, the tests and the bench do not use are `pub(crate)`.
//!
//! See `README.md` for the guarantees and `config/relay.toml` for every setting.

pub mod app;
pub mod config;
pub(crate) mod dead_letter;
pub mod delivered;
pub mod error;
pub(crate) mod exactly_once;
pub(crate) mod failpoint;
pub mod health;
pub mod marking;
pub mod metrics;
pub mod ops;
pub mod oracle;
pub mod pgtls;
pub mod pipeline;
pub(crate) mod postgres;
pub(crate) mod quote;
pub mod replication;
pub(crate) mod retry;
pub mod rocketmq;
pub mod routing;
pub mod sink;
pub(crate) mod source;
