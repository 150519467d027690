//! Point-in-time examples.
//!
//! An example is taken right after one of a user's events, as the processor scores right
//! after events arrive: the window is built with [`UserState::apply`] from the user's events
//! up to and including that event, and the labels look only at the user's events strictly
//! after it, within each signal's horizon. No event after the example's time can reach its
//! window or its features (the test `no_future_event_reaches_a_window`).
//!
//! Splits are by time per data set: the latest quarter of the usable time is the test split,
//! a gap of one horizon before it keeps every training and validation label out of the test
//! period, and the 15 % before that gap is the validation split.

use std::collections::HashMap;

use crate::event::Event;
use crate::model::card::AppliesWhen;
use crate::render::{self, Segment};
use crate::window::{Lineage, StateSpec, UserState, WindowEvent};

/// Which split an example belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// A label function: given the user's events strictly after the example (oldest first, all
/// of them) and the example's window, the label, or `None` when the example does not count.
pub type LabelFn = Box<dyn Fn(&LabelInput<'_>) -> Option<bool> + Send + Sync>;

/// What a label function may look at.
pub struct LabelInput<'a> {
    /// Time of the example (its newest event).
    pub time_ms: i64,
    /// The user's later events.
    pub future: &'a [&'a Event],
    /// The window at the example.
    pub window: &'a UserState,
    /// Last event time in the data set; a horizon beyond it is not observed.
    pub data_end_ms: i64,
}

/// One signal's labelling on one data set.
pub struct Labeller {
    /// Position of the signal in the model's outputs.
    pub signal: usize,
    pub horizon_ms: i64,
    pub applies_when: AppliesWhen,
    pub label: LabelFn,
}

/// One example window with its labels.
#[derive(Clone, Debug)]
pub struct Example {
    pub time_ms: i64,
    pub split: Split,
    pub segments: Vec<Segment>,
    /// Window facts for the count baseline (see [`counts`]).
    pub counts: Vec<f32>,
    /// One entry per model output; `None` where the signal does not apply or is unobserved.
    pub labels: Vec<Option<bool>>,
}

/// Time boundaries of the splits of one data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitPlan {
    pub validation_start_ms: i64,
    pub test_start_ms: i64,
    /// Examples after this have unobserved horizons.
    pub usable_end_ms: i64,
}

impl SplitPlan {
    /// Splits `[start, end - horizon]`: test the last 25 %, a gap of `horizon`, validation
    /// the 15 % before the gap, train the rest.
    pub fn new(start_ms: i64, end_ms: i64, horizon_ms: i64) -> SplitPlan {
        let usable_end_ms = end_ms - horizon_ms;
        let length = (usable_end_ms - start_ms).max(0) as f64;
        let test_start_ms = usable_end_ms - (0.25 * length) as i64;
        let validation_end = test_start_ms - horizon_ms;
        let validation_start_ms = validation_end - (0.15 * length) as i64;
        SplitPlan { validation_start_ms, test_start_ms, usable_end_ms }
    }

    /// The split of an example at `time_ms` whose labels reach `time_ms + horizon_ms`;
    /// `None` inside the gap or past the usable end.
    pub fn split(&self, time_ms: i64, horizon_ms: i64) -> Option<Split> {
        if time_ms > self.usable_end_ms {
            None
        } else if time_ms >= self.test_start_ms {
            Some(Split::Test)
        } else if time_ms + horizon_ms > self.test_start_ms {
            None
        } else if time_ms >= self.validation_start_ms {
            Some(Split::Validation)
        } else {
            Some(Split::Train)
        }
    }
}

