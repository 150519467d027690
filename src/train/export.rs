//! ONNX export of a trained [`Gpt2`] and, optionally, its signal [`Heads`].
//!
//! This module owns the ONNX graph the processor runs. It receives a model, its heads and the
//! metadata of the model card; it hands on one self-contained `.onnx` file (opset 17, IR
//! version 8, weights as raw little-endian f32 initializers) that implements the model contract
//! of [`super::gpt2`] exactly:
//!
//! - inputs `input_ids` and `attention_mask`, int64 `[batch, seq]`, both dimensions symbolic;
//! - positions computed inside the graph as `max(cumsum(attention_mask) - 1, 0)`, so the graph
//!   takes no `position_ids`;
//! - causal and padded-key masking by adding [`MASK_BIAS`] per reason, as the candle model does;
//! - output `last_hidden_state`, float `[batch, seq, n_embd]`, after `ln_f`;
//! - with heads, output `scores`, float `[batch, K]`: `concat(h_last, h_mean)` pooling and
//!   `sigmoid(pooled · weightᵀ + bias)`, all inside the graph.
//!
//! Layer norm is ONNX `LayerNormalization` (opset 17); GELU is composed from `Mul`, `Add`
//! and `Tanh` in its tanh form, as GPT-2's `gelu_new` is.
//!
//! A protobuf message cannot exceed 2 GiB, so a model whose weights do not fit in one file
//! under that bound (larger than about 500M parameters) is refused rather than written with
//! external data; every model this project trains on a CPU is far below it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, Message, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use serde::{Deserialize, Serialize};

use super::gpt2::{Gpt2, Heads, MASK_BIAS};

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

/// Writes `model` (and `heads`, if given) as one ONNX file at `path`.
pub fn export_onnx(
    model: &Gpt2,
    heads: Option<&Heads>,
    path: &Path,
    meta: &ExportMeta,
) -> Result<(), ExportError> {
    let proto = build_model(model, heads, meta)?;

    let file =
        File::create(path).map_err(|source| ExportError::Create { path: path.into(), source })?;
    let mut writer = BufWriter::new(file);
    proto
        .write_to_writer(&mut writer)
        .map_err(|source| ExportError::Write { path: path.into(), source })?;
    writer.flush().map_err(|source| ExportError::Flush { path: path.into(), source })
}

/// The whole ONNX model in memory.
pub fn build_model(
    model: &Gpt2,
    heads: Option<&Heads>,
    meta: &ExportMeta,
) -> Result<ModelProto, ExportError> {
    meta.validate(heads)?;
    let expected = model.config().pooled_dim();
    if let Some(found) = heads.map(Heads::dim).filter(|&d| d != expected) {
        return Err(ExportError::HeadsWidth { expected, found });
    }
    let bytes = 4 * model.num_parameters();
    if bytes > MAX_WEIGHT_BYTES {
        return Err(ExportError::TooLarge { bytes });
    }

    let mut graph = GraphBuilder::default();
    let (hidden, shared) = backbone(&mut graph, model)?;
    graph.alias(&hidden, LAST_HIDDEN_STATE);
    graph.output_f32(LAST_HIDDEN_STATE, &[Dim::Batch, Dim::Seq, Dim::Fixed(model.config().n_embd)]);
    if let Some(heads) = heads {
        let scores = pool_and_heads(&mut graph, &hidden, &shared, heads);
        graph.alias(&scores, SCORES);
        graph.output_f32(SCORES, &[Dim::Batch, Dim::Fixed(heads.k())]);
    }

    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { version: OPSET, ..Default::default() }],
        producer_name: "mindstream-train".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph.finish()).into(),
        metadata_props: meta.props(),
        ..Default::default()
    })
}

/// Names of the graph's inputs and outputs.
const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const LAST_HIDDEN_STATE: &str = "last_hidden_state";
const SCORES: &str = "scores";

/// Tensors shared by every layer: float mask, attention bias and the sequence range.
struct Shared {
    mask_f: String,
    bias: String,
    range: String,
}

