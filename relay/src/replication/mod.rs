//! Postgres logical replication: the wire client and the pgoutput decoder.
//!
//! This room turns a replication slot into typed events. It knows nothing about brokers: the
//! pipeline consumes its [`pgoutput::PgOutput`] events and tells it, through standby status
//! updates, how far the slot may advance.

pub mod client;
pub mod driver;
pub mod lsn;
pub mod pgoutput;
pub mod protocol;
pub mod wire;

pub use client::{ReplicationClient, ReplicationError, ReplicationStream};
pub use lsn::Lsn;
