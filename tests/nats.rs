//! The NATS JetStream sink against a private `nats-server -js` and a real Postgres; what the
//! stream holds is read by nats-py (`tests/consumers/nats_read.py`), not by the relay's client.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

const STREAM: &str = "OUTBOX";

fn nats_relay(pg: &PgCluster, nats: &NatsServer, extra: &[(&str, &str)]) -> Relay {
    let url = nats.url();
    let mut settings = vec![("RELAY_SINK", "nats"), ("RELAY_NATS__URL", url.as_str())];
    settings.extend_from_slice(extra);
    Relay::start(&relay_env(pg, "", &settings))
}

/// Every outbox row: id → (aggregateid, seq in the aggregate's commit order, delivered, failed).
async fn rows(db: &tokio_postgres::Client) -> HashMap<String, (String, i64, bool, bool)> {
    db.query(
        "SELECT id::text, aggregateid, (payload->>'seq')::bigint, delivered_at IS NOT NULL, \
                failed_at IS NOT NULL FROM outbox_status",
        &[],
    )
    .await
    .expect("rows")
    .iter()
    .map(|r| {
        (
            r.get(0),
            (
                r.get(1),
                r.get::<_, Option<i64>>(2).unwrap_or(0),
                r.get(3),
                r.get(4),
            ),
        )
    })
    .collect()
}

/// The outbox ids (header `id`) of the stored messages of the row subjects (not dead letters).
fn stored_ids(messages: &[NatsMessage]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.subject != "outbox.dlq")
        .filter_map(|m| m.header("id").map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_rows_arrive_once_with_their_headers_and_rolled_back_rows_never() {
    let nats = NatsServer::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = nats_relay(&pg, &nats, &[]);
    let mut db = pg.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(insert_rows(&mut db, "order", 7, 50, true).await);
    }
    let rolled_back = insert_rows(&mut db, "order", 7, 10, false).await;
    let with_headers = insert_row_with_headers(&db).await;
    ids.push(with_headers.clone());
    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "rows not delivered\n{}\n--- nats:\n{}",
        relay.log(),
        nats.log()
    );
    let messages = nats.messages(STREAM);
    let mut stored = stored_ids(&messages);
    stored.sort();
    ids.sort();
    assert_eq!(stored, ids, "each committed row once");
    assert!(rolled_back.iter().all(|id| !stored.contains(id)));

    let m = messages
        .iter()
        .find(|m| m.header("id") == Some(with_headers.as_str()))
        .expect("the row with headers");
    assert_eq!(m.header("Nats-Msg-Id"), Some(with_headers.as_str()));
    assert_eq!(m.subject, "outbox.event.order");
    assert_eq!(m.header("id"), Some(with_headers.as_str()));
    assert_eq!(m.header("type"), Some("Shipped"));
    assert_eq!(m.header("aggregatetype"), Some("order"));
    assert_eq!(m.header("aggregateid"), Some("agg-h"));
    assert_eq!(m.header("traceparent"), Some("00-abc-01"));
    assert!(m.data.contains("\"seq\""), "{}", m.data);
}

/// 10,000 rows of 7 aggregates in 40 transactions: in the stream, each aggregate's messages are
/// in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn per_aggregate_order_holds_over_ten_thousand_rows() {
    let nats = NatsServer::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = nats_relay(&pg, &nats, &[]);
    let mut db = pg.client().await;
    // Commit order per aggregate is the table's insertion order (`seq`): one writer.
    for _ in 0..40 {
        insert_rows(&mut db, "order", 7, 250, true).await;
    }
    assert!(
        all_delivered(&db, Duration::from_secs(120)).await,
        "rows not delivered\n{}",
        relay.log()
    );
    let messages = nats.messages(STREAM);
    assert_eq!(messages.len(), 10_000, "each row once");
    let received: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            let id = m.header("id").expect("id");
            assert_eq!(m.header("Nats-Msg-Id"), Some(id));
            (
                id.to_owned(),
                m.header("aggregateid").expect("aggregateid").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        out_of_order(&db, &received).await,
        0,
        "messages of one aggregate out of commit order"
    );
}

/// A writer commits rows (10 % of its transactions roll back) while the test does `fault`;
/// then the writer stops, a relay drains, and the stream is compared with the table.
async fn under_writer(
    nats: &mut NatsServer,
    pg: &PgCluster,
    fault: impl AsyncFnOnce(&mut NatsServer, &PgCluster),
) -> Tally {
    let writer = BackgroundWriter::start(pg).await;
    fault(nats, pg).await;
    writer.stop().await;
    let relay = nats_relay(pg, nats, &[]);
    let db = pg.client().await;
    assert!(
        all_delivered(&db, Duration::from_secs(120)).await,
        "rows not delivered\n{}\n--- nats:\n{}",
        relay.log(),
        nats.log()
    );
    tally(&db, &stored_ids(&nats.messages(STREAM))).await
}

/// kill -9 three times under a writer: nothing lost, and nothing stored twice (the resends fall
/// inside the stream's duplicate window and carry the row's id as `Nats-Msg-Id`).
#[tokio::test(flavor = "multi_thread")]
async fn killed_three_times_under_a_writer_it_loses_nothing_and_stores_nothing_twice() {
    let mut nats = NatsServer::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let Tally {
        rows,
        lost,
        duplicates,
        leaked,
    } = under_writer(&mut nats, &pg, async |nats, pg| {
        for _ in 0..3 {
            let mut relay = nats_relay(pg, nats, &[]);
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            relay.kill();
        }
    })
    .await;
    eprintln!(
        "nats kill -9 x3: rows {rows}, lost {lost}, duplicates {duplicates}, leaked {leaked}"
    );
    assert!(rows > 200, "the writer wrote too little: {rows}");
    assert_eq!((lost, duplicates, leaked), (0, 0, 0));
}

