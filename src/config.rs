//! Typed configuration: a TOML file, overridden key by key from the environment.
//!
//! Every key is documented in README.md ("Configuration"). Unknown keys are rejected, durations
//! are written with their unit (`"500ms"`, `"30d"`), and any key can be set from the
//! environment as `MINDSTREAM__<SECTION>__<KEY>` (value parsed as TOML, else taken as a string;
//! inside the `kafka.*` property maps, `_` in the key stands for `.`). A bad file or value stops
//! start-up with an error naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::Format;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "MINDSTREAM__";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The input topics; `mindstream run` needs at least one.
    #[serde(default)]
    pub inputs: Vec<InputConfig>,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub window: WindowConfig,
    #[serde(default)]
    pub scoring: ScoringConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub interests: InterestsConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest the processor spends finishing in-flight work and committing on SIGTERM or
    /// SIGINT; must be shorter than the consumer's `session.timeout.ms`.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout: default_drain_timeout() }
    }
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(20)
}

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group of the processor instances.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// librdkafka properties for every client (TLS, SASL, timeouts), passed through verbatim.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// How often delivered offsets are committed.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub topic: String,
    /// `json` or `protobuf`.
    pub format: Format,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Topic of signal records, keyed by the pseudonymised user key.
    #[serde(default = "default_signals_topic")]
    pub signals_topic: String,
    /// `json` or `protobuf`.
    #[serde(default = "default_output_format")]
    pub format: Format,
    /// Dead-letter topic for rejected input records.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Most events a user's window holds. Absent: the value the model was trained with.
    pub max_events: Option<usize>,
    /// Event-time span of the window, newest event back. Absent: the model's training value.
    #[serde(default, with = "humantime_serde")]
    pub span: Option<Duration>,
    /// How far behind a partition's newest event time an event may arrive and still be used.
    #[serde(default = "default_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A user idle longer than this (event time) is evicted and starts afresh. Absent: the
    /// model's training value.
    #[serde(default, with = "humantime_serde")]
    pub user_ttl: Option<Duration>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    /// Per-user debounce: a changed window is scored once this long after its first unscored
    /// change, so a burst of events gives one scoring of the latest window.
    #[serde(default = "default_coalesce", with = "humantime_serde")]
    pub coalesce: Duration,
    /// Most sequences in one model call.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest a partial batch waits for more sequences.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub max_batch_wait: Duration,
    /// Scoring jobs queued for the model before the consumer waits.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Leave-one-out explanations: how many of the newest events are tried (0 turns them off).
    #[serde(default = "default_explain_candidates")]
    pub explain_candidates: usize,
    /// How many contributing events each score names.
    #[serde(default = "default_explain_top")]
    pub explain_top: usize,
    /// Model worker threads, each with its own session.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Folder with `model.onnx`, `model.json` and `tokenizer.json` (or `vocab.json` +
    /// `merges.txt`).
    #[serde(default = "default_model_dir")]
    pub dir: PathBuf,
    /// Path of `libonnxruntime.so`; absent: `ORT_DYLIB_PATH`, then `.tools/onnxruntime/`.
    pub ort_library: Option<PathBuf>,
    /// `cpu` or `cuda`.
    #[serde(default = "default_provider")]
    pub execution_provider: ExecutionProvider,
    /// With `cuda`: run on the CPU when CUDA cannot be had instead of failing start-up.
    #[serde(default)]
    pub allow_cpu_fallback: bool,
    /// Threads inside each operator.
    #[serde(default = "default_intra_threads")]
    pub intra_threads: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterestsConfig {
    /// Event-time half-life of the category counters.
    #[serde(default = "default_half_life", with = "humantime_serde")]
    pub half_life: Duration,
    /// Categories reported per record.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Categories tracked per user (the least-weighted one is dropped beyond this).
    #[serde(default = "default_tracked")]
    pub tracked: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// File holding the pseudonymisation secret (its bytes, trailing newline ignored).
    pub pseudonym_key_file: Option<PathBuf>,
    /// Environment variable holding the secret, used when no file is set.
    #[serde(default = "default_key_env")]
    pub pseudonym_key_env: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; absent turns the server off.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `plain` or `json`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `mindstream=debug,rdkafka=warn`.
    #[serde(default = "default_log_filter")]
    pub filter: String,
}

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_signals_topic() -> String {
    "mindstream-signals".into()
}
fn default_dlq_topic() -> String {
    "mindstream-dlq".into()
}
fn default_group() -> String {
    "mindstream".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_output_format() -> Format {
    Format::Protobuf
}
fn default_lateness() -> Duration {
    Duration::from_secs(3600)
}
fn default_coalesce() -> Duration {
    Duration::from_millis(500)
}
fn default_batch_size() -> usize {
    32
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(5)
}
fn default_queue_capacity() -> usize {
    256
}
fn default_explain_candidates() -> usize {
    8
}
fn default_explain_top() -> usize {
    3
}
fn default_workers() -> usize {
    1
}
fn default_model_dir() -> PathBuf {
    PathBuf::from("models")
}
fn default_provider() -> ExecutionProvider {
    ExecutionProvider::Cpu
}
fn default_intra_threads() -> usize {
    1
}
fn default_half_life() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_top_k() -> usize {
    5
}
fn default_tracked() -> usize {
    32
}
fn default_key_env() -> String {
    "MINDSTREAM_PSEUDONYM_KEY".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Plain
}
fn default_log_filter() -> String {
    "info".into()
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            group_id: default_group(),
            client: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            commit_interval: default_commit_interval(),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            signals_topic: default_signals_topic(),
            format: default_output_format(),
            dlq_topic: default_dlq_topic(),
        }
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            max_events: None,
            span: None,
            allowed_lateness: default_lateness(),
            user_ttl: None,
        }
    }
}

