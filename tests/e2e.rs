//! End-to-end behaviour of the relay against a private Postgres and a Tansu broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);
const LINGER: Duration = Duration::from_secs(2);

/// Committed rows arrive once each with the right topic, key, headers and payload; a rolled-back
/// transaction publishes nothing; every row is marked delivered and the slot passes the last
/// commit.
#[tokio::test(flavor = "multi_thread")]
async fn committed_rows_arrive_once_with_routing_and_rollbacks_publish_nothing() {
    // A per-row topic outside the template's prefix is opt-in (kafka.allowed_topics).
    let Stack {
        pg,
        broker,
        mut relay,
    } = Stack::start(&[(
        "RELAY_KAFKA__ALLOWED_TOPICS",
        "outbox.event.*, custom.customers",
    )]);
    let mut db = pg.client().await;

    let committed = insert_rows(&mut db, "order", 3, 20, true).await;
    let rolled_back = insert_rows(&mut db, "order", 3, 5, false).await;
    db.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers, topic) VALUES \
         ('11111111-1111-1111-1111-111111111111', 'customer', 'c-1', 'CustomerCreated', \
          '{\"name\": \"Ada\"}', '{\"trace-id\": \"t-1\", \"tenant\": \"acme\"}', NULL), \
         ('22222222-2222-2222-2222-222222222222', 'customer', 'c-2', 'CustomerMoved', \
          '{\"city\": \"Oslo\"}', NULL, 'custom.customers')",
        &[],
    )
    .await
    .unwrap();
    let last_commit_lsn = current_wal(&db).await;

    let orders = consume(&broker.brokers(), &["outbox.event.order"], 20, WAIT, LINGER);
    let customers = consume(
        &broker.brokers(),
        &["outbox.event.customer"],
        1,
        WAIT,
        LINGER,
    );
    let custom = consume(&broker.brokers(), &["custom.customers"], 1, WAIT, LINGER);

    let got: Vec<&str> = orders.iter().map(Received::id).collect();
    assert_eq!(orders.len(), 20, "each committed row exactly once: {got:?}");
    let got: HashSet<&str> = got.into_iter().collect();
    let want: HashSet<&str> = committed.iter().map(String::as_str).collect();
    assert_eq!(got, want);
    for id in &rolled_back {
        assert!(
            !got.contains(id.as_str()),
            "rolled-back row {id} was published"
        );
    }
    for m in &orders {
        assert_eq!(m.headers["type"], "Created");
        assert_eq!(m.headers["aggregatetype"], "order");
        assert!(m.key.as_deref().unwrap().starts_with(b"agg-"));
        let payload: serde_json::Value =
            serde_json::from_slice(m.payload.as_ref().unwrap()).unwrap();
        assert!(payload["seq"].is_i64());
    }

    assert_eq!(customers.len(), 1);
    let c = &customers[0];
    assert_eq!(c.id(), "11111111-1111-1111-1111-111111111111");
    assert_eq!(c.key.as_deref(), Some(&b"c-1"[..]));
    assert_eq!(c.headers["type"], "CustomerCreated");
    assert_eq!(c.headers["trace-id"], "t-1");
    assert_eq!(c.headers["tenant"], "acme");
    let payload: serde_json::Value = serde_json::from_slice(c.payload.as_ref().unwrap()).unwrap();
    assert_eq!(payload, serde_json::json!({"name": "Ada"}));

    assert_eq!(
        custom.len(),
        1,
        "the row's topic column overrides the template"
    );
    assert_eq!(custom[0].id(), "22222222-2222-2222-2222-222222222222");

    assert!(
        all_delivered(&db, WAIT).await,
        "every published row gets delivered_at"
    );
    let slot_passed = eventually(WAIT, || async {
        confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) >= last_commit_lsn
    })
    .await;
    assert!(slot_passed, "confirmed_flush_lsn passes the last commit");
    assert!(relay.terminate().success(), "clean exit on SIGTERM");
}

