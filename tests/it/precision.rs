//! The float16 variant, IO binding and prefix reuse through the real binaries:
//! `mindstream-train fp16` writes the variant of the shipped model, and `mindstream score`
//! serves it with `model.io_binding`; the shipped model's prefix graph serves the scores and
//! explanations of scoring every variant whole.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mindstream::signals::SignalRecord;

use crate::support;

/// Largest served-score difference accepted between the float16 variant and the shipped model
/// (as in the library's test: below the smallest calibration error the card reports).
const FP16_TOLERANCE: f32 = 2e-3;

fn train() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mindstream-train"));
    command.current_dir(support::root());
    command
}

/// `mindstream score` over `input` with the model in `dir`, IO binding on or off.
fn score(input: &Path, dir: &Path, io_binding: bool, output: &Path) -> Vec<SignalRecord> {
    score_with(input, dir, &[("MINDSTREAM__MODEL__IO_BINDING", &io_binding.to_string())], output).0
}

/// `mindstream score` over `input` with the model in `dir` and `settings` in the environment;
/// returns the records and the standard error.
fn score_with(
    input: &Path,
    dir: &Path,
    settings: &[(&str, &str)],
    output: &Path,
) -> (Vec<SignalRecord>, String) {
    let mut command = support::mindstream();
    command.env("MINDSTREAM__MODEL__DIR", dir);
    command.envs(settings.iter().copied());
    command.arg("score").arg("--input").arg(input).arg("--output").arg(output);
    let result = support::run_with_limit(command, Duration::from_secs(240));
    support::assert_success(&result, "score");
    let text = std::fs::read_to_string(output).unwrap();
    let records = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (records, String::from_utf8_lossy(&result.stderr).into_owned())
}

fn import(source: &str, input: &Path, limit: usize, output: &Path) {
    let mut import = train();
    import.args(["import", "--source", source, "--limit", &limit.to_string(), "--input"]);
    import.arg(input).arg("--output").arg(output);
    support::assert_success(&support::run_with_limit(import, Duration::from_secs(120)), "import");
}

/// The scores of each record and the explanation deltas of the events both name, paired with
/// `other`'s; panics where the records differ in anything else that scoring decides (user,
/// window, which signals).
fn paired_values(records: &[SignalRecord], other: &[SignalRecord]) -> Vec<(f32, f32)> {
    assert_eq!(records.len(), other.len());
    let mut pairs = Vec::new();
    for (a, b) in records.iter().zip(other) {
        assert_eq!(
            (&a.user_key, a.version, a.event_count),
            (&b.user_key, b.version, b.event_count)
        );
        assert_eq!(a.scores.len(), b.scores.len(), "{} signals", a.user_key);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert_eq!(x.signal, y.signal);
            pairs.push((x.value, y.value));
            for p in &x.top_events {
                if let Some(q) = y.top_events.iter().find(|q| q.event_id == p.event_id) {
                    pairs.push((p.delta, q.delta));
                }
            }
        }
    }
    pairs
}

/// Largest difference within each pair.
fn largest(pairs: &[(f32, f32)]) -> f32 {
    pairs.iter().map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// IO binding serves the plain run's records (to within the float noise of batches that
/// formed differently: the workers cut batches by time as well as size); the float16 variant
/// serves the same records with scores within [`FP16_TOLERANCE`], explanation deltas (each a
/// difference of two scores) within twice that, and its own model version.
#[test]
fn fp16_variant_and_io_binding_serve_the_shipped_scores() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let cdnow = support::sample_data().join("purchases/cdnow-master.txt");
    import("cdnow", &cdnow, 10_000, &events);

    let half = dir.path().join("fp16");
    let mut convert = train();
    convert.args(["fp16", "--model", "models", "--out"]).arg(&half);
    let converted = support::run_with_limit(convert, Duration::from_secs(120));
    support::assert_success(&converted, "fp16");
    let stdout = String::from_utf8_lossy(&converted.stdout);
    assert!(stdout.contains("-fp16 written to"), "{stdout}");

    let shipped = support::root().join("models");
    let plain = score(&events, &shipped, false, &dir.path().join("plain.jsonl"));
    let bound = score(&events, &shipped, true, &dir.path().join("bound.jsonl"));
    let halved = score(&events, &half, true, &dir.path().join("fp16.jsonl"));
    assert!(plain.len() > 1_000, "{} records", plain.len());
    assert!(halved.iter().all(|r| r.model_version.ends_with("-fp16")));

    let bound_largest = largest(&paired_values(&plain, &bound));
    assert!(bound_largest < 1e-4, "io binding changed a value by {bound_largest}");
    let half_largest = largest(&paired_values(&plain, &halved));
    assert!(half_largest <= 2.0 * FP16_TOLERANCE, "float16 changed a value by {half_largest}");
    let scores: Vec<(f32, f32)> = plain
        .iter()
        .zip(&halved)
        .flat_map(|(a, b)| a.scores.iter().zip(&b.scores).map(|(x, y)| (x.value, y.value)))
        .collect();
    let score_largest = largest(&scores);
    assert!(score_largest <= FP16_TOLERANCE, "float16 changed a score by {score_largest}");
    println!(
        "io binding {bound_largest:e}; float16 scores {score_largest:e}, all {half_largest:e}"
    );
}

/// The shipped model's prefix graph serves what scoring every leave-one-out variant whole
/// serves: the same records, scores and explanation deltas within 1e-5, and the same
/// explanations up to the order of events whose deltas tie. Real CDNOW purchase histories.
#[test]
fn prefix_reuse_serves_the_whole_sequence_scores_and_explanations() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let cdnow = support::sample_data().join("purchases/cdnow-master.txt");
    import("cdnow", &cdnow, 10_000, &events);
    let shipped = support::root().join("models");

    let off = [("MINDSTREAM__MODEL__PREFIX_REUSE", "false")];
    let (whole, whole_log) = score_with(&events, &shipped, &off, &dir.path().join("whole.jsonl"));
    let on = [("MINDSTREAM__MODEL__PREFIX_REUSE", "true")];
    let (reused, reused_log) = score_with(&events, &shipped, &on, &dir.path().join("reused.jsonl"));
    assert!(whole_log.contains("prefix_reuse=false"), "{whole_log}");
    assert!(reused_log.contains("prefix_reuse=true"), "{reused_log}");
    assert!(whole.len() > 1_000, "{} records", whole.len());
    // A variant has tokens after its left-out event unless that event is the newest.
    let long = whole.iter().filter(|r| r.event_count >= 3).count();
    assert!(long > 100, "only {long} windows have three events or more");

    let difference = largest(&paired_values(&whole, &reused));
    assert!(difference < 1e-5, "prefix reuse changed a value by {difference}");
    for (a, b) in whole.iter().zip(&reused) {
        for (x, y) in a.scores.iter().zip(&b.scores) {
            let deltas = |s: &mindstream::signals::Score| -> Vec<f32> {
                s.top_events.iter().map(|e| e.delta.abs()).collect()
            };
            let (p, q) = (deltas(x), deltas(y));
            assert_eq!(p.len(), q.len(), "{} {}: {p:?} against {q:?}", a.user_key, x.signal);
            let apart = p.iter().zip(&q).map(|(u, v)| (u - v).abs()).fold(0.0, f32::max);
            assert!(apart < 1e-5, "{} {}: named {p:?}, then {q:?}", a.user_key, x.signal);
        }
    }
    println!("prefix reuse: {} records, largest difference {difference:e}", whole.len());
}
