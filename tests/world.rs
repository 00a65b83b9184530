//! The world changing under the relay: slot invalidated or dropped, schema changes, TRUNCATE,
//! the slot held by another process, Postgres down at start, large TOASTed values, the Kafka
//! producer failing fatally.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;
use outbox_relay::replication::{Lsn, ReplicationClient};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const WAIT: Duration = Duration::from_secs(120);
const LINGER: Duration = Duration::from_secs(2);

fn ids_in_table(pg: &PgCluster) -> HashSet<String> {
    pg.psql("SELECT id FROM outbox")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The slot is invalidated while the relay is down (WAL removed under a small
/// max_slot_wal_keep_size): the relay says so loudly, recreates the slot and publishes every row
/// still undelivered — nothing committed is lost.
#[tokio::test(flavor = "multi_thread")]
async fn invalidated_slot_is_recovered_without_loss() {
    let pg = PgCluster::start_with(&[
        ("wal_level", "logical"),
        ("max_slot_wal_keep_size", "1MB"),
        ("wal_keep_size", "0"),
        ("min_wal_size", "32MB"),
    ]);
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(&pg, &broker.brokers(), &[]);
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "lost", 3, 50, true).await;
    assert!(all_delivered(&db, WAIT).await);
    assert!(relay.terminate().success());

    // While the relay is down: rows to publish, then enough WAL to invalidate the slot.
    insert_rows(&mut db, "lost", 3, 50, true).await;
    db.batch_execute("CREATE TABLE filler (v text)")
        .await
        .unwrap();
    let invalidated = eventually(WAIT, || async {
        db.batch_execute(
            "INSERT INTO filler SELECT repeat('z', 1000) FROM generate_series(1, 5000); \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        pg.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
            == "lost"
    })
    .await;
    assert!(invalidated, "the test could not invalidate the slot");

    // `check` reports it, with the way out.
    let mut check = Relay::spawn(&env, &["check"]);
    assert!(!check.wait_exit(WAIT).unwrap().success());
    assert!(check.log().contains("wal_status=lost"), "{}", check.log());

    let relay = Relay::start(&env);
    insert_rows(&mut db, "lost", 3, 50, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    assert!(relay.log().contains("SLOT LOST"), "{}", relay.log());
    let want = ids_in_table(&pg);
    let got = consume(
        &broker.brokers(),
        &["outbox.event.lost"],
        want.len(),
        WAIT,
        LINGER,
    );
    let got_ids: HashSet<String> = got.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got_ids, want, "every committed row is in the broker");
}

/// The slot is dropped under a stopped relay: a loud error, then recovery from the table.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_slot_is_recovered_without_loss() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(&pg, &broker.brokers(), &[]);
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "dropped", 3, 20, true).await;
    assert!(all_delivered(&db, WAIT).await);
    assert!(relay.terminate().success());
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    insert_rows(&mut db, "dropped", 3, 20, true).await;

    let relay = Relay::start(&env);
    assert!(all_delivered(&db, WAIT).await);
    assert!(relay.log().contains("SLOT LOST"), "{}", relay.log());
    let got = consume(
        &broker.brokers(),
        &["outbox.event.dropped"],
        40,
        WAIT,
        LINGER,
    );
    let got_ids: HashSet<String> = got.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got_ids, ids_in_table(&pg));
    assert_eq!(got.len(), 40, "delivered rows are not sent again");
}

/// ALTER TABLE while streaming (add a column, drop a column) and TRUNCATE: the relay follows the
/// new shape, logs the truncate, and keeps going.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_and_truncate_while_streaming() {
    let Stack { pg, broker, relay } = Stack::start(&[]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "alter", 2, 10, true).await;
    pg.psql("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'");
    ids.extend(insert_rows(&mut db, "alter", 2, 10, true).await);
    pg.psql("ALTER TABLE outbox DROP COLUMN tenant");
    // CASCADE: the view outbox_status reads every column.
    pg.psql("ALTER TABLE outbox DROP COLUMN last_error CASCADE");
    ids.extend(insert_rows(&mut db, "alter", 2, 10, true).await);
    let got = consume(&broker.brokers(), &["outbox.event.alter"], 30, WAIT, LINGER);
    let got_ids: Vec<&str> = got.iter().map(Received::id).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());

    pg.psql("TRUNCATE outbox");
    let after = insert_rows(&mut db, "alter", 2, 5, true).await;
    let got = consume(&broker.brokers(), &["outbox.event.alter"], 35, WAIT, LINGER);
    assert!(after.iter().all(|id| got.iter().any(|m| m.id() == id)));
    assert!(
        relay.log().contains("the outbox table was truncated"),
        "{}",
        relay.log()
    );
    assert!(
        relay
            .log()
            .matches("outbox table definition received")
            .count()
            >= 3
    );
}

