//! RocketMQ check-backs against a real name server and broker (the Rust implementation from
//! crates.io) and a real Postgres: an app sends a half message, runs its local transaction, and
//! dies before END_TRANSACTION; the broker checks back; the relay answers from the oracle.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use outbox_relay::rocketmq::client::{self, HalfSend, Resolution};
use outbox_relay::rocketmq::connection::Connection;

const GROUP: &str = "app-tx";
const TOPIC: &str = "orders";

/// Every message on the topic's queues, by key.
async fn visible_keys(broker: &Connection) -> Vec<String> {
    let mut keys = Vec::new();
    for queue in 0..4 {
        let mut offset = 0;
        loop {
            let (msgs, next) = client::pull(broker, "test-reader", TOPIC, queue, offset)
                .await
                .expect("pull");
            if msgs.is_empty() {
                break;
            }
            keys.extend(msgs.iter().filter_map(|m| m.key().map(str::to_owned)));
            offset = next;
        }
    }
    keys
}

/// Whether the relay logged answering a check-back on `key` with `status`.
fn answered(log: &str, key: &str, status: &str) -> bool {
    log.lines().any(|l| {
        l.contains("answered a RocketMQ check-back")
            && l.contains(&format!("\"{key}\""))
            && l.contains(&format!("\"{status}\""))
    })
}

/// The app's half message for `key`.
async fn send_half(app: &Connection, key: &str) -> client::HalfMessage {
    let uniq = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    client::send_half(
        app,
        &HalfSend {
            producer_group: GROUP,
            topic: TOPIC,
            queue_id: 0,
            keys: key,
            uniq_key: &uniq,
            body: Bytes::from(format!("{{\"order\":\"{key}\"}}")),
            properties: &[],
        },
    )
    .await
    .expect("half message")
}

#[tokio::test]
async fn check_backs_commit_what_postgres_committed_and_roll_back_the_rest() {
    let rmq = RocketMq::start(1_000, 2_000);
    let pg = PgCluster::start();
    pg.apply_schema();
    let tansu = Tansu::start();
    let relay = Relay::start(&relay_env(
        &pg,
        &tansu.brokers(),
        &[
            ("RELAY_ROCKETMQ__NAME_SERVER", &rmq.name_server()),
            ("RELAY_ROCKETMQ__PRODUCER_GROUPS", GROUP),
            ("RELAY_ROCKETMQ__HEARTBEAT_INTERVAL_MS", "1000"),
            ("RELAY_TRANSACTIONS__LOCK_TIMEOUT_MS", "500"),
        ],
    ));
    let mut db = pg.client().await;
    db.batch_execute("CREATE TABLE orders (id text PRIMARY KEY)")
        .await
        .expect("business table");

    let app = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5))
        .await
        .expect("connect to the broker");
    client::create_topic(&app, TOPIC, 4)
        .await
        .expect("create topic");

    // 1. Local transaction committed, then the app died before END_TRANSACTION.
    send_half(&app, "committed-1").await;
    let tx = db.transaction().await.expect("begin");
    tx.execute("SELECT outbox_tx_begin('committed-1')", &[])
        .await
        .expect("barrier");
    tx.execute("INSERT INTO orders VALUES ('committed-1')", &[])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    // 2. Local transaction rolled back, then the app died.
    send_half(&app, "rolled-back-2").await;
    let tx = db.transaction().await.expect("begin");
    tx.execute("SELECT outbox_tx_begin('rolled-back-2')", &[])
        .await
        .expect("barrier");
    tx.rollback().await.expect("rollback");

    // 3. Still in flight when the first checks come: unknown (lock timeout), until it commits.
    send_half(&app, "slow-3").await;
    let mut slow_db = pg.client().await;
    let slow = slow_db.transaction().await.expect("begin");
    slow.execute("SELECT outbox_tx_begin('slow-3')", &[])
        .await
        .expect("barrier");

    // A control the app commits itself, through END_TRANSACTION.
    let own = send_half(&app, "direct-4").await;
    client::end_transaction(&app, &own, Resolution::Commit, false, None)
        .await
        .expect("END_TRANSACTION commit");
    drop(app); // the app is gone: only the relay is registered for the group

    let reader = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5))
        .await
        .expect("connect");
    let unknown_seen = eventually(Duration::from_secs(60), || async {
        answered(&relay.log(), "slow-3", "unknown")
    })
    .await;
    assert!(
        unknown_seen,
        "no check-back for the in-flight transaction reached the relay\n--- relay:\n{}\n--- rocketmq:\n{}",
        relay.log(),
        rmq.logs()
    );
    slow.commit().await.expect("commit the slow transaction");

    let all_in = eventually(Duration::from_secs(60), || async {
        let keys = visible_keys(&reader).await;
        ["committed-1", "slow-3", "direct-4"]
            .iter()
            .all(|k| keys.iter().any(|x| x == k))
    })
    .await;
    let keys = visible_keys(&reader).await;
    assert!(
        all_in,
        "visible: {keys:?}\n--- relay:\n{}\n--- rocketmq:\n{}",
        relay.log(),
        rmq.logs()
    );
    let rolled_back_answered = answered(&relay.log(), "rolled-back-2", "rolled_back");
    assert!(rolled_back_answered, "{}", relay.log());
    assert!(!keys.iter().any(|k| k == "rolled-back-2"), "{keys:?}");
    for line in relay
        .log()
        .lines()
        .filter(|l| l.contains("RocketMQ check-back"))
    {
        eprintln!("{line}");
    }
    for k in ["committed-1", "slow-3", "direct-4"] {
        assert_eq!(
            keys.iter().filter(|x| *x == k).count(),
            1,
            "{k} once: {keys:?}"
        );
    }
}