/// Embeddings and blocks up to `ln_f`; returns the hidden states and the shared tensors.
fn backbone(g: &mut GraphBuilder, model: &Gpt2) -> Result<(String, Shared), ExportError> {
    g.input_i64(INPUT_IDS);
    g.input_i64(ATTENTION_MASK);
    let shared = shared(g);

    let cumsum = g.op("CumSum", &[ATTENTION_MASK, "const.one_i64"], vec![]);
    let shifted = g.op("Sub", &[&cumsum, "const.one_i64"], vec![]);
    let positions = g.op("Max", &[&shifted, "const.zero_i64"], vec![]);

    let wte = g.weight(model, "wte.weight")?;
    let wpe = g.weight(model, "wpe.weight")?;
    let tokens = g.op("Gather", &[&wte, INPUT_IDS], vec![]);
    let placed = g.op("Gather", &[&wpe, &positions], vec![]);
    let mut x = g.op("Add", &[&tokens, &placed], vec![]);

    for layer in 0..model.config().n_layer {
        x = block(g, model, layer, &x, &shared)?;
    }
    let hidden = layer_norm(g, model, "ln_f", &x)?;
    Ok((hidden, shared))
}

/// The float mask, the `[b, 1, s, s]` attention bias and `range = [0, 1, ..., s - 1]`.
fn shared(g: &mut GraphBuilder) -> Shared {
    g.scalar_i64("const.zero_i64", 0);
    g.scalar_i64("const.one_i64", 1);
    g.scalar_f32("const.zero_f32", 0.0);
    g.scalar_f32("const.one_f32", 1.0);
    g.scalar_f32("const.mask_bias", MASK_BIAS);
    g.vector_i64("const.axes_0", &[0]);
    g.vector_i64("const.axes_1", &[1]);
    g.vector_i64("const.axes_2", &[2]);
    g.vector_i64("const.axes_1_2", &[1, 2]);

    let to_float = vec![attr_int("to", DataType::FLOAT as i64)];
    let mask_f = g.op("Cast", &[ATTENTION_MASK], to_float);
    let seq = g.op("Shape", &[INPUT_IDS], vec![attr_int("start", 1), attr_int("end", 2)]);
    let seq = g.op("Squeeze", &[&seq], vec![]);
    let range = g.op("Range", &["const.zero_i64", &seq, "const.one_i64"], vec![]);

    let queries = g.op("Unsqueeze", &[&range, "const.axes_1"], vec![]);
    let keys = g.op("Unsqueeze", &[&range, "const.axes_0"], vec![]);
    let future = g.op("Greater", &[&keys, &queries], vec![]);
    let future = g.op("Where", &[&future, "const.mask_bias", "const.zero_f32"], vec![]);

    let padded = g.op("Sub", &["const.one_f32", &mask_f], vec![]);
    let padded = g.op("Mul", &[&padded, "const.mask_bias"], vec![]);
    let padded = g.op("Unsqueeze", &[&padded, "const.axes_1_2"], vec![]);
    let bias = g.op("Add", &[&future, &padded], vec![]);
    Shared { mask_f, bias, range }
}

/// One pre-norm transformer block over `x [b, s, d]`.
fn block(
    g: &mut GraphBuilder,
    model: &Gpt2,
    layer: usize,
    x: &str,
    shared: &Shared,
) -> Result<String, ExportError> {
    let prefix = format!("h.{layer}");
    let normed = layer_norm(g, model, &format!("{prefix}.ln_1"), x)?;
    let attended = attention(g, model, &prefix, &normed, &shared.bias)?;
    let x = g.op("Add", &[x, &attended], vec![]);

    let normed = layer_norm(g, model, &format!("{prefix}.ln_2"), &x)?;
    let hidden = conv1d(g, model, &format!("{prefix}.mlp.c_fc"), &normed)?;
    let hidden = gelu_new(g, &hidden);
    let mlp = conv1d(g, model, &format!("{prefix}.mlp.c_proj"), &hidden)?;
    Ok(g.op("Add", &[&x, &mlp], vec![]))
}

