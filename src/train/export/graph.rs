//! The graph builder: [`GraphBuilder`] collects nodes, initializers, inputs and outputs and
//! names every intermediate value; [`Dim`] and the `attr_*` helpers describe shapes and node
//! attributes in ONNX protobuf terms.

use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::ExportError;
use crate::train::gpt2::Gpt2;

/// A dimension of a graph input or output.
pub(super) enum Dim {
    Batch,
    Seq,
    /// Length of the cached prefix a graph continues from.
    Past,
    /// Cached prefix plus new tokens.
    Total,
    Fixed(usize),
}

/// Accumulates nodes, initializers, inputs and outputs, naming intermediate values.
#[derive(Default)]
pub(super) struct GraphBuilder {
    graph: GraphProto,
    /// Counter behind the generated value names, so no two nodes write the same name.
    next: usize,
}

impl GraphBuilder {
    /// Adds a node with one output and returns the output's name.
    pub(super) fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        let [output] = self.op_n(op_type, inputs, attribute);
        output
    }

    /// Adds a node with three outputs.
    pub(super) fn op3(
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
    pub(super) fn alias(&mut self, from: &str, to: &str) {
        self.graph.node.push(NodeProto {
            input: vec![from.into()],
            output: vec![to.into()],
            name: format!("{to}_output"),
            op_type: "Identity".into(),
            ..Default::default()
        });
    }

    pub(super) fn input_i64(&mut self, name: &str) {
        self.input_i64_shaped(name, &[Dim::Batch, Dim::Seq]);
    }

    pub(super) fn input_i64_shaped(&mut self, name: &str, dims: &[Dim]) {
        self.graph.input.push(value_info(name, DataType::INT64, dims));
    }

    pub(super) fn input_f32(&mut self, name: &str, dims: &[Dim]) {
        self.graph.input.push(value_info(name, DataType::FLOAT, dims));
    }

    pub(super) fn output_f32(&mut self, name: &str, dims: &[Dim]) {
        self.graph.output.push(value_info(name, DataType::FLOAT, dims));
    }

    /// Adds the model's weight of that name as an initializer of the same name.
    pub(super) fn weight(&mut self, model: &Gpt2, name: &str) -> Result<String, ExportError> {
        let tensor =
            model.weight(name).ok_or_else(|| ExportError::MissingWeight { name: name.into() })?;
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.initializer_f32(name, tensor.dims(), &values))
    }

    pub(super) fn initializer_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::FLOAT, raw_data)
    }

    pub(super) fn scalar_f32(&mut self, name: &str, value: f32) -> String {
        self.push_initializer(name, &[], DataType::FLOAT, value.to_le_bytes().to_vec())
    }

    pub(super) fn scalar_i64(&mut self, name: &str, value: i64) -> String {
        self.push_initializer(name, &[], DataType::INT64, value.to_le_bytes().to_vec())
    }

    pub(super) fn vector_i64(&mut self, name: &str, values: &[i64]) -> String {
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

    pub(super) fn finish(self) -> GraphProto {
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
                Dim::Past => dimension::Value::DimParam("past_seq".into()),
                Dim::Total => dimension::Value::DimParam("total_seq".into()),
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

pub(super) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), type_: AttributeType::INT.into(), i, ..Default::default() }
}

pub(super) fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INTS.into(),
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub(super) fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::FLOAT.into(),
        f,
        ..Default::default()
    }
}
