//! The nodes behind `scores`: `concat(h_last, h_mean)` pooling of the hidden states under the
//! attention mask, then the sigmoid heads as one `Gemm`.

use onnx_protobuf::tensor_proto::DataType;

use super::blocks::Shared;
use super::graph::{attr_int, GraphBuilder};
use super::ATTENTION_MASK;
use crate::train::gpt2::Heads;

/// `concat(h_last, h_mean)` pooling and the sigmoid heads; returns the scores.
///
/// `h_last` is selected by multiplying with a one-hot row and summing, which is exact: every
/// other term is a finite hidden state times zero.
pub(super) fn pool_and_heads(
    g: &mut GraphBuilder,
    hidden: &str,
    shared: &Shared,
    heads: &Heads,
) -> String {
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