impl Default for ScoringConfig {
    fn default() -> Self {
        ScoringConfig {
            coalesce: default_coalesce(),
            batch_size: default_batch_size(),
            max_batch_wait: default_batch_wait(),
            queue_capacity: default_queue_capacity(),
            explain_candidates: default_explain_candidates(),
            explain_top: default_explain_top(),
            workers: default_workers(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dir: default_model_dir(),
            ort_library: None,
            execution_provider: default_provider(),
            allow_cpu_fallback: false,
            intra_threads: default_intra_threads(),
        }
    }
}

impl Default for InterestsConfig {
    fn default() -> Self {
        InterestsConfig {
            half_life: default_half_life(),
            top_k: default_top_k(),
            tracked: default_tracked(),
        }
    }
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig { pseudonym_key_file: None, pseudonym_key_env: default_key_env() }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: default_log_format(), filter: default_log_filter() }
    }
}

/// A configuration that cannot be used. Every variant names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config key `{key}`{origin}: {message}")]
    Key { key: String, origin: String, message: String },
    #[error("environment variable {var}: cannot set `{key}`, {message}")]
    Env { var: String, key: String, message: String },
}

impl Config {
    /// Reads `path` (if any), applies `MINDSTREAM__*` overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.into(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Syntax { path: path.into(), source })?
            }
        };
        let overridden = apply_env(&mut table, env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|err| {
                let key = err.path().to_string();
                let origin = origin_of(&key, &overridden);
                ConfigError::Key { key, origin, message: err.into_inner().message().to_owned() }
            })?;
        config.validate().map_err(|(key, message)| {
            let origin = origin_of(key, &overridden);
            ConfigError::Key { key: key.to_owned(), origin, message }
        })?;
        Ok(config)
    }

    /// Checks the rules serde cannot express. Returns the key at fault and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(("kafka.brokers", "must name at least one broker".into()));
        }
        for (i, input) in self.inputs.iter().enumerate() {
            if input.topic.is_empty() {
                return Err(("inputs.topic", format!("input {i} has an empty topic")));
            }
            if self.inputs[..i].iter().any(|other| other.topic == input.topic) {
                return Err(("inputs.topic", format!("topic `{}` is listed twice", input.topic)));
            }
            let out = [&self.output.signals_topic, &self.output.dlq_topic];
            if out.contains(&&input.topic) {
                return Err(("inputs.topic", format!("`{}` is also an output topic", input.topic)));
            }
        }
        if self.output.signals_topic.is_empty() {
            return Err(("output.signals_topic", "must not be empty".into()));
        }
        if self.output.dlq_topic.is_empty() || self.output.dlq_topic == self.output.signals_topic {
            return Err(("output.dlq_topic", "must be set and differ from signals_topic".into()));
        }
        if self.window.max_events == Some(0) {
            return Err(("window.max_events", "must be at least 1".into()));
        }
        if self.window.user_ttl.is_some_and(|s| s.is_zero()) {
            return Err(("window.user_ttl", "must be longer than zero".into()));
        }
        if self.window.span.is_some_and(|s| s.is_zero()) {
            return Err(("window.span", "must be longer than zero".into()));
        }
        if self.scoring.batch_size == 0 {
            return Err(("scoring.batch_size", "must be at least 1".into()));
        }
        if self.scoring.queue_capacity == 0 {
            return Err(("scoring.queue_capacity", "must be at least 1".into()));
        }
        if self.scoring.workers == 0 {
            return Err(("scoring.workers", "must be at least 1".into()));
        }
        if self.model.intra_threads == 0 {
            return Err(("model.intra_threads", "must be at least 1".into()));
        }
        if self.interests.half_life.is_zero() {
            return Err(("interests.half_life", "must be longer than zero".into()));
        }
        if self.interests.tracked < self.interests.top_k {
            return Err(("interests.tracked", "must be at least interests.top_k".into()));
        }
        self.validate_drain_timeout()?;
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(("log.filter", err.to_string()));
        }
        Ok(())
    }

    /// The extra rule of `mindstream run`: at least one input topic.
    pub fn check_runnable(&self) -> Result<(), ConfigError> {
        if self.inputs.is_empty() {
            return Err(ConfigError::Key {
                key: "inputs".into(),
                origin: String::new(),
                message: "at least one input topic is required to run".into(),
            });
        }
        Ok(())
    }

    fn validate_drain_timeout(&self) -> Result<(), (&'static str, String)> {
        let key = "session.timeout.ms";
        let session_ms = match self.kafka.consumer.get(key).or(self.kafka.client.get(key)) {
            None => DEFAULT_SESSION_TIMEOUT_MS,
            Some(value) => value.parse().map_err(|_| {
                ("kafka.consumer.session.timeout.ms", format!("`{value}` is not a number"))
            })?,
        };
        if self.shutdown.drain_timeout.as_millis() >= u128::from(session_ms) {
            return Err((
                "shutdown.drain_timeout",
                format!("must be shorter than the consumer session timeout ({session_ms} ms)"),
            ));
        }
        Ok(())
    }

    /// The configuration as TOML with secrets replaced, for the start-up log line.
    pub fn redacted(&self) -> String {
        let mut copy = self.clone();
        for map in [&mut copy.kafka.client, &mut copy.kafka.consumer, &mut copy.kafka.producer] {
            for (key, value) in map.iter_mut() {
                if is_secret(key) {
                    *value = "<redacted>".into();
                }
            }
        }
        toml::to_string(&copy).unwrap_or_else(|err| format!("<unprintable config: {err}>"))
    }
}

