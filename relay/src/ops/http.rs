//! The admin HTTP listener (`http.addr`, env `RELAY_HTTP__ADDR`, default `127.0.0.1:8080`):
//! read-only and unauthenticated, for probes and scrapers.
//!
//! `GET /metrics`: Prometheus text (see `crate::metrics`). `GET /healthz`: 200 while the process
//! serves. `GET /readyz`: 200 while streaming with the broker reachable, else 503 with the
//! reasons (see `crate::health`). The transaction oracle answers on a listener of its own,
//! authenticated and bounded ([`super::oracle_http`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::health::Health;
use crate::oracle::Oracle;

/// The oracle every check goes through, built from the configuration.
pub fn oracle(config: &Config) -> Arc<Oracle> {
    let t = &config.transactions;
    Arc::new(Oracle::new(
        config.pg_target(),
        &config.outbox.schema,
        Duration::from_millis(t.lock_timeout_ms),
        t.max_connections,
    ))
}

/// What the routes serve from.
#[derive(Clone)]
pub struct AdminState {
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
