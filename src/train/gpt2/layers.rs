//! The layers of a block: layer norm written out of mean and variance, Hugging Face's Conv1D,
//! and the pre-norm transformer block with its causal, padding-masked self-attention.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::batch::Batch;
use super::config::Gpt2Config;
use super::kernels;
use super::Result;

/// A layer norm written out of mean and variance, so gradients flow through it.
#[derive(Clone)]
pub(super) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    pub(super) fn new(vb: VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(d, "weight")?, bias: vb.get(d, "bias")?, eps })
    }

    /// Normalises the last dimension of `x`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;

        let normed = centred.broadcast_mul(&inv_std)?;
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Hugging Face's Conv1D: an affine map with its weight stored `[in, out]`.
#[derive(Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn new(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((d_in, d_out), "weight")?, bias: vb.get(d_out, "bias")? })
    }

    /// `x [n, in] -> [n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// One pre-norm transformer block.
#[derive(Clone)]
pub(super) struct Block {
    ln_1: Norm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: Norm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

impl Block {
    pub(super) fn new(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
        let (d, eps) = (config.n_embd, config.layer_norm_epsilon);
        Ok(Self {
            ln_1: Norm::new(vb.pp("ln_1"), d, eps)?,
            c_attn: Conv1D::new(vb.pp("attn.c_attn"), d, 3 * d)?,
            attn_proj: Conv1D::new(vb.pp("attn.c_proj"), d, d)?,
            ln_2: Norm::new(vb.pp("ln_2"), d, eps)?,
            c_fc: Conv1D::new(vb.pp("mlp.c_fc"), d, 4 * d)?,
            mlp_proj: Conv1D::new(vb.pp("mlp.c_proj"), 4 * d, d)?,
        })
    }

    /// `x [b * s, d] -> [b * s, d]`.
    pub(super) fn forward(&self, x: &Tensor, batch: &Batch, n_head: usize) -> Result<Tensor> {
        let attended = self.attention(&self.ln_1.forward(x)?, batch, n_head)?;
        let x = (x + attended)?;

        let hidden = kernels::gelu_new(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        let mlp = self.mlp_proj.forward(&hidden)?;
        Ok((x + mlp)?)
    }

    /// Causal self-attention with padded keys masked by `batch.bias`.
    fn attention(&self, x: &Tensor, batch: &Batch, n_head: usize) -> Result<Tensor> {
        let (b, s) = (batch.batch, batch.seq);
        let d = x.dim(1)?;
        let head_dim = d / n_head;
        let qkv = self.c_attn.forward(x)?.reshape((b, s, 3, n_head, head_dim))?;
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?)
        };
        let q = (split(0)? * (1.0 / (head_dim as f64).sqrt()))?;
        let (k, v) = (split(1)?, split(2)?);

        let logits = q.matmul(&k.t()?)?.broadcast_add(&batch.bias)?;
        let weights = kernels::softmax_last_dim(&logits)?;
        let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((b * s, d))?;
        self.attn_proj.forward(&context)
    }
}
