//! Service alerts for customer care: a buyer's negative review of the item bought, or a
//! user's sentiment falling sharply, published to `output.alerts_topic` keyed by user key.
//!
//! - `negative_review_of_purchase`: the record's `service_alert` score (1 - sentiment, present
//!   only when the window holds a review of an item bought earlier in it) is at least
//!   `alerts.threshold`. The alert names the newest such review.
//! - `falling_sentiment`: the sentiment of the review the record is about (the window's focus
//!   review, scored on its own) fell by at least `alerts.frustration_drop` from the one of the
//!   user's previous record with a review, to below 0.5. The alert names that review.
//!
//! One alert per user and item within `alerts.dedup_period` of event time: a review within
//! the period after the review that last alerted about the same item raises none. A review
//! older than the period behind the user's newest event never alerts, so a review that stays
//! in the window cannot alert twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::event::Format;
use crate::proto::signals as pb;
use crate::render;
use crate::signals::{RecordLineage, SignalRecord, SENTIMENT, SERVICE_ALERT};
use crate::window::{focus_review, newest_review_of_bought_item, WindowEvent};

use super::{ActionKind, ActionRecord, Alerted, Marks};

/// An alert for customer care.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceAlert {
    /// `<user key>:<review event id>:<reason>`: the same for a redelivery of the alert.
    pub alert_id: String,
    pub user_key: String,
    pub reason: AlertReason,
    pub item_id: String,
    pub category_id: String,
    pub review: ReviewRef,
    /// Every score of the record that raised the alert, by signal.
    pub scores: BTreeMap<String, f32>,
    /// The sentiment of the user's previous record, for `falling_sentiment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sentiment: Option<f32>,
    /// `version` of the record that raised the alert.
    pub version: u64,
    pub model_version: String,
    pub produced_at_ms: i64,
    /// Where the newest event of that record's window was read.
    pub lineage: RecordLineage,
}

/// The review an alert is about: its id, time and summary, never its text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewRef {
    pub event_id: String,
    pub event_time_ms: i64,
    pub summary: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertReason {
    NegativeReviewOfPurchase,
    FallingSentiment,
}

impl AlertReason {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertReason::NegativeReviewOfPurchase => "negative_review_of_purchase",
            AlertReason::FallingSentiment => "falling_sentiment",
        }
    }
}

pub(super) struct AlertRules {
    threshold: f32,
    frustration_drop: f32,
    period_ms: i64,
    topic: Arc<str>,
    format: Format,
}

impl AlertRules {
    pub(super) fn new(config: &Config) -> AlertRules {
        let alerts = &config.alerts;
        AlertRules {
            threshold: alerts.threshold,
            frustration_drop: alerts.frustration_drop,
            period_ms: alerts.dedup_period.as_millis() as i64,
            topic: config.output.alerts_topic.as_str().into(),
            format: config.output.format,
        }
    }

    /// Pushes the alert `record` raises, if any, and updates `marks` (the sentiment, and the
    /// items alerted about within the period).
    pub(super) fn evaluate(
        &self,
        record: &SignalRecord,
        events: &[WindowEvent],
        review_sentiment: Option<f32>,
        marks: &mut Marks,
        out: &mut Vec<ActionRecord>,
        suppressed: &mut Vec<AlertReason>,
    ) {
        let newest = events.iter().map(|e| e.event_time_ms).max().unwrap_or(i64::MIN);
        marks.alerted.retain(|a| a.at_ms >= newest.saturating_sub(self.period_ms));
        let previous = marks.sentiment;
        // The review scored on its own; the window's sentiment where the model gave no focus.
        let sentiment = review_sentiment.or_else(|| record.score(SENTIMENT).map(|s| s.value));
        if sentiment.is_some() {
            marks.sentiment = sentiment;
        }

        let Some((reason, review)) = self.trigger(record, events, previous, sentiment) else {
            return;
        };
        if review.event_time_ms < newest.saturating_sub(self.period_ms) {
            return;
        }
        let earlier = marks.alerted.iter().find(|a| a.item_id == review.item_id);
        if let Some(earlier) = earlier {
            // The review that alerted, seen again in a later record, is not a repeat; a
            // second review within the period is.
            if review.event_time_ms != earlier.at_ms
                && review.event_time_ms < earlier.at_ms + self.period_ms
            {
                suppressed.push(reason);
            }
            if review.event_time_ms < earlier.at_ms + self.period_ms {
                return;
            }
        }
        marks.alerted.retain(|a| a.item_id != review.item_id);
        marks
            .alerted
            .push(Alerted { item_id: review.item_id.clone(), at_ms: review.event_time_ms });
        let previous = (reason == AlertReason::FallingSentiment).then_some(previous).flatten();
        // Reviews carry no category; the item's click events do.
        let category = events
            .iter()
            .rev()
            .find(|e| e.item_id == review.item_id && !e.category_id.is_empty())
            .map_or("", |e| e.category_id.as_str());
        out.push(self.alert(record, review, category, reason, previous));
    }

