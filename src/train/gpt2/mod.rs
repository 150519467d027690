//! The trainable GPT-2 backbone, its pooling and its signal heads.
//!
//! This module owns the model the training binary fits: a GPT-2 written with `candle`, its
//! Hugging Face `config.json`, its safetensors checkpoints, and a small AdamW trainer for the
//! causal language-model objective. It receives token ids and attention masks; it hands on
//! hidden states, pooled features and head scores, and the weights that [`super::export`]
//! writes into the ONNX graph the processor runs.
//!
//! # The model contract
//!
//! Everything below is reproduced exactly by the exported ONNX graph, and for every row with
//! a real token by the processor's plain-Rust [`crate::model::heads::pool`] and
//! [`crate::model::heads::apply`] (the heads in the card's form, `HeadWeights::from(&heads)`),
//! so the processor scores a window the same way whether the heads live inside the graph or
//! in the model card.
//!
//! - **Inputs.** `input_ids` and `attention_mask`, both `[batch, seq]`. Mask entries are 0 or 1
//!   and each row is padded on the right: a row is `len` ones followed by zeros.
//!   `seq` is at most `n_positions`.
//! - **Positions.** The Hugging Face convention: `position_ids = cumsum(attention_mask) - 1`
//!   along the sequence, clamped at 0. Real token `t` of a row gets position `t`.
//! - **Attention.** Causal, and padded keys are masked out. Masking adds
//!   [`MASK_BIAS`] (a large finite negative) to the attention logits once for a future key
//!   and once more for a padded key, so no row is ever all minus infinity and no NaN appears;
//!   the hidden states of padded positions are finite but carry no meaning.
//! - **Hidden states.** `last_hidden_state` is `[batch, seq, n_embd]`, taken after `ln_f`.
//! - **Pooling.** `pooled = concat(h_last, h_mean)`, `[batch, 2 * n_embd]`, `h_last` first.
//!   `h_last` is the hidden state at index `max(sum(mask) - 1, 0)` of the row (its last real
//!   token); `h_mean` is the sum of the hidden states at real tokens divided by
//!   `max(sum(mask), 1)`. A row with no real token therefore pools to the state at index 0
//!   and a zero mean (the processor's plain-Rust pooling gives all zeros for such a row).
//! - **Heads.** `K` logistic heads: `scores = sigmoid(pooled · weightᵀ + bias)` with
//!   `weight` `[K, 2 * n_embd]` and `bias` `[K]`; `scores` is `[batch, K]`, head order is the
//!   signal order of the model card.
//!
//! # The architecture
//!
//! GPT-2 as in Hugging Face `transformers`: pre-norm blocks, tanh-approximated GELU
//! (`gelu_new`), layer norm with `layer_norm_epsilon`, Conv1D weights stored `[in, out]`,
//! and the language-model head tied to `wte`. Tensors carry Hugging Face's `gpt2` names
//! (`wte.weight`, `h.0.attn.c_attn.weight`, ...) so a Hugging Face checkpoint loads as is.
//!
//! Two `candle` 0.11 pieces are avoided on purpose because they give no gradients:
//! `candle_nn::ops::softmax_last_dim` and the `candle_nn::LayerNorm` module. Layer norm is
//! written out of mean and variance; the attention softmax, `gelu_new` and the LM loss use
//! fused CPU kernels with their own backward (see `kernels`), and the composed candle ops on
//! other devices.
//!
//! # Layout
//!
//! [`Gpt2Config`] and its Hugging Face `config.json` live in `config`; the weights, the
//! forward pass, the LM loss and the safetensors checkpoints of [`Gpt2`] in `model`, over the
//! layers of `layers` and the checked batches of `batch`; the fused kernels in `kernels`;
//! [`pool()`] and [`Heads`] in `pool`; [`LmTrainer`] and its schedule in `trainer`, over
//! the AdamW of `adamw`, whose moments can be saved.

mod adamw;
mod batch;
mod config;
mod kernels;
mod layers;
mod model;
mod pool;
#[cfg(test)]
pub(crate) mod testing;
mod trainer;

use std::path::PathBuf;

use candle_core::DType;

pub use config::Gpt2Config;
pub use model::Gpt2;
pub use pool::{pool, Heads};
pub use trainer::{LmTrainConfig, LmTrainer, LrDecay};

/// Added to an attention logit once for each reason its key is hidden (future, padded).
///
/// Finite on purpose: with minus infinity a row whose keys are all hidden would turn into
/// NaN in the softmax, and adding two of `f32::MIN` overflows. `-1e9` is far below any logit a
/// trained model produces, so hidden keys get exactly zero weight in `f32`.
pub const MASK_BIAS: f32 = -1e9;

/// Errors of building, loading, saving or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Gpt2Error {
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
    #[error("cannot read {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    ConfigWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid GPT-2 config JSON")]
    ConfigJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid GPT-2 config: {reason}")]
    InvalidConfig { reason: &'static str },
    #[error("unsupported activation {activation:?}: this model computes gelu_new only")]
    UnsupportedActivation { activation: String },
    #[error("unsupported n_inner {n_inner}: this model's MLP is {expected} wide (4 * n_embd)")]
    UnsupportedInner { n_inner: usize, expected: usize },
    #[error("cannot read or write safetensors file {path}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path} lacks tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{what} has shape {found:?}, expected {expected}")]
    BatchShape { what: &'static str, expected: &'static str, found: Vec<usize> },
    #[error("{what} has dtype {dtype:?}, expected an integer type")]
    BatchDtype { what: &'static str, dtype: DType },
    #[error("sequence length {seq} exceeds n_positions {n_positions}")]
    SequenceTooLong { seq: usize, n_positions: usize },
    #[error("token {token} at row {row}, column {col} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { row: usize, col: usize, token: i64, vocab_size: usize },
    #[error("attention mask value at row {row}, column {col} is neither 0 nor 1")]
    MaskValue { row: usize, col: usize },
    #[error("attention mask row {row} is not right-padded (a 1 follows a 0)")]
    MaskNotRightPadded { row: usize },
    #[error("no row has two consecutive real tokens, so there is no next token to predict")]
    NoLmTargets,
    #[error("{what} has {found} values, expected {expected}")]
    SliceLength { what: &'static str, expected: usize, found: usize },
    #[error("heads need at least one head and a non-zero input width")]
    EmptyHeads,
    #[error("head weight or bias {index} is not finite")]
    NonFiniteHead { index: usize },
    #[error("invalid training config: {reason}")]
    InvalidTrainConfig { reason: &'static str },
    #[error("loss is not finite at step {step}; the update was not applied")]
    NonFiniteLoss { step: usize },
}

type Result<T> = std::result::Result<T, Gpt2Error>;
