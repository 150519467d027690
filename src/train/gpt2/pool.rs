//! The pooling and the signal heads of the model contract: [`pool`] in candle (so heads and
//! backbone can train through it) and [`Heads`], the logistic heads with their model-card form.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::batch::mask_lengths;
use super::model::{normal_values, INIT_STD};
use super::{Gpt2Error, Result};
use crate::model::card::HeadWeights;

/// Pools hidden states `[b, s, d]` into `[b, 2 * d]`: `concat(h_last, h_mean)` as the
/// [`gpt2`](super) module docs define. Differentiable, so heads and backbone can train through
/// it.
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

/// The model card's form of the heads, for [`crate::model::heads::apply`]: one weight row
/// per head.
impl From<&Heads> for HeadWeights {
    fn from(heads: &Heads) -> Self {
        let weight = heads.weight.chunks(heads.dim).map(<[f32]>::to_vec).collect();
        Self { weight, bias: heads.bias.clone() }
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
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::gpt2::testing::{max_abs_diff, to_vec};

    #[test]
    fn pool_takes_the_last_real_token_and_the_mean_of_real_tokens() {
        let (b, s, d) = (3, 4, 2);
        let hidden: Vec<f32> = (0..b * s * d).map(|i| i as f32).collect();
        let mask: Vec<i64> = vec![1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        #[rustfmt::skip]
        let expected = vec![
            4.0, 5.0, 2.0, 3.0,     // row 0: token 2 last, mean of tokens 0..3
            14.0, 15.0, 11.0, 12.0, // row 1: full row
            16.0, 17.0, 0.0, 0.0,   // row 2: no real token
        ];
        let device = Device::Cpu;
        let hidden_t = Tensor::from_vec(hidden.clone(), (b, s, d), &device).unwrap();
        let mask_t = Tensor::from_vec(mask.clone(), (b, s), &device).unwrap();
        assert_eq!(to_vec(&pool(&hidden_t, &mask_t).unwrap()), expected);

        // The processor's plain-Rust pooling agrees on rows with a real token; on a row with
        // none it gives zeros rather than the state at index 0, so row 2 is left out.
        let processor = crate::model::heads::pool(&hidden, b, s, d, &mask);
        assert_eq!(processor[..2 * 2 * d], expected[..2 * 2 * d]);

        let holey = vec![1i64, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        let holey = Tensor::from_vec(holey, (b, s), &device).unwrap();
        let err = pool(&hidden_t, &holey).unwrap_err();
        assert!(matches!(err, Gpt2Error::MaskNotRightPadded { row: 0 }), "{err}");
        let short = Tensor::from_vec(vec![1i64; b * (s - 1)], (b, s - 1), &device).unwrap();
        let err = pool(&hidden_t, &short).unwrap_err();
        assert!(matches!(err, Gpt2Error::BatchShape { what: "attention_mask", .. }), "{err}");
    }

    #[test]
    fn heads_apply_the_same_in_candle_and_in_plain_rust() {
        let heads = Heads::new(3, vec![1.0, -2.0, 0.5, 0.0, 0.0, 100.0], vec![0.1, -0.2]).unwrap();
        let pooled = vec![0.3, 0.1, -0.4, 2.0, -1.0, 1.0];
        let card = HeadWeights::from(&heads);
        assert_eq!(card.weight, [vec![1.0, -2.0, 0.5], vec![0.0, 0.0, 100.0]]);
        let plain = crate::model::heads::apply(&card, &pooled, 2);
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
}
