//! Signal records: what the processor publishes for each scoring of a user's window.
//!
//! [`build`] turns the model's scores for a window (and for the window with each candidate
//! event left out) into a [`SignalRecord`]: calibrated head outputs for the signals that apply
//! to the window, the rule-derived `service_alert`, decayed interests, the top contributing
//! events per signal, and lineage. The record has a JSON form (serde) and a protobuf form
//! (`proto/signals.proto`) with the same field names.

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::event::Format;
use crate::model::card::{AppliesWhen, ModelCard, SignalSpec};
use crate::proto::signals as pb;
use crate::render;
use crate::window::{Lineage, UserState, WindowEvent};

/// Name of the rule-derived customer-care signal.
pub const SERVICE_ALERT: &str = "service_alert";
/// Head the service alert is derived from.
pub const SENTIMENT: &str = "sentiment";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub user_key: String,
    pub version: u64,
    pub model_version: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub event_count: u32,
    pub scores: Vec<Score>,
    pub interests: Vec<InterestWeight>,
    /// The window's items by interest (`interests.top_items` of them); empty where the events
    /// carry no item ids.
    #[serde(default)]
    pub interest_items: Vec<ItemWeight>,
    /// Event time the interests are as of: the newest event applied to the user's state.
    #[serde(default)]
    pub interests_refreshed_ms: i64,
    pub lineage: RecordLineage,
    pub produced_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub signal: String,
    pub value: f32,
    pub status: String,
    pub top_events: Vec<Contribution>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub event_id: String,
    pub event_time_ms: i64,
    pub summary: String,
    pub delta: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterestWeight {
    pub category_id: String,
    pub weight: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemWeight {
    pub item_id: String,
    pub category_id: String,
    pub weight: f32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLineage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What a scoring needs from the window besides the model's scores; taken when the scoring
/// request is made so that the window may change while the model works.
#[derive(Clone, Debug)]
pub struct WindowFacts {
    pub user_key: String,
    pub version: u64,
    pub events: Vec<WindowEvent>,
    pub interests: Vec<InterestWeight>,
    pub interest_items: Vec<ItemWeight>,
    pub interests_refreshed_ms: i64,
}

/// How much of a user's interests a record carries.
#[derive(Clone, Copy, Debug)]
pub struct InterestFeed {
    /// Categories, from the user's decayed counters.
    pub top_categories: usize,
    /// Items, from the window.
    pub top_items: usize,
    /// Half-life of an event's weight in the item ranking, ms.
    pub half_life_ms: i64,
}

impl WindowFacts {
    pub fn of(user_key: String, state: &UserState, feed: InterestFeed) -> WindowFacts {
        let interests = state
            .top_interests(feed.top_categories)
            .into_iter()
            .map(|(category, weight)| InterestWeight { category_id: category.into(), weight })
            .collect();
        let interest_items = state
            .top_items(feed.top_items, feed.half_life_ms)
            .into_iter()
            .map(|i| ItemWeight {
                item_id: i.item_id.into(),
                category_id: i.category_id.into(),
                weight: i.weight,
            })
            .collect();
        WindowFacts {
            user_key,
            version: state.version(),
            events: state.events().iter().cloned().collect(),
            interests,
            interest_items,
            interests_refreshed_ms: state.newest_ms(),
        }
    }
}

/// What the model returned for one window.
#[derive(Clone, Copy, Debug)]
pub struct ModelScores<'a> {
    /// The whole window's scores, one per head.
    pub full: &'a [f32],
    /// The scores with each candidate event (a window index) left out.
    pub without: &'a [(usize, Vec<f32>)],
    /// Window indices of the events that reached the model.
    pub kept: &'a [usize],
    /// The scores of the window's focus review ([`crate::window::focus_review`]), scored on
    /// its own.
    pub focus: Option<&'a [f32]>,
}

impl<'a, C> From<&'a crate::model::batcher::Scored<C>> for ModelScores<'a> {
    fn from(scored: &'a crate::model::batcher::Scored<C>) -> Self {
        ModelScores {
            full: &scored.full,
            without: &scored.without,
            kept: &scored.kept,
            focus: scored.focus.as_deref(),
        }
    }
}

