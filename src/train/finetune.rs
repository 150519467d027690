//! Fine-tuning of the backbone on the signal labels.
//!
//! After the language model, the backbone and one logistic head per signal train together on
//! the labelled training examples of every data set: the loss is the binary cross-entropy of
//! each labelled signal, averaged over the labels present (a window labelled for two signals
//! counts twice). The heads used here are thrown away afterwards: the shipped heads are
//! fitted on the fine-tuned backbone's frozen features with validation-chosen regularisation,
//! like the heads of a model that was never fine-tuned.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::scorer::pad_batch;
use crate::train::build::{BuildError, BuildOptions, DataSet};
use crate::train::catalog::OUTPUTS;
use crate::train::checkpoint::{self, Phase, Store};
use crate::train::dataset::Split;
use crate::train::fit::{bar, token_batches};
use crate::train::gpt2::{self, Gpt2};

#[derive(Clone, Debug, Default)]
pub struct FineTuneFacts {
    pub steps: usize,
    pub first_loss: f32,
    pub final_loss: f32,
    pub seconds: f64,
}

fn err(e: impl std::fmt::Display) -> BuildError {
    BuildError::Step { step: "fine-tuning", message: e.to_string() }
}

/// A labelled training sequence: tokens and one optional label per head.
struct Row<'a> {
    tokens: &'a [u32],
    labels: &'a [Option<bool>],
}

/// Trains `model`'s weights in place (its variables are shared with every clone).
///
/// With `options.checkpoint_dir` the result is saved as a checkpoint; with `options.resume`
/// a finished fine-tuning is restored from it instead of run again (an interrupted one
/// starts over: it is short next to the language model).
pub fn fine_tune(
    model: &Gpt2,
    sets: &[DataSet],
    options: &BuildOptions,
) -> Result<FineTuneFacts, BuildError> {
    let store = Store::open(options, model.config())?;
    if let Some(saved) = store.as_ref().filter(|_| options.resume).map(Store::fine_tuned) {
        if let Some(saved) = saved? {
            saved.restore_weights(model).map_err(err)?;
            tracing::info!(checkpoint = %saved.dir.display(), "fine-tuning restored");
            return Ok(facts_from(&saved.state.facts));
        }
    }
    let facts = train(model, sets, options)?;
    if let Some(store) = &store {
        let json = serde_json::json!({
            "steps": facts.steps,
            "first_loss": facts.first_loss,
            "final_loss": facts.final_loss,
            "seconds": facts.seconds,
        });
        store.save(Phase::FineTuned, facts.steps, json, model, None)?;
    }
    Ok(facts)
}

