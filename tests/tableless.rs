//! The table-less outbox: `outbox_emit()` (sql/006_emit.sql) writes events into the WAL with
//! `pg_logical_emit_message(true, 'outbox', ...)`; the relay publishes them like rows and marks
//! nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);
const LINGER: Duration = Duration::from_secs(2);

/// Emitted messages arrive once with the row's routing and headers, in commit order with the
/// table rows of the same transactions; a rolled-back transaction's messages never arrive;
/// nothing is written to any table; a poison message (a header that is not a string, content
/// that is not the JSON `outbox_emit` writes) goes to the dead-letter topic and the stream goes
/// on.
#[tokio::test(flavor = "multi_thread")]
async fn emitted_messages_are_published_once_and_rolled_back_ones_never() {
    let Stack { pg, broker, relay } = Stack::start(&[("RELAY_RETRY__MAX_DELAY_MS", "200")]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;

    // Mixed: a row, a message, a row, in one transaction, for one aggregate.
    let tx = db.transaction().await.unwrap();
    let mut want: Vec<String> = Vec::new();
    let insert = "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                  VALUES ('emit', 'a-1', 'Row', '{}') RETURNING id::text";
    want.push(tx.query_one(insert, &[]).await.unwrap().get(0));
    want.push(
        tx.query_one(
            "SELECT outbox_emit('emit', 'a-1', 'Emitted', '{\"n\": 1}', '{\"tenant\": \"acme\"}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0),
    );
    want.push(tx.query_one(insert, &[]).await.unwrap().get(0));
    tx.commit().await.unwrap();

    // Rolled back: never published.
    let tx = db.transaction().await.unwrap();
    let rolled: String = tx
        .query_one(
            "SELECT outbox_emit('emit', 'a-1', 'RolledBack', '{}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();

    // Only messages: 200 in 20 transactions, and nothing in any table.
    let rows_before = pg.psql("SELECT count(*) FROM outbox");
    for t in 0..20 {
        let tx = db.transaction().await.unwrap();
        for i in 0..10 {
            want.push(
                tx.query_one(
                    "SELECT outbox_emit('emit', $1, 'Emitted', jsonb_build_object('t', $2::int, 'i', $3::int))::text",
                    &[&format!("a-{}", i % 3), &t, &i],
                )
                .await
                .unwrap()
                .get(0),
            );
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(pg.psql("SELECT count(*) FROM outbox"), rows_before);

    // Poison: a header value that is not a string; content that is not outbox_emit's JSON.
    let bad_header: String = db
        .query_one(
            "SELECT outbox_emit('emit', 'p', 'Bad', '{}', '{\"retries\": 3}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.batch_execute("SELECT pg_logical_emit_message(true, 'outbox', 'not json')")
        .await
        .unwrap();
    let after: String = db
        .query_one(
            "SELECT outbox_emit('emit', 'a-1', 'After', '{}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    want.push(after.clone());

    let got = consume(
        &broker.brokers(),
        &["outbox.event.emit"],
        want.len(),
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = got.iter().map(Received::id).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "a message arrived twice");
    assert_eq!(
        unique,
        want.iter().map(String::as_str).collect::<HashSet<_>>(),
        "every committed message arrives; {}",
        relay.log()
    );
    assert!(
        !unique.contains(rolled.as_str()),
        "a rolled-back message was published"
    );
    // Commit order per aggregate (one partition per key).
    let pos: HashMap<&str, usize> = want
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut last: HashMap<Vec<u8>, (i32, i64, usize)> = HashMap::new();
    let mut sorted: Vec<&Received> = got.iter().collect();
    sorted.sort_by_key(|m| (m.partition, m.offset));
    for m in sorted {
        let key = m.key.clone().unwrap_or_default();
        let p = pos[m.id()];
        if let Some((_, _, prev)) = last.get(&key) {
            assert!(
                *prev < p,
                "aggregate {:?} out of commit order",
                String::from_utf8_lossy(&key)
            );
        }
        last.insert(key, (m.partition, m.offset, p));
    }
    let emitted = got.iter().find(|m| m.id() == want[1]).unwrap();
    assert_eq!(emitted.key.as_deref(), Some(&b"a-1"[..]));
    assert_eq!(emitted.headers["type"], "Emitted");
    assert_eq!(emitted.headers["aggregatetype"], "emit");
    assert_eq!(emitted.headers["tenant"], "acme");
    assert_eq!(emitted.payload.as_deref(), Some(&br#"{"n": 1}"#[..]));

    let dlq = consume(&broker.brokers(), &["outbox.dlq"], 2, WAIT, LINGER);
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert!(dlq.iter().any(|m| m.id() == bad_header), "{dlq:?}");
    assert!(
        dlq.iter().any(|m| m
            .headers
            .get("dlq.error")
            .is_some_and(|e| e.contains("aggregatetype"))),
        "the content that is not outbox_emit's JSON is dead-lettered with the reason: {dlq:?}"
    );
    // Nothing to mark: the ledger holds only the two table rows.
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox_status WHERE state = 'delivered'"),
        "2"
    );
    // And the slot moves past the messages.
    let end = current_wal(&db).await;
    let passed = eventually(WAIT, || async {
        confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) >= end
    })
    .await;
    assert!(passed, "{}", relay.log());
    let _ = &mut db;
}

/// The relay killed three times while a writer emits messages: every committed message is in
/// the broker (the slot is their only record: nothing was confirmed before the broker had it).
#[tokio::test(flavor = "multi_thread")]
async fn emitted_messages_survive_kills_without_loss() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(&pg, &broker.brokers(), &[]);
    let mut relay = Relay::start(&env);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let url = pg.url();
    let writer = tokio::spawn(async move {
        let (mut w, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut ids = Vec::new();
        for t in 0..300 {
            let tx = w.transaction().await.unwrap();
            for i in 0..5 {
                ids.push(emit(&tx, "killed", &format!("k-{}", (t + i) % 7), t).await);
            }
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids
    });
    kill_three_times(&mut relay, &env, &db, Duration::from_millis(900)).await;
    let ids = writer.await.unwrap();
    let got = consume(
        &broker.brokers(),
        &["outbox.event.killed"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let seen: HashSet<&str> = got.iter().map(Received::id).collect();
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    eprintln!(
        "tableless kills: messages={} lost={} duplicates={}",
        ids.len(),
        lost.len(),
        got.len() - seen.len()
    );
    assert!(
        lost.is_empty(),
        "lost {} messages, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    let _ = relay;
}

/// `delivery = "exactly_once"` with table rows and emitted messages in the same transactions:
/// the relay counts both toward its source position, so across kill -9s a `read_committed`
/// consumer sees every row and every message once — none lost, none twice. Runs against a
/// broker with transaction markers and fencing ([`TxnBroker`]).
#[tokio::test(flavor = "multi_thread")]
async fn emitted_messages_and_rows_go_out_exactly_once_across_kills() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = TxnBroker::start();
    let brokers = broker.brokers();
    let env = relay_env(
        &pg,
        &brokers,
        &[
            ("RELAY_DELIVERY", "exactly_once"),
            ("RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID", "tableless-eos"),
            ("RELAY_EXACTLY_ONCE__BATCH_MAX_MS", "50"),
            ("RELAY_RETRY__MAX_DELAY_MS", "1000"),
        ],
    );
    let mut relay = Relay::start(&env);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let url = pg.url();
    let writer = tokio::spawn(async move {
        let (mut w, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut ids = Vec::new();
        for t in 0..200 {
            let tx = w.transaction().await.unwrap();
            let key = format!("m-{}", t % 5);
            ids.push(
                tx.query_one(
                    "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                     VALUES ('mixed', $1, 'Row', jsonb_build_object('t', $2::int)) RETURNING id::text",
                    &[&key, &t],
                )
                .await
                .unwrap()
                .get::<_, String>(0),
            );
            for _ in 0..2 {
                ids.push(emit(&tx, "mixed", &key, t).await);
            }
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids
    });
    let mut logs = kill_three_times(&mut relay, &env, &db, Duration::from_millis(800)).await;
    let ids = writer.await.unwrap();
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(&brokers, &["outbox.event.mixed"], ids.len(), WAIT, LINGER);
    let seen: HashSet<&str> = got.iter().map(Received::id).collect();
    let lost = ids.iter().filter(|id| !seen.contains(id.as_str())).count();
    let duplicates = got.len() - seen.len();
    eprintln!(
        "tableless eos kills: rows and messages={} lost={lost} duplicates={duplicates}",
        ids.len()
    );
    if lost + duplicates > 0 {
        logs.push_str(&relay.log());
        panic!("lost {lost}, duplicates {duplicates}; relay logs:\n{logs}");
    }
    assert_eq!(got.len(), ids.len());
}

/// `outbox_emit(aggregatetype, key, 'Emitted', {"t": t})` in `tx`: the message's id.
async fn emit(
    tx: &tokio_postgres::Transaction<'_>,
    aggregatetype: &str,
    key: &str,
    t: i32,
) -> String {
    tx.query_one(
        "SELECT outbox_emit($1, $2, 'Emitted', jsonb_build_object('t', $3::int))::text",
        &[&aggregatetype, &key, &t],
    )
    .await
    .unwrap()
    .get(0)
}

/// Kills the relay three times, `every` apart, starting it again and waiting until it streams;
/// returns the killed processes' logs.
async fn kill_three_times(
    relay: &mut Relay,
    env: &[(String, String)],
    db: &tokio_postgres::Client,
    every: Duration,
) -> String {
    let mut logs = String::new();
    for _ in 0..3 {
        tokio::time::sleep(every).await;
        relay.kill();
        logs.push_str(&relay.log());
        *relay = Relay::start(env);
        wait_streaming(db, WAIT).await;
    }
    logs
}
