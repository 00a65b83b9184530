//! Prometheus metrics, served at `GET /metrics` on the admin HTTP listener (`http.addr`).
//!
//! Metric names are constants here so dashboards, the benchmark and the README agree. Recording
//! goes through the `metrics` facade: without an installed recorder (library use, tests) every
//! record is a no-op.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: outbox rows read (from the WAL, the first-start snapshot, and redrives).
pub const ROWS_READ: &str = "outbox_relay_rows_read_total";
/// Counter: messages handed to the broker client (dead-letter records and the pipeline's sends
/// after a refusal included; the broker client's own retries are not).
pub const MESSAGES_PUBLISHED: &str = "outbox_relay_messages_published_total";
/// Counter: messages the broker acknowledged (dead-letter records included).
pub const MESSAGES_ACKED: &str = "outbox_relay_messages_acked_total";
/// Counter: sends tried again after a failure, by `stage` (`broker`: the broker client's retry
/// after a transient error; `refused`: the pipeline's after the broker refused a message).
pub const RETRIES: &str = "outbox_relay_retries_total";
/// Counter: rows whose message went to the dead-letter topic.
pub const DEAD_LETTERED: &str = "outbox_relay_dead_lettered_total";
/// Counter: rows marked in the outbox, by `state` (`delivered`, `failed`); its rate is marks/s.
pub const ROWS_MARKED: &str = "outbox_relay_rows_marked_total";
/// Histogram: rows per marking statement (the marking stage's batch size).
pub const MARK_BATCH_ROWS: &str = "outbox_relay_mark_batch_rows";
/// Histogram: seconds from the source transaction's commit (Postgres' clock) to the broker's
/// acknowledgement of the row's message (the relay's clock). Rows read from the WAL only.
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
/// Histogram: the same path split by `stage`, per message read from the WAL (first send only):
/// `walsender` from the commit to Postgres sending the WAL message that carries the row (both
/// Postgres' clock: WAL flush, the walsender waking up, decoding); `relay` from that send to
/// the relay handing the message to the broker client (network, the relay's read and decode,
/// waits in its stream loop); `broker` from that hand-over to the acknowledgement (the broker
/// client's batching, the broker, retries). Where a slow commit → ack comes from.
pub const STAGE_LATENCY: &str = "outbox_relay_stage_seconds";
/// Gauge: rows the pipeline holds: handed to the broker (or parked, or already in a committed
/// Kafka transaction) and not yet confirmed and marked.
pub const IN_FLIGHT: &str = "outbox_relay_in_flight_messages";
/// Gauge: 1 while this relay streams from the slot (0: waiting, e.g. the standby of a pair).
pub const STREAMING: &str = "outbox_relay_streaming";
/// Gauge: `pg_current_wal_lsn() - confirmed_flush_lsn` of the slot (bytes).
pub const REPLICATION_LAG: &str = "outbox_relay_replication_lag_bytes";
/// Gauge: WAL the slot keeps on the server, `pg_current_wal_lsn() - restart_lsn` (bytes).
pub const RETAINED_WAL: &str = "outbox_relay_slot_retained_wal_bytes";
/// Gauge: `safe_wal_size` of the slot: WAL that can still be written before the slot is lost
/// (bytes; absent when `max_slot_wal_keep_size` is unlimited).
pub const SAFE_WAL_SIZE: &str = "outbox_relay_slot_safe_wal_size_bytes";
/// Gauge: 1 while the retained WAL is above `metrics.retained_wal_warn_bytes`.
pub const RETAINED_WAL_WARNING: &str = "outbox_relay_slot_retained_wal_warning";
/// Gauge: age of the oldest row neither delivered nor failed (seconds; 0 when none).
pub const OLDEST_UNDELIVERED: &str = "outbox_relay_oldest_undelivered_age_seconds";
/// Gauge: the delivery ledger's low watermark (`outbox.on_delivered = "record"`): every row
/// whose `seq` is below it is delivered or failed.
pub const DELIVERED_BELOW: &str = "outbox_relay_delivered_below_seq";
/// Counter: delivered rows deleted by the retention (`retention.delivered_hours`).
pub const ROWS_DELETED: &str = "outbox_relay_rows_deleted_total";
/// Counter: transaction checks answered, by `source` (`http`, `dtm`, `rocketmq`) and `status`
/// (`committed`, `rolled_back`, `unknown`).
pub const TRANSACTION_CHECKS: &str = "outbox_relay_transaction_checks_total";
/// Counter: END_TRANSACTION requests the RocketMQ sink sent for its own half messages, by
/// `resolution` (`commit`, `rollback`) and `result` (`ok`, `error`: left to the check-back).
pub const ROCKETMQ_END_TRANSACTIONS: &str = "outbox_relay_rocketmq_end_transactions_total";
/// Counter: messages NATS JetStream acknowledged as duplicates (a resend of a message id inside
/// the stream's duplicate window: stored once).
pub const NATS_DUPLICATES: &str = "outbox_relay_nats_duplicates_total";

/// Bucket bounds (seconds) of the latency histograms: fine below 100 ms, where the relay's own
/// share of the latency lives, coarse above.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.012, 0.015, 0.020,
    0.025, 0.030, 0.040, 0.050, 0.075, 0.100, 0.150, 0.200, 0.300, 0.500, 0.750, 1.0, 2.0, 5.0,
    10.0, 30.0, 60.0,
];

