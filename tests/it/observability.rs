//! The processor as SREs see it, checked with the real tools: a Prometheus server (Debian's
//! `prometheus` package, installed by `scripts/setup.sh`) scrapes a processor during a replay
//! and answers PromQL with the replayed counts; `promtool` checks a live scrape and the alert
//! rules; every expression of the Grafana dashboard names scraped metrics and evaluates;
//! `/readyz` answers 503 until the model is loaded and partitions are assigned; the signals
//! lookup answers with the latest record of a user.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mindstream::event::{self, Format};
use mindstream::import;

use crate::support::{self, Broker, Processor};

/// Bad lines mixed into the replay, with the reason each is rejected for.
const BAD_LINES: [(&str, &str); 3] = [
    ("{\"user_id\":", "malformed"),
    (r#"{"user_id":"u","event_id":"x2","event_time":5,"kind":"teleport"}"#, "unknown_kind"),
    ("not json at all", "malformed"),
];

/// Good events replayed.
const EVENTS: usize = 1_200;

/// Longest wait for the processor or Prometheus to reach an expected state.
const PATIENCE: Duration = Duration::from_secs(90);

#[test]
fn alert_rules_pass_promtool() {
    let rules = support::root().join("deploy/prometheus/alerts.yml");
    let output = Command::new(prometheus_tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        output.status.success(),
        "promtool check rules {} failed:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_scrapes_a_replay() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let http = format!("127.0.0.1:{}", support::free_port());
    let topics = Topics::new();
    let config = support::write_config(
        dir.path(),
        &broker,
        &support::unique("group"),
        &format!(
            "[[inputs]]\ntopic = \"{}\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"{}\"\nformat = \"json\"\ndlq_topic = \"{}\"\n\
             segments_topic = \"{}\"\n\
             [scoring]\ncoalesce = \"100ms\"\nexplain_candidates = 2\n\
             [http]\nlisten = \"{http}\"\n\
             [[segments]]\nname = \"churning\"\nrule = \"churn_risk > 0.5\"\n",
            topics.input,
            topics.signals,
            topics.dlq,
            support::unique("segments")
        ),
    );
    let mut create = support::mindstream();
    create.args(["--config", path_str(&config), "topics", "--partitions", "2"]);
    support::assert_success(&support::run_with_limit(create, Duration::from_secs(60)), "topics");

    let mut processor = Processor::start(&config, false, dir.path().join("processor.log"));
    let early = readiness_until_ready(&http, &mut processor);
    let reasons: BTreeSet<&str> = early.iter().map(|(_, body)| body.trim()).collect();
    println!("/readyz before ready: {} answers, {reasons:?}", early.len());
    let prometheus = PrometheusServer::start(dir.path(), &http);

    let input = dir.path().join("events.jsonl");
    let users = write_input(&input);
    let mut replay = support::mindstream();
    replay.args(["--config", path_str(&config), "replay", "--input", path_str(&input)]);
    replay.args(["--topic", &topics.input, "--format", "json"]);
    support::assert_success(&support::run_with_limit(replay, Duration::from_secs(60)), "replay");
    let records = (EVENTS + BAD_LINES.len()) as f64;

    // Prometheus's view once it has scraped the whole replay.
    let value = prometheus.wait_for("sum(mindstream_records_in_total)", |v| v == records);
    assert_eq!(value, records, "records in, as Prometheus scraped them\n{}", processor.log_tail());
    let accepted = prometheus.scalar("sum(mindstream_events_accepted_total)");
    assert_eq!(accepted, EVENTS as f64, "events accepted");
    let mut expected_reasons: BTreeMap<String, f64> = BTreeMap::new();
    for (_, reason) in BAD_LINES {
        *expected_reasons.entry(reason.to_owned()).or_default() += 1.0;
    }
    let reasons =
        prometheus.by_label("sum by (reason) (mindstream_records_rejected_total)", "reason");
    assert_eq!(reasons, expected_reasons, "rejections by reason");
    let delivered =
        prometheus.wait_for("sum(mindstream_signal_records_total)", |v| v >= users.len() as f64);
    assert!(
        delivered >= users.len() as f64 && delivered <= EVENTS as f64,
        "{delivered} signal records for {} users and {EVENTS} events",
        users.len()
    );
    // Most CDNOW customers score a churn risk above one half (docs/evaluation).
    let entered = prometheus
        .wait_for("sum(mindstream_segment_changes_total{change=\"entered\"})", |v| v >= 1.0);
    assert!(entered >= 1.0 && entered <= delivered, "{entered} segment entries");
    let p99 = prometheus
        .scalar("histogram_quantile(0.99, sum by (le) (mindstream_end_to_end_seconds_bucket))");
    assert!(p99 > 0.0 && p99 <= 60.0, "end-to-end p99 of {p99} s");
    let calls = prometheus.scalar("sum(mindstream_inference_seconds_count)");
    assert!(calls >= 1.0 && calls <= delivered, "{calls} model calls for {delivered} records");
    assert_eq!(prometheus.scalar("mindstream_ready"), 1.0, "ready as scraped");
    let providers = prometheus.by_label("mindstream_model_info", "execution_provider");
    assert_eq!(providers.keys().collect::<Vec<_>>(), ["cpu"], "model info");
    let lagging = prometheus.wait_for("max(mindstream_consumer_lag_records)", |v| v == 0.0);
    assert_eq!(lagging, 0.0, "consumer lag after the replay");

    // Rejections reach the log as bursts, not one line per record.
    let log = processor.log();
    let lines = log.lines().filter(|l| l.contains("records rejected to the dead-letter topic"));
    let lines = lines.count();
    assert!(
        (1..BAD_LINES.len()).contains(&lines),
        "{lines} log lines for {} rejections spread over one replay\n{}",
        BAD_LINES.len(),
        processor.log_tail()
    );

    // The tools' verdicts on the live scrape, the rules as loaded, and the dashboard.
    let scrape = get_ok(&http, "/metrics");
    promtool_check_metrics(&scrape);
    prometheus.assert_rules_healthy();
    check_dashboard(&prometheus, &scrape);

    // Readiness, seen from the start of the process: 503 with the reasons while the model
    // loads, then while the group assigns partitions.
    assert!(
        early.iter().all(|(status, body)| *status == 503 && body.starts_with("not ready")),
        "every /readyz answer before ready must be 503 with its reasons: {reasons:?}"
    );
    let loading = early.iter().position(|(_, body)| body.contains("model not loaded"));
    let joining = early.iter().rposition(|(_, body)| {
        body.contains("no partitions assigned") && !body.contains("model not loaded")
    });
    assert!(
        loading.zip(joining).is_some_and(|(loading, joining)| loading < joining),
        "expected 'model not loaded' answers, then 'no partitions assigned' ones: {reasons:?}"
    );

    check_lookup(&http, &broker, &topics.signals);
    processor.signal("TERM");
    let status = processor.wait_for_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGTERM: {status:?}");
}

/// Fresh topic names of one test.
struct Topics {
    input: String,
    signals: String,
    dlq: String,
}

impl Topics {
    fn new() -> Topics {
        Topics {
            input: support::unique("clicks"),
            signals: support::unique("signals"),
            dlq: support::unique("dlq"),
        }
    }
}

/// Real CDNOW purchases with the bad lines spread through them; returns the raw user ids.
fn write_input(path: &Path) -> BTreeSet<String> {
    let data = support::sample_data();
    let mut events =
        import::events(import::Source::Cdnow, &data.join("purchases/cdnow-master.txt"))
            .expect("read the CDNOW sample");
    events.truncate(EVENTS);
    let users = events.iter().map(|e| e.user_id.to_string()).collect();
    let mut lines: Vec<Vec<u8>> = events.iter().map(|e| event::encode(Format::Json, e)).collect();
    for (i, (bad, _)) in BAD_LINES.iter().enumerate() {
        lines.insert(50 + i * 400, bad.as_bytes().to_vec());
    }
    let mut file = std::fs::File::create(path).expect("create the input file");
    for line in lines {
        file.write_all(&line).and_then(|()| file.write_all(b"\n")).expect("write the input");
    }
    users
}

/// Polls `/readyz` from the processor's start until it answers 200; returns every answer
/// before that.
fn readiness_until_ready(http: &str, processor: &mut Processor) -> Vec<(u16, String)> {
    let deadline = Instant::now() + PATIENCE;
    let mut answers = Vec::new();
    loop {
        if let Some((status, body)) = support::http_get(http, "/readyz") {
            if status == 200 {
                return answers;
            }
            answers.push((status, body));
        }
        assert!(processor.exited().is_none(), "the processor exited\n{}", processor.log_tail());
        assert!(
            Instant::now() < deadline,
            "not ready within {PATIENCE:?}; answers {answers:?}\n{}",
            processor.log_tail()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `promtool check metrics` on a scrape: the exposition parses and follows Prometheus's
/// naming conventions.
fn promtool_check_metrics(scrape: &str) {
    let mut child = Command::new(prometheus_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin is piped")
        .write_all(scrape.as_bytes())
        .expect("feed promtool the scrape");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `expr` of the dashboard names only metrics in `scrape` and evaluates in Prometheus.
fn check_dashboard(prometheus: &PrometheusServer, scrape: &str) {
    let path = support::root().join("deploy/grafana/dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "only {} expressions on the dashboard", exprs.len());

    let scraped = scraped_names(scrape);
    let mut unknown = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            if !scraped.contains(&name) {
                unknown.insert(name);
            }
        }
        let query = concrete(expr);
        if let Err(err) = prometheus.query(&query) {
            panic!("dashboard expression {expr:?} does not evaluate: {err}");
        }
    }
    assert!(unknown.is_empty(), "dashboard metrics missing from the live scrape: {unknown:?}");
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    _ => collect_exprs(value, into),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, into)),
        _ => {}
    }
}

/// Series names of a Prometheus text exposition.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The `mindstream_*` names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mindstream_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// A dashboard expression with Grafana's variables replaced by what Prometheus accepts:
/// interval variables by one minute, other variables by a match-anything pattern.
fn concrete(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut chars = expr.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek().is_some_and(|&(_, c)| c == '{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.peek().is_some_and(|&(_, c)| c == '}') {
            chars.next();
        }
        out.push_str(if name.starts_with("__") { "1m" } else { ".*" });
    }
    out
}

/// The lookup answers with a user's latest record, refuses what is not a user key, and does
/// not know keys it never delivered.
fn check_lookup(http: &str, broker: &Broker, signals_topic: &str) {
    let reads = support::read_all(broker, signals_topic);
    let latest =
        support::latest(support::signal_records(&reads, Format::Json).into_iter().map(|(_, r)| r));
    let (key, record) = latest.iter().next().expect("at least one signal record");
    let body = get_ok(http, &format!("/users/{key}/signals"));
    let served: mindstream::signals::SignalRecord =
        serde_json::from_str(&body).expect("the lookup answers with a signal record");
    assert_eq!(&served.user_key, key);
    assert_eq!(served.version, record.version, "the lookup serves the latest version");

    let raw = support::http_get(http, "/users/user-12/signals").map(|(status, _)| status);
    assert_eq!(raw, Some(400), "a raw id is not a user key");
    let unknown = "0".repeat(32);
    let missing = support::http_get(http, &format!("/users/{unknown}/signals"));
    assert_eq!(missing.map(|(status, _)| status), Some(404), "a key never delivered");
}

fn get_ok(http: &str, path: &str) -> String {
    match support::http_get(http, path) {
        Some((200, body)) => body,
        other => panic!("GET {path} answered {other:?}"),
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A binary of the Prometheus package that `scripts/setup.sh` unpacks into `.tools`.
fn prometheus_tool(name: &str) -> PathBuf {
    let path = support::root().join(".tools/prometheus/usr/bin").join(name);
    assert!(path.exists(), "{} is missing: run scripts/setup.sh", path.display());
    path
}

/// A Prometheus server on a free loopback port that scrapes one target every second and
/// loads the project's alert rules; stopped when dropped.
struct PrometheusServer {
    child: Child,
    address: String,
    log: PathBuf,
}

impl PrometheusServer {
    fn start(dir: &Path, target: &str) -> PrometheusServer {
        let rules = support::root().join("deploy/prometheus/alerts.yml");
        let config = dir.join("prometheus.yml");
        let text = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: mindstream\n    static_configs:\n      \
             - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(&config, text).expect("write prometheus.yml");
        let address = format!("127.0.0.1:{}", support::free_port());
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("create the Prometheus log");
        let child = Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        let server = PrometheusServer { child, address, log };
        let deadline = Instant::now() + PATIENCE;
        while support::http_get(&server.address, "/-/ready").is_none_or(|(s, _)| s != 200) {
            assert!(Instant::now() < deadline, "prometheus not ready\n{}", server.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The result vector of an instant query, or Prometheus's error.
    fn query(&self, query: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(query));
        let (status, body) =
            support::http_get(&self.address, &path).ok_or("prometheus did not answer")?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        match &answer["data"]["result"] {
            serde_json::Value::Array(items) => Ok(items.clone()),
            // A scalar or string result has one value.
            other => Ok(vec![serde_json::json!({ "value": other })]),
        }
    }

    /// The single value of `query`; NaN when it has no series.
    fn scalar(&self, query: &str) -> f64 {
        let result = self.query(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        match result.as_slice() {
            [] => f64::NAN,
            [one] => sample_value(one),
            many => panic!("{query} has {} series, expected one: {many:?}", many.len()),
        }
    }

    /// Polls `query` until `done` holds for its value or [`PATIENCE`] passes; returns the last
    /// value.
    fn wait_for(&self, query: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = self.scalar(query);
            if done(value) || Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `query`'s values keyed by `label`.
    fn by_label(&self, query: &str, label: &str) -> BTreeMap<String, f64> {
        let result = self.query(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        result
            .iter()
            .map(|series| {
                let value = series["metric"][label].as_str().unwrap_or_default().to_owned();
                (value, sample_value(series))
            })
            .collect()
    }

    /// Every alert rule loaded and evaluated without error, after at least one evaluation.
    fn assert_rules_healthy(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, body) =
                support::http_get(&self.address, "/api/v1/rules").expect("prometheus answers");
            let answer: serde_json::Value = serde_json::from_str(&body).expect("rules JSON");
            let rules: Vec<&serde_json::Value> = answer["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            assert!(!rules.is_empty(), "no alert rules loaded\n{}", self.log_tail());
            let unhealthy: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} ({}: {})", r["name"], r["health"], r["lastError"]))
                .collect();
            if unhealthy.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "unhealthy alert rules: {unhealthy:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series of an instant query's result (`"value": [time, "text"]`).
fn sample_value(series: &serde_json::Value) -> f64 {
    series["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// Percent-encodes a query string value.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
