//! The acknowledged watermark: how far the replication slot may advance.
//!
//! Guarantee: [`Watermark::flushable`] never passes a transaction that still has a message not
//! completed (acknowledged by the broker and, when configured, marked delivered), nor any
//! transaction after it. Completions may arrive in any order; the watermark moves in commit order.
//! Memory is one small entry per transaction in flight, never per message.

use std::collections::VecDeque;

use crate::replication::Lsn;

pub use crate::sink::TxSeq;

#[derive(Debug)]
struct TxEntry {
    /// `None` while the transaction's Commit has not been read yet.
    end_lsn: Option<Lsn>,
    outstanding: u64,
    /// Set when a reconnect abandoned this (open) transaction: it will be read again.
    abandoned: bool,
}

#[derive(Debug)]
pub struct Watermark {
    /// Transactions not yet fully completed, in commit order; `entries[0]` has `front_seq`.
    entries: VecDeque<TxEntry>,
    front_seq: TxSeq,
    flushable: Lsn,
}

impl Watermark {
    /// Starts at `start`, the slot's confirmed position.
    pub fn new(start: Lsn) -> Self {
        Watermark {
            entries: VecDeque::new(),
            front_seq: 0,
            flushable: start,
        }
    }

    /// Everything up to here is completed and may be confirmed to Postgres.
    pub fn flushable(&self) -> Lsn {
        self.flushable
    }

    /// Transactions begun and not yet completed.
    pub fn pending_transactions(&self) -> usize {
        self.entries.len()
    }

    /// Whether the newest transaction has begun, has no end and was not abandoned.
    pub fn has_unfinished(&self) -> bool {
        self.entries
            .back()
            .is_some_and(|e| e.end_lsn.is_none() && !e.abandoned)
    }

    /// A transaction starts; its messages carry the returned sequence number.
    pub fn begin(&mut self) -> TxSeq {
        self.entries.push_back(TxEntry {
            end_lsn: None,
            outstanding: 0,
            abandoned: false,
        });
        self.front_seq + self.entries.len() as u64 - 1
    }

    fn entry(&mut self, seq: TxSeq) -> Option<&mut TxEntry> {
        let idx = seq.checked_sub(self.front_seq)?;
        self.entries.get_mut(usize::try_from(idx).ok()?)
    }

    /// One more message of transaction `seq` went to the sink.
    pub fn add_message(&mut self, seq: TxSeq) {
        if let Some(e) = self.entry(seq) {
            e.outstanding += 1;
        }
    }

    /// The transaction's Commit was read; it ends at `end_lsn`.
    pub fn commit(&mut self, seq: TxSeq, end_lsn: Lsn) {
        if let Some(e) = self.entry(seq) {
            e.end_lsn = Some(end_lsn);
        }
        self.advance();
    }

    /// `n` messages of transaction `seq` are completed.
    pub fn complete(&mut self, seq: TxSeq, n: u64) {
        if let Some(e) = self.entry(seq) {
            e.outstanding = e.outstanding.saturating_sub(n);
        }
        self.advance();
    }

    /// The stream was lost: the open (uncommitted) transaction will be read again from the slot,
    /// so it no longer holds the watermark back; late completions of its messages are ignored.
    pub fn abandon_open(&mut self) {
        if let Some(e) = self.entries.back_mut()
            && e.end_lsn.is_none()
        {
            e.abandoned = true;
        }
        self.advance();
    }

    /// The server reports it has sent everything up to `wal_end`. With nothing pending, that
    /// position is safe to confirm, so an idle outbox never pins WAL.
    pub fn observe_idle(&mut self, wal_end: Lsn) {
        if self.entries.is_empty() && wal_end > self.flushable {
            self.flushable = wal_end;
        }
    }

    fn advance(&mut self) {
        while let Some(front) = self.entries.front() {
            let done = front.abandoned || (front.end_lsn.is_some() && front.outstanding == 0);
            if !done {
                break;
            }
            if let Some(end) = front.end_lsn
                && end > self.flushable
            {
                self.flushable = end;
            }
            self.entries.pop_front();
            self.front_seq += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_past_fully_completed_prefix() {
        let mut w = Watermark::new(Lsn(10));
        let a = w.begin();
        w.add_message(a);
        w.add_message(a);
        w.commit(a, Lsn(100));
        let b = w.begin();
        w.add_message(b);
        w.commit(b, Lsn(200));
        assert_eq!(w.flushable(), Lsn(10));

        // b completes first: nothing moves, a is still outstanding.
        w.complete(b, 1);
        assert_eq!(w.flushable(), Lsn(10));
        w.complete(a, 1);
        assert_eq!(w.flushable(), Lsn(10));
        w.complete(a, 1);
        assert_eq!(w.flushable(), Lsn(200));
        assert_eq!(w.pending_transactions(), 0);
    }

    #[test]
    fn uncommitted_transaction_holds_back_even_when_acked() {
        let mut w = Watermark::new(Lsn(0));
        let a = w.begin();
        w.add_message(a);
        w.complete(a, 1);
        assert_eq!(w.flushable(), Lsn(0));
        w.commit(a, Lsn(50));
        assert_eq!(w.flushable(), Lsn(50));
    }

    #[test]
    fn empty_transactions_complete_at_commit() {
        let mut w = Watermark::new(Lsn(0));
        let a = w.begin();
        w.commit(a, Lsn(70));
        assert_eq!(w.flushable(), Lsn(70));
    }

    #[test]
    fn idle_keepalive_moves_only_when_nothing_pending() {
        let mut w = Watermark::new(Lsn(5));
        w.observe_idle(Lsn(9));
        assert_eq!(w.flushable(), Lsn(9));
        let a = w.begin();
        w.add_message(a);
        w.observe_idle(Lsn(20));
        assert_eq!(w.flushable(), Lsn(9));
        w.commit(a, Lsn(15));
        w.complete(a, 1);
        assert_eq!(w.flushable(), Lsn(15));
        w.observe_idle(Lsn(12)); // never backwards
        assert_eq!(w.flushable(), Lsn(15));
    }

    #[test]
    fn abandoned_open_transaction_releases_and_ignores_late_acks() {
        let mut w = Watermark::new(Lsn(0));
        let a = w.begin();
        w.add_message(a);
        w.commit(a, Lsn(30));
        let b = w.begin();
        w.add_message(b);
        w.abandon_open();
        w.complete(a, 1);
        assert_eq!(w.flushable(), Lsn(30));
        assert_eq!(w.pending_transactions(), 0);
        w.complete(b, 1); // late ack of the abandoned transaction: ignored
        let c = w.begin();
        w.add_message(c);
        w.commit(c, Lsn(40));
        assert_eq!(w.flushable(), Lsn(30));
        w.complete(c, 1);
        assert_eq!(w.flushable(), Lsn(40));
    }

    #[test]
    fn many_interleaved_completions_reach_the_last_commit() {
        let mut w = Watermark::new(Lsn(0));
        let seqs: Vec<_> = (0..100u64)
            .map(|i| {
                let s = w.begin();
                for _ in 0..3 {
                    w.add_message(s);
                }
                w.commit(s, Lsn(1000 + i));
                s
            })
            .collect();
        // Complete in reverse order, one message at a time.
        for _ in 0..3 {
            for s in seqs.iter().rev() {
                w.complete(*s, 1);
            }
        }
        assert_eq!(w.flushable(), Lsn(1099));
    }
}
