//! Exactly-once delivery into Kafka (`delivery = "exactly_once"`): the source position a Kafka
//! transaction commits together with its messages ([`position`]), and the transactional producer
//! settings and progress-topic reader ([`transactions`]). The pipeline opens and commits the
//! transactions; the Kafka sink carries them out.

pub mod position;
pub mod transactions;

use crate::replication::Lsn;
use position::SourcePosition;

/// The Kafka transaction being filled (exactly-once).
#[derive(Debug, Clone, Copy)]
pub struct OpenBatch {
    pub opened: tokio::time::Instant,
    pub messages: usize,
}

/// Exactly-once state: which position the open Kafka transaction will commit, and which rows
/// committed transactions already hold.
#[derive(Debug, Default)]
pub struct ExactlyOnce {
    pub batch: Option<OpenBatch>,
    /// Rows committed Kafka transactions hold: not sent again, only marked.
    pub covered: SourcePosition,
    /// The last position committed to Kafka by this pipeline (or `covered`, before any).
    pub committed: SourcePosition,
    /// End of the last Postgres transaction whose rows were all handed to the sink.
    pub handed_end: Lsn,
    /// The open Postgres transaction's commit LSN, its outbox rows read so far, and how many of
    /// them were handled (handed to the sink, dead-lettered or found covered): the position a
    /// commit records, so a row the relay stopped on is never counted as sent.
    pub open_final_lsn: Lsn,
    pub open_rows: u64,
    pub handled_rows: u64,
    /// The server now streaming: the positions this pipeline commits are in its WAL.
    pub origin: Option<position::Origin>,
}
