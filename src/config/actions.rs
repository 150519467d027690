//! The configuration of segments and service alerts (see [`crate::actions`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::default_true;

/// A campaign segment: the users whose latest signal record satisfies `rule`. Entering and
/// leaving are published to `output.segments_topic`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Letters, digits, `_` and `-`; unique; part of the segments topic's record key.
    pub name: String,
    /// A condition over scores and interests, e.g.
    /// `purchase_intent > 0.7 and price_sensitivity > 0.6` (grammar in
    /// [`crate::actions::rule`]).
    pub rule: String,
}

/// Service alerts for customer care, published to `output.alerts_topic`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Publish service alerts.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `service_alert` score (1 - sentiment, for a review of an item bought earlier in the
    /// window) at or above which the review raises an alert.
    #[serde(default = "default_alert_threshold")]
    pub threshold: f32,
    /// Fall of the sentiment of a user's review, scored on its own, from the previous record
    /// with a review to the current one, ending below 0.5, that raises a `falling_sentiment`
    /// alert.
    #[serde(default = "default_frustration_drop")]
    pub frustration_drop: f32,
    /// Event-time period within which one user's alerts about one item are sent once.
    #[serde(default = "default_dedup_period", with = "humantime_serde")]
    pub dedup_period: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            threshold: default_alert_threshold(),
            frustration_drop: default_frustration_drop(),
            dedup_period: default_dedup_period(),
        }
    }
}

fn default_alert_threshold() -> f32 {
    0.6
}
fn default_frustration_drop() -> f32 {
    0.3
}
fn default_dedup_period() -> Duration {
    Duration::from_secs(7 * 86_400)
}
