//! The transaction oracle: what became of the local transaction with a given key?
//!
//! Brokers that hold a message until its producer's local transaction is decided (RocketMQ half
//! messages, DTM's "query prepared") ask this when the producer never said. The answer comes
//! from `sql/003_transactions.sql`: `outbox_tx_check(key)` settles an undecided key as rolled
//! back (barrier fencing: a business transaction that starts later cannot commit), waits for one
//! in flight, and reads the outcome. Anything that keeps the check from deciding — the lock
//! timeout, Postgres down, a missing function — is [`TxStatus::Unknown`], never a rollback: the
//! broker asks again later.

use crate::pgtls::PgTarget;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_postgres::Client;

use crate::postgres;
use crate::quote::quote_ident;

/// The oracle's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStatus {
    Committed,
    RolledBack,
    /// Undecided; the reason, for logs and the HTTP answer.
    Unknown(String),
}

impl TxStatus {
    /// `committed`, `rolled_back` or `unknown`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TxStatus::Committed => "committed",
            TxStatus::RolledBack => "rolled_back",
            TxStatus::Unknown(_) => "unknown",
        }
    }
}

/// The longest transaction key accepted (Postgres would store longer ones, but no broker sends
/// them and a bound keeps the table's index small).
pub const MAX_KEY_BYTES: usize = 1024;

/// Answers checks through a few pooled Postgres connections.
pub struct Oracle {
    pg: PgTarget,
    check_sql: String,
    age_sql: String,
    purge_sql: String,
    lock_timeout: Duration,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl Oracle {
    /// `schema` is where `sql/003_transactions.sql` was applied (the outbox's schema);
    /// `max_connections` bounds the checks running at once (others wait for a connection).
    pub fn new(
        pg: PgTarget,
        schema: &str,
        lock_timeout: Duration,
        max_connections: usize,
    ) -> Oracle {
        let mut pg = pg;
        // A check must answer while the broker still waits; Postgres down is "unknown" fast.
        pg.config.connect_timeout(Duration::from_secs(3));
        let schema = quote_ident(schema);
        Oracle {
            pg,
            check_sql: format!("SELECT {schema}.outbox_tx_check($1)"),
            age_sql: format!(
                "SELECT extract(epoch FROM now() - created_at)::float8 FROM {schema}.outbox_tx \
                 WHERE tx_key = $1 AND outcome = 'commit'"
            ),
            purge_sql: format!("SELECT {schema}.outbox_tx_purge(make_interval(secs => $1), $2)"),
            lock_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_connections.max(1)),
        }
    }

    /// What happened to the transaction `key`. Settles it as rolled back if nothing committed it
    /// (see the module docs); `Unknown` when the check cannot decide.
    pub async fn check(&self, key: &str) -> TxStatus {
        if let Err(why) = validate_key(key) {
            return TxStatus::Unknown(why);
        }
        // The lock timeout bounds the wait on a transaction in flight; the overall deadline
        // covers everything else (a stalled connection, a slow server).
        let deadline = self.lock_timeout + Duration::from_secs(5);
        match tokio::time::timeout(deadline, self.run_check(key)).await {
            Ok(Ok(status)) => status,
            Ok(Err(reason)) => TxStatus::Unknown(reason),
            Err(_) => TxStatus::Unknown(format!(
                "the check did not finish within {} ms",
                deadline.as_millis()
            )),
        }
    }

