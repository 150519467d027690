//! Half precision: rewrites a float32 ONNX model so that its weights and the values between its
//! nodes are float16, while its interface stays the model contract's.
//!
//! It receives a [`ModelProto`] (this module's own exports, or a graph built from the same kinds
//! of nodes) and hands back the same graph where:
//!
//! - every float32 initializer, and the float32 tensor of every `Constant` and
//!   `ConstantOfShape`, is stored as float16 (finite values beyond float16's range saturate to
//!   ±[`SATURATED`]);
//! - every `Cast` to float32 casts to float16 instead, so the attention mask and the pooling's
//!   counts enter the float16 arithmetic;
//! - every float32 graph output is computed under a new name and cast back to float32 by a
//!   final `Cast`, so callers still read float32 `scores` and `last_hidden_state`;
//! - intermediate type annotations (`value_info`) follow, and the metadata gains
//!   [`META_PRECISION`] = `fp16`.
//!
//! The int64 inputs are untouched. A graph with a float input, a subgraph, external data, a
//! node that makes floats from a type attribute, or one already converted is refused rather
//! than converted halfway.

use std::collections::HashMap;

use half::f16;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::{DataLocation, DataType};
use onnx_protobuf::type_proto::Value;
use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    TypeProto,
};

use super::graph::attr_int;

/// Metadata key of the numeric precision; absent means `fp32`.
pub const META_PRECISION: &str = "precision";

/// What finite float32 values beyond float16's range (±65,504) become.
///
/// The only such values in a graph are masking biases (the exporter's `MASK_BIAS` is `-1e9`).
/// As float16 infinities, the causal and the padding bias added together would still be
/// minus infinity, but `0 · bias` in a pooling or a mask product would turn into NaN. At
/// ±30,000 the sum of two stays finite (60,000 < 65,504) and the softmax still gives a hidden
/// key a weight of exactly zero (`exp(-30000)` underflows in any precision).
pub const SATURATED: f32 = 30_000.0;

/// Suffix of the float16 value a float32 graph output is cast from.
const HALF_SUFFIX: &str = ".fp16";

/// A graph this conversion does not handle.
#[derive(Debug, thiserror::Error)]
pub enum Fp16Error {
    #[error("the model has no graph")]
    NoGraph,
    #[error("the model is already float16 (metadata `{META_PRECISION}`)")]
    AlreadyHalf,
    #[error("graph input `{0}` is float; the model contract has int64 inputs only")]
    FloatInput(String),
    #[error("tensor `{0}` keeps its data outside the file")]
    ExternalData(String),
    #[error("tensor `{name}` holds {found} values, its dims say {expected}")]
    TensorSize { name: String, expected: usize, found: usize },
    #[error("node `{node}` ({op}): {reason}")]
    Unsupported { node: String, op: String, reason: &'static str },
}

/// What the conversion changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fp16Summary {
    /// Float32 initializers now stored as float16.
    pub initializers: usize,
    /// Values stored as float16 in all tensors (initializers and constants).
    pub values: usize,
    /// Of those, values beyond float16's range that saturated to ±[`SATURATED`].
    pub saturated: usize,
    /// `Constant` and `ConstantOfShape` nodes whose float tensor is now float16.
    pub constants: usize,
    /// `Cast` nodes now casting to float16.
    pub casts: usize,
    /// Float32 outputs now cast back from float16 at the end.
    pub outputs: usize,
}

/// Converts `model` in place; see the module documentation for what changes.
pub fn to_fp16(model: &mut ModelProto) -> Result<Fp16Summary, Fp16Error> {
    if model.metadata_props.iter().any(|p| p.key == META_PRECISION && p.value == "fp16") {
        return Err(Fp16Error::AlreadyHalf);
    }
    let graph = model.graph.as_mut().ok_or(Fp16Error::NoGraph)?;
    check_inputs(graph)?;
    let initializers: Vec<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    for input in graph.input.iter_mut().filter(|i| initializers.contains(&i.name)) {
        half_type(input.type_.as_mut());
    }

    let mut summary = Fp16Summary::default();
    for tensor in &mut graph.initializer {
        if tensor.data_type == DataType::FLOAT as i32 {
            let (values, saturated) = tensor_to_half(tensor)?;
            summary.initializers += 1;
            summary.values += values;
            summary.saturated += saturated;
        }
    }
    for node in &mut graph.node {
        convert_node(node, &mut summary)?;
    }
    for info in &mut graph.value_info {
        half_type(info.type_.as_mut());
    }
    summary.outputs = cast_outputs_back(graph);

    model.metadata_props.retain(|p| p.key != META_PRECISION);
    model.metadata_props.push(StringStringEntryProto {
        key: META_PRECISION.into(),
        value: "fp16".into(),
        ..Default::default()
    });
    Ok(summary)
}

