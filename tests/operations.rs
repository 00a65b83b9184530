//! Running the relay in production: an HA pair taking over from a killed relay, and the
//! retention of delivered rows, JSON logs without secrets.

use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// Two relays on one slot: one streams, the other stands by (not ready); `kill -9` of the active
/// one while rows keep coming → the standby takes over and every row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_when_the_active_relay_is_killed_and_nothing_is_lost() {
    let Stack {
        pg,
        broker,
        relay: mut active,
    } = Stack::start(&[]);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let standby_port = free_port();
    let standby_addr = format!("127.0.0.1:{standby_port}");
    let standby = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_HTTP__ADDR", &standby_addr)],
    ));
    let standing_by = eventually(WAIT, || async {
        standby.log().contains("standing by to take over")
    })
    .await;
    assert!(standing_by, "{}", standby.log());
    let (code, body) = http_get(&standby_addr, "/readyz").await;
    assert_eq!(code, 503, "the standby is not ready: {body}");
    assert!(body.contains("not streaming"), "{body}");

    // A writer: 10 rows per transaction, every 50 ms, for 6 s; the active relay dies after 2 s.
    let writer_pg = pg.client().await;
    let writer = tokio::spawn(async move {
        let mut db = writer_pg;
        let mut ids = Vec::new();
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            ids.extend(insert_rows(&mut db, "ha", 5, 10, true).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    active.kill();
    let took_over = eventually(WAIT, || async {
        standby.log().contains("this one is active now")
    })
    .await;
    assert!(took_over, "{}", standby.log());
    eprintln!(
        "standby took over {:.1} s after kill -9 of the active relay",
        killed_at.elapsed().as_secs_f64()
    );
    let ids = writer.await.expect("writer");
    assert!(all_delivered(&db, WAIT).await, "{}", standby.log());
    let ready = eventually(WAIT, || async {
        http_get(&standby_addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "the new active relay is ready");

    let got = receive_all(&broker.brokers(), "outbox.event.ha", &ids, WAIT);
    let distinct: std::collections::HashSet<&str> = got.iter().map(Received::id).collect();
    eprintln!(
        "rows={} received={} duplicates={}",
        ids.len(),
        got.len(),
        got.len() - distinct.len()
    );
}

/// The retention deletes delivered rows past it — in batches, skipping rows another transaction
/// holds — and never an undelivered or failed row, however old; the relay runs it on its own.
#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_only_delivered_rows_past_it() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let db = pg.client().await;
    // 23 delivered two days ago, 5 delivered just now, 4 undelivered and 3 failed two days ago.
    db.batch_execute(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, created_at, delivered_at) \
           SELECT 'old', 'a' || g, 'T', now() - interval '2 days', now() - interval '2 days' \
           FROM generate_series(1, 23) g; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, created_at, delivered_at) \
           SELECT 'recent', 'a' || g, 'T', now() - interval '2 days', now() FROM generate_series(1, 5) g; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, created_at) \
           SELECT 'pending', 'a' || g, 'T', now() - interval '2 days' FROM generate_series(1, 4) g; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, created_at, failed_at, last_error) \
           SELECT 'failed', 'a' || g, 'T', now() - interval '2 days', now() - interval '2 days', 'x' \
           FROM generate_series(1, 3) g;",
    )
    .await
    .expect("rows");
    let mut config = outbox_relay::config::Config::default();
    config.postgres.url = pg.url();
    config.retention.batch_size = 5;

    // Another transaction holds one old delivered row: it is skipped, not waited for.
    let mut holder = pg.client().await;
    let hold = holder.transaction().await.expect("begin");
    hold.query_one(
        "SELECT id FROM outbox WHERE aggregatetype = 'old' LIMIT 1 FOR UPDATE",
        &[],
    )
    .await
    .expect("lock a row");
    let deleted = tokio::time::timeout(
        WAIT,
        outbox_relay::ops::retention::delete_expired(&db, &config),
    )
    .await
    .expect("the deletion waited on a locked row")
    .expect("delete");
    assert_eq!(deleted, 22);
    hold.rollback().await.expect("release");
    let left = |t: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM outbox WHERE aggregatetype = $1",
                &[&t],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
        }
    };
    assert_eq!(
        left("old").await,
        1,
        "the locked row waits for the next run"
    );
    assert_eq!(left("recent").await, 5);
    assert_eq!(left("pending").await, 4);
    assert_eq!(left("failed").await, 3);

    // The relay itself: a retention of about a second, run every 200 ms.
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_RETENTION__DELIVERED_HOURS", "0.0003"),
            ("RELAY_RETENTION__INTERVAL_MS", "200"),
        ],
    ));
    // The pending rows get delivered by the relay, then deleted with the rest of the delivered.
    let only_failed = eventually(WAIT, || async {
        db.query_one(
            "SELECT count(*) = 3 AND bool_and(failed_at IS NOT NULL) FROM outbox",
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<bool>>(0) == Some(true))
        .unwrap_or(false)
    })
    .await;
    assert!(only_failed, "{}", relay.log());
    assert!(
        relay
            .log()
            .contains("deleted delivered rows past their retention"),
        "{}",
        relay.log()
    );
}

