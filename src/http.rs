//! The operational HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (model loaded, partitions assigned, state restored, broker reachable) and,
//! when switched on, `GET /users/{key}/signals` (the latest record this instance delivered for
//! a pseudonymised key, from [`LatestSignals`]) and the console ([`crate::console`]): the page
//! at `/console`, its script and style sheet, `/console/api/overview` (the distributions and
//! segment samples) and `/console/api/users/{key}` (the latest record and the user's window,
//! asked of the consume loop).
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

use crate::console::{self, UserView, Window};
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
    console: Option<console::Access>,
}

/// Binds `listen` and serves until the process ends. Returns the bound address (port 0
/// picks a free port). `latest`, when given, turns the signals lookup on; `console` the
/// console.
pub async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    latest: Option<Arc<LatestSignals>>,
    console: Option<console::Access>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/users/{key}/signals", get(user_signals))
        .route("/console", get(console_page))
        .route("/console/console.js", get(console_script))
        .route("/console/console.css", get(console_style))
        .route("/console/api/overview", get(console_overview))
        .route("/console/api/users/{key}", get(console_user))
        .with_state(AppState { metrics, health, latest, console });
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

/// The console's page. Its policy lets it load only what this server serves.
async fn console_page(State(state): State<AppState>) -> Response {
    console_asset(&state, "text/html; charset=utf-8", console::PAGE)
}

async fn console_script(State(state): State<AppState>) -> Response {
    console_asset(&state, "text/javascript; charset=utf-8", console::SCRIPT)
}

async fn console_style(State(state): State<AppState>) -> Response {
    console_asset(&state, "text/css; charset=utf-8", console::STYLE)
}

fn console_asset(state: &AppState, content_type: &'static str, body: &'static str) -> Response {
    if state.console.is_none() {
        return console_off();
    }
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONSOLE_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, body).into_response()
}

/// Everything from this server, nothing inline, no frames, no form posts.
const CONSOLE_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The distributions, the segment samples and the records observed, as JSON.
async fn console_overview(State(state): State<AppState>) -> Response {
    let Some(access) = &state.console else { return console_off() };
    json(&access.console.overview())
}

/// A pseudonymised key's latest record and window, as JSON: 400 for anything that is not a
/// user key, 404 when this instance has neither.
async fn console_user(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    let Some(access) = &state.console else { return console_off() };
    if !is_user_key(&key) {
        return (StatusCode::BAD_REQUEST, "a user key is 32 lowercase hex digits\n")
            .into_response();
    }
    let record = state.latest.as_ref().and_then(|latest| latest.get(&key));
    let window = access.window(&key).await;
    let unanswered = window == Window::Unavailable;
    match UserView::of(&key, record, window) {
        Some(view) => json(&view),
        None if unanswered => (
            StatusCode::NOT_FOUND,
            "no recent record for this key, and the processor did not answer for its window\n",
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no recent record and no window for this key here\n")
            .into_response(),
    }
}

fn console_off() -> Response {
    (StatusCode::NOT_FOUND, "the console is switched off\n").into_response()
}

/// `value` as a JSON answer that no cache keeps.
fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => {
            let headers =
                [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")];
            (headers, body).into_response()
        }
        Err(err) => {
            tracing::error!(cause = %err, "cannot encode a console answer");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
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

    /// A server on a free loopback port with the given lookup and console.
    async fn server(
        latest: Option<Arc<LatestSignals>>,
        console: Option<console::Access>,
    ) -> SocketAddr {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("a loopback address");
        serve(listen, metrics.handle(), Arc::default(), latest, console)
            .await
            .expect("the test server binds")
    }

    /// (status, head, body) of a GET.
    async fn get(address: SocketAddr, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        (status.expect("a status line"), head.to_owned(), body.to_owned())
    }

    fn record(user_key: &str) -> crate::signals::SignalRecord {
        use crate::signals::{Contribution, RecordLineage, Score, SignalRecord};
        let named = Contribution {
            event_id: "e2".into(),
            event_time_ms: 2,
            summary: "buy cd".into(),
            delta: 0.25,
        };
        let score = Score {
            signal: "purchase_intent".into(),
            value: 0.75,
            status: "validated".into(),
            top_events: vec![named],
        };
        SignalRecord {
            window_start_ms: 1,
            window_end_ms: 2,
            event_count: 2,
            scores: vec![score],
            lineage: RecordLineage { topic: "t".into(), partition: 0, offset: 7 },
            produced_at_ms: 5,
            ..SignalRecord::for_test(user_key, 3, &[], &[])
        }
    }

    fn timeline_event(event_id: &str) -> console::TimelineEvent {
        console::TimelineEvent {
            event_id: event_id.into(),
            event_time_ms: 1,
            kind: "buy".into(),
            summary: "buy cd".into(),
            category_id: "cd".into(),
            item_id: "order".into(),
        }
    }

    #[tokio::test]
    async fn the_console_answers_404_when_switched_off() {
        let address = server(None, None).await;
        for path in [
            "/console",
            "/console/console.js",
            "/console/api/overview",
            "/console/api/users/0123456789abcdef0123456789abcdef",
        ] {
            let (status, _, body) = get(address, path).await;
            assert_eq!(status, 404, "GET {path}: {body}");
        }
        assert_eq!(get(address, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn the_console_serves_its_page_overview_and_users() {
        const KNOWN: &str = "0123456789abcdef0123456789abcdef";
        let latest = Arc::new(LatestSignals::new(10));
        latest.insert(record(KNOWN));
        let (access, mut questions) = console::Access::new(Vec::new());
        access.console.observe(&record(KNOWN));
        // The consume loop's part: it holds a window for KNOWN only.
        tokio::spawn(async move {
            while let Some(question) = questions.recv().await {
                let held = question.user_key == KNOWN;
                let events = vec![timeline_event("e1"), timeline_event("e2")];
                let _ = question.reply.send(held.then_some(events));
            }
        });
        let address = server(Some(latest), Some(access)).await;

        let (status, head, page) = get(address, "/console").await;
        assert_eq!(status, 200);
        assert!(page.contains("<title>mindstream console</title>"), "{page}");
        assert!(head.to_ascii_lowercase().contains("content-security-policy"), "{head}");
        assert_eq!(get(address, "/console/console.js").await.0, 200);
        assert_eq!(get(address, "/console/console.css").await.0, 200);

        let (status, _, body) = get(address, "/console/api/overview").await;
        assert_eq!(status, 200);
        let overview: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(overview["records_observed"], 1, "{body}");
        assert_eq!(overview["distributions"][0]["signal"], "purchase_intent", "{body}");
        assert_eq!(overview["distributions"][0]["counts"][15], 1, "{body}");

        let (status, _, body) = get(address, &format!("/console/api/users/{KNOWN}")).await;
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(view["record"]["version"], 3, "{body}");
        assert_eq!(view["window_status"], "held", "{body}");
        assert_eq!(view["timeline"][0]["event_id"], "e1", "{body}");
        assert_eq!(view["timeline"][0]["named_by"], serde_json::json!([]), "{body}");
        assert_eq!(view["timeline"][1]["named_by"][0]["signal"], "purchase_intent", "{body}");

        let unknown = "f".repeat(32);
        let (status, _, body) = get(address, &format!("/console/api/users/{unknown}")).await;
        assert_eq!(status, 404, "{body}");
        for bad in ["user-1001", "0123456789ABCDEF0123456789ABCDEF"] {
            let (status, _, body) = get(address, &format!("/console/api/users/{bad}")).await;
            assert_eq!(status, 400, "{bad}: {body}");
        }
    }
}