/// The server is killed and started again (same store) while the relay publishes under a writer:
/// nothing lost, nothing stored twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_killed_and_restarted_during_the_run_loses_nothing() {
    let mut nats = NatsServer::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let Tally {
        rows,
        lost,
        duplicates,
        leaked,
    } = under_writer(&mut nats, &pg, async |nats, pg| {
        let relay = nats_relay(pg, nats, &[("RELAY_NATS__ACK_TIMEOUT_MS", "2000")]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        nats.restart(Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let db = pg.client().await;
        // The relay that lived through the restart delivers what was written so far.
        let caught_up = eventually(Duration::from_secs(60), || async {
            db.query_one(
                "SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL \
                 AND created_at < now() - interval '5 seconds'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
        })
        .await;
        assert!(caught_up, "{}\n--- nats:\n{}", relay.log(), nats.log());
    })
    .await;
    eprintln!(
        "nats server restart: rows {rows}, lost {lost}, duplicates {duplicates}, leaked {leaked}"
    );
    assert!(rows > 200, "the writer wrote too little: {rows}");
    assert_eq!((lost, leaked), (0, 0));
    assert_eq!(
        duplicates, 0,
        "resends inside the duplicate window are dropped"
    );
}

/// A subject no stream captures, and a message over the server's max_payload (1 MiB), are
/// dead-lettered (to `outbox.dlq`, which the stream captures) and marked failed; the rows after
/// them are delivered.
#[tokio::test(flavor = "multi_thread")]
async fn an_uncaptured_subject_and_an_oversize_message_are_dead_lettered() {
    let nats = NatsServer::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = nats_relay(
        &pg,
        &nats,
        &[
            (
                "RELAY_NATS__STREAM_SUBJECTS",
                "outbox.event.order,outbox.dlq",
            ),
            ("RELAY_RETRY__INITIAL_DELAY_MS", "50"),
        ],
    );
    let db = pg.client().await;
    let before = insert_row(&db, "order", "{\"seq\": 1}").await;
    let uncaptured = insert_row(&db, "payment", "{\"seq\": 2}").await;
    let blob = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 << 20));
    let oversize = insert_row(&db, "order", &blob).await;
    let after = insert_row(&db, "order", "{\"seq\": 3}").await;
    let settled = all_settled(&db, Duration::from_secs(90)).await;
    assert!(settled, "{}\n--- nats:\n{}", relay.log(), nats.log());
    let table = rows(&db).await;
    assert!(table[&before].2 && table[&after].2, "good rows delivered");
    for (id, why) in [
        (&uncaptured, "no JetStream stream captures"),
        (&oversize, "max_payload"),
    ] {
        assert!(table[id].3, "{id} marked failed");
        let error: String = db
            .query_one(
                "SELECT last_error FROM outbox WHERE id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("last_error")
            .get(0);
        assert!(error.contains(why), "{error}");
    }
    let messages = nats.messages(STREAM);
    let dead: Vec<&NatsMessage> = messages
        .iter()
        .filter(|m| m.subject == "outbox.dlq")
        .collect();
    let mut dead_ids: Vec<&str> = dead.iter().filter_map(|m| m.header("id")).collect();
    dead_ids.sort();
    let mut expected = vec![uncaptured.as_str(), oversize.as_str()];
    expected.sort();
    assert_eq!(dead_ids, expected, "one dead-letter record per poison row");
    for m in dead {
        let id = m.header("id").unwrap_or_default();
        assert_eq!(m.header("Nats-Msg-Id"), Some(format!("{id}:dlq").as_str()));
        assert!(m.header("dlq.error").is_some(), "{m:?}");
    }
    let mut stored = stored_ids(&messages);
    stored.sort();
    let mut good = vec![before, after];
    good.sort();
    assert_eq!(stored, good);
}

/// `outbox-relay check` with the NATS sink: the server's token is required (a relay without it
/// fails naming the settings), the token from a secret file passes and says which stream captures
/// the subjects, and with stream creation off and no stream it fails naming the subject and fix.
#[tokio::test(flavor = "multi_thread")]
async fn check_authenticates_and_finds_the_stream_or_names_the_fix() {
    let nats = NatsServer::start_with_token(Some("s3cret-token-for-nats"));
    let pg = PgCluster::start();
    pg.apply_schema();
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-for-nats\n").expect("token file");
    let token_file = token_file.display().to_string();
    let url = nats.url();
    let check = |extra: &[(&str, &str)]| {
        let mut settings = vec![("RELAY_SINK", "nats"), ("RELAY_NATS__URL", url.as_str())];
        settings.extend_from_slice(extra);
        check_broker_line(&relay_env(&pg, "", &settings))
    };
    let refused = check(&[]);
    assert!(
        refused.starts_with("FAIL") && refused.contains("nats.url"),
        "{refused}"
    );
    let passed = check(&[("RELAY_NATS__TOKEN_FILE", &token_file)]);
    assert!(
        passed.starts_with("PASS")
            && passed.contains("outbox.event.sample")
            && passed.contains("OUTBOX"),
        "{passed}"
    );
    let missing = check(&[
        ("RELAY_NATS__TOKEN_FILE", &token_file),
        ("RELAY_NATS__CREATE_STREAM", "false"),
    ]);
    assert!(
        missing.starts_with("FAIL")
            && missing.contains("no JetStream stream captures outbox.event.sample"),
        "{missing}"
    );
}