/// Builds one example after each event of each user, in time order. `events` must be sorted
/// by time. `outputs` is the number of model outputs (length of each label vector).
pub fn examples(
    events: &[Event],
    spec: &StateSpec,
    labellers: &[Labeller],
    outputs: usize,
    plan: &SplitPlan,
) -> Vec<Example> {
    let data_end_ms = events.last().map_or(0, |e| e.event_time_ms);
    let horizon_ms = labellers.iter().map(|l| l.horizon_ms).max().unwrap_or(0);
    let mut by_user: HashMap<&str, Vec<&Event>> = HashMap::new();
    for event in events {
        by_user.entry(event.user_id.as_str()).or_default().push(event);
    }
    let topic: std::sync::Arc<str> = "training".into();

    let mut out = Vec::new();
    let mut users: Vec<(&str, Vec<&Event>)> = by_user.into_iter().collect();
    users.sort_by(|a, b| a.0.cmp(b.0));
    for (_, history) in users {
        let mut state: Option<UserState> = None;
        for (index, event) in history.iter().enumerate() {
            let lineage = Lineage { topic: topic.clone(), partition: 0, offset: index as i64 };
            let Some(stored) = WindowEvent::from_event(event, lineage, &spec.window) else {
                continue;
            };
            match &mut state {
                Some(state) => state.apply(stored, spec),
                None => state = Some(UserState::new(stored, spec)),
            }
            let Some(state) = &state else { continue };
            let time_ms = event.event_time_ms;
            // Events at the same time as this one but later in the file are neither in the
            // window nor in the future: the example stands just after this event.
            let future: Vec<&Event> = history[index + 1..]
                .iter()
                .copied()
                .filter(|e| e.event_time_ms > time_ms)
                .collect();
            let Some(split) = plan.split(time_ms, horizon_ms) else { continue };
            let input = LabelInput { time_ms, future: &future, window: state, data_end_ms };
            let mut labels = vec![None; outputs];
            for labeller in labellers {
                if labeller.applies_when.holds(state.events()) {
                    labels[labeller.signal] = (labeller.label)(&input);
                }
            }
            if labels.iter().all(Option::is_none) {
                continue;
            }
            out.push(Example {
                time_ms,
                split,
                segments: render::render(state),
                counts: counts(state),
                labels,
            });
        }
    }
    out.sort_by_key(|e| e.time_ms);
    out
}

/// One example per labelled review: a window holding just that review (the review sets have
/// no other events), labelled for `signal`.
pub fn review_examples(
    reviews: &[crate::import::LabelledReview],
    spec: &StateSpec,
    signal: usize,
    outputs: usize,
    plan: &SplitPlan,
) -> Vec<Example> {
    let topic: std::sync::Arc<str> = "training".into();
    let mut out: Vec<Example> = reviews
        .iter()
        .filter_map(|review| {
            let time_ms = review.event.event_time_ms;
            let split = plan.split(time_ms, 0)?;
            let lineage = Lineage { topic: topic.clone(), partition: 0, offset: 0 };
            let stored = WindowEvent::from_event(&review.event, lineage, &spec.window)?;
            let state = UserState::new(stored, spec);
            let mut labels = vec![None; outputs];
            labels[signal] = Some(review.positive);
            Some(Example {
                time_ms,
                split,
                segments: render::render(&state),
                counts: counts(&state),
                labels,
            })
        })
        .collect();
    out.sort_by_key(|e| e.time_ms);
    out
}

/// Names of the count-baseline features, in order.
pub const COUNT_FEATURES: [&str; 12] = [
    "views",
    "carts",
    "favs",
    "buys",
    "remove_carts",
    "searches",
    "reviews",
    "events",
    "log_window_span_s",
    "log_age_s",
    "lifetime_buys",
    "open_cart_items",
];

