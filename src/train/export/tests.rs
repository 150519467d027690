//! Tests of the export: the graph run by ONNX Runtime against the candle model and the
//! processor's plain-Rust pooling, and the checks that refuse metadata that does not fit.

use candle_core::{Device, Tensor};
use ort::value::Tensor as OrtTensor;

use super::*;
use crate::model::card::HeadWeights;
use crate::model::{heads as processor, runtime};
use crate::train::gpt2::pool;
use crate::train::gpt2::testing::{max_abs_diff, tiny_config};

const SIGNALS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

/// Right-padded rows of the given lengths with pseudo-random ids; the padding holds ids
/// too, so a graph that ignored the mask would give different answers.
fn padded_batch(lengths: &[usize], seq: usize) -> (Vec<i64>, Vec<i64>) {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (r, &len) in lengths.iter().enumerate() {
        for t in 0..seq {
            ids.push(((r * 131 + t * 17 + 7) % 300) as i64);
            mask.push(i64::from(t < len));
        }
    }
    (ids, mask)
}

struct OrtOutputs {
    hidden: Vec<f32>,
    scores: Vec<f32>,
    model_version: Option<String>,
    signals: Option<String>,
}

fn run_ort(path: &Path, ids: &[i64], mask: &[i64], batch: usize, seq: usize) -> OrtOutputs {
    let library = runtime::locate_library(None).unwrap_or_else(|e| {
        panic!("ONNX Runtime is needed for this test ({e}); run scripts/setup.sh")
    });
    let env = runtime::environment(&library).expect("load ONNX Runtime");
    let mut session = runtime::cpu_session(env, path, 1).expect("open the exported model");
    let metadata = session.metadata().unwrap();
    let model_version = metadata.custom(META_MODEL_VERSION);
    let signals = metadata.custom(META_SIGNALS);
    drop(metadata);

    let shape = vec![batch as i64, seq as i64];
    let inputs = ort::inputs![
        "input_ids" => OrtTensor::from_array((shape.clone(), ids.to_vec())).unwrap(),
        "attention_mask" => OrtTensor::from_array((shape, mask.to_vec())).unwrap(),
    ];
    let outputs = session.run(inputs).unwrap();
    let hidden = outputs["last_hidden_state"].try_extract_array::<f32>().unwrap();
    let scores = outputs["scores"].try_extract_array::<f32>().unwrap();
    assert_eq!(hidden.shape(), &[batch, seq, 32]);
    assert_eq!(scores.shape(), &[batch, SIGNALS.len()]);
    OrtOutputs {
        hidden: hidden.iter().copied().collect(),
        scores: scores.iter().copied().collect(),
        model_version,
        signals,
    }
}

/// Hidden states at real positions only, row-major.
fn real_positions(hidden: &[f32], mask: &[i64], n_embd: usize) -> Vec<f32> {
    hidden
        .chunks_exact(n_embd)
        .zip(mask)
        .filter(|(_, &m)| m == 1)
        .flat_map(|(h, _)| h.iter().copied())
        .collect()
}

#[test]
fn onnx_graph_matches_candle_on_a_padded_batch() {
    let device = Device::Cpu;
    let config = tiny_config();
    let model = Gpt2::new_random(config.clone(), &device, 7).unwrap();
    let heads = Heads::new_random(SIGNALS.len(), config.pooled_dim(), 11).unwrap();
    // Random heads near zero would make every score about 0.5; widen them so a wrong pooling
    // shows up in the scores.
    let wide: Vec<f32> = heads.weight().iter().map(|w| w * 50.0).collect();
    let bias: Vec<f32> = (0..SIGNALS.len()).map(|i| i as f32 * 0.3 - 0.8).collect();
    let heads = Heads::new(config.pooled_dim(), wide, bias).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let meta = ExportMeta {
        model_version: "test-1".into(),
        signals: SIGNALS.iter().map(|s| s.to_string()).collect(),
    };
    export_onnx(&model, Some(&heads), &path, &meta).unwrap();

    // A full-length batch with rows of length 1 and 0, then a shorter sequence.
    compare_with_candle(&model, &heads, &path, &[1, 64, 17, 40, 0], 64);
    compare_with_candle(&model, &heads, &path, &[23, 5], 23);
}

