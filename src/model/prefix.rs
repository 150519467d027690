//! Scoring leave-one-out variants from their window's cached prefix.
//!
//! A variant that leaves out event `e` is the window's tokens before `e` followed by the
//! tokens after it. GPT-2 attends only backwards, so the keys, values and hidden states of the
//! tokens before `e` are the window's own. [`PrefixScorer`] runs the card's prefix graph
//! (`crate::train::export::export_prefix_onnx`): first over whole windows with an empty
//! cache, keeping each window's keys, values and hidden states ([`Prefix`]); then over each
//! variant's remaining tokens only, placed after the cached prefix (positions continue from
//! it). Pooling (`concat(h_last, h_mean)`) reads the cached hidden states for the prefix, so a
//! variant scores as the whole sequence would, to float rounding. A variant that leaves out
//! the window's last event has no remaining tokens and needs no model call at all.

use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;

use crate::config::ModelConfig;
use crate::model::card::{HeadWeights, ModelCard, Platt};
use crate::model::heads;
use crate::model::scorer::{calibrate, open_session, pad_batch, verify_checksum, ModelError};

/// The cached keys, values and hidden states of a window's first `len` positions.
pub struct Prefix {
    len: usize,
    /// `[layer][key, value][head][len][head_dim]`.
    cache: Vec<f32>,
    /// `[len][n_embd]`.
    hidden: Vec<f32>,
}

impl Prefix {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A leave-one-out variant: the first `start` positions of `prefix`, then `suffix`.
pub struct Variant<'a> {
    pub prefix: &'a Prefix,
    pub start: usize,
    pub suffix: &'a [u32],
}

/// The model's prefix graph in one session, with the heads and calibration of the card.
pub struct PrefixScorer {
    session: Session,
    heads: HeadWeights,
    calibration: Vec<Platt>,
    layers: usize,
    n_head: usize,
    head_dim: usize,
    n_embd: usize,
}

/// Names of the graph's inputs and outputs.
fn past_input(layer: usize, kind: usize) -> String {
    format!("past_key_values.{layer}.{}", KINDS[kind])
}

fn present_output(layer: usize, kind: usize) -> String {
    format!("present.{layer}.{}", KINDS[kind])
}

const KINDS: [&str; 2] = ["key", "value"];

impl PrefixScorer {
    /// The card's prefix graph, when it has one; checked against the card's SHA-256 and its
    /// inputs and outputs against the contract.
    pub fn load(
        dir: &Path,
        card: &ModelCard,
        config: &ModelConfig,
    ) -> Result<Option<Self>, ModelError> {
        let Some(graph) = &card.prefix_graph else { return Ok(None) };
        let heads = card.heads.clone().ok_or_else(|| {
            ModelError::Contract("a prefix graph needs the card's head weights".into())
        })?;
        let path = dir.join(&graph.onnx_file);
        verify_checksum(&path, &graph.onnx_sha256)?;
        let (session, _) = open_session(&path, config)?;
        let backbone = &card.backbone;
        let layers = backbone.n_layer;
        let mut inputs =
            vec!["input_ids".to_string(), "position_ids".into(), "attention_mask".into()];
        let mut outputs = vec!["last_hidden_state".to_string()];
        for layer in 0..layers {
            for kind in 0..2 {
                inputs.push(past_input(layer, kind));
                outputs.push(present_output(layer, kind));
            }
        }
        let has = |names: Vec<&str>, wanted: &[String], what: &str| match wanted
            .iter()
            .find(|w| !names.contains(&w.as_str()))
        {
            None => Ok(()),
            Some(missing) => Err(ModelError::Contract(format!(
                "prefix graph {}: no `{missing}` {what} (has {names:?})",
                path.display()
            ))),
        };
        has(session.inputs().iter().map(|i| i.name()).collect(), &inputs, "input")?;
        has(session.outputs().iter().map(|o| o.name()).collect(), &outputs, "output")?;
        if backbone.n_head == 0 || !backbone.n_embd.is_multiple_of(backbone.n_head) {
            return Err(ModelError::Contract(format!(
                "n_embd {} is not a multiple of n_head {}",
                backbone.n_embd, backbone.n_head
            )));
        }
        Ok(Some(PrefixScorer {
            session,
            heads,
            calibration: card.calibration.clone(),
            layers,
            n_head: backbone.n_head,
            head_dim: backbone.n_embd / backbone.n_head,
            n_embd: backbone.n_embd,
        }))
    }