/// Builds the record from the model's scores of the window.
pub fn build(
    card: &ModelCard,
    facts: &WindowFacts,
    model: ModelScores<'_>,
    explain_top: usize,
    produced_at_ms: i64,
) -> SignalRecord {
    let ModelScores { full, without, kept, .. } = model;
    let seen: Vec<&WindowEvent> = kept.iter().map(|&i| &facts.events[i]).collect();
    let mut scores = Vec::with_capacity(card.signals.len() + card.derived.len());
    for (index, spec) in card.signals.iter().enumerate() {
        if !spec.applies_when.holds(seen.iter().copied()) {
            continue;
        }
        let deltas = without.iter().map(|(event, w)| (*event, full[index] - w[index]));
        scores.push(score(spec, full[index], deltas, &facts.events, explain_top));
    }
    if let Some(alert) = service_alert(card, facts, model, explain_top) {
        scores.push(alert);
    }

    let newest = facts.events.iter().max_by_key(|e| e.event_time_ms);
    let lineage = newest.map_or_else(
        || RecordLineage { topic: String::new(), partition: -1, offset: -1 },
        |e| lineage_of(&e.lineage),
    );
    SignalRecord {
        user_key: facts.user_key.clone(),
        version: facts.version,
        model_version: card.model_version.clone(),
        window_start_ms: facts.events.first().map_or(0, |e| e.event_time_ms),
        window_end_ms: facts.events.last().map_or(0, |e| e.event_time_ms),
        event_count: facts.events.len() as u32,
        scores,
        interests: facts.interests.clone(),
        interest_items: facts.interest_items.clone(),
        interests_refreshed_ms: facts.interests_refreshed_ms,
        lineage,
        produced_at_ms,
    }
}

fn lineage_of(lineage: &Lineage) -> RecordLineage {
    RecordLineage {
        topic: lineage.topic.to_string(),
        partition: lineage.partition,
        offset: lineage.offset,
    }
}

fn score(
    spec: &SignalSpec,
    value: f32,
    deltas: impl Iterator<Item = (usize, f32)>,
    events: &[WindowEvent],
    top: usize,
) -> Score {
    let mut deltas: Vec<(usize, f32)> = deltas.collect();
    deltas.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(b.0.cmp(&a.0)));
    let top_events = deltas
        .into_iter()
        .take(top)
        .map(|(index, delta)| {
            let event = &events[index];
            Contribution {
                event_id: event.event_id.to_string(),
                event_time_ms: event.event_time_ms,
                summary: render::summary(event),
                delta,
            }
        })
        .collect();
    Score { signal: spec.name.clone(), value, status: spec.status.as_str().to_owned(), top_events }
}

/// `service_alert = 1 - sentiment` of the newest review of an item bought earlier in the
/// window, scored on its own (as the sentiment head learned reviews; in a window mixed with
/// clicks it reads them poorly); absent when the model saw no such review. Without a focus
/// score the whole window's sentiment stands in. Its explanation applies the same rule to
/// each leave-one-out variant, so removing the review or the purchase shows as the whole
/// score.
fn service_alert(
    card: &ModelCard,
    facts: &WindowFacts,
    model: ModelScores<'_>,
    explain_top: usize,
) -> Option<Score> {
    let spec = card.derived.iter().find(|s| s.name == SERVICE_ALERT)?;
    let sentiment = card.signal_index(SENTIMENT)?;
    let kept = model.kept;
    if !spec.applies_when.holds(kept.iter().map(|&i| &facts.events[i])) {
        return None;
    }
    // The focus is the review of a bought item when the window has one (see `focus_review`).
    let focused = crate::window::newest_review_of_bought_item(facts.events.iter())
        .and_then(|review| facts.events.iter().position(|e| std::ptr::eq(e, review)));
    let rule = |skip: Option<usize>, scores: &[f32]| -> f32 {
        let seen = kept.iter().filter(|&&i| Some(i) != skip).map(|&i| &facts.events[i]);
        if !AppliesWhen::ReviewOfBoughtItem.holds(seen) {
            return 0.0;
        }
        match model.focus {
            Some(focus) if focused.is_some() && skip != focused => 1.0 - focus[sentiment],
            _ => 1.0 - scores[sentiment],
        }
    };
    let value = rule(None, model.full);
    let deltas = model.without.iter().map(|(event, w)| (*event, value - rule(Some(*event), w)));
    Some(score(spec, value, deltas, &facts.events, explain_top))
}

/// Encodes a record for the signal topic.
pub fn encode(format: Format, record: &SignalRecord) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(record).expect("plain fields serialise"),
        Format::Protobuf => to_proto(record).encode_to_vec(),
    }
}

/// A record as JSON text, whatever the topic's format (for the HTTP lookup).
pub fn to_json(record: &SignalRecord) -> String {
    serde_json::to_string(record).expect("plain fields serialise")
}