fn check_inputs(graph: &GraphProto) -> Result<(), Fp16Error> {
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let float = |input: &&onnx_protobuf::ValueInfoProto| {
        elem_type(input.type_.as_ref()) == Some(DataType::FLOAT as i32)
            && !initializers.contains(&input.name.as_str())
    };
    match graph.input.iter().find(float) {
        Some(input) => Err(Fp16Error::FloatInput(input.name.clone())),
        None => Ok(()),
    }
}

/// Rewrites one node's float32 attributes; refuses what would be converted only halfway.
fn convert_node(node: &mut NodeProto, summary: &mut Fp16Summary) -> Result<(), Fp16Error> {
    let unsupported = |reason| Fp16Error::Unsupported {
        node: node.name.clone(),
        op: node.op_type.clone(),
        reason,
    };
    if node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
        return Err(unsupported("subgraphs are not converted"));
    }
    let float = DataType::FLOAT as i64;
    match node.op_type.as_str() {
        "Cast" => {
            for attr in node.attribute.iter_mut().filter(|a| a.name == "to" && a.i == float) {
                attr.i = DataType::FLOAT16 as i64;
                summary.casts += 1;
            }
        }
        "Constant" | "ConstantOfShape" => {
            if node.attribute.iter().any(|a| a.name == "sparse_value") {
                return Err(unsupported("sparse constants are not converted"));
            }
            let mut converted = false;
            for attr in &mut node.attribute {
                converted |= constant_to_half(attr, summary)?;
            }
            summary.constants += usize::from(converted);
        }
        _ => {
            let makes_float = node.attribute.iter().any(|a| a.name == "dtype" && a.i == float);
            if makes_float {
                return Err(unsupported("a `dtype` attribute makes float32 values"));
            }
        }
    }
    Ok(())
}