    async fn run_check(&self, key: &str) -> Result<TxStatus, String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the oracle is shutting down".to_owned())?;
        let mut client = self.take().await?;
        let result = self.check_on(&mut client, key).await;
        match &result {
            // A connection that failed may be in an aborted transaction or broken: drop it.
            Ok(_) => self.give_back(client),
            Err(_) => drop(client),
        }
        result
    }

    async fn check_on(&self, client: &mut Client, key: &str) -> Result<TxStatus, String> {
        // Read committed: the read after the insert must see a transaction that committed while
        // the check waited (under repeatable read it would be a serialization error).
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| explain(&e))?;
        let ms = self.lock_timeout.as_millis().max(1);
        tx.batch_execute(&format!("SET LOCAL lock_timeout = '{ms}ms'"))
            .await
            .map_err(|e| explain(&e))?;
        let row = tx
            .query_one(&self.check_sql, &[&key])
            .await
            .map_err(|e| explain(&e))?;
        let outcome: String = row.try_get(0).map_err(|e| explain(&e))?;
        tx.commit().await.map_err(|e| explain(&e))?;
        match outcome.as_str() {
            "committed" => Ok(TxStatus::Committed),
            "rolled_back" => Ok(TxStatus::RolledBack),
            other => Err(format!(
                "outbox_tx_check returned {other:?}; re-apply sql/003_transactions.sql"
            )),
        }
    }

    /// How long ago the key was recorded as committed; `None` if it is not committed or the
    /// oracle cannot say.
    pub async fn committed_age(&self, key: &str) -> Option<Duration> {
        let _permit = self.permits.acquire().await.ok()?;
        let client = self.take().await.ok()?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let query = client.query_opt(&self.age_sql, &params);
        let row = tokio::time::timeout(Duration::from_secs(5), query)
            .await
            .ok()?
            .ok()??;
        self.give_back(client);
        let secs: f64 = row.try_get(0).ok()?;
        Some(Duration::from_secs_f64(secs.max(0.0)))
    }

    /// Deletes up to `batch` keys older than `retention`; returns how many went.
    pub async fn purge(&self, retention: Duration, batch: i32) -> Result<i64, String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the oracle is shutting down".to_owned())?;
        let client = self.take().await?;
        let secs = retention.as_secs_f64();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&secs, &batch];
        let purge = client.query_one(&self.purge_sql, &params);
        // Bounded, so a stuck purge cannot hold a connection permit away from checks.
        match tokio::time::timeout(Duration::from_secs(60), purge).await {
            Ok(Ok(row)) => {
                let n: i64 = row.try_get(0).map_err(|e| explain(&e))?;
                self.give_back(client);
                Ok(n)
            }
            Ok(Err(e)) => Err(explain(&e)),
            Err(_) => Err("the purge did not finish within 60 s".into()),
        }
    }

    async fn take(&self) -> Result<Client, String> {
        let pooled = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        if let Some(c) = pooled.filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        postgres::connect(&self.pg).await.map_err(|e| {
            format!(
                "cannot reach Postgres to check the transaction: {}",
                postgres::describe(&e)
            )
        })
    }

    fn give_back(&self, client: Client) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(client);
        }
    }
}

/// Which of the oracle's functions (`outbox_tx_begin`, `outbox_tx_check`, `outbox_tx_purge`)
/// are installed in `schema`.
pub async fn installed_functions(
    client: &Client,
    schema: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname IN ('outbox_tx_begin', 'outbox_tx_check', 'outbox_tx_purge')",
            &[&schema],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A key the oracle accepts: 1 to [`MAX_KEY_BYTES`] bytes (as `outbox_tx_begin` enforces).
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        Err(format!(
            "the transaction key is {} bytes; keys are 1 to {MAX_KEY_BYTES} bytes",
            key.len()
        ))
    } else {
        Ok(())
    }
}

/// Why a check failed, with the fix where there is one.
fn explain(e: &tokio_postgres::Error) -> String {
    let code = e.code().map(|c| c.code());
    match code {
        Some("55P03") => {
            "the transaction is still in flight (lock_timeout reached); ask again later".into()
        }
        Some("40001") => "the key changed during the check (a concurrent purge); ask again".into(),
        Some("42883") | Some("42P01") => format!(
            "{}: the transaction oracle is not installed; apply sql/003_transactions.sql in the outbox's schema",
            postgres::describe(e)
        ),
        _ => postgres::describe(e),
    }
}
