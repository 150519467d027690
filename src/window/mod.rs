//! Per-user rolling windows in event time.
//!
//! A [`UserState`] holds the user's most recent events (at most `max_events`, spanning at most
//! `span_ms` back from the newest), lifetime counters and decayed category interests. The
//! processor and the training binary both build windows through [`UserState::apply`], so the
//! model sees the same inputs in training and in production.
//!
//! Text (review text, a search's query and sort order) is normalised and scrubbed of personal
//! data ([`crate::privacy::scrub`]) and cut to `max_text_chars` when an event enters the
//! window; raw text is never stored.

use std::collections::VecDeque;
use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::event::{Action, Event, EventBody};
use crate::privacy::scrub;

pub mod store;

/// The window shape a model was trained with; part of the model card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Most events kept.
    pub max_events: usize,
    /// Event-time span kept, newest event back, in milliseconds.
    pub span_ms: i64,
    /// Longest review or query text kept, in characters (after scrubbing).
    pub max_text_chars: usize,
}

impl Default for WindowSpec {
    fn default() -> Self {
        WindowSpec { max_events: 32, span_ms: 30 * 86_400_000, max_text_chars: 160 }
    }
}

/// Settings of the state outside the window itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateSpec {
    pub window: WindowSpec,
    /// A user idle (event time) longer than this starts afresh.
    pub user_ttl_ms: i64,
    /// Half-life of the interest counters, in milliseconds.
    pub interest_half_life_ms: i64,
    /// Categories tracked per user; the least-weighted is dropped beyond this.
    pub interests_tracked: usize,
}

/// Where an event came from (topic, partition, offset); the newest one is the record's lineage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// An event as the window keeps it: ids, time, and scrubbed, bounded detail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowEvent {
    pub event_id: CompactString,
    pub event_time_ms: i64,
    pub item_id: CompactString,
    pub category_id: CompactString,
    pub detail: Detail,
    pub lineage: Lineage,
}

/// Kind-specific part of a [`WindowEvent`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Detail {
    Click { action: Action, price: Option<f32>, discount: Option<f32>, quantity: u32 },
    Search { query: Box<str>, sort: Box<str> },
    Review { rating: Option<u8>, text: Box<str>, language: Box<str> },
}

impl WindowEvent {
    /// Builds the stored form of `event`, scrubbing and bounding its text; `None` for a
    /// request that is never windowed (a deletion).
    pub fn from_event(event: &Event, lineage: Lineage, spec: &WindowSpec) -> Option<WindowEvent> {
        let bounded = |text: &str| -> Box<str> {
            let clean = scrub(text).replace(['\n', '\r', '\t'], " ");
            clean.chars().take(spec.max_text_chars).collect::<String>().into_boxed_str()
        };
        let (item_id, category_id, detail) = match &event.body {
            EventBody::Click(c) => (
                c.item_id.as_str(),
                c.category_id.as_str(),
                Detail::Click {
                    action: c.action,
                    price: c.price.map(|p| p as f32),
                    discount: c.discount.map(|d| d as f32),
                    quantity: c.quantity.unwrap_or(1),
                },
            ),
            EventBody::Search(s) => (
                "",
                s.category_id.as_str(),
                Detail::Search { query: bounded(&s.query), sort: bounded(&s.sort) },
            ),
            EventBody::Review(r) => (
                r.item_id.as_str(),
                "",
                Detail::Review {
                    rating: r.rating,
                    text: bounded(&r.text),
                    language: r.language.as_str().into(),
                },
            ),
            EventBody::DeleteUser => return None,
        };
        Some(WindowEvent {
            event_id: event.event_id.as_str().into(),
            event_time_ms: event.event_time_ms,
            item_id: item_id.into(),
            category_id: category_id.into(),
            detail,
            lineage,
        })
    }

    pub fn is_buy(&self) -> bool {
        matches!(self.detail, Detail::Click { action: Action::Buy, .. })
    }

    pub fn is_cart(&self) -> bool {
        matches!(self.detail, Detail::Click { action: Action::Cart, .. })
    }

    pub fn is_review(&self) -> bool {
        matches!(self.detail, Detail::Review { .. })
    }

    /// The event carries price information (a price, a discount or a sort-by-price search).
    pub fn is_priced(&self) -> bool {
        match &self.detail {
            Detail::Click { price, discount, .. } => price.is_some() || discount.is_some(),
            Detail::Search { sort, .. } => sort.contains("price"),
            Detail::Review { .. } => false,
        }
    }

