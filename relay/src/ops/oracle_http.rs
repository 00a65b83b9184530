//! The transaction oracle over HTTP, on a listener of its own (`transactions.http_addr`, off by
//! default), for gateways and coordinators that check over HTTP instead of through RocketMQ:
//!
//! - `GET /v1/transactions/{key}` → `200 {"key":"…","status":"committed"|"rolled_back"|"unknown"}`,
//!   with a `reason` when unknown;
//! - `GET /v1/dtm/query-prepared?gid={key}` → DTM's QueryPrepared contract: `200 SUCCESS`
//!   (committed), `409 FAILURE` (rolled back), `425 ONGOING` (unknown: ask again).
//!
//! A check changes state (it settles an undecided key as rolled back), so every request needs
//! `Authorization: Bearer <transactions.http_token>`, and the listener is bounded so that no
//! caller can starve the RocketMQ check-backs of the oracle's connections: at most
//! `transactions.http_max_concurrent` checks at once (the rest get 503 at once), at most
//! `transactions.http_rate_per_sec` requests a second (429), at most
//! `transactions.http_max_connections` connections, each closed after
//! `transactions.http_timeout_ms` × 6 (a slow client cannot hold one for long), and each request
//! answered within `transactions.http_timeout_ms`. Keys a caller chose are never logged whole.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::TRANSACTION_CHECKS;
use crate::oracle::{Oracle, TxStatus, validate_key};

/// What the guarded routes share.
#[derive(Clone)]
pub struct OracleState {
    oracle: Arc<Oracle>,
    token: Arc<str>,
    checks: Arc<Semaphore>,
    bucket: Arc<Mutex<Bucket>>,
    timeout: Duration,
}

impl OracleState {
    pub fn new(config: &Config, oracle: Arc<Oracle>) -> OracleState {
        let t = &config.transactions;
        OracleState {
            oracle,
            token: Arc::from(t.http_token.as_str()),
            checks: Arc::new(Semaphore::new(t.http_max_concurrent)),
            bucket: Arc::new(Mutex::new(Bucket::new(t.http_rate_per_sec))),
            timeout: Duration::from_millis(t.http_timeout_ms),
        }
    }
}

/// A token bucket: `rate` requests a second, bursts of up to `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Binds `transactions.http_addr` and serves the guarded oracle routes until `shutdown`.
/// `Ok(None)` when the listener is off.
pub async fn start(
    config: &Config,
    state: OracleState,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, String> {
    let t = &config.transactions;
    if t.http_addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&t.http_addr).await.map_err(|e| {
        format!(
            "cannot serve the transaction oracle on {}: {e}; set transactions.http_addr \
             (RELAY_TRANSACTIONS__HTTP_ADDR) to a free port, or \"\" to turn it off",
            t.http_addr
        )
    })?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let capped = Capped {
        inner: listener,
        slots: Arc::new(Semaphore::new(t.http_max_connections)),
        lifetime: Duration::from_millis(t.http_timeout_ms.saturating_mul(6)),
    };
    let app = router(state);
    tokio::spawn(async move {
        let served = axum::serve(capped, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the transaction oracle's HTTP listener stopped");
        }
    });
    Ok(Some(bound))
}

/// The guarded routes, for [`start`] and tests.
pub fn router(state: OracleState) -> Router {
    Router::new()
        .route("/v1/transactions/{key}", get(transaction_status))
        .route("/v1/dtm/query-prepared", get(dtm_query_prepared))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Authentication, then the rate limit, then the concurrency limit and the deadline.
async fn guard(State(state): State<OracleState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !same(presented.as_bytes(), state.token.as_bytes()) {
        metrics::counter!(TRANSACTION_CHECKS, "source" => "http", "status" => "unauthorized")
            .increment(1);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (transactions.http_token)",
        )
            .into_response();
    }
    let allowed = state
        .bucket
        .lock()
        .map(|mut b| b.take(Instant::now()))
        .unwrap_or(false);
    if !allowed {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "too many checks; transactions.http_rate_per_sec",
        )
            .into_response();
    }
    let Ok(_permit) = state.checks.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many checks at once; transactions.http_max_concurrent",
        )
            .into_response();
    };
    match tokio::time::timeout(state.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the check did not finish in time; ask again",
        )
            .into_response(),
    }
}

