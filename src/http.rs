//! The operational HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (model loaded, partitions assigned, broker reachable).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::source::Assignment;

/// What readiness is made of; written by the pipeline, read by `/readyz`.
#[derive(Default)]
pub struct Health {
    pub model_loaded: AtomicBool,
    /// False while the client reports every broker down.
    pub broker_down: AtomicBool,
    pub assignment: Assignment,
    /// True while newly assigned partitions' state is read back from the changelog.
    pub restoring: Arc<AtomicBool>,
}

impl Health {
    /// The reasons the processor is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.model_loaded.load(Ordering::SeqCst) {
            reasons.push("model not loaded");
        }
        if self.assignment.lock().map(|a| a.is_empty()).unwrap_or(true) {
            reasons.push("no partitions assigned");
        }
        if self.restoring.load(Ordering::SeqCst) {
            reasons.push("restoring state");
        }
        if self.broker_down.load(Ordering::SeqCst) {
            reasons.push("broker unreachable");
        }
        reasons
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `listen` and serves until the process ends. Returns the bound address (port 0
/// picks a free port).
pub async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(cause = %err, "http server stopped");
        }
    });
    tracing::info!(address = %bound, "http server listening");
    Ok(bound)
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let reasons = state.health.not_ready();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join(", ")))
    }
}