/// librdkafka properties whose values are secrets.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "key.pem", "certificate.pem", "token", "sasl.oauthbearer.config"]
        .iter()
        .any(|needle| key.contains(needle))
}

fn origin_of(key: &str, overridden: &BTreeMap<String, String>) -> String {
    overridden
        .iter()
        .find(|(path, _)| key == path.as_str() || key.starts_with(&format!("{path}.")))
        .map(|(_, var)| format!(" (from {var})"))
        .unwrap_or_default()
}

/// Applies `MINDSTREAM__A__B=value` as `a.b = value`; returns each overridden key path with
/// the variable that set it.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut overridden = BTreeMap::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let mut parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            let (key, message) = (rest.to_owned(), "empty key segment".to_owned());
            return Err(ConfigError::Env { var: var.clone(), key, message });
        }
        let in_property_map = parts.len() == 3
            && parts[0] == "kafka"
            && matches!(parts[1].as_str(), "client" | "consumer" | "producer");
        if in_property_map {
            parts[2] = parts[2].replace('_', ".");
        }
        let key = parts.join(".");
        let value = if in_property_map { toml::Value::String(raw) } else { parse_env_value(&raw) };
        set_path(table, &parts, value).map_err(|message| ConfigError::Env {
            var: var.clone(),
            key: key.clone(),
            message,
        })?;
        overridden.insert(key, var);
    }
    Ok(overridden)
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, parts: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = parts.split_last().ok_or("empty key")?;
    let mut node = table;
    for part in parents {
        let entry = node.entry(part.clone()).or_insert_with(|| toml::Table::new().into());
        node = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    node.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        [[inputs]]
        topic = "clicks"
        format = "json"
        [output]
        signals_topic = "signals"
        dlq_topic = "dlq"
    "#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.scoring.batch_size, 32);
        assert_eq!(config.output.format, Format::Protobuf);
        assert_eq!(config.window.user_ttl, None);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(&format!("{MINIMAL}\n[window]\nmax_evnets = 3\n"), &[]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("window") && message.contains("max_evnets"), "{message}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = load(&format!("{MINIMAL}\n[scoring]\ncoalesce = \"soon\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("scoring.coalesce"), "{err}");
        let err = load(&format!("{MINIMAL}\n[scoring]\nbatch_size = 0\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("scoring.batch_size"), "{err}");
    }

    #[test]
    fn env_overrides_and_names_its_variable() {
        let env = [
            ("MINDSTREAM__SCORING__BATCH_SIZE", "8"),
            ("MINDSTREAM__KAFKA__CLIENT__SECURITY_PROTOCOL", "SSL"),
            ("MINDSTREAM__WINDOW__SPAN", "2h"),
        ];
        let config = load(MINIMAL, &env).unwrap();
        assert_eq!(config.scoring.batch_size, 8);
        assert_eq!(config.kafka.client["security.protocol"], "SSL");
        assert_eq!(config.window.span, Some(Duration::from_secs(7200)));

        let err = load(MINIMAL, &[("MINDSTREAM__SCORING__BATCH_SIZE", "many")]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("scoring.batch_size"), "{message}");
        assert!(message.contains("MINDSTREAM__SCORING__BATCH_SIZE"), "{message}");
    }

    #[test]
    fn redaction_hides_secrets() {
        let env = [("MINDSTREAM__KAFKA__CLIENT__SASL_PASSWORD", "hunter2")];
        let config = load(MINIMAL, &env).unwrap();
        let printed = config.redacted();
        assert!(!printed.contains("hunter2"));
        assert!(printed.contains("sasl.password"));
    }

    #[test]
    fn drain_timeout_must_undercut_the_session_timeout() {
        let env = [("MINDSTREAM__KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000")];
        let err = load(MINIMAL, &env).unwrap_err();
        assert!(err.to_string().contains("shutdown.drain_timeout"), "{err}");
        let env = [env[0], ("MINDSTREAM__SHUTDOWN__DRAIN_TIMEOUT", "5s")];
        assert!(load(MINIMAL, &env).is_ok());
    }

    #[test]
    fn input_topic_cannot_be_an_output() {
        let text = MINIMAL.replace("topic = \"clicks\"", "topic = \"dlq\"");
        assert!(load(&text, &[]).unwrap_err().to_string().contains("inputs.topic"));
    }
}
