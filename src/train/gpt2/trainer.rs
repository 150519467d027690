//! The causal language-model trainer: [`LmTrainConfig`] with its warm-up and [`LrDecay`]
//! schedule, and [`LmTrainer`], AdamW over a [`Gpt2`]'s variables with global-norm clipping,
//! whose state ([`LmTrainer::optimizer_state`]) can be saved and restored to resume training.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::sync::PoisonError;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adamw::{AdamParams, AdamW};
use super::model::param_specs;
use super::{Gpt2, Gpt2Error, Result};

/// How the learning rate falls from its peak after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    /// Half a cosine from `lr` down to `lr * min_lr_ratio` at `total_steps`.
    Cosine,
    /// A straight line from `lr` down to `lr * min_lr_ratio` at `total_steps`.
    Linear,
    /// Stays at `lr`.
    Constant,
}

/// AdamW and learning-rate schedule settings for [`LmTrainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmTrainConfig {
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// The floor of the decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Steps of linear warm-up from `lr / warmup_steps` to `lr`.
    pub warmup_steps: usize,
    /// Step at which the decay reaches its floor; later steps stay there.
    pub total_steps: usize,
    /// Shape of the decay after warm-up.
    pub decay: LrDecay,
    /// Decoupled weight decay, applied to matrices and embeddings only (not to biases or
    /// layer-norm weights, which decay would pull towards zero for no gain).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Largest global gradient L2 norm; larger gradients are scaled down to it.
    pub grad_clip: Option<f64>,
}

impl Default for LmTrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            total_steps: 2000,
            decay: LrDecay::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: Some(1.0),
        }
    }
}

impl LmTrainConfig {
    /// Checks the settings, so a typo fails before the first step rather than as NaN later.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason| Err(Gpt2Error::InvalidTrainConfig { reason });
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be positive and finite");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio must lie in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1 and beta2 must lie in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be non-negative and finite");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps must be positive and finite");
        }
        if self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad("grad_clip must be positive and finite");
        }
        Ok(())
    }

    /// The learning rate of step `step` (counted from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        let fraction = match self.decay {
            LrDecay::Cosine => 0.5 * (1.0 + (PI * progress).cos()),
            LrDecay::Linear => 1.0 - progress,
            LrDecay::Constant => 1.0,
        };
        floor + (self.lr - floor) * fraction
    }

    fn adam(&self) -> AdamParams {
        AdamParams { lr: self.lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps }
    }
}

/// Trains a [`Gpt2`] on the causal LM objective, one batch per [`LmTrainer::step`].
///
/// AdamW over the model's variables: with weight decay for matrices and embeddings, without
/// for biases and layer-norm weights.
pub struct LmTrainer {
    model: Gpt2,
    optimizer: AdamW,
    /// Every variable, for the global gradient norm.
    vars: Vec<Var>,
    config: LmTrainConfig,
    step: usize,
    last_grad_norm: Option<f32>,
}

impl LmTrainer {
    /// A trainer over `model` (a clone of a [`Gpt2`] shares its weights, so the caller may
    /// keep one to evaluate or export while training).
    pub fn new(model: Gpt2, config: LmTrainConfig) -> Result<Self> {
        config.validate()?;
        let named: Vec<(String, Var)> = {
            let map = model.varmap().data().lock().unwrap_or_else(PoisonError::into_inner);
            param_specs(model.config())
                .into_iter()
                .filter_map(|s| map.get(&s.name).cloned().map(|var| (s.name, var)))
                .collect()
        };
        let vars = named.iter().map(|(_, var)| var.clone()).collect();
        let decayed = named
            .into_iter()
            .map(|(name, var)| {
                let decay = if var.rank() >= 2 { config.weight_decay } else { 0.0 };
                (name, var, decay)
            })
            .collect();
        Ok(Self {
            optimizer: AdamW::new(decayed, config.adam())?,
            model,
            vars,
            config,
            step: 0,
            last_grad_norm: None,
        })
    }

    /// One optimiser step on one batch (`input_ids`, `attention_mask` as for
    /// [`Gpt2::lm_loss`]); returns the batch's loss before the update.
    pub fn step(&mut self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<f32> {
        let loss = self.model.lm_loss(input_ids, attention_mask)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Gpt2Error::NonFiniteLoss { step: self.step });
        }
        let mut grads = loss.backward()?;

