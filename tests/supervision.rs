//! The supervisor's promises: what the relay does when a broker, Postgres, a grant or the leader
//! lock fails under it. Each test fails on the code before the rebuild (c2d4d6a).

use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);

/// Whether the slot has a walsender now.
fn slot_active(pg: &PgCluster) -> bool {
    pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active")
        == "1"
}

fn undelivered(pg: &PgCluster) -> i64 {
    pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL")
        .parse()
        .expect("count")
}

/// A broker that stops answering while rows for a new topic wait: the relay's loop waits on the
/// broker, yet status updates keep the walsender alive past `wal_sender_timeout` (5 s here) and
/// SIGTERM ends the relay within 2 s. Before: "cannot read broker metadata; retrying" inside the
/// loop, the walsender timed out, and SIGTERM was not served.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_broker_blocks_neither_status_updates_nor_sigterm() {
    let pg = PgCluster::start_with(&[("wal_level", "logical"), ("wal_sender_timeout", "5s")]);
    pg.apply_schema();
    let broker = Tansu::start();
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_PIPELINE__SHUTDOWN_TIMEOUT_MS", "500")],
    ));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "warm", 1, 1, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    broker.pause();
    insert_rows(&mut db, "fresh", 2, 20, true).await;
    // Two and a half wal_sender_timeouts, sampled every 200 ms: the slot never loses its walsender.
    let watch_until = Instant::now() + Duration::from_millis(12_500);
    let mut samples = 0;
    while Instant::now() < watch_until {
        assert!(
            slot_active(&pg),
            "the walsender timed out after {samples} samples while the broker was frozen:\n{}",
            relay.log()
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(undelivered(&pg), 20, "nothing is marked without the broker");

    let asked = Instant::now();
    signal_pid(relay.pid(), "-TERM");
    let exited = relay.wait_exit(Duration::from_secs(2));
    let log = relay.log();
    assert!(
        exited.is_some_and(|s| s.success()),
        "SIGTERM not served within 2 s ({:?}):\n{log}",
        asked.elapsed()
    );
    broker.resume();

    // Nothing was lost: a new relay delivers the rows that waited.
    let relay = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
}

/// The session holding the leader lock is killed and taking the lock again fails on a
/// connection that stays open (EXECUTE on pg_try_advisory_lock revoked): the relay must not read
/// the slot. Before: it inferred the lock from the open connection and streamed without it.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_never_streams_without_the_leader_lock() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let url = pg.relay_role("relay_app");
    let broker = Tansu::start();
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_POSTGRES__URL", &url),
            ("RELAY_RETRY__MAX_DELAY_MS", "500"),
        ],
    ));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "led", 1, 1, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    pg.psql("REVOKE EXECUTE ON FUNCTION pg_try_advisory_lock(bigint) FROM PUBLIC");
    let killed = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted",
    );
    assert_eq!(killed, "1", "the lock holder's session");
    insert_rows(&mut db, "led", 1, 5, true).await;

    // The relay stops (a missing privilege is not retried) and never reads the slot again.
    let status = relay
        .wait_exit(WAIT)
        .expect("the relay stops without the lock");
    let log = relay.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("cannot take the leader lock")
            && log.contains("the relay does not read the slot without it"),
        "{log}"
    );
    let released = eventually(WAIT, || async { !slot_active(&pg) }).await;
    assert!(released, "{log}");
    assert_eq!(undelivered(&pg), 5, "nothing read without the lock:\n{log}");
    let streams = log.matches("\"streaming\"").count() + log.matches(" streaming slot=").count();
    assert!(streams <= 1, "streamed again after losing the lock:\n{log}");
}

/// Postgres restarts while the first-start snapshot is being published: the relay goes on, every
/// row arrives, and the slot moves past the snapshot afterwards. Before: the half-published
/// snapshot batch stayed open in the reused pipeline, so the confirmed position never moved again
/// (or, when the restart reached marking first, the relay exited 1).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_during_the_first_start_snapshot() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut db = pg.client().await;
    insert_rows(&mut db, "snap", 4, 300, true).await;
    let relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("OUTBOX_RELAY_PAUSE_AT", "snapshot-fetched:4000"),
            ("RELAY_RETRY__MAX_DELAY_MS", "500"),
        ],
    ));
    let paused = eventually(WAIT, || async {
        relay.log().contains("OUTBOX_RELAY_PAUSE_AT reached")
    })
    .await;
    assert!(paused, "{}", relay.log());
    pg.restart("fast");
    let mut db = pg.client().await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    // Streaming resumes and the slot's confirmed position passes a row written afterwards.
    insert_rows(&mut db, "snap", 1, 1, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let target = current_wal(&db).await;
    let moved = eventually(WAIT, || async {
        confirmed_flush(&db, "outbox_relay")
            .await
            .is_some_and(|at| at >= target)
    })
    .await;
    assert!(
        moved,
        "the slot never passed the snapshot:\n{}",
        relay.log()
    );
    let log = relay.log();
    assert!(!log.contains("outbox-relay stopped"), "{log}");
}

