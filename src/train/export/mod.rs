//! ONNX export of a trained [`Gpt2`] and, optionally, its signal [`Heads`].
//!
//! This module owns the ONNX graph the processor runs. It receives a model, its heads and the
//! metadata of the model card; it hands on one self-contained `.onnx` file (opset 17, IR
//! version 8, weights as raw little-endian f32 initializers) that implements the model contract
//! of [`super::gpt2`] exactly:
//!
//! - inputs `input_ids` and `attention_mask`, int64 `[batch, seq]`, both dimensions symbolic;
//! - positions computed inside the graph as `max(cumsum(attention_mask) - 1, 0)`, so the graph
//!   takes no `position_ids`; or, with [`Positions::Input`], a third input `position_ids`
//!   (int64 `[batch, seq]`) read as given, the interface of a Hugging Face GPT-2 export;
//! - causal and padded-key masking by adding [`MASK_BIAS`](super::gpt2::MASK_BIAS) per reason,
//!   as the candle model does;
//! - output `last_hidden_state`, float `[batch, seq, n_embd]`, after `ln_f`;
//! - with heads, output `scores`, float `[batch, K]`: `concat(h_last, h_mean)` pooling and
//!   `sigmoid(pooled · weightᵀ + bias)`, all inside the graph.
//!
//! [`export_prefix_onnx`] writes a second graph over the same weights for scoring that reuses a
//! cached prefix: inputs `input_ids` and `position_ids` (`[batch, seq]`), `attention_mask`
//! (`[batch, past_seq + seq]`) and per layer `past_key_values.{layer}.key|value` (`[batch,
//! n_head, past_seq, head_dim]`); outputs `last_hidden_state` of the new tokens and per layer
//! `present.{layer}.key|value` over all `past_seq + seq` positions, as Hugging Face's GPT-2
//! exports with past name them. With `past_seq = 0` it scores whole sequences.
//!
//! Layer norm is ONNX `LayerNormalization` (opset 17); GELU is composed from `Mul`, `Add`
//! and `Tanh` in its tanh form, as GPT-2's `gelu_new` is.
//!
//! A protobuf message cannot exceed 2 GiB, so a model whose weights do not fit in one file
//! under that bound (larger than about 500M parameters) is refused rather than written with
//! external data; every model this project trains on a CPU is far below it.
//!
//! # Layout
//!
//! This file holds the entry points, the metadata and the errors; `graph` the builder that
//! names values and collects nodes and initializers; `blocks` the embedding and transformer
//! nodes up to `ln_f`; `heads` the pooling and head nodes behind `scores`; `fp16` the
//! conversion of a finished graph to float16 weights and arithmetic behind the same interface.

mod blocks;
mod fp16;
mod graph;
mod heads;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::{Message, ModelProto, OperatorSetIdProto, StringStringEntryProto};
use serde::{Deserialize, Serialize};

pub use self::fp16::{to_fp16, Fp16Error, Fp16Summary, META_PRECISION, SATURATED};

use self::blocks::{backbone, prefix_backbone};
use self::graph::{Dim, GraphBuilder};
use self::heads::pool_and_heads;
use super::gpt2::{Gpt2, Heads};

/// The default-domain opset the graph uses (`LayerNormalization` needs 17).
pub const OPSET: i64 = 17;

/// ONNX IR version of the file; ONNX Runtime 1.31 reads it.
pub const IR_VERSION: i64 = 8;

/// Metadata key of the model version.
pub const META_MODEL_VERSION: &str = "model_version";

/// Metadata key of the signal names, in head order, joined by commas.
pub const META_SIGNALS: &str = "signals";

/// Weights above this many bytes cannot be serialised into one protobuf message.
const MAX_WEIGHT_BYTES: usize = 2_000_000_000;

/// Errors of exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the model's weights")]
    Tensor(#[from] candle_core::Error),
    #[error("the model lacks weight {name}")]
    MissingWeight { name: String },
    #[error("{signals} signal names given for {heads} heads")]
    SignalCount { signals: usize, heads: usize },
    #[error("signal name {name:?} is empty or contains a comma")]
    SignalName { name: String },
    #[error("heads read {found} features, the model pools {expected}")]
    HeadsWidth { expected: usize, found: usize },
    #[error("weights of {bytes} bytes do not fit in one ONNX file")]
    TooLarge { bytes: usize },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: protobuf::Error,
    },
    #[error("cannot flush {path}")]
    Flush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the exported file carries in its `metadata_props`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// Written under [`META_MODEL_VERSION`]; the processor stamps it on every signal record.
    pub model_version: String,
    /// Signal names in head order, written under [`META_SIGNALS`] joined by commas; with heads
    /// there must be one per head.
    pub signals: Vec<String>,
}

impl ExportMeta {
    /// Checks the names can be joined by commas and read back, and match the heads.
    fn validate(&self, heads: Option<&Heads>) -> Result<(), ExportError> {
        if let Some(name) = self.signals.iter().find(|n| n.is_empty() || n.contains(',')) {
            return Err(ExportError::SignalName { name: name.clone() });
        }
        match heads {
            Some(heads) if heads.k() != self.signals.len() => {
                Err(ExportError::SignalCount { signals: self.signals.len(), heads: heads.k() })
            }
            _ => Ok(()),
        }
    }

    fn props(&self) -> Vec<StringStringEntryProto> {
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.into(),
            value,
            ..Default::default()
        };
        vec![
            entry(META_MODEL_VERSION, self.model_version.clone()),
            entry(META_SIGNALS, self.signals.join(",")),
        ]
    }
}

