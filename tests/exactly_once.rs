//! `delivery = "exactly_once"`: Kafka transactions carrying the relay's source position.
//!
//! Tansu 0.6.0 has no EndTxn, and librdkafka's mock cluster, though it accepts transactions,
//! neither hides aborted records from `read_committed` consumers nor fences older producers; see
//! [`TxnBroker`]. These tests run against a broker that does both, except error injection, which
//! only the mock cluster offers.

use std::time::Duration;

use crate::support::*;
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
    let broker = TxnBroker::start();
    let brokers = broker.brokers();
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

/// A second relay with the same transactional id fences the first: the first stops with a
/// message that says why, the second goes on, and no row is lost. (A second relay on the same
/// slot waits for the leader lock instead — see `operations.rs`; this is the misconfigured case,
/// a copy of the configuration pointed at another slot, or a zombie that lost its lock session.)
#[tokio::test(flavor = "multi_thread")]
async fn a_second_relay_with_the_same_transactional_id_fences_the_first() {
    let broker = TxnBroker::start();
    let brokers = broker.brokers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let env = eos_env(&pg, &brokers, "relay-fence");
    let mut first = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "order", 4, 40, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", first.log());

    let mut second_env = env.clone();
    second_env.push(("RELAY_POSTGRES__SLOT".into(), "outbox_relay_copy".into()));
    let second = Relay::start(&second_env);
    let initialised = eventually(WAIT, || {
        let log = second.log();
        async move { log.contains("Kafka transactions initialised") }
    })
    .await;
    assert!(initialised, "second relay: {}", second.log());
    // The first relay learns it was fenced when it next produces or commits.
    ids.extend(insert_rows(&mut db, "order", 4, 40, true).await);
    let status = first
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the fenced relay kept running: {}", first.log()));
    assert!(!status.success(), "a fenced relay exits with an error");
    let log = first.log();
    assert!(
        log.contains("fenced") && log.contains("exactly_once.transactional_id"),
        "the fenced relay says why: {log}"
    );
    assert!(all_delivered(&db, WAIT).await, "{}", second.log());
    receive_all(&brokers, TOPIC, &ids, WAIT);
}

/// Produce requests refused inside a Kafka transaction (injected by librdkafka's mock cluster)
/// abort it; the relay sends the transaction again and every row arrives once. The topic has one
/// partition and the errors are armed while no transaction is open, so the refused requests are
/// the aborted transaction's only data requests: the mock keeps aborted records visible, and this
/// way there are none.
#[tokio::test(flavor = "multi_thread")]
async fn produce_errors_inside_a_transaction_abort_it_and_it_is_sent_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, 1, 1).expect("topic");
    // The mock answers no CreateTopics, and the relay's clients never auto-create a topic.
    mock.create_topic(PROGRESS, 1, 1).expect("progress topic");
    let brokers = mock.bootstrap_servers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = Relay::start(&eos_env(&pg, &brokers, "relay-abort"));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "order", 4, 20, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 2],
    );
    // Two Postgres transactions: the second one's rows are usually handed over after the first
    // request was refused, while the Kafka transaction can only be aborted (librdkafka refuses
    // them at once with an "erroneous state" error, which must abort too, not dead-letter).
    ids.extend(insert_rows(&mut db, "order", 4, 25, true).await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    ids.extend(insert_rows(&mut db, "order", 4, 25, true).await);
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let log = relay.log();
    assert!(
        log.contains("aborting the Kafka transaction"),
        "the refused sends aborted a transaction: {log}"
    );
    assert!(
        !log.contains("dead-letter"),
        "nothing is a poison row here: {log}"
    );
    let got = consume(&brokers, &[TOPIC], ids.len(), WAIT, LINGER);
    let seen: std::collections::HashSet<&str> = got.iter().map(Received::id).collect();
    assert_eq!(got.len(), ids.len(), "no duplicates: {log}");
    assert!(
        ids.iter().all(|id| seen.contains(id.as_str())),
        "none lost: {log}"
    );
}
