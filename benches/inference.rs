//! Inference throughput: sequences per second through the processor's batching workers
//! against a bare ONNX Runtime session running the same batches.
//!
//! Windows come from the real Taobao slice (`.tools/data` or `../shared/data`): users with at
//! least three events, windows built and rendered with the processor's code and the shipped
//! model's window shape, each request with leave-one-out candidates as the processor makes
//! them. The bare side runs the batches the workers form when their queue is never empty
//! (requests taken in order into a pool of four batches' worth of sequences, sorted by length,
//! cut by the workers' own plan), with the input tensors built before the clock starts. Both sides use one
//! session with the default threads. `cargo bench --bench inference -- [USERS]` (default 1,500).
//!
//! The model is the processor's `[model]` configuration taken from the environment alone
//! (`MINDSTREAM__MODEL__DIR`, `MINDSTREAM__MODEL__EXECUTION_PROVIDER`,
//! `MINDSTREAM__MODEL__IO_BINDING`, ...); with none set, the shipped model on the CPU. The bare
//! side runs a plain session on the same provider and graph, so the ratio shows what the
//! workers (and IO binding, when on) add or cost. The workers run twice: scoring every sequence
//! whole (the bare side's work), and, when the card has a prefix graph and
//! `model.prefix_reuse` is on, scoring variants from their window's cached prefix. Before the
//! clock starts each session scores a few batches, the longest included, so one-time set-up on
//! a GPU is not timed. Any other
//! configuration is also checked against the shipped model on the CPU: the largest difference
//! of the served scores over the first batches is printed. `scripts/gpu-bench.sh` runs the
//! GPU rows.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use mindstream::config::{Config, ExecutionProvider, ModelConfig};
use mindstream::event::Event;
use mindstream::model::batcher::{self, BatchConfig, ScoreRequest};
use mindstream::model::{scorer, LoadedModel};
use mindstream::render::{self, Segment};
use mindstream::tokenize::TextTokenizer;
use mindstream::window::{Lineage, StateSpec, UserState, WindowEvent};
use ort::value::Tensor;

