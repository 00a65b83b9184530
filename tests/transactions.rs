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

/// The oracle listener's bearer token in these tests.
const TOKEN: &str = "test-token-0123456789";

/// How a case asks: the oracle itself, or the oracle's HTTP listener.
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
        Self::with(pg, lock_timeout, |_| {}).await
    }

    /// With the listener's settings changed by `tune`.
    async fn with(
        pg: &PgCluster,
        lock_timeout: Duration,
        tune: impl FnOnce(&mut Config),
    ) -> Checker {
        let mut config = Config::default();
        config.postgres.url = pg.url();
        config.transactions.http_addr = "127.0.0.1:0".into();
        config.transactions.http_token = TOKEN.into();
        config.transactions.http_max_concurrent = 3;
        config.transactions.lock_timeout_ms = lock_timeout.as_millis() as u64;
        tune(&mut config);
        config.validate().expect("valid listener settings");
        let oracle = outbox_relay::ops::http::oracle(&config);
        let stop = CancellationToken::new();
        let state = outbox_relay::ops::oracle_http::OracleState::new(&config, oracle.clone());
        let addr = outbox_relay::ops::oracle_http::start(&config, state, stop.clone())
            .await
            .expect("oracle listener")
            .expect("oracle listener on");
        Checker {
            oracle,
            http: addr.to_string(),
            _stop: stop.drop_guard(),
        }
    }

    /// `GET path` on the oracle's listener, with the token.
    async fn get(&self, path: &str) -> (u16, String) {
        http_get_with(
            &self.http,
            path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        )
        .await
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
                let (code, body) = self.get(&format!("/v1/transactions/{key}")).await;
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
    let (code, body) = checker.get(&format!("/v1/transactions/{long}")).await;
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

/// The relay answers checks only on the oracle's own listener and only with the bearer token
/// (read from a secret file); the admin listener (probes, metrics) no longer serves them.
/// Before: anyone reaching the admin listener could check, and so settle, any key.
#[tokio::test]
async fn the_relay_serves_transaction_checks_only_with_the_token_on_their_own_listener() {
    let admin = format!("127.0.0.1:{}", free_port());
    let oracle = format!("127.0.0.1:{}", free_port());
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("oracle-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let token_file = token_file.display().to_string();
    let stack = Stack::start(&[
        ("RELAY_HTTP__ADDR", &admin),
        ("RELAY_TRANSACTIONS__HTTP_ADDR", &oracle),
        ("RELAY_TRANSACTIONS__HTTP_TOKEN_FILE", &token_file),
    ]);
    let mut client = stack.pg.client().await;
    client
        .batch_execute("CREATE TABLE orders (id text PRIMARY KEY, amount int NOT NULL)")
        .await
        .expect("business table");
    commit_business(&mut client, "via-relay").await;
    let up = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&oracle).await.is_ok()
            && tokio::net::TcpStream::connect(&admin).await.is_ok()
    })
    .await;
    assert!(up, "the relay did not listen: {}", stack.relay.log());
    let bearer = format!("Bearer {TOKEN}");
    let (code, body) = http_get_with(
        &oracle,
        "/v1/transactions/via-relay",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        v,
        serde_json::json!({"key": "via-relay", "status": "committed"})
    );
    let (code, _) = http_get(&oracle, "/v1/transactions/nobody").await;
    assert_eq!(code, 401, "no token");
    let (code, _) = http_get_with(
        &oracle,
        "/v1/transactions/nobody",
        &[("Authorization", "Bearer wrong-token-0123456789")],
    )
    .await;
    assert_eq!(code, 401, "wrong token");
    let settled: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_tx WHERE tx_key = 'nobody'",
            &[],
        )
        .await
        .expect("outbox_tx")
        .get(0);
    assert_eq!(settled, 0, "a refused request settles nothing");
    let (code, _) = http_get(&admin, "/v1/transactions/nobody").await;
    assert_eq!(code, 404, "the admin listener has no oracle routes");
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);
}

/// The listener's bounds: a check beyond `http_max_concurrent` is refused at once (503) while
/// another waits on a transaction in flight, requests beyond `http_rate_per_sec` get 429, so no
/// HTTP caller can hold the oracle's connections that RocketMQ check-backs need.
#[tokio::test]
async fn the_oracle_listener_bounds_concurrency_and_rate() {
    let (pg, mut client) = setup().await;
    let checker = Checker::with(&pg, Duration::from_secs(2), |c| {
        c.transactions.http_max_concurrent = 1;
        c.transactions.http_rate_per_sec = 3;
    })
    .await;
    let tx = begin_business(&mut client, "held").await;
    let waiting = {
        let http = checker.http.clone();
        tokio::spawn(async move {
            http_get_with(
                &http,
                "/v1/transactions/held",
                &[("Authorization", &format!("Bearer {TOKEN}"))],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = checker.get("/v1/transactions/other").await;
    assert_eq!(code, 503, "{body}");
    let (code, body) = waiting.await.expect("first check");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("unknown"),
        "in flight past the lock timeout: {body}"
    );
    tx.rollback().await.expect("rollback");
    // A bucket of three a second: six requests at once cannot all pass.
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(checker.get("/v1/transactions/other").await.0);
    }
    assert!(codes.contains(&429), "{codes:?}");
    let _ = pg;
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
    let (code, body) = checker
        .get("/v1/dtm/query-prepared?gid=dtm-ok&trans_type=msg")
        .await;
    assert_eq!((code, body.as_str()), (200, "SUCCESS"));
    let (code, body) = checker.get("/v1/dtm/query-prepared?gid=dtm-never").await;
    assert_eq!((code, body.as_str()), (409, "FAILURE"));
    let tx = begin_business(&mut client, "dtm-running").await;
    let (code, body) = checker.get("/v1/dtm/query-prepared?gid=dtm-running").await;
    assert_eq!((code, body.as_str()), (425, "ONGOING"));
    tx.commit().await.expect("commit");
    let (code, _) = checker.get("/v1/dtm/query-prepared?gid=dtm-running").await;
    assert_eq!(code, 200);
    let (code, _) = checker.get("/v1/dtm/query-prepared").await;
    assert_eq!(code, 400);
}
