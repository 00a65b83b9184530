//! The examples run end to end: the Rust writer puts an order and its outbox row in one
//! transaction (and nothing when the transaction fails), the relay publishes it, and the
//! idempotent consumer applies each message once, however often it is delivered.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const WAIT: Duration = Duration::from_secs(60);

/// An example binary `cargo test` built (`[[example]]` in relay/Cargo.toml).
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join(name))
        .expect("target directory");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples (cargo build --examples)",
        path.display()
    );
    path
}

fn run(bin: &str, env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = Command::new(example_bin(bin))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_writer_and_the_idempotent_consumer_work_end_to_end() {
    let Stack { pg, broker, relay } = Stack::start(&[]);
    let examples = repo_root().join("examples");
    pg.psql_file(&examples.join("orders_schema.sql"));
    pg.psql_file(&examples.join("inbox_schema.sql"));
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str())];

    for (customer, total) in [
        ("alice", "10.50"),
        ("bob", "20"),
        ("alice", "5.25"),
        ("carol", "1"),
    ] {
        let (ok, out) = run("place_order", &env, &[customer, total]);
        assert!(ok && out.contains("placed; message"), "{out}");
    }
    // A failing business transaction writes neither row.
    let (ok, out) = run("place_order", &env, &["dave", "not-a-number"]);
    assert!(!ok && out.contains("nothing was written"), "{out}");
    let linked: i64 = db
        .query_one(
            "SELECT count(*) FROM orders o JOIN outbox x ON x.aggregateid = o.id::text",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!((linked, outbox), (4, 4));
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    let brokers = broker.brokers();
    let consumer_env = [
        ("DATABASE_URL", url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("GROUP", "order-totals"),
        ("EXIT_WHEN_IDLE_MS", "8000"),
    ];
    let (ok, out) = run("inbox_consumer", &consumer_env, &[]);
    assert!(ok && out.contains("applied=4 duplicates=0"), "{out}");
    let expected = vec![
        ("alice".to_owned(), 2, "15.75".to_owned()),
        ("bob".to_owned(), 1, "20".to_owned()),
        ("carol".to_owned(), 1, "1".to_owned()),
    ];
    assert_eq!(totals(&db).await, expected);

    // Every message delivered again (as after a relay crash in the in-flight window): the
    // consumer sees them, changes nothing.
    let messages = consume(
        &brokers,
        &["outbox.event.order"],
        4,
        WAIT,
        Duration::from_millis(500),
    );
    assert_eq!(messages.len(), 4);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for m in &messages {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to("outbox.event.order").headers(headers);
        if let Some(p) = &m.payload {
            record = record.payload(p);
        }
        if let Some(k) = &m.key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("redeliver");
    }
    // And a message it cannot use (no id header): skipped, the rest go on.
    producer
        .send(
            FutureRecord::<(), _>::to("outbox.event.order").payload("{}"),
            Duration::from_secs(10),
        )
        .await
        .expect("send a poison message");
    let (ok, out) = run("inbox_consumer", &consumer_env, &[]);
    assert!(
        ok && out.contains("applied=0 duplicates=4 skipped=1"),
        "{out}"
    );
    assert_eq!(totals(&db).await, expected, "nothing applied twice");
    let inbox: i64 = db
        .query_one("SELECT count(*) FROM inbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(inbox, 4);
}

/// Orders and revenue per customer, as the consumer recorded them.
async fn totals(db: &tokio_postgres::Client) -> Vec<(String, i32, String)> {
    db.query(
        "SELECT customer, orders, total::text FROM customer_totals ORDER BY customer",
        &[],
    )
    .await
    .expect("totals")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}
