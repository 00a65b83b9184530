//! Delivery tracking (`outbox.on_delivered`): the delivery ledger (the default), its watermark
//! under transactions that hold a low `seq` while later ones are delivered, a table marked
//! before migrating to the ledger, and the `mark` and `delete` modes.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);
const LINGER: Duration = Duration::from_secs(2);

fn watermark(pg: &PgCluster) -> i64 {
    pg.psql("SELECT delivered_below FROM outbox_relay_state WHERE slot_name = 'outbox_relay'")
        .parse()
        .unwrap_or(-1)
}

/// Every delivered row is recorded in the ledger (a few rows per batch of many), the outbox rows
/// themselves are never rewritten (their ctid, which any UPDATE changes, stays), the view says
/// when each was delivered, and the watermark reaches past the last row.
#[tokio::test(flavor = "multi_thread")]
async fn deliveries_go_to_the_ledger_and_the_outbox_rows_are_never_rewritten() {
    let Stack { pg, broker, relay } =
        Stack::start(&[("RELAY_OUTBOX__WATERMARK_INTERVAL_MS", "200")]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.extend(insert_rows(&mut db, "ledger", 5, 100, true).await);
    }
    let before =
        pg.psql("SELECT string_agg(id || ' ' || ctid::text, ',' ORDER BY seq) FROM outbox");
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(
        &broker.brokers(),
        &["outbox.event.ledger"],
        ids.len(),
        WAIT,
        LINGER,
    );
    assert_eq!(got.len(), ids.len());

    let after = pg.psql("SELECT string_agg(id || ' ' || ctid::text, ',' ORDER BY seq) FROM outbox");
    assert_eq!(before, after, "a delivery rewrote outbox rows");
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL"),
        "0",
        "the row's own delivered_at stays NULL: the ledger records the delivery"
    );
    let ledger_rows: i64 = pg
        .psql("SELECT count(*) FROM outbox_delivered")
        .parse()
        .unwrap();
    assert!(
        (1..2_000).contains(&ledger_rows),
        "one ledger row per marking batch, not per row: {ledger_rows}"
    );
    assert_eq!(
        pg.psql(
            "SELECT (SELECT range_agg(r) FROM outbox_delivered, unnest(seqs) r) \
                 = (SELECT range_agg(int8range(seq, seq, '[]')) FROM outbox)"
        ),
        "t",
        "the ledger holds exactly the outbox's seqs"
    );
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM outbox_status WHERE state = 'delivered' \
             AND delivered_at >= created_at AND delivered_at <= now()"
        ),
        "2000"
    );
    let top: i64 = pg.psql("SELECT max(seq) FROM outbox").parse().unwrap();
    let reached = eventually(WAIT, || async { watermark(&pg) == top + 1 }).await;
    assert!(
        reached,
        "watermark {} never reached {}",
        watermark(&pg),
        top + 1
    );
    let _ = &mut db;
}

