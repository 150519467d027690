//! Explanations name the events whose removal moves a score most.
//!
//! `mindstream score` runs over real CDNOW purchase histories with every event a leave-one-out
//! candidate. For each user the test then rebuilds the window itself, renders it, removes
//! each event's line in turn, tokenizes the rest afresh and scores every variant with its own
//! ONNX Runtime session. The event the record names first must be the one whose removal moves
//! the score most, and the record's deltas must equal the ones measured here.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use mindstream::config::{Config, ModelConfig};
use mindstream::event::{Event, Format};
use mindstream::import::{self, Source};
use mindstream::model::card::ModelCard;
use mindstream::model::scorer::{OrtScorer, Scorer};
use mindstream::model::LoadedModel;
use mindstream::privacy::Pseudonymizer;
use mindstream::render::{self, Segment};
use mindstream::signals::SignalRecord;
use mindstream::tokenize::TextTokenizer;
use mindstream::window::{Lineage, StateSpec, UserState, WindowEvent};

use crate::support::{root, sample_data, KEY};

/// Users with at least this many purchases are explained.
const MIN_EVENTS: usize = 4;
/// Users taken from the file.
const USERS: usize = 12;

fn users_with_history() -> BTreeMap<String, Vec<Event>> {
    let path = sample_data().join("purchases/cdnow-master.txt");
    let events = import::events(Source::Cdnow, &path).expect("import CDNOW");
    let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in events {
        by_user.entry(event.user_id.to_string()).or_default().push(event);
    }
    by_user.retain(|_, events| (MIN_EVENTS..=12).contains(&events.len()));
    by_user.into_iter().take(USERS).collect()
}

/// The window the processor keeps for these events (all within one TTL here).
fn window(card: &ModelCard, events: &[Event]) -> UserState {
    let spec = StateSpec {
        window: card.window,
        user_ttl_ms: card.user_ttl_ms,
        interest_half_life_ms: 7 * 86_400_000,
        interests_tracked: 32,
    };
    let lineage = Lineage { topic: Arc::from("test"), partition: 0, offset: 0 };
    let mut events =
        events.iter().filter_map(|e| WindowEvent::from_event(e, lineage.clone(), &spec.window));
    let first = events.next().expect("a user has events");
    let mut state = UserState::new(first, &spec);
    for event in events {
        state.apply(event, &spec);
    }
    state
}

fn ids(tokenizer: &TextTokenizer, segments: &[Segment], max_tokens: usize) -> Vec<u32> {
    tokenizer.encode_window(segments, max_tokens).expect("tokenize").ids
}

#[test]
fn the_named_top_event_moves_the_score_most() {
    let dir = tempfile::tempdir().unwrap();
    let users = users_with_history();
    assert!(users.len() >= 5, "too few CDNOW users with {MIN_EVENTS}+ purchases");
    let input = dir.path().join("events.jsonl");
    let mut file = std::fs::File::create(&input).unwrap();
    let mut all: Vec<&Event> = users.values().flatten().collect();
    all.sort_by_key(|e| e.event_time_ms);
    for event in all {
        file.write_all(&mindstream::event::encode(Format::Json, event)).unwrap();
        file.write_all(b"\n").unwrap();
    }
    drop(file);

    let models = root().join("models");
    let text = format!(
        "[model]\ndir = {:?}\n[scoring]\nexplain_candidates = 32\nexplain_top = 3\n",
        models.display().to_string()
    );
    let config: Config = toml::from_str(&text).expect("test config");
    let model_config = ModelConfig { dir: models.clone(), ..ModelConfig::default() };
    let model = LoadedModel::load(&model_config, 1).expect("load the shipped model");
    let card = model.card.clone();
    let tokenizer = model.tokenizer.clone();
    let key = Pseudonymizer::new(KEY.as_bytes()).unwrap();
    let output = dir.path().join("signals.jsonl");
    let pseudonyms = Pseudonymizer::new(KEY.as_bytes()).unwrap();
    mindstream::offline::score_file(&config, model, pseudonyms, &input, &output, None)
        .expect("score the file");
    let records: BTreeMap<String, SignalRecord> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<SignalRecord>(line).unwrap())
        .map(|r| (r.user_key.clone(), r))
        .collect();

    let mut scorer = OrtScorer::load(&models, &card, &model_config).expect("second session");
    let mut checked = 0;
    for (user, events) in &users {
        let record = &records[&key.key(user)];
        let state = window(&card, events);
        let segments = render::render(&state);
        let full_ids = ids(&tokenizer, &segments, card.max_tokens);
        let mut variants = vec![full_ids];
        for index in 0..state.events().len() {
            let kept: Vec<Segment> =
                segments.iter().filter(|s| s.event != Some(index)).cloned().collect();
            variants.push(ids(&tokenizer, &kept, card.max_tokens));
        }
        let rows: Vec<&[u32]> = variants.iter().map(Vec::as_slice).collect();
        let flat = scorer.score(&rows).expect("score the variants");
        let scores: Vec<&[f32]> = flat.chunks_exact(scorer.outputs()).collect();

        for score in &record.scores {
            let Some(signal) = card.signal_index(&score.signal) else { continue };
            let deltas: Vec<(String, f32)> = state
                .events()
                .iter()
                .enumerate()
                .map(|(i, e)| (e.event_id.to_string(), scores[0][signal] - scores[i + 1][signal]))
                .collect();
            let largest = deltas.iter().map(|(_, d)| d.abs()).fold(0.0, f32::max);
            assert!(!score.top_events.is_empty(), "{}: no top events", score.signal);
            let top = &score.top_events[0];
            let measured =
                deltas.iter().find(|(id, _)| *id == top.event_id).expect("a window event");
            assert!(
                (measured.1 - top.delta).abs() < 1e-4,
                "{}: record says delta {} for {}, measured {}",
                score.signal,
                top.delta,
                top.event_id,
                measured.1
            );
            assert!(
                measured.1.abs() >= largest - 1e-5,
                "{}: named {} (|delta| {}), but removing another event moves it by {largest}",
                score.signal,
                top.event_id,
                measured.1.abs()
            );
            for pair in score.top_events.windows(2) {
                assert!(pair[0].delta.abs() >= pair[1].delta.abs(), "top events out of order");
            }
            assert!(score.top_events.len() <= 3);
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} scores were checked");
}