    /// Weight the event adds to its category's interest counter.
    fn interest_weight(&self) -> f32 {
        match &self.detail {
            Detail::Click { action, .. } => match action {
                Action::View => 1.0,
                Action::Fav => 2.0,
                Action::Cart => 3.0,
                Action::Buy => 4.0,
                Action::RemoveCart => 0.5,
            },
            Detail::Search { .. } | Detail::Review { .. } => 1.0,
        }
    }
}

/// One category's decayed interest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interest {
    pub category_id: CompactString,
    /// Weight as of [`UserState::newest_ms`].
    pub weight: f32,
}

/// The newest review, in a window in event-time order, of an item bought before it: what a
/// service alert is about. Allocates nothing: it runs for every scoring request.
pub fn newest_review_of_bought_item<'a, I>(events: I) -> Option<&'a WindowEvent>
where
    I: DoubleEndedIterator<Item = &'a WindowEvent> + ExactSizeIterator + Clone,
{
    events.clone().enumerate().rev().find_map(|(i, event)| {
        let bought = event.is_review()
            && !event.item_id.is_empty()
            && events.clone().take(i).any(|e| e.is_buy() && e.item_id == event.item_id);
        bought.then_some(event)
    })
}

/// The review a scoring also scores on its own: the newest review of a bought item, else the
/// newest review; `None` for a window without reviews.
pub fn focus_review<'a, I>(events: I) -> Option<&'a WindowEvent>
where
    I: DoubleEndedIterator<Item = &'a WindowEvent> + ExactSizeIterator + Clone,
{
    newest_review_of_bought_item(events.clone()).or_else(|| events.rev().find(|e| e.is_review()))
}

/// One item's share of a window's interest (see [`UserState::top_items`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ItemInterest {
    pub item_id: CompactString,
    pub category_id: CompactString,
    pub weight: f32,
}

/// Everything mindstream keeps about one user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// The window, oldest first; bounded by [`WindowSpec::max_events`] and `span_ms`.
    events: VecDeque<WindowEvent>,
    /// Event time of the event that (re)started the state, ms; the base of [`Self::version`].
    started_ms: i64,
    /// Oldest event time applied since the state was (re)started, ms.
    first_seen_ms: i64,
    /// Newest event time applied, ms; never decreases.
    newest_ms: i64,
    /// Accepted events since the state was (re)started.
    applied: u64,
    /// Buy events since the state was (re)started.
    lifetime_buys: u32,
    /// Decayed category interest, at most `interests_tracked` entries.
    interests: Vec<Interest>,
}

impl UserState {
    fn fresh(time_ms: i64) -> UserState {
        UserState {
            events: VecDeque::new(),
            started_ms: time_ms,
            first_seen_ms: time_ms,
            newest_ms: time_ms,
            applied: 0,
            lifetime_buys: 0,
            interests: Vec::new(),
        }
    }

    /// A new user's state holding `event`.
    pub fn new(event: WindowEvent, spec: &StateSpec) -> UserState {
        let mut state = UserState::fresh(event.event_time_ms);
        state.apply(event, spec);
        state
    }

    /// Adds an event in event-time order and trims the window. An event more than the TTL
    /// after the newest one restarts the state, exactly as if the idle user had been evicted.
    pub fn apply(&mut self, event: WindowEvent, spec: &StateSpec) {
        if event.event_time_ms - self.newest_ms > spec.user_ttl_ms {
            *self = UserState::fresh(event.event_time_ms);
        }
        self.decay_to(event.event_time_ms, spec);
        self.add_interest(&event, spec);
        self.applied += 1;
        self.lifetime_buys += u32::from(event.is_buy());
        self.first_seen_ms = self.first_seen_ms.min(event.event_time_ms);

        let at = self.events.partition_point(|e| e.event_time_ms <= event.event_time_ms);
        // Grow by half the length, at most a few slots, not by doubling: with a million users
        // (most with one or two events) the doubling slack would outweigh the events.
        if self.events.len() == self.events.capacity() {
            let room = spec.window.max_events.saturating_sub(self.events.len());
            self.events.reserve_exact(growth(self.events.len()).min(room).max(1));
        }
        self.events.insert(at, event);
        self.trim(&spec.window);
    }

    fn trim(&mut self, spec: &WindowSpec) {
        while self.events.len() > spec.max_events {
            self.events.pop_front();
        }
        let newest = self.events.back().map_or(i64::MIN, |e| e.event_time_ms);
        while self.events.front().is_some_and(|e| newest - e.event_time_ms > spec.span_ms) {
            self.events.pop_front();
        }
    }

    fn decay_to(&mut self, time_ms: i64, spec: &StateSpec) {
        if time_ms <= self.newest_ms {
            return;
        }
        let factor = decay(time_ms - self.newest_ms, spec.interest_half_life_ms);
        for interest in &mut self.interests {
            interest.weight *= factor;
        }
        self.newest_ms = time_ms;
    }

