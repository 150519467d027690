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
//! Everything below is reproduced exactly by the exported ONNX graph and by the plain-Rust
//! helpers [`pool_f32`] and [`Heads::apply_f32`], so the processor scores a window the same
//! way whether the heads live inside the graph or in the model card.
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
//!   and a zero mean.
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
//! fused CPU kernels with their own backward (see `fused`), and the composed candle ops on
//! other devices.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Added to an attention logit once for each reason its key is hidden (future, padded).
///
/// Finite on purpose: with minus infinity a row whose keys are all hidden would turn into
/// NaN in the softmax, and adding two of `f32::MIN` overflows. `-1e9` is far below any logit a
/// trained model produces, so hidden keys get exactly zero weight in `f32`.
pub const MASK_BIAS: f32 = -1e9;

/// Prefix of tensor names in Hugging Face `GPT2LMHeadModel` checkpoints.
const HF_PREFIX: &str = "transformer.";

/// Standard deviation of GPT-2's normal weight initialisation.
const INIT_STD: f64 = 0.02;

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

/// The GPT-2 hyper-parameters, named as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Number of token ids; `wte` has this many rows and the LM head this many outputs.
    pub vocab_size: usize,
    /// Longest sequence the model accepts; `wpe` has this many rows.
    pub n_positions: usize,
    /// Width of the hidden states.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// Epsilon added to the variance in every layer norm.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

/// The keys read from a Hugging Face config besides [`Gpt2Config`]'s own; others are ignored.
#[derive(Deserialize)]
struct HfConfigIn {
    #[serde(flatten)]
    config: Gpt2Config,
    activation_function: Option<String>,
    n_inner: Option<usize>,
}

/// What [`Gpt2Config::to_hf_json`] writes: enough for `transformers` to load the model.
#[derive(Serialize)]
struct HfConfigOut<'a> {
    model_type: &'static str,
    architectures: [&'static str; 1],
    #[serde(flatten)]
    config: &'a Gpt2Config,
    n_ctx: usize,
    activation_function: &'static str,
    tie_word_embeddings: bool,
}

impl Gpt2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of the pooled features the heads read: `2 * n_embd`.
    pub fn pooled_dim(&self) -> usize {
        2 * self.n_embd
    }

    /// Checks the sizes are usable, so a bad config fails here and not deep in a matmul.
    pub fn validate(&self) -> Result<()> {
        let sizes = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_head];
        if sizes.contains(&0) {
            return Err(Gpt2Error::InvalidConfig { reason: "every size must be positive" });
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Gpt2Error::InvalidConfig { reason: "n_head must divide n_embd" });
        }
        let eps = self.layer_norm_epsilon;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Gpt2Error::InvalidConfig {
                reason: "layer_norm_epsilon must be positive and finite",
            });
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`, ignoring keys this model does not use.
    ///
    /// Rejects an `activation_function` other than `gelu_new` and an `n_inner` other than
    /// `4 * n_embd`, because this model would silently compute something else for them.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let parsed: HfConfigIn =
            serde_json::from_str(text).map_err(|source| Gpt2Error::ConfigJson { source })?;
        if let Some(activation) = parsed.activation_function {
            if activation != "gelu_new" {
                return Err(Gpt2Error::UnsupportedActivation { activation });
            }
        }
        let expected = 4 * parsed.config.n_embd;
        if let Some(n_inner) = parsed.n_inner.filter(|&n| n != expected) {
            return Err(Gpt2Error::UnsupportedInner { n_inner, expected });
        }
        parsed.config.validate()?;
        Ok(parsed.config)
    }

    /// The config as Hugging Face `config.json` text (`model_type` `gpt2`,
    /// `GPT2LMHeadModel`).
    pub fn to_hf_json(&self) -> Result<String> {
        let out = HfConfigOut {
            model_type: "gpt2",
            architectures: ["GPT2LMHeadModel"],
            config: self,
            n_ctx: self.n_positions,
            activation_function: "gelu_new",
            tie_word_embeddings: true,
        };
        serde_json::to_string_pretty(&out).map_err(|source| Gpt2Error::ConfigJson { source })
    }

    /// Reads a Hugging Face `config.json` file.
    pub fn read_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Gpt2Error::ConfigRead { path: path.into(), source })?;
        Self::from_hf_json(&text)
    }

    /// Writes the config as a Hugging Face `config.json` file.
    pub fn write_hf_config(&self, path: &Path) -> Result<()> {
        let text = self.to_hf_json()?;
        std::fs::write(path, text)
            .map_err(|source| Gpt2Error::ConfigWrite { path: path.into(), source })
    }
}

/// How one parameter starts in [`Gpt2::new_random`].
#[derive(Clone, Copy)]
enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// One named parameter: its Hugging Face name, shape and initialisation.
struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Every parameter of the model, in a fixed order (the order random init draws them in).
///
/// The residual projections (`attn.c_proj`, `mlp.c_proj`) start with the standard deviation
/// scaled by `1 / sqrt(2 * n_layer)`, as GPT-2 and Hugging Face do, so the residual stream
/// does not grow with depth.
fn param_specs(config: &Gpt2Config) -> Vec<ParamSpec> {
    let (v, p, d) = (config.vocab_size, config.n_positions, config.n_embd);
    let residual_std = INIT_STD / (2.0 * config.n_layer as f64).sqrt();
    let spec = |name: String, shape: Vec<usize>, init| ParamSpec { name, shape, init };
    let mut specs = vec![
        spec("wte.weight".into(), vec![v, d], Init::Normal(INIT_STD)),
        spec("wpe.weight".into(), vec![p, d], Init::Normal(INIT_STD)),
    ];
    for i in 0..config.n_layer {
        let layer = [
            ("ln_1.weight", vec![d], Init::Ones),
            ("ln_1.bias", vec![d], Init::Zeros),
            ("attn.c_attn.weight", vec![d, 3 * d], Init::Normal(INIT_STD)),
            ("attn.c_attn.bias", vec![3 * d], Init::Zeros),
            ("attn.c_proj.weight", vec![d, d], Init::Normal(residual_std)),
            ("attn.c_proj.bias", vec![d], Init::Zeros),
            ("ln_2.weight", vec![d], Init::Ones),
            ("ln_2.bias", vec![d], Init::Zeros),
            ("mlp.c_fc.weight", vec![d, 4 * d], Init::Normal(INIT_STD)),
            ("mlp.c_fc.bias", vec![4 * d], Init::Zeros),
            ("mlp.c_proj.weight", vec![4 * d, d], Init::Normal(residual_std)),
            ("mlp.c_proj.bias", vec![d], Init::Zeros),
        ];
        specs.extend(layer.into_iter().map(|(n, s, init)| spec(format!("h.{i}.{n}"), s, init)));
    }
    specs.push(spec("ln_f.weight".into(), vec![d], Init::Ones));
    specs.push(spec("ln_f.bias".into(), vec![d], Init::Zeros));
    specs
}

/// Draws `n` values from normal(0, std) with the Box-Muller transform.
fn normal_values(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        out.push((r * (2.0 * PI * u2).cos()) as f32);
        out.push((r * (2.0 * PI * u2).sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A layer norm written out of mean and variance, so gradients flow through it.
#[derive(Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(vb: VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(d, "weight")?, bias: vb.get(d, "bias")?, eps })
    }

    /// Normalises the last dimension of `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
