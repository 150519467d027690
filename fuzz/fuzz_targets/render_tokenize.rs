//! Fuzzes the path from decoded events to model input: the window store
//! (src/window/store.rs, src/window/mod.rs), rendering (src/render.rs) and tokenization
//! (src/tokenize.rs), with the shipped model card and tokenizer (models/).
//!
//! The input is JSON lines, read the way `mindstream score` reads a file: each line is decoded
//! and, if accepted, applied to one store as the next offset of one partition, under the
//! window spec, TTL and defaults the processor would use with the shipped model. Every user's
//! window is then rendered and tokenized as the batching workers do. Nothing may panic, and:
//!
//! - a rendering is the header then one line per window event, in window order;
//! - the changelog state written with a request decodes and renders to the same text, so a
//!   restarted processor feeds the model what the old one did;
//! - the token ids fit the card's `max_tokens` and the tokenizer's vocabulary, start with the
//!   header's ids, and keep as many of the newest events as fit, each with exactly its own
//!   ids (only a lone newest event that does not fit whole may be cut short), as
//!   `TextTokenizer::encode_window` promises;
//! - leaving out an explanation candidate removes exactly that event's ids.
//!
//! A line `#N` (N a number) asks for a second tokenization of every window in N tokens, so
//! that budgets smaller than the card's, down to none at all, are covered as well.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mindstream::config::Config;
use mindstream::event::{decode, Format};
use mindstream::model::card::ModelCard;
use mindstream::privacy::Pseudonymizer;
use mindstream::render::{self, Segment};
use mindstream::state;
use mindstream::tokenize::TextTokenizer;
use mindstream::window::store::{Store, StoreConfig};
use mindstream::window::Lineage;

/// What every run shares: the shipped card and tokenizer and the store settings they give.
struct Setup {
    store: StoreConfig,
    tokenizer: TextTokenizer,
    vocab: usize,
    max_tokens: usize,
    topic: Arc<str>,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    let card = ModelCard::load(&models.join("model.json")).expect("models/model.json loads");
    let tokenizer = TextTokenizer::from_file(&models.join(&card.tokenizer_file))
        .expect("the card's tokenizer loads");
    let config = Config::load(None, std::iter::empty()).expect("the default config is valid");
    Setup {
        store: StoreConfig::resolve(&config, &card),
        vocab: tokenizer.vocab_size(),
        tokenizer,
        max_tokens: card.max_tokens,
        topic: Arc::from("fuzz"),
    }
});

/// Largest extra budget a `#N` line may ask for; the card's is a few hundred.
const MAX_EXTRA_BUDGET: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let setup = &*SETUP;
    let key = Pseudonymizer::new(b"fuzz-key-0123456789abcdef").expect("a long enough key");
    let mut store: Store<()> = Store::new(setup.store.clone(), Arc::new(key));
    let now = Instant::now();
    let mut extra_budget = None;
    for (offset, line) in data.split(|&b| b == b'\n').enumerate() {
        if let Some(budget) = budget_line(line) {
            extra_budget = Some(budget);
            continue;
        }
        let Ok(event) = decode(Format::Json, line) else { continue };
        let lineage = Lineage { topic: setup.topic.clone(), partition: 0, offset: offset as i64 };
        let _ = store.apply(event, lineage, (), now);
    }

    for request in store.take_all() {
        let segments = &request.segments;
        check_segments(segments, setup.store.state.window.max_events);
        if let Some(changelog) = &request.context.changelog {
            let snapshot = state::decode(changelog).expect("the store's changelog value decodes");
            assert_eq!(
                &render::render(&snapshot.state),
                segments,
                "the restored state renders differently"
            );
        }
        let events = segments.len() - 1;
        assert!(request.candidates.iter().all(|&c| c < events), "candidate outside the window");
        check_encoding(setup, segments, &request.candidates, setup.max_tokens);
        if let Some(budget) = extra_budget {
            check_encoding(setup, segments, &request.candidates, budget);
        }
    }
});

/// The budget asked for by a `#N` line, if `line` is one.
fn budget_line(line: &[u8]) -> Option<usize> {
    let digits = std::str::from_utf8(line.strip_prefix(b"#")?).ok()?;
    Some(digits.trim().parse::<usize>().ok()?.min(MAX_EXTRA_BUDGET))
}

/// The header, then one line per window event in window order.
fn check_segments(segments: &[Segment], max_events: usize) {
    assert!(!segments.is_empty(), "a rendering has at least its header");
    assert!(segments.len() - 1 <= max_events, "more events rendered than the window keeps");
    for (i, segment) in segments.iter().enumerate() {
        let want = i.checked_sub(1);
        assert_eq!(segment.event, want, "segment {i} is not window event {want:?}");
        let body = segment.text.strip_suffix('\n');
        assert!(
            body.is_some_and(|body| !body.contains(['\n', '\r'])),
            "segment {i} is not exactly one line: {:?}",
            segment.text
        );
    }
}

/// Tokenizes the rendering in `budget` tokens and checks the result against the promises of
/// `TextTokenizer::encode_window` and the ids of each segment encoded alone.
fn check_encoding(setup: &Setup, segments: &[Segment], candidates: &[usize], budget: usize) {
    let tokenizer = &setup.tokenizer;
    let encoded = tokenizer.encode_window(segments, budget).expect("a rendered window encodes");
    let ids = &encoded.ids;
    assert!(ids.len() <= budget, "{} ids for a budget of {budget}", ids.len());
    assert!(ids.iter().all(|&id| (id as usize) < setup.vocab), "an id outside the vocabulary");

    let alone: Vec<Vec<u32>> =
        segments.iter().map(|s| tokenizer.encode(&s.text).expect("a segment encodes")).collect();
    let header_len = alone[0].len().min(budget);
    assert_eq!(ids[..header_len.min(ids.len())], alone[0][..header_len], "header ids differ");

    // The kept events: the newest ones, in window order, back to back after the header.
    let events = segments.len() - 1;
    let spans = &encoded.events;
    let mut at = header_len;
    for (k, (event, range)) in spans.iter().enumerate() {
        assert_eq!(*event, events - spans.len() + k, "kept events are not the newest");
        assert_eq!(range.start, at, "event {event}'s ids do not follow the previous ones");
        let own = &alone[event + 1];
        let got = &ids[range.clone()];
        if spans.len() == 1 && got.len() < own.len() {
            // The newest event alone, cut to the budget: only when it does not fit whole.
            assert_eq!(got, &own[..got.len()], "the cut event's ids are not its own");
            assert_eq!(range.end, budget, "a cut event does not fill the budget");
        } else {
            assert_eq!(got, &own[..], "event {event}'s ids are not its own");
        }
        at = range.end;
    }
    assert_eq!(at, ids.len(), "ids after the last kept event");

    // As many as fit: the next older event would not have (after a cut, nothing is left).
    let left = budget - ids.len();
    if let Some((first, _)) = spans.first() {
        if *first > 0 {
            let older = alone[*first].len();
            assert!(
                older > left,
                "event {} ({older} ids) fits in {left} but was left out",
                first - 1
            );
        }
    } else if events > 0 {
        assert!(alone[0].len() >= budget, "no event kept though the header leaves room");
    }

    for &candidate in candidates {
        let without = encoded.without(candidate);
        let removed = spans.iter().find(|(e, _)| *e == candidate).map_or(0, |(_, r)| r.len());
        assert_eq!(without.len(), ids.len() - removed, "leaving out {candidate} removes too much");
    }
}