    fn add_interest(&mut self, event: &WindowEvent, spec: &StateSpec) {
        if event.category_id.is_empty() || spec.interests_tracked == 0 {
            return;
        }
        let age = self.newest_ms - event.event_time_ms;
        let add = event.interest_weight() * decay(age, spec.interest_half_life_ms);
        if let Some(found) = self.interests.iter_mut().find(|i| i.category_id == event.category_id)
        {
            found.weight += add;
            return;
        }
        if self.interests.len() >= spec.interests_tracked {
            let weakest = self
                .interests
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.weight.total_cmp(&b.1.weight))
                .map(|(i, _)| i);
            match weakest {
                Some(i) if self.interests[i].weight < add => {
                    self.interests.swap_remove(i);
                }
                _ => return,
            }
        }
        if self.interests.len() == self.interests.capacity() {
            self.interests.reserve_exact(growth(self.interests.len()));
        }
        self.interests.push(Interest { category_id: event.category_id.clone(), weight: add });
    }

    /// The window, oldest event first.
    pub fn events(&self) -> &VecDeque<WindowEvent> {
        &self.events
    }

    pub fn newest_ms(&self) -> i64 {
        self.newest_ms
    }

    pub fn first_seen_ms(&self) -> i64 {
        self.first_seen_ms
    }

    pub fn lifetime_buys(&self) -> u32 {
        self.lifetime_buys
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Per-user record version: increases with every accepted event and across restarts of
    /// the state (a restart happens only after a TTL-long gap, which moves `started_ms`
    /// forward by more milliseconds than the user could have had events).
    pub fn version(&self) -> u64 {
        (self.started_ms.max(0) as u64).saturating_add(self.applied)
    }

    /// The `top_k` heaviest categories with their share of the tracked interest mass.
    pub fn top_interests(&self, top_k: usize) -> Vec<(CompactString, f32)> {
        let total: f32 = self.interests.iter().map(|i| i.weight).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut ranked: Vec<&Interest> = self.interests.iter().collect();
        ranked
            .sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.category_id.cmp(&b.category_id)));
        ranked.iter().take(top_k).map(|i| (i.category_id.clone(), i.weight / total)).collect()
    }

    /// The `top_k` items of the window by interest, each event's weight decayed by its age
    /// behind the newest event, with their share of the window's item interest. Events without
    /// an item id do not count.
    pub fn top_items(&self, top_k: usize, half_life_ms: i64) -> Vec<ItemInterest> {
        let mut items: Vec<ItemInterest> = Vec::new();
        for event in self.events.iter().filter(|e| !e.item_id.is_empty()) {
            let add =
                event.interest_weight() * decay(self.newest_ms - event.event_time_ms, half_life_ms);
            match items.iter_mut().find(|i| i.item_id == event.item_id) {
                Some(found) => found.weight += add,
                None => items.push(ItemInterest {
                    item_id: event.item_id.clone(),
                    category_id: event.category_id.clone(),
                    weight: add,
                }),
            }
        }
        let total: f32 = items.iter().map(|i| i.weight).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        items.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.item_id.cmp(&b.item_id)));
        items.truncate(top_k);
        items.iter_mut().for_each(|i| i.weight /= total);
        items
    }

    /// Rough heap and inline size of this state, in bytes (for the state-size gauge).
    pub fn approx_bytes(&self) -> usize {
        let event_heap: usize = self
            .events
            .iter()
            .map(|e| {
                let text = match &e.detail {
                    Detail::Search { query, sort } => query.len() + sort.len(),
                    Detail::Review { text, language, .. } => text.len() + language.len(),
                    Detail::Click { .. } => 0,
                };
                heap_len(&e.event_id) + heap_len(&e.item_id) + heap_len(&e.category_id) + text
            })
            .sum();
        let interest_heap: usize = self.interests.iter().map(|i| heap_len(&i.category_id)).sum();
        std::mem::size_of::<UserState>()
            + self.events.capacity() * std::mem::size_of::<WindowEvent>()
            + event_heap
            + self.interests.capacity() * std::mem::size_of::<Interest>()
            + interest_heap
    }
}

/// Slots a full window or interest list of `len` entries grows by: half its length, at
/// least one, at most four.
fn growth(len: usize) -> usize {
    (len / 2).clamp(1, 4)
}

/// Heap bytes of an id (short ones are stored inline).
fn heap_len(id: &CompactString) -> usize {
    if id.is_heap_allocated() {
        id.capacity()
    } else {
        0
    }
}

