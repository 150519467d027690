//! `mindstream-train heads`: signal heads on a frozen ONNX GPT-2, the fast CPU path.
//!
//! It receives any GPT-2 graph with a `last_hidden_state` output (the graphs this project
//! exports, or a plain Hugging Face export with its `position_ids` input), the tokenizer that
//! goes with it and the public data sets. It builds the same point-in-time examples as
//! `build`, computes the pooled features with ONNX Runtime, fits one logistic head per signal,
//! and hands on a model folder: the backbone copied as `model.onnx`, `tokenizer.json`, a
//! card whose `heads` (and Platt calibration, fitted on the validation split as `build` does)
//! the processor applies to the graph's hidden states, and the evaluation report in
//! `evaluation/`. No weight of the backbone changes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::model::card::{Backbone, ModelCard, Precision, Training, CARD_VERSION};
use crate::train::build::{
    self, seconds, step_err, with_causes, BuildError, BuildOptions, DataSet,
};
use crate::train::features;
use crate::train::gpt2::Gpt2Config;
use crate::train::{catalog, fit, pretrained};

/// Settings of `mindstream-train heads`.
#[derive(Clone, Debug)]
pub struct HeadsOptions {
    /// The backbone graph.
    pub backbone: PathBuf,
    /// `tokenizer.json`, or a folder with it or with `vocab.json` + `merges.txt`.
    pub tokenizer: PathBuf,
    /// The data sets, the output folder, the example caps, `max_tokens`, seed and threads
    /// (the model sizes and training steps are not used).
    pub build: BuildOptions,
}

