//! Logistic regression (Newton's method with L2), and the metrics every evaluation reports.
//!
//! Used for the signal heads over frozen backbone features and for the baselines over
//! window counts, so that model and baseline are fitted and scored the same way.

/// A fitted model over standardised features, folded back to raw features.
#[derive(Clone, Debug, PartialEq)]
pub struct Logistic {
    /// Weights on raw features.
    pub weight: Vec<f32>,
    pub bias: f32,
}

impl Logistic {
    pub fn logit(&self, x: &[f32]) -> f32 {
        self.weight.iter().zip(x).map(|(w, v)| w * v).sum::<f32>() + self.bias
    }

    pub fn predict(&self, x: &[f32]) -> f32 {
        crate::model::heads::sigmoid(self.logit(x))
    }
}

/// Fits `sigmoid(w·x + b)` to labels `y` (rows of `x` have equal length) with an L2 penalty
/// `l2 / 2 · |w|²` on standardised features. Returns `None` without both classes.
pub fn fit(x: &[Vec<f32>], y: &[bool], l2: f64) -> Option<Logistic> {
    let n = x.len();
    let d = x.first()?.len();
    let positives = y.iter().filter(|&&v| v).count();
    if positives == 0 || positives == n {
        return None;
    }
    let (mean, scale) = standardise(x, d);
    let z = |row: &[f32], j: usize| (f64::from(row[j]) - mean[j]) * scale[j];

    // Parameters: d weights then the bias; the bias is not penalised.
    let mut theta = vec![0f64; d + 1];
    theta[d] = (positives as f64 / (n - positives) as f64).ln();
    for _ in 0..50 {
        let mut gradient = vec![0f64; d + 1];
        let mut hessian = vec![0f64; (d + 1) * (d + 1)];
        let mut features = vec![0f64; d + 1];
        for (row, &label) in x.iter().zip(y) {
            for (j, f) in features.iter_mut().take(d).enumerate() {
                *f = z(row, j);
            }
            features[d] = 1.0;
            let logit: f64 = features.iter().zip(&theta).map(|(f, t)| f * t).sum();
            let p = 1.0 / (1.0 + (-logit).exp());
            let residual = p - f64::from(u8::from(label));
            let w = (p * (1.0 - p)).max(1e-9);
            for a in 0..=d {
                gradient[a] += residual * features[a];
                let row_h = &mut hessian[a * (d + 1)..(a + 1) * (d + 1)];
                for b in 0..=a {
                    row_h[b] += w * features[a] * features[b];
                }
            }
        }
        for a in 0..d {
            gradient[a] += l2 * theta[a];
            hessian[a * (d + 1) + a] += l2;
        }
        for a in 0..=d {
            for b in 0..a {
                hessian[b * (d + 1) + a] = hessian[a * (d + 1) + b];
            }
        }
        let step = solve(&mut hessian, &gradient, d + 1)?;
        let size: f64 = step.iter().map(|s| s.abs()).fold(0.0, f64::max);
        for (t, s) in theta.iter_mut().zip(&step) {
            *t -= s;
        }
        if size < 1e-7 {
            break;
        }
    }

    let weight: Vec<f32> = (0..d).map(|j| (theta[j] * scale[j]) as f32).collect();
    let bias = theta[d] - (0..d).map(|j| theta[j] * scale[j] * mean[j]).sum::<f64>();
    Some(Logistic { weight, bias: bias as f32 })
}

/// Column means and inverse standard deviations (1 for constant columns).
fn standardise(x: &[Vec<f32>], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() as f64;
    let mut mean = vec![0f64; d];
    for row in x {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v) / n;
        }
    }
    let mut var = vec![0f64; d];
    for row in x {
        for j in 0..d {
            var[j] += (f64::from(row[j]) - mean[j]).powi(2) / n;
        }
    }
    let scale = var.iter().map(|v| if *v > 1e-12 { 1.0 / v.sqrt() } else { 1.0 }).collect();
    (mean, scale)
}

/// Solves `A s = g` for symmetric positive definite `A` (Cholesky, in place).
fn solve(a: &mut [f64], g: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for k in 0..j {
            diag -= a[j * n + k] * a[j * n + k];
        }
        if diag <= 0.0 {
            return None;
        }
        let diag = diag.sqrt();
        a[j * n + j] = diag;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / diag;
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        let mut v = g[i];
        for k in 0..i {
            v -= a[i * n + k] * y[k];
        }
        y[i] = v / a[i * n + i];
    }
    let mut s = vec![0f64; n];
    for i in (0..n).rev() {
        let mut v = y[i];
        for k in i + 1..n {
            v -= a[k * n + i] * s[k];
        }
        s[i] = v / a[i * n + i];
    }
    Some(s)
}

/// Fits a logistic model over sparse rows (`(index, value)` pairs below `dims`) with
/// AdaGrad and an L2 penalty; for the bag-of-tokens baseline, where Newton's method would
/// need a `dims x dims` Hessian.
pub fn fit_sparse(
    rows: &[Vec<(u32, f32)>],
    dims: usize,
    y: &[bool],
    l2: f32,
    epochs: usize,
) -> Option<(Vec<f32>, f32)> {
    let positives = y.iter().filter(|&&v| v).count();
    if positives == 0 || positives == y.len() {
        return None;
    }
    let mut weight = vec![0f32; dims];
    let mut bias = (positives as f32 / (y.len() - positives) as f32).ln();
    let mut squares = vec![1e-8f32; dims + 1];
    let rate = 0.5f32;
    let n = rows.len() as f32;
    for _ in 0..epochs {
        for (row, &label) in rows.iter().zip(y) {
            let logit: f32 = row.iter().map(|&(j, v)| weight[j as usize] * v).sum::<f32>() + bias;
            let residual = crate::model::heads::sigmoid(logit) - f32::from(u8::from(label));
            for &(j, v) in row {
                let j = j as usize;
                let g = residual * v + l2 / n * weight[j];
                squares[j] += g * g;
                weight[j] -= rate * g / squares[j].sqrt();
            }
            squares[dims] += residual * residual;
            bias -= rate * residual / squares[dims].sqrt();
        }
    }
    Some((weight, bias))
}

/// Area under the ROC curve (ties count half); `None` without both classes.
pub fn auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let mut pairs: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let positives = pairs.iter().filter(|p| p.1).count() as f64;
    let negatives = pairs.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let mid_rank = (i + j + 1) as f64 / 2.0;
        rank_sum += mid_rank * pairs[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Mean negative log-likelihood of the labels under the scores.
pub fn log_loss(scores: &[f32], labels: &[bool]) -> f64 {
    let n = scores.len().max(1) as f64;
    scores
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
            if y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ordered_pairs_and_ties() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auc(&[0.5, 0.6], &[true, true]), None);
    }

    #[test]
    fn recovers_a_separating_direction() {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..400 {
            let a = (i % 20) as f32 - 10.0;
            let b = ((i * 7) % 13) as f32 * 100.0;
            x.push(vec![a, b]);
            y.push(a + (i % 3) as f32 - 1.0 > 0.0);
        }
        let model = fit(&x, &y, 1.0).unwrap();
        assert!(model.weight[0] > 0.5, "{model:?}");
        assert!(model.weight[1].abs() < 0.01, "{model:?}");
        let scores: Vec<f32> = x.iter().map(|r| model.predict(r)).collect();
        assert!(auc(&scores, &y).unwrap() > 0.95);
        assert!(log_loss(&scores, &y) < 0.4);
        assert!(fit(&x, &vec![true; 400], 1.0).is_none());
    }
}
