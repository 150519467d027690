//! The learning steps of a build: the language model and the heads. The evaluation of the
//! exported file against baselines is in [`crate::train::evaluate`].

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::card::{HeadWeights, SignalSpec, Status};
use crate::model::scorer::pad_batch;
use crate::train::build::{BuildError, BuildOptions, DataSet};
use crate::train::catalog;
use crate::train::checkpoint::{self, Phase, Store};
use crate::train::dataset::Split;
use crate::train::gpt2::{Gpt2, LmTrainConfig, LmTrainer};
use crate::train::linear;

/// How the language model did.
#[derive(Clone, Debug, Default)]
pub struct LmFacts {
    pub steps: usize,
    pub tokens: usize,
    pub first_loss: f32,
    pub final_loss: f32,
    pub validation_loss: f32,
    pub seconds: f64,
}

fn lm_err(err: impl std::fmt::Display) -> BuildError {
    BuildError::Step { step: "language model", message: err.to_string() }
}

fn batch_tensors(rows: &[&[u32]]) -> Result<(Tensor, Tensor), BuildError> {
    let (seq, ids, mask, _) = pad_batch(rows);
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    let mask: Vec<u32> = mask.into_iter().map(|v| v as u32).collect();
    let shape = (rows.len(), seq);
    let ids = Tensor::from_vec(ids, shape, &Device::Cpu).map_err(lm_err)?;
    let mask = Tensor::from_vec(mask, shape, &Device::Cpu).map_err(lm_err)?;
    Ok((ids, mask))
}

/// Sequences of a split over every data set, at least two tokens long.
fn sequences(sets: &[DataSet], split: Split) -> Vec<&[u32]> {
    sets.iter()
        .flat_map(|set| set.split(split).map(move |i| set.tokens[i].as_slice()))
        .filter(|s| s.len() >= 2)
        .collect()
}

/// Trains `model` (random or pretrained weights) on the next-token objective over the
/// training windows of every data set, for `options.lm_steps` steps (0: left as it is).
///
/// With `options.checkpoint_dir` it saves a checkpoint every `options.checkpoint_every` steps
/// and at the end; with `options.resume` it continues from the newest one, replaying the
/// batch order and restoring the AdamW moments, so the result equals an uninterrupted run.
pub fn train_language_model(
    sets: &[DataSet],
    model: Gpt2,
    options: &BuildOptions,
) -> Result<(Gpt2, LmFacts), BuildError> {
    let store = Store::open(options, model.config())?;
    let resumed = match &store {
        Some(store) if options.resume => store.newest_language_model()?,
        _ => None,
    };
    if let (Some(store), None, true) = (&store, &resumed, options.resume) {
        tracing::warn!(checkpoint_dir = %store.dir().display(),
            "--resume: no language-model checkpoint there; training from the start");
    }
    if let Some(saved) = &resumed {
        saved.restore_weights(&model).map_err(lm_err)?;
        tracing::info!(checkpoint = %saved.dir.display(), step = saved.state.step,
            "language model resumed from a checkpoint");
        if saved.state.phase == Phase::LanguageModelDone {
            return Ok((model, lm_facts_from(&saved.state.facts)));
        }
    }
    let schedule = LmTrainConfig {
        lr: options.lr,
        total_steps: options.lm_steps,
        warmup_steps: (options.lm_steps / 20).max(1),
        ..LmTrainConfig::default()
    };
    let mut trainer = LmTrainer::new(model, schedule).map_err(lm_err)?;
    let mut run = LmRun::default();
    if let Some(saved) = &resumed {
        trainer.restore(&saved.optimizer()?, saved.state.step).map_err(lm_err)?;
        run = LmRun::resumed(saved.state.step, &saved.state.facts);
    }
    lm_steps(sets, &mut trainer, &mut run, store.as_ref(), options)?;

    let mut facts = run.facts;
    facts.steps = options.lm_steps;
    facts.final_loss = run.smoothed.unwrap_or(f32::NAN);
    let model = trainer.into_model();
    // A run of no steps keeps the starting model and skips the validation loss, which costs
    // minutes for a full-size checkpoint on a CPU.
    facts.validation_loss = if options.lm_steps == 0 {
        f32::NAN
    } else {
        validation_loss(&model, sets, options.lm_batch_tokens)?
    };
    if let Some(store) = &store {
        let facts_json = lm_facts_json(&facts, run.smoothed);
        store.save(Phase::LanguageModelDone, options.lm_steps, facts_json, &model, None)?;
    }
    Ok((model, facts))
}

