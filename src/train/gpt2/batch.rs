//! One batch of `input_ids` and `attention_mask`, read to the host and checked against the
//! model contract (shapes, vocabulary, 0/1 right-padded masks), with the positions and the
//! additive attention bias it implies.

use candle_core::{DType, Tensor};

use super::config::Gpt2Config;
use super::{Gpt2Error, Result, MASK_BIAS};

/// One batch read and checked on the host: flat ids, positions, attention bias, lengths.
pub(super) struct Batch {
    pub(super) batch: usize,
    pub(super) seq: usize,
    /// Number of real tokens of each row.
    lengths: Vec<usize>,
    /// The token ids, row-major, kept for the LM targets.
    tokens: Vec<u32>,
    /// `[b * s]` u32 ids for the embedding lookup.
    pub(super) ids: Tensor,
    /// `[b * s]` u32 positions, `cumsum(mask) - 1` clamped at 0.
    pub(super) positions: Tensor,
    /// `[b, 1, s, s]` additive attention bias, see [`MASK_BIAS`].
    pub(super) bias: Tensor,
}

impl Batch {
    pub(super) fn read(
        input_ids: &Tensor,
        attention_mask: &Tensor,
        config: &Gpt2Config,
    ) -> Result<Self> {
        let (batch, seq) = batch_dims(input_ids, "input_ids")?;
        if attention_mask.dims() != input_ids.dims() {
            let found = attention_mask.dims().to_vec();
            return Err(Gpt2Error::BatchShape {
                what: "attention_mask",
                expected: "the shape of input_ids",
                found,
            });
        }
        if seq > config.n_positions {
            return Err(Gpt2Error::SequenceTooLong { seq, n_positions: config.n_positions });
        }
        let lengths = mask_lengths(attention_mask)?;
        let tokens = read_tokens(input_ids, config.vocab_size)?;

        let device = input_ids.device();
        let positions = positions(&lengths, seq);
        let bias = attention_bias(&lengths, seq);
        Ok(Self {
            batch,
            seq,
            ids: Tensor::from_slice(&tokens, batch * seq, device)?,
            positions: Tensor::from_vec(positions, batch * seq, device)?,
            bias: Tensor::from_vec(bias, (batch, 1, seq, seq), device)?,
            lengths,
            tokens,
        })
    }

    /// Rows of the flat hidden states that predict a next token, and those tokens: every `t`
    /// of a row where tokens `t` and `t + 1` are both real.
    pub(super) fn lm_pairs(&self) -> (Vec<u32>, Vec<u32>) {
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (r, &len) in self.lengths.iter().enumerate() {
            for t in 0..len.saturating_sub(1) {
                let flat = r * self.seq + t;
                rows.push(flat as u32);
                targets.push(self.tokens[flat + 1]);
            }
        }
        (rows, targets)
    }
}

/// The `[batch, seq]` dimensions of a rank-2 tensor, both positive.
fn batch_dims(t: &Tensor, what: &'static str) -> Result<(usize, usize)> {
    match t.dims() {
        &[b, s] if b > 0 && s > 0 => Ok((b, s)),
        dims => Err(Gpt2Error::BatchShape {
            what,
            expected: "[batch, seq], both positive",
            found: dims.to_vec(),
        }),
    }
}

/// Reads the ids to the host and checks each lies in the vocabulary.
fn read_tokens(input_ids: &Tensor, vocab_size: usize) -> Result<Vec<u32>> {
    let dtype = input_ids.dtype();
    if !matches!(dtype, DType::U8 | DType::U32 | DType::I64) {
        return Err(Gpt2Error::BatchDtype { what: "input_ids", dtype });
    }
    let seq = input_ids.dim(1)?;
    let values = input_ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    values
        .iter()
        .enumerate()
        .map(|(i, &token)| match u32::try_from(token) {
            Ok(id) if (id as usize) < vocab_size => Ok(id),
            _ => Err(Gpt2Error::TokenOutOfRange { row: i / seq, col: i % seq, token, vocab_size }),
        })
        .collect()
}

/// Reads a `[batch, seq]` attention mask of any dtype and returns the length of each row.
pub(super) fn mask_lengths(attention_mask: &Tensor) -> Result<Vec<usize>> {
    let (batch, seq) = batch_dims(attention_mask, "attention_mask")?;
    let values = attention_mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    row_lengths(&values, batch, seq, 0.0, 1.0)
}

/// Lengths of right-padded 0/1 mask rows, rejecting other values and holes.
fn row_lengths<T: Copy + PartialEq>(
    values: &[T],
    batch: usize,
    seq: usize,
    zero: T,
    one: T,
) -> Result<Vec<usize>> {
    let mut lengths = Vec::with_capacity(batch);
    for (row, chunk) in values.chunks(seq.max(1)).take(batch).enumerate() {
        let mut len = 0;
        for (col, &v) in chunk.iter().enumerate() {
            if v != zero && v != one {
                return Err(Gpt2Error::MaskValue { row, col });
            }
            if v == one {
                if len != col {
                    return Err(Gpt2Error::MaskNotRightPadded { row });
                }
                len += 1;
            }
        }
        lengths.push(len);
    }
    lengths.resize(batch, 0);
    Ok(lengths)
}

/// `cumsum(mask) - 1` clamped at 0, for right-padded rows of the given lengths.
fn positions(lengths: &[usize], seq: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(lengths.len() * seq);
    for &len in lengths {
        out.extend((0..seq).map(|t| t.min(len.saturating_sub(1)) as u32));
    }
    out
}

/// The `[b, 1, s, s]` additive bias: [`MASK_BIAS`] for a future key plus [`MASK_BIAS`] for a
/// padded key, the same sum the ONNX graph forms.
fn attention_bias(lengths: &[usize], seq: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lengths.len() * seq * seq);
    for &len in lengths {
        for q in 0..seq {
            out.extend((0..seq).map(|k| {
                let future = if k > q { MASK_BIAS } else { 0.0 };
                let padded = if k >= len { MASK_BIAS } else { 0.0 };
                future + padded
            }));
        }
    }
    out
}
