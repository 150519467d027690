//! The model card (`model.json`): what the model outputs, how its inputs must be built, what
//! it was trained on and how well it does. The processor reads the first half; people and the
//! training binary's report read the rest.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::window::{Detail, WindowEvent, WindowSpec};

/// Version of the card format this build reads and writes.
/// Version 2 added `calibration`: a build that reads only version 1 would serve the raw
/// scores of a calibrated model without a word, so it must refuse the card instead.
pub const CARD_VERSION: u32 = 2;

/// Versions this build reads: 1 (no calibration) and the current one.
const READABLE_VERSIONS: [u32; 2] = [1, CARD_VERSION];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCard {
    pub card_version: u32,
    /// Identifies the model in every signal record.
    pub model_version: String,
    pub description: String,
    /// ONNX file inside the model folder and its SHA-256, checked at load.
    pub onnx_file: String,
    pub onnx_sha256: String,
    /// Numeric precision of the graph's weights and arithmetic. Its inputs and outputs are the
    /// model contract's either way (int64 in, float32 out), so a build that predates this field
    /// serves an `fp16` card unchanged; absent means `fp32`.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// Tokenizer file inside the model folder.
    pub tokenizer_file: String,
    /// Text format the model was trained on ([`crate::render::RENDER_VERSION`]).
    pub render_version: u32,
    /// Longest token sequence the model takes.
    pub max_tokens: usize,
    /// Window shape used in training; the processor's default.
    pub window: WindowSpec,
    /// Idle time after which a user's state restarts, as in training; the processor's default.
    pub user_ttl_ms: i64,
    /// Outputs of the heads, in column order of the `scores` output.
    pub signals: Vec<SignalSpec>,
    /// Signals derived by rule from the model's outputs and the window.
    #[serde(default)]
    pub derived: Vec<SignalSpec>,
    /// Head weights for graphs that output only `last_hidden_state`, the prefix graph among
    /// them.
    #[serde(default)]
    pub heads: Option<HeadWeights>,
    /// A second graph over the same weights that continues from cached keys and values
    /// (`crate::train::export::export_prefix_onnx`). With it, a leave-one-out variant is
    /// scored from its window's cached prefix, computing only the tokens after the event it
    /// leaves out; its scores come from `heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_graph: Option<GraphFile>,
    /// Platt scaling of each head, in the order of `signals`, applied to every score served;
    /// empty in cards written before calibration, whose scores are served as the heads give
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calibration: Vec<Platt>,
    pub backbone: Backbone,
    #[serde(default)]
    pub training: Option<Training>,
    #[serde(default)]
    pub evaluation: Vec<Evaluation>,
}

/// Numeric precision of a model graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Float32 weights and arithmetic, as `mindstream-train build` exports.
    #[default]
    Fp32,
    /// Float16 weights and arithmetic, from `mindstream-train fp16`; meant for the `cuda`
    /// execution provider.
    Fp16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }

    fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }
}

/// One signal: its name, what it means, where its labels come from and when it applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalSpec {
    pub name: String,
    pub meaning: String,
    pub label_source: String,
    pub status: Status,
    pub applies_when: AppliesWhen,
    /// Label horizon, such as `30m` or `90d`, when the label looks ahead.
    #[serde(default)]
    pub horizon: Option<String>,
    /// Data sets the head learned from.
    #[serde(default)]
    pub trained_on: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Stable,
    Experimental,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Stable => "stable",
            Status::Experimental => "experimental",
        }
    }
}

/// The windows a signal is defined for; outside them the signal is left out of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppliesWhen {
    Always,
    /// The window holds a click-stream event (view, cart, fav, buy, remove-cart).
    HasClick,
    /// The window holds a cart event.
    HasCart,
    /// The window holds a review.
    HasReview,
    /// The window holds a priced or discounted click or a sort-by-price search.
    HasPrice,
    /// The window holds a review of an item bought earlier in the window.
    ReviewOfBoughtItem,
}