/// The relay's role loses its grant to record deliveries (INSERT on the delivery ledger) while
/// running: rows are published but not marked, `/readyz` turns 503 naming the grant, nothing is
/// confirmed; granted again, the rows are marked and readiness returns. At start, a role without
/// the grant (or without UPDATE on the outbox, for failed rows) is refused with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_update_grant_turns_readiness_red_until_granted() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let url = pg.relay_role("relay_app");
    let broker = Tansu::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_POSTGRES__URL", &url),
            ("RELAY_HTTP__ADDR", &listen),
            ("RELAY_RETRY__MAX_DELAY_MS", "500"),
            ("RELAY_METRICS__POLL_INTERVAL_MS", "200"),
        ],
    );

    // At start: refused, with the fix.
    pg.psql("REVOKE UPDATE ON outbox FROM relay_app");
    let mut refused = Relay::start(&env);
    let status = refused.wait_exit(WAIT).expect("refused at start");
    let log = refused.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("may not UPDATE column failed_at") && log.contains("GRANT SELECT, UPDATE ON"),
        "{log}"
    );
    pg.psql(
        "GRANT UPDATE ON outbox TO relay_app; REVOKE INSERT ON outbox_delivered FROM relay_app",
    );
    let mut refused = Relay::start(&env);
    let status = refused.wait_exit(WAIT).expect("refused at start");
    let log = refused.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("cannot record deliveries")
            && log.contains("GRANT SELECT, INSERT, DELETE ON \"public\".\"outbox_delivered\""),
        "{log}"
    );
    let mut check = Relay::spawn(&env, &["check"]);
    check.wait_exit(WAIT).expect("check ends");
    assert!(
        check.log().contains("FAIL marking columns and grant"),
        "{}",
        check.log()
    );

    pg.psql("GRANT INSERT ON outbox_delivered TO relay_app");
    let relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let ready = eventually(WAIT, || async {
        http_get(&listen, "/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "{}", relay.log());

    pg.psql("REVOKE INSERT ON outbox_delivered FROM relay_app");
    let ids = insert_rows(&mut db, "granted", 2, 10, true).await;
    let received = receive_all(&broker.brokers(), "outbox.event.granted", &ids, WAIT);
    assert_eq!(received.len(), ids.len(), "published while unmarked");
    let red = eventually(WAIT, || async {
        let (status, body) = http_get(&listen, "/readyz").await;
        status == 503
            && body.contains("cannot mark rows")
            && body.contains("GRANT SELECT, INSERT, DELETE ON")
    })
    .await;
    assert!(
        red,
        "{}\n{}",
        http_get(&listen, "/readyz").await.1,
        relay.log()
    );
    assert_eq!(undelivered(&pg), 10, "nothing marked without the grant");
    let stuck = confirmed_flush(&db, "outbox_relay").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        confirmed_flush(&db, "outbox_relay").await,
        stuck,
        "nothing confirmed past unmarked rows"
    );

    pg.psql("GRANT INSERT ON outbox_delivered TO relay_app");
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let green = eventually(WAIT, || async {
        http_get(&listen, "/readyz").await.0 == 200
    })
    .await;
    assert!(green, "{}", http_get(&listen, "/readyz").await.1);
}

/// A topic deleted while the relay runs is re-created and its rows delivered; nothing goes to the
/// dead-letter topic. Before: UnknownTopic was permanent and the topic stayed "known", so every
/// row was dead-lettered within seconds. (On noida-db, which answers a produce to a deleted topic
/// with UNKNOWN_TOPIC_OR_PARTITION as Kafka does; Tansu 0.6.0 acknowledges such writes and drops
/// them, which no client can notice.)
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_topic_is_recreated_and_nothing_is_dead_lettered() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = TxnBroker::start();
    let relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_RETRY__MAX_DELAY_MS", "500")],
    ));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let first = insert_rows(&mut db, "doomed", 2, 5, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    assert_eq!(
        receive_all(&broker.brokers(), "outbox.event.doomed", &first, WAIT).len(),
        5
    );

    delete_topic(&broker.brokers(), "outbox.event.doomed").await;
    let later = insert_rows(&mut db, "doomed", 2, 10, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = receive_all(&broker.brokers(), "outbox.event.doomed", &later, WAIT);
    assert_eq!(got.len(), later.len(), "{}", relay.log());
    let failed = pg.psql("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL");
    assert_eq!(failed, "0", "{}", relay.log());
    let log = relay.log();
    assert!(!log.contains("dead-letter topic"), "{log}");
    assert_eq!(
        log.matches("created topic topic=\"outbox.event.doomed\"")
            .count(),
        2,
        "created, then re-created by the relay:\n{log}"
    );
}

/// Kubernetes injects `RELAY_SERVICE_HOST`, `RELAY_PORT`, … for a Service named `relay`: the
/// relay starts, warns once, and delivers. Before: "unknown field: found `port`".
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_service_variables_do_not_stop_the_relay() {
    let Stack {
        pg,
        relay,
        broker: _broker,
    } = Stack::start(&[
        ("RELAY_SERVICE_HOST", "10.0.0.9"),
        ("RELAY_SERVICE_PORT", "8080"),
        ("RELAY_PORT", "tcp://10.0.0.9:8080"),
        ("RELAY_PORT_8080_TCP_ADDR", "10.0.0.9"),
    ]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "k8s", 1, 3, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let log = relay.log();
    assert_eq!(
        log.matches("ignoring RELAY_* environment variables")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("RELAY_SERVICE_HOST"), "{log}");
}

/// The walsender is frozen (SIGSTOP): the kernel still accepts the relay's bytes, so only a read
/// deadline notices. The relay reports the silence within `postgres.replication_timeout_ms`
/// (3 s here), reconnects, and streams again once the old walsender is gone. Before: nothing
/// noticed it for the kernel's ~15 minutes.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_replication_connection_is_detected_and_replaced() {
    let Stack {
        pg,
        relay,
        broker: _broker,
    } = Stack::start(&[
        ("RELAY_POSTGRES__REPLICATION_TIMEOUT_MS", "3000"),
        ("RELAY_RETRY__MAX_DELAY_MS", "500"),
    ]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let walsender = pg.walsender_pid("outbox_relay").expect("walsender");
    signal_pid(walsender, "-STOP");
    let noticed = eventually(Duration::from_secs(15), || async {
        relay
            .log()
            .contains("Postgres sent nothing on the replication connection for 3000 ms")
    })
    .await;
    // Thaw it before asserting, so a failure leaves no frozen process behind.
    insert_rows(&mut db, "thawed", 1, 3, true).await;
    signal_pid(walsender, "-CONT");
    assert!(noticed, "{}", relay.log());
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let now = pg.walsender_pid("outbox_relay");
    assert!(
        now.is_some_and(|p| p != walsender),
        "a new walsender streams"
    );
}

/// SIGTERM while the in-flight bound is reached in the middle of a transaction and the broker is
/// frozen: nothing can complete and the transaction's Commit is never read, yet the relay stops
/// within `pipeline.shutdown_timeout_ms`. Found in review of the rebuilt loop: with status
/// updates moved to the stream driver, nothing was left to wake it while it waited for the
/// Commit (c2d4d6a's loop woke every second for its status update).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_transaction_at_the_in_flight_bound_is_served() {
    let Stack {
        pg,
        broker,
        mut relay,
    } = Stack::start(&[
        ("RELAY_PIPELINE__MAX_IN_FLIGHT", "1"),
        ("RELAY_PIPELINE__SHUTDOWN_TIMEOUT_MS", "500"),
    ]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "bound", 1, 1, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    broker.pause();
    insert_rows(&mut db, "bound", 1, 3, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal_pid(relay.pid(), "-TERM");
    let exited = relay.wait_exit(Duration::from_secs(5));
    broker.resume();
    assert!(
        exited.is_some_and(|s| s.success()),
        "SIGTERM not served:\n{}",
        relay.log()
    );
}
