//! Pooling and linear heads in plain Rust, for graphs that output only `last_hidden_state`
//! (a Hugging Face GPT-2 export, say), with weights from the model card.
//!
//! The contract, shared with the exported graphs and the training code: `pooled =
//! concat(h_last, h_mean)` of width `2 * n_embd`, where `h_last` is the hidden state of the
//! last real token (index `sum(mask) - 1`; padding is on the right) and `h_mean` the mean over
//! real tokens; `scores = sigmoid(pooled · Wᵀ + b)`.

use crate::model::card::HeadWeights;

/// Pools `hidden` (`[batch, seq, n_embd]`, row-major) under `mask` (`[batch, seq]`).
pub fn pool(hidden: &[f32], batch: usize, seq: usize, n_embd: usize, mask: &[i64]) -> Vec<f32> {
    let mut pooled = vec![0f32; batch * 2 * n_embd];
    for b in 0..batch {
        let row_mask = &mask[b * seq..(b + 1) * seq];
        let real = row_mask.iter().filter(|&&m| m != 0).count();
        let out = &mut pooled[b * 2 * n_embd..(b + 1) * 2 * n_embd];
        let row = |t: usize| &hidden[(b * seq + t) * n_embd..(b * seq + t + 1) * n_embd];
        // A row without real tokens pools to the state at index 0 and a zero mean, as the
        // exported graphs do.
        out[..n_embd].copy_from_slice(row(real.saturating_sub(1)));
        if real == 0 {
            continue;
        }
        let mean = &mut out[n_embd..];
        for t in (0..seq).filter(|&t| row_mask[t] != 0) {
            for (m, h) in mean.iter_mut().zip(row(t)) {
                *m += h;
            }
        }
        let scale = 1.0 / real as f32;
        mean.iter_mut().for_each(|m| *m *= scale);
    }
    pooled
}

/// `sigmoid(pooled · Wᵀ + b)` for each of `batch` rows; returns `[batch, signals]`.
pub fn apply(heads: &HeadWeights, pooled: &[f32], batch: usize) -> Vec<f32> {
    let width = pooled.len() / batch.max(1);
    let mut scores = Vec::with_capacity(batch * heads.bias.len());
    for row in pooled.chunks_exact(width) {
        for (weights, bias) in heads.weight.iter().zip(&heads.bias) {
            let logit: f32 = weights.iter().zip(row).map(|(w, x)| w * x).sum::<f32>() + bias;
            scores.push(sigmoid(logit));
        }
    }
    scores
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_last_real_token_and_mean() {
        // batch 2, seq 3, n_embd 2; the second row has one real token.
        let hidden = [1., 2., 3., 4., 5., 6., 7., 8., 9., 9., 9., 9.];
        let mask = [1, 1, 0, 1, 0, 0];
        let pooled = pool(&hidden, 2, 3, 2, &mask);
        assert_eq!(pooled, [3., 4., 2., 3., 7., 8., 7., 8.]);
    }

    #[test]
    fn heads_are_sigmoid_of_affine() {
        let heads = HeadWeights { weight: vec![vec![1., 0.], vec![0., -1.]], bias: vec![0., 1.] };
        let scores = apply(&heads, &[2., 3.], 1);
        assert!((scores[0] - sigmoid(2.)).abs() < 1e-6);
        assert!((scores[1] - sigmoid(-2.)).abs() < 1e-6);
    }
}
