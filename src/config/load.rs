//! Loading: the TOML file, the `MINDSTREAM__*` overrides, and the rules serde cannot express.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Config, DeliveryMode, DEFAULT_SESSION_TIMEOUT_MS, ENV_PREFIX};

/// Deepest JSON nesting `limits.max_json_depth` may allow: serde_json refuses deeper input
/// itself.
const MAX_JSON_DEPTH: usize = 128;

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
        config.validate_actions().map_err(|(key, message)| {
            let origin = origin_of(&key, &overridden);
            ConfigError::Key { key, origin, message }
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
        let changelog = &self.state.changelog_topic;
        if changelog.is_empty()
            || changelog == &self.output.signals_topic
            || changelog == &self.output.dlq_topic
            || self.inputs.iter().any(|i| &i.topic == changelog)
        {
            return Err((
                "state.changelog_topic",
                "must be set and differ from every input and output topic".into(),
            ));
        }
        if self.state.restore_timeout.is_zero() {
            return Err(("state.restore_timeout", "must be longer than zero".into()));
        }
        if self.delivery.mode == DeliveryMode::ExactlyOnce {
            if self.delivery.transactional_id.as_deref().is_none_or(|id| id.trim().is_empty()) {
                return Err((
                    "delivery.transactional_id",
                    "is required with delivery.mode = \"exactly_once\"".into(),
                ));
            }
            let own = ["transactional.id", "enable.idempotence", "isolation.level"];
            let maps = [&self.kafka.client, &self.kafka.producer, &self.kafka.consumer];
            if let Some(key) = own.iter().find(|k| maps.iter().any(|m| m.contains_key(**k))) {
                return Err((
                    "delivery.mode",
                    format!("exactly_once sets `{key}` itself; remove it from kafka.*"),
                ));
            }
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
        if self.scoring.max_waiting == 0 {
            return Err(("scoring.max_waiting", "must be at least 1".into()));
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
        if self.http.signals_lookup && self.http.signals_lookup_capacity == 0 {
            let message = "must be at least 1 while http.signals_lookup is on".into();
            return Err(("http.signals_lookup_capacity", message));
        }
        self.validate_drain_timeout()?;
        self.validate_limits()?;
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(("log.filter", err.to_string()));
        }
        Ok(())
    }

    /// Checks the segments and alerts: names, rules, thresholds, and topics apart from the
    /// others. A segment's key is `segments[i].<field>` and its message names the segment.
    fn validate_actions(&self) -> Result<(), (String, String)> {
        for (i, segment) in self.segments.iter().enumerate() {
            let name = &segment.name;
            let named = name.len() <= 100
                && !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !named {
                let message =
                    format!("segment name `{name}` must be 1 to 100 letters, digits, `_` or `-`");
                return Err((format!("segments[{i}].name"), message));
            }
            if self.segments[..i].iter().any(|other| &other.name == name) {
                return Err((format!("segments[{i}].name"), format!("`{name}` is used twice")));
            }
            if let Err(err) = crate::actions::rule::Rule::parse(&segment.rule) {
                let message = format!("segment `{name}`: rule `{}` {err}", segment.rule);
                return Err((format!("segments[{i}].rule"), message));
            }
        }
        let alerts = &self.alerts;
        if !(alerts.threshold > 0.0 && alerts.threshold <= 1.0) {
            return Err(("alerts.threshold".into(), "must be in (0, 1]".into()));
        }
        if !(alerts.frustration_drop > 0.0 && alerts.frustration_drop <= 1.0) {
            return Err(("alerts.frustration_drop".into(), "must be in (0, 1]".into()));
        }
        if alerts.dedup_period.is_zero() {
            return Err(("alerts.dedup_period".into(), "must be longer than zero".into()));
        }
        let others =
            [&self.output.signals_topic, &self.output.dlq_topic, &self.state.changelog_topic];
        let used = [
            ("output.segments_topic", &self.output.segments_topic, !self.segments.is_empty()),
            ("output.alerts_topic", &self.output.alerts_topic, alerts.enabled),
        ];
        for (key, topic, in_use) in used {
            let clashes = others.contains(&topic)
                || self.inputs.iter().any(|i| &i.topic == topic)
                || (key == "output.alerts_topic" && topic == &self.output.segments_topic);
            if in_use && (topic.is_empty() || clashes) {
                let message = "must be set and differ from every other topic".to_owned();
                return Err((key.to_owned(), message));
            }
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

    fn validate_limits(&self) -> Result<(), (&'static str, String)> {
        let limits = &self.limits;
        let at_least_one = [
            ("limits.max_record_bytes", limits.max_record_bytes),
            ("limits.max_json_depth", limits.max_json_depth),
            ("limits.max_review_chars", limits.max_review_chars),
            ("limits.max_query_chars", limits.max_query_chars),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err((key, "must be at least 1".into()));
        }
        if limits.max_json_depth > MAX_JSON_DEPTH {
            let message = format!("must be at most {MAX_JSON_DEPTH}, the JSON parser's own bound");
            return Err(("limits.max_json_depth", message));
        }
        if !(limits.max_price > 0.0 && limits.max_price <= MAX_PRICE_LIMIT) {
            let message = format!("must be above zero and at most {MAX_PRICE_LIMIT:e}");
            return Err(("limits.max_price", message));
        }
        if limits.max_past.is_zero() {
            return Err(("limits.max_past", "must be longer than zero".into()));
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

/// Highest `limits.max_price` allowed: prices are stored as `f32` and rendered as whole
/// numbers, which stays exact in order of magnitude far below `f32::MAX` and `i64::MAX`.
const MAX_PRICE_LIMIT: f64 = 1e15;
