//! The input limits: what a record may be beyond the schema.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an input record may be, beyond the schema. A record outside these limits goes to the
/// dead-letter topic with the reason named on each field; the checks are in
/// [`crate::event::limits`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest record (key plus value) accepted, in bytes; checked before the record is
    /// parsed (`too_large`).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Deepest nesting of JSON arrays and objects in a record (`malformed`), checked before
    /// the record is parsed; at most 128, the parser's own bound.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
    /// Longest review text, in characters (`too_long`).
    #[serde(default = "default_max_review_chars")]
    pub max_review_chars: usize,
    /// Longest search query, in characters (`too_long`).
    #[serde(default = "default_max_query_chars")]
    pub max_query_chars: usize,
    /// Highest unit price, in the shop's currency (`invalid_field`).
    #[serde(default = "default_max_price")]
    pub max_price: f64,
    /// How far an event time may lie after its record's broker timestamp
    /// (`time_out_of_range`).
    #[serde(default = "default_max_future", with = "humantime_serde")]
    pub max_future: Duration,
    /// How far an event time may lie before its record's broker timestamp
    /// (`time_out_of_range`). Long by default so that back-fills of historical data pass.
    #[serde(default = "default_max_past", with = "humantime_serde")]
    pub max_past: Duration,
    /// Reject an event whose `event_id` is already in the user's window (`duplicate`).
    #[serde(default = "super::default_true")]
    pub reject_duplicates: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_record_bytes: default_max_record_bytes(),
            max_json_depth: default_max_json_depth(),
            max_review_chars: default_max_review_chars(),
            max_query_chars: default_max_query_chars(),
            max_price: default_max_price(),
            max_future: default_max_future(),
            max_past: default_max_past(),
            reject_duplicates: true,
        }
    }
}

fn default_max_record_bytes() -> usize {
    512 * 1024
}
fn default_max_json_depth() -> usize {
    32
}
fn default_max_review_chars() -> usize {
    10_000
}
fn default_max_query_chars() -> usize {
    1_000
}
fn default_max_price() -> f64 {
    1e9
}
fn default_max_future() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_past() -> Duration {
    // Forty years of 365.25 days, as humantime counts a year.
    Duration::from_secs(40 * 31_557_600)
}
