//! The admin HTTP listener (`http.addr`, env `RELAY_HTTP__ADDR`, default `127.0.0.1:8080`).
//!
//! `GET /metrics`: Prometheus text (see `crate::metrics`). `GET /healthz`: 200 while the process
//! serves. `GET /readyz`: 200 while streaming with the broker reachable, else 503 with the
//! reasons (see `crate::health`).
//!
//! `GET /v1/transactions/{key}` asks the transaction oracle what became of a local transaction,
//! for gateways and coordinators that check over HTTP:
//! `200 {"key":"…","status":"committed"|"rolled_back"|"unknown"}`, with a `reason` when unknown.
//! `GET /v1/dtm/query-prepared?gid={key}` answers the same question the way DTM's two-phase
//! messages expect of a QueryPrepared URL: `200 SUCCESS` (committed), `409 FAILURE` (rolled
//! back), `425 ONGOING` (unknown: ask again).
//! A check settles an undecided key as rolled back, so the listener belongs on loopback or a
//! private network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::health::Health;
use crate::metrics::TRANSACTION_CHECKS;
use crate::oracle::{Oracle, TxStatus, validate_key};

/// The oracle every check goes through, built from the configuration.
pub fn oracle(config: &Config) -> Arc<Oracle> {
    let t = &config.transactions;
    Arc::new(Oracle::new(
        config.pg_config(),
        &config.outbox.schema,
        Duration::from_millis(t.lock_timeout_ms),
        t.max_connections,
    ))
}

/// What the routes serve from.
#[derive(Clone)]
pub struct AdminState {
    pub oracle: Arc<Oracle>,
    /// `None` when no recorder is installed (library use): `/metrics` answers 404.
    pub metrics: Option<PrometheusHandle>,
    pub health: Arc<Health>,
}

/// Binds `http.addr` (so a port in use fails the start, naming the key) and serves until
/// `shutdown`. `Ok(None)` when the listener is off.
pub async fn start(
    config: &Config,
    state: AdminState,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, String> {
    let addr = &config.http.addr;
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot serve the admin HTTP listener on {addr}: {e}; set http.addr (RELAY_HTTP__ADDR) \
             to a free port, or \"\" to turn it off"
        )
    })?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let app = router(state);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the admin HTTP listener stopped");
        }
    });
    Ok(Some(bound))
}

/// The routes, for [`start`] and tests.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .route("/v1/transactions/{key}", get(transaction_status))
        .route("/v1/dtm/query-prepared", get(dtm_query_prepared))
        .with_state(state)
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder installed").into_response(),
    }
}

async fn readiness(State(state): State<AdminState>) -> Response {
    match state.health.readiness() {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        )
            .into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "reasons": why})),
        )
            .into_response(),
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
        tracing::warn!(key, reason = %why, source, "transaction check answered unknown");
    }
    status
}

async fn transaction_status(
    State(AdminState { oracle, .. }): State<AdminState>,
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
    State(AdminState { oracle, .. }): State<AdminState>,
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

/// Deletes oracle keys older than `transactions.retention_hours`, in small batches, every
/// `transactions.purge_interval_ms`, until `shutdown`. Quiet while the oracle is not installed.
pub async fn purge_loop(config: &Config, oracle: Arc<Oracle>, shutdown: CancellationToken) {
    let t = &config.transactions;
    if t.retention_hours == 0 {
        return;
    }
    let retention = Duration::from_secs(t.retention_hours * 3600);
    let interval = Duration::from_millis(t.purge_interval_ms);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let mut total = 0;
        loop {
            match oracle.purge(retention, 1_000).await {
                Ok(n) => {
                    if failing {
                        tracing::info!("purging transaction keys again");
                        failing = false;
                    }
                    total += n;
                    if n < 1_000 || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(reason = %e, "cannot purge transaction keys; retrying every purge interval");
                        failing = true;
                    }
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(
                deleted = total,
                "purged transaction keys past their retention"
            );
        }
    }
}
