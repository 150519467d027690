//! Platt scaling: turns each head's raw output into a calibrated probability,
//! `p = sigmoid(a · logit(raw) + b)`, fitted on the validation split's raw scores after the
//! heads are fitted. The result goes into the model card ([`crate::model::card::Platt`]) and
//! the scorer applies it to every score it serves.
//!
//! The fit follows Platt: the targets are pulled in from 0 and 1 by one pseudo-example of each
//! class (`(n₊ + 1) / (n₊ + 2)` and `1 / (n₋ + 2)`), which keeps `a` and `b` finite on a split
//! that the raw scores separate perfectly. With few examples of one class, or when the fitted
//! slope is not positive (which would reverse the model's ranking), only the intercept `b` is
//! fitted and `a` stays 1. Without both classes the scaling is the identity.

use crate::model::card::Platt;

/// Fewest examples of the rarer class for which the slope is fitted as well as the intercept.
pub const MIN_FOR_SLOPE: usize = 20;

/// Newton iterations at most; each halves its step until the loss decreases.
const MAX_ITERATIONS: usize = 100;

/// How a scaling came about, for the log and the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Slope and intercept fitted.
    Full,
    /// Slope fixed at 1: too few examples of one class, or a slope that was not positive.
    InterceptOnly,
    /// No examples of one class: the identity.
    Identity,
}

/// Fits the scaling of one head to validation raw scores and labels.
pub fn fit(signal: &str, raw: &[f32], labels: &[bool]) -> (Platt, Fit) {
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return (Platt::identity(signal), Fit::Identity);
    }
    let high = (positives as f64 + 1.0) / (positives as f64 + 2.0);
    let low = 1.0 / (negatives as f64 + 2.0);
    let points: Vec<(f64, f64)> = raw
        .iter()
        .zip(labels)
        .map(|(&p, &l)| (Platt::logit(p), if l { high } else { low }))
        .collect();
    if positives.min(negatives) >= MIN_FOR_SLOPE {
        if let Some((a, b)) = newton(&points, true) {
            if a > 0.0 {
                return (Platt { signal: signal.into(), a, b }, Fit::Full);
            }
        }
    }
    match newton(&points, false) {
        Some((_, b)) => (Platt { signal: signal.into(), a: 1.0, b }, Fit::InterceptOnly),
        None => (Platt::identity(signal), Fit::Identity),
    }
}

/// Cross-entropy of `(x, target)` points under `sigmoid(a x + b)`, computed stably.
fn loss(points: &[(f64, f64)], a: f64, b: f64) -> f64 {
    points
        .iter()
        .map(|&(x, t)| {
            let z = a * x + b;
            // -t ln σ(z) - (1 - t) ln(1 - σ(z)) = softplus(z) - t z
            let softplus = if z > 0.0 { z + (-z).exp().ln_1p() } else { z.exp().ln_1p() };
            softplus - t * z
        })
        .sum()
}

/// Minimises [`loss`] over `(a, b)`, or over `b` with `a = 1` when `slope` is false, by Newton
/// steps with step halving. `None` when it does not settle on finite values.
fn newton(points: &[(f64, f64)], slope: bool) -> Option<(f64, f64)> {
    let (mut a, mut b) = (1.0, 0.0);
    let mut current = loss(points, a, b);
    for _ in 0..MAX_ITERATIONS {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for &(x, t) in points {
            let p = 1.0 / (1.0 + (-(a * x + b)).exp());
            let w = (p * (1.0 - p)).max(1e-12);
            ga += (p - t) * x;
            gb += p - t;
            haa += w * x * x;
            hab += w * x;
            hbb += w;
        }
        let (da, db) = if slope {
            let det = haa * hbb - hab * hab;
            if det <= 1e-12 * (haa * hbb).max(1e-300) {
                return None;
            }
            ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det)
        } else {
            (0.0, gb / hbb)
        };
        let mut scale = 1.0;
        let mut improved = false;
        while scale > 1e-10 {
            let next = loss(points, a - scale * da, b - scale * db);
            if next <= current {
                (a, b, current) = (a - scale * da, b - scale * db, next);
                improved = true;
                break;
            }
            scale /= 2.0;
        }
        if !improved || (scale * da).abs().max((scale * db).abs()) < 1e-10 {
            break;
        }
    }
    (a.is_finite() && b.is_finite()).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Labels drawn from `sigmoid(a · logit(raw) + b)` give back `a` and `b`.
    #[test]
    fn recovers_a_known_scaling() {
        let (a, b) = (0.6, -0.8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut raw = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..40_000 {
            let p: f32 = rng.random_range(0.001..0.999);
            let truth = Platt { signal: "s".into(), a, b }.apply(p);
            raw.push(p);
            labels.push(rng.random::<f32>() < truth);
        }
        let (fitted, how) = fit("s", &raw, &labels);
        assert_eq!(how, Fit::Full);
        assert!((fitted.a - a).abs() < 0.03, "{fitted:?}");
        assert!((fitted.b - b).abs() < 0.05, "{fitted:?}");
    }

    /// Perfectly separated scores still give finite values; one class gives the identity;
    /// a handful of positives moves only the intercept.
    #[test]
    fn degenerate_splits_stay_finite() {
        let raw = [0.1f32, 0.2, 0.3, 0.7, 0.8, 0.9];
        let labels = [false, false, false, true, true, true];
        let (platt, _) = fit("s", &raw.repeat(10), &labels.repeat(10));
        assert!(platt.a.is_finite() && platt.b.is_finite() && platt.a > 0.0, "{platt:?}");

        let (platt, how) = fit("s", &raw, &[true; 6]);
        assert_eq!((platt, how), (Platt::identity("s"), Fit::Identity));

        let mut labels = vec![false; 200];
        labels[..5].iter_mut().for_each(|l| *l = true);
        let raw = vec![0.5f32; 200];
        let (platt, how) = fit("s", &raw, &labels);
        assert_eq!(how, Fit::InterceptOnly);
        assert_eq!(platt.a, 1.0);
        // The mean target: (5 · 6/7 + 195 · 1/197) / 200.
        let p = platt.apply(0.5);
        assert!((p - 0.02638).abs() < 1e-4, "{p}");
    }

    /// Scores that rank the classes backwards keep their order: the slope stays 1.
    #[test]
    fn never_reverses_the_ranking() {
        let raw: Vec<f32> = (0..200).map(|i| 0.2 + 0.003 * i as f32).collect();
        let labels: Vec<bool> = (0..200).map(|i| i < 100).collect();
        let (platt, how) = fit("s", &raw, &labels);
        assert_eq!(how, Fit::InterceptOnly);
        assert!(platt.apply(0.3) < platt.apply(0.7));
    }
}