use common::median;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Newest events tried for explanations (the processor's default).
const EXPLAIN_CANDIDATES: usize = 8;
/// Sequences per model call (the processor's default).
const BATCH_SIZE: usize = 32;
/// Timed repetitions of each side; the median is reported.
const REPEATS: usize = 3;
/// Batches each session scores before its clock starts (the longest one is added).
const WARMUP_BATCHES: usize = 4;
/// Batches scored by both the configured and the reference model to compare their scores.
const COMPARED_BATCHES: usize = 64;

fn main() {
    let quick = common::quick();
    let users: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(if quick { 20 } else { 1_500 });
    let repeats = if quick { 1 } else { REPEATS };
    let config = model_config();
    let mut model = LoadedModel::load(&config, 1).expect("load the configured model");
    let card = model.card.clone();
    let windows = taobao_windows(users, &card.window);
    let requests: Vec<Request> = windows.iter().map(request).collect();

    let prepared = prepare(&model.tokenizer, &requests, card.max_tokens);
    let sequences: usize = prepared.iter().map(Vec::len).sum();
    let batches = batches_as_workers_form(&prepared);
    let tokens: usize = batches.iter().flatten().map(Vec::len).sum();
    let padded: usize =
        batches.iter().map(|b| b.len() * b.iter().map(Vec::len).max().unwrap_or(0)).sum();

    let difference = (!is_default(&config)).then(|| {
        let compared = &batches[..batches.len().min(COMPARED_BATCHES)];
        (compared.len(), largest_difference(&config, &mut model, compared))
    });
    let bare = median((0..repeats).map(|_| bare_session(&config, &card, &batches)).collect());
    drop(model.scorers);
    let warmup = warmup_batches(&batches);
    let timed = |config: &ModelConfig| {
        let runs = (0..repeats).map(|_| {
            through_workers(config, &model.tokenizer, card.max_tokens, &requests, &warmup)
        });
        median(runs.collect())
    };
    // The workers scoring every sequence whole run the bare side's batches: their ratio is
    // what the workers add. With the prefix graph they compute less for the same results.
    let pipeline = timed(&ModelConfig { prefix_reuse: false, ..config.clone() });
    let reusing = (config.prefix_reuse && card.prefix_graph.is_some()).then(|| timed(&config));

    let rate = |elapsed: Duration| sequences as f64 / elapsed.as_secs_f64();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| model | {} ({}, {}), {} provider, io_binding {} |",
        config.dir.display(),
        card.model_version,
        card.precision.as_str(),
        model.provider,
        config.io_binding
    );
    if let Some((compared, difference)) = difference {
        println!(
            "| largest score difference from the shipped model on the cpu ({compared} batches) \
             | {difference:.2e} |"
        );
    }
    println!("| windows (users) | {} |", requests.len());
    println!("| sequences (windows and leave-one-out variants) | {sequences} |");
    println!("| batches of up to {BATCH_SIZE} | {} |", batches.len());
    println!(
        "| padding | {:.1}% of {padded} token slots |",
        100.0 * (1.0 - tokens as f64 / padded as f64)
    );
    let (now, reused) = prefix_reuse(&model.tokenizer, &requests, card.max_tokens);
    println!(
        "| token positions computed, every sequence whole / variants from the window's cached \
         prefix | {now} / {reused} ({:.2}x fewer) |",
        now as f64 / reused as f64
    );
    println!("| bare session | {:.0} sequences/s ({:.2} s) |", rate(bare), bare.as_secs_f64());
    println!(
        "| through the workers, every sequence whole | {:.0} sequences/s ({:.2} s) |",
        rate(pipeline),
        pipeline.as_secs_f64()
    );
    println!("| ratio, workers / bare | {:.3} |", bare.as_secs_f64() / pipeline.as_secs_f64());
    if let Some(reusing) = reusing {
        println!(
            "| through the workers, variants from cached prefixes | {:.0} sequences/s ({:.2} s) \
             |",
            rate(reusing),
            reusing.as_secs_f64()
        );
        println!(
            "| ratio, workers reusing prefixes / bare | {:.3} |",
            bare.as_secs_f64() / reusing.as_secs_f64()
        );
    }
}

type Request = ScoreRequest<usize>;

/// The `[model]` section from `MINDSTREAM__MODEL__*` alone; the defaults where none is set.
fn model_config() -> ModelConfig {
    let env = std::env::vars().filter(|(key, _)| key.starts_with("MINDSTREAM__MODEL__"));
    Config::load(None, env).expect("MINDSTREAM__MODEL__* settings").model
}

/// Whether `config` is the bench's default: the shipped model, plainly, on the CPU.
fn is_default(config: &ModelConfig) -> bool {
    let shipped = ModelConfig::default();
    config.dir == shipped.dir
        && config.execution_provider == ExecutionProvider::Cpu
        && !config.io_binding
}

/// Largest difference between the served scores of `model` and of the shipped model on the
/// CPU, over `batches`.
fn largest_difference(
    config: &ModelConfig,
    model: &mut LoadedModel,
    batches: &[Vec<Vec<u32>>],
) -> f32 {
    let reference =
        ModelConfig { ort_library: config.ort_library.clone(), ..ModelConfig::default() };
    let mut reference = LoadedModel::load(&reference, 1).expect("load the shipped model");
    let mut largest = 0.0f32;
    for batch in batches {
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let ours = model.scorers[0].score(&refs).expect("score");
        let theirs = reference.scorers[0].score(&refs).expect("score with the shipped model");
        assert_eq!(ours.len(), theirs.len(), "the models have different signals");
        let batch_largest =
            ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        largest = largest.max(batch_largest);
    }
    largest
}

