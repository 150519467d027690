//! The backbone's nodes: the tensors every layer shares (float mask, causal and padded-key
//! attention bias, sequence range), the embeddings with in-graph or given positions, and each
//! pre-norm transformer block (layer norm, attention, Conv1D, `gelu_new`) up to `ln_f`; and
//! the same backbone continuing from cached keys and values ([`prefix_backbone`]).

use onnx_protobuf::tensor_proto::DataType;

use super::graph::{attr_float, attr_int, attr_ints, Dim, GraphBuilder};
use super::{past_name, ExportError, Positions, ATTENTION_MASK, INPUT_IDS, POSITION_IDS};
use crate::train::gpt2::{Gpt2, MASK_BIAS};

/// Tensors shared by every layer: float mask, attention bias and the sequence range.
pub(super) struct Shared {
    pub(super) mask_f: String,
    pub(super) bias: String,
    pub(super) range: String,
}

/// Embeddings and blocks up to `ln_f`; returns the hidden states and the shared tensors.
pub(super) fn backbone(
    g: &mut GraphBuilder,
    model: &Gpt2,
    from: Positions,
) -> Result<(String, Shared), ExportError> {
    g.input_i64(INPUT_IDS);
    g.input_i64(ATTENTION_MASK);
    let shared = shared(g);

    let positions = match from {
        Positions::InGraph => {
            let cumsum = g.op("CumSum", &[ATTENTION_MASK, "const.one_i64"], vec![]);
            let shifted = g.op("Sub", &[&cumsum, "const.one_i64"], vec![]);
            g.op("Max", &[&shifted, "const.zero_i64"], vec![])
        }
        Positions::Input => {
            g.input_i64(POSITION_IDS);
            POSITION_IDS.to_string()
        }
    };

    let mut x = embed(g, model, &positions)?;
    for layer in 0..model.config().n_layer {
        (x, _) = block(g, model, layer, &x, &shared.bias, None)?;
    }
    let hidden = layer_norm(g, model, "ln_f", &x)?;
    Ok((hidden, shared))
}

/// The backbone continuing from cached keys and values: new tokens `input_ids [b, s]` at
/// `position_ids [b, s]`, after `past_seq` cached positions whose keys and values per layer
/// come in `past_key_values.{layer}.key|value [b, n_head, past_seq, head_dim]`;
/// `attention_mask [b, past_seq + s]` marks the real cached and new positions. New token `i`
/// attends every real key at index `past_seq + i` or before. Returns the new tokens' hidden
/// states and, per layer, the names of the keys and values of all `past_seq + s` positions.
pub(super) fn prefix_backbone(
    g: &mut GraphBuilder,
    model: &Gpt2,
) -> Result<(String, Vec<[String; 2]>), ExportError> {
    let config = model.config();
    g.input_i64(INPUT_IDS);
    g.input_i64(POSITION_IDS);
    g.input_i64_shaped(ATTENTION_MASK, &[Dim::Batch, Dim::Total]);
    let cache = [Dim::Batch, Dim::Fixed(config.n_head), Dim::Past, Dim::Fixed(config.head_dim())];
    let pasts: Vec<[String; 2]> = (0..config.n_layer)
        .map(|layer| {
            ["key", "value"].map(|kind| {
                let name = past_name(layer, kind);
                g.input_f32(&name, &cache);
                name
            })
        })
        .collect();
    let bias = shared_with_past(g);

    let mut x = embed(g, model, POSITION_IDS)?;
    let mut presents = Vec::with_capacity(config.n_layer);
    for (layer, past) in pasts.iter().enumerate() {
        let (next, present) = block(g, model, layer, &x, &bias, Some(past))?;
        x = next;
        presents.push(present.expect("a block with a past returns its present"));
    }
    let hidden = layer_norm(g, model, "ln_f", &x)?;
    Ok((hidden, presents))
}

/// Token plus position embeddings.
fn embed(g: &mut GraphBuilder, model: &Gpt2, positions: &str) -> Result<String, ExportError> {
    let wte = g.weight(model, "wte.weight")?;
    let wpe = g.weight(model, "wpe.weight")?;
    let tokens = g.op("Gather", &[&wte, INPUT_IDS], vec![]);
    let placed = g.op("Gather", &[&wpe, positions], vec![]);
    Ok(g.op("Add", &[&tokens, &placed], vec![]))
}

/// The `[b, 1, s, past + s]` attention bias of a graph with a cached prefix: query `i` sits at
/// key index `past + i`, and keys after it or masked out get [`MASK_BIAS`].
fn shared_with_past(g: &mut GraphBuilder) -> String {
    constants(g);

    let length = |g: &mut GraphBuilder, of: &str| {
        let dim = g.op("Shape", &[of], vec![attr_int("start", 1), attr_int("end", 2)]);
        g.op("Squeeze", &[&dim], vec![])
    };
    let seq = length(g, INPUT_IDS);
    let total = length(g, ATTENTION_MASK);
    let past = g.op("Sub", &[&total, &seq], vec![]);
    let queries = g.op("Range", &[&past, &total, "const.one_i64"], vec![]);
    let keys = g.op("Range", &["const.zero_i64", &total, "const.one_i64"], vec![]);

    let queries = g.op("Unsqueeze", &[&queries, "const.axes_1"], vec![]);
    let keys = g.op("Unsqueeze", &[&keys, "const.axes_0"], vec![]);
    let future = g.op("Greater", &[&keys, &queries], vec![]);
    let future = g.op("Where", &[&future, "const.mask_bias", "const.zero_f32"], vec![]);

    let to_float = vec![attr_int("to", DataType::FLOAT as i64)];
    let mask_f = g.op("Cast", &[ATTENTION_MASK], to_float);
    with_padded_keys(g, &future, &mask_f)
}

