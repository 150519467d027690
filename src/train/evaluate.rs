//! Evaluation of a model against baselines on the time-split test sets, shared by `build`
//! (which stores the calibration and the figures in the card it writes) and by
//! `mindstream-train evaluate` (which scores an existing model folder).
//!
//! It receives the data sets with their token ids and a scorer that serves the heads' raw
//! outputs; it scores the validation split (to fit the Platt scaling, unless the card brings
//! one) and the test split once per example, fits the baselines on the training split, and
//! hands on, per signal and data set, the card's figures with the scores behind them, for
//! [`crate::train::report`] to draw.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::model::card::{BaselineFigures, Evaluation, ModelCard, Platt, SignalSpec};
use crate::model::scorer::{ModelError, OrtScorer, Scorer};
use crate::tokenize::TokenizeError;
use crate::train::build::{BuildError, BuildOptions, DataSet};
use crate::train::calibrate::{self, Fit};
use crate::train::catalog::Horizons;
use crate::train::dataset::Split;
use crate::train::fit::{bar, labelled};
use crate::train::report::{self, ReportError};
use crate::train::{catalog, linear, metrics};

/// Sequences per scoring call.
pub const BATCH: usize = 64;

/// Where the calibrated figures' scaling came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationSource {
    /// The model card's own scaling: the scores the processor serves.
    Card,
    /// Fitted here on the validation split and stored in the card being written.
    FittedAndStored,
    /// Fitted here on the validation split for this report only: the card has none, so the
    /// processor serves the uncalibrated scores.
    FittedForReport,
}

/// A baseline's scores for the test rows of one signal and data set.
#[derive(Clone, Debug, PartialEq)]
pub struct BaselineScores {
    pub name: String,
    pub scores: Vec<f32>,
}

/// One signal on one data set's test split: the figures for the card and the scores behind
/// them.
#[derive(Clone, Debug, PartialEq)]
pub struct SetResult {
    pub evaluation: Evaluation,
    pub labels: Vec<bool>,
    /// The heads' outputs before calibration.
    pub raw: Vec<f32>,
    pub calibrated: Vec<f32>,
    /// The logistic-regression baseline first, then the majority class.
    pub baselines: Vec<BaselineScores>,
}

/// What an evaluation hands on.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// One scaling per scorer column.
    pub calibration: Vec<Platt>,
    /// How each scaling was fitted; `None` when it came from the card.
    pub fits: Option<Vec<Fit>>,
    pub source: CalibrationSource,
    /// Labelled validation examples and positives per scorer column, all data sets together:
    /// what the calibration was (or would be) fitted on.
    pub validation: Vec<(usize, usize)>,
    pub results: Vec<SetResult>,
}

impl Outcome {
    /// The figures for the card.
    pub fn evaluations(&self) -> Vec<Evaluation> {
        self.results.iter().map(|r| r.evaluation.clone()).collect()
    }
}

/// Evaluates `scorer`, whose columns are `signals` and which must serve raw head outputs.
/// `given` is the card's calibration; without it a Platt scaling is fitted on the
/// validation split.
pub fn run(
    sets: &[DataSet],
    signals: &[String],
    scorer: &mut dyn Scorer,
    given: Option<&[Platt]>,
) -> Result<Outcome, BuildError> {
    let catalog_index = |name: &str| catalog::head_signals().iter().position(|s| s.name == name);
    let (calibration, fits) = match given {
        Some(given) if given.len() == signals.len() => (given.to_vec(), None),
        Some(given) => {
            let message = format!("{} scalings for {} signals", given.len(), signals.len());
            return Err(BuildError::Step { step: "calibration", message });
        }
        None => {
            let validation = score_split(sets, Split::Validation, scorer)?;
            let (calibration, fits) = fit_calibration(sets, signals, &validation);
            (calibration, Some(fits))
        }
    };
    let validation = signals
        .iter()
        .map(|name| {
            let rows = catalog_index(name)
                .map(|signal| labelled(sets, signal, Split::Validation))
                .unwrap_or_default();
            (rows.len(), rows.iter().filter(|r| r.2).count())
        })
        .collect();
    let test = score_split(sets, Split::Test, scorer)?;
    let mut results = Vec::new();
    for (column, name) in signals.iter().enumerate() {
        let Some(signal) = catalog_index(name) else {
            tracing::warn!(signal = %name, "no labels for this signal, left out of the evaluation");
            continue;
        };
        let column = Column { index: column, name, signal, calibration: &calibration[column] };
        results.extend(signal_results(sets, &column, &test));
    }
    let source =
        if fits.is_some() { CalibrationSource::FittedAndStored } else { CalibrationSource::Card };
    Ok(Outcome { calibration, fits, source, validation, results })
}