/// The slot is in use by another process: the relay waits with a clear log line and takes over
/// when it is released.
#[tokio::test(flavor = "multi_thread")]
async fn waits_while_the_slot_is_active_elsewhere() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_RETRY__MAX_DELAY_MS", "500")],
    );
    let mut first = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    assert!(first.terminate().success());

    // Another consumer holds the slot.
    let config: tokio_postgres::Config = pg.url().parse().unwrap();
    let holder = ReplicationClient::connect(&config).await.unwrap();
    let holder = holder
        .start_replication("outbox_relay", Lsn::ZERO, "outbox_pub", false)
        .await
        .unwrap();
    let relay = Relay::start(&env);
    let waiting = eventually(WAIT, || async {
        relay
            .log()
            .contains("the slot is active in another process")
    })
    .await;
    assert!(waiting, "{}", relay.log());
    let ids = insert_rows(&mut db, "handover", 1, 5, true).await;
    drop(holder);
    let got = consume(
        &broker.brokers(),
        &["outbox.event.handover"],
        5,
        WAIT,
        LINGER,
    );
    assert_eq!(got.len(), ids.len());
}

/// Postgres down at start: the relay retries with backoff and says so, then runs once it is up.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_at_start_is_retried() {
    let pg = PgCluster::start();
    pg.apply_schema();
    pg.stop("fast");
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_RETRY__MAX_DELAY_MS", "500")],
    ));
    let said = eventually(WAIT, || async {
        relay
            .log()
            .contains("Postgres is not reachable yet; retrying")
    })
    .await;
    assert!(said, "{}", relay.log());
    pg.start_server();
    let mut db = pg.client().await;
    let ids = insert_rows(&mut db, "late", 1, 3, true).await;
    let got = consume(&broker.brokers(), &["outbox.event.late"], 3, WAIT, LINGER);
    assert_eq!(got.len(), ids.len(), "{}", relay.log());
}

/// A 1 MB payload (TOASTed in Postgres) arrives intact.
#[tokio::test(flavor = "multi_thread")]
async fn one_megabyte_toasted_payload_arrives_intact() {
    let Stack {
        pg,
        broker,
        relay: _relay,
    } = Stack::start(&[("RELAY_KAFKA__MAX_MESSAGE_BYTES", "4000000")]);
    let db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    // Random text does not compress, so the value is stored out of line (TOAST).
    let id = pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'big', 'b-1', 'Big', jsonb_build_object('blob', string_agg(md5(g::text), '')) \
         FROM generate_series(1, 32768) g RETURNING id",
    );
    let stored = pg.psql(&format!(
        "SELECT payload::text FROM outbox WHERE id = '{id}'"
    ));
    assert!(stored.len() > 1_000_000);
    let toasted = pg
        .psql("SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'outbox'");
    assert_eq!(toasted, "t", "the payload is TOASTed");
    let got = consume(&broker.brokers(), &["outbox.event.big"], 1, WAIT, LINGER);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_deref(), Some(stored.as_bytes()));
}

/// A fatal producer error is not a bad row. librdkafka gives up on an idempotent producer whose
/// sequence numbers the broker disowns (injected here with the mock cluster: the head-of-line
/// produce request answered OUT_OF_ORDER_SEQUENCE_NUMBER). The relay must not dead-letter or
/// mark failed the rows that were in flight: it replaces the producer, reads them again from
/// the slot and delivers them.
#[tokio::test(flavor = "multi_thread")]
async fn fatal_producer_error_replaces_the_producer_and_loses_nothing() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("outbox.event.fatal", 2, 1)
        .expect("create topic");
    let brokers = mock.bootstrap_servers();
    let pg = PgCluster::start();
    pg.apply_schema();
    let env = relay_env(&pg, &brokers, &[("RELAY_RETRY__MAX_DELAY_MS", "500")]);
    let relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    insert_rows(&mut db, "fatal", 4, 20, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    insert_rows(&mut db, "fatal", 4, 50, true).await;
    insert_rows(&mut db, "fatal", 4, 30, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let log = relay.log();
    assert!(
        log.contains("the Kafka producer failed"),
        "the fatal error was never raised or never reported:\n{log}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL"),
        "0",
        "rows were marked failed for the producer's fault:\n{log}"
    );
    let want = ids_in_table(&pg);
    let got = consume(&brokers, &["outbox.event.fatal"], want.len(), WAIT, LINGER);
    let got_ids: HashSet<String> = got.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got_ids, want, "every committed row is in the broker");
    let dead = consume(&brokers, &["outbox.dlq"], 1, Duration::from_secs(3), LINGER);
    assert!(dead.is_empty(), "nothing is dead-lettered: {dead:?}");
}

