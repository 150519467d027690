//! The input topics, each with its format, an interned name for lineage, and the counters
//! every record of it updates.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::event::{EventKind, Format};
use crate::metrics as m;

/// Input topics by name, with their format, an interned name for lineage, and their
/// per-record counters.
pub struct Topics {
    by_name: HashMap<String, Input>,
}

/// One input topic.
pub struct Input {
    pub name: Arc<str>,
    pub format: Format,
    /// `records_in_total` for this topic.
    pub records_in: metrics::Counter,
    /// `events_accepted_total` for this topic, by windowed kind.
    accepted: [metrics::Counter; 3],
}

impl Input {
    /// The accepted-events counter of `kind`; `None` for a kind never windowed.
    pub fn accepted(&self, kind: EventKind) -> Option<&metrics::Counter> {
        match kind {
            EventKind::Click => Some(&self.accepted[0]),
            EventKind::Search => Some(&self.accepted[1]),
            EventKind::Review => Some(&self.accepted[2]),
            EventKind::DeleteUser => None,
        }
    }
}

impl Topics {
    /// The configured inputs. The counters are registered here, once, rather than looked up
    /// by name and labels for every record; so this runs after the metrics recorder is
    /// installed.
    pub fn new(config: &Config) -> Topics {
        let by_name = config
            .inputs
            .iter()
            .map(|i| {
                let topic = i.topic.clone();
                let kind = |kind: EventKind| {
                    let labels = [("topic", topic.clone()), ("kind", kind.as_str().to_owned())];
                    metrics::counter!(m::EVENTS_ACCEPTED, &labels)
                };
                let input = Input {
                    name: Arc::from(i.topic.as_str()),
                    format: i.format,
                    records_in: metrics::counter!(m::RECORDS_IN, "topic" => topic.clone()),
                    accepted: [EventKind::Click, EventKind::Search, EventKind::Review].map(kind),
                };
                (topic, input)
            })
            .collect();
        Topics { by_name }
    }

    pub fn get(&self, topic: &str) -> Option<&Input> {
        self.by_name.get(topic)
    }
}
