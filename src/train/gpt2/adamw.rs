//! AdamW with decoupled weight decay, its moments open to saving and restoring.
//!
//! The update is `candle_nn`'s AdamW step for step (same bias correction, same order of
//! operations); it exists because that optimiser keeps its moments private, and a build that
//! resumes from a checkpoint must continue with the moments it stopped with.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{Gpt2Error, Result};

/// One optimised variable with its moments and weight decay.
struct Slot {
    name: String,
    var: Var,
    first: Var,
    second: Var,
    weight_decay: f64,
}

/// Adam hyper-parameters shared by every variable.
#[derive(Debug, Clone, Copy)]
pub(super) struct AdamParams {
    pub(super) lr: f64,
    pub(super) beta1: f64,
    pub(super) beta2: f64,
    pub(super) eps: f64,
}

/// AdamW over named variables.
pub(super) struct AdamW {
    slots: Vec<Slot>,
    params: AdamParams,
    /// Updates applied so far; the bias correction of the next is `1 - beta^(t + 1)`.
    t: usize,
}

impl AdamW {
    /// `vars` are `(name, variable, weight decay)`; moments start at zero.
    pub(super) fn new(vars: Vec<(String, Var, f64)>, params: AdamParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var, weight_decay)| {
                let first = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let second = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { name, var, first, second, weight_decay })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, params, t: 0 })
    }

    pub(super) fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update from `grads`; variables without a gradient keep their values.
    pub(super) fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let AdamParams { lr, beta1, beta2, eps } = self.params;
        let scale_m = 1.0 / (1.0 - beta1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - beta2.powi(self.t as i32));
        for slot in &self.slots {
            let theta = slot.var.as_tensor();
            let Some(g) = grads.get(theta) else { continue };
            let m = ((slot.first.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((slot.second.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let decayed = (theta * (1.0 - lr * slot.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next = (decayed - (adjusted * lr)?)?;
            slot.first.set(&m)?;
            slot.second.set(&v)?;
            slot.var.set(&next)?;
        }
        Ok(())
    }

    /// The moments as `m.NAME` and `v.NAME`, and the number of updates applied.
    pub(super) fn state(&self) -> (HashMap<String, Tensor>, usize) {
        let mut tensors = HashMap::new();
        for slot in &self.slots {
            tensors.insert(format!("m.{}", slot.name), slot.first.as_tensor().clone());
            tensors.insert(format!("v.{}", slot.name), slot.second.as_tensor().clone());
        }
        (tensors, self.t)
    }

    /// Restores moments saved by [`AdamW::state`]; every variable must have both.
    pub(super) fn restore(&mut self, tensors: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for slot in &self.slots {
            for (prefix, moment) in [("m", &slot.first), ("v", &slot.second)] {
                let name = format!("{prefix}.{}", slot.name);
                let saved = tensors.get(&name).ok_or_else(|| Gpt2Error::MissingTensor {
                    path: "optimizer state".into(),
                    name: name.clone(),
                })?;
                if saved.dims() != moment.dims() {
                    return Err(Gpt2Error::TensorShape {
                        name,
                        expected: moment.dims().to_vec(),
                        found: saved.dims().to_vec(),
                    });
                }
                moment.set(saved)?;
            }
        }
        self.t = t;
        Ok(())
    }
}