        self.last_grad_norm = match self.config.grad_clip {
            Some(max_norm) => Some(self.clip(&mut grads, max_norm)?),
            None => None,
        };

        self.optimizer.set_learning_rate(self.config.lr_at(self.step));
        self.optimizer.step(&grads)?;
        self.step += 1;
        Ok(value)
    }

    /// The AdamW moments (`m.NAME`, `v.NAME` for each parameter) and the steps taken, to
    /// save with the weights.
    pub fn optimizer_state(&self) -> (HashMap<String, Tensor>, usize) {
        let (moments, _) = self.optimizer.state();
        (moments, self.step)
    }

    /// Continues from a saved [`LmTrainer::optimizer_state`]: the moments, and `steps` taken,
    /// which sets the learning rate and the bias correction of the next step. The model's
    /// weights are restored by loading them into the model given to [`LmTrainer::new`].
    pub fn restore(&mut self, moments: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        self.optimizer.restore(moments, steps)?;
        self.step = steps;
        Ok(())
    }

    /// Scales the gradients down to a global L2 norm of `max_norm`; returns the norm before.
    fn clip(&self, grads: &mut candle_core::backprop::GradStore, max_norm: f64) -> Result<f32> {
        let mut total = 0.0f64;
        for var in &self.vars {
            if let Some(grad) = grads.get(var.as_tensor()) {
                total += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        let norm = total.sqrt();
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for var in &self.vars {
                if let Some(grad) = grads.remove(var.as_tensor()) {
                    grads.insert(var.as_tensor(), (grad * scale)?);
                }
            }
        }
        Ok(norm as f32)
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.config.lr_at(self.step)
    }

    /// The global gradient norm of the last step, before clipping (`None` without clipping).
    pub fn last_grad_norm(&self) -> Option<f32> {
        self.last_grad_norm
    }

    /// The model being trained.
    pub fn model(&self) -> &Gpt2 {
        &self.model
    }

    /// Ends training and hands the model back.
    pub fn into_model(self) -> Gpt2 {
        self.model
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::gpt2::testing::{padded, tiny_model};

    #[test]
    fn training_steps_lower_the_lm_loss() {
        let model = tiny_model(3);
        let config = LmTrainConfig {
            lr: 3e-3,
            warmup_steps: 5,
            total_steps: 50,
            weight_decay: 0.01,
            ..LmTrainConfig::default()
        };
        let mut trainer = LmTrainer::new(model.clone(), config).unwrap();
        // A repetitive corpus: each row counts through the same cycle of 12 tokens from its own
        // start, and one row is padded.
        let rows: Vec<Vec<i64>> = (0..8)
            .map(|r| {
                let len = if r == 7 { 20 } else { 32 };
                (0..len).map(|t| 40 + (r + t) % 12).collect()
            })
            .collect();
        let (ids, mask) = padded(&rows, 32);

        let before = model.lm_loss(&ids, &mask).unwrap().to_scalar::<f32>().unwrap();
        let losses: Vec<f32> = (0..50).map(|_| trainer.step(&ids, &mask).unwrap()).collect();
        let after = model.lm_loss(&ids, &mask).unwrap().to_scalar::<f32>().unwrap();
        println!("lm loss {before} -> {after} in 50 steps (first step {})", losses[0]);

        assert_eq!(trainer.steps_done(), 50);
        assert!((losses[0] - before).abs() < 1e-5, "step reports the loss before the update");
        assert!(after < 0.7 * before, "loss fell only from {before} to {after}");
        assert!(trainer.last_grad_norm().is_some_and(f32::is_finite));
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_its_floor() {
        let config = LmTrainConfig {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            ..LmTrainConfig::default()
        };
        assert!((config.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((config.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((config.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((config.lr_at(500) - 0.1).abs() < 1e-12);
        let linear = LmTrainConfig { decay: LrDecay::Linear, ..config.clone() };
        assert!((linear.lr_at(35) - 0.775).abs() < 1e-12);
        let bad = LmTrainConfig { beta2: 1.0, ..config };
        assert!(matches!(bad.validate(), Err(Gpt2Error::InvalidTrainConfig { .. })));
    }
}
