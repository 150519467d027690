//! Fixtures shared by the tests of this module: a tiny config and model, right-padded
//! batches, and comparisons of tensor values.

use candle_core::{Device, Tensor};

use super::{Gpt2, Gpt2Config};

pub(crate) fn tiny_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 300,
        n_positions: 64,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    }
}

pub(crate) fn tiny_model(seed: u64) -> Gpt2 {
    Gpt2::new_random(tiny_config(), &Device::Cpu, seed).unwrap()
}

/// Right-padded rows of the given lengths: `(input_ids, attention_mask)` as i64 tensors.
pub(crate) fn padded(rows: &[Vec<i64>], seq: usize) -> (Tensor, Tensor) {
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

pub(crate) fn row(len: usize, salt: i64) -> Vec<i64> {
    (0..len as i64).map(|t| (t * 37 + salt * 11 + 3) % 300).collect()
}

pub(crate) fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
