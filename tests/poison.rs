//! Poison rows never halt the pipeline (policy `dlq`), or halt it loudly (policy `halt`).
//! Each bad input: the dead-letter record, the row marked failed, later rows still flowing.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);
const LINGER: Duration = Duration::from_secs(2);

/// The outbox row's failure bookkeeping: (attempts, last_error, failed, delivered).
fn row_state(pg: &PgCluster, id: &str) -> (i32, String, bool, bool) {
    let out = pg.psql(&format!(
        "SELECT attempts, coalesce(last_error, ''), failed_at IS NOT NULL, delivered_at IS NOT NULL \
         FROM outbox_status WHERE id = '{id}'"
    ));
    let parts: Vec<&str> = out.split('|').collect();
    (
        parts[0].parse().unwrap(),
        parts[1].to_owned(),
        parts[2] == "t",
        parts[3] == "t",
    )
}

async fn wait_failed(pg: &PgCluster, id: &str) -> bool {
    eventually(WAIT, || async { row_state(pg, id).2 }).await
}

/// Inserts one row with the given extra column values; returns its id.
fn insert(
    pg: &PgCluster,
    aggregateid: &str,
    payload_sql: &str,
    headers_sql: &str,
    topic_sql: &str,
) -> String {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, topic) \
         VALUES ('poison', '{aggregateid}', 'Tested', {payload_sql}, {headers_sql}, {topic_sql}) RETURNING id"
    ))
}

/// Every bad input of the issue, in one stream: each goes to the dead-letter topic with its
/// error, is marked failed, and the good rows around them are delivered in order.
#[tokio::test(flavor = "multi_thread")]
async fn poison_rows_are_dead_lettered_marked_failed_and_the_stream_goes_on() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    broker.create_topic("outbox.dlq", 1);
    broker.create_topic("outbox.event.poison", 1);
    let _relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_KAFKA__CREATE_TOPICS", "false"),
            ("RELAY_KAFKA__MAX_MESSAGE_BYTES", "100000"),
            ("RELAY_RETRY__MAX_DELAY_MS", "200"),
            // Any topic but the relay's own: the broker's refusals are what is tested here.
            ("RELAY_KAFKA__ALLOWED_TOPICS", "*"),
        ],
    ));
    let mut good = vec![insert(&pg, "a", "'{\"n\": 1}'", "NULL", "NULL")];
    let too_large = insert(
        &pg,
        "a",
        "jsonb_build_object('pad', repeat('x', 300000))",
        "NULL",
        "NULL",
    );
    good.push(insert(&pg, "a", "'{\"n\": 2}'", "NULL", "NULL"));
    let bad_headers = insert(&pg, "a", "'{}'", "'{\"retries\": 3}'", "NULL");
    good.push(insert(&pg, "a", "'{\"n\": 3}'", "NULL", "NULL"));
    let missing_topic = insert(&pg, "a", "'{}'", "NULL", "'no.such.topic'");
    good.push(insert(&pg, "a", "'{\"n\": 4}'", "NULL", "NULL"));
    let invalid_topic = insert(&pg, "a", "'{}'", "NULL", "'bad topic name!'");
    good.push(insert(&pg, "a", "'{\"n\": 5}'", "NULL", "NULL"));

    let delivered = consume(
        &broker.brokers(),
        &["outbox.event.poison"],
        good.len(),
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = delivered.iter().map(Received::id).collect();
    assert_eq!(
        ids,
        good.iter().map(String::as_str).collect::<Vec<_>>(),
        "good rows flow, in order"
    );

    let dlq = consume(&broker.brokers(), &["outbox.dlq"], 4, WAIT, LINGER);
    assert_eq!(dlq.len(), 4, "one dead-letter record per poison row");
    let record = |id: &str| {
        dlq.iter()
            .find(|m| m.id() == id)
            .unwrap_or_else(|| panic!("no dead-letter record for {id}: {dlq:?}"))
            .clone()
    };

    let r = record(&too_large);
    assert_eq!(r.headers["dlq.original_topic"], "outbox.event.poison");
    assert_eq!(r.headers["dlq.original_key"], "a");
    assert_eq!(r.headers["dlq.attempts"], "3");
    assert!(
        r.headers["dlq.error"].contains("too large"),
        "{:?}",
        r.headers
    );
    assert!(r.payload.is_none() && r.headers.contains_key("dlq.payload_omitted_bytes"));

    let r = record(&bad_headers);
    assert!(
        r.headers["dlq.error"].contains("object of strings"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.headers["dlq.attempts"], "0");
    assert_eq!(r.headers["dlq.original_headers"], "{\"retries\": 3}");
    assert_eq!(r.payload.as_deref(), Some(&b"{}"[..]));

    let r = record(&missing_topic);
    assert_eq!(r.headers["dlq.original_topic"], "no.such.topic");
    assert!(
        r.headers["dlq.error"].contains("does not exist"),
        "{:?}",
        r.headers
    );

    let r = record(&invalid_topic);
    assert_eq!(r.headers["dlq.original_topic"], "bad topic name!");

    for (id, expect) in [
        (&too_large, "too large"),
        (&bad_headers, "object of strings"),
        (&missing_topic, "does not exist"),
        (&invalid_topic, ""),
    ] {
        assert!(wait_failed(&pg, id).await, "row {id} marked failed");
        let (attempts, last_error, failed, delivered) = row_state(&pg, id);
        assert!(failed && !delivered, "{id}");
        assert!(last_error.contains(expect), "{id}: {last_error}");
        assert!(!last_error.is_empty());
        if id == &too_large {
            assert_eq!(attempts, 3);
        }
    }
    for id in &good {
        assert!(row_state(&pg, id).3, "good row {id} delivered");
    }
}

/// Policy `halt`: the relay stops with an error naming the row and the fix, the row stays
/// undelivered, and the slot does not pass it; a restart stops at the same row.
#[tokio::test(flavor = "multi_thread")]
async fn halt_policy_stops_at_the_poison_row() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_DEAD_LETTER__POLICY", "halt")],
    );
    let mut relay = Relay::start(&env);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let before = insert(&pg, "h", "'{}'", "NULL", "NULL");
    let bad = insert(&pg, "h", "'{}'", "'[\"not\", \"an\", \"object\"]'", "NULL");
    let after = insert(&pg, "h", "'{}'", "NULL", "NULL");
    let status = relay.wait_exit(WAIT).expect("the relay halts");
    assert!(!status.success());
    let log = relay.log();
    assert!(
        log.contains(&format!("poison row {bad}")) && log.contains("RELAY_DEAD_LETTER__POLICY=dlq"),
        "{log}"
    );
    assert!(row_state(&pg, &before).3, "the row before was delivered");
    let (_, _, failed, delivered) = row_state(&pg, &bad);
    assert!(!failed && !delivered);
    assert!(
        !row_state(&pg, &after).3,
        "nothing after the poison row is confirmed"
    );

    let mut again = Relay::start(&env);
    assert!(!again.wait_exit(WAIT).expect("halts again").success());
    assert!(again.log().contains(&format!("poison row {bad}")));

    // Fixing the row is not possible through the slot (the WAL holds the old row), but the
    // operator can switch the policy: the row then goes to the dead-letter topic.
    broker.create_topic("outbox.dlq", 1);
    let _fixed = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    assert!(wait_failed(&pg, &bad).await);
    assert!(eventually(WAIT, || async { row_state(&pg, &after).3 }).await);
}