    /// Scores whole sequences (`[sequences.len(), signals]`, calibrated) and keeps, for each
    /// sequence with `keep[i] = Some(n)`, the cache of its first `n` positions (at most its
    /// length).
    pub fn score_windows(
        &mut self,
        sequences: &[&[u32]],
        keep: &[Option<usize>],
    ) -> Result<(Vec<f32>, Vec<Option<Prefix>>), ModelError> {
        let batch = sequences.len();
        if batch == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let (seq, ids, mask, positions) = pad_batch(sequences);
        let outputs = self.run(batch, seq, 0, ids, positions, mask.clone(), |_| {})?;
        let (hidden, presents) = outputs;
        let pooled = heads::pool(&hidden, batch, seq, self.n_embd, &mask);
        let mut scores = heads::apply(&self.heads, &pooled, batch);
        calibrate(&self.calibration, &mut scores);

        let (hd, n_head) = (self.head_dim, self.n_head);
        let prefixes = sequences
            .iter()
            .zip(keep)
            .enumerate()
            .map(|(row, (tokens, &keep))| {
                let len = keep?.min(tokens.len());
                let mut cache = Vec::with_capacity(self.layers * 2 * n_head * len * hd);
                for present in &presents {
                    for head in 0..n_head {
                        let at = ((row * n_head + head) * seq) * hd;
                        cache.extend_from_slice(&present[at..at + len * hd]);
                    }
                }
                let at = row * seq * self.n_embd;
                let hidden = hidden[at..at + len * self.n_embd].to_vec();
                Some(Prefix { len, cache, hidden })
            })
            .collect();
        Ok((scores, prefixes))
    }