/// Bucket bounds of the batch-size histogram.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders. Call once
/// per process, inside a Tokio runtime (it starts the recorder's upkeep task).
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(MARK_BATCH_ROWS.into()), BATCH_BUCKETS)
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    // Histogram samples are kept raw until upkeep folds them into the buckets: at 100k rows/s
    // and four latency samples per row that is 3 MB a second, so fold every second (every 5 s
    // added 12 MB to the relay's peak RSS in a 1M-row drain).
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            upkeep.run_upkeep();
        }
    });
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        ROWS_READ,
        "Outbox rows read (WAL, first-start snapshot, redrives)"
    );
    describe_counter!(MESSAGES_PUBLISHED, "Messages handed to the broker client");
    describe_counter!(MESSAGES_ACKED, "Messages the broker acknowledged");
    describe_counter!(RETRIES, "Sends tried again after a failure, by stage");
    describe_counter!(
        DEAD_LETTERED,
        "Rows whose message went to the dead-letter topic"
    );
    describe_counter!(ROWS_MARKED, "Rows marked in the outbox, by state");
    describe_histogram!(MARK_BATCH_ROWS, "Rows per marking statement");
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "Source transaction commit (Postgres clock) to broker acknowledgement (relay clock)"
    );
    describe_histogram!(
        STAGE_LATENCY,
        Unit::Seconds,
        "Commit to acknowledgement by stage: walsender (commit to Postgres sending the row), \
         relay (that send to the hand-over to the broker client), broker (hand-over to ack)"
    );
    describe_gauge!(
        IN_FLIGHT,
        "Rows in flight: handed over and not yet confirmed and marked"
    );
    describe_gauge!(STREAMING, "1 while this relay streams from the slot");
    describe_gauge!(
        REPLICATION_LAG,
        Unit::Bytes,
        "pg_current_wal_lsn() - confirmed_flush_lsn of the slot"
    );
    describe_gauge!(
        RETAINED_WAL,
        Unit::Bytes,
        "WAL the slot keeps on the server (pg_current_wal_lsn() - restart_lsn)"
    );
    describe_gauge!(
        SAFE_WAL_SIZE,
        Unit::Bytes,
        "WAL that can still be written before the slot is lost"
    );
    describe_gauge!(
        RETAINED_WAL_WARNING,
        "1 while retained WAL is above metrics.retained_wal_warn_bytes"
    );
    describe_gauge!(
        OLDEST_UNDELIVERED,
        Unit::Seconds,
        "Age of the oldest row neither delivered nor failed"
    );
    describe_gauge!(
        DELIVERED_BELOW,
        "Delivery ledger watermark: every row with a lower seq is delivered or failed"
    );
    describe_counter!(ROWS_DELETED, "Delivered rows deleted by the retention");
    describe_counter!(
        TRANSACTION_CHECKS,
        "Transaction checks answered from the oracle, by source and status"
    );
    describe_counter!(
        ROCKETMQ_END_TRANSACTIONS,
        "END_TRANSACTION requests for the RocketMQ sink's half messages, by resolution and result"
    );
    describe_counter!(
        NATS_DUPLICATES,
        "Resends JetStream dropped as duplicates of a stored message id (stored once)"
    );
}

/// Handles of the acknowledgement metrics, registered once (after [`install`]: handles taken
/// before it record nothing).
pub struct AckMetrics {
    acked: metrics::Counter,
    commit_to_ack: metrics::Histogram,
    broker_stage: metrics::Histogram,
}

impl AckMetrics {
    pub fn new() -> AckMetrics {
        AckMetrics {
            acked: metrics::counter!(MESSAGES_ACKED),
            commit_to_ack: metrics::histogram!(COMMIT_TO_ACK),
            broker_stage: metrics::histogram!(STAGE_LATENCY, "stage" => "broker"),
        }
    }

    /// One acknowledged message: its source commit (Postgres' epoch, µs) and when the pipeline
    /// handed it to the broker client, where known.
    pub fn acked(&self, commit_time: Option<i64>, handed_at: Option<Instant>) {
        self.acked.increment(1);
        if let Some(handed) = handed_at {
            self.broker_stage.record(handed.elapsed().as_secs_f64());
        }
        if let Some(commit) = commit_time
            && let Some(secs) = seconds_since_pg_time(commit, SystemTime::now())
        {
            self.commit_to_ack.record(secs);
        }
    }
}

/// Handles of the first two stages of [`STAGE_LATENCY`], recorded when a row read from the WAL
/// is handed to the broker client.
pub struct SendMetrics {
    walsender: metrics::Histogram,
    relay: metrics::Histogram,
}

impl SendMetrics {
    pub fn new() -> SendMetrics {
        SendMetrics {
            walsender: metrics::histogram!(STAGE_LATENCY, "stage" => "walsender"),
            relay: metrics::histogram!(STAGE_LATENCY, "stage" => "relay"),
        }
    }

    /// A row committed at `commit_time` and sent by the walsender at `sent_time` (both
    /// Postgres' epoch, µs) is being handed to the broker client now.
    pub fn handing(&self, commit_time: i64, sent_time: i64) {
        self.walsender
            .record((sent_time - commit_time).max(0) as f64 / 1e6);
        if let Some(secs) = seconds_since_pg_time(sent_time, SystemTime::now()) {
            self.relay.record(secs);
        }
    }
}

impl Default for SendMetrics {
    fn default() -> Self {
        SendMetrics::new()
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