/// Causal self-attention with the shared additive bias.
fn attention(
    g: &mut GraphBuilder,
    model: &Gpt2,
    prefix: &str,
    x: &str,
    bias: &str,
) -> Result<String, ExportError> {
    let config = model.config();
    let (d, heads, head_dim) = (config.n_embd, config.n_head, config.head_dim());
    let qkv = conv1d(g, model, &format!("{prefix}.attn.c_attn"), x)?;
    let split = g.vector_i64(&format!("{prefix}.attn.split"), &[d as i64; 3]);
    let [q, k, v] = g.op3("Split", &[&qkv, &split], vec![attr_int("axis", 2)]);

    let heads_shape = [0, 0, heads as i64, head_dim as i64];
    let heads_shape = g.vector_i64(&format!("{prefix}.attn.heads_shape"), &heads_shape);
    let by_head = |g: &mut GraphBuilder, t: &str, perm: &[i64]| {
        let t = g.op("Reshape", &[t, &heads_shape], vec![]);
        g.op("Transpose", &[&t], vec![attr_ints("perm", perm)])
    };
    let q = by_head(g, &q, &[0, 2, 1, 3]);
    let k_t = by_head(g, &k, &[0, 2, 3, 1]);
    let v = by_head(g, &v, &[0, 2, 1, 3]);

    let scale = g.scalar_f32(&format!("{prefix}.attn.scale"), 1.0 / (head_dim as f32).sqrt());
    let q = g.op("Mul", &[&q, &scale], vec![]);
    let logits = g.op("MatMul", &[&q, &k_t], vec![]);
    let logits = g.op("Add", &[&logits, bias], vec![]);
    let weights = g.op("Softmax", &[&logits], vec![attr_int("axis", -1)]);

    let context = g.op("MatMul", &[&weights, &v], vec![]);
    let context = g.op("Transpose", &[&context], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged = g.vector_i64(&format!("{prefix}.attn.merged_shape"), &[0, 0, d as i64]);
    let context = g.op("Reshape", &[&context, &merged], vec![]);
    conv1d(g, model, &format!("{prefix}.attn.c_proj"), &context)
}

/// `LayerNormalization` over the last axis with the model's epsilon.
fn layer_norm(
    g: &mut GraphBuilder,
    model: &Gpt2,
    prefix: &str,
    x: &str,
) -> Result<String, ExportError> {
    let weight = g.weight(model, &format!("{prefix}.weight"))?;
    let bias = g.weight(model, &format!("{prefix}.bias"))?;
    let eps = model.config().layer_norm_epsilon as f32;
    let attrs = vec![attr_int("axis", -1), attr_float("epsilon", eps)];
    Ok(g.op("LayerNormalization", &[x, &weight, &bias], attrs))
}

/// Hugging Face's Conv1D: `x · weight + bias` with `weight [in, out]`.
fn conv1d(
    g: &mut GraphBuilder,
    model: &Gpt2,
    prefix: &str,
    x: &str,
) -> Result<String, ExportError> {
    let weight = g.weight(model, &format!("{prefix}.weight"))?;
    let bias = g.weight(model, &format!("{prefix}.bias"))?;
    let product = g.op("MatMul", &[x, &weight], vec![]);
    Ok(g.op("Add", &[&product, &bias], vec![]))
}

/// `0.5 · x · (1 + tanh(sqrt(2 / π) · (x + 0.044715 · x³)))`, GPT-2's `gelu_new`.
fn gelu_new(g: &mut GraphBuilder, x: &str) -> String {
    let half = g.scalar_f32("const.gelu_half", 0.5);
    let cubic = g.scalar_f32("const.gelu_cubic", 0.044715);
    let root = g.scalar_f32("const.gelu_root", (2.0 / std::f32::consts::PI).sqrt());

    let square = g.op("Mul", &[x, x], vec![]);
    let cube = g.op("Mul", &[&square, x], vec![]);
    let cube = g.op("Mul", &[&cube, &cubic], vec![]);
    let inner = g.op("Add", &[x, &cube], vec![]);
    let inner = g.op("Mul", &[&inner, &root], vec![]);
    let tanh = g.op("Tanh", &[&inner], vec![]);

    let gate = g.op("Add", &[&tanh, "const.one_f32"], vec![]);
    let half_x = g.op("Mul", &[x, &half], vec![]);
    g.op("Mul", &[&half_x, &gate], vec![])
}

/// `concat(h_last, h_mean)` pooling and the sigmoid heads; returns the scores.
///
/// `h_last` is selected by multiplying with a one-hot row and summing, which is exact: every
/// other term is a finite hidden state times zero.
fn pool_and_heads(g: &mut GraphBuilder, hidden: &str, shared: &Shared, heads: &Heads) -> String {
    let keep = vec![attr_int("keepdims", 1)];
    let lengths = g.op("ReduceSum", &[ATTENTION_MASK, "const.axes_1"], keep);
    let last = g.op("Sub", &[&lengths, "const.one_i64"], vec![]);
    let last = g.op("Max", &[&last, "const.zero_i64"], vec![]);

    let keys = g.op("Unsqueeze", &[&shared.range, "const.axes_0"], vec![]);
    let at_last = g.op("Equal", &[&keys, &last], vec![]);
    let at_last = g.op("Cast", &[&at_last], vec![attr_int("to", DataType::FLOAT as i64)]);
    let h_last = masked_sum(g, hidden, &at_last);

    let total = masked_sum(g, hidden, &shared.mask_f);
    let counts = g.op("Cast", &[&lengths], vec![attr_int("to", DataType::FLOAT as i64)]);
    let counts = g.op("Max", &[&counts, "const.one_f32"], vec![]);
    let h_mean = g.op("Div", &[&total, &counts], vec![]);
    let pooled = g.op("Concat", &[&h_last, &h_mean], vec![attr_int("axis", 1)]);

    let weight = g.initializer_f32("heads.weight", &[heads.k(), heads.dim()], heads.weight());
    let bias = g.initializer_f32("heads.bias", &[heads.k()], heads.bias());
    let logits = g.op("Gemm", &[&pooled, &weight, &bias], vec![attr_int("transB", 1)]);
    g.op("Sigmoid", &[&logits], vec![])
}

/// `sum_t hidden[b, t, :] * weights[b, t]`: `[b, s, d]` and `[b, s]` to `[b, d]`.
fn masked_sum(g: &mut GraphBuilder, hidden: &str, weights: &str) -> String {
    let weights = g.op("Unsqueeze", &[weights, "const.axes_2"], vec![]);
    let weighted = g.op("Mul", &[hidden, &weights], vec![]);
    g.op("ReduceSum", &[&weighted, "const.axes_1"], vec![attr_int("keepdims", 0)])
}

/// A dimension of a graph input or output.
enum Dim {
    Batch,
    Seq,
    Fixed(usize),
}

/// Accumulates nodes, initializers, inputs and outputs, naming intermediate values.
#[derive(Default)]
struct GraphBuilder {
    graph: GraphProto,
    /// Counter behind the generated value names, so no two nodes write the same name.
    next: usize,
}

impl GraphBuilder {
    /// Adds a node with one output and returns the output's name.
    fn op(&mut self, op_type: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let [output] = self.op_n(op_type, inputs, attribute);
        output
    }

    /// Adds a node with three outputs.
    fn op3(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> [String; 3] {
        self.op_n(op_type, inputs, attribute)
    }

    fn op_n<const N: usize>(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> [String; N] {
        let id = self.next;
        self.next += 1;
        let outputs: [String; N] = std::array::from_fn(|i| format!("{op_type}_{id}.{i}"));
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            name: format!("{op_type}_{id}"),
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
        outputs
    }

    /// Gives the value `from` the graph-output name `to` (an `Identity` node).
    fn alias(&mut self, from: &str, to: &str) {
        self.graph.node.push(NodeProto {
            input: vec![from.into()],
            output: vec![to.into()],
            name: format!("{to}_output"),
            op_type: "Identity".into(),
            ..Default::default()
        });
    }

    fn input_i64(&mut self, name: &str) {
        let info = value_info(name, DataType::INT64, &[Dim::Batch, Dim::Seq]);
        self.graph.input.push(info);
    }

    fn output_f32(&mut self, name: &str, dims: &[Dim]) {
        self.graph.output.push(value_info(name, DataType::FLOAT, dims));
    }

    /// Adds the model's weight of that name as an initializer of the same name.
    fn weight(&mut self, model: &Gpt2, name: &str) -> Result<String, ExportError> {
        let tensor =
            model.weight(name).ok_or_else(|| ExportError::MissingWeight { name: name.into() })?;
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.initializer_f32(name, tensor.dims(), &values))
    }

    fn initializer_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::FLOAT, raw_data)
    }

    fn scalar_f32(&mut self, name: &str, value: f32) -> String {
        self.push_initializer(name, &[], DataType::FLOAT, value.to_le_bytes().to_vec())
    }

    fn scalar_i64(&mut self, name: &str, value: i64) -> String {
        self.push_initializer(name, &[], DataType::INT64, value.to_le_bytes().to_vec())
    }

    fn vector_i64(&mut self, name: &str, values: &[i64]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, &[values.len()], DataType::INT64, raw_data)
    }

    /// Adds an initializer once; a second call with the same name reuses the first.
    fn push_initializer(
        &mut self,
        name: &str,
        dims: &[usize],
        data_type: DataType,
        raw_data: Vec<u8>,
    ) -> String {
        if !self.graph.initializer.iter().any(|t| t.name == name) {
            self.graph.initializer.push(TensorProto {
                dims: dims.iter().map(|&d| d as i64).collect(),
                data_type: data_type as i32,
                name: name.into(),
                raw_data,
                ..Default::default()
            });
        }
        name.into()
    }

    fn finish(self) -> GraphProto {
        GraphProto { name: "mindstream_gpt2".into(), ..self.graph }
    }
}

