//! Starting, stopping and restarting the relay; memory bounds; idle WAL; setup diagnostics.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(180);
const LINGER: Duration = Duration::from_secs(3);

/// A graceful restart mid-stream loses nothing and republishes nothing that was acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_restart_mid_stream_loses_nothing_and_repeats_nothing() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let env = relay_env(&pg, &broker.brokers(), &[]);
    let mut relay = Relay::start(&env);
    let mut db = pg.client().await;

    // A writer commits continuously while the relay is stopped and started three times.
    let writer_pg_url = pg.url();
    let writer = tokio::spawn(async move {
        let (mut w, conn) = tokio_postgres::connect(&writer_pg_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut ids = Vec::new();
        for i in 0..300 {
            ids.extend(insert_rows(&mut w, "restart", 11, 1 + i % 20, true).await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids
    });
    for _ in 0..3 {
        // Streaming first (a relay stopped before it streams has no final position to report;
        // on a loaded machine it can take longer than the pause below to get there).
        wait_streaming(&db, WAIT).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let status = relay.terminate();
        assert!(
            status.success(),
            "SIGTERM exits 0, got {status}; log:\n{}",
            relay.log()
        );
        let log = relay.log();
        assert!(log.contains("final position confirmed"), "{log}");
        relay = Relay::start(&env);
    }
    let ids = writer.await.unwrap();
    let got = consume(
        &broker.brokers(),
        &["outbox.event.restart"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let counts = count_by_id(&got);
    let lost: Vec<_> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        lost.is_empty(),
        "lost {} rows, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert!(
        dups.is_empty(),
        "{} rows published twice across graceful restarts",
        dups.len()
    );
    assert_eq!(got.len(), ids.len());
    assert!(all_delivered(&db, WAIT).await);
    let _ = &mut db;
    assert!(relay.terminate().success());
}

/// Rows present before the very first start are published exactly once (from the slot's
/// snapshot), and rows written while that snapshot is published come through the stream.
#[tokio::test(flavor = "multi_thread")]
async fn rows_present_before_first_start_are_published_exactly_once() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut db = pg.client().await;
    let mut ids = insert_rows(&mut db, "early", 7, 3_000, true).await;
    // Already delivered rows (e.g. by an earlier relay) are not sent again.
    let delivered = insert_rows(&mut db, "early", 7, 10, true).await;
    db.execute(
        "UPDATE outbox SET delivered_at = now() WHERE id = ANY($1::text[]::uuid[])",
        &[&delivered],
    )
    .await
    .unwrap();
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_PIPELINE__MAX_IN_FLIGHT", "500")],
    ));
    ids.extend(insert_rows(&mut db, "early", 7, 500, true).await);

    let got = consume(
        &broker.brokers(),
        &["outbox.event.early"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let counts = count_by_id(&got);
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "row {id} must arrive exactly once"
        );
    }
    for id in &delivered {
        assert!(
            !counts.contains_key(id),
            "already-delivered row {id} was sent"
        );
    }
    assert_eq!(got.len(), ids.len());
    assert!(all_delivered(&db, WAIT).await);
    let state = pg.psql("SELECT snapshot_done_at IS NOT NULL FROM outbox_relay_state WHERE slot_name = 'outbox_relay'");
    assert_eq!(state, "t");

    // A restart with the existing slot resumes from it: nothing is sent again.
    assert!(relay.terminate().success());
    let _relay = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    let one_more = insert_rows(&mut db, "early", 7, 1, true).await;
    let got = consume(
        &broker.brokers(),
        &["outbox.event.early"],
        ids.len() + 1,
        WAIT,
        LINGER,
    );
    assert_eq!(got.len(), ids.len() + 1);
    assert!(got.iter().any(|m| m.id() == one_more[0]));
}

