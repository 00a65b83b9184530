//! Failover and server identity: positions are only good on the server that gave them.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);

fn undelivered(pg: &PgCluster) -> i64 {
    pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL")
        .parse()
        .expect("count")
}

/// Server B: a slot whose first-start snapshot is recorded as done, and 5 undelivered rows of
/// `aggregatetype` behind it (keys `{prefix}-1` …), running.
fn server_with_rows_behind_its_slot(aggregatetype: &str, prefix: &str) -> PgCluster {
    let b = PgCluster::start();
    b.apply_schema();
    b.psql("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')");
    b.psql(
        "INSERT INTO outbox_relay_state (slot_name, snapshot_started_at, snapshot_done_at) \
         VALUES ('outbox_relay', now(), now())",
    );
    b.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT '{aggregatetype}', '{prefix}-' || g, 'Created', '{{}}' FROM generate_series(1, 5) g"
    ));
    b
}

/// Moves server A's WAL far ahead (three segment switches, a delivered row each) while `relay`
/// streams from it; returns when every row is delivered.
async fn run_ahead(a: &PgCluster, db: &mut tokio_postgres::Client, relay: &Relay) {
    for _ in 0..3 {
        insert_rows(db, "ahead", 1, 1, true).await;
        a.psql("SELECT pg_switch_wal()");
    }
    insert_rows(db, "ahead", 1, 1, true).await;
    assert!(all_delivered(db, WAIT).await, "{}", relay.log());
}

/// The relay streamed from server A, far ahead in its WAL; then another server, B, answers at
/// the same address, with a slot of the same name and rows behind A's position. The relay must
/// notice the change of system (IDENTIFY_SYSTEM), drop A's positions and stream B's slot from
/// B's own confirmed position: every row of B arrives. Before: it started B's slot at A's higher
/// position, and Postgres skipped every transaction below it (the rows stayed undelivered).
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_moved_to_another_server_does_not_skip_its_rows() {
    // B: a slot (its first-start snapshot recorded as done) and rows behind it, then stopped.
    let mut b = server_with_rows_behind_its_slot("moved", "m");
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
    run_ahead(&a, &mut db, &relay).await;
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

/// A writer committing single-row transactions at about 200/s through `url` until stopped,
/// reconnecting whenever the server goes away; returns how many commits Postgres acknowledged.
fn start_writer(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut committed = 0u64;
        let mut n = 0u64;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            let c = match &client {
                Some(c) if !c.is_closed() => c,
                _ => match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client.insert(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            n += 1;
            let key = format!("w-{n}");
            let inserted = c
                .execute(
                    "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                     VALUES ('failover', $1, 'Written', jsonb_build_object('key', $1::text))",
                    &[&key],
                )
                .await;
            if inserted.is_ok() {
                committed += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        committed
    })
}

/// `outbox-relay check` against `pg`: its output.
fn check_failover(pg: &PgCluster, brokers: &str) -> String {
    let mut check = Relay::spawn(&relay_env(pg, brokers, &[]), &["check"]);
    check
        .wait_exit(Duration::from_secs(60))
        .expect("check finishes");
    check.log()
}

/// Cuts the standby off from its primary (as a network partition would): it keeps what it has
/// and receives nothing more, so what the primary commits next dies with it.
fn cut_off(standby: &PgCluster) {
    standby.psql("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'");
    standby.psql("SELECT pg_reload_conf()");
}

/// What the broker got against what the new primary's table holds.
#[derive(Debug)]
struct Figures {
    written: u64,
    rows: usize,
    lost: usize,
    phantoms: usize,
    duplicates: usize,
}

/// Waits until every row of `pg` is delivered, then reads the topic with an independent
/// consumer and compares, message by message, with the table (id and aggregate key).
async fn tally(pg: &PgCluster, brokers: &str, written: u64, relay: &Relay) -> Figures {
    let delivered = eventually(WAIT, || async { undelivered(pg) == 0 }).await;
    assert!(delivered, "rows stayed undelivered:\n{}", relay.log());
    let table: std::collections::HashMap<String, String> = pg
        .psql("SELECT id::text || ' ' || aggregateid FROM outbox WHERE aggregatetype = 'failover'")
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, key)| (id.to_owned(), key.to_owned()))
        .collect();
    let got = consume(
        brokers,
        &["outbox.event.failover"],
        table.len(),
        WAIT,
        Duration::from_secs(2),
    );
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for m in &got {
        *seen.entry(m.id()).or_default() += 1;
        if let Some(key) = table.get(m.id()) {
            assert_eq!(
                m.key.as_deref(),
                Some(key.as_bytes()),
                "message {} carries another key than its row",
                m.id()
            );
        }
    }
    Figures {
        written,
        rows: table.len(),
        lost: table
            .keys()
            .filter(|id| !seen.contains_key(id.as_str()))
            .count(),
        phantoms: seen.keys().filter(|id| !table.contains_key(**id)).count(),
        duplicates: seen.values().map(|n| n - 1).sum(),
    }
}