    /// Scores each variant (`[variants.len(), signals]`, calibrated): those with tokens after
    /// the left-out event in one model call over their remaining tokens, the others from the
    /// cached hidden states alone.
    pub fn score_variants(&mut self, variants: &[Variant<'_>]) -> Result<Vec<f32>, ModelError> {
        let d = self.n_embd;
        let mut pooled = vec![0f32; variants.len() * 2 * d];
        let run: Vec<usize> =
            (0..variants.len()).filter(|&i| !variants[i].suffix.is_empty()).collect();
        for (i, variant) in variants.iter().enumerate() {
            if variant.start > variant.prefix.len {
                return Err(ModelError::Contract(format!(
                    "a variant starts at {} of a prefix of {}",
                    variant.start, variant.prefix.len
                )));
            }
            let out = &mut pooled[i * 2 * d..(i + 1) * 2 * d];
            let (last, mean) = out.split_at_mut(d);
            for t in 0..variant.start {
                for (m, h) in mean.iter_mut().zip(&variant.prefix.hidden[t * d..(t + 1) * d]) {
                    *m += h;
                }
            }
            if variant.suffix.is_empty() && variant.start > 0 {
                let t = variant.start - 1;
                last.copy_from_slice(&variant.prefix.hidden[t * d..(t + 1) * d]);
            }
        }

        if !run.is_empty() {
            let batch = run.len();
            let past = run.iter().map(|&i| variants[i].start).max().unwrap_or(0);
            let seq = run.iter().map(|&i| variants[i].suffix.len()).max().unwrap_or(1);
            let total = past + seq;
            let mut ids = vec![0i64; batch * seq];
            let mut positions = vec![0i64; batch * seq];
            let mut mask = vec![0i64; batch * total];
            for (row, &i) in run.iter().enumerate() {
                let variant = &variants[i];
                mask[row * total..row * total + variant.start].fill(1);
                for (t, &token) in variant.suffix.iter().enumerate() {
                    ids[row * seq + t] = i64::from(token);
                    positions[row * seq + t] = (variant.start + t) as i64;
                    mask[row * total + past + t] = 1;
                }
            }
            let (hd, n_head) = (self.head_dim, self.n_head);
            let fill = |caches: &mut [Vec<f32>]| {
                for (row, &i) in run.iter().enumerate() {
                    let variant = &variants[i];
                    let len = variant.prefix.len;
                    for (slot, cache) in caches.iter_mut().enumerate() {
                        for head in 0..n_head {
                            let from = (slot * n_head + head) * len * hd;
                            let to = ((row * n_head + head) * past) * hd;
                            let rows = variant.start * hd;
                            cache[to..to + rows]
                                .copy_from_slice(&variant.prefix.cache[from..from + rows]);
                        }
                    }
                }
            };
            let (hidden, _) = self.run(batch, seq, past, ids, positions, mask, fill)?;
            for (row, &i) in run.iter().enumerate() {
                let variant = &variants[i];
                let out = &mut pooled[i * 2 * d..(i + 1) * 2 * d];
                let (last, mean) = out.split_at_mut(d);
                let rows = &hidden[row * seq * d..(row * seq + variant.suffix.len()) * d];
                for state in rows.chunks_exact(d) {
                    for (m, h) in mean.iter_mut().zip(state) {
                        *m += h;
                    }
                }
                last.copy_from_slice(&rows[rows.len() - d..]);
            }
        }

        for (i, variant) in variants.iter().enumerate() {
            let count = variant.start + variant.suffix.len();
            let scale = 1.0 / count.max(1) as f32;
            pooled[i * 2 * d + d..(i + 1) * 2 * d].iter_mut().for_each(|m| *m *= scale);
        }
        let mut scores = heads::apply(&self.heads, &pooled, variants.len());
        calibrate(&self.calibration, &mut scores);
        Ok(scores)
    }

    /// Runs the graph over `batch` rows of `seq` new tokens after `past` cached positions,
    /// with the caches (zeroed, `[layer * 2 + kind][batch][head][past][head_dim]`) filled by
    /// `fill`; returns `last_hidden_state` and the presents in the same order.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        batch: usize,
        seq: usize,
        past: usize,
        ids: Vec<i64>,
        positions: Vec<i64>,
        mask: Vec<i64>,
        fill: impl FnOnce(&mut [Vec<f32>]),
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>), ModelError> {
        let slots = self.layers * 2;
        let mut caches = vec![vec![0f32; batch * self.n_head * past * self.head_dim]; slots];
        fill(&mut caches);
        let shape = vec![batch as i64, seq as i64];
        let long =
            |shape: Vec<i64>, data: Vec<i64>| -> Result<SessionInputValue<'static>, ModelError> {
                Ok(Tensor::from_array((shape, data)).map_err(ModelError::Run)?.into())
            };
        let mut inputs: Vec<(String, SessionInputValue<'static>)> = vec![
            ("input_ids".into(), long(shape.clone(), ids)?),
            ("position_ids".into(), long(shape, positions)?),
            ("attention_mask".into(), long(vec![batch as i64, (past + seq) as i64], mask)?),
        ];
        let cache_shape = vec![batch as i64, self.n_head as i64, past as i64, self.head_dim as i64];
        for (slot, cache) in caches.into_iter().enumerate() {
            let tensor =
                Tensor::from_array((cache_shape.clone(), cache)).map_err(ModelError::Run)?;
            inputs.push((past_input(slot / 2, slot % 2), tensor.into()));
        }
        let outputs = self.session.run(inputs).map_err(ModelError::Run)?;
        let read = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let (_, values) = outputs[name].try_extract_tensor::<f32>().map_err(ModelError::Run)?;
            if values.len() != len {
                return Err(ModelError::Contract(format!(
                    "`{name}` has {} values, expected {len}",
                    values.len()
                )));
            }
            Ok(values.to_vec())
        };
        let hidden = read("last_hidden_state", batch * seq * self.n_embd)?;
        let presents = if past == 0 {
            let len = batch * self.n_head * seq * self.head_dim;
            (0..slots)
                .map(|slot| read(&present_output(slot / 2, slot % 2), len))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok((hidden, presents))
    }
}
