//! Failover and server identity: positions are only good on the server that gave them.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);

fn undelivered(pg: &PgCluster) -> i64 {
    pg.psql("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")
        .parse()
        .expect("count")
}

/// The relay streamed from server A, far ahead in its WAL; then another server, B, answers at
/// the same address, with a slot of the same name and rows behind A's position. The relay must
/// notice the change of system (IDENTIFY_SYSTEM), drop A's positions and stream B's slot from
/// B's own confirmed position: every row of B arrives. Before: it started B's slot at A's higher
/// position, and Postgres skipped every transaction below it (the rows stayed undelivered).
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_moved_to_another_server_does_not_skip_its_rows() {
    // B: a slot (its first-start snapshot recorded as done) and rows behind it, then stopped.
    let mut b = PgCluster::start();
    b.apply_schema();
    b.psql("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')");
    b.psql(
        "INSERT INTO outbox_relay_state (slot_name, snapshot_started_at, snapshot_done_at) \
         VALUES ('outbox_relay', now(), now())",
    );
    b.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'moved', 'm-' || g, 'Created', '{}' FROM generate_series(1, 5) g",
    );
    let b_end: u64 = b
        .psql("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
        .parse()
        .expect("lsn");
    b.stop("fast");

    // A: the relay streams from it and confirms a position far beyond B's WAL.
    let a = PgCluster::start();
    a.apply_schema();
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(
        &a,
        &broker.brokers(),
        &[("RELAY_RETRY__MAX_DELAY_MS", "500")],
    ));
    let mut db = a.client().await;
    wait_streaming(&db, WAIT).await;
    for _ in 0..3 {
        insert_rows(&mut db, "ahead", 1, 1, true).await;
        a.psql("SELECT pg_switch_wal()");
    }
    insert_rows(&mut db, "ahead", 1, 1, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let ahead = current_wal(&db).await;
    let confirmed = eventually(WAIT, || async {
        confirmed_flush(&db, "outbox_relay")
            .await
            .is_some_and(|at| at >= ahead)
    })
    .await;
    assert!(confirmed, "{}", relay.log());
    assert!(b_end < ahead, "B's WAL ends behind A's confirmed position");

    // B takes A's address.
    a.stop("fast");
    b.set_port(a.port);
    b.start_server();
    let mut db = b.client().await;
    let before = confirmed_flush(&db, "outbox_relay")
        .await
        .expect("B's slot");
    assert!(before < ahead, "B's slot is behind A's position");
    insert_rows(&mut db, "moved", 1, 2, true).await;
    let delivered = eventually(WAIT, || async { undelivered(&b) == 0 }).await;
    let log = relay.log();
    assert!(delivered, "B's rows were skipped:\n{log}");
    assert!(log.contains("POSTGRES CHANGED UNDER THE RELAY"), "{log}");
}