/// The broker can confirm a row before its transaction is visible to other sessions: logical
/// decoding hands a transaction over once its commit record is in the WAL, a moment before the
/// commit becomes visible (longer while it waits for a synchronous standby). The progress stage
/// must not count such a row done on an UPDATE that found nothing. Here the acknowledgement
/// arrives before the row exists at all; the completion must wait for the row and mark it.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_confirmed_before_it_is_visible_is_marked_once_it_is() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let mut stage = MarkingStage::start(&pg.url());

    let id = uuid::Uuid::new_v4();
    stage.ack(7, id, None);
    stage
        .expect_nothing_for(
            Duration::from_millis(500),
            "completed before the row was visible",
        )
        .await;

    let db = pg.client().await;
    db.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type) VALUES ($1, 'late', '1', 'T')",
        &[&id],
    )
    .await
    .unwrap();
    stage.expect_completed(7).await;
    assert_eq!(delivered(&pg, id), "t");
    stage.finish().await;
}

/// While a commit waits for a synchronous standby, its rows are decoded and published but
/// invisible to every other session. The relay waits for them to become visible.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_commit_awaits_a_synchronous_standby_is_marked_once_visible() {
    let pg = PgCluster::start();
    pg.apply_schema();
    // Commits wait for a standby that never comes, until the setting is cleared.
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'ghost'");
    pg.psql("SELECT pg_reload_conf()");

    let id = uuid::Uuid::new_v4();
    let (writer, xid) = insert_uncommitted(&pg, id, "sync").await;
    let commit = tokio::spawn(async move { writer.batch_execute("COMMIT").await });
    // The commit is written and waiting for the standby.
    wait_for_psql(
        &pg,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        "the commit never waited for the standby",
    )
    .await;
    assert_eq!(
        pg.psql(&format!("SELECT count(*) FROM outbox WHERE id = '{id}'")),
        "0",
        "the row is visible before its commit ended"
    );

    // The relay's own writes must not wait for the standby.
    let mut stage = MarkingStage::start(&format!(
        "{}?options=-c%20synchronous_commit%3Dlocal",
        pg.url()
    ));
    stage.ack(3, id, Some(xid));
    stage
        .expect_nothing_for(
            Duration::from_secs(1),
            "completed while the row was not visible",
        )
        .await;

    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
    commit.await.unwrap().expect("commit");
    stage.expect_completed(3).await;
    assert_eq!(delivered(&pg, id), "t");
    stage.finish().await;
}

/// The race the chaos suite caught in CI (rows published, never marked, the slot past them): the
/// marking UPDATE takes its snapshot while the row's transaction is still running, the
/// transaction ends before the UPDATE returns, and a status check made afterwards says
/// "committed". The row exists; only an UPDATE that starts after the transaction ended may
/// conclude it is gone. A statement trigger that sleeps holds the UPDATE open across the commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_becomes_visible_while_its_update_runs_is_marked() {
    let pg = PgCluster::start();
    pg.apply_schema();
    pg.psql(
        "CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; \
         CREATE TRIGGER slow_update BEFORE UPDATE ON outbox \
         FOR EACH STATEMENT EXECUTE FUNCTION slow_update()",
    );

    let id = uuid::Uuid::new_v4();
    let (writer, xid) = insert_uncommitted(&pg, id, "race").await;
    // The UPDATE of outbox.on_delivered = "mark" (the ledger's lookup by id has the same wait).
    let mut stage = MarkingStage::start_with(&pg.url(), outbox_relay::config::OnDelivered::Mark);
    stage.ack(5, id, Some(xid));
    // The marking UPDATE has its snapshot and sleeps in the trigger: commit now.
    wait_for_psql(
        &pg,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE 'UPDATE%'",
        "the marking UPDATE never ran",
    )
    .await;
    writer.batch_execute("COMMIT").await.unwrap();

    stage.expect_completed(5).await;
    assert_eq!(
        delivered(&pg, id),
        "t",
        "completed, but the row was left unmarked"
    );
    stage.finish().await;
}

