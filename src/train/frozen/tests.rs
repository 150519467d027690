//! The frozen-backbone path on a graph with a Hugging Face export's interface: inputs
//! `input_ids`, `attention_mask` and `position_ids`, output `last_hidden_state` only.

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::*;
use crate::model::card::HeadWeights;
use crate::model::scorer::{pad_batch, OrtScorer, Scorer};
use crate::train::export::{export_onnx_with, ExportMeta, Positions};
use crate::train::gpt2::testing::{max_abs_diff, tiny_config};
use crate::train::gpt2::{pool, Gpt2, Heads};

/// Rows of different lengths, one of a single token, ids within the tiny vocabulary.
fn rows() -> Vec<Vec<u32>> {
    [9usize, 1, 33, 20, 64, 2]
        .iter()
        .enumerate()
        .map(|(r, &len)| (0..len).map(|t| ((r * 53 + t * 29 + 1) % 300) as u32).collect())
        .collect()
}

/// candle's pooled features of `rows`, one batch, row-major `[rows, 2 * n_embd]`.
fn candle_pooled(model: &Gpt2, rows: &[Vec<u32>]) -> Vec<f32> {
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (seq, ids, mask, _) = pad_batch(&refs);
    let ids = Tensor::from_vec(ids, (rows.len(), seq), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (rows.len(), seq), &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(&ids, &mask).unwrap().detach();
    pool(&hidden, &mask).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn card_over(dir: &Path, heads: HeadWeights, config: &Gpt2Config) -> ModelCard {
    let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
    let mut signals = catalog::head_signals();
    signals.truncate(heads.bias.len());
    ModelCard {
        card_version: CARD_VERSION,
        model_version: "frozen-test".into(),
        description: String::new(),
        onnx_file: "model.onnx".into(),
        onnx_sha256: hex::encode(Sha256::digest(&bytes)),
        precision: crate::model::card::Precision::Fp32,
        tokenizer_file: String::new(),
        render_version: crate::render::RENDER_VERSION,
        max_tokens: config.n_positions,
        window: crate::window::WindowSpec::default(),
        user_ttl_ms: 86_400_000,
        signals,
        derived: Vec::new(),
        heads: Some(heads),
        prefix_graph: None,
        calibration: Vec::new(),
        backbone: config.card_backbone(),
        training: None,
        evaluation: Vec::new(),
    }
}

#[test]
fn hugging_face_style_backbone_gives_candle_features_and_scores() {
    let config = tiny_config();
    let model = Gpt2::new_random(config.clone(), &Device::Cpu, 21).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("model.onnx");
    let meta = ExportMeta { model_version: "backbone".into(), signals: Vec::new() };
    export_onnx_with(&model, None, &onnx, &meta, Positions::Input).unwrap();

    let mut backbone = features::Backbone::open(&onnx, 1).unwrap();
    assert!(backbone.takes_position_ids(), "the graph must declare position_ids");
    assert_eq!(backbone.outputs(), ["last_hidden_state".to_string()]);
    assert_eq!(backbone.declared_width(), Some(config.n_embd));

    let rows = rows();
    // Batches of two, formed by length, so rows meet different padding than in candle's one
    // batch: padding must not change a row's features.
    let ort = backbone.pooled(&rows, 2, &indicatif::ProgressBar::hidden()).unwrap();
    let ort: Vec<f32> = ort.into_iter().flatten().collect();
    let candle = candle_pooled(&model, &rows);
    let feature_diff = max_abs_diff(&ort, &candle);
    println!("pooled features: onnx vs candle {feature_diff:e}");
    assert!(feature_diff <= 1e-4, "pooled features differ by {feature_diff}");

    let random = Heads::new_random(3, config.pooled_dim(), 8).unwrap();
    let wide: Vec<f32> = random.weight().iter().map(|w| w * 40.0).collect();
    let heads = Heads::new(config.pooled_dim(), wide, vec![0.1, -0.4, 0.7]).unwrap();
    let card = card_over(dir.path(), HeadWeights::from(&heads), &config);
    let model_config = crate::config::ModelConfig {
        dir: dir.path().to_path_buf(),
        intra_threads: 1,
        ..crate::config::ModelConfig::default()
    };
    let mut scorer = OrtScorer::load(dir.path(), &card, &model_config).unwrap();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let served = scorer.score(&refs).unwrap();
    let pooled = Tensor::from_vec(candle, (rows.len(), config.pooled_dim()), &Device::Cpu);
    let expected = heads.apply(&pooled.unwrap()).unwrap().flatten_all().unwrap();
    let score_diff = max_abs_diff(&served, &expected.to_vec1::<f32>().unwrap());
    println!("card heads over the graph: scorer vs candle {score_diff:e}");
    assert!(score_diff <= 1e-4, "scores differ by {score_diff}");
    let spread = served.iter().fold(0.0f32, |m, s| m.max((s - 0.5).abs()));
    assert!(spread > 0.05, "scores all near 0.5 ({spread}): the comparison would be weak");
}
