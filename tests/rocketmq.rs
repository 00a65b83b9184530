//! RocketMQ against a real name server and broker (the Rust implementation from crates.io) and a
//! real Postgres.
//! - Check-backs: an app sends a half message, runs its local transaction, and dies before
//!   END_TRANSACTION; the broker checks back; the relay answers from the oracle.
//! - The RocketMQ sink: every row becomes a transactional message, visible once, if and only if
//!   the row is marked delivered, also when the relay is killed between the steps.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use outbox_relay::rocketmq::client::{self, HalfSend, Resolution};
use outbox_relay::rocketmq::connection::Connection;
use outbox_relay::rocketmq::message::MessageExt;

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

    let app = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
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

    let reader = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
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

/// The topic the sink routes `aggregatetype = 'order'` rows to (`outbox.event.order`, mapped).
const SINK_TOPIC: &str = "outbox_event_order";

/// Every message visible on `topic` (4 queues); nothing while the topic does not exist.
async fn visible_messages(broker: &Connection, topic: &str) -> Vec<MessageExt> {
    let mut out = Vec::new();
    for queue in 0..4 {
        let mut offset = 0;
        while let Ok((msgs, next)) = client::pull(broker, "test-reader", topic, queue, offset).await
        {
            if msgs.is_empty() {
                break;
            }
            out.extend(msgs);
            offset = next;
        }
    }
    out
}

