//! outbox-relay: a transactional-outbox relay from Postgres logical replication to Kafka.
//!
//! ```text
//! WAL ─► replication ─► pipeline ─► sink ─► acks ─► progress ─► watermark ─► slot
//! ```
//! See `README.md` for the guarantees and `config/relay.toml` for every setting.

pub mod admin;
pub mod app;
pub mod check;
pub mod config;
pub mod db;
pub mod error;
pub mod failpoint;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod monitor;
pub mod oracle;
pub mod pipeline;
pub mod progress;
pub mod redrive;
pub mod replication;
pub mod retention;
pub mod retry;
pub mod rocketmq;
pub mod sink;
pub mod slot;
