//! An idempotent consumer: processes each message once, however often it is delivered.
//!
//! For every message of the topic: one Postgres transaction records `(consumer, message id)` in
//! the inbox table (`examples/inbox_schema.sql`) — the message id is the `id` header, the outbox
//! row id — and, only if that row is new, applies the business change (here: orders and revenue
//! per customer). After that transaction commits, the Kafka offset is committed. A crash between
//! the two redelivers the message, and the inbox row turns the repeat into a no-op: the
//! consumer's half of "at-least-once + idempotence".
//!
//! ```sh
//! DATABASE_URL=postgres://app@localhost/app KAFKA_BROKERS=localhost:9092 \
//!   cargo run --example inbox_consumer
//! ```
//! Settings (environment): `TOPIC` (`outbox.event.order`), `GROUP` (`order-totals`, also the
//! inbox's consumer name), `EXIT_WHEN_IDLE_MS` (stop after this long without messages; unset:
//! run until killed).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// What became of one message.
enum Outcome {
    Applied,
    Duplicate,
}

/// Why a message was not processed.
enum Failure {
    /// The message itself is unusable (no id, not JSON, a value the schema refuses): retrying
    /// cannot help. It is logged and skipped (a real service would dead-letter it).
    Permanent(String),
    /// The database failed: try the same message again.
    Transient(String),
}

fn db_failure(e: tokio_postgres::Error) -> Failure {
    // Class 22 (data exception) and 23 (integrity): the message's values, not the database.
    let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
    if code.starts_with("22") || code.starts_with("23") {
        Failure::Permanent(e.to_string())
    } else {
        Failure::Transient(e.to_string())
    }
}

/// Processes one message in one transaction; returns whether it was new.
async fn process(
    db: &mut tokio_postgres::Client,
    consumer: &str,
    msg: &BorrowedMessage<'_>,
) -> Result<Outcome, Failure> {
    let id = msg
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            Failure::Permanent("the message has no 'id' header holding a UUID".into())
        })?;
    let Some(payload) = msg.payload() else {
        return Err(Failure::Permanent(format!(
            "message {id} has no payload (a tombstone)"
        )));
    };
    let payload: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Failure::Permanent(format!("message {id}: the payload is not JSON: {e}")))?;
    let tx = db.transaction().await.map_err(db_failure)?;
    let new = tx
        .execute(
            "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&consumer, &id],
        )
        .await
        .map_err(db_failure)?
        == 1;
    if !new {
        // Already processed: nothing to change (the transaction only read).
        tx.rollback().await.map_err(db_failure)?;
        return Ok(Outcome::Duplicate);
    }
    let customer = payload["customer"].as_str().unwrap_or("unknown").to_owned();
    let total = match &payload["total"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => "0".to_owned(),
    };
    tx.execute(
        "INSERT INTO customer_totals (customer, orders, total) VALUES ($1, 1, $2::text::numeric) \
         ON CONFLICT (customer) DO UPDATE \
         SET orders = customer_totals.orders + 1, total = customer_totals.total + EXCLUDED.total",
        &[&customer, &total],
    )
    .await
    .map_err(db_failure)?;
    tx.commit().await.map_err(db_failure)?;
    Ok(Outcome::Applied)
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to DATABASE_URL: {e}"))?;
    tokio::spawn(connection);
    Ok(db)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_owned());
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "inbox_consumer: set DATABASE_URL, e.g. postgres://app:secret@localhost:5432/app"
        );
        return ExitCode::from(2);
    };
    let brokers = env("KAFKA_BROKERS", "localhost:9092");
    let topic = env("TOPIC", "outbox.event.order");
    let group = env("GROUP", "order-totals");
    let idle_exit = std::env::var("EXIT_WHEN_IDLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let mut db = match connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inbox_consumer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inbox_consumer: cannot create the Kafka consumer for {brokers}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        eprintln!("inbox_consumer: cannot subscribe to {topic}: {e}");
        return ExitCode::FAILURE;
    }
    let (mut applied, mut duplicates, mut skipped) = (0u64, 0u64, 0u64);
    let mut last_message = Instant::now();
    loop {
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            if idle_exit.is_some_and(|idle| last_message.elapsed() >= idle) {
                break;
            }
            continue;
        };
        let msg = match polled {
            Ok(m) => m,
            Err(e) => {
                eprintln!("inbox_consumer: {e}; polling again");
                continue;
            }
        };
        last_message = Instant::now();
        // The database transaction first, the offset after: a crash in between redelivers.
        loop {
            match process(&mut db, &group, &msg).await {
                Ok(Outcome::Applied) => applied += 1,
                Ok(Outcome::Duplicate) => duplicates += 1,
                Err(Failure::Permanent(e)) => {
                    eprintln!("inbox_consumer: skipping a message: {e}");
                    skipped += 1;
                }
                Err(Failure::Transient(e)) => {
                    eprintln!("inbox_consumer: {e}; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if db.is_closed() {
                        match connect(&url).await {
                            Ok(c) => db = c,
                            Err(e) => eprintln!("inbox_consumer: {e}"),
                        }
                    }
                    continue;
                }
            }
            break;
        }
        if let Err(e) = consumer.commit_message(&msg, CommitMode::Sync) {
            eprintln!(
                "inbox_consumer: committing the offset failed: {e} (the message comes again; the inbox makes that harmless)"
            );
        }
    }
    println!("applied={applied} duplicates={duplicates} skipped={skipped}");
    ExitCode::SUCCESS
}