/// Simple window counts for the logistic-regression baseline: events per action, window
/// span, customer age, lifetime purchases, and items carted but not bought in the window.
pub fn counts(state: &UserState) -> Vec<f32> {
    use crate::event::Action;
    use crate::window::Detail;
    let mut c = [0f32; 7];
    let mut carted: Vec<&str> = Vec::new();
    for event in state.events() {
        match &event.detail {
            Detail::Click { action, .. } => {
                let slot = match action {
                    Action::View => 0,
                    Action::Cart => 1,
                    Action::Fav => 2,
                    Action::Buy => 3,
                    Action::RemoveCart => 4,
                };
                c[slot] += 1.0;
                match action {
                    Action::Cart => carted.push(&event.item_id),
                    Action::Buy | Action::RemoveCart => carted.retain(|i| *i != &*event.item_id),
                    _ => {}
                }
            }
            Detail::Search { .. } => c[5] += 1.0,
            Detail::Review { .. } => c[6] += 1.0,
        }
    }
    let events = state.events();
    let span_s = match (events.front(), events.back()) {
        (Some(a), Some(b)) => (b.event_time_ms - a.event_time_ms) as f32 / 1000.0,
        _ => 0.0,
    };
    let age_s = (state.newest_ms() - state.first_seen_ms()) as f32 / 1000.0;
    carted.sort_unstable();
    carted.dedup();
    let mut out = c.to_vec();
    out.extend([
        events.len() as f32,
        span_s.max(0.0).ln_1p(),
        age_s.max(0.0).ln_1p(),
        state.lifetime_buys() as f32,
        carted.len() as f32,
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Action, Click, EventBody};
    use crate::window::WindowSpec;

    fn click(user: &str, id: &str, minute: i64, action: Action, category: &str) -> Event {
        Event {
            user_id: user.into(),
            event_id: id.into(),
            event_time_ms: minute * 60_000,
            opt_out: false,
            body: EventBody::Click(Click {
                action,
                item_id: "i".into(),
                category_id: category.into(),
                price: None,
                discount: None,
                quantity: None,
            }),
        }
    }

    fn spec() -> StateSpec {
        StateSpec {
            window: WindowSpec::default(),
            user_ttl_ms: 86_400_000,
            interest_half_life_ms: 3_600_000,
            interests_tracked: 8,
        }
    }

    fn buys_within(input: &LabelInput<'_>) -> Option<bool> {
        let horizon = 10 * 60_000;
        if input.time_ms + horizon > input.data_end_ms {
            return None;
        }
        let end = input.time_ms + horizon;
        Some(input.future.iter().any(|e| {
            e.event_time_ms <= end
                && matches!(&e.body, EventBody::Click(c) if c.action == Action::Buy)
        }))
    }

    #[test]
    fn no_future_event_reaches_a_window() {
        let mut events = vec![
            click("a", "a1", 1, Action::View, "past"),
            click("a", "a2", 5, Action::Cart, "past"),
            click("a", "a3", 9, Action::Buy, "later"),
            click("b", "b1", 2, Action::View, "past"),
            click("b", "b2", 30, Action::Buy, "later"),
            click("a", "a4", 100, Action::View, "later"),
        ];
        events.sort_by_key(|e| e.event_time_ms);
        let labeller = Labeller {
            signal: 0,
            horizon_ms: 10 * 60_000,
            applies_when: AppliesWhen::Always,
            label: Box::new(buys_within),
        };
        let plan = SplitPlan {
            validation_start_ms: i64::MAX - 1,
            test_start_ms: i64::MAX,
            usable_end_ms: i64::MAX,
        };
        let examples = examples(&events, &spec(), &[labeller], 1, &plan);
        let labels: Vec<(i64, Option<bool>)> =
            examples.iter().map(|e| (e.time_ms / 60_000, e.labels[0])).collect();
        let want = [
            (1, Some(true)),
            (2, Some(false)),
            (5, Some(true)),
            (9, Some(false)),
            (30, Some(false)),
        ];
        assert_eq!(labels, want, "minute 100 is past the observed horizon");
        for example in examples.iter().filter(|e| e.time_ms < 9 * 60_000) {
            let window: String = example.segments.iter().map(|s| s.text.as_str()).collect();
            assert!(!window.contains("clater"), "a later event leaked into {window:?}");
            let buys = example.counts[COUNT_FEATURES.iter().position(|f| *f == "buys").unwrap()];
            assert_eq!(buys, 0.0, "a later buy leaked into the count features");
        }
    }

    #[test]
    fn splits_leave_a_gap_before_test() {
        let plan = SplitPlan::new(0, 1_000, 100);
        assert_eq!(plan.usable_end_ms, 900);
        assert_eq!(plan.test_start_ms, 675);
        assert_eq!(plan.split(700, 100), Some(Split::Test));
        assert_eq!(plan.split(600, 100), None, "its labels would reach into the test period");
        assert_eq!(plan.split(450, 100), Some(Split::Validation));
        assert_eq!(plan.split(100, 100), Some(Split::Train));
        assert_eq!(plan.split(950, 100), None);
    }
}
