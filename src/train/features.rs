//! Frozen-backbone features through ONNX Runtime: each sequence's pooled hidden state
//! (see [`crate::model::heads`]), computed by a graph's `last_hidden_state`.
//!
//! Any GPT-2 graph with that output serves: the graphs `mindstream-train` exports and a plain
//! Hugging Face export alike. `position_ids` is fed (`cumsum(mask) - 1`, as the processor
//! does) when the graph declares it, and the hidden width is read from the graph, so the
//! caller need not know the backbone's size.

use std::path::Path;

use ort::session::Session;
use ort::value::Tensor;

use crate::model::scorer::{pad_batch, ModelError};
use crate::model::{heads, runtime};

/// Name of the graph output the features are pooled from.
const LAST_HIDDEN_STATE: &str = "last_hidden_state";

/// An opened backbone graph and what its interface asks for.
pub struct Backbone {
    session: Session,
    /// Whether the graph declares a `position_ids` input.
    position_ids: bool,
    /// The last dimension of `last_hidden_state` when the graph fixes it.
    declared_width: Option<usize>,
    /// Names of the graph's outputs.
    outputs: Vec<String>,
}

impl Backbone {
    /// Opens `onnx` on the CPU and checks it has the inputs and the output features need.
    pub fn open(onnx: &Path, threads: usize) -> Result<Backbone, ModelError> {
        let library = runtime::locate_library(None)?;
        let env = runtime::environment(&library)?;
        let session = runtime::cpu_session(env, onnx, threads)?;
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !inputs.contains(&required) {
                return Err(ModelError::Contract(format!(
                    "no `{required}` input (has {inputs:?})"
                )));
            }
        }
        if let Some(extra) =
            inputs.iter().find(|n| !matches!(**n, "input_ids" | "attention_mask" | "position_ids"))
        {
            return Err(ModelError::Contract(format!("unsupported input `{extra}`")));
        }
        let position_ids = inputs.contains(&"position_ids");
        let output = session.outputs().iter().find(|o| o.name() == LAST_HIDDEN_STATE);
        let Some(output) = output else {
            return Err(ModelError::Contract(format!("no `{LAST_HIDDEN_STATE}` output")));
        };
        let declared_width = output
            .dtype()
            .tensor_shape()
            .and_then(|shape| shape.last().copied())
            .and_then(|d| usize::try_from(d).ok())
            .filter(|&d| d > 0);
        let outputs = session.outputs().iter().map(|o| o.name().to_owned()).collect();
        Ok(Backbone { session, position_ids, declared_width, outputs })
    }

    /// Names of the graph's outputs.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Whether the graph takes `position_ids`.
    pub fn takes_position_ids(&self) -> bool {
        self.position_ids
    }

    /// The hidden width the graph declares, if it fixes one (a symbolic width is known only
    /// once a batch has run).
    pub fn declared_width(&self) -> Option<usize> {
        self.declared_width
    }

    /// Pooled features (`2 * hidden` wide) of every sequence, in input order; batches of up
    /// to `batch` sequences are formed by length.
    pub fn pooled(
        &mut self,
        sequences: &[Vec<u32>],
        batch: usize,
        progress: &indicatif::ProgressBar,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| sequences[i].len());
        let mut out = vec![Vec::new(); sequences.len()];
        for chunk in order.chunks(batch.max(1)) {
            let rows: Vec<&[u32]> = chunk.iter().map(|&i| sequences[i].as_slice()).collect();
            let (pooled, width) = self.run(&rows)?;
            for (&index, row) in chunk.iter().zip(pooled.chunks_exact(2 * width)) {
                out[index] = row.to_vec();
            }
            progress.inc(chunk.len() as u64);
        }
        Ok(out)
    }

    /// Pooled features of one batch and the hidden width.
    fn run(&mut self, rows: &[&[u32]]) -> Result<(Vec<f32>, usize), ModelError> {
        let (seq, ids, mask, positions) = pad_batch(rows);
        let shape = vec![rows.len() as i64, seq as i64];
        let tensor =
            |data: Vec<i64>| Tensor::from_array((shape.clone(), data)).map_err(ModelError::Run);
        let mut inputs =
            ort::inputs!["input_ids" => tensor(ids)?, "attention_mask" => tensor(mask.clone())?];
        if self.position_ids {
            inputs.push(("position_ids".into(), tensor(positions)?.into()));
        }
        let outputs = self.session.run(inputs).map_err(ModelError::Run)?;
        let (dims, hidden) =
            outputs[LAST_HIDDEN_STATE].try_extract_tensor::<f32>().map_err(ModelError::Run)?;
        let expected = [rows.len() as i64, seq as i64];
        let width = match **dims {
            [b, s, d] if [b, s] == expected && d > 0 => d as usize,
            _ => {
                let found: Vec<i64> = dims.to_vec();
                return Err(ModelError::Contract(format!(
                    "`{LAST_HIDDEN_STATE}` has shape {found:?}, expected [{}, {seq}, hidden]",
                    rows.len()
                )));
            }
        };
        Ok((heads::pool(hidden, rows.len(), seq, width, &mask), width))
    }
}

/// Pooled features of every sequence through the graph at `onnx`, in input order.
pub fn pooled(
    onnx: &Path,
    sequences: &[Vec<u32>],
    threads: usize,
    batch: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<Vec<f32>>, ModelError> {
    Backbone::open(onnx, threads)?.pooled(sequences, batch, progress)
}