/// `log.format = "json"`: one JSON object per line, and no password from the URL in any of them.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_no_password() {
    let port = free_port(); // nothing listens: the relay keeps retrying and logging
    let mut relay = Relay::start(&[
        (
            "RELAY_POSTGRES__URL".to_owned(),
            format!("postgres://app:s3cret@127.0.0.1:{port}/app?password=s3cret2"),
        ),
        ("RELAY_LOG__FORMAT".to_owned(), "json".to_owned()),
        ("RELAY_HTTP__ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("RELAY_KAFKA__BROKERS".to_owned(), "127.0.0.1:1".to_owned()),
    ]);
    let retried = eventually(WAIT, || async {
        relay.log().contains("Postgres is not reachable yet")
    })
    .await;
    relay.kill();
    let log = relay.log();
    assert!(retried, "{log}");
    assert!(
        !log.contains("s3cret"),
        "a password leaked into the log:\n{log}"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    assert!(log.contains("app:***@"), "{log}");
}

/// Two relays started together on a database with undelivered rows: one takes the lead and
/// publishes the first-start snapshot once (the other waits, it does not snapshot too); a clean
/// stop of the active relay hands over to the other.
#[tokio::test(flavor = "multi_thread")]
async fn two_relays_started_together_snapshot_once_and_hand_over_on_stop() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut db = pg.client().await;
    let mut ids = insert_rows(&mut db, "pair", 5, 500, true).await;
    let env = relay_env(&pg, &broker.brokers(), &[]);
    let mut a = Relay::start(&env);
    let mut b = Relay::start(&env);
    assert!(all_delivered(&db, WAIT).await, "{}\n{}", a.log(), b.log());
    let standing_by = |r: &Relay| r.log().contains("standing by to take over");
    let waited = eventually(WAIT, || async { standing_by(&a) || standing_by(&b) }).await;
    assert!(waited, "neither relay stood by\n{}\n{}", a.log(), b.log());
    assert!(!(standing_by(&a) && standing_by(&b)));
    let got = consume(
        &broker.brokers(),
        &["outbox.event.pair"],
        ids.len(),
        WAIT,
        Duration::from_secs(1),
    );
    assert_eq!(got.len(), 500, "the snapshot was published once, not twice");

    // A clean stop of the active relay: the other takes over.
    let (active, standby) = if standing_by(&a) {
        (&mut b, &a)
    } else {
        (&mut a, &b)
    };
    assert!(active.terminate().success());
    let took_over = eventually(WAIT, || async {
        standby.log().contains("this one is active now")
    })
    .await;
    assert!(took_over, "{}", standby.log());
    ids.extend(insert_rows(&mut db, "pair", 5, 100, true).await);
    assert!(all_delivered(&db, WAIT).await, "{}", standby.log());
    receive_all(&broker.brokers(), "outbox.event.pair", &ids, WAIT);
}
