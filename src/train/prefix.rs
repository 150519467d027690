//! The prefix graph of a model folder: `mindstream-train prefix`, and the last step of `build`.
//!
//! It receives a finished float32 model folder whose graph this project exported (card, ONNX
//! graph with the heads inside, tokenizer), such as the shipped `models/` whose training
//! checkpoint is not shipped. It reads the weights back from the graph's initializers, writes
//! [`export_prefix_onnx`]'s graph over them next to the model as [`PREFIX_FILE`], and adds to
//! the card the file with its SHA-256 and the head weights the processor applies to that
//! graph's hidden states. The model graph, its version and its calibration are unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{Message, ModelProto, TensorProto};
use sha2::{Digest, Sha256};

use crate::model::card::{CardError, GraphFile, HeadWeights, ModelCard, Precision};
use crate::model::CARD_FILE;
use crate::train::export::{export_prefix_onnx, ExportError, ExportMeta};
use crate::train::gpt2::{Gpt2, Gpt2Config};

/// File name of the prefix graph inside a model folder.
pub const PREFIX_FILE: &str = "model.prefix.onnx";

/// Names of the head initializers in an exported graph.
const HEAD_WEIGHT: &str = "heads.weight";
const HEAD_BIAS: &str = "heads.bias";

#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("{path} is a float16 model; write the prefix graph from its float32 folder")]
    Half { path: PathBuf },
    #[error("{path} has SHA-256 {actual}, its card says {expected}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model")]
    Parse {
        path: PathBuf,
        #[source]
        source: protobuf::Error,
    },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the prefix graph of the model folder `dir` and updates its card; returns the card.
pub fn prefix_folder(dir: &Path) -> Result<ModelCard, PrefixError> {
    let card_path = dir.join(CARD_FILE);
    let mut card = ModelCard::load(&card_path)?;
    let path = dir.join(&card.onnx_file);
    if card.precision == Precision::Fp16 {
        return Err(PrefixError::Half { path: dir.into() });
    }
    let bytes =
        std::fs::read(&path).map_err(|source| PrefixError::Read { path: path.clone(), source })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != card.onnx_sha256 {
        let expected = card.onnx_sha256.clone();
        return Err(PrefixError::Checksum { path, expected, actual });
    }
    let graph = ModelProto::parse_from_bytes(&bytes)
        .map_err(|source| PrefixError::Parse { path: path.clone(), source })?;
    let weights = |message: String| PrefixError::Weights { path: path.clone(), message };

    let initializers: HashMap<&str, &TensorProto> =
        graph.graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut tensors = HashMap::new();
    for (name, proto) in &initializers {
        if proto.data_type == DataType::FLOAT as i32 {
            let dims: Vec<usize> = proto.dims.iter().map(|&d| d as usize).collect();
            let tensor = Tensor::from_vec(floats(proto).map_err(&weights)?, dims, &Device::Cpu)
                .map_err(|e| weights(format!("initializer {name}: {e}")))?;
            tensors.insert(*name, tensor);
        }
    }
    let config = Gpt2Config {
        vocab_size: card.backbone.vocab_size,
        n_positions: card.backbone.n_positions,
        n_embd: card.backbone.n_embd,
        n_layer: card.backbone.n_layer,
        n_head: card.backbone.n_head,
        layer_norm_epsilon: layer_norm_epsilon(&graph).ok_or_else(|| {
            weights("no LayerNormalization node gives the layer-norm epsilon".into())
        })?,
    };
    let named: HashMap<&str, &Tensor> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let model = Gpt2::from_named(config, &Device::Cpu, &named, &path)
        .map_err(|e| weights(e.to_string()))?;

    let heads = match card.heads.clone() {
        Some(heads) => heads,
        None => head_weights(&initializers, card.signals.len(), 2 * card.backbone.n_embd)
            .map_err(&weights)?,
    };
    let prefix_path = dir.join(PREFIX_FILE);
    let meta = ExportMeta { model_version: card.model_version.clone(), signals: Vec::new() };
    export_prefix_onnx(&model, &prefix_path, &meta)?;
    let written = std::fs::read(&prefix_path)
        .map_err(|source| PrefixError::Read { path: prefix_path.clone(), source })?;

    card.heads = Some(heads);
    card.prefix_graph = Some(GraphFile {
        onnx_file: PREFIX_FILE.into(),
        onnx_sha256: hex::encode(Sha256::digest(&written)),
    });
    card.save(&card_path).map_err(|source| PrefixError::Write { path: card_path, source })?;
    Ok(card)
}

