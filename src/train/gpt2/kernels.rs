//! Fused CPU kernels, each with its own backward, for the three places where candle's composed
//! ops dominate a CPU training step: the attention softmax, `gelu_new` and the LM loss.
//!
//! The composed forms allocate and walk a full-size tensor for every elementary op and again
//! for its gradient; over `[tokens, vocab]` logits that is most of a step. Each kernel here
//! walks its rows once forward and once backward. They run on f32 CPU tensors only; on other
//! devices or dtypes the functions fall back to the composed candle ops, which compute the same
//! values, so the model runs unchanged on CUDA.

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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::train::gpt2::model::normal_values;
    use crate::train::gpt2::testing::{max_abs_diff, to_vec};

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

        let fused = value_and_grad(&x, &w, softmax_last_dim);
        let composed = value_and_grad(&x, &w, |x| candle_nn::ops::softmax(x, D::Minus1));
        close("softmax", &fused.0, &composed.0, 1e-6);
        close("softmax gradient", &fused.1, &composed.1, 1e-5);

        let fused = value_and_grad(&x, &w, gelu_new);
        let composed = value_and_grad(&x, &w, |x| x.gelu());
        close("gelu_new", &fused.0, &composed.0, 1e-5);
        // candle's own gelu gradient rounds its constants to six digits.
        close("gelu_new gradient", &fused.1, &composed.1, 1e-4);

        let logits = random_tensor(&[9, 50], 4.0, 3);
        let targets: Vec<u32> = (0..9).map(|i| (i * 13 % 50) as u32).collect();
        let target_t = Tensor::from_slice(&targets, 9, &Device::Cpu).unwrap();
        let fused = value_and_grad(&logits, &w, |z| cross_entropy(z, &targets));
        let composed =
            value_and_grad(&logits, &w, |z| candle_nn::loss::cross_entropy(z, &target_t));
        close("cross entropy", &fused.0, &composed.0, 1e-5);
        close("cross entropy gradient", &fused.1, &composed.1, 1e-6);
    }
}