/// Postgres 15 (no failover slots): an async standby made with `pg_basebackup -R`; a writer at
/// ~200 commits/s; the standby is cut off for the last 2 s; the primary is killed (`-m
/// immediate`), the standby promoted and moved to the primary's address; the writer carries on. The new primary has no slot: the relay must notice
/// the new server (timeline), create a slot and republish every undelivered row. Lost must be 0;
/// phantoms (messages for transactions the standby never received) and duplicates are reported.
#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_standby_at_the_primary_address_loses_no_row_pg15() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let primary = PgCluster::start_version(15, &[("wal_level", "logical")]);
    primary.apply_schema();
    let mut standby = primary.start_standby("standby1", &[]).await;
    let broker = Tansu::start();
    let relay = Relay::start(&relay_env(
        &primary,
        &broker.brokers(),
        &[("RELAY_RETRY__MAX_DELAY_MS", "500")],
    ));
    wait_streaming(&primary.client().await, WAIT).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(primary.url(), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The last 2 s of the primary's commits never reach the standby.
    cut_off(&standby);
    tokio::time::sleep(Duration::from_secs(2)).await;

    primary.stop("immediate");
    standby.promote();
    standby.stop("fast");
    standby.set_port(primary.port);
    standby.start_server();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");

    let f = tally(&standby, &broker.brokers(), written, &relay).await;
    eprintln!("failover figures, Postgres 15 (slot lost, republished): {f:?}");
    let log = relay.log();
    assert_eq!(f.lost, 0, "{f:?}\n{log}");
    assert!(f.rows > 0 && f.written > 0, "{f:?}");
    assert!(log.contains("POSTGRES CHANGED UNDER THE RELAY"), "{log}");
    assert!(log.contains("SLOT LOST"), "{log}");
    assert!(
        log.contains("the slot was last streamed on another server or timeline"),
        "{log}"
    );
    assert_eq!(
        standby.psql("SELECT timeline FROM outbox_relay_state"),
        "2",
        "the state table names the promoted server's timeline"
    );
}

/// Postgres 17 with a failover slot: the standby syncs the relay's slot
/// (`sync_replication_slots`), the primary holds logical changes back until the standby has them
/// (`synchronized_standby_slots`). The relay's URL names both servers; the standby is cut off
/// for the last 2 s, then the primary is killed and the standby promoted (at its own address);
/// the relay finds the new primary by itself and continues from the synced slot: lost 0,
/// phantoms 0, no full republish (duplicates at most the in-flight window), and no slot-loss
/// recovery.
#[tokio::test(flavor = "multi_thread")]
async fn a_failover_slot_carries_the_relay_over_to_the_promoted_standby_pg17() {
    failover_with_a_failover_slot(false).await;
}

/// The same in `delivery = "exactly_once"` (a broker with transactions): the progress record
/// written on the old primary's timeline is cut back at the point the new timeline branched
/// off (TIMELINE_HISTORY), so a `read_committed` consumer sees every row of the new primary
/// exactly once, and no row is marked delivered without its message.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_carries_over_a_failover_without_loss_or_duplicates_pg17() {
    failover_with_a_failover_slot(true).await;
}