/// The outbox ids of the visible messages (their `KEYS`), sorted, repeats kept.
async fn visible_ids(broker: &Connection) -> Vec<String> {
    let mut ids: Vec<String> = visible_messages(broker, SINK_TOPIC)
        .await
        .iter()
        .filter_map(|m| m.key().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// The ids of delivered rows, sorted.
async fn delivered_ids(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT id::text FROM outbox_status WHERE delivered_at IS NOT NULL ORDER BY 1",
        &[],
    )
    .await
    .expect("delivered rows")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A relay publishing to RocketMQ (`sink = "rocketmq"`), plus `extra` settings.
fn sink_relay(pg: &PgCluster, rmq: &RocketMq, extra: &[(&str, &str)]) -> Relay {
    let mut settings = vec![
        ("RELAY_SINK", "rocketmq"),
        ("RELAY_ROCKETMQ__HEARTBEAT_INTERVAL_MS", "1000"),
        ("RELAY_TRANSACTIONS__LOCK_TIMEOUT_MS", "500"),
    ];
    let ns = rmq.name_server();
    settings.push(("RELAY_ROCKETMQ__NAME_SERVER", &ns));
    settings.extend_from_slice(extra);
    Relay::start(&relay_env(pg, "", &settings))
}

/// Lines in which the relay answered a check-back with `status`.
fn answers(log: &str, status: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("answered a RocketMQ check-back") && l.contains(&format!("\"{status}\""))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_sink_publishes_each_row_as_a_transactional_message_once() {
    let rmq = RocketMq::start(1_000, 2_000);
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = sink_relay(&pg, &rmq, &[]);
    let mut db = pg.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(insert_rows(&mut db, "order", 7, 50, true).await);
    }
    insert_rows(&mut db, "order", 7, 10, false).await; // rolled back: never published
    ids.sort();
    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "rows not delivered\n--- relay:\n{}\n--- rocketmq:\n{}",
        relay.log(),
        rmq.logs()
    );
    let reader = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
        .await
        .expect("connect");
    let all_visible = eventually(Duration::from_secs(30), || async {
        visible_ids(&reader).await.len() >= ids.len()
    })
    .await;
    assert!(all_visible, "{}", relay.log());
    assert_eq!(
        visible_ids(&reader).await,
        ids,
        "each row's message exactly once"
    );

    let messages = visible_messages(&reader, SINK_TOPIC).await;
    let m = &messages[0];
    let id = m.key().expect("KEYS");
    assert_eq!(m.property("id"), Some(id));
    assert_eq!(m.property("TAGS"), Some("Created"));
    assert_eq!(m.property("aggregatetype"), Some("order"));
    assert!(
        m.property("aggregateid")
            .is_some_and(|a| a.starts_with("agg-"))
    );
    let tx_key = m.property("OUTBOX_TX_KEY").expect("OUTBOX_TX_KEY");
    assert!(tx_key.starts_with(&format!("{id}:")), "{tx_key}");
    assert!(String::from_utf8_lossy(&m.body).contains("\"seq\""));
    // The oracle holds one committed key per row: the mark and the commit were one transaction.
    let committed: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox_tx WHERE outcome = 'commit'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(committed as usize, ids.len());
    // One aggregate, one queue.
    let mut queue_of = std::collections::HashMap::new();
    for m in &messages {
        let agg = m.property("aggregateid").unwrap_or_default().to_owned();
        let q = *queue_of.entry(agg).or_insert(m.queue_id);
        assert_eq!(q, m.queue_id, "an aggregate's messages share a queue");
    }
    // The relay settled its own messages: the broker had nothing to check back on.
    assert!(
        answers(&relay.log(), "committed").is_empty(),
        "{}",
        relay.log()
    );
}

/// Kills the relay at `crash_point` while it publishes five rows, checks what is visible and
/// delivered at that moment, then starts a relay again and waits until every row is delivered
/// and visible. Returns (rows, delivered when killed, the second relay's log).
async fn kill_between_steps(crash_point: &str) -> (Vec<String>, Vec<String>, String) {
    let rmq = RocketMq::start(1_000, 2_000);
    let pg = PgCluster::start();
    pg.apply_schema();
    let mut first = sink_relay(&pg, &rmq, &[("OUTBOX_RELAY_CRASH_AT", crash_point)]);
    let mut db = pg.client().await;
    // Rows from the WAL (not from the first start's snapshot of undelivered rows), so that the
    // second relay reads them again from the slot, delivered or not.
    wait_streaming(&db, Duration::from_secs(30)).await;
    let mut ids = insert_rows(&mut db, "order", 5, 5, true).await;
    ids.sort();
    let status = first.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the relay did not crash at {crash_point}: {status:?}\n{}",
        first.log()
    );
    assert!(first.log().contains(crash_point), "{}", first.log());
    let delivered_at_kill = delivered_ids(&db).await;
    let reader = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
        .await
        .expect("connect");
    // No END_TRANSACTION went out, and no relay answers check-backs yet: nothing is visible.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(visible_ids(&reader).await, Vec::<String>::new());

    let second = sink_relay(&pg, &rmq, &[]);
    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "{}",
        second.log()
    );
    // Visible iff delivered: every row, once. The first relay's half messages are decided by
    // check-backs; wait until each was answered before counting.
    let settled = eventually(Duration::from_secs(60), || async {
        let log = second.log();
        answers(&log, "committed").len() + answers(&log, "rolled_back").len() >= 1
            && visible_ids(&reader).await.len() >= ids.len()
    })
    .await;
    assert!(settled, "{}\n--- rocketmq:\n{}", second.log(), rmq.logs());
    // Later check-backs could only add duplicates: give them time to (wrongly) happen.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(visible_ids(&reader).await, ids, "{}", second.log());
    assert_eq!(delivered_ids(&db).await, ids);
    let log = second.log();
    for line in log
        .lines()
        .filter(|l| l.contains("RocketMQ check-back") || l.contains("rolling back the RocketMQ"))
    {
        eprintln!("{line}");
    }
    eprintln!("delivered when killed: {delivered_at_kill:?}");
    (ids, delivered_at_kill, log)
}

