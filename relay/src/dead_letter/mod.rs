//! Rows the broker will never accept (poison rows) and what `dead_letter.policy` does with them:
//! the dead-letter record that takes a row's place ([`record`]), and under `block_key` the
//! aggregates held back behind a failed row ([`blocking`]; `app::redrive` tries them again).

pub mod blocking;
pub mod record;