/// The float mask, the `[b, 1, s, s]` attention bias and `range = [0, 1, ..., s - 1]`.
fn shared(g: &mut GraphBuilder) -> Shared {
    constants(g);

    let to_float = vec![attr_int("to", DataType::FLOAT as i64)];
    let mask_f = g.op("Cast", &[ATTENTION_MASK], to_float);
    let seq = g.op("Shape", &[INPUT_IDS], vec![attr_int("start", 1), attr_int("end", 2)]);
    let seq = g.op("Squeeze", &[&seq], vec![]);
    let range = g.op("Range", &["const.zero_i64", &seq, "const.one_i64"], vec![]);

    let queries = g.op("Unsqueeze", &[&range, "const.axes_1"], vec![]);
    let keys = g.op("Unsqueeze", &[&range, "const.axes_0"], vec![]);
    let future = g.op("Greater", &[&keys, &queries], vec![]);
    let future = g.op("Where", &[&future, "const.mask_bias", "const.zero_f32"], vec![]);

    let bias = with_padded_keys(g, &future, &mask_f);
    Shared { mask_f, bias, range }
}

/// The scalars and axes the shared tensors and the blocks use.
fn constants(g: &mut GraphBuilder) {
    g.scalar_i64("const.zero_i64", 0);
    g.scalar_i64("const.one_i64", 1);
    g.scalar_f32("const.zero_f32", 0.0);
    g.scalar_f32("const.one_f32", 1.0);
    g.scalar_f32("const.mask_bias", MASK_BIAS);
    g.vector_i64("const.axes_0", &[0]);
    g.vector_i64("const.axes_1", &[1]);
    g.vector_i64("const.axes_2", &[2]);
    g.vector_i64("const.axes_1_2", &[1, 2]);
}

/// `future [s, t]` plus [`MASK_BIAS`] at the keys `mask_f [b, t]` marks as padding: the
/// `[b, 1, s, t]` attention bias.
fn with_padded_keys(g: &mut GraphBuilder, future: &str, mask_f: &str) -> String {
    let padded = g.op("Sub", &["const.one_f32", mask_f], vec![]);
    let padded = g.op("Mul", &[&padded, "const.mask_bias"], vec![]);
    let padded = g.op("Unsqueeze", &[&padded, "const.axes_1_2"], vec![]);
    g.op("Add", &[future, &padded], vec![])
}

/// One pre-norm transformer block over `x [b, s, d]`; with cached keys and values (`past`),
/// also the keys and values of all positions.
fn block(
    g: &mut GraphBuilder,
    model: &Gpt2,
    layer: usize,
    x: &str,
    bias: &str,
    past: Option<&[String; 2]>,
) -> Result<(String, Option<[String; 2]>), ExportError> {
    let prefix = format!("h.{layer}");
    let normed = layer_norm(g, model, &format!("{prefix}.ln_1"), x)?;
    let (attended, present) = attention(g, model, &prefix, &normed, bias, past)?;
    let x = g.op("Add", &[x, &attended], vec![]);

    let normed = layer_norm(g, model, &format!("{prefix}.ln_2"), &x)?;
    let hidden = conv1d(g, model, &format!("{prefix}.mlp.c_fc"), &normed)?;
    let hidden = gelu_new(g, &hidden);
    let mlp = conv1d(g, model, &format!("{prefix}.mlp.c_proj"), &hidden)?;
    Ok((g.op("Add", &[&x, &mlp], vec![]), present))
}

/// Causal self-attention with the shared additive bias, over the cached keys and values
/// followed by the new ones when there is a `past`.
fn attention(
    g: &mut GraphBuilder,
    model: &Gpt2,
    prefix: &str,
    x: &str,
    bias: &str,
    past: Option<&[String; 2]>,
) -> Result<(String, Option<[String; 2]>), ExportError> {
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
    let (k_t, v, present) = match past {
        None => (by_head(g, &k, &[0, 2, 3, 1]), by_head(g, &v, &[0, 2, 1, 3]), None),
        Some([past_k, past_v]) => {
            let axis = vec![attr_int("axis", 2)];
            let k = by_head(g, &k, &[0, 2, 1, 3]);
            let k = g.op("Concat", &[past_k, &k], axis.clone());
            let v = by_head(g, &v, &[0, 2, 1, 3]);
            let v = g.op("Concat", &[past_v, &v], axis);
            let k_t = g.op("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
            (k_t, v.clone(), Some([k, v]))
        }
    };

    let scale = g.scalar_f32(&format!("{prefix}.attn.scale"), 1.0 / (head_dim as f32).sqrt());
    let q = g.op("Mul", &[&q, &scale], vec![]);
    let logits = g.op("MatMul", &[&q, &k_t], vec![]);
    let logits = g.op("Add", &[&logits, bias], vec![]);
    let weights = g.op("Softmax", &[&logits], vec![attr_int("axis", -1)]);

    let context = g.op("MatMul", &[&weights, &v], vec![]);
    let context = g.op("Transpose", &[&context], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged = g.vector_i64(&format!("{prefix}.attn.merged_shape"), &[0, 0, d as i64]);
    let context = g.op("Reshape", &[&context, &merged], vec![]);
    Ok((conv1d(g, model, &format!("{prefix}.attn.c_proj"), &context)?, present))
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