/// The first [`WARMUP_BATCHES`] batches and the one with the most token slots.
fn warmup_batches(batches: &[Vec<Vec<u32>>]) -> Vec<Vec<Vec<u32>>> {
    let slots = |b: &&Vec<Vec<u32>>| b.len() * b.iter().map(Vec::len).max().unwrap_or(0);
    let mut warmup: Vec<Vec<Vec<u32>>> = batches.iter().take(WARMUP_BATCHES).cloned().collect();
    warmup.extend(batches.iter().max_by_key(slots).cloned());
    warmup
}

/// Windows of the first `users` Taobao users with at least three events.
fn taobao_windows(users: usize, window: &mindstream::window::WindowSpec) -> Vec<UserState> {
    let events = common::taobao_events();
    let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in events {
        by_user.entry(event.user_id.to_string()).or_default().push(event);
    }
    let spec = StateSpec {
        window: *window,
        user_ttl_ms: 30 * 86_400_000,
        interest_half_life_ms: 7 * 86_400_000,
        interests_tracked: 32,
    };
    let lineage = Lineage { topic: "clicks".into(), partition: 0, offset: 0 };
    by_user
        .into_values()
        .filter(|events| events.len() >= 3)
        .take(users)
        .map(|events| {
            let mut stored =
                events.iter().filter_map(|e| WindowEvent::from_event(e, lineage.clone(), window));
            let mut state = UserState::new(stored.next().expect("three events"), &spec);
            stored.for_each(|e| state.apply(e, &spec));
            state
        })
        .collect()
}

fn request(state: &UserState) -> Request {
    let segments: Vec<Segment> = render::render(state);
    let count = state.events().len();
    let candidates = (count.saturating_sub(EXPLAIN_CANDIDATES)..count).collect();
    ScoreRequest { segments, candidates, focus: None, context: 0 }
}

fn clone_request(request: &Request) -> Request {
    ScoreRequest {
        segments: request.segments.clone(),
        candidates: request.candidates.clone(),
        focus: request.focus.clone(),
        context: request.context,
    }
}

/// Each request's sequences, tokenized as a worker does: the window, then each candidate left
/// out.
fn prepare(
    tokenizer: &TextTokenizer,
    requests: &[Request],
    max_tokens: usize,
) -> Vec<Vec<Vec<u32>>> {
    requests
        .iter()
        .map(|request| {
            let encoded = tokenizer.encode_window(&request.segments, max_tokens).expect("tokenize");
            let kept: Vec<usize> = encoded.events.iter().map(|(event, _)| *event).collect();
            let mut sequences = vec![encoded.ids.clone()];
            for &candidate in request.candidates.iter().filter(|c| kept.contains(c)) {
                sequences.push(encoded.without(candidate));
            }
            sequences
        })
        .collect()
}

/// Token positions the model computes for the requests with every sequence whole, and with
/// each leave-one-out variant reusing the window's cached keys and values for the tokens
/// before the event it leaves out: only the tokens after that event.
fn prefix_reuse(
    tokenizer: &TextTokenizer,
    requests: &[Request],
    max_tokens: usize,
) -> (usize, usize) {
    let (mut now, mut reused) = (0, 0);
    for request in requests {
        let encoded = tokenizer.encode_window(&request.segments, max_tokens).expect("tokenize");
        let full = encoded.ids.len();
        now += full;
        reused += full;
        for (event, range) in &encoded.events {
            if request.candidates.contains(event) {
                now += full - range.len();
                reused += full - range.end;
            }
        }
    }
    (now, reused)
}

