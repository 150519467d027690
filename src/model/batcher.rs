//! Batching workers: each owns one [`Scorer`] on its own thread, takes scoring requests from a
//! shared bounded queue, tokenizes them, forms batches by size and maximum wait, and hands the
//! scores on.
//!
//! A worker gathers a pool of up to [`POOL_BATCHES`] batches' worth of sequences (as many as
//! arrive before `max_wait`), sorts them by length and cuts the sorted run into batches of at
//! most `batch_size` sequences that waste at most [`MAX_PADDING`] of their token slots on
//! padding ([`plan`]). Padding is pure waste for the model, and a batch's size hardly matters to
//! its speed on a CPU (the matrix rows are batch times sequence length either way), so short
//! tight batches beat full ragged ones. A request's scores are handed on as soon as its last
//! sequence is scored, not when the whole pool is.
//!
//! A request scores the whole window and, for explanations, the window with each candidate
//! event left out. Workers stop when every sender of the request queue is dropped; a model
//! error is passed on and stops the worker, so no request is dropped silently.

use std::ops::Range;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics as m;
use crate::model::scorer::{ModelError, Scorer};
use crate::render::Segment;
use crate::tokenize::TextTokenizer;

/// A worker's pool holds up to this many batches' worth of sequences.
pub const POOL_BATCHES: usize = 4;

/// Largest share of a batch's token slots that may be padding, unless the batch has a single
/// sequence.
pub const MAX_PADDING: f64 = 0.1;

/// A window to score, with whatever the caller needs back (`context`).
pub struct ScoreRequest<C> {
    /// The rendered window (header first).
    pub segments: Vec<Segment>,
    /// Window event indices to leave out one at a time, for explanations.
    pub candidates: Vec<usize>,
    /// A text scored on its own besides the window: the review service alerts are about
    /// ([`crate::window::focus_review`]), rendered as the one-event window the sentiment head
    /// learned reviews from.
    pub focus: Option<Vec<Segment>>,
    pub context: C,
}

/// Scores of one request.
pub struct Scored<C> {
    pub context: C,
    /// Scores of the whole window, one per model output.
    pub full: Vec<f32>,
    /// `(event index, scores without that event)` for the candidates that reached the model.
    pub without: Vec<(usize, Vec<f32>)>,
    /// Window event indices whose tokens fit into the model input, oldest first.
    pub kept: Vec<usize>,
    /// Tokens in the whole-window sequence.
    pub tokens: usize,
    /// Scores of the request's `focus` text, when it had one.
    pub focus: Option<Vec<f32>>,
}

impl BatchConfig {
    /// The batching of `config` for a model that takes `max_tokens`.
    pub fn new(config: &crate::config::ScoringConfig, max_tokens: usize) -> BatchConfig {
        BatchConfig { batch_size: config.batch_size, max_wait: config.max_batch_wait, max_tokens }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Most sequences per model call.
    pub batch_size: usize,
    /// Longest a partial batch waits for more requests.
    pub max_wait: Duration,
    /// Longest token sequence the model takes.
    pub max_tokens: usize,
}

/// Starts one worker thread per scorer. Results (or the first model error of a worker) go to
/// `results`; a worker ends when `requests` has no senders left or `results` no receiver.
pub fn spawn_workers<C: Send + 'static>(
    scorers: Vec<Box<dyn Scorer>>,
    tokenizer: &TextTokenizer,
    config: BatchConfig,
    requests: flume::Receiver<ScoreRequest<C>>,
    results: flume::Sender<Result<Scored<C>, ModelError>>,
) -> Vec<JoinHandle<()>> {
    scorers
        .into_iter()
        .enumerate()
        .map(|(index, scorer)| {
            let worker = Worker {
                scorer,
                tokenizer: tokenizer.clone(),
                config,
                requests: requests.clone(),
                results: results.clone(),
            };
            std::thread::Builder::new()
                .name(format!("mindstream-model-{index}"))
                .spawn(move || worker.run())
                .expect("spawning a thread only fails when the process is out of resources")
        })
        .collect()
}

