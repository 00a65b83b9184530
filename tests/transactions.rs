//! The transaction oracle (`sql/003_transactions.sql`) and its HTTP endpoint, against a real
//! Postgres: committed, rolled back, in flight then commit, in flight then abort, a check before
//! the business transaction (fenced), lock timeout and Postgres down (unknown, never rollback),
//! and the purge. Every case is asked both directly and over `GET /v1/transactions/{key}`.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use outbox_relay::config::Config;
use outbox_relay::oracle::{Oracle, TxStatus};
use tokio_util::sync::CancellationToken;

/// How a case asks: the oracle itself, or the admin listener over HTTP.
#[derive(Clone, Copy, Debug)]
enum Ask {
    Direct,
    Http,
}

/// The oracle plus an admin listener serving it.
struct Checker {
    oracle: Arc<Oracle>,
    http: String,
    _stop: tokio_util::sync::DropGuard,
}

impl Checker {
    async fn new(pg: &PgCluster, lock_timeout: Duration) -> Checker {
        let mut config = Config::default();
        config.postgres.url = pg.url();
        config.http.addr = "127.0.0.1:0".into();
        config.transactions.lock_timeout_ms = lock_timeout.as_millis() as u64;
        let oracle = outbox_relay::ops::http::oracle(&config);
        let stop = CancellationToken::new();
        let state = outbox_relay::ops::http::AdminState {
            oracle: oracle.clone(),
            metrics: None,
            health: Default::default(),
        };
        let addr = outbox_relay::ops::http::start(&config, state, stop.clone())
            .await
            .expect("admin listener")
            .expect("admin listener on");
        Checker {
            oracle,
            http: addr.to_string(),
            _stop: stop.drop_guard(),
        }
    }

    /// The status as a string (`committed`, `rolled_back`, `unknown`) and the unknown reason.
    async fn ask(&self, how: Ask, key: &str) -> (String, String) {
        match how {
            Ask::Direct => {
                let s = self.oracle.check(key).await;
                let reason = match &s {
                    TxStatus::Unknown(r) => r.clone(),
                    _ => String::new(),
                };
                (s.as_str().to_owned(), reason)
            }
            Ask::Http => {
                let (code, body) = http_get(&self.http, &format!("/v1/transactions/{key}")).await;
                assert_eq!(code, 200, "GET /v1/transactions/{key}: {body}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
                assert_eq!(v["key"], key, "{body}");
                (
                    v["status"].as_str().expect("status").to_owned(),
                    v["reason"].as_str().unwrap_or_default().to_owned(),
                )
            }
        }
    }
}

async fn setup() -> (PgCluster, tokio_postgres::Client) {
    let pg = PgCluster::start();
    pg.apply_schema();
    let client = pg.client().await;
    client
        .batch_execute("CREATE TABLE orders (id text PRIMARY KEY, amount int NOT NULL)")
        .await
        .expect("business table");
    (pg, client)
}

/// A business transaction, as an app writes it: the oracle's barrier first, then its rows.
const BUSINESS: &str = "SELECT outbox_tx_begin($1)";

async fn begin_business<'a>(
    client: &'a mut tokio_postgres::Client,
    key: &str,
) -> tokio_postgres::Transaction<'a> {
    let tx = client.transaction().await.expect("begin");
    tx.execute(BUSINESS, &[&key])
        .await
        .expect("outbox_tx_begin");
    tx.execute("INSERT INTO orders VALUES ($1, 42)", &[&key])
        .await
        .expect("business insert");
    tx
}

/// A whole business transaction under `key`, committed.
async fn commit_business(client: &mut tokio_postgres::Client, key: &str) {
    begin_business(client, key)
        .await
        .commit()
        .await
        .expect("commit");
}

async fn order_exists(client: &tokio_postgres::Client, key: &str) -> bool {
    client
        .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&key])
        .await
        .expect("query")
        .is_some()
}