struct Block {
    ln_1: Norm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: Norm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

impl Block {
    fn new(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
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
    fn forward(&self, x: &Tensor, batch: &Batch, n_head: usize) -> Result<Tensor> {
        let attended = self.attention(&self.ln_1.forward(x)?, batch, n_head)?;
        let x = (x + attended)?;

        let hidden = fused::gelu_new(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
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
        let weights = fused::softmax_last_dim(&logits)?;
        let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((b * s, d))?;
        self.attn_proj.forward(&context)
    }
}

/// One batch read and checked on the host: flat ids, positions, attention bias, lengths.
struct Batch {
    batch: usize,
    seq: usize,
    /// Number of real tokens of each row.
    lengths: Vec<usize>,
    /// The token ids, row-major, kept for the LM targets.
    tokens: Vec<u32>,
    /// `[b * s]` u32 ids for the embedding lookup.
    ids: Tensor,
    /// `[b * s]` u32 positions, `cumsum(mask) - 1` clamped at 0.
    positions: Tensor,
    /// `[b, 1, s, s]` additive attention bias, see [`MASK_BIAS`].
    bias: Tensor,
}

impl Batch {
    fn read(input_ids: &Tensor, attention_mask: &Tensor, config: &Gpt2Config) -> Result<Self> {
        let (batch, seq) = batch_dims(input_ids, "input_ids")?;
        if attention_mask.dims() != input_ids.dims() {
            let found = attention_mask.dims().to_vec();
            return Err(Gpt2Error::BatchShape {
                what: "attention_mask",
                expected: "the shape of input_ids",
                found,
            });
        }
        if seq > config.n_positions {
            return Err(Gpt2Error::SequenceTooLong { seq, n_positions: config.n_positions });
        }
        let lengths = mask_lengths(attention_mask)?;
        let tokens = read_tokens(input_ids, config.vocab_size)?;

        let device = input_ids.device();
        let positions = positions(&lengths, seq);
        let bias = attention_bias(&lengths, seq);
        Ok(Self {
            batch,
            seq,
            ids: Tensor::from_slice(&tokens, batch * seq, device)?,
            positions: Tensor::from_vec(positions, batch * seq, device)?,
            bias: Tensor::from_vec(bias, (batch, 1, seq, seq), device)?,
            lengths,
            tokens,
        })
    }

    /// Rows of the flat hidden states that predict a next token, and those tokens: every `t`
    /// of a row where tokens `t` and `t + 1` are both real.
    fn lm_pairs(&self) -> (Vec<u32>, Vec<u32>) {
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (r, &len) in self.lengths.iter().enumerate() {
            for t in 0..len.saturating_sub(1) {
                let flat = r * self.seq + t;
                rows.push(flat as u32);
                targets.push(self.tokens[flat + 1]);
            }
        }
        (rows, targets)
    }
}

/// The `[batch, seq]` dimensions of a rank-2 tensor, both positive.
fn batch_dims(t: &Tensor, what: &'static str) -> Result<(usize, usize)> {
    match t.dims() {
        &[b, s] if b > 0 && s > 0 => Ok((b, s)),
        dims => Err(Gpt2Error::BatchShape {
            what,
            expected: "[batch, seq], both positive",
            found: dims.to_vec(),
        }),
    }
}

/// Reads the ids to the host and checks each lies in the vocabulary.
fn read_tokens(input_ids: &Tensor, vocab_size: usize) -> Result<Vec<u32>> {
    let dtype = input_ids.dtype();
    if !matches!(dtype, DType::U8 | DType::U32 | DType::I64) {
        return Err(Gpt2Error::BatchDtype { what: "input_ids", dtype });
    }
    let seq = input_ids.dim(1)?;
    let values = input_ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    values
        .iter()
        .enumerate()
        .map(|(i, &token)| match u32::try_from(token) {
            Ok(id) if (id as usize) < vocab_size => Ok(id),
            _ => Err(Gpt2Error::TokenOutOfRange { row: i / seq, col: i % seq, token, vocab_size }),
        })
        .collect()
}

/// Reads a `[batch, seq]` attention mask of any dtype and returns the length of each row.
fn mask_lengths(attention_mask: &Tensor) -> Result<Vec<usize>> {
    let (batch, seq) = batch_dims(attention_mask, "attention_mask")?;
    let values = attention_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    row_lengths(&values, batch, seq, 0.0, 1.0)
}

/// Lengths of right-padded 0/1 mask rows, rejecting other values and holes.
fn row_lengths<T: Copy + PartialEq>(
    values: &[T],
    batch: usize,
    seq: usize,
    zero: T,
    one: T,
) -> Result<Vec<usize>> {
    let mut lengths = Vec::with_capacity(batch);
    for (row, chunk) in values.chunks(seq.max(1)).take(batch).enumerate() {
        let mut len = 0;
        for (col, &v) in chunk.iter().enumerate() {
            if v != zero && v != one {
                return Err(Gpt2Error::MaskValue { row, col });
            }
            if v == one {
                if len != col {
                    return Err(Gpt2Error::MaskNotRightPadded { row });
                }
                len += 1;
            }
        }
        lengths.push(len);
    }
    lengths.resize(batch, 0);
    Ok(lengths)
}

/// `cumsum(mask) - 1` clamped at 0, for right-padded rows of the given lengths.
fn positions(lengths: &[usize], seq: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(lengths.len() * seq);
    for &len in lengths {
        out.extend((0..seq).map(|t| t.min(len.saturating_sub(1)) as u32));
    }
    out
}

/// The `[b, 1, s, s]` additive bias: [`MASK_BIAS`] for a future key plus [`MASK_BIAS`] for a
/// padded key, the same sum the ONNX graph forms.
fn attention_bias(lengths: &[usize], seq: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lengths.len() * seq * seq);
    for &len in lengths {
        for q in 0..seq {
            out.extend((0..seq).map(|k| {
                let future = if k > q { MASK_BIAS } else { 0.0 };
                let padded = if k >= len { MASK_BIAS } else { 0.0 };
                future + padded
            }));
        }
    }
    out
}

/// A GPT-2 language model whose parameters live in a `candle_nn::VarMap`.
///
/// Cloning is cheap and the clone shares the parameters: an optimiser step on one is seen by
/// every clone.
#[derive(Clone)]
pub struct Gpt2 {
    config: Gpt2Config,
    device: Device,
    varmap: VarMap,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
}

impl Gpt2 {
    /// A freshly initialised model: weights normal(0, 0.02) (residual projections scaled by
    /// `1 / sqrt(2 * n_layer)`), biases zero, layer-norm weights one. The same seed gives the
    /// same weights.
    pub fn new_random(config: Gpt2Config, device: &Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for spec in param_specs(&config) {
            let n: usize = spec.shape.iter().product();
            let values = match spec.init {
                Init::Normal(std) => normal_values(&mut rng, n, std),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            tensors.insert(spec.name, Tensor::from_vec(values, spec.shape, device)?);
        }
        Self::from_tensors(config, device, tensors)
    }

    /// Loads weights from a safetensors file, with bare Hugging Face names (`wte.weight`) or
    /// the `transformer.` prefix of `GPT2LMHeadModel` checkpoints. Tensors the model does not
    /// use (`lm_head.weight`, attention-mask buffers) are ignored; any dtype is cast to f32.
    pub fn load_safetensors(path: &Path, config: Gpt2Config, device: &Device) -> Result<Self> {
        config.validate()?;
        let stored = candle_core::safetensors::load(path, device)
            .map_err(|source| Gpt2Error::Safetensors { path: path.into(), source })?;
        let stored: HashMap<&str, &Tensor> =
            stored.iter().map(|(k, v)| (k.strip_prefix(HF_PREFIX).unwrap_or(k), v)).collect();

        let mut tensors = HashMap::new();
        for spec in param_specs(&config) {
            let Some(tensor) = stored.get(spec.name.as_str()) else {
                return Err(Gpt2Error::MissingTensor { path: path.into(), name: spec.name });
            };
            if tensor.dims() != spec.shape.as_slice() {
                let found = tensor.dims().to_vec();
                return Err(Gpt2Error::TensorShape {
                    name: spec.name,
                    expected: spec.shape,
                    found,
                });
            }
            tensors.insert(spec.name, tensor.to_dtype(DType::F32)?);
        }
        Self::from_tensors(config, device, tensors)
    }

    /// Saves every parameter under its bare Hugging Face name.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.weights().into_iter().collect();
        candle_core::safetensors::save(&tensors, path)
            .map_err(|source| Gpt2Error::Safetensors { path: path.into(), source })
    }

