//! Typed configuration: a TOML file, overridden key by key from the environment.
//!
//! Every key is documented in README.md ("Configuration"). Unknown keys are rejected, durations
//! are written with their unit (`"500ms"`, `"30d"`), and any key can be set from the
//! environment as `MINDSTREAM__<SECTION>__<KEY>` (value parsed as TOML, else taken as a string;
//! inside the `kafka.*` property maps, `_` in the key stands for `.`). A bad file or value stops
//! start-up with an error naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Campaign segments evaluated on every signal record (`[[segments]]`).
    #[serde(default)]
    pub segments: Vec<SegmentConfig>,
    #[serde(default)]
    pub alerts: AlertsConfig,
}

fn default_segments_topic() -> String {
    "mindstream-segments".into()
}
fn default_alerts_topic() -> String {
    "mindstream-service-alerts".into()
}
fn default_top_items() -> usize {
    5
}

/// The delivery guarantee of signal records, changelog writes and input offsets.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Offsets are committed only after everything they produced is acknowledged; a restart
    /// may deliver a record again, with the same per-user `version`.
    AtLeastOnce,
    /// Signals, changelog writes, dead letters and input offsets are committed in one Kafka
    /// transaction; a restarted or zombie instance is fenced through `transactional_id`.
    ExactlyOnce,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// `at_least_once` or `exactly_once`.
    #[serde(default = "default_delivery_mode")]
    pub mode: DeliveryMode,
    /// With `exactly_once`: the producer's transactional id, stable across restarts of the
    /// same instance (for example the pod name of a StatefulSet) and unique among instances.
    pub transactional_id: Option<String>,
    /// With `exactly_once`: longest one transaction commit may take before the processor
    /// gives up and stops (a restart resumes from the last committed transaction).
    #[serde(default = "default_transaction_timeout", with = "humantime_serde")]
    pub transaction_timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: default_delivery_mode(),
            transactional_id: None,
            transaction_timeout: default_transaction_timeout(),
        }
    }
}

fn default_delivery_mode() -> DeliveryMode {
    DeliveryMode::AtLeastOnce
}
fn default_transaction_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Compacted topic of per-user window state, keyed by the pseudonymised user key, with
    /// as many partitions as each input topic.
    #[serde(default = "default_changelog_topic")]
    pub changelog_topic: String,
    /// Longest the restore of newly assigned partitions may take before the processor stops.
    #[serde(default = "default_restore_timeout", with = "humantime_serde")]
    pub restore_timeout: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            changelog_topic: default_changelog_topic(),
            restore_timeout: default_restore_timeout(),
        }
    }
}

fn default_changelog_topic() -> String {
    "mindstream-state".into()
}
fn default_restore_timeout() -> Duration {
    Duration::from_secs(120)
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
pub(crate) const DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

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
    /// Segment entries and exits, keyed by `<user key>/<segment>`; used when segments are
    /// configured.
    #[serde(default = "default_segments_topic")]
    pub segments_topic: String,
    /// Service alerts, keyed by the user key; used while `alerts.enabled`.
    #[serde(default = "default_alerts_topic")]
    pub alerts_topic: String,
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
    /// Users with unscored changes not yet queued, above which the input partitions are
    /// paused; they resume once it is back to half.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
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
    /// Run through ONNX Runtime's IO binding: each batch's inputs are bound, and only the
    /// output the scorer reads is bound, to host memory, so nothing else is copied back from
    /// the device. Scores are the same either way; what it saves is measured by
    /// `scripts/gpu-bench.sh`.
    #[serde(default)]
    pub io_binding: bool,
    /// Score leave-one-out variants from their window's cached keys and values when the model
    /// folder has a prefix graph (`mindstream-train prefix`): only the tokens after the
    /// left-out event are computed. Scores agree with whole-sequence scoring to float
    /// rounding. `false` scores every variant whole.
    #[serde(default = "default_true")]
    pub prefix_reuse: bool,
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
    /// Items of the window reported per record (`interest_items`), ranked by the same
    /// decayed weights over the window's events.
    #[serde(default = "default_top_items")]
    pub top_items: usize,
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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; absent turns the server off.
    pub listen: Option<SocketAddr>,
    /// Serve `GET /users/{key}/signals`, the latest record this instance delivered for a
    /// pseudonymised key.
    #[serde(default = "default_true")]
    pub signals_lookup: bool,
    /// Most users whose latest record the lookup keeps (the most recently delivered ones).
    #[serde(default = "default_signals_lookup_capacity")]
    pub signals_lookup_capacity: usize,
    /// Serve the console under `/console` (with `listen`): live signal distributions, segment
    /// sizes, and a lookup of a pseudonymised key's window. It shows pseudonymised keys and
    /// event ids, never raw user ids or text; off answers 404 there.
    #[serde(default = "default_true")]
    pub console: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            signals_lookup: true,
            signals_lookup_capacity: default_signals_lookup_capacity(),
            console: true,
        }
    }
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

fn default_true() -> bool {
    true
}
fn default_signals_lookup_capacity() -> usize {
    10_000
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
fn default_max_waiting() -> usize {
    8192
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
            segments_topic: default_segments_topic(),
            alerts_topic: default_alerts_topic(),
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
            max_waiting: default_max_waiting(),
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
            io_binding: false,
            prefix_reuse: true,
        }
    }
}

impl Default for InterestsConfig {
    fn default() -> Self {
        InterestsConfig {
            half_life: default_half_life(),
            top_k: default_top_k(),
            tracked: default_tracked(),
            top_items: default_top_items(),
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

mod actions;
mod limits;
mod load;
#[cfg(test)]
mod tests;

pub use actions::{AlertsConfig, SegmentConfig};
pub use limits::LimitsConfig;
pub use load::ConfigError;
