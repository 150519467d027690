//! Frozen-backbone features through ONNX Runtime: each sequence's pooled hidden state
//! (see [`crate::model::heads`]), computed by the exported graph's `last_hidden_state`.

use std::path::Path;

use ort::session::Session;
use ort::value::Tensor;

use crate::model::scorer::{pad_batch, ModelError};
use crate::model::{heads, runtime};

/// Pooled features of every sequence, in input order; batches are formed by length.
pub fn pooled(
    onnx: &Path,
    sequences: &[Vec<u32>],
    n_embd: usize,
    threads: usize,
    batch: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let library = runtime::locate_library(None)?;
    let env = runtime::environment(&library)?;
    let mut session = runtime::cpu_session(env, onnx, threads)?;
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| sequences[i].len());
    let mut out = vec![Vec::new(); sequences.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| sequences[i].as_slice()).collect();
        let pooled = run(&mut session, &rows, n_embd)?;
        for (&index, row) in chunk.iter().zip(pooled.chunks_exact(2 * n_embd)) {
            out[index] = row.to_vec();
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(out)
}

fn run(session: &mut Session, rows: &[&[u32]], n_embd: usize) -> Result<Vec<f32>, ModelError> {
    let (seq, ids, mask, _) = pad_batch(rows);
    let shape = vec![rows.len() as i64, seq as i64];
    let ids = Tensor::from_array((shape.clone(), ids)).map_err(ModelError::Run)?;
    let mask_tensor = Tensor::from_array((shape, mask.clone())).map_err(ModelError::Run)?;
    let outputs = session
        .run(ort::inputs!["input_ids" => ids, "attention_mask" => mask_tensor])
        .map_err(ModelError::Run)?;
    let (_, hidden) =
        outputs["last_hidden_state"].try_extract_tensor::<f32>().map_err(ModelError::Run)?;
    Ok(heads::pool(hidden, rows.len(), seq, n_embd, &mask))
}
