//! Aggregates held back under `dead_letter.policy = block_key`.
//!
//! When a row fails for good, its aggregate (`aggregatetype`, `aggregateid`) is blocked: the row
//! is marked failed and every later row of the same aggregate is parked in the outbox table
//! (marked failed with a "held back" note) instead of being sent, so consumers never see an
//! aggregate's event N+1 without event N. Other aggregates keep flowing, and because parked rows
//! are durable in the table the slot still advances. A blocked aggregate's parked rows are tried
//! again, oldest first, every `dead_letter.block_retry_interval_ms` (see `app/redrive.rs`); when
//! they go through, the aggregate is unblocked.
//!
//! Limit: a failure the broker reports asynchronously (after the send) blocks the aggregate from
//! then on; later rows of it that were already handed to the broker before the report are not
//! recalled.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use uuid::Uuid;

use crate::routing::{OutboxMessage, RawRow};

/// An aggregate: the unit whose events must stay in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Aggregate {
    pub aggregatetype: Bytes,
    pub aggregateid: Bytes,
}

impl Aggregate {
    /// The aggregate of a row as read from the WAL or the table (NULLs count as empty).
    pub fn of_row(row: &RawRow) -> Aggregate {
        Aggregate {
            aggregatetype: row.aggregatetype.clone().unwrap_or_default(),
            aggregateid: row.aggregateid.clone().unwrap_or_default(),
        }
    }

    /// The aggregate of a message (or its dead-letter record): the `aggregatetype` header the
    /// router sets first, and the key.
    pub fn of_message(msg: &OutboxMessage) -> Aggregate {
        let aggregatetype = msg
            .headers
            .iter()
            .find(|(k, _)| k == "aggregatetype")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Aggregate {
            aggregatetype,
            aggregateid: msg.key.clone(),
        }
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            String::from_utf8_lossy(&self.aggregatetype),
            String::from_utf8_lossy(&self.aggregateid)
        )
    }
}

#[derive(Debug)]
struct Entry {
    /// The failed row that holds the aggregate back.
    blocking_row: Uuid,
    /// Times a row of the aggregate failed for good since it was blocked.
    failures: u64,
    next_try: Instant,
}

/// The blocked aggregates and when each is due to be tried again.
#[derive(Debug)]
pub struct Blocked {
    entries: HashMap<Aggregate, Entry>,
    interval: Duration,
}

impl Blocked {
    pub fn new(interval: Duration) -> Blocked {
        Blocked {
            entries: HashMap::new(),
            interval,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// A row of `aggregate` failed for good. The first failure names the blocking row; later
    /// ones (a retry that failed again) only count.
    pub fn block(&mut self, aggregate: Aggregate, row: Uuid, now: Instant) {
        let next_try = now + self.interval;
        self.entries
            .entry(aggregate)
            .and_modify(|e| e.failures += 1)
            .or_insert(Entry {
                blocking_row: row,
                failures: 1,
                next_try,
            });
    }

    /// The row holding `aggregate` back, if it is blocked.
    pub fn blocker(&self, aggregate: &Aggregate) -> Option<Uuid> {
        self.entries.get(aggregate).map(|e| e.blocking_row)
    }

    /// How many times a row of `aggregate` failed since it was blocked.
    pub fn failures(&self, aggregate: &Aggregate) -> Option<u64> {
        self.entries.get(aggregate).map(|e| e.failures)
    }

    /// Aggregates whose next try is due at `now`.
    pub fn due(&self, now: Instant) -> Vec<Aggregate> {
        let mut due: Vec<Aggregate> = self
            .entries
            .iter()
            .filter(|(_, e)| e.next_try <= now)
            .map(|(a, _)| a.clone())
            .collect();
        due.sort_by(|a, b| {
            (&a.aggregatetype, &a.aggregateid).cmp(&(&b.aggregatetype, &b.aggregateid))
        });
        due
    }

    /// The aggregate was tried and is still blocked; `again_at_once` when there is more to do
    /// right away (a long backlog of parked rows), else after the interval.
    pub fn tried(&mut self, aggregate: &Aggregate, now: Instant, again_at_once: bool) {
        if let Some(e) = self.entries.get_mut(aggregate) {
            e.next_try = if again_at_once {
                now
            } else {
                now + self.interval
            };
        }
    }

    pub fn unblock(&mut self, aggregate: &Aggregate) -> bool {
        self.entries.remove(aggregate).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(id: &str) -> Aggregate {
        Aggregate {
            aggregatetype: Bytes::from_static(b"order"),
            aggregateid: Bytes::from(id.to_owned()),
        }
    }

    #[test]
    fn the_first_failure_blocks_and_later_ones_only_count() {
        let mut b = Blocked::new(Duration::from_secs(10));
        let now = Instant::now();
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(b.blocker(&agg("1")).is_none());
        b.block(agg("1"), first, now);
        b.block(agg("1"), second, now);
        assert_eq!(b.blocker(&agg("1")), Some(first));
        assert_eq!(b.failures(&agg("1")), Some(2));
        assert!(b.blocker(&agg("2")).is_none(), "other aggregates flow");
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn aggregates_are_due_after_the_interval_and_leave_when_unblocked() {
        let mut b = Blocked::new(Duration::from_secs(10));
        let now = Instant::now();
        b.block(agg("2"), Uuid::new_v4(), now);
        b.block(agg("1"), Uuid::new_v4(), now);
        assert!(b.due(now).is_empty());
        let later = now + Duration::from_secs(10);
        assert_eq!(b.due(later), vec![agg("1"), agg("2")]);
        b.tried(&agg("1"), later, false);
        assert_eq!(b.due(later), vec![agg("2")]);
        b.tried(&agg("2"), later, true);
        assert_eq!(b.due(later), vec![agg("2")]);
        assert!(b.unblock(&agg("2")));
        assert!(!b.unblock(&agg("2")));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_message_and_its_row_name_the_same_aggregate() {
        let row = RawRow {
            aggregatetype: Some(Bytes::from_static(b"order")),
            aggregateid: Some(Bytes::from_static(b"o-1")),
            ..Default::default()
        };
        let msg = OutboxMessage {
            id: Uuid::nil(),
            topic: "t".into(),
            key: Bytes::from_static(b"o-1"),
            payload: None,
            headers: vec![
                ("id".into(), Bytes::from_static(b"x")),
                ("aggregatetype".into(), Bytes::from_static(b"order")),
            ],
        };
        assert_eq!(Aggregate::of_row(&row), Aggregate::of_message(&msg));
        assert_eq!(Aggregate::of_row(&row).to_string(), "order/o-1");
    }
}
