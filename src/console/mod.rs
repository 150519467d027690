//! The console: a small web page, served by the HTTP server under `/console`, that shows live
//! distributions of each signal, segment sizes over time, and one user's window as a timeline
//! with the events the explanations name highlighted.
//!
//! The publisher hands every published record to [`Console::observe`]; housekeeping hands the
//! segment sizes to [`Console::sample_segments`]; a user's window is asked of the consume loop
//! through a [`WindowRequest`]. The HTTP server reads [`Console::overview`] and builds a
//! [`UserView`] from the latest record and the window. The page itself (`console.html`,
//! `console.js`, `console.css`) is compiled in and fetches nothing from elsewhere. Nothing here
//! holds raw identifiers or unscrubbed text: keys are pseudonymised, and a window event is
//! shown by its id, kind, category, item and [`render::summary`], never its text.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::render;
use crate::signals::SignalRecord;
use crate::window::{Detail, WindowEvent};

/// The page, its script and its style sheet, served as they are.
pub const PAGE: &str = include_str!("console.html");
pub const SCRIPT: &str = include_str!("console.js");
pub const STYLE: &str = include_str!("console.css");

/// Bins of each signal's histogram, of equal width over [0, 1].
pub const BINS: usize = 20;
/// Segment samples kept: an hour of them at housekeeping's one sample every 10 s.
pub const SAMPLES_KEPT: usize = 360;
/// Signals tracked. Names come from the model card, so there are a handful; the bound keeps a
/// card with a great many heads from growing the overview without end.
const MAX_SIGNALS: usize = 64;
/// Window questions the HTTP server may have waiting for the consume loop.
pub const WINDOW_QUESTIONS: usize = 16;
/// Longest the HTTP server waits for the consume loop to answer a window question.
pub const WINDOW_TIMEOUT: Duration = Duration::from_secs(2);

/// Aggregates the console shows; shared by the publisher, housekeeping and the HTTP server.
pub struct Console {
    /// Locked briefly by each observation, sample and overview, never across an await; every
    /// update leaves the aggregates consistent, so a poisoned lock is taken over as it is.
    aggregates: Mutex<Aggregates>,
    /// Segment names from the configuration, in the order the page lists them.
    segments: Vec<String>,
}

#[derive(Default)]
struct Aggregates {
    /// One histogram per signal, in the order the signals were first seen.
    distributions: Vec<Distribution>,
    /// The newest segment samples, oldest first, at most [`SAMPLES_KEPT`].
    samples: VecDeque<SegmentSample>,
    /// Records observed since start.
    records: u64,
}

/// Published scores of one signal since start.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Distribution {
    pub signal: String,
    /// Scores per bin; bin `i` holds values in `[i / BINS, (i + 1) / BINS)`, the last one
    /// also 1. Values outside [0, 1] count in the nearest bin.
    pub counts: [u64; BINS],
    /// Scores counted (not-a-number values are not).
    pub total: u64,
}

/// Segment sizes on this instance at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegmentSample {
    /// Wall-clock time of the sample, in ms since the epoch.
    pub at_ms: i64,
    pub sizes: BTreeMap<String, u64>,
}

/// What `/console/api/overview` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overview {
    pub records_observed: u64,
    pub bins: usize,
    pub distributions: Vec<Distribution>,
    pub segments: Vec<String>,
    pub segment_samples: Vec<SegmentSample>,
}

impl Console {
    /// A console for the configured segment names; signal names are learnt from the records.
    pub fn new(segments: Vec<String>) -> Console {
        Console { aggregates: Mutex::default(), segments }
    }

    /// Counts a published record's scores into the distributions.
    pub fn observe(&self, record: &SignalRecord) {
        let mut aggregates = self.lock();
        aggregates.records += 1;
        for score in &record.scores {
            if score.value.is_nan() {
                continue;
            }
            let known = aggregates.distributions.iter().position(|d| d.signal == score.signal);
            let index = match known {
                Some(index) => index,
                None if aggregates.distributions.len() < MAX_SIGNALS => {
                    aggregates.distributions.push(Distribution {
                        signal: score.signal.clone(),
                        counts: [0; BINS],
                        total: 0,
                    });
                    aggregates.distributions.len() - 1
                }
                None => continue,
            };
            let distribution = &mut aggregates.distributions[index];
            distribution.counts[bin(score.value)] += 1;
            distribution.total += 1;
        }
    }