/// The batches a worker with a full queue forms: requests in order until a pool of
/// `POOL_BATCHES` batches' worth of sequences, sorted by length, cut by the worker's own plan.
fn batches_as_workers_form(prepared: &[Vec<Vec<u32>>]) -> Vec<Vec<Vec<u32>>> {
    let mut batches = Vec::new();
    let mut group: Vec<Vec<u32>> = Vec::new();
    let flush = |group: &mut Vec<Vec<u32>>, batches: &mut Vec<Vec<Vec<u32>>>| {
        group.sort_by_key(Vec::len);
        let lengths: Vec<usize> = group.iter().map(Vec::len).collect();
        for range in batcher::plan(&lengths, BATCH_SIZE, batcher::MAX_PADDING) {
            batches.push(group[range].to_vec());
        }
        group.clear();
    };
    for sequences in prepared {
        group.extend(sequences.iter().cloned());
        if group.len() >= BATCH_SIZE * batcher::POOL_BATCHES {
            flush(&mut group, &mut batches);
        }
    }
    if !group.is_empty() {
        flush(&mut group, &mut batches);
    }
    batches
}

/// Runs every batch through a plain session, inputs built before timing starts.
fn bare_session(
    config: &ModelConfig,
    card: &mindstream::model::card::ModelCard,
    batches: &[Vec<Vec<u32>>],
) -> Duration {
    let path = Path::new(&config.dir).join(&card.onnx_file);
    let (mut session, _) = scorer::open_session(&path, config).expect("session");
    let wants_positions = session.inputs().iter().any(|i| i.name() == "position_ids");
    let inputs_of = |batch: &Vec<Vec<u32>>| {
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let (seq, ids, mask, positions) = scorer::pad_batch(&refs);
        let shape = vec![batch.len() as i64, seq as i64];
        let tensor = |data: Vec<i64>| Tensor::from_array((shape.clone(), data)).expect("tensor");
        let mut inputs = ort::inputs!["input_ids" => tensor(ids), "attention_mask" => tensor(mask)];
        if wants_positions {
            inputs.push(("position_ids".into(), tensor(positions).into()));
        }
        inputs
    };
    for batch in &warmup_batches(batches) {
        session.run(inputs_of(batch)).expect("warm-up run");
    }
    let inputs: Vec<_> = batches.iter().map(inputs_of).collect();
    let started = Instant::now();
    for batch in inputs {
        let outputs = session.run(batch).expect("run");
        drop(outputs);
    }
    started.elapsed()
}

/// Sends every request through a worker (tokenization, batching, scoring) and waits for
/// every result. Each round loads a fresh session (the workers consume theirs) and warms it
/// up on `warmup`, before the clock starts.
fn through_workers(
    config: &ModelConfig,
    tokenizer: &TextTokenizer,
    max_tokens: usize,
    requests: &[Request],
    warmup: &[Vec<Vec<u32>>],
) -> Duration {
    let mut model = LoadedModel::load(config, 1).expect("reload the model");
    for batch in warmup {
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        model.scorers[0].score(&refs).expect("warm-up batch");
        if let Some(prefix) = model.scorers[0].prefix() {
            prefix.score_windows(&refs, &vec![None; refs.len()]).expect("warm-up batch");
        }
    }
    let config =
        BatchConfig { batch_size: BATCH_SIZE, max_wait: Duration::from_millis(5), max_tokens };
    let owned: Vec<Request> = requests.iter().map(clone_request).collect();
    let (request_tx, request_rx) = flume::bounded(256);
    let (result_tx, result_rx) = flume::unbounded();
    let started = Instant::now();
    let workers = batcher::spawn_workers(model.scorers, tokenizer, config, request_rx, result_tx);
    let feeder = std::thread::spawn(move || {
        for request in owned {
            if request_tx.send(request).is_err() {
                break;
            }
        }
    });
    let mut results = 0;
    for outcome in result_rx.iter() {
        outcome.expect("scoring");
        results += 1;
    }
    let elapsed = started.elapsed();
    feeder.join().expect("feeder");
    for worker in workers {
        worker.join().expect("worker");
    }
    assert_eq!(results, requests.len(), "every request scored");
    elapsed
}