/// A transaction inserts a row (drawing a low seq) and stays open while later rows are written
/// and delivered: the watermark stops at that row's seq. The relay is stopped, the transaction
/// commits, and the slot is lost (dropped): the restarted relay finds the row from the watermark
/// up and publishes it once; the delivered rows are not sent again.
#[tokio::test(flavor = "multi_thread")]
async fn the_watermark_waits_for_an_open_transaction_and_a_lost_slot_loses_nothing() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_OUTBOX__WATERMARK_INTERVAL_MS", "200")],
    );
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "held", 3, 10, true).await;
    assert!(all_delivered(&db, WAIT).await);
    // The watermark passes the first rows before the transaction below opens: a candidate
    // noted before a transaction began waits for it too (any transaction that was running then).
    let first = eventually(WAIT, || async { watermark(&pg) == 11 }).await;
    assert!(first, "watermark {}; {}", watermark(&pg), relay.log());

    let mut holder = pg.client().await;
    let tx = holder.transaction().await.unwrap();
    let row = tx
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('held', 'h', 'Held', '{}') RETURNING id::text, seq",
            &[],
        )
        .await
        .unwrap();
    let (held, held_seq): (String, i64) = (row.get(0), row.get(1));
    for _ in 0..5 {
        ids.extend(insert_rows(&mut db, "held", 3, 10, true).await);
    }
    // Every committed row is delivered; the watermark reaches the held row and stays there.
    let settled = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL") == "0"
            && watermark(&pg) == held_seq
    })
    .await;
    assert!(
        settled,
        "watermark {} (held seq {held_seq}); {}",
        watermark(&pg),
        relay.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // ten more intervals
    assert_eq!(
        watermark(&pg),
        held_seq,
        "the watermark passed a running transaction's seq"
    );

    assert!(relay.terminate().success());
    tx.commit().await.unwrap();
    ids.push(held.clone());
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    let relay = Relay::start(&env);
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    assert!(relay.log().contains("SLOT LOST"), "{}", relay.log());
    let got = consume(
        &broker.brokers(),
        &["outbox.event.held"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let counts = count_by_id(&got);
    assert_eq!(counts.get(&held), Some(&1), "the held row arrives once");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered rows sent again: {twice:?}");
    assert_eq!(counts.len(), ids.len());
    let top: i64 = pg.psql("SELECT max(seq) FROM outbox").parse().unwrap();
    let reached = eventually(WAIT, || async { watermark(&pg) == top + 1 }).await;
    assert!(reached, "watermark {} after the commit", watermark(&pg));
}

/// A table marked with `delivered_at` by an earlier relay (`on_delivered = "mark"`) migrates by
/// applying sql/005_delivery_ledger.sql: a relay on the ledger refuses to start before it, with
/// the fix; after it, rows marked before stay delivered (not sent again, even after the slot is
/// lost) and new rows are recorded in the ledger.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_marked_before_migrates_to_the_ledger() {
    let pg = PgCluster::start();
    for f in [
        "001_outbox.sql",
        "002_relay_state.sql",
        "003_transactions.sql",
        "004_retention.sql",
    ] {
        pg.psql_file(&repo_root().join("sql").join(f));
    }
    let broker = Tansu::start();
    let old = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_OUTBOX__ON_DELIVERED", "mark")],
    );
    let mut relay = Relay::start(&old);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "migrate", 3, 200, true).await;
    let marked = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NULL") == "0"
    })
    .await;
    assert!(marked, "{}", relay.log());
    assert!(relay.terminate().success());

    let new = relay_env(&pg, &broker.brokers(), &[]);
    let mut refused = Relay::start(&new);
    assert!(!refused.wait_exit(WAIT).expect("refused").success());
    assert!(
        refused.log().contains("apply sql/005_delivery_ledger.sql"),
        "{}",
        refused.log()
    );

    pg.psql_file(&repo_root().join("sql").join("005_delivery_ledger.sql"));
    let mut relay = Relay::start(&new);
    ids.extend(insert_rows(&mut db, "migrate", 3, 200, true).await);
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NULL"),
        "200",
        "new rows are recorded in the ledger, not marked"
    );
    assert!(relay.terminate().success());
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    let relay = Relay::start(&new);
    let more = insert_rows(&mut db, "migrate", 3, 10, true).await;
    ids.extend(more);
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(
        &broker.brokers(),
        &["outbox.event.migrate"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let counts = count_by_id(&got);
    assert_eq!(counts.len(), ids.len());
    assert!(
        counts.values().all(|n| *n == 1),
        "a row delivered before the migration or the lost slot was sent again"
    );
}

/// `on_delivered = "delete"`: delivered rows are deleted; a poison row stays, marked failed, and
/// the rows after it go through. `on_delivered = "mark"`: the row's own `delivered_at` is set and
/// the ledger stays empty.
#[tokio::test(flavor = "multi_thread")]
async fn delete_and_mark_modes_settle_rows_their_way() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_OUTBOX__ON_DELIVERED", "delete")],
    );
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "modes", 3, 100, true).await;
    let poison: String = db
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ('modes', 'p', 'Bad', '{}', '{\"retries\": 3}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ids.extend(insert_rows(&mut db, "modes", 3, 100, true).await);
    let emptied = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox") == "1"
    })
    .await;
    assert!(emptied, "{}", relay.log());
    assert_eq!(
        pg.psql("SELECT id::text || ' ' || (failed_at IS NOT NULL) FROM outbox"),
        format!("{poison} true")
    );
    assert_eq!(pg.psql("SELECT count(*) FROM outbox_delivered"), "0");
    let got = consume(
        &broker.brokers(),
        &["outbox.event.modes"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let got_ids: HashSet<String> = got.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got_ids, ids.iter().cloned().collect::<HashSet<_>>());
    assert!(relay.terminate().success());

    let env = relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_OUTBOX__ON_DELIVERED", "mark")],
    );
    let relay = Relay::start(&env);
    let marked = insert_rows(&mut db, "modes", 3, 50, true).await;
    let done = eventually(WAIT, || async {
        pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NOT NULL") == "50"
    })
    .await;
    assert!(done, "{}", relay.log());
    assert_eq!(pg.psql("SELECT count(*) FROM outbox_delivered"), "0");
    let got = consume(
        &broker.brokers(),
        &["outbox.event.modes"],
        ids.len() + marked.len(),
        WAIT,
        LINGER,
    );
    assert_eq!(got.len(), ids.len() + marked.len());
}