/// Where the graph takes the token positions from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Positions {
    /// Computed inside the graph from `attention_mask`; the graph has two inputs.
    #[default]
    InGraph,
    /// Read from a `position_ids` input, as a Hugging Face export declares it; the caller
    /// feeds `cumsum(attention_mask) - 1` (any value at padded positions).
    Input,
}

/// Writes `model` (and `heads`, if given) as one ONNX file at `path`.
pub fn export_onnx(
    model: &Gpt2,
    heads: Option<&Heads>,
    path: &Path,
    meta: &ExportMeta,
) -> Result<(), ExportError> {
    export_onnx_with(model, heads, path, meta, Positions::InGraph)
}

/// [`export_onnx`] with the choice of where positions come from.
pub fn export_onnx_with(
    model: &Gpt2,
    heads: Option<&Heads>,
    path: &Path,
    meta: &ExportMeta,
    positions: Positions,
) -> Result<(), ExportError> {
    write_model(&build_model_with(model, heads, meta, positions)?, path)
}

fn write_model(proto: &ModelProto, path: &Path) -> Result<(), ExportError> {
    let file =
        File::create(path).map_err(|source| ExportError::Create { path: path.into(), source })?;
    let mut writer = BufWriter::new(file);
    proto
        .write_to_writer(&mut writer)
        .map_err(|source| ExportError::Write { path: path.into(), source })?;
    writer.flush().map_err(|source| ExportError::Flush { path: path.into(), source })
}

/// The whole ONNX model in memory, with positions computed in the graph.
pub fn build_model(
    model: &Gpt2,
    heads: Option<&Heads>,
    meta: &ExportMeta,
) -> Result<ModelProto, ExportError> {
    build_model_with(model, heads, meta, Positions::InGraph)
}

/// The whole ONNX model in memory.
pub fn build_model_with(
    model: &Gpt2,
    heads: Option<&Heads>,
    meta: &ExportMeta,
    positions: Positions,
) -> Result<ModelProto, ExportError> {
    meta.validate(heads)?;
    let expected = model.config().pooled_dim();
    if let Some(found) = heads.map(Heads::dim).filter(|&d| d != expected) {
        return Err(ExportError::HeadsWidth { expected, found });
    }
    check_size(model)?;

    let mut graph = GraphBuilder::default();
    let (hidden, shared) = backbone(&mut graph, model, positions)?;
    graph.alias(&hidden, LAST_HIDDEN_STATE);
    graph.output_f32(LAST_HIDDEN_STATE, &[Dim::Batch, Dim::Seq, Dim::Fixed(model.config().n_embd)]);
    if let Some(heads) = heads {
        let scores = pool_and_heads(&mut graph, &hidden, &shared, heads);
        graph.alias(&scores, SCORES);
        graph.output_f32(SCORES, &[Dim::Batch, Dim::Fixed(heads.k())]);
    }
    Ok(model_proto(graph, meta))
}

/// Refuses weights that cannot be serialised into one protobuf message.
fn check_size(model: &Gpt2) -> Result<(), ExportError> {
    let bytes = 4 * model.num_parameters();
    match bytes > MAX_WEIGHT_BYTES {
        true => Err(ExportError::TooLarge { bytes }),
        false => Ok(()),
    }
}

/// The file around a finished graph: IR version, opset, producer and metadata.
fn model_proto(graph: GraphBuilder, meta: &ExportMeta) -> ModelProto {
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { version: OPSET, ..Default::default() }],
        producer_name: "mindstream-train".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph.finish()).into(),
        metadata_props: meta.props(),
        ..Default::default()
    }
}

/// Writes the graph that continues from cached keys and values (see the module docs) as one
/// ONNX file at `path`. It carries no heads: the caller pools `last_hidden_state` itself.
pub fn export_prefix_onnx(model: &Gpt2, path: &Path, meta: &ExportMeta) -> Result<(), ExportError> {
    write_model(&build_prefix_model(model, meta)?, path)
}

/// The graph of [`export_prefix_onnx`] in memory.
pub fn build_prefix_model(model: &Gpt2, meta: &ExportMeta) -> Result<ModelProto, ExportError> {
    meta.validate(None)?;
    check_size(model)?;
    let config = model.config();
    let mut graph = GraphBuilder::default();
    let (hidden, presents) = prefix_backbone(&mut graph, model)?;
    graph.alias(&hidden, LAST_HIDDEN_STATE);
    graph.output_f32(LAST_HIDDEN_STATE, &[Dim::Batch, Dim::Seq, Dim::Fixed(config.n_embd)]);
    let cache = [Dim::Batch, Dim::Fixed(config.n_head), Dim::Total, Dim::Fixed(config.head_dim())];
    for (layer, present) in presents.iter().enumerate() {
        for (value, kind) in present.iter().zip(["key", "value"]) {
            let name = present_name(layer, kind);
            graph.alias(value, &name);
            graph.output_f32(&name, &cache);
        }
    }
    Ok(model_proto(graph, meta))
}

/// Input name of a layer's cached `key` or `value`.
pub fn past_name(layer: usize, kind: &str) -> String {
    format!("past_key_values.{layer}.{kind}")
}

/// Output name of a layer's `key` or `value` over all positions.
pub fn present_name(layer: usize, kind: &str) -> String {
    format!("present.{layer}.{kind}")
}

/// Names of the graph's inputs and outputs.
const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const POSITION_IDS: &str = "position_ids";
const LAST_HIDDEN_STATE: &str = "last_hidden_state";
const SCORES: &str = "scores";