/// Compares in time independent of where the two differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || b.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A caller-chosen key for the log: its first 32 bytes and its length.
fn shown(key: &str) -> String {
    let mut end = key.len().min(32);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    if end < key.len() {
        format!("{}… ({} bytes)", &key[..end], key.len())
    } else {
        key.to_owned()
    }
}

#[derive(Serialize)]
struct StatusBody<'a> {
    key: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Asks the oracle on behalf of an HTTP caller; logs and counts the answer.
async fn ask(oracle: &Oracle, key: &str, source: &'static str) -> TxStatus {
    let status = oracle.check(key).await;
    metrics::counter!(TRANSACTION_CHECKS, "source" => source, "status" => status.as_str())
        .increment(1);
    if let TxStatus::Unknown(why) = &status {
        tracing::warn!(key = %shown(key), reason = %why, source, "transaction check answered unknown");
    }
    status
}

async fn transaction_status(
    State(OracleState { oracle, .. }): State<OracleState>,
    Path(key): Path<String>,
) -> Response {
    if let Err(why) = validate_key(&key) {
        let body = serde_json::json!({ "error": why });
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let status = ask(&oracle, &key, "http").await;
    let reason = match &status {
        TxStatus::Unknown(why) => Some(why.clone()),
        _ => None,
    };
    let body = StatusBody {
        key: &key,
        status: status.as_str(),
        reason,
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

#[derive(serde::Deserialize)]
struct DtmQuery {
    #[serde(default)]
    gid: String,
}

/// DTM's QueryPrepared contract: the body's SUCCESS / FAILURE / ONGOING decide, with 200 / 409 /
/// 425 to match.
async fn dtm_query_prepared(
    State(OracleState { oracle, .. }): State<OracleState>,
    Query(q): Query<DtmQuery>,
) -> Response {
    if let Err(why) = validate_key(&q.gid) {
        return (StatusCode::BAD_REQUEST, format!("gid: {why}")).into_response();
    }
    match ask(&oracle, &q.gid, "dtm").await {
        TxStatus::Committed => (StatusCode::OK, "SUCCESS").into_response(),
        TxStatus::RolledBack => (StatusCode::CONFLICT, "FAILURE").into_response(),
        TxStatus::Unknown(_) => (StatusCode::TOO_EARLY, "ONGOING").into_response(),
    }
}

/// A listener that holds at most as many connections as `slots` has permits (the next accept
/// waits for one to close) and closes each after `lifetime`.
struct Capped {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    lifetime: Duration,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedIo, SocketAddr) {
        // The semaphore is never closed: a permit always comes.
        let slot = self.slots.clone().acquire_owned().await.ok();
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let io = CappedIo {
            io,
            _slot: slot,
            deadline: Box::pin(tokio::time::sleep(self.lifetime)),
        };
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection holding its slot until dropped; reads fail once its lifetime is over.
struct CappedIo {
    io: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl AsyncRead for CappedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection lifetime over",
            )));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let mut b = Bucket::new(2);
        let t0 = b.at;
        assert!(b.take(t0) && b.take(t0));
        assert!(!b.take(t0), "the burst is the rate");
        assert!(
            b.take(t0 + Duration::from_millis(500)),
            "one token per half second"
        );
        assert!(!b.take(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn tokens_compare_whole_and_keys_are_shortened() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cre", b"s3cret") && !same(b"s3creT", b"s3cret"));
        assert!(!same(b"", b""), "no token configured admits nobody");
        let long = "k".repeat(1_000);
        assert_eq!(shown(&long), format!("{}… (1000 bytes)", "k".repeat(32)));
        assert_eq!(shown("order-1"), "order-1");
    }
}
