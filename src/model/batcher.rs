//! Batching workers: each owns one [`Scorer`] on its own thread, takes scoring requests from a
//! shared bounded queue, tokenizes them, forms batches by size and maximum wait (sorted by
//! length so that little is spent on padding), and hands the scores on.
//!
//! A request scores the whole window and, for explanations, the window with each candidate
//! event left out. Workers stop when every sender of the request queue is dropped; a model
//! error is passed on and stops the worker, so no request is dropped silently.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics as m;
use crate::model::scorer::{ModelError, Scorer};
use crate::render::Segment;
use crate::tokenize::TextTokenizer;

/// A window to score, with whatever the caller needs back (`context`).
pub struct ScoreRequest<C> {
    /// The rendered window (header first).
    pub segments: Vec<Segment>,
    /// Window event indices to leave out one at a time, for explanations.
    pub candidates: Vec<usize>,
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
}

impl<C> Worker<C> {
    fn run(mut self) {
        while let Ok(first) = self.requests.recv() {
            let batch = match self.gather(first) {
                Ok(batch) => batch,
                Err(err) => return self.fail(err),
            };
            match self.score(batch) {
                Ok(scored) => {
                    for result in scored {
                        if self.results.send(Ok(result)).is_err() {
                            return;
                        }
                    }
                }
                Err(err) => return self.fail(err),
            }
        }
    }

    fn fail(&self, err: ModelError) {
        tracing::error!(cause = %err, "model worker stopped");
        let _ = self.results.send(Err(err));
    }

    /// Takes `first` and whatever else arrives before the batch is full or the wait is over.
    fn gather(&self, first: ScoreRequest<C>) -> Result<Vec<Prepared<C>>, ModelError> {
        let deadline = Instant::now() + self.config.max_wait;
        let mut batch = vec![self.prepare(first)?];
        let mut sequences = batch[0].sequences.len();
        while sequences < self.config.batch_size {
            match self.requests.recv_deadline(deadline) {
                Ok(request) => {
                    let prepared = self.prepare(request)?;
                    sequences += prepared.sequences.len();
                    batch.push(prepared);
                }
                Err(_) => break,
            }
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
        let mut sequences = Vec::with_capacity(left_out.len() + 1);
        sequences.extend(left_out.iter().map(|&event| encoded.without(event)));
        sequences.insert(0, encoded.ids);
        Ok(Prepared { context: request.context, sequences, left_out, kept })
    }

    fn score(&mut self, batch: Vec<Prepared<C>>) -> Result<Vec<Scored<C>>, ModelError> {
        let outputs = self.scorer.outputs();
        let mut order: Vec<(usize, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(job, p)| (0..p.sequences.len()).map(move |seq| (job, seq)))
            .collect();
        order.sort_by_key(|&(job, seq)| batch[job].sequences[seq].len());

        let mut scores: Vec<Vec<Vec<f32>>> =
            batch.iter().map(|p| vec![Vec::new(); p.sequences.len()]).collect();
        for chunk in order.chunks(self.config.batch_size) {
            let inputs: Vec<&[u32]> =
                chunk.iter().map(|&(job, seq)| batch[job].sequences[seq].as_slice()).collect();
            let started = Instant::now();
            let flat = self.scorer.score(&inputs)?;
            metrics::histogram!(m::INFERENCE_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::histogram!(m::BATCH_SEQUENCES).record(inputs.len() as f64);
            for (&(job, seq), row) in chunk.iter().zip(flat.chunks_exact(outputs)) {
                scores[job][seq] = row.to_vec();
            }
        }

        let scored = batch
            .into_iter()
            .zip(scores)
            .map(|(prepared, mut rows)| {
                let tokens = prepared.sequences[0].len();
                let full = std::mem::take(&mut rows[0]);
                let without = prepared.left_out.into_iter().zip(rows.into_iter().skip(1)).collect();
                Scored { context: prepared.context, full, without, kept: prepared.kept, tokens }
            })
            .collect();
        Ok(scored)
    }
}