fn facts_from(value: &serde_json::Value) -> FineTuneFacts {
    let number = |key: &str| value.get(key).map_or(f32::NAN, checkpoint::f32_or_nan);
    FineTuneFacts {
        steps: value.get("steps").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
        first_loss: number("first_loss"),
        final_loss: number("final_loss"),
        seconds: value.get("seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
    }
}

fn train(
    model: &Gpt2,
    sets: &[DataSet],
    options: &BuildOptions,
) -> Result<FineTuneFacts, BuildError> {
    let mut facts = FineTuneFacts { steps: options.finetune_steps, ..Default::default() };
    if options.finetune_steps == 0 {
        return Ok(facts);
    }
    let rows: Vec<Row<'_>> = sets
        .iter()
        .flat_map(|set| {
            set.split(Split::Train)
                .map(move |i| Row { tokens: &set.tokens[i], labels: &set.examples[i].labels })
        })
        .filter(|r| !r.tokens.is_empty())
        .collect();
    let width = 2 * model.config().n_embd;
    let device = Device::Cpu;
    let weight = Var::zeros((OUTPUTS, width), DType::F32, &device).map_err(err)?;
    let bias = Var::zeros(OUTPUTS, DType::F32, &device).map_err(err)?;
    let mut vars = model.varmap().all_vars();
    vars.extend([weight.clone(), bias.clone()]);
    let params = ParamsAdamW { lr: options.finetune_lr, weight_decay: 0.01, ..Default::default() };
    let mut optimizer = AdamW::new(vars, params).map_err(err)?;

    let lengths: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
    let mut batches = token_batches(&lengths, options.lm_batch_tokens);
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed ^ 0x5eed);
    let progress = bar(options.finetune_steps as u64, "fine-tuning");
    let started = Instant::now();
    let mut smoothed: Option<f32> = None;
    for step in 0..options.finetune_steps {
        if step % batches.len().max(1) == 0 {
            batches.shuffle(&mut rng);
        }
        let batch: Vec<&Row<'_>> =
            batches[step % batches.len()].iter().map(|&i| &rows[i]).collect();
        let loss = batch_loss(model, &batch, &weight, &bias)?;
        let value = loss.to_scalar::<f32>().map_err(err)?;
        if !value.is_finite() {
            return Err(err(format!("loss is not finite at step {step}")));
        }
        let lr = options.finetune_lr * (1.0 - step as f64 / options.finetune_steps as f64);
        optimizer.set_learning_rate(lr.max(options.finetune_lr * 0.05));
        optimizer.backward_step(&loss).map_err(err)?;
        if step == 0 {
            facts.first_loss = value;
        }
        let ema = smoothed.map_or(value, |s| 0.95 * s + 0.05 * value);
        smoothed = Some(ema);
        progress.set_message(format!("loss {ema:.4}"));
        progress.inc(1);
        if (step + 1) % (options.finetune_steps / 10).max(1) == 0 {
            tracing::info!(step = step + 1, loss = ema, "fine-tuning");
        }
    }
    progress.finish();
    facts.final_loss = smoothed.unwrap_or(f32::NAN);
    facts.seconds = started.elapsed().as_secs_f64();
    Ok(facts)
}

/// Mean binary cross-entropy over the labels present in the batch, in the stable form
/// `max(x, 0) - x·y + ln(1 + e^{-|x|})`.
fn batch_loss(
    model: &Gpt2,
    batch: &[&Row<'_>],
    weight: &Var,
    bias: &Var,
) -> Result<Tensor, BuildError> {
    let tokens: Vec<&[u32]> = batch.iter().map(|r| r.tokens).collect();
    let (seq, ids, mask, _) = pad_batch(&tokens);
    let shape = (batch.len(), seq);
    let device = Device::Cpu;
    let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
    let mask: Vec<u32> = mask.into_iter().map(|v| v as u32).collect();
    let ids = Tensor::from_vec(ids, shape, &device).map_err(err)?;
    let mask = Tensor::from_vec(mask, shape, &device).map_err(err)?;
    let hidden = model.forward_hidden(&ids, &mask).map_err(err)?;
    let pooled = gpt2::pool(&hidden, &mask).map_err(err)?;
    let logits = pooled
        .matmul(&weight.as_tensor().t().map_err(err)?)
        .and_then(|l| l.broadcast_add(bias.as_tensor()))
        .map_err(err)?;

    let mut targets = Vec::with_capacity(batch.len() * OUTPUTS);
    let mut present = Vec::with_capacity(batch.len() * OUTPUTS);
    for row in batch {
        for label in row.labels.iter().take(OUTPUTS) {
            targets.push(label.map_or(0.0f32, f32::from));
            present.push(if label.is_some() { 1.0f32 } else { 0.0 });
        }
    }
    let count: f32 = present.iter().sum::<f32>().max(1.0);
    let y = Tensor::from_vec(targets, (batch.len(), OUTPUTS), &device).map_err(err)?;
    let m = Tensor::from_vec(present, (batch.len(), OUTPUTS), &device).map_err(err)?;
    let stable = (|| {
        let softplus = ((logits.abs()?.neg()?.exp()? + 1.0)?).log()?;
        let per = ((logits.relu()? - (&logits * &y)?)? + softplus)?;
        (per * m)?.sum_all()? / f64::from(count)
    })();
    stable.map_err(err)
}
