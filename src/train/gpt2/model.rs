//! [`Gpt2`]: the model's parameters in a `VarMap` (random initialisation, safetensors
//! checkpoints with Hugging Face names), its forward pass to the hidden states after `ln_f`,
//! and the causal language-model loss with the head tied to `wte`.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::path::Path;
use std::sync::PoisonError;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::batch::Batch;
use super::config::Gpt2Config;
use super::kernels;
use super::layers::{Block, Norm};
use super::{Gpt2Error, Result};

/// Prefix of tensor names in Hugging Face `GPT2LMHeadModel` checkpoints.
const HF_PREFIX: &str = "transformer.";

/// Standard deviation of GPT-2's normal weight initialisation.
pub(super) const INIT_STD: f64 = 0.02;

/// How one parameter starts in [`Gpt2::new_random`].
#[derive(Clone, Copy)]
enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// One named parameter: its Hugging Face name, shape and initialisation.
pub(super) struct ParamSpec {
    pub(super) name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Every parameter of the model, in a fixed order (the order random init draws them in).
///
/// The residual projections (`attn.c_proj`, `mlp.c_proj`) start with the standard deviation
/// scaled by `1 / sqrt(2 * n_layer)`, as GPT-2 and Hugging Face do, so the residual stream
/// does not grow with depth.
pub(super) fn param_specs(config: &Gpt2Config) -> Vec<ParamSpec> {
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
pub(super) fn normal_values(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
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
        Self::from_named(config, device, &stored, path)
    }

    /// Builds the model from tensors under their bare Hugging Face names, read from `path`
    /// (named in errors); tensors the model does not use are ignored, any dtype is cast to f32.
    pub fn from_named(
        config: Gpt2Config,
        device: &Device,
        stored: &HashMap<&str, &Tensor>,
        path: &Path,
    ) -> Result<Self> {
        config.validate()?;
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

    /// Overwrites every parameter in place with the tensor of the same name in a safetensors
    /// file (as [`Gpt2::save_safetensors`] writes), so clones of this model and optimisers
    /// over its variables see the restored values.
    pub fn restore_safetensors(&self, path: &Path) -> Result<()> {
        let stored = candle_core::safetensors::load(path, &self.device)
            .map_err(|source| Gpt2Error::Safetensors { path: path.into(), source })?;
        let vars = self.varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
        for spec in param_specs(&self.config) {
            let (Some(var), Some(tensor)) = (vars.get(&spec.name), stored.get(&spec.name)) else {
                return Err(Gpt2Error::MissingTensor { path: path.into(), name: spec.name });
            };
            if tensor.dims() != var.dims() {
                let (expected, found) = (var.dims().to_vec(), tensor.dims().to_vec());
                return Err(Gpt2Error::TensorShape { name: spec.name, expected, found });
            }
            var.set(&tensor.to_dtype(DType::F32)?)?;
        }
        Ok(())
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
        Ok(kernels::cross_entropy(&logits, &targets)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::gpt2::testing::{max_abs_diff, padded, row, tiny_config, tiny_model, to_vec};

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
}