/// The progress of a language-model run: the facts so far and the running loss.
#[derive(Default)]
struct LmRun {
    /// Steps already taken (by an earlier run, when resumed).
    start: usize,
    facts: LmFacts,
    smoothed: Option<f32>,
}

impl LmRun {
    fn resumed(step: usize, facts: &serde_json::Value) -> LmRun {
        let facts_read = lm_facts_from(facts);
        let smoothed = facts.get("smoothed_loss").map(checkpoint::f32_or_nan);
        LmRun { start: step, facts: facts_read, smoothed: smoothed.filter(|s| s.is_finite()) }
    }
}

fn lm_facts_json(facts: &LmFacts, smoothed: Option<f32>) -> serde_json::Value {
    serde_json::json!({
        "tokens": facts.tokens,
        "first_loss": facts.first_loss,
        "final_loss": facts.final_loss,
        "validation_loss": facts.validation_loss,
        "seconds": facts.seconds,
        "smoothed_loss": smoothed,
        "steps": facts.steps,
    })
}

fn lm_facts_from(value: &serde_json::Value) -> LmFacts {
    let number = |key: &str| value.get(key).map_or(f32::NAN, checkpoint::f32_or_nan);
    let count = |key: &str| value.get(key).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    LmFacts {
        steps: count("steps"),
        tokens: count("tokens"),
        first_loss: number("first_loss"),
        final_loss: number("final_loss"),
        validation_loss: number("validation_loss"),
        seconds: value.get("seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
    }
}

/// The optimiser steps from `run.start` to `options.lm_steps`, with checkpoints.
fn lm_steps(
    sets: &[DataSet],
    trainer: &mut LmTrainer,
    run: &mut LmRun,
    store: Option<&Store>,
    options: &BuildOptions,
) -> Result<(), BuildError> {
    let corpus = sequences(sets, Split::Train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let lengths: Vec<usize> = corpus.iter().map(|s| s.len()).collect();
    let mut batches = token_batches(&lengths, options.lm_batch_tokens);
    if batches.is_empty() && options.lm_steps > run.start {
        return Err(lm_err("no training sequence of two tokens or more"));
    }
    // The batch order is a function of the seed and the step: replay the shuffles of the
    // steps already taken.
    for step in 0..run.start {
        if step % batches.len().max(1) == 0 {
            batches.shuffle(&mut rng);
        }
    }
    let progress = bar(options.lm_steps as u64, "language model");
    progress.set_position(run.start.min(options.lm_steps) as u64);
    progress.reset_eta();
    let started = Instant::now();
    let (earlier_seconds, earlier_tokens) = (run.facts.seconds, run.facts.tokens);
    let every = options.checkpoint_every.max(1);
    for step in run.start..options.lm_steps {
        if step % batches.len() == 0 {
            batches.shuffle(&mut rng);
        }
        let rows: Vec<&[u32]> = batches[step % batches.len()].iter().map(|&i| corpus[i]).collect();
        run.facts.tokens += rows.iter().map(|r| r.len()).sum::<usize>();
        let (ids, mask) = batch_tensors(&rows)?;
        let loss = trainer.step(&ids, &mask).map_err(lm_err)?;
        if step == 0 {
            run.facts.first_loss = loss;
        }
        let ema = run.smoothed.map_or(loss, |s: f32| 0.95 * s + 0.05 * loss);
        run.smoothed = Some(ema);
        let elapsed = started.elapsed().as_secs_f64();
        run.facts.seconds = earlier_seconds + elapsed;
        let rate = (run.facts.tokens - earlier_tokens) as f64 / elapsed.max(1e-9);
        progress.set_message(format!("loss {ema:.3}, {rate:.0} tokens/s"));
        progress.inc(1);
        if (step + 1) % (options.lm_steps / 10).max(1) == 0 {
            tracing::info!(
                step = step + 1,
                loss = ema,
                tokens_per_second = rate.round(),
                "language model training"
            );
        }
        if let Some(store) =
            store.filter(|_| (step + 1) % every == 0 && step + 1 < options.lm_steps)
        {
            let (moments, steps) = trainer.optimizer_state();
            let facts = lm_facts_json(&run.facts, run.smoothed);
            store.save(Phase::LanguageModel, steps, facts, trainer.model(), Some(&moments))?;
        }
    }
    progress.finish();
    Ok(())
}

/// Batches of sequences of similar length, each within `budget` padded tokens, so that a step
/// costs about the same whatever it holds and little goes to padding.
/// `lengths[i]` is the length of sequence `i`; batches hold indices.
pub fn token_batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for index in order {
        let longest = lengths[index];
        if !current.is_empty() && (current.len() + 1) * longest > budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(index);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Mean LM loss over up to 50 validation batches.
fn validation_loss(model: &Gpt2, sets: &[DataSet], budget: usize) -> Result<f32, BuildError> {
    let held_out = sequences(sets, Split::Validation);
    let lengths: Vec<usize> = held_out.iter().map(|s| s.len()).collect();
    let batches = token_batches(&lengths, budget);
    let step = (batches.len() / 50).max(1);
    let mut total = 0.0;
    let mut count = 0;
    for batch in batches.iter().step_by(step).take(50) {
        let rows: Vec<&[u32]> = batch.iter().map(|&i| held_out[i]).collect();
        let (ids, mask) = batch_tensors(&rows)?;
        let loss = model.lm_loss(&ids, &mask).map_err(lm_err)?;
        total += loss.to_scalar::<f32>().map_err(lm_err)?;
        count += 1;
    }
    Ok(if count == 0 { f32::NAN } else { total / count as f32 })
}

pub fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_owned());
    bar
}

/// Rows of one signal in one split: `(set index, example index, label)`.
pub(crate) fn labelled(sets: &[DataSet], signal: usize, split: Split) -> Vec<(usize, usize, bool)> {
    let mut rows = Vec::new();
    for (s, set) in sets.iter().enumerate() {
        for i in set.split(split) {
            if let Some(label) = set.examples[i].labels[signal] {
                rows.push((s, i, label));
            }
        }
    }
    rows
}

/// L2 strengths tried for each head; the best validation AUC wins.
const L2_GRID: [f64; 4] = [0.3, 3.0, 30.0, 300.0];

/// Marks `experimental` every signal whose head [`fit_heads`] had to make constant.
pub fn mark_constant_heads(signals: &mut [SignalSpec], facts: &BTreeMap<String, f64>) {
    for spec in signals {
        if facts.contains_key(&format!("{}_constant_head", spec.name)) {
            spec.status = Status::Experimental;
        }
    }
}

/// One logistic head per signal over pooled features (`features[set][example]`).
pub fn fit_heads(
    sets: &[DataSet],
    features: &[Vec<Vec<f32>>],
) -> Result<(HeadWeights, BTreeMap<String, f64>), BuildError> {
    let width = features.iter().flatten().next().map_or(0, Vec::len);
    let names = catalog::head_signals();
    let mut heads = HeadWeights { weight: Vec::new(), bias: Vec::new() };
    let mut chosen = BTreeMap::new();
    for (signal, spec) in names.iter().enumerate() {
        let train = labelled(sets, signal, Split::Train);
        let validation = labelled(sets, signal, Split::Validation);
        let x: Vec<Vec<f32>> = train.iter().map(|&(s, i, _)| features[s][i].clone()).collect();
        let y: Vec<bool> = train.iter().map(|r| r.2).collect();
        let vx: Vec<&Vec<f32>> = validation.iter().map(|&(s, i, _)| &features[s][i]).collect();
        let vy: Vec<bool> = validation.iter().map(|r| r.2).collect();
        let mut best: Option<(f64, f64, linear::Logistic)> = None;
        for l2 in L2_GRID {
            let Some(model) = linear::fit(&x, &y, l2) else { continue };
            let scores: Vec<f32> = vx.iter().map(|r| model.predict(r)).collect();
            let auc = linear::auc(&scores, &vy).unwrap_or(0.5);
            if best.as_ref().is_none_or(|b| auc > b.0) {
                best = Some((auc, l2, model));
            }
        }
        let Some((auc, l2, model)) = best else {
            // Small example caps can leave a split without one class (carts nearly always end
            // unbought in a short slice). The head then says the training rate for every
            // window, and the evaluation shows it as no better than chance.
            let positives = y.iter().filter(|&&l| l).count();
            let rate = ((positives as f64 + 0.5) / (y.len() as f64 + 1.0)) as f32;
            tracing::warn!(signal = %spec.name, examples = y.len(), positives,
                "the training split lacks one of the classes: constant head");
            chosen.insert(format!("{}_constant_head", spec.name), 1.0);
            heads.weight.push(vec![0.0; width]);
            heads.bias.push((rate / (1.0 - rate)).ln());
            continue;
        };
        tracing::info!(signal = %spec.name, l2, validation_auc = auc, examples = x.len(),
            "head fitted");
        chosen.insert(format!("{}_l2", spec.name), l2);
        chosen.insert(format!("{}_validation_auc", spec.name), auc);
        heads.weight.push(model.weight);
        heads.bias.push(model.bias);
        debug_assert_eq!(heads.weight.last().map(Vec::len), Some(width));
    }
    Ok((heads, chosen))
}
