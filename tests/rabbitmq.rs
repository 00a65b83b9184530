//! The RabbitMQ sink against a private RabbitMQ node (Debian's `rabbitmq-server`) and a real
//! Postgres; queues are read by pika (`tests/consumers/rabbit_read.py`), not by the relay.

use std::time::Duration;

use crate::support::*;

/// The queue the tests bind to the relay's exchange for every routing key of `order` rows.
const QUEUE: &str = "orders";

fn rabbit_relay(pg: &PgCluster, node: &RabbitNode, extra: &[(&str, &str)]) -> Relay {
    let url = node.url();
    let mut settings = vec![
        ("RELAY_SINK", "rabbitmq"),
        ("RELAY_RABBITMQ__URL", url.as_str()),
    ];
    settings.extend_from_slice(extra);
    Relay::start(&relay_env(pg, "", &settings))
}

/// A node with the relay's exchange and a queue bound for `order.#`.
fn node_with_queue(max_message_size: Option<u64>) -> RabbitNode {
    let node = RabbitNode::start_with(max_message_size);
    node.declare_queue(QUEUE, "outbox", "order.#");
    node
}

fn ids(messages: &[RabbitMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.header("id").map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_rows_arrive_with_their_properties_and_rolled_back_rows_never() {
    let node = node_with_queue(None);
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = rabbit_relay(&pg, &node, &[]);
    let mut db = pg.client().await;
    let mut committed = Vec::new();
    for _ in 0..4 {
        committed.extend(insert_rows(&mut db, "order", 7, 50, true).await);
    }
    let rolled_back = insert_rows(&mut db, "order", 7, 10, false).await;
    let with_headers = insert_row_with_headers(&db).await;
    committed.push(with_headers.clone());
    assert!(
        all_delivered(&db, Duration::from_secs(60)).await,
        "rows not delivered\n{}\n--- rabbitmq:\n{}",
        relay.log(),
        node.log()
    );
    let messages = node.messages(QUEUE);
    let mut got = ids(&messages);
    got.sort();
    committed.sort();
    assert_eq!(got, committed, "each committed row once");
    assert!(rolled_back.iter().all(|id| !got.contains(id)));
    let m = messages
        .iter()
        .find(|m| m.header("id") == Some(with_headers.as_str()))
        .expect("the row with headers");
    assert_eq!(m.exchange, "outbox");
    assert_eq!(m.routing_key, "order.Shipped");
    assert_eq!(m.message_id.as_deref(), Some(with_headers.as_str()));
    assert_eq!(m.type_.as_deref(), Some("Shipped"));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.delivery_mode, Some(2), "persistent");
    assert!(m.timestamp.is_some_and(|t| t > 1_700_000_000));
    assert_eq!(m.header("aggregateid"), Some("agg-h"));
    assert_eq!(m.header("traceparent"), Some("00-abc-01"));
    assert!(m.body.contains("\"seq\""), "{}", m.body);
}

/// 10,000 rows of 7 aggregates in 40 transactions reach the queue in commit order per aggregate.
#[tokio::test(flavor = "multi_thread")]
async fn per_aggregate_order_holds_over_ten_thousand_rows() {
    let node = node_with_queue(None);
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = rabbit_relay(&pg, &node, &[]);
    let mut db = pg.client().await;
    for _ in 0..40 {
        insert_rows(&mut db, "order", 7, 250, true).await;
    }
    assert!(
        all_delivered(&db, Duration::from_secs(180)).await,
        "rows not delivered\n{}",
        relay.log()
    );
    let messages = node.messages(QUEUE);
    assert_eq!(messages.len(), 10_000, "each row once");
    let received: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            let id = m.header("id").expect("id").to_owned();
            (id, m.header("aggregateid").expect("aggregateid").to_owned())
        })
        .collect();
    assert_eq!(
        out_of_order(&db, &received).await,
        0,
        "messages of one aggregate out of commit order"
    );
}

/// A writer commits rows while the test does `fault`; then the writer stops, a relay drains,
/// and the queue is compared with the table.
async fn under_writer(
    node: &mut RabbitNode,
    pg: &PgCluster,
    fault: impl AsyncFnOnce(&mut RabbitNode, &PgCluster),
) -> Tally {
    let writer = BackgroundWriter::start(pg).await;
    fault(node, pg).await;
    writer.stop().await;
    let relay = rabbit_relay(pg, node, &[]);
    let db = pg.client().await;
    assert!(
        all_delivered(&db, Duration::from_secs(120)).await,
        "rows not delivered\n{}\n--- rabbitmq:\n{}",
        relay.log(),
        node.log()
    );
    tally(&db, &ids(&node.messages(QUEUE))).await
}

