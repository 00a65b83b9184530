//! Inputs the relay does not trust: what a row may name, and what Postgres (or whatever answers
//! in its place) may announce.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);
const LINGER: Duration = Duration::from_secs(2);

/// A row cannot publish to the relay's own topics (dead letters, exactly-once progress), to
/// Kafka's internal topics or, by default, outside the template's prefix; each such row is
/// dead-lettered and marked failed while the stream goes on. A row's headers cannot restate the
/// relay's `id`/`type`. Before: all of these were published as the row asked.
#[tokio::test(flavor = "multi_thread")]
async fn rows_cannot_publish_to_the_relays_own_or_unlisted_topics() {
    let Stack {
        pg,
        broker,
        relay: _relay,
    } = Stack::start(&[]);
    let insert = |aggregateid: &str, headers: &str, topic: &str| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, topic) \
             VALUES ('guarded', '{aggregateid}', 'Tested', '{{}}', {headers}, {topic}) RETURNING id"
        ))
    };
    let good = insert("a", "NULL", "NULL");
    let refused = [
        (insert("a", "NULL", "'outbox.dlq'"), "relay's own"),
        (
            insert("a", "NULL", "'outbox-relay.progress'"),
            "relay's own",
        ),
        (
            insert("a", "NULL", "'__consumer_offsets'"),
            "internal to Kafka",
        ),
        (insert("a", "NULL", "'payments'"), "kafka.allowed_topics"),
    ];
    let forged = insert(
        "a",
        "'{\"id\": \"forged\", \"type\": \"Forged\", \"trace\": \"t-1\"}'",
        "NULL",
    );

    let delivered = consume(
        &broker.brokers(),
        &["outbox.event.guarded"],
        2,
        WAIT,
        LINGER,
    );
    let ids: Vec<&str> = delivered.iter().map(Received::id).collect();
    assert_eq!(ids, [good.as_str(), forged.as_str()], "{}", _relay.log());
    let m = &delivered[1];
    assert_eq!(
        m.headers["type"], "Tested",
        "the row restated the relay's type"
    );
    assert_eq!(m.headers["trace"], "t-1");

    let dlq = consume(
        &broker.brokers(),
        &["outbox.dlq"],
        refused.len(),
        WAIT,
        LINGER,
    );
    assert_eq!(dlq.len(), refused.len(), "{dlq:?}");
    for (id, why) in &refused {
        let r = dlq
            .iter()
            .find(|m| m.id() == id)
            .unwrap_or_else(|| panic!("no dead-letter record for {id}"));
        assert!(r.headers["dlq.error"].contains(why), "{:?}", r.headers);
    }
    let failed = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL") == "4"
    })
    .await;
    assert!(failed, "the refused rows are marked failed");
    assert!(
        consume(
            &broker.brokers(),
            &["payments"],
            1,
            Duration::from_secs(3),
            LINGER
        )
        .is_empty()
    );
}

/// A message larger than `postgres.max_message_bytes` stops the relay with the key named,
/// rather than the relay reserving whatever length the connection announces (up to 2 GiB).
#[tokio::test(flavor = "multi_thread")]
async fn a_replication_message_above_the_cap_stops_the_relay_naming_the_key() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_POSTGRES__MAX_MESSAGE_BYTES", "1048576")],
    ));
    wait_streaming(&pg.client().await, WAIT).await;
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('big', 'b', 'Big', jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024)))",
    );
    let status = relay.wait_exit(WAIT).expect("the relay stops");
    let log = relay.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("above postgres.max_message_bytes (1048576)"),
        "{log}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NULL"),
        "1",
        "the row waits for a relay allowed to read it"
    );
}