async fn failover_with_a_failover_slot(exactly_once: bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let primary = PgCluster::start_version(17, &[("wal_level", "logical")]);
    primary.apply_schema();
    let standby = primary
        .start_standby("standby1", &[("sync_replication_slots", "on")])
        .await;
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port, standby.port
    );
    let (tansu, txn_broker) = if exactly_once {
        (None, Some(TxnBroker::start()))
    } else {
        (Some(Tansu::start()), None)
    };
    let brokers = match (&tansu, &txn_broker) {
        (Some(b), _) => b.brokers(),
        (_, Some(b)) => b.brokers(),
        _ => unreachable!(),
    };
    if !exactly_once {
        // `check` warns, with the fix, while the primary may publish what the standby lacks.
        let report = check_failover(&primary, &brokers);
        assert!(
            report.contains("WARN failover")
                && report.contains("synchronized_standby_slots is empty")
                && report.contains("synchronized_standby_slots = 'standby1'"),
            "{report}"
        );
    }
    primary.psql("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'");
    primary.psql("SELECT pg_reload_conf()");
    if !exactly_once {
        let report = check_failover(&primary, &brokers);
        assert!(report.contains("PASS failover"), "{report}");
    }
    let in_flight = 2000usize;
    let in_flight_text = in_flight.to_string();
    let mut extra = vec![
        ("RELAY_POSTGRES__URL", both.as_str()),
        ("RELAY_RETRY__MAX_DELAY_MS", "500"),
        ("RELAY_PIPELINE__MAX_IN_FLIGHT", in_flight_text.as_str()),
    ];
    if exactly_once {
        extra.extend([
            ("RELAY_DELIVERY", "exactly_once"),
            ("RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID", "relay-failover"),
            ("RELAY_EXACTLY_ONCE__BATCH_MAX_MS", "50"),
        ]);
    }
    let relay = Relay::start(&relay_env(&primary, &brokers, &extra));
    let db = primary.client().await;
    wait_streaming(&db, WAIT).await;
    let failover: String =
        primary.psql("SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_relay'");
    assert_eq!(failover, "t", "the relay's slot is a failover slot");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(
        format!("{both}?target_session_attrs=read-write"),
        stop.clone(),
    );
    // The standby's copy of the slot, synced and persistent, before the primary dies.
    let synced = eventually(WAIT, || async {
        standby.psql(
            "SELECT count(*) FROM pg_replication_slots \
             WHERE slot_name = 'outbox_relay' AND synced AND NOT temporary",
        ) == "1"
    })
    .await;
    assert!(
        synced,
        "the standby never synced the slot:\n{}",
        standby.log()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The last 2 s of the primary's commits never reach the standby; the primary holds their
    // changes back from the relay (synchronized_standby_slots), so none is published.
    cut_off(&standby);
    tokio::time::sleep(Duration::from_secs(2)).await;

    primary.stop("immediate");
    standby.promote();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");

    let f = tally(&standby, &brokers, written, &relay).await;
    let mode = if exactly_once {
        "exactly-once"
    } else {
        "at-least-once"
    };
    eprintln!("failover figures, Postgres 17 (failover slot, {mode}): {f:?}");
    let log = relay.log();
    assert_eq!(f.lost, 0, "{f:?}\n{log}");
    assert_eq!(f.phantoms, 0, "{f:?}\n{log}");
    assert!(f.rows > 0 && f.written > 0, "{f:?}");
    if exactly_once {
        assert_eq!(f.duplicates, 0, "{f:?}\n{log}");
        assert!(
            log.contains("EXACTLY-ONCE POSITION FROM ANOTHER SERVER"),
            "{log}"
        );
    } else {
        assert!(f.duplicates <= in_flight, "{f:?}");
    }
    assert!(!log.contains("SLOT LOST"), "a full republish:\n{log}");
    assert!(log.contains("POSTGRES CHANGED UNDER THE RELAY"), "{log}");
    assert!(log.contains("synced from the former primary"), "{log}");
}

/// Exactly-once, across a restart: the relay committed a progress record far into server A's
/// WAL; restarted against server B (another system, at the same address) whose slot and rows
/// lie below that position, it must not count B's rows as sent. Before: `covered` compared raw
/// LSNs, so B's rows were marked delivered and never published.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_progress_record_from_another_server_skips_nothing() {
    let mut b = server_with_rows_behind_its_slot("failover", "b");
    b.stop("fast");

    let a = PgCluster::start();
    a.apply_schema();
    let broker = TxnBroker::start();
    let env = relay_env(
        &a,
        &broker.brokers(),
        &[
            ("RELAY_DELIVERY", "exactly_once"),
            ("RELAY_EXACTLY_ONCE__TRANSACTIONAL_ID", "relay-moved"),
            ("RELAY_EXACTLY_ONCE__BATCH_MAX_MS", "50"),
            ("RELAY_RETRY__MAX_DELAY_MS", "500"),
        ],
    );
    let mut relay = Relay::start(&env);
    let mut db = a.client().await;
    wait_streaming(&db, WAIT).await;
    run_ahead(&a, &mut db, &relay).await;
    relay.terminate();
    a.stop("fast");

    b.set_port(a.port);
    b.start_server();
    let relay = Relay::start(&env);
    let f = tally(&b, &broker.brokers(), 0, &relay).await;
    let log = relay.log();
    assert_eq!(f.rows, 5, "{f:?}");
    assert_eq!(
        f.lost, 0,
        "B's rows were marked delivered but never sent: {f:?}\n{log}"
    );
    assert!(
        log.contains("EXACTLY-ONCE POSITION FROM ANOTHER SERVER"),
        "{log}"
    );
}