    /// Turns named tensors into variables in a fresh `VarMap` and builds the model over it.
    fn from_tensors(
        config: Gpt2Config,
        device: &Device,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut vars = varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
            for (name, tensor) in tensors {
                vars.insert(name, Var::from_tensor(&tensor)?);
            }
        }

        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let (v, p, d) = (config.vocab_size, config.n_positions, config.n_embd);
        let blocks = (0..config.n_layer)
            .map(|i| Block::new(vb.pp(format!("h.{i}")), &config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: vb.get((v, d), "wte.weight")?,
            wpe: vb.get((p, d), "wpe.weight")?,
            ln_f: Norm::new(vb.pp("ln_f"), d, config.layer_norm_epsilon)?,
            blocks,
            config,
            device: device.clone(),
            varmap,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variables, for an optimiser.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every parameter with its bare Hugging Face name, in the model's fixed order.
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        let vars = self.varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
        param_specs(&self.config)
            .into_iter()
            .filter_map(|spec| {
                let tensor = vars.get(&spec.name)?.as_tensor().clone();
                Some((spec.name, tensor))
            })
            .collect()
    }

    /// The parameter of that bare Hugging Face name, if the model has one.
    pub fn weight(&self, name: &str) -> Option<Tensor> {
        let vars = self.varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
        vars.get(name).map(|var| var.as_tensor().clone())
    }

    /// Number of scalar parameters (the tied LM head counted once).
    pub fn num_parameters(&self) -> usize {
        self.weights().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Hidden states after `ln_f`: `input_ids [b, s]` (u8, u32 or i64) and
    /// `attention_mask [b, s]` (0/1, right-padded, any dtype) to `[b, s, n_embd]`.
    ///
    /// The result tracks gradients back to the parameters and so keeps every intermediate
    /// tensor alive; call `.detach()` on it when only the values are wanted (features for
    /// frozen-backbone heads), so that memory is freed.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let batch = Batch::read(input_ids, attention_mask, &self.config)?;
        let hidden = self.hidden_flat(&batch)?;
        Ok(hidden.reshape((batch.batch, batch.seq, self.config.n_embd))?)
    }

    /// Mean negative log-likelihood of the next token over every position `t` where tokens
    /// `t` and `t + 1` are both real, with logits from the tied `wte`. A scalar tensor.
    pub fn lm_loss(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let batch = Batch::read(input_ids, attention_mask, &self.config)?;
        let (rows, targets) = batch.lm_pairs();
        if rows.is_empty() {
            return Err(Gpt2Error::NoLmTargets);
        }
        let rows = Tensor::from_vec(rows, targets.len(), &self.device)?;

        let hidden = self.hidden_flat(&batch)?.index_select(&rows, 0)?;
        let logits = hidden.matmul(&self.wte.t()?)?;
        Ok(fused::cross_entropy(&logits, &targets)?)
    }

    /// Hidden states `[b * s, n_embd]` of a checked batch.
    fn hidden_flat(&self, batch: &Batch) -> Result<Tensor> {
        let tokens = self.wte.index_select(&batch.ids, 0)?;
        let positions = self.wpe.index_select(&batch.positions, 0)?;
        let mut x = (tokens + positions)?;
        for block in &self.blocks {
            x = block.forward(&x, batch, self.config.n_head)?;
        }
        self.ln_f.forward(&x)
    }
}

/// Pools hidden states `[b, s, d]` into `[b, 2 * d]`: `concat(h_last, h_mean)` as the module
/// docs define. Differentiable, so heads and backbone can train through it.
pub fn pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let (b, s, d) = match hidden.dims() {
        &[b, s, d] => (b, s, d),
        dims => {
            let found = dims.to_vec();
            return Err(Gpt2Error::BatchShape { what: "hidden", expected: "[b, s, d]", found });
        }
    };
    if attention_mask.dims() != [b, s] {
        let found = attention_mask.dims().to_vec();
        let expected = "[b, s] of the hidden states";
        return Err(Gpt2Error::BatchShape { what: "attention_mask", expected, found });
    }
    let lengths = mask_lengths(attention_mask)?;
    let device = hidden.device();

