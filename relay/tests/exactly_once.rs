//! `delivery = "exactly_once"`: Kafka transactions carrying the relay's source position.
//!
//! Tansu 0.6.0 has no EndTxn, so these tests run against librdkafka's mock cluster (in this test
//! process; the relay reaches it over loopback TCP).

mod common;

use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;

const WAIT: Duration = Duration::from_secs(60);
const LINGER: Duration = Duration::from_secs(2);
const TOPIC: &str = "outbox.event.order";
const PROGRESS: &str = "outbox-relay.progress";

fn eos_env(pg: &PgCluster, brokers: &str, transactional_id: &str) -> Vec<(String, String)> {
    relay_env(
        pg,
        brokers,
        &[
            ("RELAY_DELIVERY", "exactly_once"),
            ("RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID", transactional_id),
            ("RELAY_EXACTLY_ONCE__BATCH_MAX_MS", "50"),
            ("RELAY_RETRY__MAX_DELAY_MS", "1000"),
        ],
    )
}

/// The position the progress topic holds for the default slot, as text.
fn progress_records(brokers: &str) -> Vec<serde_json::Value> {
    consume(
        brokers,
        &[PROGRESS],
        usize::MAX,
        Duration::from_secs(5),
        LINGER,
    )
    .iter()
    .map(|m| serde_json::from_slice(m.payload.as_deref().unwrap_or_default()).unwrap())
    .collect()
}

/// Rows go out once each inside Kafka transactions, each transaction with a progress record
/// naming the slot and the commit LSN reached; after a restart the relay resumes from there.
#[tokio::test(flavor = "multi_thread")]
async fn rows_are_published_in_transactions_with_the_source_position() {
    let mock = MockCluster::new(3).expect("mock cluster");
    let brokers = mock.bootstrap_servers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let env = eos_env(&pg, &brokers, "relay-smoke");
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.extend(insert_rows(&mut db, "order", 4, 50, true).await);
    }
    let last_commit = current_wal(&db).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(&brokers, &[TOPIC], ids.len(), WAIT, LINGER);
    assert_eq!(got.len(), ids.len(), "{}", relay.log());
    let records = progress_records(&brokers);
    let last = records.last().expect("a progress record");
    assert_eq!(last["slot"], "outbox_relay");
    assert_eq!(last["transactional_id"], "relay-smoke");
    let lsn: u64 = {
        let text = last["commit_end_lsn"].as_str().unwrap();
        let (hi, lo) = text.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    assert!(
        lsn >= last_commit,
        "progress {text} before the last commit",
        text = last["commit_end_lsn"]
    );

    relay.terminate();
    let relay = Relay::start(&env);
    ids.extend(insert_rows(&mut db, "order", 4, 30, true).await);
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(&brokers, &[TOPIC], ids.len(), WAIT, LINGER);
    assert_eq!(got.len(), ids.len(), "{}", relay.log());
    assert!(
        relay.log().contains("exactly-once"),
        "the restarted relay reads its position: {}",
        relay.log()
    );
}