/// Waits until a session is blocked on a lock (the check waiting for the business transaction).
async fn wait_blocked(client: &tokio_postgres::Client) {
    let blocked = eventually(Duration::from_secs(20), || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    assert!(
        blocked,
        "the check never waited on the business transaction"
    );
}

#[tokio::test]
async fn committed_and_rolled_back_transactions_are_reported_as_such() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_secs(5)).await;
    for how in [Ask::Direct, Ask::Http] {
        let committed = format!("commit-{how:?}");
        commit_business(&mut client, &committed).await;
        assert_eq!(checker.ask(how, &committed).await.0, "committed", "{how:?}");
        // Asking again gives the same answer.
        assert_eq!(checker.ask(how, &committed).await.0, "committed", "{how:?}");

        let aborted = format!("abort-{how:?}");
        begin_business(&mut client, &aborted)
            .await
            .rollback()
            .await
            .expect("rollback");
        assert_eq!(checker.ask(how, &aborted).await.0, "rolled_back", "{how:?}");
        assert!(!order_exists(&client, &aborted).await);
    }
}

#[tokio::test]
async fn a_check_waits_for_a_transaction_in_flight_and_reports_its_outcome() {
    let (pg, mut client) = setup().await;
    let watcher = pg.client().await;
    let checker = Arc::new(Checker::new(&pg, Duration::from_secs(30)).await);
    for how in [Ask::Direct, Ask::Http] {
        for commit in [true, false] {
            let key = format!("inflight-{how:?}-{commit}");
            let tx = begin_business(&mut client, &key).await;
            let c = checker.clone();
            let k = key.clone();
            let asked = tokio::spawn(async move { c.ask(how, &k).await });
            wait_blocked(&watcher).await;
            assert!(
                !asked.is_finished(),
                "the check answered before the transaction ended"
            );
            if commit {
                tx.commit().await.expect("commit");
            } else {
                tx.rollback().await.expect("rollback");
            }
            let (status, reason) = asked.await.expect("check task");
            let want = if commit { "committed" } else { "rolled_back" };
            assert_eq!(status, want, "{how:?} commit={commit}: {reason}");
            assert_eq!(order_exists(&client, &key).await, commit);
        }
    }
}

#[tokio::test]
async fn a_check_before_the_business_transaction_fences_it() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_secs(5)).await;
    for how in [Ask::Direct, Ask::Http] {
        let key = format!("early-{how:?}");
        assert_eq!(checker.ask(how, &key).await.0, "rolled_back", "{how:?}");
        let tx = client.transaction().await.expect("begin");
        let err = tx
            .execute(BUSINESS, &[&key])
            .await
            .expect_err("the business transaction must fail after a rollback was settled");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "OB001", "{db:?}");
        assert!(db.message().contains("rolled back"), "{}", db.message());
        drop(tx);
        assert!(!order_exists(&client, &key).await);
        // The answer stays rolled back.
        assert_eq!(checker.ask(how, &key).await.0, "rolled_back", "{how:?}");
    }
    // A key is single-use: a second transaction with a committed key fails too.
    commit_business(&mut client, "used").await;
    let tx = client.transaction().await.expect("begin");
    let err = tx
        .execute(BUSINESS, &[&"used"])
        .await
        .expect_err("key reuse");
    assert_eq!(err.code().map(|c| c.code()), Some("OB002"), "{err:?}");
    drop(tx);
    // Calling it twice in one transaction is fine.
    let tx = client.transaction().await.expect("begin");
    tx.execute(BUSINESS, &[&"twice"]).await.expect("first call");
    tx.execute(BUSINESS, &[&"twice"])
        .await
        .expect("second call in the same transaction");
    tx.commit().await.expect("commit");
    assert_eq!(checker.ask(Ask::Direct, "twice").await.0, "committed");
}

#[tokio::test]
async fn a_lock_timeout_is_unknown_and_settles_nothing() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_millis(300)).await;
    for how in [Ask::Direct, Ask::Http] {
        let key = format!("slow-{how:?}");
        let tx = begin_business(&mut client, &key).await;
        let (status, reason) = checker.ask(how, &key).await;
        assert_eq!(status, "unknown", "{how:?}");
        assert!(reason.contains("in flight"), "{how:?}: {reason}");
        // The timed-out check left no rollback behind: the transaction still commits, and the
        // next check sees it.
        tx.commit().await.expect("commit after a timed-out check");
        assert_eq!(checker.ask(how, &key).await.0, "committed", "{how:?}");
    }
}