/// A 100k-row transaction goes through, and the relay's memory does not grow with its size:
/// with 1 KB payloads the transaction is ~100 MB, the relay's peak RSS stays far below.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_thousand_row_transaction_streams_in_bounded_memory() {
    let Stack { pg, broker, relay } = Stack::start(&[("RELAY_PIPELINE__MAX_IN_FLIGHT", "5000")]);
    let db = pg.client().await;
    // Wait for the relay to be streaming (slot created) so the rows come through WAL.
    assert!(
        eventually(WAIT, || async {
            confirmed_flush(&db, "outbox_relay").await.is_some()
        })
        .await
    );
    let n = 100_000;
    db.execute(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'bulk', 'agg-' || (g % 50), 'Loaded', \
                jsonb_build_object('seq', g, 'pad', repeat('x', 1000)) \
         FROM generate_series(1, $1::int) g",
        &[&n],
    )
    .await
    .unwrap();
    let last = current_wal(&db).await;
    assert!(
        all_delivered(&db, WAIT).await,
        "all 100k rows marked delivered"
    );
    assert!(
        eventually(WAIT, || async {
            confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) >= last
        })
        .await
    );
    let peak_kib = relay.peak_rss_kib().expect("relay still running");
    // The transaction's payloads alone are ~100 MB; in-flight is bounded to 5000 messages.
    assert!(
        peak_kib < 80 * 1024,
        "peak RSS {peak_kib} KiB grows with the transaction"
    );
    let got = consume(
        &broker.brokers(),
        &["outbox.event.bulk"],
        n as usize,
        WAIT,
        LINGER,
    );
    let ids: HashSet<&str> = got.iter().map(Received::id).collect();
    assert_eq!(ids.len(), n as usize);
    eprintln!("100k-row transaction: relay peak RSS {peak_kib} KiB");
}

/// With writes to other tables only, the slot's confirmed_flush_lsn keeps moving.
#[tokio::test(flavor = "multi_thread")]
async fn idle_outbox_does_not_pin_wal() {
    let Stack {
        pg,
        broker: _broker,
        relay: _relay,
    } = Stack::start(&[]);
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE other (id serial primary key, v text)")
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || async {
            confirmed_flush(&db, "outbox_relay").await.is_some()
        })
        .await
    );
    let start = confirmed_flush(&db, "outbox_relay").await.unwrap();
    for _ in 0..20 {
        db.execute(
            "INSERT INTO other (v) SELECT repeat('y', 100) FROM generate_series(1, 1000)",
            &[],
        )
        .await
        .unwrap();
    }
    db.batch_execute("SELECT pg_switch_wal()").await.ok();
    let written = current_wal(&db).await;
    assert!(written > start + 1_000_000, "the test wrote WAL");
    let moved = eventually(WAIT, || async {
        confirmed_flush(&db, "outbox_relay").await.unwrap_or(0) >= written
    })
    .await;
    let now = confirmed_flush(&db, "outbox_relay").await.unwrap();
    assert!(
        moved,
        "confirmed_flush_lsn stuck at {now} (WAL at {written})"
    );
}

/// `check` against a cluster with wal_level=replica fails and prints the fix.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_wal_level_replica_with_the_fix() {
    let pg = PgCluster::start_with(&[("wal_level", "replica")]);
    pg.apply_schema();
    let broker = Tansu::start();
    let mut check = Relay::spawn(&relay_env(&pg, &broker.brokers(), &[]), &["check"]);
    let status = check
        .wait_exit(Duration::from_secs(60))
        .expect("check finishes");
    let out = check.log();
    assert!(!status.success(), "check must fail:\n{out}");
    assert!(
        out.contains("FAIL wal_level")
            && out.contains("set wal_level=logical in postgresql.conf and restart"),
        "{out}"
    );
    assert!(out.contains("PASS broker"), "{out}");

    // And `run` refuses to start with the same advice.
    let mut run = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    let status = run.wait_exit(Duration::from_secs(60)).expect("run exits");
    assert!(!status.success());
    assert!(run.log().contains("set wal_level=logical"), "{}", run.log());
}

/// `check` on a correct setup passes every line.
#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_correct_setup() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut check = Relay::spawn(&relay_env(&pg, &broker.brokers(), &[]), &["check"]);
    let status = check
        .wait_exit(Duration::from_secs(60))
        .expect("check finishes");
    assert!(status.success(), "{}", check.log());
    assert!(
        check.log().contains("all 11 checks passed")
            && check.log().contains("PASS transaction oracle"),
        "{}",
        check.log()
    );
}