    let last: Vec<u32> = lengths
        .iter()
        .enumerate()
        .map(|(r, &len)| (r * s + len.saturating_sub(1)) as u32)
        .collect();
    let last = Tensor::from_vec(last, b, device)?;
    let h_last = hidden.reshape((b * s, d))?.index_select(&last, 0)?;

    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let counts: Vec<f32> = lengths.iter().map(|&len| len.max(1) as f32).collect();
    let counts = Tensor::from_vec(counts, (b, 1), device)?;
    let h_mean = hidden.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&counts)?;
    Ok(Tensor::cat(&[h_last, h_mean], 1)?)
}

/// [`pool`] over plain slices, for the processor when the graph outputs only
/// `last_hidden_state`: `hidden` is `[batch, seq, n_embd]` row-major, `mask` `[batch, seq]`.
/// Returns `[batch, 2 * n_embd]` row-major.
pub fn pool_f32(
    hidden: &[f32],
    batch: usize,
    seq: usize,
    n_embd: usize,
    mask: &[i64],
) -> Result<Vec<f32>> {
    if seq == 0 {
        let expected = "seq positive";
        return Err(Gpt2Error::BatchShape {
            what: "attention_mask",
            expected,
            found: vec![batch, 0],
        });
    }
    check_len("hidden", hidden.len(), batch * seq * n_embd)?;
    check_len("attention_mask", mask.len(), batch * seq)?;
    let lengths = row_lengths(mask, batch, seq, 0, 1)?;

    let mut pooled = vec![0.0f32; batch * 2 * n_embd];
    for (r, &len) in lengths.iter().enumerate() {
        let row = &hidden[r * seq * n_embd..(r + 1) * seq * n_embd];
        let out = &mut pooled[r * 2 * n_embd..(r + 1) * 2 * n_embd];
        let (last_out, mean_out) = out.split_at_mut(n_embd);
        let last = len.saturating_sub(1);
        last_out.copy_from_slice(&row[last * n_embd..(last + 1) * n_embd]);
        for token in row.chunks_exact(n_embd).take(len) {
            mean_out.iter_mut().zip(token).for_each(|(m, &h)| *m += h);
        }
        let count = len.max(1) as f32;
        mean_out.iter_mut().for_each(|m| *m /= count);
    }
    Ok(pooled)
}

fn check_len(what: &'static str, found: usize, expected: usize) -> Result<()> {
    if found != expected {
        return Err(Gpt2Error::SliceLength { what, expected, found });
    }
    Ok(())
}

/// The logistic signal heads over pooled features: `weight [K, dim]`, `bias [K]`.
///
/// Serialised (for the model card) as `{"weight": [[...], ...], "bias": [...]}`, one weight
/// row per head; deserialising checks the shapes and that every value is finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HeadsRepr", into = "HeadsRepr")]
pub struct Heads {
    dim: usize,
    /// `[K, dim]` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// The serialised form of [`Heads`].
#[derive(Serialize, Deserialize)]
struct HeadsRepr {
    weight: Vec<Vec<f32>>,
    bias: Vec<f32>,
}

impl TryFrom<HeadsRepr> for Heads {
    type Error = Gpt2Error;

    fn try_from(repr: HeadsRepr) -> Result<Self> {
        let dim = repr.weight.first().map_or(0, Vec::len);
        if let Some(row) = repr.weight.iter().find(|row| row.len() != dim) {
            return Err(Gpt2Error::SliceLength {
                what: "head weight row",
                expected: dim,
                found: row.len(),
            });
        }
        Heads::new(dim, repr.weight.concat(), repr.bias)
    }
}

impl From<Heads> for HeadsRepr {
    fn from(heads: Heads) -> Self {
        let weight = heads.weight.chunks(heads.dim).map(<[f32]>::to_vec).collect();
        Self { weight, bias: heads.bias }
    }
}

impl Heads {
    /// Heads of input width `dim`; `K` is `bias.len()` and `weight` is `[K, dim]` row-major.
    pub fn new(dim: usize, weight: Vec<f32>, bias: Vec<f32>) -> Result<Self> {
        if dim == 0 || bias.is_empty() {
            return Err(Gpt2Error::EmptyHeads);
        }
        check_len("head weight", weight.len(), bias.len() * dim)?;
        if let Some(index) = weight.iter().chain(&bias).position(|v| !v.is_finite()) {
            return Err(Gpt2Error::NonFiniteHead { index });
        }
        Ok(Self { dim, weight, bias })
    }

    /// `k` heads of width `dim` with weights normal(0, 0.02) and zero biases.
    pub fn new_random(k: usize, dim: usize, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        Self::new(dim, normal_values(&mut rng, k * dim, INIT_STD), vec![0.0; k])
    }

    /// Heads from candle tensors `weight [K, dim]` and `bias [K]`.
    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (k, dim) = weight.dims2()?;
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        check_len("head bias", bias.len(), k)?;
        let weight = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::new(dim, weight, bias)
    }

    /// Number of heads, `K`.
    pub fn k(&self) -> usize {
        self.bias.len()
    }