/// Per-aggregate order is kept over 10k rows on a 4-partition topic (with three marking
/// connections, so marking batches overlap and complete out of order).
#[tokio::test(flavor = "multi_thread")]
async fn per_aggregate_order_is_kept_over_10k_rows_on_4_partitions() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    broker.create_topic("outbox.event.ledger", 4);
    let _relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_PIPELINE__MARK_CONNECTIONS", "3")],
    ));
    let mut db = pg.client().await;

    // 100 transactions of 100 rows over 37 aggregates: order within and across transactions.
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.extend(insert_rows(&mut db, "ledger", 37, 100, true).await);
    }
    let end = current_wal(&db).await;
    let got = consume(
        &broker.brokers(),
        &["outbox.event.ledger"],
        10_000,
        WAIT,
        LINGER,
    );
    assert_eq!(got.len(), 10_000);
    let partitions: HashSet<i32> = got.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 4, "all four partitions used");

    let commit_pos: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    // Within a partition, offsets are the broker's order; per aggregate it must follow commits.
    let mut by_aggregate: HashMap<Vec<u8>, Vec<(i32, i64, usize)>> = HashMap::new();
    for m in &got {
        by_aggregate
            .entry(m.key.clone().unwrap())
            .or_default()
            .push((m.partition, m.offset, commit_pos[m.id()]));
    }
    for (key, mut seen) in by_aggregate {
        let parts: HashSet<i32> = seen.iter().map(|s| s.0).collect();
        assert_eq!(parts.len(), 1, "aggregate {key:?} spread over partitions");
        seen.sort_by_key(|s| s.1);
        assert!(
            seen.windows(2).all(|w| w[0].2 < w[1].2),
            "aggregate {:?} out of commit order",
            String::from_utf8_lossy(&key)
        );
    }
    // Every row marked, and the slot passes the last commit once the marks are in.
    assert!(all_delivered(&db, WAIT).await);
    let deadline = std::time::Instant::now() + WAIT;
    while confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) < end {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never reached {end}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` from `port` on 127.0.0.1 (HTTP/1.0, whole body).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The value of the sample `name` (exact, labels included) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The admin listener serves Prometheus metrics (every named series), `/healthz` and `/readyz`:
/// every row read, published, acknowledged and marked is counted, each row read from the WAL adds
/// its commit → acknowledgement time to the histogram, the slot gauges are read from Postgres,
/// the retained-WAL warning fires past its threshold, and readiness follows the broker.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_probes_on_the_admin_listener() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A bounded slot: safe_wal_size is reported.
    let pg = PgCluster::start_with(&[("wal_level", "logical"), ("max_slot_wal_keep_size", "1GB")]);
    pg.apply_schema();
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_HTTP__ADDR", &listen),
            ("RELAY_METRICS__POLL_INTERVAL_MS", "200"),
            // Any retained WAL is "too much": the warning must fire.
            ("RELAY_METRICS__RETAINED_WAL_WARN_BYTES", "1"),
        ],
    ));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "metered", 2, 25, true).await;
    insert_rows(&mut db, "metered", 2, 5, false).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    assert!(http_get(port, "/healthz").starts_with("HTTP/1.0 200"));
    let ready = eventually(WAIT, || async {
        http_get(port, "/readyz").starts_with("HTTP/1.0 200")
    })
    .await;
    assert!(ready, "{}", http_get(port, "/readyz"));
    // The gauges are polled: wait until the backlog reads empty.
    let polled = eventually(WAIT, || async {
        sample(
            &http_get(port, "/metrics"),
            "outbox_relay_oldest_undelivered_age_seconds",
        ) == Some(0.0)
    })
    .await;
    let page = http_get(port, "/metrics");
    assert!(polled, "{page}");
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    for (series, value) in [
        ("outbox_relay_rows_read_total", 25.0),
        ("outbox_relay_messages_published_total", 25.0),
        ("outbox_relay_messages_acked_total", 25.0),
        ("outbox_relay_rows_marked_total{state=\"delivered\"}", 25.0),
        ("outbox_relay_commit_to_ack_seconds_count", 25.0),
        // Buckets are cumulative and end with every observation.
        (
            "outbox_relay_commit_to_ack_seconds_bucket{le=\"+Inf\"}",
            25.0,
        ),
        ("outbox_relay_in_flight_messages", 0.0),
        ("outbox_relay_streaming", 1.0),
        ("outbox_relay_slot_retained_wal_warning", 1.0),
    ] {
        assert_eq!(sample(&page, series), Some(value), "{series}\n{page}");
    }
    let sum = sample(&page, "outbox_relay_commit_to_ack_seconds_sum").expect("sum");
    assert!(sum > 0.0 && sum < 25.0 * 120.0, "sum {sum}");
    let batches = sample(&page, "outbox_relay_mark_batch_rows_count").expect("batch sizes");
    assert!((1.0..=25.0).contains(&batches), "{page}");
    assert_eq!(
        sample(&page, "outbox_relay_mark_batch_rows_sum"),
        Some(25.0)
    );
    let retained = sample(&page, "outbox_relay_slot_retained_wal_bytes").expect("retained");
    let lag = sample(&page, "outbox_relay_replication_lag_bytes").expect("lag");
    assert!(retained > 0.0 && lag >= 0.0 && lag <= retained, "{page}");
    let safe = sample(&page, "outbox_relay_slot_safe_wal_size_bytes").expect("safe_wal_size");
    // About max_slot_wal_keep_size (Postgres counts whole segments).
    assert!(
        safe > 0.0 && safe < 2.0 * 1024.0 * 1024.0 * 1024.0,
        "{page}"
    );
    // Nothing failed: the failure counters are there, at zero.
    for series in [
        "outbox_relay_dead_lettered_total",
        "outbox_relay_retries_total{stage=\"refused\"}",
    ] {
        assert_eq!(sample(&page, series), Some(0.0), "{series}\n{page}");
    }
    assert!(
        relay
            .log()
            .contains("the replication slot retains more WAL than metrics.retained_wal_warn_bytes"),
        "{}",
        relay.log()
    );

    // The broker stops answering: not ready, with the reason; back when it answers again.
    broker.pause();
    let unready = eventually(WAIT, || async {
        let r = http_get(port, "/readyz");
        r.starts_with("HTTP/1.0 503") && r.contains("broker not reachable")
    })
    .await;
    broker.resume();
    assert!(unready, "{}", http_get(port, "/readyz"));
    let ready_again = eventually(WAIT, || async {
        http_get(port, "/readyz").starts_with("HTTP/1.0 200")
    })
    .await;
    assert!(ready_again, "{}", http_get(port, "/readyz"));
}
