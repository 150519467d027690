//! From signals to marketing actions: campaign segments and customer-care alerts.
//!
//! The publisher hands every signal record, with the window it was computed from and the
//! user's [`Marks`], to [`Actions::derive`]. That evaluates the configured segment rules
//! ([`segments`]) and the alert rules ([`alerts`]) against the record and returns the records
//! to publish beside it (segment entries and exits, service alerts) and the user's new marks.
//! The marks travel with the user's state in the changelog, so membership and alert
//! de-duplication survive restarts and rebalances.

pub mod alerts;
pub mod rule;
pub mod segments;

use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::event::Format;
use crate::model::card::ModelCard;
use crate::signals::SignalRecord;
use crate::window::WindowEvent;

use self::alerts::AlertRules;
use self::segments::Segments;

/// What a user's records decided beyond the records themselves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    /// Names of the segments the user is in.
    pub segments: Vec<CompactString>,
    /// Sentiment of the review the user's latest record with one was about (its focus
    /// review, scored on its own).
    pub sentiment: Option<f32>,
    /// Items a service alert was sent about, each with the event time of the review that
    /// raised it; entries older than `alerts.dedup_period` behind the user's newest event are
    /// dropped.
    pub alerted: Vec<Alerted>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alerted {
    pub item_id: CompactString,
    pub at_ms: i64,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.sentiment.is_none() && self.alerted.is_empty()
    }

    /// `None` for empty marks, which most users have: they cost one pointer in the state.
    pub fn boxed(self) -> Option<Box<Marks>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

/// A record derived from a signal record, ready for the producer.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionRecord {
    pub topic: Arc<str>,
    pub key: Vec<u8>,
    /// Empty for a tombstone.
    pub payload: Vec<u8>,
    /// What it is, for the delivery counters.
    pub kind: ActionKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ActionKind {
    Entered(String),
    Left(String),
    Alert(alerts::AlertReason),
    Erased,
}

/// What [`Actions::derive`] returns.
pub struct Derived {
    pub records: Vec<ActionRecord>,
    pub marks: Marks,
    /// Alerts not sent because one about the same item went out within the period.
    pub suppressed: Vec<alerts::AlertReason>,
}

/// Unknown signal names in segment rules, found once the model is known.
#[derive(Debug, thiserror::Error)]
#[error("config key `segments[{index}].rule`: segment `{name}`: {message}")]
pub struct ActionsError {
    pub index: usize,
    pub name: String,
    pub message: String,
}

/// The compiled segment and alert rules.
pub struct Actions {
    segments: Segments,
    alerts: Option<AlertRules>,
}

impl Actions {
    /// Compiles the configured rules against the model's signals. The config has already
    /// checked that every rule parses.
    pub fn compile(config: &Config, card: &ModelCard) -> Result<Actions, ActionsError> {
        let segments = Segments::compile(config, card)?;
        let alerts = config.alerts.enabled.then(|| AlertRules::new(config));
        Ok(Actions { segments, alerts })
    }

    /// Segment names, in configuration order.
    pub fn segment_names(&self) -> Vec<String> {
        self.segments.names()
    }

    /// Whether anything is derived at all.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.alerts.is_none()
    }

    /// The records `record` gives rise to, and the user's marks after it. `events` is the
    /// window the record was computed from; `marks` the user's marks before it;
    /// `review_sentiment` the sentiment of the window's focus review scored on its own
    /// ([`crate::window::focus_review`]), when the model scored one.
    pub fn derive(
        &self,
        record: &SignalRecord,
        events: &[WindowEvent],
        marks: &Marks,
        review_sentiment: Option<f32>,
    ) -> Derived {
        let mut records = Vec::new();
        let mut next = marks.clone();
        next.segments = self.segments.evaluate(record, &marks.segments, &mut records);
        let mut suppressed = Vec::new();
        if let Some(alerts) = &self.alerts {
            let sentiment = review_sentiment;
            alerts.evaluate(record, events, sentiment, &mut next, &mut records, &mut suppressed);
        }
        Derived { records, marks: next, suppressed }
    }

    /// Tombstones for every segment the user is in (a deletion, an opt-out, an eviction).
    pub fn erase(&self, user_key: &str, marks: &Marks) -> Vec<ActionRecord> {
        self.segments.erase(user_key, &marks.segments)
    }
}

/// Encodes with the output format: JSON as serde writes it, protobuf through `to_proto`.
fn encode<T: Serialize, P: prost::Message>(
    format: Format,
    value: &T,
    to_proto: impl Fn(&T) -> P,
) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(value).expect("plain fields serialise"),
        Format::Protobuf => to_proto(value).encode_to_vec(),
    }
}

#[cfg(test)]
mod tests;
