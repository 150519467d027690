//! Unit tests of segments and alerts over the shipped model card's signals.

use super::alerts::{AlertReason, ServiceAlert};
use super::segments::{Change, SegmentChange};
use super::*;
use crate::config::SegmentConfig;
use crate::event::{Action, Click, Event, EventBody, Review};
use crate::window::{Lineage, WindowSpec};

fn card() -> ModelCard {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/model.json");
    ModelCard::load(&path).expect("the shipped model card")
}

fn config(segments: &[(&str, &str)]) -> Config {
    let mut config = Config::load(None, Vec::new()).expect("defaults");
    config.segments = segments
        .iter()
        .map(|(name, rule)| SegmentConfig { name: (*name).into(), rule: (*rule).into() })
        .collect();
    config.output.format = Format::Json;
    config
}

fn record(version: u64, scores: &[(&str, f32)], interests: &[(&str, f32)]) -> SignalRecord {
    SignalRecord::for_test("0123456789abcdef0123456789abcdef", version, scores, interests)
}

fn changes(records: &[ActionRecord]) -> Vec<SegmentChange> {
    records
        .iter()
        .filter(|r| !r.payload.is_empty() && !matches!(r.kind, ActionKind::Alert(_)))
        .map(|r| segments::decode(Format::Json, &r.payload).expect("a segment change"))
        .collect()
}

fn alerts_of(records: &[ActionRecord]) -> Vec<ServiceAlert> {
    records
        .iter()
        .filter(|r| matches!(r.kind, ActionKind::Alert(_)))
        .map(|r| alerts::decode(Format::Json, &r.payload).expect("an alert"))
        .collect()
}

#[test]
fn entering_and_leaving_are_published_once_each() {
    let config = config(&[("ready", "purchase_intent > 0.7 and price_sensitivity > 0.6")]);
    let actions = Actions::compile(&config, &card()).unwrap();
    let mut marks = Marks::default();
    let mut seen = Vec::new();
    let steps = [(0.5, 0.9), (0.8, 0.9), (0.9, 0.7), (0.9, 0.5), (0.2, 0.2)];
    for (version, (intent, price)) in steps.into_iter().enumerate() {
        let scores = [("purchase_intent", intent), ("price_sensitivity", price)];
        let derived = actions.derive(&record(version as u64, &scores, &[]), &[], &marks, None);
        for change in changes(&derived.records) {
            seen.push((change.version, change.change));
            assert_eq!(change.scores["purchase_intent"], intent);
        }
        marks = derived.marks;
    }
    assert_eq!(seen, vec![(1, Change::Entered), (3, Change::Left)]);
    assert!(marks.segments.is_empty());
}

#[test]
fn interest_rules_and_record_keys() {
    let config = config(&[("carts_in_42", "cart_abandonment > 0.8 and interest(\"42\") > 0")]);
    let actions = Actions::compile(&config, &card()).unwrap();
    let elsewhere = record(1, &[("cart_abandonment", 0.9)], &[("7", 1.0)]);
    let derived = actions.derive(&elsewhere, &[], &Marks::default(), None);
    assert!(derived.records.is_empty());

    let in_42 = record(2, &[("cart_abandonment", 0.9)], &[("42", 0.25), ("7", 0.75)]);
    let derived = actions.derive(&in_42, &[], &Marks::default(), None);
    assert_eq!(derived.records.len(), 1);
    let key = format!("{}/carts_in_42", in_42.user_key);
    assert_eq!(derived.records[0].key, key.into_bytes());
    assert_eq!(changes(&derived.records)[0].interests["42"], 0.25);
    assert_eq!(derived.marks.segments, vec![CompactString::from("carts_in_42")]);

    let erased = actions.erase(&in_42.user_key, &derived.marks);
    assert_eq!(erased.len(), 1);
    assert!(erased[0].payload.is_empty(), "a tombstone");
}

#[test]
fn a_segment_removed_from_the_config_is_tombstoned() {
    let actions = Actions::compile(&config(&[]), &card()).unwrap();
    let marks = Marks { segments: vec!["gone".into()], ..Marks::default() };
    let derived = actions.derive(&record(1, &[], &[]), &[], &marks, None);
    assert_eq!(derived.records.len(), 1);
    assert!(derived.records[0].payload.is_empty());
    assert!(derived.marks.segments.is_empty());
}

#[test]
fn unknown_signals_are_named() {
    let err =
        Actions::compile(&config(&[("x", "purchase_intent > 0.1"), ("y", "joy > 0.5")]), &card())
            .err()
            .expect("an unknown signal");
    let message = err.to_string();
    assert!(message.contains("segments[1].rule"), "{message}");
    assert!(message.contains("`y`") && message.contains("`joy`"), "{message}");
    assert!(message.contains("purchase_intent"), "lists the known signals: {message}");
}

fn window_event(id: &str, time: i64, body: EventBody) -> WindowEvent {
    let event = Event {
        user_id: "u".into(),
        event_id: id.into(),
        event_time_ms: time,
        opt_out: false,
        body,
    };
    let lineage = Lineage { topic: "t".into(), partition: 0, offset: time };
    WindowEvent::from_event(&event, lineage, &WindowSpec::default()).expect("windowed")
}

fn buy(id: &str, time: i64, item: &str) -> WindowEvent {
    let click = Click {
        action: Action::Buy,
        item_id: item.into(),
        category_id: "c".into(),
        price: None,
        discount: None,
        quantity: None,
    };
    window_event(id, time, EventBody::Click(click))
}

