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
use crate::model::prefix::{Prefix, Variant};
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

/// A tokenized request.
struct Prepared<C> {
    context: C,
    /// The whole window's tokens.
    window: Vec<u32>,
    /// Event indices to leave out, with the range of their tokens in `window`.
    left_out: Vec<(usize, Range<usize>)>,
    kept: Vec<usize>,
    /// The request's focus text, tokenized.
    focus: Option<Vec<u32>>,
}

impl<C> Prepared<C> {
    /// Score rows of the request: the window, each variant, the focus text.
    fn rows(&self) -> usize {
        1 + self.left_out.len() + usize::from(self.focus.is_some())
    }

    /// The tokens of row `row` as a whole sequence.
    fn sequence(&self, row: usize) -> Vec<u32> {
        match row {
            0 => self.window.clone(),
            r if r <= self.left_out.len() => {
                let cut = &self.left_out[r - 1].1;
                [&self.window[..cut.start], &self.window[cut.end..]].concat()
            }
            _ => self.focus.clone().unwrap_or_default(),
        }
    }
}

impl<C> Worker<C> {
    fn run(mut self) {
        while let Ok(first) = self.requests.recv() {
            let batch = match self.gather(first) {
                Ok(batch) => batch,
                Err(err) => return self.fail(err),
            };
            let scored = match self.scorer.prefix().is_some() {
                true => self.score_reusing_prefixes(batch),
                false => self.score(batch),
            };
            match scored {
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
        let mut sequences = batch[0].rows();
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
            sequences += prepared.rows();
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
        let left_out = request
            .candidates
            .iter()
            .filter_map(|c| encoded.events.iter().find(|(event, _)| event == c).cloned())
            .collect();
        let focus = match &request.focus {
            Some(segments) => Some(
                self.tokenizer
                    .encode_window(segments, self.config.max_tokens)
                    .map_err(|e| ModelError::Contract(e.to_string()))?
                    .ids,
            ),
            None => None,
        };
        Ok(Prepared { context: request.context, window: encoded.ids, left_out, kept, focus })
    }

    /// Scores every row of the pool as a whole sequence, in length-sorted batches. Returns
    /// false when the results have no receiver.
    fn score(&mut self, pool: Vec<Prepared<C>>) -> Result<bool, ModelError> {
        let outputs = self.scorer.outputs();
        let sequences: Vec<Vec<Vec<u32>>> =
            pool.iter().map(|p| (0..p.rows()).map(|row| p.sequence(row)).collect()).collect();
        let mut order: Vec<(usize, usize)> = sequences
            .iter()
            .enumerate()
            .flat_map(|(job, rows)| (0..rows.len()).map(move |row| (job, row)))
            .collect();
        order.sort_by_key(|&(job, row)| sequences[job][row].len());
        let lengths: Vec<usize> =
            order.iter().map(|&(job, row)| sequences[job][row].len()).collect();

        let mut pending = Pending::new(pool);
        for range in plan(&lengths, self.config.batch_size, MAX_PADDING) {
            let chunk = &order[range];
            let inputs: Vec<&[u32]> =
                chunk.iter().map(|&(job, row)| sequences[job][row].as_slice()).collect();
            let started = Instant::now();
            let flat = self.scorer.score(&inputs)?;
            record_call(started, inputs.len());
            for (&(job, row), scores) in chunk.iter().zip(flat.chunks_exact(outputs)) {
                if !pending.record(job, row, scores, &self.results) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Scores the pool with the prefix graph: the windows and focus texts whole, in
    /// length-sorted batches, keeping each window's cache; then each variant's tokens after
    /// the event it leaves out, in batches sorted by that length. Returns false when the
    /// results have no receiver.
    fn score_reusing_prefixes(&mut self, pool: Vec<Prepared<C>>) -> Result<bool, ModelError> {
        let outputs = self.scorer.outputs();
        let mut wholes: Vec<(usize, usize)> = Vec::with_capacity(pool.len() * 2);
        let mut variants: Vec<(usize, usize)> = Vec::new();
        for (job, prepared) in pool.iter().enumerate() {
            wholes.push((job, 0));
            variants.extend((1..=prepared.left_out.len()).map(|row| (job, row)));
            if prepared.focus.is_some() {
                wholes.push((job, prepared.rows() - 1));
            }
        }
        let mut pending = Pending::new(pool);
        wholes.sort_by_key(|&at| whole_tokens(&pending.pool, at).len());
        let lengths: Vec<usize> =
            wholes.iter().map(|&at| whole_tokens(&pending.pool, at).len()).collect();
        let mut prefixes: Vec<Option<Prefix>> = (0..pending.pool.len()).map(|_| None).collect();
        for range in plan(&lengths, self.config.batch_size, MAX_PADDING) {
            let chunk = &wholes[range];
            let inputs: Vec<&[u32]> =
                chunk.iter().map(|&at| whole_tokens(&pending.pool, at)).collect();
            let keep: Vec<Option<usize>> = chunk
                .iter()
                .map(|&(job, row)| match row {
                    0 => pending.prepared(job).left_out.iter().map(|(_, cut)| cut.start).max(),
                    _ => None,
                })
                .collect();
            let prefix = self.scorer.prefix().expect("checked by the caller");
            let started = Instant::now();
            let (flat, kept) = prefix.score_windows(&inputs, &keep)?;
            record_call(started, inputs.len());
            for ((&(job, row), scores), cache) in
                chunk.iter().zip(flat.chunks_exact(outputs)).zip(kept)
            {
                if cache.is_some() {
                    prefixes[job] = cache;
                }
                if !pending.record(job, row, scores, &self.results) {
                    return Ok(false);
                }
            }
        }

        variants.sort_by_key(|&at| variant_parts(&pending.pool, at).1.len());
        // Variants without tokens after their event need no model call: one pass for all.
        let empty = variants.partition_point(|&at| variant_parts(&pending.pool, at).1.is_empty());
        let lengths: Vec<usize> =
            variants[empty..].iter().map(|&at| variant_parts(&pending.pool, at).1.len()).collect();
        let batches = plan(&lengths, self.config.batch_size, MAX_PADDING)
            .into_iter()
            .map(|r| r.start + empty..r.end + empty);
        for range in std::iter::once(0..empty).chain(batches).filter(|r| !r.is_empty()) {
            let chunk = &variants[range.clone()];
            let flat = {
                let inputs: Vec<Variant<'_>> = chunk
                    .iter()
                    .map(|&(job, row)| {
                        let (start, suffix) = variant_parts(&pending.pool, (job, row));
                        let prefix =
                            prefixes[job].as_ref().expect("a window with variants keeps its cache");
                        Variant { prefix, start, suffix }
                    })
                    .collect();
                let prefix = self.scorer.prefix().expect("checked by the caller");
                let started = Instant::now();
                let flat = prefix.score_variants(&inputs)?;
                if range.start >= empty {
                    record_call(started, inputs.len());
                }
                flat
            };
            for (&(job, row), scores) in chunk.iter().zip(flat.chunks_exact(outputs)) {
                if !pending.record(job, row, scores, &self.results) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// The tokens of a window (row 0) or focus text (the last row) scored whole.
fn whole_tokens<C>(pool: &[Option<Prepared<C>>], (job, row): (usize, usize)) -> &[u32] {
    let prepared = pool[job].as_ref().expect("a job is pending until its last row");
    match row {
        0 => &prepared.window,
        _ => prepared.focus.as_deref().unwrap_or_default(),
    }
}

/// A variant row's prefix length in its window and its tokens after the left-out event.
fn variant_parts<C>(pool: &[Option<Prepared<C>>], (job, row): (usize, usize)) -> (usize, &[u32]) {
    let prepared = pool[job].as_ref().expect("a job is pending until its last row");
    let cut = &prepared.left_out[row - 1].1;
    (cut.start, &prepared.window[cut.end..])
}

/// Records one model call's time and size.
fn record_call(started: Instant, sequences: usize) {
    metrics::histogram!(m::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::BATCH_SEQUENCES).record(sequences as f64);
}

/// The requests of a pool with their scores so far; each is sent as soon as its last row is
/// scored.
struct Pending<C> {
    pool: Vec<Option<Prepared<C>>>,
    scores: Vec<Vec<Vec<f32>>>,
    remaining: Vec<usize>,
}

impl<C> Pending<C> {
    fn new(pool: Vec<Prepared<C>>) -> Self {
        let remaining: Vec<usize> = pool.iter().map(Prepared::rows).collect();
        let scores = remaining.iter().map(|&rows| vec![Vec::new(); rows]).collect();
        Pending { pool: pool.into_iter().map(Some).collect(), scores, remaining }
    }

    fn prepared(&self, job: usize) -> &Prepared<C> {
        self.pool[job].as_ref().expect("a job is pending until its last row")
    }

    /// Stores a row's scores and sends the request when it was its last; false when the
    /// results have no receiver.
    fn record(
        &mut self,
        job: usize,
        row: usize,
        scores: &[f32],
        results: &flume::Sender<Result<Scored<C>, ModelError>>,
    ) -> bool {
        self.scores[job][row] = scores.to_vec();
        self.remaining[job] -= 1;
        if self.remaining[job] > 0 {
            return true;
        }
        let prepared = self.pool[job].take().expect("a job completes once");
        let rows = std::mem::take(&mut self.scores[job]);
        results.send(Ok(finish(prepared, rows))).is_ok()
    }
}

fn finish<C>(prepared: Prepared<C>, mut rows: Vec<Vec<f32>>) -> Scored<C> {
    let tokens = prepared.window.len();
    let focus = if prepared.focus.is_some() { rows.pop() } else { None };
    let full = std::mem::take(&mut rows[0]);
    let without = prepared
        .left_out
        .into_iter()
        .map(|(event, _)| event)
        .zip(rows.into_iter().skip(1))
        .collect();
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
