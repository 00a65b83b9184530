//! Prometheus metrics, served at `http://<metrics.listen>/metrics`.
//!
//! Metric names are constants here so dashboards, the benchmark and the README agree. Recording
//! goes through the `metrics` facade: without an installed exporter (library use, tests) every
//! record is a no-op.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Histogram: seconds from the source transaction's commit (Postgres' clock) to the broker's
/// acknowledgement of the row's message (the relay's clock). Rows read from the WAL only.
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
/// Counter: messages the broker acknowledged (dead-letter records included).
pub const MESSAGES_ACKED: &str = "outbox_relay_messages_acked_total";
/// Counter: transaction checks answered, by `source` (`http`, `dtm`, `rocketmq`) and `status`
/// (`committed`, `rolled_back`, `unknown`).
pub const TRANSACTION_CHECKS: &str = "outbox_relay_transaction_checks_total";

/// Counter: END_TRANSACTION requests the RocketMQ sink sent for its own half messages, by
/// `resolution` (`commit`, `rollback`) and `result` (`ok`, `error`: left to the check-back).
pub const ROCKETMQ_END_TRANSACTIONS: &str = "outbox_relay_rocketmq_end_transactions_total";

/// Bucket bounds (seconds) of the latency histograms: fine below 100 ms, where the relay's own
/// share of the latency lives, coarse above.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.012, 0.015, 0.020,
    0.025, 0.030, 0.040, 0.050, 0.075, 0.100, 0.150, 0.200, 0.300, 0.500, 0.750, 1.0, 2.0, 5.0,
    10.0, 30.0, 60.0,
];

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Installs the global recorder and serves it on `listen` (an empty string turns metrics off).
pub fn install(listen: &str) -> Result<Option<SocketAddr>, String> {
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = listen.parse().map_err(|e| {
        format!("metrics.listen = {listen:?} is not host:port ({e}); use e.g. 0.0.0.0:9464, or \"\" to turn metrics off")
    })?;
    // Bind here first, so a port in use is reported at start with the key to change.
    let probe = std::net::TcpListener::bind(addr).map_err(|e| {
        format!("cannot serve metrics on {addr}: {e}; set metrics.listen (RELAY_METRICS__LISTEN) to a free port, or \"\" to turn metrics off")
    })?;
    let bound = probe.local_addr().map_err(|e| e.to_string())?;
    drop(probe);
    PrometheusBuilder::new()
        .with_http_listener(bound)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot start the metrics exporter on {bound}: {e}"))?;
    metrics::describe_histogram!(
        COMMIT_TO_ACK,
        metrics::Unit::Seconds,
        "Source transaction commit (Postgres clock) to broker acknowledgement (relay clock)"
    );
    metrics::describe_counter!(MESSAGES_ACKED, "Messages the broker acknowledged");
    metrics::describe_counter!(
        TRANSACTION_CHECKS,
        "Transaction checks answered from the oracle, by source and status"
    );
    metrics::describe_counter!(
        ROCKETMQ_END_TRANSACTIONS,
        "END_TRANSACTION requests for the RocketMQ sink's half messages, by resolution and result"
    );
    Ok(Some(bound))
}

/// Handles of the acknowledgement metrics, registered once (after [`install`]: handles taken
/// before it record nothing).
pub struct AckMetrics {
    acked: metrics::Counter,
    commit_to_ack: metrics::Histogram,
}

impl AckMetrics {
    pub fn new() -> AckMetrics {
        AckMetrics {
            acked: metrics::counter!(MESSAGES_ACKED),
            commit_to_ack: metrics::histogram!(COMMIT_TO_ACK),
        }
    }

    /// One acknowledged message; `commit_time` is its source commit in Postgres' epoch (µs).
    pub fn acked(&self, commit_time: Option<i64>) {
        self.acked.increment(1);
        if let Some(commit) = commit_time
            && let Some(secs) = seconds_since_pg_time(commit, SystemTime::now())
        {
            self.commit_to_ack.record(secs);
        }
    }
}

impl Default for AckMetrics {
    fn default() -> Self {
        AckMetrics::new()
    }
}

/// Seconds from `pg_micros` (Postgres epoch) to `now`; 0 if the clocks put `now` first.
fn seconds_since_pg_time(pg_micros: i64, now: SystemTime) -> Option<f64> {
    let now_unix = i64::try_from(now.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()?;
    let delta = now_unix - (pg_micros + PG_EPOCH_UNIX_MICROS);
    Some(delta.max(0) as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn postgres_epoch_is_converted() {
        // 2000-01-01 00:00:01.5 UTC in Postgres time is 1.5 s after its epoch.
        let now = UNIX_EPOCH + Duration::from_micros(946_684_800_000_000 + 2_000_000);
        assert_eq!(seconds_since_pg_time(1_500_000, now), Some(0.5));
        // A commit "after" now (clock skew) counts as zero, not negative.
        assert_eq!(seconds_since_pg_time(3_000_000, now), Some(0.0));
    }
}