fn compare_with_candle(model: &Gpt2, heads: &Heads, path: &Path, lengths: &[usize], seq: usize) {
    let device = Device::Cpu;
    let batch = lengths.len();
    let (ids, mask) = padded_batch(lengths, seq);
    let ort = run_ort(path, &ids, &mask, batch, seq);
    assert_eq!(ort.model_version.as_deref(), Some("test-1"));
    assert_eq!(ort.signals.as_deref(), Some("a,b,c,d,e,f"));

    let ids_t = Tensor::from_vec(ids.clone(), (batch, seq), &device).unwrap();
    let mask_t = Tensor::from_vec(mask.clone(), (batch, seq), &device).unwrap();
    let hidden = model.forward_hidden(&ids_t, &mask_t).unwrap();
    let scores = heads.apply(&pool(&hidden, &mask_t).unwrap()).unwrap();
    let hidden: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
    let scores: Vec<f32> = scores.flatten_all().unwrap().to_vec1().unwrap();

    assert!(ort.hidden.iter().all(|h| h.is_finite()), "padded rows must stay finite");
    let hidden_diff =
        max_abs_diff(&real_positions(&hidden, &mask, 32), &real_positions(&ort.hidden, &mask, 32));
    // Both sides add the same bias, so even padded positions agree; asserting it catches a
    // graph that drops the key-padding term, which real positions alone cannot show.
    let all_diff = max_abs_diff(&hidden, &ort.hidden);
    let scores_diff = max_abs_diff(&scores, &ort.scores);
    let rust_diff = processor_diff(&ort, heads, &mask, lengths, seq);
    println!(
        "batch {batch} x {seq}: max abs diff hidden {hidden_diff:e} (all positions \
         {all_diff:e}), scores {scores_diff:e}, processor pooling + heads {rust_diff:e}"
    );
    assert!(all_diff <= 1e-4, "padded positions differ by {all_diff}");
    assert!(hidden_diff <= 1e-4, "last_hidden_state differs by {hidden_diff}");
    assert!(scores_diff <= 1e-4, "scores differ by {scores_diff}");
    assert!(rust_diff <= 1e-4, "model::heads pool + apply differ from the graph by {rust_diff}");

    let spread = ort.scores.iter().fold(0.0f32, |m, s| m.max((s - 0.5).abs()));
    assert!(spread > 0.05, "scores all near 0.5 ({spread}): the comparison would be weak");
}

/// Largest difference between the graph's `scores` and the processor's plain-Rust pooling and
/// heads over the graph's `last_hidden_state`, on the rows with at least one real token: for a
/// row with none the processor pools to zeros where the graph pools the state at index 0.
fn processor_diff(
    ort: &OrtOutputs,
    heads: &Heads,
    mask: &[i64],
    lengths: &[usize],
    seq: usize,
) -> f32 {
    let batch = lengths.len();
    let pooled = processor::pool(&ort.hidden, batch, seq, 32, mask);
    let scores = processor::apply(&HeadWeights::from(heads), &pooled, batch);
    let with_tokens = |scores: &[f32]| -> Vec<f32> {
        let rows = scores.chunks_exact(heads.k()).zip(lengths);
        rows.filter(|(_, &len)| len > 0).flat_map(|(row, _)| row.iter().copied()).collect()
    };
    max_abs_diff(&with_tokens(&scores), &with_tokens(&ort.scores))
}

#[test]
fn export_rejects_signal_names_that_do_not_fit_the_heads() {
    let model = Gpt2::new_random(tiny_config(), &Device::Cpu, 1).unwrap();
    let heads = Heads::new_random(2, 64, 1).unwrap();
    let one = ExportMeta { model_version: "v".into(), signals: vec!["x".into()] };
    let err = build_model(&model, Some(&heads), &one).unwrap_err();
    assert!(matches!(err, ExportError::SignalCount { signals: 1, heads: 2 }), "{err}");

    let comma = ExportMeta { model_version: "v".into(), signals: vec!["x,y".into()] };
    let err = build_model(&model, None, &comma).unwrap_err();
    assert!(matches!(err, ExportError::SignalName { .. }), "{err}");

    let narrow = Heads::new_random(1, 32, 1).unwrap();
    let meta = ExportMeta { model_version: "v".into(), signals: vec!["x".into()] };
    let err = build_model(&model, Some(&narrow), &meta).unwrap_err();
    assert!(matches!(err, ExportError::HeadsWidth { expected: 64, found: 32 }), "{err}");
}