/// One scorer column and the signal whose labels it is measured against.
struct Column<'a> {
    index: usize,
    name: &'a str,
    /// Position of the signal in the catalogue (and in each example's labels).
    signal: usize,
    calibration: &'a Platt,
}

/// The results of one column on each data set's test split that has labels for it.
fn signal_results(sets: &[DataSet], column: &Column<'_>, test: &SplitScores) -> Vec<SetResult> {
    let rows = labelled(sets, column.signal, Split::Test);
    let baselines = baselines(sets, column.signal, &rows);
    let mut results = Vec::new();
    for (s, set) in sets.iter().enumerate() {
        let picked: Vec<usize> = (0..rows.len()).filter(|&k| rows[k].0 == s).collect();
        if picked.is_empty() {
            continue;
        }
        let raw: Vec<f32> = picked.iter().map(|&k| test[s][&rows[k].1][column.index]).collect();
        let calibrated = raw.iter().map(|&p| column.calibration.apply(p)).collect();
        let labels = picked.iter().map(|&k| rows[k].2).collect();
        let picked_baselines = baselines
            .iter()
            .map(|b| BaselineScores {
                name: b.name.clone(),
                scores: picked.iter().map(|&k| b.scores[k]).collect(),
            })
            .collect();
        let scores = Scores { labels, raw, calibrated, baselines: picked_baselines };
        results.push(SetResult::new(column.name, set.name, scores));
    }
    results
}

/// The scores of one signal on one data set's test split.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub labels: Vec<bool>,
    pub raw: Vec<f32>,
    pub calibrated: Vec<f32>,
    /// The logistic-regression baseline first.
    pub baselines: Vec<BaselineScores>,
}

impl SetResult {
    /// Computes the figures of `scores`.
    pub fn new(signal: &str, dataset: &str, scores: Scores) -> SetResult {
        let Scores { labels, raw, calibrated, baselines } = scores;
        let model = metrics::figures(&calibrated, &labels);
        let figures: Vec<BaselineFigures> = baselines
            .iter()
            .map(|b| BaselineFigures {
                name: b.name.clone(),
                figures: metrics::figures(&b.scores, &labels),
            })
            .collect();
        let first = figures.first();
        let evaluation = Evaluation {
            signal: signal.into(),
            dataset: dataset.into(),
            split: Split::Test.as_str().into(),
            examples: labels.len(),
            positives: labels.iter().filter(|&&l| l).count(),
            auc: model.auc.unwrap_or(f64::NAN),
            baseline: first.map_or_else(String::new, |b| b.name.clone()),
            baseline_auc: first.and_then(|b| b.figures.auc).unwrap_or(f64::NAN),
            model: Some(model),
            uncalibrated: Some(metrics::figures(&raw, &labels)),
            baselines: figures,
        };
        SetResult { evaluation, labels, raw, calibrated, baselines }
    }
}

/// Raw scores of the labelled examples of a split: `scores[set][example]`, one per column.
type SplitScores = Vec<HashMap<usize, Vec<f32>>>;