    /// Keeps one sample of the segment sizes on this instance, at `at_ms` (wall clock).
    pub fn sample_segments(&self, sizes: &[(String, u64)], at_ms: i64) {
        let sample = SegmentSample { at_ms, sizes: sizes.iter().cloned().collect() };
        let mut aggregates = self.lock();
        if aggregates.samples.len() == SAMPLES_KEPT {
            aggregates.samples.pop_front();
        }
        aggregates.samples.push_back(sample);
    }

    /// A copy of everything the overview shows.
    pub fn overview(&self) -> Overview {
        let aggregates = self.lock();
        Overview {
            records_observed: aggregates.records,
            bins: BINS,
            distributions: aggregates.distributions.clone(),
            segments: self.segments.clone(),
            segment_samples: aggregates.samples.iter().cloned().collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Aggregates> {
        self.aggregates.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The histogram bin of a score.
fn bin(value: f32) -> usize {
    let scaled = (value.clamp(0.0, 1.0) * BINS as f32) as usize;
    scaled.min(BINS - 1)
}

/// What the HTTP server holds of the console: the aggregates and the way to ask the consume
/// loop for a window.
#[derive(Clone)]
pub struct Access {
    pub console: Arc<Console>,
    /// Window questions for the consume loop, which holds the receiving end; closed when the
    /// consume loop stops.
    pub windows: mpsc::Sender<WindowRequest>,
}

impl Access {
    /// A console and its window channel; the receiver goes to the consume loop.
    pub fn new(segments: Vec<String>) -> (Access, mpsc::Receiver<WindowRequest>) {
        let (windows, questions) = mpsc::channel(WINDOW_QUESTIONS);
        (Access { console: Arc::new(Console::new(segments)), windows }, questions)
    }

    /// Asks the consume loop for the window of `user_key`, waiting at most
    /// [`WINDOW_TIMEOUT`] (the loop answers between records, so a long wait means it is
    /// stalled, not started yet, or stopping).
    pub async fn window(&self, user_key: &str) -> Window {
        let (reply, answer) = oneshot::channel();
        let request = WindowRequest { user_key: user_key.to_owned(), reply };
        let asked = async {
            self.windows.send(request).await.ok()?;
            answer.await.ok()
        };
        match tokio::time::timeout(WINDOW_TIMEOUT, asked).await {
            Ok(Some(Some(events))) => Window::Held(events),
            Ok(Some(None)) => Window::NotHeld,
            Ok(None) | Err(_) => {
                tracing::debug!(timeout = ?WINDOW_TIMEOUT, "console window question unanswered");
                Window::Unavailable
            }
        }
    }
}

/// The consume loop's answer to a window question.
#[derive(Clone, Debug, PartialEq)]
pub enum Window {
    /// This instance holds the user's state: its events, oldest first.
    Held(Vec<TimelineEvent>),
    /// This instance holds no state for the user.
    NotHeld,
    /// No answer in time, or the consume loop is not running.
    Unavailable,
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

/// What `/console/api/users/{key}` answers: the latest record, if this instance delivered
/// one recently, and the window as a timeline whose events say which scores name them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserView {
    pub user_key: String,
    pub record: Option<Arc<SignalRecord>>,
    /// `held`, `not_held` or `unavailable` (see [`Window`]).
    pub window_status: &'static str,
    /// The window's events, oldest first; empty unless `window_status` is `held`.
    pub timeline: Vec<TimelineEntry>,
}

/// A timeline event and the scores of the latest record whose explanation names it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelineEntry {
    #[serde(flatten)]
    pub event: TimelineEvent,
    pub named_by: Vec<Naming>,
}

/// One score's explanation naming an event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Naming {
    pub signal: String,
    /// How much the score moves when the event is left out.
    pub delta: f32,
}

impl UserView {
    /// The view of `user_key`; `None` when neither a record nor a window is known.
    pub fn of(
        user_key: &str,
        record: Option<Arc<SignalRecord>>,
        window: Window,
    ) -> Option<UserView> {
        let (window_status, events) = match window {
            Window::Held(events) => ("held", events),
            Window::NotHeld => ("not_held", Vec::new()),
            Window::Unavailable => ("unavailable", Vec::new()),
        };
        if record.is_none() && window_status != "held" {
            return None;
        }
        let timeline = events
            .into_iter()
            .map(|event| {
                let named_by = record.as_deref().map(|r| namings(r, &event.event_id));
                TimelineEntry { event, named_by: named_by.unwrap_or_default() }
            })
            .collect();
        Some(UserView { user_key: user_key.to_owned(), record, window_status, timeline })
    }
}

/// The scores of `record` whose top events include `event_id`, in the record's score order.
fn namings(record: &SignalRecord, event_id: &str) -> Vec<Naming> {
    record
        .scores
        .iter()
        .filter_map(|score| {
            let named = score.top_events.iter().find(|c| c.event_id == event_id)?;
            Some(Naming { signal: score.signal.clone(), delta: named.delta })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{Contribution, Score};

    fn score(signal: &str, value: f32, named: &[(&str, f32)]) -> Score {
        let top_events = named
            .iter()
            .map(|(id, delta)| Contribution {
                event_id: (*id).into(),
                event_time_ms: 0,
                summary: "buy cd".into(),
                delta: *delta,
            })
            .collect();
        Score { signal: signal.into(), value, status: "validated".into(), top_events }
    }

    fn record(scores: Vec<Score>) -> SignalRecord {
        let key = "0123456789abcdef0123456789abcdef";
        SignalRecord { scores, event_count: 2, ..SignalRecord::for_test(key, 1, &[], &[]) }
    }

    fn event(id: &str) -> TimelineEvent {
        TimelineEvent {
            event_id: id.into(),
            event_time_ms: 1,
            kind: "buy".into(),
            summary: "buy cd".into(),
            category_id: "cd".into(),
            item_id: "order".into(),
        }
    }

    #[test]
    fn scores_land_in_their_bins_with_the_edges_in_range() {
        let console = Console::new(Vec::new());
        for value in [0.0, 0.049, 0.05, 0.51, 0.999, 1.0, 1.5, -0.2, f32::NAN] {
            console.observe(&record(vec![score("purchase_intent", value, &[])]));
        }
        let overview = console.overview();
        assert_eq!(overview.records_observed, 9);
        let [intent] = &overview.distributions[..] else { panic!("{overview:?}") };
        assert_eq!(intent.total, 8, "NaN is not counted");
        assert_eq!(intent.counts[0], 3, "0, 0.049 and -0.2: {:?}", intent.counts);
        assert_eq!(intent.counts[1], 1, "0.05: {:?}", intent.counts);
        assert_eq!(intent.counts[10], 1, "0.51: {:?}", intent.counts);
        assert_eq!(intent.counts[BINS - 1], 3, "0.999, 1 and 1.5: {:?}", intent.counts);
        assert_eq!(intent.counts.iter().sum::<u64>(), intent.total);
    }

    #[test]
    fn signals_keep_the_order_they_were_first_seen_in() {
        let console = Console::new(Vec::new());
        console.observe(&record(vec![score("churn_risk", 0.2, &[])]));
        console.observe(&record(vec![
            score("purchase_intent", 0.7, &[]),
            score("churn_risk", 0.3, &[]),
        ]));
        let overview = console.overview();
        let names: Vec<&str> = overview.distributions.iter().map(|d| &*d.signal).collect();
        assert_eq!(names, ["churn_risk", "purchase_intent"]);
        assert_eq!(overview.distributions[0].total, 2);
        assert_eq!(overview.distributions[1].total, 1);
    }

    #[test]
    fn the_signal_count_is_bounded() {
        let console = Console::new(Vec::new());
        for i in 0..MAX_SIGNALS + 10 {
            console.observe(&record(vec![score(&format!("s{i}"), 0.5, &[])]));
        }
        assert_eq!(console.overview().distributions.len(), MAX_SIGNALS);
    }

    #[test]
    fn segment_samples_keep_the_newest_ones() {
        let console = Console::new(vec!["bargain_hunters".into()]);
        for i in 0..SAMPLES_KEPT as i64 + 5 {
            console.sample_segments(&[("bargain_hunters".into(), i as u64)], i * 10_000);
        }
        let overview = console.overview();
        assert_eq!(overview.segments, ["bargain_hunters"]);
        assert_eq!(overview.segment_samples.len(), SAMPLES_KEPT);
        let first = &overview.segment_samples[0];
        assert_eq!(first.at_ms, 50_000, "the five oldest samples are dropped");
        assert_eq!(first.sizes.get("bargain_hunters"), Some(&5));
        let last = overview.segment_samples.last().map(|s| s.at_ms);
        assert_eq!(last, Some((SAMPLES_KEPT as i64 + 4) * 10_000));
    }

    #[test]
    fn timeline_events_say_which_scores_name_them() {
        let latest = record(vec![
            score("purchase_intent", 0.8, &[("e2", 0.3), ("e1", -0.1)]),
            score("churn_risk", 0.1, &[("e2", 0.05)]),
        ]);
        let window = Window::Held(vec![event("e1"), event("e2"), event("e3")]);
        let view = UserView::of("k", Some(Arc::new(latest)), window).expect("a view");
        assert_eq!(view.window_status, "held");
        let named: Vec<Vec<&str>> =
            view.timeline.iter().map(|e| e.named_by.iter().map(|n| &*n.signal).collect()).collect();
        assert_eq!(named, [vec!["purchase_intent"], vec!["purchase_intent", "churn_risk"], vec![]]);
        assert_eq!(view.timeline[0].named_by[0].delta, -0.1);
    }

    #[test]
    fn a_user_is_known_by_a_record_or_a_held_window() {
        assert!(UserView::of("k", None, Window::NotHeld).is_none());
        assert!(UserView::of("k", None, Window::Unavailable).is_none());

        let view = UserView::of("k", None, Window::Held(vec![event("e1")])).expect("a view");
        assert!(view.record.is_none());
        assert!(view.timeline[0].named_by.is_empty());

        let latest = Arc::new(record(Vec::new()));
        let view = UserView::of("k", Some(latest), Window::Unavailable).expect("a view");
        assert_eq!(view.window_status, "unavailable");
        assert!(view.timeline.is_empty());
    }

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for (name, text) in [("html", PAGE), ("js", SCRIPT), ("css", STYLE)] {
            for outside in ["http:", "https:", "\"//", "'//", "(//", "@import"] {
                let line = text.lines().find(|l| l.contains(outside));
                assert!(line.is_none(), "console.{name} has {outside}: {line:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_window_question_is_answered_or_times_out() {
        let (access, mut questions) = Access::new(Vec::new());
        let answering = tokio::spawn(async move {
            let question = questions.recv().await.expect("a question");
            assert_eq!(question.user_key, "k1");
            let _ = question.reply.send(Some(vec![event("e1")]));
            let question = questions.recv().await.expect("a second question");
            let _ = question.reply.send(None);
            questions
        });
        assert_eq!(access.window("k1").await, Window::Held(vec![event("e1")]));
        assert_eq!(access.window("k2").await, Window::NotHeld);
        let questions = answering.await.expect("the answering task");

        // A loop that has stopped answering, then one that has gone.
        let started = std::time::Instant::now();
        assert_eq!(access.window("k3").await, Window::Unavailable);
        assert!(started.elapsed() >= WINDOW_TIMEOUT, "gave up after {:?}", started.elapsed());
        drop(questions);
        assert_eq!(access.window("k4").await, Window::Unavailable);
    }
}
