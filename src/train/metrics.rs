//! The figures every evaluation reports for a set of scores against its labels: AUC and log
//! loss (from [`crate::train::linear`]), accuracy at 0.5, expected calibration error over
//! equal-width bins, and the points of the ROC curve and the reliability diagram that the
//! report draws.

use crate::model::card::Figures;
use crate::train::linear;

/// Score bins of the expected calibration error and the reliability diagram.
pub const BINS: usize = 10;

/// Share of examples whose score falls on the side of 0.5 of their label (a score of exactly
/// 0.5 counts as positive); 0 for no examples.
pub fn accuracy(scores: &[f32], labels: &[bool]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let right = scores.iter().zip(labels).filter(|&(&p, &y)| (p >= 0.5) == y).count();
    right as f64 / scores.len() as f64
}

/// One bin of a reliability diagram.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bin {
    pub count: usize,
    /// Mean score of the examples in the bin.
    pub mean_score: f64,
    /// Share of positives among them.
    pub positive_rate: f64,
}

/// Examples grouped by score into `bins` equal-width bins over [0, 1]; a score of 1 falls in
/// the last bin.
pub fn reliability(scores: &[f32], labels: &[bool], bins: usize) -> Vec<Bin> {
    let mut sums = vec![(0usize, 0f64, 0usize); bins];
    for (&p, &y) in scores.iter().zip(labels) {
        let p = f64::from(p).clamp(0.0, 1.0);
        let index = ((p * bins as f64) as usize).min(bins - 1);
        let slot = &mut sums[index];
        slot.0 += 1;
        slot.1 += p;
        slot.2 += usize::from(y);
    }
    sums.into_iter()
        .map(|(count, total, positives)| match count {
            0 => Bin::default(),
            n => Bin {
                count: n,
                mean_score: total / n as f64,
                positive_rate: positives as f64 / n as f64,
            },
        })
        .collect()
}

/// Expected calibration error: over [`BINS`] equal-width bins, the gap between mean score and
/// positive rate, weighted by the bin's share of the examples; 0 for no examples.
pub fn ece(scores: &[f32], labels: &[bool]) -> f64 {
    let n = scores.len();
    if n == 0 {
        return 0.0;
    }
    reliability(scores, labels, BINS)
        .iter()
        .map(|bin| bin.count as f64 / n as f64 * (bin.mean_score - bin.positive_rate).abs())
        .sum()
}

/// The ROC curve as `(false positive rate, true positive rate)` points from `(0, 0)` to
/// `(1, 1)`, one per distinct score; empty without both classes.
pub fn roc(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return Vec::new();
    }
    let mut pairs: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            if pairs[j].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            j += 1;
        }
        points.push((fp / negatives, tp / positives));
        i = j;
    }
    points
}

/// All the figures of one set of scores, rounded to four decimals.
pub fn figures(scores: &[f32], labels: &[bool]) -> Figures {
    Figures {
        auc: linear::auc(scores, labels).map(round4),
        accuracy: round4(accuracy(scores, labels)),
        log_loss: round4(linear::log_loss(scores, labels)),
        ece: round4(ece(scores, labels)),
    }
}

pub fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ece_weighs_each_bin_gap_by_its_share() {
        // Bin [0.1, 0.2): scores 0.12 and 0.18, one positive: |0.15 - 0.5| = 0.35, share 1/2.
        // Bin [0.9, 1.0]: scores 0.92 and 1.0, both positive: |0.96 - 1| = 0.04, share 1/2.
        let scores = [0.12, 0.18, 0.92, 1.0];
        let labels = [true, false, true, true];
        assert!((ece(&scores, &labels) - (0.35 + 0.04) / 2.0).abs() < 1e-6);

        let bins = reliability(&scores, &labels, BINS);
        let counts: Vec<usize> = bins.iter().map(|b| b.count).collect();
        assert_eq!(counts, [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert!((bins[9].mean_score - 0.96).abs() < 1e-6);
        assert_eq!(bins[1].positive_rate, 0.5);

        // Perfectly calibrated bins give 0.
        let scores = [0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75];
        let labels = [true, false, false, false, true, true, true, false];
        assert!(ece(&scores, &labels) < 1e-9);
        assert_eq!(ece(&[], &[]), 0.0);
    }

    #[test]
    fn accuracy_splits_at_one_half() {
        let scores = [0.2, 0.5, 0.7, 0.49];
        assert_eq!(accuracy(&scores, &[false, true, false, true]), 0.5);
        assert_eq!(accuracy(&scores, &[false, true, true, false]), 1.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn roc_walks_from_the_highest_score() {
        let points = roc(&[0.9, 0.8, 0.8, 0.1], &[true, true, false, false]);
        assert_eq!(points, [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert!(roc(&[0.3, 0.4], &[true, true]).is_empty());
    }
}