fn value_info(name: &str, elem_type: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam("batch".into()),
                Dim::Seq => dimension::Value::DimParam("seq".into()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: elem_type as i32,
        shape: Some(TensorShapeProto { dim, ..Default::default() }).into(),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        type_: Some(TypeProto { value: Some(Value::TensorType(tensor)), ..Default::default() })
            .into(),
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::INT.into(), i, ..Default::default() }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INTS.into(),
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::FLOAT.into(),
        f,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use ort::value::Tensor as OrtTensor;

    use super::*;
    use crate::model::runtime;
    use crate::train::gpt2::{pool, pool_f32, Gpt2Config};

    const SIGNALS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    fn tiny_config() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 300,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
        }
    }

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

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
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

    fn compare_with_candle(
        model: &Gpt2,
        heads: &Heads,
        path: &Path,
        lengths: &[usize],
        seq: usize,
    ) {
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
        let hidden_diff = max_abs_diff(
            &real_positions(&hidden, &mask, 32),
            &real_positions(&ort.hidden, &mask, 32),
        );
        // Both sides add the same bias, so even padded positions agree; asserting it catches a
        // graph that drops the key-padding term, which real positions alone cannot show.
        let all_diff = max_abs_diff(&hidden, &ort.hidden);
        let scores_diff = max_abs_diff(&scores, &ort.scores);
        let pooled = pool_f32(&ort.hidden, batch, seq, 32, &mask).unwrap();
        let rust_scores = heads.apply_f32(&pooled, batch).unwrap();
        let rust_diff = max_abs_diff(&rust_scores, &ort.scores);
        println!(
            "batch {batch} x {seq}: max abs diff hidden {hidden_diff:e} (all positions \
             {all_diff:e}), scores {scores_diff:e}, rust pooling + heads {rust_diff:e}"
        );
        assert!(all_diff <= 1e-4, "padded positions differ by {all_diff}");
        assert!(hidden_diff <= 1e-4, "last_hidden_state differs by {hidden_diff}");
        assert!(scores_diff <= 1e-4, "scores differ by {scores_diff}");
        assert!(rust_diff <= 1e-4, "pool_f32 + apply_f32 differ from the graph by {rust_diff}");

        let spread = ort.scores.iter().fold(0.0f32, |m, s| m.max((s - 0.5).abs()));
        assert!(spread > 0.05, "scores all near 0.5 ({spread}): the comparison would be weak");
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
}