/// `0.5^(age / half_life)`, 1 for non-positive ages.
fn decay(age_ms: i64, half_life_ms: i64) -> f32 {
    if age_ms <= 0 {
        return 1.0;
    }
    0.5f64.powf(age_ms as f64 / half_life_ms.max(1) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Click, Review};

    const MIN: i64 = 60_000;

    fn spec() -> StateSpec {
        StateSpec {
            window: WindowSpec { max_events: 4, span_ms: 60 * MIN, max_text_chars: 20 },
            user_ttl_ms: 24 * 60 * MIN,
            interest_half_life_ms: 60 * MIN,
            interests_tracked: 2,
        }
    }

    fn click(id: &str, minute: i64, action: Action, category: &str) -> WindowEvent {
        let event = Event {
            user_id: "u".into(),
            event_id: id.into(),
            event_time_ms: 1_000_000_000_000 + minute * MIN,
            opt_out: false,
            body: EventBody::Click(Click {
                action,
                item_id: "i".into(),
                category_id: category.into(),
                price: None,
                discount: None,
                quantity: None,
            }),
        };
        let lineage = Lineage { topic: "t".into(), partition: 0, offset: minute };
        WindowEvent::from_event(&event, lineage, &spec().window).expect("a windowed kind")
    }

    fn ids(state: &UserState) -> Vec<&str> {
        state.events().iter().map(|e| &*e.event_id).collect()
    }

    #[test]
    fn keeps_at_most_max_events_newest_last() {
        let spec = spec();
        let mut state = UserState::new(click("a", 0, Action::View, "c"), &spec);
        for (i, id) in ["b", "c", "d", "e"].iter().enumerate() {
            state.apply(click(id, i as i64 + 1, Action::View, "c"), &spec);
        }
        assert_eq!(ids(&state), ["b", "c", "d", "e"]);
        assert_eq!(state.applied(), 5);
    }

    #[test]
    fn trims_by_span_and_inserts_late_events_in_order() {
        let spec = spec();
        let mut state = UserState::new(click("a", 0, Action::View, "c"), &spec);
        state.apply(click("c", 50, Action::View, "c"), &spec);
        state.apply(click("b", 40, Action::Cart, "c"), &spec);
        assert_eq!(ids(&state), ["a", "b", "c"]);
        state.apply(click("d", 70, Action::View, "c"), &spec);
        assert_eq!(ids(&state), ["b", "c", "d"], "a is more than 60 minutes before d");
    }

    #[test]
    fn restarts_after_ttl_with_a_higher_version() {
        let spec = spec();
        let mut state = UserState::new(click("a", 0, Action::Buy, "c"), &spec);
        state.apply(click("b", 1, Action::View, "c"), &spec);
        let before = state.version();
        state.apply(click("z", 25 * 60, Action::View, "c"), &spec);
        assert_eq!(ids(&state), ["z"]);
        assert_eq!(state.lifetime_buys(), 0);
        assert!(state.version() > before);
    }

    #[test]
    fn version_increases_with_every_event() {
        let spec = spec();
        let mut state = UserState::new(click("a", 10, Action::View, "c"), &spec);
        let mut last = state.version();
        for (i, minute) in [12, 5, 11, 30].into_iter().enumerate() {
            state.apply(click(&format!("e{i}"), minute, Action::View, "c"), &spec);
            assert!(state.version() > last);
            last = state.version();
        }
    }

    #[test]
    fn interests_decay_and_stay_bounded() {
        let spec = spec();
        let mut state = UserState::new(click("a", 0, Action::Buy, "old"), &spec);
        state.apply(click("b", 60, Action::View, "new"), &spec);
        let top = state.top_interests(5);
        assert_eq!(&*top[0].0, "old", "a buy (4) decayed over one half-life is 2");
        assert!((top[0].1 - 2.0 / 3.0).abs() < 1e-4, "{top:?}");
        state.apply(click("c", 61, Action::Cart, "third"), &spec);
        assert_eq!(state.top_interests(5).len(), 2);
        assert_eq!(&*state.top_interests(1)[0].0, "third");
    }

    #[test]
    fn text_is_scrubbed_and_bounded() {
        let event = Event {
            user_id: "u".into(),
            event_id: "r".into(),
            event_time_ms: 5,
            opt_out: false,
            body: EventBody::Review(Review {
                item_id: "i".into(),
                rating: Some(1),
                text: "me@mail.com\nbroke after a week".into(),
                language: "en".into(),
            }),
        };
        let lineage = Lineage { topic: "t".into(), partition: 0, offset: 0 };
        let stored = WindowEvent::from_event(&event, lineage, &spec().window).expect("a review");
        match stored.detail {
            Detail::Review { text, .. } => assert_eq!(&*text, "[email] broke after "),
            other => panic!("{other:?}"),
        }
    }
}