/// Converts a constant's float32 value attribute (`value`, `value_float`, `value_floats`);
/// returns whether it was one.
fn constant_to_half(
    attr: &mut AttributeProto,
    summary: &mut Fp16Summary,
) -> Result<bool, Fp16Error> {
    let scalar = match attr.name.as_str() {
        "value" => {
            let Some(tensor) = attr.t.as_mut() else { return Ok(false) };
            if tensor.data_type != DataType::FLOAT as i32 {
                return Ok(false);
            }
            let (values, saturated) = tensor_to_half(tensor)?;
            summary.values += values;
            summary.saturated += saturated;
            return Ok(true);
        }
        "value_float" => vec![attr.f],
        "value_floats" => attr.floats.clone(),
        _ => return Ok(false),
    };
    let dims = if attr.name == "value_float" { vec![] } else { vec![scalar.len() as i64] };
    let (raw_data, saturated) = half_bytes(&scalar);
    summary.values += scalar.len();
    summary.saturated += saturated;
    *attr = AttributeProto {
        name: "value".into(),
        type_: AttributeType::TENSOR.into(),
        t: Some(TensorProto {
            dims,
            data_type: DataType::FLOAT16 as i32,
            raw_data,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    Ok(true)
}

/// Stores a float32 tensor as float16 raw data; returns the values and how many saturated.
fn tensor_to_half(tensor: &mut TensorProto) -> Result<(usize, usize), Fp16Error> {
    if tensor.data_location.enum_value_or_default() == DataLocation::EXTERNAL {
        return Err(Fp16Error::ExternalData(tensor.name.clone()));
    }
    let values: Vec<f32> = if tensor.raw_data.is_empty() {
        std::mem::take(&mut tensor.float_data)
    } else {
        let raw = std::mem::take(&mut tensor.raw_data);
        raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let expected: usize = tensor.dims.iter().map(|&d| d.max(0) as usize).product();
    if values.len() != expected {
        let name = tensor.name.clone();
        return Err(Fp16Error::TensorSize { name, expected, found: values.len() });
    }
    let (raw_data, saturated) = half_bytes(&values);
    tensor.raw_data = raw_data;
    tensor.float_data.clear();
    tensor.data_type = DataType::FLOAT16 as i32;
    Ok((values.len(), saturated))
}

/// Little-endian float16 bytes of `values`, rounded to nearest; finite values beyond float16's
/// range saturate to ±[`SATURATED`]. Returns the bytes and how many saturated.
fn half_bytes(values: &[f32]) -> (Vec<u8>, usize) {
    let limit = f32::from(f16::MAX);
    let mut saturated = 0;
    let mut bytes = Vec::with_capacity(2 * values.len());
    for &value in values {
        let value = if value.is_finite() && value.abs() > limit {
            saturated += 1;
            SATURATED.copysign(value)
        } else {
            value
        };
        bytes.extend_from_slice(&f16::from_f32(value).to_le_bytes());
    }
    (bytes, saturated)
}

/// Renames each float32 graph output's value to `<name>.fp16`, turns its annotations to
/// float16, and adds a `Cast` back to float32 under the output's own name. Returns how many.
fn cast_outputs_back(graph: &mut GraphProto) -> usize {
    let outputs: Vec<String> = graph
        .output
        .iter()
        .filter(|o| elem_type(o.type_.as_ref()) == Some(DataType::FLOAT as i32))
        .map(|o| o.name.clone())
        .collect();
    let renamed: HashMap<&str, String> =
        outputs.iter().map(|o| (o.as_str(), format!("{o}{HALF_SUFFIX}"))).collect();
    let rename = |name: &mut String| {
        if let Some(new) = renamed.get(name.as_str()) {
            *name = new.clone();
        }
    };
    for node in &mut graph.node {
        node.input.iter_mut().chain(node.output.iter_mut()).for_each(rename);
    }
    graph.initializer.iter_mut().for_each(|t| rename(&mut t.name));
    graph.value_info.iter_mut().for_each(|v| rename(&mut v.name));

    for output in &outputs {
        graph.node.push(NodeProto {
            input: vec![renamed[output.as_str()].clone()],
            output: vec![output.clone()],
            name: format!("{output}_to_float"),
            op_type: "Cast".into(),
            attribute: vec![attr_int("to", DataType::FLOAT as i64)],
            ..Default::default()
        });
    }
    outputs.len()
}

fn elem_type(type_: Option<&TypeProto>) -> Option<i32> {
    match type_?.value.as_ref()? {
        Value::TensorType(tensor) => Some(tensor.elem_type),
        _ => None,
    }
}

fn half_type(type_: Option<&mut TypeProto>) {
    if let Some(Value::TensorType(tensor)) = type_.and_then(|t| t.value.as_mut()) {
        if tensor.elem_type == DataType::FLOAT as i32 {
            tensor.elem_type = DataType::FLOAT16 as i32;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::export::{build_model, ExportMeta};
    use crate::train::gpt2::testing::tiny_config;
    use crate::train::gpt2::{Gpt2, Heads};

    fn tiny_model() -> ModelProto {
        let config = tiny_config();
        let model = Gpt2::new_random(config.clone(), &Device::Cpu, 5).unwrap();
        let heads = Heads::new_random(2, config.pooled_dim(), 6).unwrap();
        let meta = ExportMeta { model_version: "v".into(), signals: vec!["a".into(), "b".into()] };
        build_model(&model, Some(&heads), &meta).unwrap()
    }

    /// The element type of every value, inferred node by node from the inputs and
    /// initializers; panics where a node mixes float32 and float16 inputs, which ONNX Runtime
    /// would refuse at load on any provider.
    fn infer_types(graph: &GraphProto) -> HashMap<String, i32> {
        let mut types: HashMap<String, i32> = HashMap::new();
        for input in &graph.input {
            types.insert(input.name.clone(), elem_type(input.type_.as_ref()).unwrap());
        }
        for tensor in &graph.initializer {
            types.insert(tensor.name.clone(), tensor.data_type);
        }
        let floats = [DataType::FLOAT as i32, DataType::FLOAT16 as i32];
        for node in &graph.node {
            let inputs: Vec<i32> = node.input.iter().map(|i| types[i.as_str()]).collect();
            let mut float_inputs = inputs.iter().filter(|t| floats.contains(t));
            if let Some(first) = float_inputs.next() {
                let mixed = float_inputs.any(|t| t != first);
                assert!(!mixed, "{} ({}) mixes float types: {inputs:?}", node.name, node.op_type);
            }
            let output = match node.op_type.as_str() {
                "Cast" => node.attribute.iter().find(|a| a.name == "to").unwrap().i as i32,
                "Shape" => DataType::INT64 as i32,
                "Equal" | "Greater" => DataType::BOOL as i32,
                "Where" => inputs[1],
                "Gather" => inputs[0],
                _ => inputs[0],
            };
            for name in &node.output {
                types.insert(name.clone(), output);
            }
        }
        types
    }

    /// Every weight and every value between nodes is float16; the interface is the
    /// contract's: int64 inputs, float32 outputs, each cast from its float16 value.
    #[test]
    fn converted_graph_is_half_inside_and_float_at_its_edges() {
        let mut model = tiny_model();
        let before = model.graph.initializer.iter().filter(|t| t.data_type == 1).count();
        let summary = to_fp16(&mut model).unwrap();
        assert_eq!(summary.initializers, before);
        assert_eq!(summary.outputs, 2, "{summary:?}");
        assert_eq!(summary.saturated, 1, "only the mask bias is beyond float16's range");
        assert!(summary.casts >= 2, "the mask and the counts are cast to float16: {summary:?}");

        let graph = model.graph.as_ref().unwrap();
        let types = infer_types(graph);
        let (float, half) = (DataType::FLOAT as i32, DataType::FLOAT16 as i32);
        let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outputs, ["last_hidden_state", "scores"]);
        for output in &graph.output {
            assert_eq!(types[&output.name], float, "{}", output.name);
            assert_eq!(elem_type(output.type_.as_ref()), Some(float));
            assert_eq!(types[&format!("{}{HALF_SUFFIX}", output.name)], half);
        }
        let stray: Vec<&String> = types
            .iter()
            .filter(|(n, &t)| t == float && !outputs.contains(&n.as_str()))
            .map(|(n, _)| n)
            .collect();
        assert!(stray.is_empty(), "float32 values left inside the graph: {stray:?}");
        for input in &graph.input {
            assert_eq!(elem_type(input.type_.as_ref()), Some(DataType::INT64 as i32));
        }
        let precision = model.metadata_props.iter().find(|p| p.key == META_PRECISION).unwrap();
        assert_eq!(precision.value, "fp16");
        assert!(matches!(to_fp16(&mut model), Err(Fp16Error::AlreadyHalf)));
    }

    /// Rounding is to the nearest float16; finite values beyond its range saturate to
    /// ±`SATURATED`, infinities stay infinite.
    #[test]
    fn values_round_and_saturate() {
        let values = [0.1, -2.5, 65_504.0, 1e9, -1e9, f32::NEG_INFINITY, 1e-8];
        let (bytes, saturated) = half_bytes(&values);
        let back: Vec<f32> =
            bytes.chunks_exact(2).map(|b| f32::from(f16::from_le_bytes([b[0], b[1]]))).collect();
        assert_eq!(saturated, 2);
        assert!((back[0] - 0.1).abs() < 0.1 * 2f32.powi(-11), "{}", back[0]);
        assert_eq!(&back[1..], [-2.5, 65_504.0, SATURATED, -SATURATED, f32::NEG_INFINITY, 0.0]);
    }

    /// Graphs the conversion would get only half right are refused: a float input, a node
    /// that makes float32 from a type attribute.
    #[test]
    fn unsupported_graphs_are_refused() {
        let mut model = tiny_model();
        let graph = model.graph.as_mut().unwrap();
        let input = graph.input[0].clone();
        if let Some(Value::TensorType(t)) = graph.input[0].type_.as_mut().unwrap().value.as_mut() {
            t.elem_type = DataType::FLOAT as i32;
        }
        assert!(matches!(to_fp16(&mut model.clone()), Err(Fp16Error::FloatInput(_))));

        let graph = model.graph.as_mut().unwrap();
        graph.input[0] = input;
        graph.node.push(NodeProto {
            op_type: "RandomNormal".into(),
            name: "noise".into(),
            output: vec!["noise.0".into()],
            attribute: vec![attr_int("dtype", DataType::FLOAT as i64)],
            ..Default::default()
        });
        let err = to_fp16(&mut model).unwrap_err();
        assert!(matches!(err, Fp16Error::Unsupported { .. }), "{err}");
    }
}
