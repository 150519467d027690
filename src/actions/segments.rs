//! Campaign segments: the users whose latest signal record satisfies a configured rule.
//!
//! Each record is checked against every rule; a user who starts or stops satisfying one is
//! published as a [`SegmentChange`] to `output.segments_topic`, keyed by
//! `<user key>/<segment>`, with the values the rule read. The topic can be compacted: the
//! latest record of a key is the user's current membership, and a tombstone means the user
//! was deleted, opted out, expired, or the segment was removed from the configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::event::Format;
use crate::model::card::ModelCard;
use crate::proto::signals as pb;
use crate::signals::SignalRecord;

use super::rule::{Operand, Rule};
use super::{ActionKind, ActionRecord, ActionsError};

/// One entry into or exit from a segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentChange {
    pub user_key: String,
    pub segment: String,
    pub change: Change,
    /// `version` of the signal record that caused the change.
    pub version: u64,
    pub model_version: String,
    /// Every score of that record, by signal.
    pub scores: BTreeMap<String, f32>,
    /// The shares of the categories the rule reads through `interest("...")`.
    pub interests: BTreeMap<String, f32>,
    pub produced_at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Entered,
    Left,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Entered => "entered",
            Change::Left => "left",
        }
    }
}

struct Segment {
    name: CompactString,
    rule: Rule,
}

pub(super) struct Segments {
    segments: Vec<Segment>,
    topic: Arc<str>,
    format: Format,
}

impl Segments {
    pub(super) fn compile(config: &Config, card: &ModelCard) -> Result<Segments, ActionsError> {
        let mut known: Vec<&str> = card.signals.iter().map(|s| s.name.as_str()).collect();
        known.extend(card.derived.iter().map(|s| s.name.as_str()));
        let mut segments = Vec::with_capacity(config.segments.len());
        for (index, segment) in config.segments.iter().enumerate() {
            let fail =
                |message: String| ActionsError { index, name: segment.name.clone(), message };
            let rule = Rule::parse(&segment.rule)
                .map_err(|err| fail(format!("rule `{}` {err}", segment.rule)))?;
            for operand in rule.operands() {
                if let Operand::Signal(signal) = operand {
                    if !known.contains(&signal.as_str()) {
                        return Err(fail(format!(
                            "rule names signal `{signal}`, which the model does not produce \
                             (it produces {})",
                            known.join(", ")
                        )));
                    }
                }
            }
            segments.push(Segment { name: segment.name.as_str().into(), rule });
        }
        Ok(Segments {
            segments,
            topic: config.output.segments_topic.as_str().into(),
            format: config.output.format,
        })
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.segments.iter().map(|s| s.name.to_string()).collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The segments `record` puts its user in, pushing a change for every segment entered
    /// or left since `current`, and a tombstone for a segment no longer configured.
    pub(super) fn evaluate(
        &self,
        record: &SignalRecord,
        current: &[CompactString],
        out: &mut Vec<ActionRecord>,
    ) -> Vec<CompactString> {
        let mut members = Vec::new();
        for segment in &self.segments {
            let now = segment.rule.holds(record);
            let before = current.contains(&segment.name);
            if now {
                members.push(segment.name.clone());
            }
            if now != before {
                let change = if now { Change::Entered } else { Change::Left };
                out.push(self.change(record, segment, change));
            }
        }
        let dropped = current.iter().filter(|name| !self.segments.iter().any(|s| s.name == **name));
        out.extend(dropped.map(|name| self.tombstone(&record.user_key, name)));
        members
    }

    /// Tombstones for every segment in `current`.
    pub(super) fn erase(&self, user_key: &str, current: &[CompactString]) -> Vec<ActionRecord> {
        current.iter().map(|name| self.tombstone(user_key, name)).collect()
    }

    fn change(&self, record: &SignalRecord, segment: &Segment, change: Change) -> ActionRecord {
        let scores = record.scores.iter().map(|s| (s.signal.clone(), s.value)).collect();
        let interests = segment
            .rule
            .operands()
            .into_iter()
            .filter_map(|operand| match operand {
                Operand::Interest(category) => {
                    Some((category.clone(), operand.value(record).unwrap_or(0.0)))
                }
                Operand::Signal(_) => None,
            })
            .collect();
        let value = SegmentChange {
            user_key: record.user_key.clone(),
            segment: segment.name.to_string(),
            change,
            version: record.version,
            model_version: record.model_version.clone(),
            scores,
            interests,
            produced_at_ms: record.produced_at_ms,
        };
        let kind = match change {
            Change::Entered => ActionKind::Entered(segment.name.to_string()),
            Change::Left => ActionKind::Left(segment.name.to_string()),
        };
        ActionRecord {
            topic: self.topic.clone(),
            key: key(&record.user_key, &segment.name),
            payload: super::encode(self.format, &value, to_proto),
            kind,
        }
    }

    fn tombstone(&self, user_key: &str, segment: &str) -> ActionRecord {
        ActionRecord {
            topic: self.topic.clone(),
            key: key(user_key, segment),
            payload: Vec::new(),
            kind: ActionKind::Erased,
        }
    }
}

/// The segments topic's record key.
pub fn key(user_key: &str, segment: &str) -> Vec<u8> {
    format!("{user_key}/{segment}").into_bytes()
}

fn to_proto(change: &SegmentChange) -> pb::SegmentChange {
    pb::SegmentChange {
        user_key: change.user_key.clone(),
        segment: change.segment.clone(),
        change: change.change.as_str().to_owned(),
        version: change.version,
        model_version: change.model_version.clone(),
        scores: change.scores.clone().into_iter().collect(),
        interests: change.interests.clone().into_iter().collect(),
        produced_at_ms: change.produced_at_ms,
    }
}

/// Decodes a record read back from the segments topic.
pub fn decode(format: Format, bytes: &[u8]) -> Result<SegmentChange, String> {
    use prost::Message;
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Format::Protobuf => {
            let p = pb::SegmentChange::decode(bytes).map_err(|e| format!("protobuf: {e}"))?;
            let change = match p.change.as_str() {
                "entered" => Change::Entered,
                "left" => Change::Left,
                other => return Err(format!("unknown change `{other}`")),
            };
            Ok(SegmentChange {
                user_key: p.user_key,
                segment: p.segment,
                change,
                version: p.version,
                model_version: p.model_version,
                scores: p.scores.into_iter().collect(),
                interests: p.interests.into_iter().collect(),
                produced_at_ms: p.produced_at_ms,
            })
        }
    }
}