#[tokio::test]
async fn postgres_down_is_unknown_never_rolled_back() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_secs(2)).await;
    commit_business(&mut client, "before-down").await;
    // Warm the pool, so the checks below meet a dead pooled connection first.
    assert_eq!(checker.ask(Ask::Direct, "before-down").await.0, "committed");
    drop(client);
    pg.stop("fast");
    for how in [Ask::Direct, Ask::Http] {
        for key in ["before-down", "never-seen"] {
            let (status, reason) = checker.ask(how, key).await;
            assert_eq!(status, "unknown", "{how:?} {key}");
            assert!(!reason.is_empty(), "{how:?}: an unknown answer says why");
        }
    }
    pg.start_server();
    let answered = eventually(Duration::from_secs(30), || async {
        checker.ask(Ask::Http, "before-down").await.0 == "committed"
    })
    .await;
    assert!(answered, "after Postgres came back the check answers again");
    // "never-seen" was never settled while Postgres was down; now it is.
    assert_eq!(
        checker.ask(Ask::Direct, "never-seen").await.0,
        "rolled_back"
    );
}

#[tokio::test]
async fn missing_oracle_and_bad_keys_are_explained() {
    let pg = PgCluster::start();
    // Only the outbox schema, not 003_transactions.sql.
    pg.psql_file(&repo_root().join("sql/001_outbox.sql"));
    let checker = Checker::new(&pg, Duration::from_secs(2)).await;
    let (status, reason) = checker.ask(Ask::Http, "k").await;
    assert_eq!(status, "unknown");
    assert!(reason.contains("sql/003_transactions.sql"), "{reason}");
    let long = "x".repeat(2000);
    let (code, body) = http_get(&checker.http, &format!("/v1/transactions/{long}")).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("1 to 1024 bytes"), "{body}");
}

#[tokio::test]
async fn the_purge_deletes_only_keys_past_the_retention() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_secs(5)).await;
    for i in 0..2500 {
        client
            .execute(
                "INSERT INTO outbox_tx (tx_key, outcome, created_at) VALUES ($1, 'commit', now() - interval '2 days')",
                &[&format!("old-{i}")],
            )
            .await
            .expect("old key");
    }
    commit_business(&mut client, "fresh").await;
    let mut deleted = 0;
    loop {
        let n = checker
            .oracle
            .purge(Duration::from_secs(24 * 3600), 1000)
            .await
            .expect("purge");
        assert!(n <= 1000, "batches are bounded: {n}");
        deleted += n;
        if n == 0 {
            break;
        }
    }
    assert_eq!(deleted, 2500);
    let left: Vec<String> = client
        .query("SELECT tx_key FROM outbox_tx", &[])
        .await
        .expect("keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["fresh".to_owned()]);
    assert_eq!(checker.ask(Ask::Direct, "fresh").await.0, "committed");
}

#[tokio::test]
async fn the_relay_serves_transaction_checks_on_its_admin_listener() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let stack = Stack::start(&[("RELAY_HTTP__ADDR", &addr)]);
    let mut client = stack.pg.client().await;
    client
        .batch_execute("CREATE TABLE orders (id text PRIMARY KEY, amount int NOT NULL)")
        .await
        .expect("business table");
    commit_business(&mut client, "via-relay").await;
    let up = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&addr).await.is_ok()
    })
    .await;
    assert!(
        up,
        "the relay did not listen on {addr}: {}",
        stack.relay.log()
    );
    let (code, body) = http_get(&addr, "/v1/transactions/via-relay").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        v,
        serde_json::json!({"key": "via-relay", "status": "committed"})
    );
    let (_, body) = http_get(&addr, "/v1/transactions/nobody").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["status"], "rolled_back");
}

/// Runs `examples/checked_order.sql` with psql as an app would.
fn run_example(pg: &PgCluster, key: &str, customer: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .arg(pg.url())
        .args(["-X", "-q", "-v", &format!("key={key}")])
        .args([
            "-v",
            &format!("customer={customer}"),
            "-v",
            "total=42.50",
            "-f",
        ])
        .arg(repo_root().join("examples/checked_order.sql"))
        .output()
        .expect("psql")
}