impl AppliesWhen {
    /// Whether the signal applies to a window with these events (oldest first).
    pub fn holds<'a>(self, events: impl IntoIterator<Item = &'a WindowEvent>) -> bool {
        let mut events = events.into_iter();
        match self {
            AppliesWhen::Always => true,
            AppliesWhen::HasClick => events.any(|e| matches!(e.detail, Detail::Click { .. })),
            AppliesWhen::HasCart => events.any(WindowEvent::is_cart),
            AppliesWhen::HasReview => events.any(WindowEvent::is_review),
            AppliesWhen::HasPrice => events.any(WindowEvent::is_priced),
            AppliesWhen::ReviewOfBoughtItem => {
                let mut bought: Vec<&str> = Vec::new();
                for event in events {
                    if event.is_buy() {
                        bought.push(&event.item_id);
                    } else if event.is_review() && bought.contains(&&*event.item_id) {
                        return true;
                    }
                }
                false
            }
        }
    }
}

/// An ONNX file inside the model folder and its SHA-256, checked at load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFile {
    pub onnx_file: String,
    pub onnx_sha256: String,
}

/// Linear heads over the pooled hidden state (see [`crate::model::heads`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadWeights {
    /// `[signals][2 * n_embd]`.
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

/// Platt scaling of one head: `p = sigmoid(a · logit(raw) + b)`, fitted on the validation
/// split after the heads (see `crate::train::calibrate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Platt {
    pub signal: String,
    pub a: f64,
    pub b: f64,
}

/// Raw scores are kept this far from 0 and 1 before taking their logit, so that a saturated
/// head still maps to a finite calibrated score.
const RAW_MARGIN: f64 = 1e-7;

impl Platt {
    /// The calibration that changes nothing.
    pub fn identity(signal: &str) -> Platt {
        Platt { signal: signal.into(), a: 1.0, b: 0.0 }
    }

    /// The calibrated probability of a raw head output.
    pub fn apply(&self, raw: f32) -> f32 {
        (1.0 / (1.0 + (-(self.a * Platt::logit(raw) + self.b)).exp())) as f32
    }

    /// The logit of a raw head output, finite even for a saturated head.
    pub fn logit(raw: f32) -> f64 {
        let p = f64::from(raw).clamp(RAW_MARGIN, 1.0 - RAW_MARGIN);
        (p / (1.0 - p)).ln()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backbone {
    pub architecture: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub parameters: usize,
}

/// How the model was made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// The command that produced this model.
    pub command: String,
    pub data: Vec<DataSet>,
    /// Free-form facts about the run (steps, tokens, losses, seconds).
    #[serde(default)]
    pub facts: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSet {
    pub name: String,
    pub source: String,
    pub rows: usize,
    pub terms: String,
}

/// The figures of one signal on one data set's test split, for the model and for baselines
/// fitted on the same training examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub signal: String,
    pub dataset: String,
    pub split: String,
    pub examples: usize,
    pub positives: usize,
    /// AUC of the model's scores as served (NaN, written `null`, without both classes).
    #[serde(deserialize_with = "nan_when_null")]
    pub auc: f64,
    /// The logistic-regression baseline and its AUC.
    pub baseline: String,
    #[serde(deserialize_with = "nan_when_null")]
    pub baseline_auc: f64,
    /// The model's scores as served, after calibration; absent in older cards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Figures>,
    /// The model's raw head outputs, before calibration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncalibrated: Option<Figures>,
    /// Every baseline, the one above included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<BaselineFigures>,
}

/// What one set of scores achieves against the labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Area under the ROC curve; `None` without both classes.
    pub auc: Option<f64>,
    /// Share of examples on the right side of 0.5.
    pub accuracy: f64,
    /// Mean negative log-likelihood.
    pub log_loss: f64,
    /// Expected calibration error: 10 equal-width score bins, |mean score − positive rate|
    /// weighted by the share of examples in the bin.
    pub ece: f64,
}

/// A baseline's name and figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineFigures {
    pub name: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Reads a figure that was written as `null` because it was NaN.
fn nan_when_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// An empty calibration, or one finite Platt scaling per signal, in the signals' order.
fn check_calibration(card: &ModelCard) -> Result<(), String> {
    if card.calibration.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = card.signals.iter().map(|s| s.name.as_str()).collect();
    let calibrated: Vec<&str> = card.calibration.iter().map(|c| c.signal.as_str()).collect();
    if names != calibrated {
        return Err(format!("calibration covers {calibrated:?}, the signals are {names:?}"));
    }
    match card.calibration.iter().find(|c| !c.a.is_finite() || !c.b.is_finite()) {
        Some(bad) => Err(format!("calibration of {} is not finite", bad.signal)),
        None => Ok(()),
    }
}

/// The card could not be read or does not fit this build.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("cannot read model card {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model card {path} is not valid")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("model card {path}: {message}")]
    Unsupported { path: std::path::PathBuf, message: String },
}