struct Worker<C> {
    scorer: Box<dyn Scorer>,
    tokenizer: TextTokenizer,
    config: BatchConfig,
    requests: flume::Receiver<ScoreRequest<C>>,
    results: flume::Sender<Result<Scored<C>, ModelError>>,
}

/// A tokenized request: its sequences, whole window first.
struct Prepared<C> {
    context: C,
    sequences: Vec<Vec<u32>>,
    /// Event index of `sequences[i + 1]`.
    left_out: Vec<usize>,
    kept: Vec<usize>,
    /// Whether the last sequence is the request's focus text.
    focus: bool,
}

impl<C> Worker<C> {
    fn run(mut self) {
        while let Ok(first) = self.requests.recv() {
            let batch = match self.gather(first) {
                Ok(batch) => batch,
                Err(err) => return self.fail(err),
            };
            match self.score(batch) {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) => return self.fail(err),
            }
        }
    }

    fn fail(&self, err: ModelError) {
        tracing::error!(cause = %err, "model worker stopped");
        let _ = self.results.send(Err(err));
    }

    /// Takes `first` and whatever else arrives before the pool is full or the wait is over.
    fn gather(&self, first: ScoreRequest<C>) -> Result<Vec<Prepared<C>>, ModelError> {
        let deadline = Instant::now() + self.config.max_wait;
        let mut batch = vec![self.prepare(first)?];
        let mut sequences = batch[0].sequences.len();
        let pool = self.config.batch_size.saturating_mul(POOL_BATCHES);
        while sequences < pool {
            // What is already queued is taken at once; beyond one batch, nothing is waited for.
            let next = if sequences < self.config.batch_size {
                self.requests.recv_deadline(deadline).ok()
            } else {
                self.requests.try_recv().ok()
            };
            let Some(request) = next else { break };
            let prepared = self.prepare(request)?;
            sequences += prepared.sequences.len();
            batch.push(prepared);
        }
        metrics::gauge!(m::SCORING_QUEUE_DEPTH).set(self.requests.len() as f64);
        Ok(batch)
    }

    fn prepare(&self, request: ScoreRequest<C>) -> Result<Prepared<C>, ModelError> {
        let encoded = self
            .tokenizer
            .encode_window(&request.segments, self.config.max_tokens)
            .map_err(|e| ModelError::Contract(e.to_string()))?;
        let kept: Vec<usize> = encoded.events.iter().map(|(event, _)| *event).collect();
        let left_out: Vec<usize> =
            request.candidates.iter().copied().filter(|c| kept.contains(c)).collect();
        let mut sequences = Vec::with_capacity(left_out.len() + 2);
        sequences.extend(left_out.iter().map(|&event| encoded.without(event)));
        sequences.insert(0, encoded.ids);
        let focus = match &request.focus {
            Some(segments) => {
                let focused = self
                    .tokenizer
                    .encode_window(segments, self.config.max_tokens)
                    .map_err(|e| ModelError::Contract(e.to_string()))?;
                sequences.push(focused.ids);
                true
            }
            None => false,
        };
        Ok(Prepared { context: request.context, sequences, left_out, kept, focus })
    }

    /// Scores the pool in length-sorted batches and sends each request's result as soon as its
    /// last sequence is scored. Returns false when the results have no receiver.
    fn score(&mut self, pool: Vec<Prepared<C>>) -> Result<bool, ModelError> {
        let outputs = self.scorer.outputs();
        let mut order: Vec<(usize, usize)> = pool
            .iter()
            .enumerate()
            .flat_map(|(job, p)| (0..p.sequences.len()).map(move |seq| (job, seq)))
            .collect();
        order.sort_by_key(|&(job, seq)| pool[job].sequences[seq].len());
        let lengths: Vec<usize> =
            order.iter().map(|&(job, seq)| pool[job].sequences[seq].len()).collect();

        let mut remaining: Vec<usize> = pool.iter().map(|p| p.sequences.len()).collect();
        let mut scores: Vec<Vec<Vec<f32>>> =
            pool.iter().map(|p| vec![Vec::new(); p.sequences.len()]).collect();
        let mut pool: Vec<Option<Prepared<C>>> = pool.into_iter().map(Some).collect();
        for range in plan(&lengths, self.config.batch_size, MAX_PADDING) {
            let chunk = &order[range];
            let inputs: Vec<&[u32]> = chunk
                .iter()
                .map(|&(job, seq)| {
                    pool[job].as_ref().expect("scored jobs are complete").sequences[seq].as_slice()
                })
                .collect();
            let started = Instant::now();
            let flat = self.scorer.score(&inputs)?;
            metrics::histogram!(m::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::histogram!(m::BATCH_SEQUENCES).record(inputs.len() as f64);
            for (&(job, seq), row) in chunk.iter().zip(flat.chunks_exact(outputs)) {
                scores[job][seq] = row.to_vec();
                remaining[job] -= 1;
                if remaining[job] > 0 {
                    continue;
                }
                let prepared = pool[job].take().expect("a job completes once");
                let rows = std::mem::take(&mut scores[job]);
                if self.results.send(Ok(finish(prepared, rows))).is_err() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

fn finish<C>(prepared: Prepared<C>, mut rows: Vec<Vec<f32>>) -> Scored<C> {
    let tokens = prepared.sequences[0].len();
    let focus = if prepared.focus { rows.pop() } else { None };
    let full = std::mem::take(&mut rows[0]);
    let without = prepared.left_out.into_iter().zip(rows.into_iter().skip(1)).collect();
    Scored { context: prepared.context, full, without, kept: prepared.kept, tokens, focus }
}

/// Cuts sequences sorted by ascending `lengths` into consecutive batches of at most
/// `batch_size` that spend at most `max_padding` of their slots on padding (a batch of one is
/// always allowed). Returns index ranges into `lengths`.
pub fn plan(lengths: &[usize], batch_size: usize, max_padding: f64) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    for (index, &length) in lengths.iter().enumerate() {
        let count = index - start + 1;
        let slots = count * length;
        let padding = 1.0 - (tokens + length) as f64 / slots.max(1) as f64;
        if count > 1 && (count > batch_size.max(1) || padding > max_padding) {
            batches.push(start..index);
            start = index;
            tokens = 0;
        }
        tokens += length;
    }
    if start < lengths.len() {
        batches.push(start..lengths.len());
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padding(lengths: &[usize], range: &Range<usize>) -> f64 {
        let slice = &lengths[range.clone()];
        let slots = slice.len() * slice.iter().max().copied().unwrap_or(0);
        1.0 - slice.iter().sum::<usize>() as f64 / slots as f64
    }

    #[test]
    fn plan_covers_every_sequence_in_order_within_the_limits() {
        let mut lengths: Vec<usize> = (0..200).map(|i| 10 + (i * 37) % 180).collect();
        lengths.sort_unstable();
        let batches = plan(&lengths, 32, 0.1);
        let mut next = 0;
        for range in &batches {
            assert_eq!(range.start, next, "consecutive and complete");
            next = range.end;
            assert!(range.len() <= 32);
            assert!(range.len() == 1 || padding(&lengths, range) <= 0.1, "{range:?}");
        }
        assert_eq!(next, lengths.len());
    }

    #[test]
    fn equal_lengths_fill_whole_batches_and_outliers_stand_alone() {
        assert_eq!(plan(&[7; 70], 32, 0.1), [0..32, 32..64, 64..70]);
        assert_eq!(plan(&[10, 10, 100], 32, 0.1), [0..2, 2..3]);
        assert_eq!(plan(&[], 32, 0.1), Vec::<Range<usize>>::new());
        // Batches of one are allowed whatever the padding limit.
        assert_eq!(plan(&[1, 2, 3], 32, 0.0), [0..1, 1..2, 2..3]);
    }
}
