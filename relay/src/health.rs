//! Liveness and readiness, for Kubernetes probes on the admin listener.
//!
//! `/healthz` answers while the process serves HTTP. `/readyz` answers 200 only while the relay
//! streams from its slot, the broker was reachable at the last probe (every
//! `metrics.poll_interval_ms`, at most 5 s apart), marking rows works, and messages in flight
//! keep completing (none completed for `health.stall_ms` while some are in flight is a stall):
//! the standby of an HA pair, a relay waiting for Postgres, one whose broker is down, or one
//! whose role lost its UPDATE grant reports 503 with the reasons.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::STREAMING;

/// What the probes report; shared by the runtime (streaming) and the broker probe.
#[derive(Debug)]
pub struct Health {
    streaming: AtomicBool,
    /// Why the broker is not reachable (`None`: it answered at the last probe).
    broker: Mutex<Option<String>>,
    /// Why rows cannot be marked (a missing grant or column), with the fix.
    marking: Mutex<Option<String>>,
    marking_failed: AtomicBool,
    /// Messages in flight, and when the last one completed (or the first went in flight).
    in_flight: AtomicUsize,
    last_completion: Mutex<Instant>,
    stall: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_millis(
            crate::config::HealthConfig::default().stall_ms,
        ))
    }
}

impl Health {
    /// `stall`: see `health.stall_ms` (zero: never report a stall).
    pub fn new(stall: Duration) -> Health {
        Health {
            streaming: AtomicBool::new(false),
            broker: Mutex::new(Some("not probed yet".into())),
            marking: Mutex::new(None),
            marking_failed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_completion: Mutex::new(Instant::now()),
            stall,
        }
    }

    /// Marking rows fails for a reason an operator must fix (`Some`), or works again (`None`).
    pub fn set_marking(&self, problem: Option<String>) {
        if problem.is_none() && !self.marking_failed.load(Ordering::Acquire) {
            return; // the common case: nothing to clear
        }
        self.marking_failed
            .store(problem.is_some(), Ordering::Release);
        if let Ok(mut m) = self.marking.lock() {
            *m = problem;
        }
    }

    /// The pipeline's count of messages in flight; `completed`: some completed just now.
    pub fn set_in_flight(&self, n: usize, completed: bool) {
        let before = self.in_flight.swap(n, Ordering::AcqRel);
        if (completed || before == 0)
            && let Ok(mut at) = self.last_completion.lock()
        {
            *at = Instant::now();
        }
    }

    /// `Some(reason)` while messages are in flight and none completed for the stall time.
    fn stalled(&self) -> Option<String> {
        let n = self.in_flight.load(Ordering::Acquire);
        if n == 0 || self.stall.is_zero() {
            return None;
        }
        let since = self.last_completion.lock().ok()?.elapsed();
        (since > self.stall).then(|| {
            format!(
                "{n} messages in flight and none completed (acknowledged and marked) for {} s \
                 (health.stall_ms); see the log for what the broker or Postgres answers",
                since.as_secs()
            )
        })
    }

    /// The relay started (true) or stopped (false) streaming from its slot.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Release);
        metrics::gauge!(STREAMING).set(if on { 1.0 } else { 0.0 });
    }

    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
    }

    /// The broker answered the last probe (`None`) or why not.
    pub fn set_broker(&self, problem: Option<String>) {
        if let Ok(mut b) = self.broker.lock() {
            *b = problem;
        }
    }

    /// `Ok` when ready; otherwise every reason it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.streaming() {
            why.push(
                "not streaming from the replication slot (starting, reconnecting, or another relay holds the slot)"
                    .to_owned(),
            );
        }
        if let Ok(b) = self.broker.lock()
            && let Some(problem) = b.as_ref()
        {
            why.push(format!("broker not reachable: {problem}"));
        }
        if self.marking_failed.load(Ordering::Acquire)
            && let Ok(m) = self.marking.lock()
            && let Some(problem) = m.as_ref()
        {
            why.push(format!("cannot mark rows: {problem}"));
        }
        if let Some(stall) = self.stalled() {
            why.push(stall);
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_streaming_with_a_reachable_broker() {
        let h = Health::default();
        let why = h.readiness().unwrap_err();
        assert_eq!(why.len(), 2, "{why:?}");
        h.set_broker(None);
        assert!(h.readiness().unwrap_err()[0].contains("not streaming"));
        h.set_streaming(true);
        assert!(h.readiness().is_ok());
        h.set_broker(Some("connection refused".into()));
        assert!(h.readiness().unwrap_err()[0].contains("connection refused"));
    }

    #[test]
    fn marking_problems_and_stalls_turn_readiness_red() {
        let h = Health::new(Duration::from_millis(50));
        h.set_broker(None);
        h.set_streaming(true);
        h.set_marking(Some(
            "permission denied for table outbox; GRANT UPDATE".into(),
        ));
        assert!(h.readiness().unwrap_err()[0].contains("GRANT UPDATE"));
        h.set_marking(None);
        assert!(h.readiness().is_ok());

        h.set_in_flight(3, false);
        assert!(h.readiness().is_ok(), "not stalled yet");
        std::thread::sleep(Duration::from_millis(80));
        assert!(h.readiness().unwrap_err()[0].contains("3 messages in flight"));
        h.set_in_flight(2, true);
        assert!(h.readiness().is_ok(), "a completion ends the stall");
        std::thread::sleep(Duration::from_millis(80));
        h.set_in_flight(0, true);
        assert!(h.readiness().is_ok(), "nothing in flight is no stall");
    }
}