fn review(id: &str, time: i64, item: &str) -> WindowEvent {
    let review = Review {
        item_id: item.into(),
        rating: Some(1),
        text: "broken".into(),
        language: "en".into(),
    };
    window_event(id, time, EventBody::Review(review))
}

const HOUR: i64 = 3_600_000;

#[test]
fn a_buyers_negative_review_alerts_once_per_item_and_period() {
    let actions = Actions::compile(&config(&[]), &card()).unwrap();
    let negative = [("sentiment", 0.1), ("service_alert", 0.9)];
    let mut events = vec![buy("b1", 0, "item-1"), review("r1", HOUR, "item-1")];

    let first = actions.derive(&record(1, &negative, &[]), &events, &Marks::default(), None);
    let alerts = alerts_of(&first.records);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].reason, AlertReason::NegativeReviewOfPurchase);
    assert_eq!((alerts[0].item_id.as_str(), alerts[0].review.event_id.as_str()), ("item-1", "r1"));
    assert_eq!(alerts[0].category_id, "c", "the bought item's category");

    // The same review seen again, and a second review of the item a day later: suppressed.
    let again = actions.derive(&record(2, &negative, &[]), &events, &first.marks, None);
    assert!(alerts_of(&again.records).is_empty());
    assert!(again.suppressed.is_empty(), "the alerted review seen again is not a repeat");
    events.push(review("r2", 25 * HOUR, "item-1"));
    let repeat = actions.derive(&record(3, &negative, &[]), &events, &again.marks, None);
    assert!(alerts_of(&repeat.records).is_empty());
    assert_eq!(repeat.suppressed, vec![AlertReason::NegativeReviewOfPurchase]);

    // Past the period (7 days), a new review of the same item alerts again.
    events.push(review("r3", 8 * 24 * HOUR + HOUR, "item-1"));
    let later = actions.derive(&record(4, &negative, &[]), &events, &repeat.marks, None);
    assert_eq!(alerts_of(&later.records).len(), 1);
}

#[test]
fn a_positive_review_or_one_of_an_item_not_bought_does_not_alert() {
    let actions = Actions::compile(&config(&[]), &card()).unwrap();
    let events = vec![buy("b1", 0, "item-1"), review("r1", HOUR, "item-1")];
    let positive = [("sentiment", 0.9), ("service_alert", 0.1)];
    assert!(actions
        .derive(&record(1, &positive, &[]), &events, &Marks::default(), None)
        .records
        .is_empty());

    let not_bought = vec![buy("b1", 0, "item-2"), review("r1", HOUR, "item-1")];
    let negative = [("sentiment", 0.1), ("service_alert", 0.9)];
    let derived = actions.derive(&record(1, &negative, &[]), &not_bought, &Marks::default(), None);
    assert!(alerts_of(&derived.records).is_empty());
}

#[test]
fn falling_sentiment_follows_the_reviews_scored_on_their_own() {
    let actions = Actions::compile(&config(&[]), &card()).unwrap();
    let events = vec![review("r1", 0, "item-1"), review("r2", HOUR, "item-2")];
    let first = record(1, &[("sentiment", 0.8)], &[]);
    let before = actions.derive(&first, &events[..1], &Marks::default(), Some(0.9));
    assert!(before.records.is_empty());
    assert_eq!(before.marks.sentiment, Some(0.9), "the review's own score is kept");

    // The window reads 0.6 (no fall from 0.8), but the new review alone reads 0.2.
    let second = record(2, &[("sentiment", 0.6)], &[]);
    let after = actions.derive(&second, &events, &before.marks, Some(0.2));
    let alerts = alerts_of(&after.records);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].reason, AlertReason::FallingSentiment);
    assert_eq!(alerts[0].previous_sentiment, Some(0.9));
    assert_eq!(alerts[0].review.event_id, "r2");

    // The same review seen in a later record does not fall again.
    let again =
        actions.derive(&record(3, &[("sentiment", 0.6)], &[]), &events, &after.marks, Some(0.2));
    assert!(again.records.is_empty());

    // A small fall does not alert; without a focus score the window's sentiment stands in.
    let small = actions.derive(&second, &events, &before.marks, Some(0.7));
    assert!(small.records.is_empty());
    let window =
        actions.derive(&record(2, &[("sentiment", 0.3)], &[]), &events, &before.marks, None);
    assert_eq!(alerts_of(&window.records).len(), 1);
}

#[test]
fn protobuf_records_decode_to_the_same_values() {
    let mut config = config(&[("ready", "purchase_intent > 0.5")]);
    config.output.format = Format::Protobuf;
    let actions = Actions::compile(&config, &card()).unwrap();
    let events = vec![buy("b1", 0, "item-1"), review("r1", HOUR, "item-1")];
    let scores = [("purchase_intent", 0.9), ("sentiment", 0.1), ("service_alert", 0.9)];
    let derived = actions.derive(&record(1, &scores, &[]), &events, &Marks::default(), None);
    assert_eq!(derived.records.len(), 2);
    let change = segments::decode(Format::Protobuf, &derived.records[0].payload).unwrap();
    assert_eq!((change.segment.as_str(), change.change), ("ready", Change::Entered));
    let alert = alerts::decode(Format::Protobuf, &derived.records[1].payload).unwrap();
    assert_eq!(alert.review.event_id, "r1");
    assert_eq!(alert.scores["service_alert"], 0.9);
}