#[tokio::test]
async fn killed_after_the_half_message_the_row_is_sent_again_and_the_orphan_rolled_back() {
    let (ids, delivered_at_kill, log) = kill_between_steps("rocketmq-after-half-sent").await;
    assert!(delivered_at_kill.is_empty(), "{delivered_at_kill:?}");
    // The orphaned half message: no committed key in the oracle, so its check-back rolled it
    // back; the rows' messages came from the second relay.
    let rolled_back = answers(&log, "rolled_back");
    assert!(!rolled_back.is_empty(), "{log}");
    assert!(answers(&log, "committed").is_empty(), "{log}");
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn killed_after_marking_the_check_back_commits_and_nothing_is_sent_twice() {
    let (ids, delivered_at_kill, log) = kill_between_steps("rocketmq-after-mark").await;
    assert!(!delivered_at_kill.is_empty(), "the crash came after a mark");
    // Every row marked before the crash became visible through its check-back (the oracle holds
    // its key as committed); the second relay's copy was rolled back, as the row was delivered.
    let committed = answers(&log, "committed");
    for id in &delivered_at_kill {
        assert!(
            committed.iter().any(|l| l.contains(&format!("{id}:"))),
            "no committed check-back for {id}\n{log}"
        );
    }
    assert!(
        log.contains("rolling back the RocketMQ messages of rows delivered before"),
        "the second relay did not roll back its copies of the delivered rows\n{log}"
    );
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn a_sink_message_settled_by_another_check_first_is_sent_again_once() {
    let rmq = RocketMq::start(1_000, 2_000);
    let pg = PgCluster::start();
    pg.apply_schema();
    // Hold each batch for 4 s between the half message and the mark.
    let relay = sink_relay(
        &pg,
        &rmq,
        &[("OUTBOX_RELAY_PAUSE_AT", "rocketmq-before-mark:4000")],
    );
    let mut db = pg.client().await;
    wait_streaming(&db, Duration::from_secs(30)).await;
    let ids = insert_rows(&mut db, "order", 1, 1, true).await;
    let reader = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
        .await
        .expect("connect");
    // The half message, stored under the broker's half topic: its oracle key.
    let mut key = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while key.is_none() && std::time::Instant::now() < deadline {
        let half = visible_messages(&reader, "RMQ_SYS_TRANS_HALF_TOPIC").await;
        key = half
            .iter()
            .filter(|m| m.key() == Some(ids[0].as_str()))
            .find_map(|m| m.property("OUTBOX_TX_KEY").map(str::to_owned));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        key.is_some(),
        "no half message for {}\n{}",
        ids[0],
        relay.log()
    );
    let key = key.expect("found");
    // Another relay (or any check) settles it first: rolled back, since nothing marked it yet.
    let outcome: String = db
        .query_one("SELECT outbox_tx_check($1)", &[&key])
        .await
        .expect("check")
        .get(0);
    assert_eq!(outcome, "rolled_back");

    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "{}",
        relay.log()
    );
    let log = relay.log();
    assert!(
        log.contains("a check-back settled the message of row"),
        "the relay did not notice the settled key\n{log}"
    );
    let once = eventually(Duration::from_secs(30), || async {
        visible_ids(&reader).await == ids
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(once, "{:?}\n{log}", visible_ids(&reader).await);
    assert_eq!(visible_ids(&reader).await, ids, "visible once: {log}");
    let committed: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox_tx WHERE outcome = 'commit' AND tx_key LIKE $1 || ':%'",
            &[&ids[0]],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(committed, 1, "one committed key: the message sent again");
}

#[tokio::test]
async fn the_sink_refuses_to_start_without_the_oracle() {
    let pg = PgCluster::start();
    for f in ["001_outbox.sql", "002_relay_state.sql"] {
        pg.psql_file(&repo_root().join("sql").join(f));
    }
    let mut relay = Relay::start(&relay_env(
        &pg,
        "",
        &[
            ("RELAY_SINK", "rocketmq"),
            ("RELAY_ROCKETMQ__NAME_SERVER", "127.0.0.1:1"),
        ],
    ));
    let status = relay.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{}", relay.log());
    assert!(
        relay.log().contains("apply sql/003_transactions.sql"),
        "{}",
        relay.log()
    );
}

/// A broker with ACL on (`authenticationEnabled`) refuses requests not signed for one of its
/// users. With a wrong secret the relay's sends are refused (NO_PERMISSION): the rows wait,
/// neither delivered nor dead-lettered, and the log names the keys to set; with the right
/// access key and secret every request (heartbeats, routes, half messages, END_TRANSACTION) is
/// signed and each row arrives once. Before: no way to sign, and NO_PERMISSION dead-lettered
/// the rows.
#[tokio::test]
async fn the_sink_signs_its_requests_for_a_broker_that_checks_acls() {
    const USER: &str = "outbox-relay";
    const SECRET: &str = "rocketmq-secret-123";
    let rmq = RocketMq::start_with(1_000, 2_000, Some((USER, SECRET)));
    let pg = PgCluster::start();
    pg.apply_schema();
    let mut db = pg.client().await;
    let mut ids = insert_rows(&mut db, "order", 3, 20, true).await;
    ids.sort();

    let mut wrong = sink_relay(
        &pg,
        &rmq,
        &[
            ("RELAY_ROCKETMQ__ACCESS_KEY", USER),
            ("RELAY_ROCKETMQ__SECRET_KEY", "not-the-secret"),
        ],
    );
    let refused = eventually(WAIT_REFUSAL, || async {
        wrong.log().contains("code 16") && wrong.log().contains("rocketmq.secret_key")
    })
    .await;
    assert!(refused, "{}\n--- rocketmq:\n{}", wrong.log(), rmq.logs());
    let (delivered, failed): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT count(delivered_at), count(failed_at) FROM outbox_status",
                &[],
            )
            .await
            .expect("count");
        (r.get(0), r.get(1))
    };
    assert_eq!((delivered, failed), (0, 0), "{}", wrong.log());
    wrong.terminate();
    // `check` finds it before any row is sent, and passes with the right secret.
    let check = |secret: &str| {
        let ns = rmq.name_server();
        check_broker_line(&relay_env(
            &pg,
            "",
            &[
                ("RELAY_SINK", "rocketmq"),
                ("RELAY_ROCKETMQ__NAME_SERVER", &ns),
                ("RELAY_ROCKETMQ__ACCESS_KEY", USER),
                ("RELAY_ROCKETMQ__SECRET_KEY", secret),
            ],
        ))
    };
    let refused = check("not-the-secret");
    assert!(
        refused.starts_with("FAIL")
            && refused.contains("code 16")
            && refused.contains("rocketmq.access_key"),
        "{refused}"
    );
    let accepted = check(SECRET);
    assert!(
        accepted.starts_with("PASS") && accepted.contains("signed"),
        "{accepted}"
    );

    let relay = sink_relay(
        &pg,
        &rmq,
        &[
            ("RELAY_ROCKETMQ__ACCESS_KEY", USER),
            ("RELAY_ROCKETMQ__SECRET_KEY", SECRET),
        ],
    );
    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "rows not delivered\n--- relay:\n{}\n--- rocketmq:\n{}",
        relay.log(),
        rmq.logs()
    );
    let credentials =
        outbox_relay::rocketmq::acl::Credentials::from_config(USER, SECRET).expect("credentials");
    let reader = Connection::open(
        &rmq.broker_addr(),
        None,
        Duration::from_secs(5),
        credentials,
    )
    .await
    .expect("connect");
    let all_visible = eventually(Duration::from_secs(30), || async {
        visible_ids(&reader).await.len() >= ids.len()
    })
    .await;
    assert!(all_visible, "{}", relay.log());
    assert_eq!(visible_ids(&reader).await, ids, "each row once");
    // An unsigned reader is refused by the same broker: the ACL is on.
    let unsigned = Connection::open(&rmq.broker_addr(), None, Duration::from_secs(5), None)
        .await
        .expect("connect");
    assert!(
        client::pull(&unsigned, "test-reader", SINK_TOPIC, 0, 0)
            .await
            .is_err_and(|e| e.contains("16")),
        "an unsigned pull must be refused"
    );
}

/// How long a refused relay gets to show the refusal in its log.
const WAIT_REFUSAL: Duration = Duration::from_secs(30);