/// kill -9 three times under a writer: nothing lost; the duplicates (rows confirmed but not yet
/// marked when the relay died) are counted.
#[tokio::test(flavor = "multi_thread")]
async fn killed_three_times_under_a_writer_it_loses_nothing() {
    let mut node = node_with_queue(None);
    let pg = PgCluster::start();
    pg.apply_schema();
    let Tally {
        rows,
        lost,
        duplicates,
        leaked,
    } = under_writer(&mut node, &pg, async |node, pg| {
        for _ in 0..3 {
            let mut relay = rabbit_relay(pg, node, &[]);
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            relay.kill();
        }
    })
    .await;
    eprintln!(
        "rabbitmq kill -9 x3: rows {rows}, lost {lost}, duplicates {duplicates}, leaked {leaked}"
    );
    assert!(rows > 200, "the writer wrote too little: {rows}");
    assert_eq!((lost, leaked), (0, 0));
}

/// The node is killed and started again (same data) while the relay publishes: nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn the_broker_killed_and_restarted_during_the_run_loses_nothing() {
    let mut node = node_with_queue(None);
    let pg = PgCluster::start();
    pg.apply_schema();
    let Tally {
        rows,
        lost,
        duplicates,
        leaked,
    } = under_writer(&mut node, &pg, async |node, pg| {
        let relay = rabbit_relay(pg, node, &[("RELAY_RABBITMQ__ACK_TIMEOUT_MS", "3000")]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.restart(Duration::from_secs(2));
        let db = pg.client().await;
        let caught_up = eventually(Duration::from_secs(90), || async {
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
        assert!(caught_up, "{}\n--- rabbitmq:\n{}", relay.log(), node.log());
    })
    .await;
    eprintln!(
        "rabbitmq broker restart: rows {rows}, lost {lost}, duplicates {duplicates}, leaked {leaked}"
    );
    assert!(rows > 200, "the writer wrote too little: {rows}");
    assert_eq!((lost, leaked), (0, 0));
}

/// A row no queue is bound for (basic.return) and a message over the size limit are
/// dead-lettered to the `outbox.dlq` queue and marked failed; the rows after them are delivered.
#[tokio::test(flavor = "multi_thread")]
async fn an_unroutable_row_and_an_oversize_message_are_dead_lettered() {
    let node = node_with_queue(Some(1 << 20));
    let pg = PgCluster::start();
    pg.apply_schema();
    let relay = rabbit_relay(
        &pg,
        &node,
        &[
            ("RELAY_RABBITMQ__MAX_MESSAGE_BYTES", "1048576"),
            ("RELAY_RETRY__INITIAL_DELAY_MS", "50"),
        ],
    );
    let db = pg.client().await;
    let before = insert_row(&db, "order", "{\"seq\": 1}").await;
    let unroutable = insert_row(&db, "payment", "{\"seq\": 2}").await;
    let blob = format!("{{\"blob\": \"{}\"}}", "x".repeat(2 << 20));
    let oversize = insert_row(&db, "order", &blob).await;
    let after = insert_row(&db, "order", "{\"seq\": 3}").await;
    let settled = all_settled(&db, Duration::from_secs(90)).await;
    assert!(settled, "{}\n--- rabbitmq:\n{}", relay.log(), node.log());
    for (id, why) in [
        (&unroutable, "unroutable"),
        (&oversize, "max_message_bytes"),
    ] {
        let row = db
            .query_one(
                "SELECT failed_at IS NOT NULL, coalesce(last_error, '') FROM outbox \
                 WHERE id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("row");
        assert!(row.get::<_, bool>(0), "{id} marked failed");
        let error: String = row.get(1);
        assert!(error.contains(why), "{error}");
    }
    let mut dead = ids(&node.messages("outbox.dlq"));
    dead.sort();
    let mut expected = vec![unroutable.clone(), oversize.clone()];
    expected.sort();
    assert_eq!(dead, expected, "one dead-letter record per poison row");
    let mut got = ids(&node.messages(QUEUE));
    got.sort();
    let mut good = vec![before, after];
    good.sort();
    assert_eq!(got, good);
}

/// `outbox-relay check` with the RabbitMQ sink: a wrong password fails naming `rabbitmq.url`;
/// the right one passes after declaring the exchange and the dead-letter queue.
#[tokio::test(flavor = "multi_thread")]
async fn check_connects_with_confirms_and_declares_or_names_the_fix() {
    let node = RabbitNode::start();
    let pg = PgCluster::start();
    pg.apply_schema();
    let check = |url: String| {
        let settings = [
            ("RELAY_SINK", "rabbitmq"),
            ("RELAY_RABBITMQ__URL", url.as_str()),
        ];
        check_broker_line(&relay_env(&pg, "", &settings))
    };
    let refused = check(node.url().replace("guest:guest", "guest:wrong"));
    assert!(
        refused.starts_with("FAIL")
            && refused.contains("rabbitmq.url")
            && !refused.contains(":wrong@"),
        "{refused}"
    );
    let passed = check(node.url());
    assert!(
        passed.starts_with("PASS")
            && passed.contains("exchange 'outbox' (topic)")
            && passed.contains("'outbox.dlq'"),
        "{passed}"
    );
}
