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
    /// The server whose WAL the LSNs are in; `None` in records of relays before 0.2 (and before
    /// the first commit). An LSN means nothing on another server, and on a later timeline only
    /// below the point where that timeline branched off.
    pub origin: Option<Origin>,
}

/// A server's identity as `IDENTIFY_SYSTEM` reports it: a promoted standby keeps the system id
/// and starts a new timeline; another cluster has another system id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub system_id: u64,
    pub timeline: u32,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "system {} timeline {}", self.system_id, self.timeline)
    }
}

/// What became of a position carried over to another server (see [`SourcePosition::moved_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Same server and timeline, or a record without identity (older relay): kept as is.
    Kept,
    /// A later timeline of the same system: kept up to the point the position's timeline
    /// ended (the history both servers share); what lay beyond is dropped.
    Clamped { switch_point: Lsn },
    /// Another system, or a timeline this server does not descend from: dropped entirely.
    Dropped,
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

    /// This position as it holds on server `here`. `switch_point`: where the position's timeline
    /// ended in `here`'s history (from `TIMELINE_HISTORY`), when `here` is on a later timeline of
    /// the same system and descends from it.
    pub fn moved_to(self, here: Origin, switch_point: Option<Lsn>) -> (SourcePosition, Carried) {
        let Some(from) = self.origin else {
            return (self, Carried::Kept);
        };
        if from == here {
            return (self, Carried::Kept);
        }
        let dropped = SourcePosition {
            origin: Some(here),
            ..SourcePosition::default()
        };
        match switch_point {
            Some(switch_point)
                if from.system_id == here.system_id && from.timeline < here.timeline =>
            {
                let clamped = SourcePosition {
                    committed_end: self.committed_end.min(switch_point),
                    partial: self.partial.filter(|(lsn, _)| *lsn < switch_point),
                    origin: Some(here),
                };
                (clamped, Carried::Clamped { switch_point })
            }
            _ => (dropped, Carried::Dropped),
        }
    }

    /// The progress record's value.
    pub fn to_record(self, slot: &str, transactional_id: &str) -> Vec<u8> {
        let record = ProgressRecord {
            slot: slot.to_owned(),
            transactional_id: transactional_id.to_owned(),
            commit_end_lsn: self.committed_end.to_string(),
            partial_tx_lsn: self.partial.map(|(lsn, _)| lsn.to_string()),
            partial_tx_rows: self.partial.map_or(0, |(_, rows)| rows),
            system_id: self.origin.map(|o| o.system_id.to_string()),
            timeline: self.origin.map(|o| o.timeline),
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// Reads a progress record's value back: it must name `slot` and `transactional_id` (a
    /// record under this slot's key written by anything else is not this relay's position).
    pub fn from_record(
        value: &[u8],
        slot: &str,
        transactional_id: &str,
    ) -> Result<SourcePosition, String> {
        let record: ProgressRecord =
            serde_json::from_slice(value).map_err(|e| format!("not a progress record: {e}"))?;
        if record.slot != slot || record.transactional_id != transactional_id {
            return Err(format!(
                "the record names slot '{}' and transactional id '{}', not this relay's '{slot}' \
                 and '{transactional_id}'",
                record.slot, record.transactional_id
            ));
        }
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
        let origin = match (record.system_id, record.timeline) {
            (Some(id), Some(timeline)) => Some(Origin {
                system_id: id.parse().map_err(|e| format!("system_id: {e}"))?,
                timeline,
            }),
            _ => None,
        };
        Ok(SourcePosition {
            committed_end,
            partial,
            origin,
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
    /// The server the LSNs belong to (IDENTIFY_SYSTEM); a decimal string, as Postgres prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeline: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_earlier_transactions_and_the_committed_part_of_a_partial_one() {
        let p = SourcePosition {
            committed_end: Lsn(100),
            partial: Some((Lsn(150), 2)),
            origin: None,
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
                origin: None,
            },
            SourcePosition {
                committed_end: "16/B374D848".parse().unwrap(),
                partial: None,
                origin: Some(Origin {
                    system_id: 7_449_611_264_170_542_351,
                    timeline: 3,
                }),
            },
        ] {
            let value = p.to_record("outbox_relay", "relay-1");
            let text = String::from_utf8(value.clone()).unwrap();
            assert!(text.contains("\"slot\":\"outbox_relay\""), "{text}");
            assert_eq!(
                SourcePosition::from_record(&value, "outbox_relay", "relay-1").unwrap(),
                p
            );
            let err = SourcePosition::from_record(&value, "outbox_relay", "relay-2").unwrap_err();
            assert!(err.contains("not this relay's"), "{err}");
            assert!(SourcePosition::from_record(&value, "other_slot", "relay-1").is_err());
        }
        let err =
            SourcePosition::from_record(b"{\"commit_end_lsn\": \"x\"}", "s", "t").unwrap_err();
        assert!(err.contains("progress record"), "{err}");
    }

    #[test]
    fn a_position_moved_to_another_server_keeps_only_shared_history() {
        let a = Origin {
            system_id: 42,
            timeline: 1,
        };
        let p = SourcePosition {
            committed_end: Lsn(1_000),
            partial: Some((Lsn(1_200), 3)),
            origin: Some(a),
        };
        assert_eq!(p.moved_to(a, None), (p, Carried::Kept));
        let legacy = SourcePosition { origin: None, ..p };
        assert_eq!(
            legacy.moved_to(a, None),
            (legacy, Carried::Kept),
            "no identity to compare"
        );
        let promoted = Origin {
            system_id: 42,
            timeline: 2,
        };
        let (kept, how) = p.moved_to(promoted, Some(Lsn(1_100)));
        assert_eq!(
            how,
            Carried::Clamped {
                switch_point: Lsn(1_100)
            }
        );
        assert_eq!(kept.committed_end, Lsn(1_000), "below the branch point");
        assert_eq!(kept.partial, None, "the partial transaction lies beyond it");
        assert!(kept.covers(Lsn(900), 1) && !kept.covers(Lsn(1_200), 1));
        let (kept, _) = p.moved_to(promoted, Some(Lsn(600)));
        assert_eq!(kept.committed_end, Lsn(600));
        assert!(
            !kept.covers(Lsn(700), 1),
            "written on the new timeline: not covered"
        );
        let other = Origin {
            system_id: 7,
            timeline: 1,
        };
        let (gone, how) = p.moved_to(other, Some(Lsn(1_100)));
        assert_eq!(how, Carried::Dropped);
        assert!(!gone.covers(Lsn(1), 1));
        assert_eq!(gone.origin, Some(other));
        let (gone, how) = p.moved_to(promoted, None);
        assert_eq!(
            how,
            Carried::Dropped,
            "not descended from the position's timeline"
        );
        assert!(!gone.covers(Lsn(1), 1));
    }
}
