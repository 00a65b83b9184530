//! The source position an exactly-once relay commits inside each Kafka transaction.
//!
//! In `delivery = "exactly_once"` mode every Kafka transaction carries, besides the messages, one
//! progress record saying how far through the WAL those messages go. After a crash the relay
//! reads the last committed record back and does not send again what it covers, whatever the
//! replication slot (confirmed only after the Kafka commit) still holds.
//!
//! Postgres decodes a transaction identically each time it is read from a slot, so a position is
//! "every transaction whose commit record lies before `committed_end`, plus the first `rows`
//! outbox rows of the transaction committed at `partial.0`" — a Kafka transaction may end inside
//! a Postgres transaction too large to wait for (more rows than `pipeline.max_in_flight`).
//! The record is JSON, keyed by the slot name in a compacted topic, so operators can read it.

use serde::{Deserialize, Serialize};

use crate::replication::Lsn;

/// How far the messages in committed Kafka transactions reach into the WAL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourcePosition {
    /// End of the commit record of the last Postgres transaction all of whose rows are covered.
    pub committed_end: Lsn,
    /// A Postgres transaction covered only in part: (its commit record's LSN, rows covered).
    pub partial: Option<(Lsn, u64)>,
}

impl SourcePosition {
    /// Whether row number `row` (1-based, counting the transaction's outbox rows in the order
    /// Postgres sends them) of the transaction whose commit record is at `final_lsn` is covered.
    pub fn covers(&self, final_lsn: Lsn, row: u64) -> bool {
        // A later transaction's commit record starts at or after the earlier one's end.
        final_lsn < self.committed_end
            || self
                .partial
                .is_some_and(|(lsn, rows)| lsn == final_lsn && row <= rows)
    }

    /// The progress record's value.
    pub fn to_record(self, slot: &str, transactional_id: &str) -> Vec<u8> {
        let record = ProgressRecord {
            slot: slot.to_owned(),
            transactional_id: transactional_id.to_owned(),
            commit_end_lsn: self.committed_end.to_string(),
            partial_tx_lsn: self.partial.map(|(lsn, _)| lsn.to_string()),
            partial_tx_rows: self.partial.map_or(0, |(_, rows)| rows),
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// Reads a progress record's value back.
    pub fn from_record(value: &[u8]) -> Result<SourcePosition, String> {
        let record: ProgressRecord =
            serde_json::from_slice(value).map_err(|e| format!("not a progress record: {e}"))?;
        let committed_end = record
            .commit_end_lsn
            .parse()
            .map_err(|e| format!("commit_end_lsn: {e}"))?;
        let partial = match record.partial_tx_lsn {
            Some(lsn) => Some((
                lsn.parse().map_err(|e| format!("partial_tx_lsn: {e}"))?,
                record.partial_tx_rows,
            )),
            None => None,
        };
        Ok(SourcePosition {
            committed_end,
            partial,
        })
    }
}

impl std::fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.partial {
            None => write!(f, "through {}", self.committed_end),
            Some((lsn, rows)) => write!(
                f,
                "through {} and {rows} row(s) of the transaction committed at {lsn}",
                self.committed_end
            ),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ProgressRecord {
    slot: String,
    transactional_id: String,
    commit_end_lsn: String,
    partial_tx_lsn: Option<String>,
    #[serde(default)]
    partial_tx_rows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_earlier_transactions_and_the_committed_part_of_a_partial_one() {
        let p = SourcePosition {
            committed_end: Lsn(100),
            partial: Some((Lsn(150), 2)),
        };
        assert!(p.covers(Lsn(60), 1_000), "committed before the end");
        assert!(
            !p.covers(Lsn(100), 1),
            "a commit record starting at the end is later"
        );
        assert!(p.covers(Lsn(150), 1) && p.covers(Lsn(150), 2));
        assert!(
            !p.covers(Lsn(150), 3),
            "the rest of the partial transaction"
        );
        assert!(!p.covers(Lsn(200), 1));
        assert!(!SourcePosition::default().covers(Lsn(1), 1));
    }

    #[test]
    fn round_trips_through_the_progress_record() {
        for p in [
            SourcePosition::default(),
            SourcePosition {
                committed_end: "16/B374D848".parse().unwrap(),
                partial: Some(("16/B3800000".parse().unwrap(), 7)),
            },
        ] {
            let value = p.to_record("outbox_relay", "relay-1");
            let text = String::from_utf8(value.clone()).unwrap();
            assert!(text.contains("\"slot\":\"outbox_relay\""), "{text}");
            assert_eq!(SourcePosition::from_record(&value).unwrap(), p);
        }
        let err = SourcePosition::from_record(b"{\"commit_end_lsn\": \"x\"}").unwrap_err();
        assert!(err.contains("progress record"), "{err}");
    }
}