/// Scores every labelled example of `split` once, shortest first so that batches pad little.
fn score_split(
    sets: &[DataSet],
    split: Split,
    scorer: &mut dyn Scorer,
) -> Result<SplitScores, BuildError> {
    let mut keys: Vec<(usize, usize)> = Vec::new();
    for (s, set) in sets.iter().enumerate() {
        let labelled =
            set.split(split).filter(|&i| set.examples[i].labels.iter().any(|l| l.is_some()));
        keys.extend(labelled.map(|i| (s, i)));
    }
    keys.sort_by_key(|&(s, i)| sets[s].tokens[i].len());
    let outputs = scorer.outputs();
    let mut scores: SplitScores = vec![HashMap::new(); sets.len()];
    let progress = bar(keys.len() as u64, split.as_str());
    for chunk in keys.chunks(BATCH) {
        let inputs: Vec<&[u32]> =
            chunk.iter().map(|&(s, i)| sets[s].tokens[i].as_slice()).collect();
        let flat = scorer.score(&inputs)?;
        for (&(s, i), row) in chunk.iter().zip(flat.chunks_exact(outputs)) {
            scores[s].insert(i, row.to_vec());
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(scores)
}

/// One Platt scaling per column, fitted on the validation examples of all data sets together,
/// as the heads were.
fn fit_calibration(
    sets: &[DataSet],
    signals: &[String],
    validation: &SplitScores,
) -> (Vec<Platt>, Vec<Fit>) {
    let mut calibration = Vec::with_capacity(signals.len());
    let mut fits = Vec::with_capacity(signals.len());
    for (column, name) in signals.iter().enumerate() {
        let index = catalog::head_signals().iter().position(|s| &s.name == name);
        let rows =
            index.map(|signal| labelled(sets, signal, Split::Validation)).unwrap_or_default();
        let raw: Vec<f32> = rows.iter().map(|&(s, i, _)| validation[s][&i][column]).collect();
        let labels: Vec<bool> = rows.iter().map(|r| r.2).collect();
        let (platt, fit) = calibrate::fit(name, &raw, &labels);
        tracing::info!(signal = %name, a = platt.a, b = platt.b, fit = ?fit,
            examples = rows.len(), "calibration fitted");
        calibration.push(platt);
        fits.push(fit);
    }
    (calibration, fits)
}

/// Name of the majority-class baseline.
pub const MAJORITY: &str = "majority class (training positive rate)";

/// The baselines' scores for `test` (rows of [`labelled`]), each fitted on the training
/// split: a logistic regression (on window counts, or on a hashed bag of tokens for
/// sentiment, whose one-review windows have constant counts), then the majority class.
fn baselines(
    sets: &[DataSet],
    signal: usize,
    test: &[(usize, usize, bool)],
) -> Vec<BaselineScores> {
    let train = labelled(sets, signal, Split::Train);
    let y: Vec<bool> = train.iter().map(|r| r.2).collect();
    let regression = if signal == catalog::SENTIMENT {
        bag_regression(sets, &train, &y, test)
    } else {
        count_regression(sets, &train, &y, test)
    };
    let majority =
        BaselineScores { name: MAJORITY.into(), scores: vec![majority_rate(&y); test.len()] };
    vec![regression, majority]
}

/// The positive rate of the training labels; 0.5 without any.
pub fn majority_rate(train: &[bool]) -> f32 {
    if train.is_empty() {
        return 0.5;
    }
    train.iter().filter(|&&l| l).count() as f32 / train.len() as f32
}

fn count_regression(
    sets: &[DataSet],
    train: &[(usize, usize, bool)],
    y: &[bool],
    test: &[(usize, usize, bool)],
) -> BaselineScores {
    let x: Vec<Vec<f32>> =
        train.iter().map(|&(s, i, _)| sets[s].examples[i].counts.clone()).collect();
    let fitted = linear::fit(&x, y, 1.0);
    let scores = test
        .iter()
        .map(|&(s, i, _)| fitted.as_ref().map_or(0.5, |m| m.predict(&sets[s].examples[i].counts)))
        .collect();
    BaselineScores { name: "logistic regression on window counts".into(), scores }
}

/// Hashed buckets of the bag-of-tokens baseline.
const BAG_DIMS: usize = 4096;

fn bag(tokens: &[u32]) -> Vec<(u32, f32)> {
    let mut counts: std::collections::BTreeMap<u32, f32> = std::collections::BTreeMap::new();
    for &t in tokens {
        *counts.entry(t.wrapping_mul(2_654_435_761) % BAG_DIMS as u32).or_default() += 1.0;
    }
    counts.into_iter().map(|(j, c)| (j, c.ln_1p())).collect()
}

fn bag_regression(
    sets: &[DataSet],
    train: &[(usize, usize, bool)],
    y: &[bool],
    test: &[(usize, usize, bool)],
) -> BaselineScores {
    let rows: Vec<Vec<(u32, f32)>> =
        train.iter().map(|&(s, i, _)| bag(&sets[s].tokens[i])).collect();
    let fitted = linear::fit_sparse(&rows, BAG_DIMS, y, 1.0, 5);
    let score = |s: usize, i: usize| match &fitted {
        None => 0.5,
        Some((w, b)) => {
            let logit: f32 = bag(&sets[s].tokens[i]).iter().map(|&(j, v)| w[j as usize] * v).sum();
            crate::model::heads::sigmoid(logit + b)
        }
    };
    let scores = test.iter().map(|&(s, i, _)| score(s, i)).collect();
    BaselineScores { name: "logistic regression on a hashed bag of tokens".into(), scores }
}

/// Where and how a report is written.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub dir: &'a Path,
    /// The command line, quoted in the report.
    pub command: &'a str,
}

/// For a model just written to `dir` with `card`: fits the Platt scaling on the validation
/// split, evaluates on the test split, stores both in `card` (which the caller saves), and
/// writes the report when asked.
pub fn calibrate_and_evaluate(
    dir: &Path,
    card: &mut ModelCard,
    sets: &[DataSet],
    threads: usize,
    report: Option<Destination<'_>>,
) -> Result<Outcome, BuildError> {
    let mut scorer = raw_scorer(dir, card, threads)?;
    let signals: Vec<String> = card.signals.iter().map(|s| s.name.clone()).collect();
    let outcome = run(sets, &signals, &mut scorer, None)?;
    card.calibration = outcome.calibration.clone();
    card.evaluation = outcome.evaluations();
    if let Some(to) = report {
        report::write(&report::Input::new(card, to.command, sets, &outcome), to.dir)?;
    }
    Ok(outcome)
}

/// `mindstream-train evaluate` could not finish.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Card(#[from] crate::model::card::CardError),
    #[error("cannot load the model's tokenizer")]
    Tokenizer(#[from] TokenizeError),
    #[error("cannot load the model")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Scores the model in `model_dir` on the data sets `options` describes (the same examples
/// `build` makes with these options), writes the report, and returns the outcome. The card
/// is not changed: without a calibration of its own, one is fitted for the report only.
pub fn evaluate_folder(
    model_dir: &Path,
    options: &BuildOptions,
    to: Destination<'_>,
) -> Result<Outcome, EvaluateError> {
    let card = ModelCard::load(&model_dir.join(crate::model::CARD_FILE))?;
    let tokenizer = crate::model::load_tokenizer(model_dir, &card)?;
    let options = BuildOptions { horizons: horizons_of(&card.signals), ..options.clone() };
    let mut sets = crate::train::build::load_data_sets(&options)?;
    crate::train::build::encode_sets(&mut sets, &tokenizer, card.max_tokens)?;
    let mut scorer = raw_scorer(model_dir, &card, options.threads)?;
    let signals: Vec<String> = card.signals.iter().map(|s| s.name.clone()).collect();
    let given = (!card.calibration.is_empty()).then_some(card.calibration.as_slice());
    let mut outcome = run(&sets, &signals, &mut scorer, given)?;
    if given.is_none() {
        outcome.source = CalibrationSource::FittedForReport;
    }
    let input = report::Input::new(&card, to.command, &sets, &outcome);
    report::write(&input, to.dir)?;
    Ok(outcome)
}

/// The label horizons the card's signals were trained with (the defaults where it names
/// none), so that the examples are labelled as the build labelled them.
fn horizons_of(signals: &[SignalSpec]) -> Horizons {
    let read = |name: &str| {
        let text = signals.iter().find(|s| s.name == name)?.horizon.as_deref()?;
        let duration = humantime::parse_duration(text).ok()?;
        i64::try_from(duration.as_millis()).ok().filter(|&ms| ms > 0)
    };
    let defaults = Horizons::default();
    Horizons {
        click_ms: read("purchase_intent").unwrap_or(defaults.click_ms),
        churn_ms: read("churn_risk").unwrap_or(defaults.churn_ms),
        price_ms: read("price_sensitivity").unwrap_or(defaults.price_ms),
    }
}

/// A scorer over the model in `dir` that serves the heads' raw outputs, whatever
/// calibration the card holds.
pub fn raw_scorer(dir: &Path, card: &ModelCard, threads: usize) -> Result<OrtScorer, ModelError> {
    let mut raw = card.clone();
    raw.calibration.clear();
    let config = crate::config::ModelConfig {
        dir: PathBuf::from(dir),
        intra_threads: threads,
        ..crate::config::ModelConfig::default()
    };
    OrtScorer::load(dir, &raw, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evaluation labels with the horizons the card's signals name.
    #[test]
    fn horizons_come_from_the_card() {
        let trained = Horizons { click_ms: 7_200_000, churn_ms: 30 * 86_400_000, price_ms: 90_000 };
        assert_eq!(horizons_of(&catalog::head_signals_for(&trained)), trained);
        let mut unnamed = catalog::head_signals();
        unnamed.iter_mut().for_each(|s| s.horizon = None);
        assert_eq!(horizons_of(&unnamed), Horizons::default());
    }

    #[test]
    fn majority_baseline_scores_the_training_rate() {
        assert_eq!(majority_rate(&[true, false, false, false]), 0.25);
        assert_eq!(majority_rate(&[]), 0.5);
        // Constant scores rank nothing and are right on the majority class only.
        let labels = [false, false, true, false];
        let figures = metrics::figures(&[0.25; 4], &labels);
        assert_eq!(figures.auc, Some(0.5));
        assert_eq!(figures.accuracy, 0.75);
    }
}