/// The progress stage (marking) on its own, fed acknowledgements by hand.
struct MarkingStage {
    deliveries: tokio::sync::mpsc::UnboundedSender<outbox_relay::sink::Delivery>,
    completions: tokio::sync::mpsc::UnboundedReceiver<outbox_relay::pipeline::Completion>,
    task: tokio::task::JoinHandle<()>,
}

impl MarkingStage {
    fn start(postgres_url: &str) -> MarkingStage {
        Self::start_with(postgres_url, outbox_relay::config::OnDelivered::Record)
    }

    fn start_with(
        postgres_url: &str,
        on_delivered: outbox_relay::config::OnDelivered,
    ) -> MarkingStage {
        let mut config = outbox_relay::config::Config::default();
        config.postgres.url = postgres_url.to_owned();
        config.outbox.on_delivered = on_delivered;
        let (deliveries, deliveries_rx) = tokio::sync::mpsc::unbounded_channel();
        let (completions_tx, completions) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(outbox_relay::marking::run(
            config,
            deliveries_rx,
            completions_tx,
            None,
            Default::default(),
        ));
        MarkingStage {
            deliveries,
            completions,
            task,
        }
    }

    /// The broker acknowledged row `id` of transaction `seq` (inserted by `xid`, if known).
    fn ack(&self, seq: u64, id: uuid::Uuid, xid: Option<i64>) {
        let mut token = outbox_relay::sink::AckToken::new(seq, id);
        token.xid = xid.and_then(|x| u32::try_from(x % (1 << 32)).ok());
        self.deliveries
            .send(outbox_relay::sink::Delivery::Acked(token))
            .unwrap();
    }

    async fn expect_nothing_for(&mut self, wait: Duration, why: &str) {
        let early = tokio::time::timeout(wait, self.completions.recv()).await;
        assert!(early.is_err(), "{why}: {early:?}");
    }

    async fn expect_completed(&mut self, seq: u64) {
        let done = tokio::time::timeout(WAIT, self.completions.recv())
            .await
            .expect("the completion never came");
        assert!(
            matches!(&done, Some(outbox_relay::pipeline::Completion::Completed(v)) if v == &vec![(seq, 1)]),
            "{done:?}"
        );
    }

    async fn finish(self) {
        drop(self.deliveries);
        self.task.await.unwrap();
    }
}

/// Inserts row `id` in a transaction left open; returns the session and the transaction's id.
async fn insert_uncommitted(
    pg: &PgCluster,
    id: uuid::Uuid,
    aggregatetype: &str,
) -> (tokio_postgres::Client, i64) {
    let writer = pg.client().await;
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type) VALUES ($1, $2, '1', 'T')",
            &[&id, &aggregatetype],
        )
        .await
        .unwrap();
    let xid: i64 = writer
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    (writer, xid)
}

/// Waits until `sql` (a count) returns 1.
async fn wait_for_psql(pg: &PgCluster, sql: &str, why: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while pg.psql(sql) != "1" {
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `t` if row `id` is marked delivered.
fn delivered(pg: &PgCluster, id: uuid::Uuid) -> String {
    pg.psql(&format!(
        "SELECT delivered_at IS NOT NULL FROM outbox_status WHERE id = '{id}'"
    ))
}

/// Debezium's outbox pattern may insert and delete the row in one transaction, keeping the table
/// empty. The relay publishes the insert; marking finds no row, and must not wait for one: the
/// inserting transaction is known (from the WAL) and committed, so the row will never appear.
#[tokio::test(flavor = "multi_thread")]
async fn rows_inserted_and_deleted_in_one_transaction_are_published_without_waiting() {
    let Stack { pg, broker, relay } = Stack::start(&[]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let tx = db.transaction().await.unwrap();
    let rows = tx
        .query(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'gone', 'g' || g, 'T', '{}' FROM generate_series(1, 20) g RETURNING id::text",
            &[],
        )
        .await
        .unwrap();
    tx.execute("DELETE FROM outbox WHERE aggregatetype = 'gone'", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let kept = insert_rows(&mut db, "gone", 2, 5, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(&broker.brokers(), &["outbox.event.gone"], 25, WAIT, LINGER);
    assert_eq!(got.len(), rows.len() + kept.len(), "{}", relay.log());
    // The relay logs (at debug level, as the harness runs it) each wait for rows to appear.
    let log = relay.log();
    assert!(
        !log.contains("not visible yet") && !log.contains("not marking them"),
        "waited for rows that can never appear:\n{log}"
    );
}