impl ModelCard {
    pub fn load(path: &Path) -> Result<ModelCard, CardError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CardError::Read { path: path.into(), source })?;
        let card: ModelCard = serde_json::from_str(&text)
            .map_err(|source| CardError::Parse { path: path.into(), source })?;
        let unsupported = |message: String| CardError::Unsupported { path: path.into(), message };
        if !READABLE_VERSIONS.contains(&card.card_version) {
            return Err(unsupported(format!(
                "card_version {} (this build reads {READABLE_VERSIONS:?})",
                card.card_version
            )));
        }
        if card.card_version == 1 && !card.calibration.is_empty() {
            return Err(unsupported("a version 1 card cannot carry a calibration".into()));
        }
        if card.render_version != crate::render::RENDER_VERSION {
            return Err(unsupported(format!(
                "trained on render version {}, this build renders version {}",
                card.render_version,
                crate::render::RENDER_VERSION
            )));
        }
        if let Some(heads) = &card.heads {
            let width = 2 * card.backbone.n_embd;
            if heads.weight.len() != card.signals.len()
                || heads.bias.len() != card.signals.len()
                || heads.weight.iter().any(|row| row.len() != width)
            {
                return Err(unsupported(format!(
                    "heads must be {} x {width} with {} biases",
                    card.signals.len(),
                    card.signals.len()
                )));
            }
        }
        if card.prefix_graph.is_some() && card.heads.is_none() {
            return Err(unsupported("a prefix graph needs the card's head weights".into()));
        }
        check_calibration(&card).map_err(unsupported)?;
        Ok(card)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(path, text)
    }

    /// Index of a head signal by name.
    pub fn signal_index(&self, name: &str) -> Option<usize> {
        self.signals.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An evaluation row as cards wrote it before the calibrated figures existed still reads;
    /// an AUC that was NaN (written `null`) reads back as NaN.
    #[test]
    fn older_evaluation_rows_read() {
        let old = r#"{"signal": "sentiment", "dataset": "reviews-en", "split": "test",
            "examples": 10, "positives": 4, "auc": 0.91, "baseline": "bag",
            "baseline_auc": null}"#;
        let row: Evaluation = serde_json::from_str(old).unwrap();
        assert_eq!(row.auc, 0.91);
        assert!(row.baseline_auc.is_nan());
        assert!(row.model.is_none() && row.uncalibrated.is_none() && row.baselines.is_empty());

        let text = serde_json::to_string(&row).unwrap();
        assert!(!text.contains("uncalibrated"), "{text}");
        let back: Evaluation = serde_json::from_str(&text).unwrap();
        assert!(back.baseline_auc.is_nan() && back.auc == 0.91);
    }

    /// Writes the shipped card with `card_version` and `calibration` replaced, and loads it.
    fn load_variant(version: u32, calibrated: bool) -> Result<ModelCard, CardError> {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/model.json");
        let mut card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
        card["card_version"] = version.into();
        if !calibrated {
            card.as_object_mut().unwrap().remove("calibration");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        std::fs::write(&path, card.to_string()).unwrap();
        ModelCard::load(&path)
    }

    /// Version 1 cards (no calibration) still load; a calibration needs version 2, so that a
    /// build reading only version 1 refuses the card instead of serving raw scores.
    #[test]
    fn card_versions_guard_the_calibration() {
        let current = load_variant(CARD_VERSION, true).unwrap();
        assert_eq!(current.calibration.len(), current.signals.len());
        assert!(load_variant(1, false).unwrap().calibration.is_empty());
        let err = load_variant(1, true).unwrap_err().to_string();
        assert!(err.contains("version 1 card cannot carry a calibration"), "{err}");
        let err = load_variant(CARD_VERSION + 1, true).unwrap_err().to_string();
        assert!(err.contains("card_version 3"), "{err}");
    }

    #[test]
    fn platt_scaling_maps_through_the_logit() {
        let platt = Platt { signal: "s".into(), a: 2.0, b: -1.0 };
        // logit(0.5) = 0, so the score is sigmoid(-1).
        assert!((platt.apply(0.5) - 0.268_941_4).abs() < 1e-6);
        assert_eq!(Platt::identity("s").apply(0.3), 0.3);
        let saturated = platt.apply(1.0);
        assert!(saturated.is_finite() && saturated > 0.99, "{saturated}");
    }
}