/// With kafka.create_topics off, a missing topic stops the relay with an error a user can act on
/// and nothing is confirmed past the row.
#[tokio::test(flavor = "multi_thread")]
async fn missing_topic_with_auto_create_off_is_a_readable_error() {
    let pg = PgCluster::start();
    pg.apply_schema();
    let broker = Tansu::start();
    let mut db = pg.client().await;
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_KAFKA__CREATE_TOPICS", "false")],
    ));
    insert_rows(&mut db, "nowhere", 1, 1, true).await;
    let status = relay
        .wait_exit(Duration::from_secs(60))
        .expect("relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(
        log.contains("topic 'outbox.event.nowhere' does not exist")
            && log.contains("RELAY_KAFKA__CREATE_TOPICS=true"),
        "{log}"
    );
    let undelivered = pg.psql("SELECT count(*) FROM outbox_status WHERE delivered_at IS NULL");
    assert_eq!(undelivered, "1");
}

/// The first mistakes a newcomer makes, each named in the relay's log with its setting and the
/// fix: no Postgres where postgres.url points, sql/ not applied, no broker where kafka.brokers
/// points, no publication. (wal_level, a missing topic and a wrong password have their own tests above and below.)
#[tokio::test(flavor = "multi_thread")]
async fn first_start_mistakes_name_the_setting_and_the_fix() {
    let says = |relay: &Relay, all: &[&str]| {
        let log = relay.log();
        all.iter().all(|s| log.contains(s))
    };
    // Nothing listens where postgres.url points: the relay waits for it, saying what to check.
    let nobody = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let mut relay = Relay::start(&[
        ("RELAY_POSTGRES__URL".to_owned(), nobody),
        ("RELAY_HTTP__ADDR".to_owned(), "127.0.0.1:0".to_owned()),
    ]);
    let no_pg = ["is Postgres running", "RELAY_POSTGRES__URL"];
    let named = eventually(WAIT, || async { says(&relay, &no_pg) }).await;
    assert!(named, "{}", relay.log());
    relay.terminate();

    // A database without sql/ applied.
    let pg = PgCluster::start();
    let broker = Tansu::start();
    let mut relay = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    let named = eventually(WAIT, || async { says(&relay, &["apply sql/"]) }).await;
    assert!(named, "{}", relay.log());
    relay.terminate();

    // No broker where kafka.brokers points: said once, with the setting, while rows wait.
    pg.apply_schema();
    let closed = format!("127.0.0.1:{}", free_port());
    let mut relay = Relay::start(&relay_env(&pg, &closed, &[]));
    let no_broker = [
        "the broker does not answer",
        "RELAY_KAFKA__BROKERS",
        &closed,
    ];
    let named = eventually(WAIT, || async { says(&relay, &no_broker) }).await;
    assert!(named, "{}", relay.log());
    relay.terminate();

    // The table is there but its publication is not: the statement to run.
    pg.psql("DROP PUBLICATION outbox_pub");
    let mut relay = Relay::start(&relay_env(&pg, &broker.brokers(), &[]));
    let no_pub = [
        "publication 'outbox_pub' does not exist",
        "CREATE PUBLICATION",
    ];
    let named = eventually(WAIT, || async { says(&relay, &no_pub) }).await;
    assert!(named, "{}", relay.log());
    relay.terminate();
}

/// Wrong password: the relay fails fast with a message naming the fix.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_fails_fast_with_a_clear_message() {
    let pg = PgCluster::start();
    pg.apply_schema();
    pg.psql(&format!(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{PASSWORD}'"
    ));
    let broker = Tansu::start();
    let url = pg.url_for(SCRAM_USER, "wrong");
    let mut relay = Relay::start(&relay_env(
        &pg,
        &broker.brokers(),
        &[("RELAY_POSTGRES__URL", &url)],
    ));
    let status = relay
        .wait_exit(Duration::from_secs(60))
        .expect("fails fast");
    assert!(!status.success());
    let log = relay.log();
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(log.contains("RELAY_POSTGRES__URL"), "{log}");
    assert!(
        !log.contains("wrong@"),
        "password leaked into the log: {log}"
    );
}

