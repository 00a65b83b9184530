//! Where outbox rows come from besides the stream, and what must be set up for them (the
//! schema preflight, [`schema`]): the replication slot's lifecycle ([`slot`]:
//! create, resume, recover a lost slot), the first-start snapshot ([`snapshot`]) and rows read
//! back from the table by SQL ([`rows`]: the snapshot's cursor and the parked rows of blocked
//! aggregates).

pub mod rows;
pub mod schema;
pub mod slot;
pub mod snapshot;

pub use slot::{SlotError, prepare, server_major, slot_info};
