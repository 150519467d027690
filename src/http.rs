//! The operational HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (model loaded, partitions assigned, state restored, broker reachable) and,
//! when switched on, `GET /users/{key}/signals` (the latest record this instance delivered for
//! a pseudonymised key, from [`LatestSignals`]).
//!
//! The server starts before the model loads and the consumer joins its group, so that
//! orchestrators see a live process that is not ready yet. Request paths are never logged: a
//! lookup's path carries a user key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::lookup::LatestSignals;
use crate::metrics as m;
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
    latest: Option<Arc<LatestSignals>>,
}

/// Binds `listen` and serves until the process ends. Returns the bound address (port 0
/// picks a free port). `latest`, when given, turns the signals lookup on.
pub async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    latest: Option<Arc<LatestSignals>>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/users/{key}/signals", get(user_signals))
        .with_state(AppState { metrics, health, latest });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(cause = %err, "http server stopped");
        }
    });
    tracing::info!(address = %bound, "http server listening");
    Ok(bound)
}

/// Renders the metrics, with `mindstream_ready` taken at the moment of the scrape.
async fn render_metrics(State(state): State<AppState>) -> String {
    let ready = state.health.not_ready().is_empty();
    metrics::gauge!(m::READY).set(f64::from(u8::from(ready)));
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

/// The latest record of a pseudonymised user key, as JSON. 404 when the lookup is off or the
/// user is not among those this instance delivered for recently; 400 for anything that is not
/// a user key, so that the endpoint cannot be used to test raw user ids.
async fn user_signals(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    let Some(latest) = &state.latest else {
        return (StatusCode::NOT_FOUND, "the signals lookup is switched off\n").into_response();
    };
    if !is_user_key(&key) {
        return (StatusCode::BAD_REQUEST, "a user key is 32 lowercase hex digits\n")
            .into_response();
    }
    match latest.get(&key) {
        Some(record) => {
            let json = crate::signals::to_json(&record);
            ([(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            "no recent record for this key on this instance; the signal topic has every \
             user's latest record\n",
        )
            .into_response(),
    }
}

/// The shape of [`crate::privacy::Pseudonymizer::key`]'s output.
fn is_user_key(key: &str) -> bool {
    key.len() == 32 && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pseudonymised_keys_are_looked_up() {
        assert!(is_user_key("0123456789abcdef0123456789abcdef"));
        assert!(!is_user_key("0123456789ABCDEF0123456789ABCDEF"));
        assert!(!is_user_key("user-1001"));
        assert!(!is_user_key("0123456789abcdef0123456789abcdef0"));
    }

    #[test]
    fn not_ready_names_every_missing_part() {
        let health = Health::default();
        let reasons = health.not_ready();
        assert!(reasons.contains(&"model not loaded"), "{reasons:?}");
        assert!(reasons.contains(&"no partitions assigned"), "{reasons:?}");

        health.model_loaded.store(true, Ordering::SeqCst);
        health.broker_down.store(true, Ordering::SeqCst);
        let reasons = health.not_ready();
        assert!(!reasons.contains(&"model not loaded"), "{reasons:?}");
        assert!(reasons.contains(&"broker unreachable"), "{reasons:?}");
    }
}
