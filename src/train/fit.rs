//! The learning steps of a build: the language model, the heads, the baselines, and the
//! evaluation of the exported file.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::card::{Evaluation, HeadWeights};
use crate::model::scorer::{pad_batch, Scorer};
use crate::train::build::{BuildError, BuildOptions, DataSet};
use crate::train::catalog;
use crate::train::dataset::Split;
use crate::train::gpt2::{Gpt2, Gpt2Config, LmTrainConfig, LmTrainer};
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

/// Trains a GPT-2 from random weights on the training windows of every data set.
pub fn train_language_model(
    sets: &[DataSet],
    vocab_size: usize,
    options: &BuildOptions,
) -> Result<(Gpt2, LmFacts), BuildError> {
    let config = Gpt2Config {
        vocab_size,
        n_positions: options.max_tokens,
        n_embd: options.n_embd,
        n_layer: options.n_layer,
        n_head: options.n_head,
        layer_norm_epsilon: 1e-5,
    };
    let model = Gpt2::new_random(config, &Device::Cpu, options.seed).map_err(lm_err)?;
    let schedule = LmTrainConfig {
        lr: options.lr,
        total_steps: options.lm_steps,
        warmup_steps: (options.lm_steps / 20).max(1),
        ..LmTrainConfig::default()
    };
    let mut trainer = LmTrainer::new(model, schedule).map_err(lm_err)?;

    let corpus = sequences(sets, Split::Train);
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let lengths: Vec<usize> = corpus.iter().map(|s| s.len()).collect();
    let mut batches = token_batches(&lengths, options.lm_batch_tokens);
    let progress = bar(options.lm_steps as u64, "language model");
    let started = Instant::now();
    let mut facts = LmFacts::default();
    let mut smoothed = None;
    for step in 0..options.lm_steps {
        if step % batches.len().max(1) == 0 {
            batches.shuffle(&mut rng);
        }
        let rows: Vec<&[u32]> = batches[step % batches.len()].iter().map(|&i| corpus[i]).collect();
        facts.tokens += rows.iter().map(|r| r.len()).sum::<usize>();
        let (ids, mask) = batch_tensors(&rows)?;
        let loss = trainer.step(&ids, &mask).map_err(lm_err)?;
        if step == 0 {
            facts.first_loss = loss;
        }
        let ema = smoothed.map_or(loss, |s: f32| 0.95 * s + 0.05 * loss);
        smoothed = Some(ema);
        let rate = facts.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
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
    }
    progress.finish();
    facts.steps = options.lm_steps;
    facts.final_loss = smoothed.unwrap_or(f32::NAN);
    facts.seconds = started.elapsed().as_secs_f64();
    let model = trainer.into_model();
    facts.validation_loss = validation_loss(&model, sets, options.lm_batch_tokens)?;
    Ok((model, facts))
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
fn labelled(sets: &[DataSet], signal: usize, split: Split) -> Vec<(usize, usize, bool)> {
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
        let (auc, l2, model) = best.ok_or_else(|| BuildError::Step {
            step: "heads",
            message: format!("{}: the training split lacks one of the classes", spec.name),
        })?;
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

/// Hashed buckets of the bag-of-tokens baseline.
const BAG_DIMS: usize = 4096;

fn bag(tokens: &[u32]) -> Vec<(u32, f32)> {
    let mut counts: BTreeMap<u32, f32> = BTreeMap::new();
    for &t in tokens {
        *counts.entry(t.wrapping_mul(2_654_435_761) % BAG_DIMS as u32).or_default() += 1.0;
    }
    counts.into_iter().map(|(j, c)| (j, c.ln_1p())).collect()
}

/// Scores keyed by `(data set, example)` index, like the rows of [`labelled`].
type KeyedScores = Vec<((usize, usize), f32)>;

/// Scores of a baseline for every test example of `signal`, keyed like [`labelled`]; the
/// baseline is a logistic regression on window counts, or on a bag of tokens for sentiment.
fn baseline(sets: &[DataSet], signal: usize) -> (String, KeyedScores) {
    let train = labelled(sets, signal, Split::Train);
    let test = labelled(sets, signal, Split::Test);
    let y: Vec<bool> = train.iter().map(|r| r.2).collect();
    if signal == catalog::SENTIMENT {
        let rows: Vec<Vec<(u32, f32)>> =
            train.iter().map(|&(s, i, _)| bag(&sets[s].tokens[i])).collect();
        let fitted = linear::fit_sparse(&rows, BAG_DIMS, &y, 1.0, 5);
        let score = |s: usize, i: usize| match &fitted {
            None => 0.5,
            Some((w, b)) => {
                let logit: f32 =
                    bag(&sets[s].tokens[i]).iter().map(|&(j, v)| w[j as usize] * v).sum();
                crate::model::heads::sigmoid(logit + b)
            }
        };
        let scores = test.iter().map(|&(s, i, _)| ((s, i), score(s, i))).collect();
        return ("logistic regression on a hashed bag of tokens".into(), scores);
    }
    let x: Vec<Vec<f32>> =
        train.iter().map(|&(s, i, _)| sets[s].examples[i].counts.clone()).collect();
    let fitted = linear::fit(&x, &y, 1.0);
    let scores = test
        .iter()
        .map(|&(s, i, _)| {
            let value = fitted.as_ref().map_or(0.5, |m| m.predict(&sets[s].examples[i].counts));
            ((s, i), value)
        })
        .collect();
    ("logistic regression on window counts".into(), scores)
}

/// AUC of the shipped scorer and of the baseline on every test split, per signal and set.
pub fn evaluate(
    sets: &[DataSet],
    scorer: &mut dyn Scorer,
    batch: usize,
) -> Result<Vec<Evaluation>, BuildError> {
    let names = catalog::head_signals();
    let mut rows = Vec::new();
    for (signal, spec) in names.iter().enumerate() {
        let (baseline_name, baseline_scores) = baseline(sets, signal);
        let test = labelled(sets, signal, Split::Test);
        let model_scores = score_rows(sets, &test, scorer, batch, signal)?;
        for (s, set) in sets.iter().enumerate() {
            let picked: Vec<usize> = (0..test.len()).filter(|&k| test[k].0 == s).collect();
            if picked.is_empty() {
                continue;
            }
            let labels: Vec<bool> = picked.iter().map(|&k| test[k].2).collect();
            let model: Vec<f32> = picked.iter().map(|&k| model_scores[k]).collect();
            let base: Vec<f32> = picked.iter().map(|&k| baseline_scores[k].1).collect();
            rows.push(Evaluation {
                signal: spec.name.clone(),
                dataset: set.name.into(),
                split: "test".into(),
                examples: labels.len(),
                positives: labels.iter().filter(|&&l| l).count(),
                auc: round4(linear::auc(&model, &labels).unwrap_or(f64::NAN)),
                baseline: baseline_name.clone(),
                baseline_auc: round4(linear::auc(&base, &labels).unwrap_or(f64::NAN)),
            });
        }
    }
    Ok(rows)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn score_rows(
    sets: &[DataSet],
    rows: &[(usize, usize, bool)],
    scorer: &mut dyn Scorer,
    batch: usize,
    signal: usize,
) -> Result<Vec<f32>, BuildError> {
    let outputs = scorer.outputs();
    let mut scores = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch) {
        let inputs: Vec<&[u32]> =
            chunk.iter().map(|&(s, i, _)| sets[s].tokens[i].as_slice()).collect();
        let flat = scorer
            .score(&inputs)
            .map_err(|e| BuildError::Step { step: "evaluation", message: e.to_string() })?;
        scores.extend(flat.chunks_exact(outputs).map(|row| row[signal]));
    }
    Ok(scores)
}