    /// Input width, `2 * n_embd` for this module's pooling.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `[K, dim]` row-major.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    /// `[K]`.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// `scores = sigmoid(pooled · weightᵀ + bias)` in candle: `[b, dim] -> [b, K]`.
    pub fn apply(&self, pooled: &Tensor) -> Result<Tensor> {
        let device = pooled.device();
        let weight = Tensor::from_slice(&self.weight, (self.k(), self.dim), device)?;
        let bias = Tensor::from_slice(&self.bias, self.k(), device)?;
        let logits = pooled.matmul(&weight.t()?)?.broadcast_add(&bias)?;
        Ok(candle_nn::ops::sigmoid(&logits)?)
    }

    /// [`Heads::apply`] over plain slices: `pooled [batch, dim]` to `[batch, K]` row-major.
    pub fn apply_f32(&self, pooled: &[f32], batch: usize) -> Result<Vec<f32>> {
        check_len("pooled", pooled.len(), batch * self.dim)?;
        let mut scores = Vec::with_capacity(batch * self.k());
        for features in pooled.chunks_exact(self.dim) {
            for (row, &bias) in self.weight.chunks_exact(self.dim).zip(&self.bias) {
                let dot: f32 = row.iter().zip(features).map(|(w, x)| w * x).sum();
                scores.push(sigmoid(dot + bias));
            }
        }
        Ok(scores)
    }
}

/// A logistic function that neither overflows nor loses small values for large `|z|`.
fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

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

    fn adamw(&self, weight_decay: f64) -> ParamsAdamW {
        ParamsAdamW {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay,
        }
    }
}

/// Trains a [`Gpt2`] on the causal LM objective, one batch per [`LmTrainer::step`].
///
/// Holds two AdamW optimisers over the model's variables: one with weight decay for
/// matrices and embeddings, one without for biases and layer-norm weights.
pub struct LmTrainer {
    model: Gpt2,
    decayed: AdamW,
    plain: AdamW,
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
        let vars: Vec<Var> = {
            let map = model.varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
            param_specs(&model.config).iter().filter_map(|s| map.get(&s.name).cloned()).collect()
        };
        let (matrices, vectors): (Vec<Var>, Vec<Var>) =
            vars.iter().cloned().partition(|var| var.rank() >= 2);
        Ok(Self {
            decayed: AdamW::new(matrices, config.adamw(config.weight_decay))?,
            plain: AdamW::new(vectors, config.adamw(0.0))?,
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

        let lr = self.config.lr_at(self.step);
        self.decayed.set_learning_rate(lr);
        self.plain.set_learning_rate(lr);
        self.decayed.step(&grads)?;
        self.plain.step(&grads)?;
        self.step += 1;
        Ok(value)
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

/// Fused CPU kernels, each with its own backward, for the three places where candle's composed
/// ops dominate a CPU training step: the attention softmax, `gelu_new` and the LM loss.
///
/// The composed forms allocate and walk a full-size tensor for every elementary op and again
/// for its gradient; over `[tokens, vocab]` logits that is most of a step. Each kernel here
/// walks its rows once forward and once backward. They run on f32 CPU tensors only; on other
/// devices or dtypes the functions fall back to the composed candle ops, which compute the same
/// values, so the model runs unchanged on CUDA.
mod fused {
    use std::sync::Arc;

    use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

    type Result<T> = candle_core::Result<T>;

    /// Below this many output values a kernel runs on the calling thread only.
    const PARALLEL_MIN: usize = 1 << 15;

    const GELU_ROOT: f32 = 0.797_884_6; // sqrt(2 / pi)
    const GELU_CUBIC: f32 = 0.044_715;

    fn fused(t: &Tensor) -> bool {
        t.device().is_cpu() && t.dtype() == DType::F32
    }

    /// Softmax over the last dimension.
    pub(super) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        if !fused(x) {
            return candle_nn::ops::softmax(x, D::Minus1);
        }
        x.contiguous()?.apply_op1(SoftmaxLast)
    }

    /// GPT-2's tanh-approximated GELU.
    pub(super) fn gelu_new(x: &Tensor) -> Result<Tensor> {
        if !fused(x) {
            return x.gelu();
        }
        x.contiguous()?.apply_op1(GeluNew)
    }

    /// Mean over rows of `logsumexp(logits[r]) - logits[r, targets[r]]`, a scalar.
    pub(super) fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
        if !fused(logits) {
            let targets = Tensor::from_slice(targets, targets.len(), logits.device())?;
            return candle_nn::loss::cross_entropy(logits, &targets);
        }
        let op = NllRows { targets: targets.into() };
        logits.contiguous()?.apply_op1(op)?.mean_all()
    }

    /// The contiguous f32 values behind a CPU tensor.
    fn values<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
        let CpuStorage::F32(data) = storage else { bail!("{op}: f32 input only") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{op}: contiguous input only")
        };
        Ok(&data[start..end])
    }

    /// Width of the last dimension, the unit the kernels work in.
    fn row_width(layout: &Layout, op: &str) -> Result<usize> {
        match layout.dims().last() {
            Some(&w) if w > 0 => Ok(w),
            _ => bail!("{op}: needs a non-empty last dimension"),
        }
    }