/// Decodes a record read back from the signal topic.
pub fn decode(format: Format, bytes: &[u8]) -> Result<SignalRecord, String> {
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Format::Protobuf => {
            pb::SignalRecord::decode(bytes).map(from_proto).map_err(|e| format!("protobuf: {e}"))
        }
    }
}

fn to_proto(r: &SignalRecord) -> pb::SignalRecord {
    pb::SignalRecord {
        user_key: r.user_key.clone(),
        version: r.version,
        model_version: r.model_version.clone(),
        window_start_ms: r.window_start_ms,
        window_end_ms: r.window_end_ms,
        event_count: r.event_count,
        scores: r
            .scores
            .iter()
            .map(|s| pb::Score {
                signal: s.signal.clone(),
                value: s.value,
                status: s.status.clone(),
                top_events: s
                    .top_events
                    .iter()
                    .map(|c| pb::Contribution {
                        event_id: c.event_id.clone(),
                        event_time_ms: c.event_time_ms,
                        summary: c.summary.clone(),
                        delta: c.delta,
                    })
                    .collect(),
            })
            .collect(),
        interests: r
            .interests
            .iter()
            .map(|i| pb::Interest { category_id: i.category_id.clone(), weight: i.weight })
            .collect(),
        interest_items: r
            .interest_items
            .iter()
            .map(|i| pb::ItemInterest {
                item_id: i.item_id.clone(),
                category_id: i.category_id.clone(),
                weight: i.weight,
            })
            .collect(),
        interests_refreshed_ms: r.interests_refreshed_ms,
        lineage: Some(pb::Lineage {
            topic: r.lineage.topic.clone(),
            partition: r.lineage.partition,
            offset: r.lineage.offset,
        }),
        produced_at_ms: r.produced_at_ms,
    }
}

fn from_proto(r: pb::SignalRecord) -> SignalRecord {
    let lineage = r.lineage.unwrap_or_default();
    SignalRecord {
        user_key: r.user_key,
        version: r.version,
        model_version: r.model_version,
        window_start_ms: r.window_start_ms,
        window_end_ms: r.window_end_ms,
        event_count: r.event_count,
        scores: r
            .scores
            .into_iter()
            .map(|s| Score {
                signal: s.signal,
                value: s.value,
                status: s.status,
                top_events: s
                    .top_events
                    .into_iter()
                    .map(|c| Contribution {
                        event_id: c.event_id,
                        event_time_ms: c.event_time_ms,
                        summary: c.summary,
                        delta: c.delta,
                    })
                    .collect(),
            })
            .collect(),
        interests: r
            .interests
            .into_iter()
            .map(|i| InterestWeight { category_id: i.category_id, weight: i.weight })
            .collect(),
        interest_items: r
            .interest_items
            .into_iter()
            .map(|i| ItemWeight {
                item_id: i.item_id,
                category_id: i.category_id,
                weight: i.weight,
            })
            .collect(),
        interests_refreshed_ms: r.interests_refreshed_ms,
        lineage: RecordLineage {
            topic: lineage.topic,
            partition: lineage.partition,
            offset: lineage.offset,
        },
        produced_at_ms: r.produced_at_ms,
    }
}

impl SignalRecord {
    pub fn score(&self, signal: &str) -> Option<&Score> {
        self.scores.iter().find(|s| s.signal == signal)
    }
}

#[cfg(test)]
impl SignalRecord {
    /// A record of `user_key` carrying only these scores and interest shares, for tests.
    pub(crate) fn for_test(
        user_key: &str,
        version: u64,
        scores: &[(&str, f32)],
        interests: &[(&str, f32)],
    ) -> SignalRecord {
        SignalRecord {
            user_key: user_key.into(),
            version,
            model_version: "m".into(),
            window_start_ms: 0,
            window_end_ms: 0,
            event_count: 1,
            scores: scores
                .iter()
                .map(|(signal, value)| Score {
                    signal: (*signal).into(),
                    value: *value,
                    status: "stable".into(),
                    top_events: Vec::new(),
                })
                .collect(),
            interests: interests
                .iter()
                .map(|(c, w)| InterestWeight { category_id: (*c).into(), weight: *w })
                .collect(),
            interest_items: Vec::new(),
            interests_refreshed_ms: 0,
            lineage: RecordLineage { topic: "t".into(), partition: 0, offset: 0 },
            produced_at_ms: 0,
        }
    }
}