#[tokio::test]
async fn the_example_business_transaction_is_answered_committed() {
    let pg = PgCluster::start();
    pg.apply_schema();
    pg.psql_file(&repo_root().join("examples/orders_schema.sql"));
    let out = run_example(&pg, "order-request-7f3a", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checker = Checker::new(&pg, Duration::from_secs(2)).await;
    assert_eq!(
        checker.ask(Ask::Http, "order-request-7f3a").await.0,
        "committed"
    );
    // Running it again with the same key fails: keys are single-use.
    let again = run_example(&pg, "order-request-7f3a", "bob");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already committed"));
}

#[tokio::test]
async fn the_barrier_refuses_savepoints_and_oversized_keys() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_secs(5)).await;
    // Inside a savepoint, rolling back to it would drop the barrier while the transaction
    // commits: refused.
    let mut tx = client.transaction().await.expect("begin");
    let sp = tx.savepoint("business_step").await.expect("savepoint");
    let err = sp
        .execute(BUSINESS, &[&"in-savepoint"])
        .await
        .expect_err("a barrier inside a savepoint");
    assert_eq!(err.code().map(|c| c.code()), Some("25001"), "{err:?}");
    drop(sp);
    drop(tx);
    assert_eq!(
        checker.ask(Ask::Direct, "in-savepoint").await.0,
        "rolled_back"
    );
    let long = "k".repeat(1025);
    let err = client
        .execute(BUSINESS, &[&long])
        .await
        .expect_err("long key");
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err:?}");
}

#[tokio::test]
async fn a_repeatable_read_business_transaction_is_fenced_or_reported_consistently() {
    let (pg, mut client) = setup().await;
    let watcher = pg.client().await;
    let checker = Arc::new(Checker::new(&pg, Duration::from_secs(30)).await);
    // In flight under REPEATABLE READ, then committed: the check waits and reports committed.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("begin");
    tx.execute(BUSINESS, &[&"rr-1"]).await.expect("barrier");
    let c = checker.clone();
    let asked = tokio::spawn(async move { c.ask(Ask::Direct, "rr-1").await });
    wait_blocked(&watcher).await;
    tx.commit().await.expect("commit");
    assert_eq!(asked.await.expect("check").0, "committed");
    // A check that settles rollback after the transaction took its snapshot: the barrier fails
    // (OB001 or a serialization failure), so the transaction cannot commit.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("begin");
    tx.query_one("SELECT 1", &[]).await.expect("snapshot taken");
    assert_eq!(checker.ask(Ask::Direct, "rr-2").await.0, "rolled_back");
    let err = tx.execute(BUSINESS, &[&"rr-2"]).await.expect_err("fenced");
    let code = err.code().map(|c| c.code().to_owned()).unwrap_or_default();
    assert!(code == "OB001" || code == "40001", "{err:?}");
}

#[tokio::test]
async fn dtm_query_prepared_answers_success_failure_or_ongoing() {
    let (pg, mut client) = setup().await;
    let checker = Checker::new(&pg, Duration::from_millis(300)).await;
    commit_business(&mut client, "dtm-ok").await;
    let (code, body) = http_get(
        &checker.http,
        "/v1/dtm/query-prepared?gid=dtm-ok&trans_type=msg",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "SUCCESS"));
    let (code, body) = http_get(&checker.http, "/v1/dtm/query-prepared?gid=dtm-never").await;
    assert_eq!((code, body.as_str()), (409, "FAILURE"));
    let tx = begin_business(&mut client, "dtm-running").await;
    let (code, body) = http_get(&checker.http, "/v1/dtm/query-prepared?gid=dtm-running").await;
    assert_eq!((code, body.as_str()), (425, "ONGOING"));
    tx.commit().await.expect("commit");
    let (code, _) = http_get(&checker.http, "/v1/dtm/query-prepared?gid=dtm-running").await;
    assert_eq!(code, 200);
    let (code, _) = http_get(&checker.http, "/v1/dtm/query-prepared").await;
    assert_eq!(code, 400);
}