    /// Builds `rows * width` outputs, calling `f(row, out_row)` for each row, split across
    /// candle's CPU thread count when the output is large.
    fn fill_rows(rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        let mut out = vec![0f32; rows * width];
        if out.is_empty() {
            return out;
        }
        let threads = candle_core::utils::get_num_threads().clamp(1, rows);
        if threads == 1 || out.len() < PARALLEL_MIN {
            out.chunks_exact_mut(width).enumerate().for_each(|(r, o)| f(r, o));
            return out;
        }
        let per_thread = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, block) in out.chunks_mut(per_thread * width).enumerate() {
                let f = &f;
                scope.spawn(move || {
                    let first = i * per_thread;
                    block.chunks_exact_mut(width).enumerate().for_each(|(r, o)| f(first + r, o));
                });
            }
        });
        out
    }

    /// Writes `exp(x - max(x))` into `out` and returns its sum.
    fn exp_shifted(x: &[f32], out: &mut [f32]) -> f32 {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - max).exp();
            sum += *o;
        }
        sum
    }

    struct SoftmaxLast;

    impl CustomOp1 for SoftmaxLast {
        fn name(&self) -> &'static str {
            "mindstream-softmax-last"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
            let x = values(storage, layout, self.name())?;
            let width = row_width(layout, self.name())?;
            let out = fill_rows(x.len() / width, width, |r, o| {
                let inv = 1.0 / exp_shifted(&x[r * width..(r + 1) * width], o);
                o.iter_mut().for_each(|v| *v *= inv);
            });
            Ok((CpuStorage::F32(out), layout.shape().clone()))
        }

        fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxLastGrad)?))
        }
    }

    /// `y * (g - sum(g * y))` per row, from the softmax output `y` and its gradient `g`.
    struct SoftmaxLastGrad;

    impl CustomOp2 for SoftmaxLastGrad {
        fn name(&self) -> &'static str {
            "mindstream-softmax-last-grad"
        }

        fn cpu_fwd(
            &self,
            ys: &CpuStorage,
            y_layout: &Layout,
            gs: &CpuStorage,
            g_layout: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let y = values(ys, y_layout, self.name())?;
            let g = values(gs, g_layout, self.name())?;
            let width = row_width(y_layout, self.name())?;
            if y.len() != g.len() {
                bail!("{}: output and gradient sizes differ", self.name())
            }
            let out = fill_rows(y.len() / width, width, |r, o| {
                let (y, g) = (&y[r * width..(r + 1) * width], &g[r * width..(r + 1) * width]);
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            });
            Ok((CpuStorage::F32(out), y_layout.shape().clone()))
        }
    }

    struct GeluNew;

    impl CustomOp1 for GeluNew {
        fn name(&self) -> &'static str {
            "mindstream-gelu-new"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
            let x = values(storage, layout, self.name())?;
            let width = row_width(layout, self.name())?;
            let out = fill_rows(x.len() / width, width, |r, o| {
                for (o, &v) in o.iter_mut().zip(&x[r * width..(r + 1) * width]) {
                    *o = 0.5 * v * (1.0 + (GELU_ROOT * v * (1.0 + GELU_CUBIC * v * v)).tanh());
                }
            });
            Ok((CpuStorage::F32(out), layout.shape().clone()))
        }

        fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluNewGrad)?))
        }
    }

    /// `g * gelu_new'(x)`.
    struct GeluNewGrad;

    impl CustomOp2 for GeluNewGrad {
        fn name(&self) -> &'static str {
            "mindstream-gelu-new-grad"
        }

        fn cpu_fwd(
            &self,
            xs: &CpuStorage,
            x_layout: &Layout,
            gs: &CpuStorage,
            g_layout: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let x = values(xs, x_layout, self.name())?;
            let g = values(gs, g_layout, self.name())?;
            let width = row_width(x_layout, self.name())?;
            if x.len() != g.len() {
                bail!("{}: input and gradient sizes differ", self.name())
            }
            let out = fill_rows(x.len() / width, width, |r, o| {
                let (x, g) = (&x[r * width..(r + 1) * width], &g[r * width..(r + 1) * width]);
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    let t = (GELU_ROOT * x * (1.0 + GELU_CUBIC * x * x)).tanh();
                    let du = GELU_ROOT * (1.0 + 3.0 * GELU_CUBIC * x * x);
                    *o = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
                }
            });
            Ok((CpuStorage::F32(out), x_layout.shape().clone()))
        }
    }

    /// Per-row negative log-likelihood `[n, vocab] -> [n]` of the given targets.
    struct NllRows {
        targets: Arc<[u32]>,
    }

    impl NllRows {
        fn check(&self, layout: &Layout) -> Result<usize> {
            let (rows, vocab) = layout.shape().dims2()?;
            if rows != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
                bail!("{}: targets do not fit logits of shape {:?}", self.name(), layout.dims())
            }
            Ok(vocab)
        }
    }

    impl CustomOp1 for NllRows {
        fn name(&self) -> &'static str {
            "mindstream-nll-rows"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
            let z = values(storage, layout, self.name())?;
            let vocab = self.check(layout)?;
            let out = fill_rows(self.targets.len(), 1, |r, o| {
                let row = &z[r * vocab..(r + 1) * vocab];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                o[0] = max + sum.ln() - row[self.targets[r] as usize];
            });
            Ok((CpuStorage::F32(out), Shape::from(self.targets.len())))
        }

        fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let op = NllRowsGrad { targets: self.targets.clone() };
            Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
        }
    }

    /// `g[r] * (softmax(logits[r]) - onehot(targets[r]))`.
    struct NllRowsGrad {
        targets: Arc<[u32]>,
    }

    impl CustomOp2 for NllRowsGrad {
        fn name(&self) -> &'static str {
            "mindstream-nll-rows-grad"
        }

        fn cpu_fwd(
            &self,
            zs: &CpuStorage,
            z_layout: &Layout,
            gs: &CpuStorage,
            g_layout: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let z = values(zs, z_layout, self.name())?;
            let g = values(gs, g_layout, self.name())?;
            let vocab = NllRows { targets: self.targets.clone() }.check(z_layout)?;
            if g.len() != self.targets.len() {
                bail!("{}: one gradient per row expected", self.name())
            }
            let out = fill_rows(self.targets.len(), vocab, |r, o| {
                let scale = g[r] / exp_shifted(&z[r * vocab..(r + 1) * vocab], o);
                o.iter_mut().for_each(|v| *v *= scale);
                o[self.targets[r] as usize] -= g[r];
            });
            Ok((CpuStorage::F32(out), z_layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 300,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
        }
    }

    fn tiny_model(seed: u64) -> Gpt2 {
        Gpt2::new_random(tiny_config(), &Device::Cpu, seed).unwrap()
    }

    /// Right-padded rows of the given lengths: `(input_ids, attention_mask)` as i64 tensors.
    fn padded(rows: &[Vec<i64>], seq: usize) -> (Tensor, Tensor) {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for row in rows {
            ids.extend((0..seq).map(|t| row.get(t).copied().unwrap_or(299)));
            mask.extend((0..seq).map(|t| i64::from(t < row.len())));
        }
        let shape = (rows.len(), seq);
        let device = Device::Cpu;
        (
            Tensor::from_vec(ids, shape, &device).unwrap(),
            Tensor::from_vec(mask, shape, &device).unwrap(),
        )
    }

    fn row(len: usize, salt: i64) -> Vec<i64> {
        (0..len as i64).map(|t| (t * 37 + salt * 11 + 3) % 300).collect()
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// A random f32 variable, and the value and gradient `f` gives it under a random weighting.
    fn value_and_grad(
        x: &Tensor,
        weights: &Tensor,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> (Vec<f32>, Vec<f32>) {
        let var = Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let loss =
            if y.rank() == 0 { y.clone() } else { (&y * weights).unwrap().sum_all().unwrap() };
        let grads = loss.backward().unwrap();
        (to_vec(&y), to_vec(grads.get(var.as_tensor()).unwrap()))
    }

    fn random_tensor(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        Tensor::from_vec(normal_values(&mut rng, n, std), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_kernels_match_the_composed_candle_ops_and_their_gradients() {
        let x = random_tensor(&[3, 7, 40], 3.0, 1);
        let w = random_tensor(&[3, 7, 40], 1.0, 2);
        let close = |what: &str, a: &[f32], b: &[f32], tol: f32| {
            let diff = max_abs_diff(a, b);
            assert!(diff < tol, "{what} differs by {diff}");
        };

        let fused = value_and_grad(&x, &w, fused::softmax_last_dim);
        let composed = value_and_grad(&x, &w, |x| candle_nn::ops::softmax(x, D::Minus1));
        close("softmax", &fused.0, &composed.0, 1e-6);
        close("softmax gradient", &fused.1, &composed.1, 1e-5);

        let fused = value_and_grad(&x, &w, fused::gelu_new);
        let composed = value_and_grad(&x, &w, |x| x.gelu());
        close("gelu_new", &fused.0, &composed.0, 1e-5);
        // candle's own gelu gradient rounds its constants to six digits.
        close("gelu_new gradient", &fused.1, &composed.1, 1e-4);

        let logits = random_tensor(&[9, 50], 4.0, 3);
        let targets: Vec<u32> = (0..9).map(|i| (i * 13 % 50) as u32).collect();
        let target_t = Tensor::from_slice(&targets, 9, &Device::Cpu).unwrap();
        let fused = value_and_grad(&logits, &w, |z| fused::cross_entropy(z, &targets));
        let composed =
            value_and_grad(&logits, &w, |z| candle_nn::loss::cross_entropy(z, &target_t));
        close("cross entropy", &fused.0, &composed.0, 1e-5);
        close("cross entropy gradient", &fused.1, &composed.1, 1e-6);
    }

    #[test]
    fn random_init_is_deterministic_for_a_seed() {
        let a = tiny_model(5).weights();
        let b = tiny_model(5).weights();
        let c = tiny_model(6).weights();
        assert_eq!(a.len(), 2 + 12 * 2 + 2);
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(to_vec(x), to_vec(y), "{name} differs for the same seed");
        }
        assert_ne!(to_vec(&a[0].1), to_vec(&c[0].1));

        let wte = to_vec(&a[0].1);
        let std = (wte.iter().map(|v| v * v).sum::<f32>() / wte.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "wte std {std}");
        let ln = a.iter().find(|(n, _)| n == "h.1.ln_2.weight").unwrap();
        assert!(to_vec(&ln.1).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn padded_rows_match_the_same_rows_run_alone() {
        let model = tiny_model(1);
        let rows = [row(1, 0), row(64, 1), row(9, 2), row(30, 3)];
        let (ids, mask) = padded(&rows, 64);
        let hidden = model.forward_hidden(&ids, &mask).unwrap();
        assert_eq!(hidden.dims(), &[4, 64, 32]);

        for (r, tokens) in rows.iter().enumerate() {
            let (alone_ids, alone_mask) = padded(std::slice::from_ref(tokens), tokens.len());
            let alone = model.forward_hidden(&alone_ids, &alone_mask).unwrap();
            let batched = hidden.narrow(0, r, 1).unwrap().narrow(1, 0, tokens.len()).unwrap();
            let diff = max_abs_diff(&to_vec(&alone), &to_vec(&batched));
            assert!(diff < 1e-5, "row {r} differs by {diff} when padded");
        }
        assert!(to_vec(&hidden).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn lm_loss_averages_next_token_nll_over_real_pairs() {
        let model = tiny_model(2);
        let rows = [row(5, 0), row(1, 1), row(3, 2)];
        let (ids, mask) = padded(&rows, 6);
        let loss = model.lm_loss(&ids, &mask).unwrap().to_scalar::<f32>().unwrap();

        let hidden = model.forward_hidden(&ids, &mask).unwrap();
        let logits = hidden.broadcast_matmul(&model.wte.t().unwrap()).unwrap();
        let logits: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
        let mut total = 0.0f64;
        let mut count = 0;
        for (r, tokens) in rows.iter().enumerate() {
            for t in 0..tokens.len().saturating_sub(1) {
                let z = &logits[r][t];
                let max = z.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
                let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                total += lse - z[tokens[t + 1] as usize] as f64;
                count += 1;
            }
        }
        assert_eq!(count, 6, "rows of 5, 1 and 3 tokens have 4, 0 and 2 next tokens");
        let expected = (total / count as f64) as f32;
        assert!((loss - expected).abs() < 1e-4, "loss {loss}, by hand {expected}");

        let (ids, mask) = padded(&[row(1, 0)], 4);
        assert!(matches!(model.lm_loss(&ids, &mask), Err(Gpt2Error::NoLmTargets)));
    }

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
    fn safetensors_roundtrip_gives_identical_hidden_states() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(4);
        let (ids, mask) = padded(&[row(10, 0), row(3, 1)], 10);
        let expected = to_vec(&model.forward_hidden(&ids, &mask).unwrap());

        let bare = dir.path().join("bare.safetensors");
        model.save_safetensors(&bare).unwrap();
        let loaded = Gpt2::load_safetensors(&bare, tiny_config(), &Device::Cpu).unwrap();
        assert_eq!(to_vec(&loaded.forward_hidden(&ids, &mask).unwrap()), expected);

        // The layout of a Hugging Face GPT2LMHeadModel checkpoint: prefixed names, a tied
        // lm_head and attention-mask buffers that the model does not use.
        let mut hf: HashMap<String, Tensor> =
            model.weights().into_iter().map(|(n, t)| (format!("transformer.{n}"), t)).collect();
        hf.insert("lm_head.weight".into(), model.weight("wte.weight").unwrap());
        hf.insert(
            "transformer.h.0.attn.bias".into(),
            Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap(),
        );
        let prefixed = dir.path().join("hf.safetensors");
        candle_core::safetensors::save(&hf, &prefixed).unwrap();
        let loaded = Gpt2::load_safetensors(&prefixed, tiny_config(), &Device::Cpu).unwrap();
        assert_eq!(to_vec(&loaded.forward_hidden(&ids, &mask).unwrap()), expected);

        let mut wrong = tiny_config();
        wrong.n_embd = 64;
        let err = Gpt2::load_safetensors(&bare, wrong, &Device::Cpu).err().unwrap();
        assert!(matches!(err, Gpt2Error::TensorShape { .. }), "{err}");
    }

    #[test]
    fn hf_config_roundtrips_and_ignores_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = tiny_config();
        config.write_hf_config(&path).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written["model_type"], "gpt2");
        assert_eq!(written["architectures"][0], "GPT2LMHeadModel");
        assert_eq!(written["n_embd"], 32);
        assert_eq!(Gpt2Config::read_hf_config(&path).unwrap(), config);

        let hf = r#"{"activation_function": "gelu_new", "attn_pdrop": 0.1, "n_ctx": 1024,
            "n_embd": 768, "n_head": 12, "n_inner": null, "n_layer": 12, "n_positions": 1024,
            "layer_norm_epsilon": 1e-05, "vocab_size": 50257, "model_type": "gpt2",
            "task_specific_params": {"text-generation": {"do_sample": true}}}"#;
        let gpt2 = Gpt2Config::from_hf_json(hf).unwrap();
        assert_eq!((gpt2.vocab_size, gpt2.n_layer, gpt2.head_dim()), (50257, 12, 64));

        let relu = r#"{"activation_function": "relu", "n_embd": 8, "n_head": 2, "n_layer": 1,
            "n_positions": 8, "vocab_size": 10}"#;
        let err = Gpt2Config::from_hf_json(relu).unwrap_err();
        assert!(matches!(err, Gpt2Error::UnsupportedActivation { .. }), "{err}");
        let odd =
            r#"{"n_embd": 10, "n_head": 3, "n_layer": 1, "n_positions": 8, "vocab_size": 10}"#;
        assert!(matches!(Gpt2Config::from_hf_json(odd), Err(Gpt2Error::InvalidConfig { .. })));
    }

    #[test]
    fn pool_takes_the_last_real_token_and_the_mean_of_real_tokens() {
        let (b, s, d) = (3, 4, 2);
        let hidden: Vec<f32> = (0..b * s * d).map(|i| i as f32).collect();
        let mask: Vec<i64> = vec![1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        let pooled = pool_f32(&hidden, b, s, d, &mask).unwrap();
        #[rustfmt::skip]
        let expected = vec![
            4.0, 5.0, 2.0, 3.0,     // row 0: token 2 last, mean of tokens 0..3
            14.0, 15.0, 11.0, 12.0, // row 1: full row
            16.0, 17.0, 0.0, 0.0,   // row 2: no real token
        ];
        assert_eq!(pooled, expected);

        let device = Device::Cpu;
        let hidden_t = Tensor::from_vec(hidden, (b, s, d), &device).unwrap();
        let mask_t = Tensor::from_vec(mask.clone(), (b, s), &device).unwrap();
        assert_eq!(to_vec(&pool(&hidden_t, &mask_t).unwrap()), expected);

        let holey = vec![1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        let err = pool_f32(&vec![0.0; b * s * d], b, s, d, &holey).unwrap_err();
        assert!(matches!(err, Gpt2Error::MaskNotRightPadded { row: 0 }), "{err}");
        let err = pool_f32(&[0.0; 3], b, s, d, &mask).unwrap_err();
        assert!(matches!(err, Gpt2Error::SliceLength { .. }), "{err}");
    }

    #[test]
    fn heads_apply_the_same_in_candle_and_in_plain_rust() {
        let heads = Heads::new(3, vec![1.0, -2.0, 0.5, 0.0, 0.0, 100.0], vec![0.1, -0.2]).unwrap();
        let pooled = vec![0.3, 0.1, -0.4, 2.0, -1.0, 1.0];
        let plain = heads.apply_f32(&pooled, 2).unwrap();
        let tensor = Tensor::from_vec(pooled.clone(), (2, 3), &Device::Cpu).unwrap();
        let candle = to_vec(&heads.apply(&tensor).unwrap());
        assert!(max_abs_diff(&plain, &candle) < 1e-6, "{plain:?} vs {candle:?}");
        let z = 0.3 - 0.2 - 0.2 + 0.1;
        assert!((plain[0] - 1.0 / (1.0 + (-z as f32).exp())).abs() < 1e-6);

        let json = serde_json::to_string(&heads).unwrap();
        assert_eq!(serde_json::from_str::<Heads>(&json).unwrap(), heads);
        let ragged = r#"{"weight": [[1.0, 2.0], [3.0]], "bias": [0.0, 0.0]}"#;
        assert!(serde_json::from_str::<Heads>(ragged).is_err());
        assert!(matches!(
            Heads::new(2, vec![f32::NAN, 0.0], vec![0.0]),
            Err(Gpt2Error::NonFiniteHead { .. })
        ));
    }

    #[test]
    fn bad_batches_are_rejected_with_a_reason() {
        let model = tiny_model(8);
        let device = Device::Cpu;
        let ids = Tensor::from_vec(vec![1i64, 2, 3, 300], (1, 4), &device).unwrap();
        let mask = Tensor::from_vec(vec![1i64; 4], (1, 4), &device).unwrap();
        let err = model.forward_hidden(&ids, &mask).err().unwrap();
        assert!(matches!(err, Gpt2Error::TokenOutOfRange { token: 300, col: 3, .. }), "{err}");

        let ids = Tensor::from_vec(vec![1i64, 2, 3, 4], (1, 4), &device).unwrap();
        let two = Tensor::from_vec(vec![1i64, 2, 1, 0], (1, 4), &device).unwrap();
        let err = model.forward_hidden(&ids, &two).err().unwrap();
        assert!(matches!(err, Gpt2Error::MaskValue { row: 0, col: 1 }), "{err}");

        let long = Tensor::zeros((1, 65), DType::U32, &device).unwrap();
        let ones = Tensor::ones((1, 65), DType::U32, &device).unwrap();
        let err = model.forward_hidden(&long, &ones).err().unwrap();
        assert!(matches!(err, Gpt2Error::SequenceTooLong { seq: 65, .. }), "{err}");
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