/// The values of a float initializer, from `raw_data` (little-endian) or `float_data`.
fn floats(proto: &TensorProto) -> Result<Vec<f32>, String> {
    if proto.raw_data.is_empty() {
        return Ok(proto.float_data.clone());
    }
    if !proto.raw_data.len().is_multiple_of(4) {
        return Err(format!("initializer {} has a partial float", proto.name));
    }
    Ok(proto
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The `epsilon` of the graph's first `LayerNormalization` (every layer norm shares it).
fn layer_norm_epsilon(graph: &ModelProto) -> Option<f64> {
    let node = graph.graph.node.iter().find(|n| n.op_type == "LayerNormalization")?;
    let epsilon = node.attribute.iter().find(|a| a.name == "epsilon")?;
    Some(f64::from(epsilon.f))
}

/// The heads of a graph that has them inside, as `[signals][width]` rows and biases.
fn head_weights(
    initializers: &HashMap<&str, &TensorProto>,
    signals: usize,
    width: usize,
) -> Result<HeadWeights, String> {
    let read = |name: &str, len: usize| {
        let proto = initializers
            .get(name)
            .ok_or_else(|| format!("no `{name}` initializer and no head weights in the card"))?;
        let values = floats(proto)?;
        if values.len() != len {
            return Err(format!("`{name}` has {} values, expected {len}", values.len()));
        }
        Ok(values)
    };
    let weight = read(HEAD_WEIGHT, signals * width)?;
    let bias = read(HEAD_BIAS, signals)?;
    Ok(HeadWeights { weight: weight.chunks_exact(width).map(<[f32]>::to_vec).collect(), bias })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::card::{Backbone, CARD_VERSION};
    use crate::model::prefix::{PrefixScorer, Variant};
    use crate::model::scorer::{ModelError, OrtScorer, Scorer};
    use crate::train::export::export_onnx;
    use crate::train::gpt2::testing::{tiny_config, tiny_model};
    use crate::train::gpt2::Heads;

    /// A model folder with a tiny random model whose heads are inside its graph.
    fn folder(dir: &Path) -> Heads {
        let model = tiny_model(11);
        let heads = Heads::new_random(3, 64, 5).unwrap();
        let mut signals = crate::train::catalog::head_signals();
        signals.truncate(3);
        let names = signals.iter().map(|s| s.name.clone()).collect();
        let meta = ExportMeta { model_version: "tiny".into(), signals: names };
        let onnx = dir.join("model.onnx");
        export_onnx(&model, Some(&heads), &onnx, &meta).unwrap();
        let config = tiny_config();
        let card = ModelCard {
            card_version: CARD_VERSION,
            model_version: "tiny".into(),
            description: String::new(),
            onnx_file: "model.onnx".into(),
            onnx_sha256: hex::encode(Sha256::digest(std::fs::read(&onnx).unwrap())),
            precision: Precision::Fp32,
            tokenizer_file: String::new(),
            render_version: crate::render::RENDER_VERSION,
            max_tokens: 64,
            window: crate::window::WindowSpec::default(),
            user_ttl_ms: 86_400_000,
            signals,
            derived: Vec::new(),
            heads: None,
            prefix_graph: None,
            calibration: Vec::new(),
            backbone: Backbone {
                architecture: "gpt2".into(),
                vocab_size: config.vocab_size,
                n_positions: config.n_positions,
                n_embd: config.n_embd,
                n_layer: config.n_layer,
                n_head: config.n_head,
                parameters: 0,
            },
            training: None,
            evaluation: Vec::new(),
        };
        card.save(&dir.join(CARD_FILE)).unwrap();
        heads
    }

    fn tokens(seed: usize, len: usize) -> Vec<u32> {
        (0..len).map(|t| ((seed * 97 + t * 31 + 5) % 300) as u32).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The prefix graph, read back from the model graph's weights, scores windows and
    /// leave-one-out variants (cut anywhere, the last event included, mixed in one batch) as
    /// the model graph scores the same sequences whole.
    #[test]
    fn variants_from_cached_prefixes_score_as_whole_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let heads = folder(dir.path());
        let card = prefix_folder(dir.path()).unwrap();
        let written = card.heads.clone().unwrap();
        let flat: Vec<f32> = written.weight.iter().flatten().copied().collect();
        assert_eq!(flat, heads.weight(), "head weights read back from the graph");
        assert_eq!(written.bias, heads.bias());

        let whole_config = ModelConfig { prefix_reuse: false, ..ModelConfig::default() };
        let mut whole = OrtScorer::load(dir.path(), &card, &whole_config).unwrap();
        assert!(whole.prefix().is_none(), "prefix_reuse = false loads no prefix graph");
        let mut reuse = PrefixScorer::load(dir.path(), &card, &ModelConfig::default())
            .unwrap()
            .expect("the card has a prefix graph");

        let windows: Vec<Vec<u32>> =
            [9, 23, 4, 40].iter().enumerate().map(|(s, &n)| tokens(s, n)).collect();
        let refs: Vec<&[u32]> = windows.iter().map(Vec::as_slice).collect();
        let keep = [Some(9), Some(20), None, Some(40)];
        let (scores, prefixes) = reuse.score_windows(&refs, &keep).unwrap();
        let diff = max_diff(&scores, &whole.score(&refs).unwrap());
        assert!(diff < 1e-5, "windows differ by {diff}");
        assert!(prefixes[2].is_none());
        assert_eq!(prefixes[1].as_ref().unwrap().len(), 20);

        // (window, cut start, cut end): inside, at the start, and the last tokens.
        let cuts =
            [(0, 3, 6), (0, 5, 9), (1, 2, 5), (1, 20, 23), (3, 12, 30), (3, 1, 2), (3, 38, 40)];
        let variants: Vec<Variant<'_>> = cuts
            .iter()
            .map(|&(w, start, end)| Variant {
                prefix: prefixes[w].as_ref().unwrap(),
                start,
                suffix: &windows[w][end..],
            })
            .collect();
        let sequences: Vec<Vec<u32>> = cuts
            .iter()
            .map(|&(w, start, end)| [&windows[w][..start], &windows[w][end..]].concat())
            .collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let want = whole.score(&refs).unwrap();
        let got = reuse.score_variants(&variants).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-5, "variants differ from whole scoring by {diff}");
        // Leaving out different tokens changes the scores, so the comparison above can fail.
        assert!(max_diff(&got[..3], &got[3..6]) > 1e-4, "{got:?}");

        let beyond = [Variant { prefix: prefixes[0].as_ref().unwrap(), start: 10, suffix: &[] }];
        let err = reuse.score_variants(&beyond).err().unwrap();
        assert!(matches!(err, ModelError::Contract(_)), "{err}");
    }

    /// A card whose prefix graph does not match its SHA-256, or that lacks head weights, is
    /// refused; a float16 folder is refused by name.
    #[test]
    fn mismatched_prefix_graphs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        folder(dir.path());
        let mut card = prefix_folder(dir.path()).unwrap();
        let config = ModelConfig::default();
        let mut graph = card.prefix_graph.clone().unwrap();
        graph.onnx_sha256 = "0".repeat(64);
        card.prefix_graph = Some(graph);
        let err = PrefixScorer::load(dir.path(), &card, &config).err().unwrap();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");

        card.heads = None;
        let path = dir.path().join(CARD_FILE);
        card.save(&path).unwrap();
        let err = ModelCard::load(&path).err().unwrap();
        assert!(err.to_string().contains("head weights"), "{err}");

        card.prefix_graph = None;
        card.precision = Precision::Fp16;
        card.save(&path).unwrap();
        let err = prefix_folder(dir.path()).err().unwrap();
        assert!(matches!(err, PrefixError::Half { .. }), "{err}");
    }
}
