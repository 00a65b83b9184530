//! The world changing under the relay: slot invalidated or dropped, schema changes, TRUNCATE,
//! the slot held by another process, Postgres down at start, large TOASTed values.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox_relay::replication::{Lsn, ReplicationClient};

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
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "alter", 2, 10, true).await;
    pg.psql("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'");
    ids.extend(insert_rows(&mut db, "alter", 2, 10, true).await);
    pg.psql("ALTER TABLE outbox DROP COLUMN tenant");
    pg.psql("ALTER TABLE outbox DROP COLUMN last_error");
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
        .start_replication("outbox_relay", Lsn::ZERO, "outbox_pub")
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
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let _relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_KAFKA__MAX_MESSAGE_BYTES", "4000000")],
    ));
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