/// Postgres restarting under the relay (fast, then immediate): the relay reconnects, resumes from
/// the slot and loses nothing; rows in flight at the break may arrive twice.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_is_survived_without_loss() {
    let Stack {
        pg,
        broker,
        relay: _relay,
    } = Stack::start(&[("RELAY_RETRY__MAX_DELAY_MS", "1000")]);
    wait_streaming(&pg.client().await, WAIT).await;
    let mut ids = Vec::new();
    for mode in ["fast", "immediate"] {
        let mut db = pg.client().await;
        for _ in 0..20 {
            ids.extend(insert_rows(&mut db, "bounce", 5, 25, true).await);
        }
        drop(db);
        pg.restart(mode);
    }
    let mut db = pg.client().await;
    ids.extend(insert_rows(&mut db, "bounce", 5, 25, true).await);
    // Postgres is the source of truth: every row it holds must have been published.
    let in_table: Vec<String> = db
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        in_table.len(),
        ids.len(),
        "commits survive restarts (synchronous_commit=on)"
    );
    let got = consume(
        &broker.brokers(),
        &["outbox.event.bounce"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let counts = count_by_id(&got);
    let lost = ids.iter().filter(|id| !counts.contains_key(*id)).count();
    assert_eq!(lost, 0, "lost {lost} of {} rows", ids.len());
    assert!(all_delivered(&db, WAIT).await);
}

/// A newcomer who types `outbox-relay` gets the commands and the two settings to give first,
/// not a relay trying to connect to a Postgres it was never told about.
#[test]
fn no_arguments_show_the_commands_and_the_two_settings_that_matter() {
    let out = std::process::Command::new(relay_bin())
        .env_remove("RELAY_POSTGRES__URL")
        .env_remove("RELAY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no command is a usage error");
    let help = String::from_utf8_lossy(&out.stderr);
    for needed in [
        "run",
        "check",
        "postgres.url",
        "RELAY_POSTGRES__URL",
        "kafka.brokers",
        "RELAY_KAFKA__BROKERS",
    ] {
        assert!(help.contains(needed), "{needed} missing from:\n{help}");
    }
    assert!(!help.contains("connect"), "it tried to connect:\n{help}");
    let long = std::process::Command::new(relay_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(long.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&long.stdout).contains("RELAY_KAFKA__BROKERS"));
}

/// An invalid setting stops the relay at start, naming the key, its environment variable and
/// the fix; nothing is connected to.
#[test]
fn invalid_config_fails_at_start_with_key_and_fix() {
    let out = std::process::Command::new(relay_bin())
        .arg("run")
        .env("RELAY_KAFKA__COMPRESSION", "brotli")
        .env("RELAY_POSTGRES__URL", "postgres://nobody@127.0.0.1:1/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kafka.compression")
            && err.contains("RELAY_KAFKA__COMPRESSION")
            && err.contains("expected one of none, gzip, snappy, lz4, zstd"),
        "{err}"
    );

    let out = std::process::Command::new(relay_bin())
        .arg("run")
        .env("RELAY_PIPELINE__MAX_IN_FLIGHT", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RELAY_PIPELINE__MAX_IN_FLIGHT") && err.contains("expected usize"),
        "{err}"
    );
}

/// A fast shutdown of Postgres waits for the walsender's client to confirm all WAL. While the
/// broker is unreachable the relay can confirm nothing (nothing is acknowledged, so nothing is
/// marked), so it must notice the shutdown another way and let go of the stream: Postgres stops
/// (pg_ctl's own 60 s limit), and once both are back nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_fast_shutdown_is_not_held_up_while_the_broker_is_down() {
    let Stack { pg, broker, relay } = Stack::start(&[("RELAY_RETRY__MAX_DELAY_MS", "1000")]);
    let mut db = pg.client().await;
    wait_streaming(&db, WAIT).await;
    let mut ids = insert_rows(&mut db, "stuck", 3, 20, true).await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());

    broker.pause();
    ids.extend(insert_rows(&mut db, "stuck", 3, 20, true).await);
    // Let the relay read them: they are in flight, unacknowledged, unmarked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(db);
    pg.stop("fast"); // panics if Postgres has not stopped within 60 s
    broker.resume();
    pg.start_server();

    let db = pg.client().await;
    assert!(all_delivered(&db, WAIT).await, "{}", relay.log());
    let got = consume(
        &broker.brokers(),
        &["outbox.event.stuck"],
        ids.len(),
        WAIT,
        LINGER,
    );
    let got_ids: std::collections::HashSet<&str> = got.iter().map(|m| m.id()).collect();
    for id in &ids {
        assert!(got_ids.contains(id.as_str()), "row {id} lost");
    }
}