/// Writes `model.onnx`, `tokenizer.json` and `model.json` to `options.build.out`.
pub fn heads(options: &HeadsOptions, command: &str) -> Result<ModelCard, BuildError> {
    let started = Instant::now();
    let out = &options.build.out;
    std::fs::create_dir_all(out)
        .map_err(|source| BuildError::Write { path: out.clone(), source })?;
    let mut backbone = features::Backbone::open(&options.backbone, options.build.threads)
        .map_err(|e| step_err("backbone")(with_causes(&e)))?;
    if backbone.outputs().iter().any(|o| o == "scores") {
        return Err(step_err("backbone")(format!(
            "{} has a `scores` output, which the processor would serve instead of the card's \
             heads; give a graph whose only output is `last_hidden_state`",
            options.backbone.display()
        )));
    }
    let tokenizer = pretrained::tokenizer_at(&options.tokenizer)?;
    let config = sibling_config(&options.backbone)?;
    if let Some(config) = &config {
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(step_err("tokenizer")(format!(
                "{} has {} tokens but the backbone's config.json says vocab_size {}",
                options.tokenizer.display(),
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
    }
    let max_tokens = config
        .as_ref()
        .map_or(options.build.max_tokens, |c| options.build.max_tokens.min(c.n_positions));

    tracing::info!(data = %options.build.data.display(), "importing data sets");
    let mut sets = build::load_data_sets(&options.build)?;
    build::encode_sets(&mut sets, &tokenizer, max_tokens)?;
    let features = pooled_features(&mut backbone, &sets)?;
    let width = features.iter().flatten().next().map_or(0, Vec::len) / 2;
    let (head_weights, head_facts) = fit::fit_heads(&sets, &features)?;

    let onnx = out.join("model.onnx");
    if !same_file(&options.backbone, &onnx) {
        std::fs::copy(&options.backbone, &onnx)
            .map_err(|source| BuildError::Write { path: onnx.clone(), source })?;
    }
    let tokenizer_path = out.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tokenizer_path, false)
        .map_err(|e| step_err("tokenizer")(e.to_string()))?;

    let mut facts = serde_json::Map::new();
    facts.insert("backbone".into(), options.backbone.display().to_string().into());
    facts.insert("feature_seconds".into(), seconds(started).into());
    for (k, v) in &head_facts {
        facts.insert(k.clone(), ((v * 10_000.0).round() / 10_000.0).into());
    }
    let mut card = card(options, &sets, &onnx, width, max_tokens, config.as_ref(), command)?;
    fit::mark_constant_heads(&mut card.signals, &head_facts);
    card.heads = Some(head_weights);
    if let Some(training) = &mut card.training {
        training.facts.extend(facts);
    }
    // The report goes inside the model folder: this path writes nothing outside `out`.
    let report_dir = out.join("evaluation");
    let report = crate::train::evaluate::Destination { dir: &report_dir, command };
    build::finish(out, card, &sets, options.build.threads, report, started)
}

/// Pooled features of every example of every set, `features[set][example]`.
fn pooled_features(
    backbone: &mut features::Backbone,
    sets: &[DataSet],
) -> Result<Vec<Vec<Vec<f32>>>, BuildError> {
    let total: u64 = sets.iter().map(|s| s.tokens.len() as u64).sum();
    let progress = fit::bar(total, "features");
    let mut all = Vec::with_capacity(sets.len());
    for set in sets {
        let pooled = backbone
            .pooled(&set.tokens, 64, &progress)
            .map_err(|e| step_err("features")(with_causes(&e)))?;
        all.push(pooled);
    }
    progress.finish();
    Ok(all)
}

/// The backbone's Hugging Face `config.json` when one lies next to the graph (as in an
/// exported model folder); it gives the card the backbone's sizes and caps `max_tokens`.
/// Whether two paths name one existing file (copying a file onto itself empties it).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn sibling_config(backbone: &Path) -> Result<Option<Gpt2Config>, BuildError> {
    let path = backbone.with_file_name(pretrained::CONFIG_FILE);
    if !path.is_file() {
        tracing::info!(backbone = %backbone.display(),
            "no config.json next to the backbone: the card records its hidden width only");
        return Ok(None);
    }
    Gpt2Config::read_hf_config(&path)
        .map(Some)
        .map_err(|e| step_err("backbone config")(format!("{}: {e}", path.display())))
}

/// The card of a frozen-backbone model, before its heads and evaluation.
fn card(
    options: &HeadsOptions,
    sets: &[DataSet],
    onnx: &Path,
    width: usize,
    max_tokens: usize,
    config: Option<&Gpt2Config>,
    command: &str,
) -> Result<ModelCard, BuildError> {
    let sha = build::sha256_file(onnx)?;
    let spec = build::state_spec();
    let data = sets.iter().map(DataSet::card_entry).collect();
    let sizes = |f: fn(&Gpt2Config) -> usize| config.map_or(0, f);
    Ok(ModelCard {
        card_version: CARD_VERSION,
        model_version: format!("gpt2-frozen-{width}-{}", &sha[..12]),
        description: "A GPT-2 backbone used frozen, with logistic signal heads fitted by \
            mindstream-train on its pooled hidden states (the heads live in this card)."
            .into(),
        onnx_file: "model.onnx".into(),
        onnx_sha256: sha,
        precision: Precision::Fp32,
        tokenizer_file: "tokenizer.json".into(),
        render_version: crate::render::RENDER_VERSION,
        max_tokens,
        window: spec.window,
        user_ttl_ms: spec.user_ttl_ms,
        signals: catalog::head_signals_for(&options.build.horizons),
        derived: catalog::derived_signals(),
        heads: None,
        prefix_graph: None,
        calibration: Vec::new(),
        backbone: Backbone {
            architecture: "gpt2".into(),
            vocab_size: sizes(|c| c.vocab_size),
            n_positions: sizes(|c| c.n_positions),
            n_embd: width,
            n_layer: sizes(|c| c.n_layer),
            n_head: sizes(|c| c.n_head),
            parameters: sizes(Gpt2Config::num_parameters),
        },
        training: Some(Training { command: command.into(), data, facts: serde_json::Map::new() }),
        evaluation: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