    /// The rule that fires, with the review it is about.
    fn trigger<'a>(
        &self,
        record: &SignalRecord,
        events: &'a [WindowEvent],
        previous: Option<f32>,
        sentiment: Option<f32>,
    ) -> Option<(AlertReason, &'a WindowEvent)> {
        let alert = record.score(SERVICE_ALERT).map(|s| s.value);
        if alert.is_some_and(|value| value >= self.threshold) {
            if let Some(review) = newest_review_of_bought_item(events.iter()) {
                return Some((AlertReason::NegativeReviewOfPurchase, review));
            }
        }
        let (previous, now) = (previous?, sentiment?);
        if previous - now >= self.frustration_drop && now < 0.5 {
            let review = focus_review(events.iter())?;
            return Some((AlertReason::FallingSentiment, review));
        }
        None
    }

    fn alert(
        &self,
        record: &SignalRecord,
        review: &WindowEvent,
        category_id: &str,
        reason: AlertReason,
        previous_sentiment: Option<f32>,
    ) -> ActionRecord {
        let alert = ServiceAlert {
            alert_id: format!("{}:{}:{}", record.user_key, review.event_id, reason.as_str()),
            user_key: record.user_key.clone(),
            reason,
            item_id: review.item_id.to_string(),
            category_id: category_id.to_owned(),
            review: ReviewRef {
                event_id: review.event_id.to_string(),
                event_time_ms: review.event_time_ms,
                summary: render::summary(review),
            },
            scores: record.scores.iter().map(|s| (s.signal.clone(), s.value)).collect(),
            previous_sentiment,
            version: record.version,
            model_version: record.model_version.clone(),
            produced_at_ms: record.produced_at_ms,
            lineage: record.lineage.clone(),
        };
        ActionRecord {
            topic: self.topic.clone(),
            key: record.user_key.as_bytes().to_vec(),
            payload: super::encode(self.format, &alert, to_proto),
            kind: ActionKind::Alert(reason),
        }
    }
}

fn to_proto(alert: &ServiceAlert) -> pb::ServiceAlert {
    pb::ServiceAlert {
        alert_id: alert.alert_id.clone(),
        user_key: alert.user_key.clone(),
        reason: alert.reason.as_str().to_owned(),
        item_id: alert.item_id.clone(),
        category_id: alert.category_id.clone(),
        review: Some(pb::ReviewRef {
            event_id: alert.review.event_id.clone(),
            event_time_ms: alert.review.event_time_ms,
            summary: alert.review.summary.clone(),
        }),
        scores: alert.scores.clone().into_iter().collect(),
        previous_sentiment: alert.previous_sentiment,
        version: alert.version,
        model_version: alert.model_version.clone(),
        produced_at_ms: alert.produced_at_ms,
        lineage: Some(pb::Lineage {
            topic: alert.lineage.topic.clone(),
            partition: alert.lineage.partition,
            offset: alert.lineage.offset,
        }),
    }
}

/// Decodes a record read back from the alerts topic.
pub fn decode(format: Format, bytes: &[u8]) -> Result<ServiceAlert, String> {
    use prost::Message;
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Format::Protobuf => {
            let p = pb::ServiceAlert::decode(bytes).map_err(|e| format!("protobuf: {e}"))?;
            let reason = match p.reason.as_str() {
                "negative_review_of_purchase" => AlertReason::NegativeReviewOfPurchase,
                "falling_sentiment" => AlertReason::FallingSentiment,
                other => return Err(format!("unknown reason `{other}`")),
            };
            let review = p.review.unwrap_or_default();
            let lineage = p.lineage.unwrap_or_default();
            Ok(ServiceAlert {
                alert_id: p.alert_id,
                user_key: p.user_key,
                reason,
                item_id: p.item_id,
                category_id: p.category_id,
                review: ReviewRef {
                    event_id: review.event_id,
                    event_time_ms: review.event_time_ms,
                    summary: review.summary,
                },
                scores: p.scores.into_iter().collect(),
                previous_sentiment: p.previous_sentiment,
                version: p.version,
                model_version: p.model_version,
                produced_at_ms: p.produced_at_ms,
                lineage: RecordLineage {
                    topic: lineage.topic,
                    partition: lineage.partition,
                    offset: lineage.offset,
                },
            })
        }
    }
}