/// Policy `block_key`: a poison row holds back later rows of its aggregate only. They are parked
/// in the table (the slot moves on), survive a relay restart, and follow in order once the row is
/// fixed with an UPDATE; other aggregates flow meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn block_key_policy_holds_back_only_the_failed_aggregate_until_it_is_fixed() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    broker.create_topic("outbox.event.poison", 1);
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[
            ("RELAY_DEAD_LETTER__POLICY", "block_key"),
            ("RELAY_DEAD_LETTER__BLOCK_RETRY_INTERVAL_MS", "1000"),
            ("RELAY_RETRY__MAX_DELAY_MS", "200"),
        ],
    );
    let mut relay = Relay::start(&env);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;

    let before = insert(&pg, "k1", "'{\"n\": 0}'", "NULL", "NULL");
    let bad = insert(&pg, "k1", "'{\"n\": 1}'", "'{\"retries\": 3}'", "NULL");
    let held = vec![
        insert(&pg, "k1", "'{\"n\": 2}'", "NULL", "NULL"),
        insert(&pg, "k1", "'{\"n\": 3}'", "NULL", "NULL"),
    ];
    let others = [
        insert(&pg, "k2", "'{\"n\": 1}'", "NULL", "NULL"),
        insert(&pg, "k2", "'{\"n\": 2}'", "NULL", "NULL"),
    ];
    // The other aggregate flows; nothing of k1 after the bad row is published.
    let got = consume(
        &broker.brokers(),
        &["outbox.event.poison"],
        1 + others.len(),
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = got.iter().map(Received::id).collect();
    assert_eq!(ids, [&before, &others[0], &others[1]], "{got:?}");
    assert!(wait_failed(&pg, &bad).await);
    let (_, error, _, delivered) = row_state(&pg, &bad);
    assert!(error.contains("object of strings") && !delivered, "{error}");
    for id in &held {
        assert!(wait_failed(&pg, id).await, "held row {id} parked");
        let (attempts, error, _, delivered) = row_state(&pg, id);
        assert!(
            error.contains("held back") && error.contains("poison/k1") && error.contains(&bad),
            "{error}"
        );
        assert_eq!(attempts, 0);
        assert!(!delivered);
    }
    // Parked rows are durable in the table, so the slot moves past them.
    let wal = current_wal(&db).await;
    assert!(
        eventually(WAIT, || async {
            confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) >= wal
        })
        .await,
        "the slot advances past parked rows"
    );

    // A restart remembers the block (read from the table): a new k1 row is held back too.
    relay.kill();
    let mut held = held;
    held.push(insert(&pg, "k1", "'{\"n\": 4}'", "NULL", "NULL"));
    let relay = Relay::start(&env);
    assert!(wait_failed(&pg, &held[2]).await, "held after the restart");

    // The fix: the blocking row is corrected in place; it and the held rows follow in order.
    pg.psql(&format!(
        "UPDATE outbox SET headers = NULL WHERE id = '{bad}'"
    ));
    let mut expected: Vec<&str> = vec![&before, &others[0], &others[1], &bad];
    expected.extend(held.iter().map(String::as_str));
    let got = consume(
        &broker.brokers(),
        &["outbox.event.poison"],
        expected.len(),
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = got.iter().map(Received::id).collect();
    assert_eq!(ids, expected, "relay log:\n{}", relay.log());
    assert!(all_delivered(&db, WAIT).await);
    assert!(relay.log().contains("aggregate unblocked"));
}
