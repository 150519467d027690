//! All users' windows, the per-partition watermarks, and per-user coalescing.
//!
//! The [`Store`] receives validated events with their lineage and a token (the processor's
//! offset reference, or nothing offline). It rejects events behind their partition's
//! watermark, applies the rest to the user's window, and marks the user dirty. A dirty user
//! is handed out for scoring once `coalesce` has passed since its first unscored change, so a
//! burst of events gives one scoring of the latest window; the tokens of every event since
//! the last scoring travel with that request, so they are released only when its record is
//! delivered.
//!
//! Users are held under their pseudonymised key, so nothing the store keeps or hands out
//! (scoring requests, changelog snapshots) carries a raw user id. Each user belongs to the
//! input partition number its events come from; the store can drop a partition's users when
//! it is revoked and take them back from changelog snapshots when it is assigned. A restored
//! state remembers the last input offset applied per topic, so records read again after a
//! restart are not applied twice; they still mark the user for scoring, so the signal the
//! state was written with is delivered at least once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::DeliveryMode;
use crate::event::{Event, EventBody, RejectReason, Rejection};
use crate::model::batcher::ScoreRequest;
use crate::privacy::Pseudonymizer;
use crate::render;
use crate::signals::WindowFacts;
use crate::state::{self, AppliedThrough, Snapshot};
use crate::window::{Lineage, StateSpec, UserState, WindowEvent};

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub state: StateSpec,
    /// How far behind its partition's newest event time an event may be.
    pub allowed_lateness_ms: i64,
    /// Per-user debounce before a changed window is scored.
    pub coalesce: Duration,
    /// Newest events tried for leave-one-out explanations.
    pub explain_candidates: usize,
    /// Interests reported per record.
    pub top_interests: usize,
    /// Whether scoring requests carry the user's encoded state for the changelog.
    pub changelog: bool,
    /// Whether a record found already applied in a restored state rescores its user. Needed
    /// at-least-once (the state's signal may not have been delivered); not exactly-once,
    /// where a restored state and its signal were committed in the same transaction.
    pub rescore_restored: bool,
}

impl StoreConfig {
    /// The store settings for `config` and the model it runs. The window shape defaults to
    /// the one the model was trained with; a configured shape that differs is used, with a
    /// warning, since the model never saw such windows.
    pub fn resolve(config: &crate::config::Config, card: &crate::model::card::ModelCard) -> Self {
        let mut window = card.window;
        if let Some(max_events) = config.window.max_events {
            window.max_events = max_events;
        }
        if let Some(span) = config.window.span {
            window.span_ms = span.as_millis() as i64;
        }
        let user_ttl_ms =
            config.window.user_ttl.map_or(card.user_ttl_ms, |ttl| ttl.as_millis() as i64);
        if window != card.window || user_ttl_ms != card.user_ttl_ms {
            tracing::warn!(
                configured_max_events = window.max_events,
                configured_span_ms = window.span_ms,
                trained_max_events = card.window.max_events,
                trained_span_ms = card.window.span_ms,
                configured_user_ttl_ms = user_ttl_ms,
                trained_user_ttl_ms = card.user_ttl_ms,
                "window differs from the one the model was trained with"
            );
        }
        StoreConfig {
            state: StateSpec {
                window,
                user_ttl_ms,
                interest_half_life_ms: config.interests.half_life.as_millis() as i64,
                interests_tracked: config.interests.tracked,
            },
            allowed_lateness_ms: config.window.allowed_lateness.as_millis() as i64,
            coalesce: config.scoring.coalesce,
            explain_candidates: config.scoring.explain_candidates,
            top_interests: config.interests.top_k,
            changelog: true,
            rescore_restored: config.delivery.mode == DeliveryMode::AtLeastOnce,
        }
    }
}

/// What a scoring request carries back to the sink.
pub struct Scoring<T> {
    pub facts: WindowFacts,
    /// Tokens of the events applied since the previous scoring of this user.
    pub pending: Vec<T>,
    /// The input partition number the user belongs to.
    pub partition: i32,
    /// The store's epoch of that partition when the request was made; a record whose
    /// partition has been revoked (or revoked and assigned again) since is not published.
    pub epoch: u64,
    /// The encoded [`Snapshot`] of the state scored, when the store writes a changelog.
    pub changelog: Option<Vec<u8>>,
    /// Requests are numbered 0, 1, 2, ... in the order the store makes them; records are
    /// published in that order, so a user's records and states reach their topics in order
    /// even when workers finish out of order.
    pub sequence: u64,
}

/// The outcome of [`Store::apply`].
pub enum Applied<T> {
    /// In the window; the token is held until the user's next record is delivered.
    Accepted,
    /// Already in the user's restored state (read again after a restart): not applied. With
    /// `rescore_restored` the user is scored again and the token held until that record is
    /// delivered (`None`); otherwise the token comes back for the caller to release.
    AlreadyApplied(Option<T>),
    /// Behind the watermark: the caller dead-letters the record and releases the token.
    Late(Rejection, T),
    /// The user opted out: state dropped; the caller writes a tombstone for `user_key` and
    /// releases these tokens (this event's included) when it is delivered.
    OptedOut { user_key: String, partition: i32, released: Vec<T> },
    /// A request to erase the user: state dropped; the caller writes tombstones for `user_key`
    /// to the changelog and the signal topic and releases these tokens when they are delivered.
    Deleted { user_key: String, partition: i32, released: Vec<T> },
}

/// A user dropped from the store whose changelog entry must be deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub user_key: String,
    pub partition: i32,
}

struct Tracked<T> {
    state: UserState,
    /// The input partition number the user's events come from.
    partition: i32,
    /// Per input topic, the last offset applied to `state`.
    applied_through: Vec<(Arc<str>, i64)>,
    /// When the first change since the last scoring request arrived; `None` when clean.
    dirty_since: Option<Instant>,
    pending: Vec<T>,
}

impl<T> Tracked<T> {
    fn already_applied(&self, lineage: &Lineage) -> bool {
        self.applied_through
            .iter()
            .any(|(topic, offset)| *topic == lineage.topic && lineage.offset <= *offset)
    }

    fn record_applied(&mut self, lineage: &Lineage) {
        match self.applied_through.iter_mut().find(|(topic, _)| *topic == lineage.topic) {
            Some((_, offset)) => *offset = (*offset).max(lineage.offset),
            None => self.applied_through.push((lineage.topic.clone(), lineage.offset)),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            partition: self.partition,
            state: self.state.clone(),
            applied_through: self
                .applied_through
                .iter()
                .map(|(topic, offset)| AppliedThrough { topic: (**topic).into(), offset: *offset })
                .collect(),
        }
    }
}

pub struct Store<T> {
    config: StoreConfig,
    pseudonymizer: Arc<Pseudonymizer>,
    /// Users by pseudonymised key.
    users: HashMap<String, Tracked<T>>,
    /// Newest event time seen per source partition.
    newest: HashMap<(Arc<str>, i32), i64>,
    /// Assignment epoch per input partition number (0 where never restored).
    epochs: HashMap<i32, u64>,
    /// Number of the next scoring request.
    next_sequence: u64,
    /// Users in order of their first unscored change; entries whose user was scored or
    /// changed again since are skipped when they come up.
    due: VecDeque<(Instant, String)>,
}

impl<T> Store<T> {
    pub fn new(config: StoreConfig, pseudonymizer: Arc<Pseudonymizer>) -> Self {
        Store {
            config,
            pseudonymizer,
            users: HashMap::new(),
            newest: HashMap::new(),
            epochs: HashMap::new(),
            next_sequence: 0,
            due: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Whether the user's window already holds an event with this `event_id` that came from
    /// another record: a duplicate, to be rejected. A record read again after a restore is
    /// not one (its lineage is the held event's). Ids that have left the window are not
    /// remembered.
    pub fn is_duplicate(&self, event: &Event, lineage: &Lineage) -> bool {
        let Some(tracked) = self.users.get(&self.pseudonymizer.key(&event.user_id)) else {
            return false;
        };
        let id = event.event_id.as_str();
        tracked.state.events().iter().any(|held| held.event_id == id && held.lineage != *lineage)
    }

    /// Takes the next request sequence number for an entry that is published in request
    /// order without a scoring (a user's tombstones).
    pub fn reserve_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    /// Applies one event from the partition named in `lineage`.
    pub fn apply(&mut self, event: Event, lineage: Lineage, token: T, now: Instant) -> Applied<T> {
        // A deletion or an opt-out is honoured however late it comes, is never windowed, and
        // does not move the partition's watermark.
        if matches!(event.body, EventBody::DeleteUser) || event.opt_out {
            let user_key = self.pseudonymizer.key(&event.user_id);
            let mut released = self.users.remove(&user_key).map_or(Vec::new(), |t| t.pending);
            released.push(token);
            let partition = lineage.partition;
            return if event.opt_out && !matches!(event.body, EventBody::DeleteUser) {
                Applied::OptedOut { user_key, partition, released }
            } else {
                Applied::Deleted { user_key, partition, released }
            };
        }
        let source = (lineage.topic.clone(), lineage.partition);
        let newest = self.newest.entry(source).or_insert(i64::MIN);
        if *newest != i64::MIN && event.event_time_ms < *newest - self.config.allowed_lateness_ms {
            let behind = humantime::format_duration(Duration::from_millis(
                (*newest - event.event_time_ms).unsigned_abs(),
            ));
            let detail = format!("event time is {behind} behind the partition's newest event");
            return Applied::Late(Rejection::new(RejectReason::Late, detail), token);
        }
        *newest = (*newest).max(event.event_time_ms);

        let user_key = self.pseudonymizer.key(&event.user_id);
        let Some(stored) =
            WindowEvent::from_event(&event, lineage.clone(), &self.config.state.window)
        else {
            unreachable!("deletions return above");
        };
        match self.users.get_mut(&user_key) {
            Some(tracked) => {
                let outcome = if tracked.already_applied(&lineage) {
                    if !self.config.rescore_restored {
                        return Applied::AlreadyApplied(Some(token));
                    }
                    Applied::AlreadyApplied(None)
                } else {
                    tracked.state.apply(stored, &self.config.state);
                    tracked.record_applied(&lineage);
                    Applied::Accepted
                };
                tracked.pending.push(token);
                if tracked.dirty_since.is_none() {
                    tracked.dirty_since = Some(now);
                    self.due.push_back((now, user_key));
                }
                outcome
            }
            None => {
                let state = UserState::new(stored, &self.config.state);
                let tracked = Tracked {
                    state,
                    partition: lineage.partition,
                    applied_through: vec![(lineage.topic.clone(), lineage.offset)],
                    dirty_since: Some(now),
                    pending: vec![token],
                };
                self.users.insert(user_key.clone(), tracked);
                self.due.push_back((now, user_key));
                Applied::Accepted
            }
        }
    }

    /// At most `limit` scoring requests for users whose debounce has passed by `now`, oldest
    /// first, and whether more users are due.
    pub fn take_due(
        &mut self,
        now: Instant,
        limit: usize,
    ) -> (Vec<ScoreRequest<Scoring<T>>>, bool) {
        let mut out = Vec::new();
        while let Some((since, _)) = self.due.front() {
            if now.duration_since(*since) < self.config.coalesce {
                break;
            }
            if out.len() == limit {
                return (out, true);
            }
            let Some((since, user)) = self.due.pop_front() else { break };
            if let Some(request) = self.request_if_dirty_since(&user, since) {
                out.push(request);
            }
        }
        (out, false)
    }

    /// Scoring requests for every dirty user, regardless of debounce (shutdown, end of file).
    pub fn take_all(&mut self) -> Vec<ScoreRequest<Scoring<T>>> {
        let mut out = Vec::new();
        while let Some((since, user)) = self.due.pop_front() {
            if let Some(request) = self.request_if_dirty_since(&user, since) {
                out.push(request);
            }
        }
        out
    }

    fn request_if_dirty_since(
        &mut self,
        user: &str,
        since: Instant,
    ) -> Option<ScoreRequest<Scoring<T>>> {
        let tracked = self.users.get_mut(user)?;
        if tracked.dirty_since != Some(since) {
            return None;
        }
        tracked.dirty_since = None;
        let pending = std::mem::take(&mut tracked.pending);
        let facts = WindowFacts::of(user.to_owned(), &tracked.state, self.config.top_interests);
        let segments = render::render(&tracked.state);
        let count = tracked.state.events().len();
        let candidates = (count.saturating_sub(self.config.explain_candidates)..count).collect();
        let changelog = self.config.changelog.then(|| state::encode(&tracked.snapshot()));
        let partition = tracked.partition;
        let epoch = self.epochs.get(&partition).copied().unwrap_or(0);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let context = Scoring { facts, pending, partition, epoch, changelog, sequence };
        Some(ScoreRequest { segments, candidates, context })
    }

    /// Takes over the users of input partition `partition` from their changelog snapshots,
    /// under a new assignment `epoch`. A snapshot of a user already held replaces it.
    pub fn restore(
        &mut self,
        partition: i32,
        epoch: u64,
        snapshots: impl IntoIterator<Item = (String, Snapshot)>,
    ) -> usize {
        self.epochs.insert(partition, epoch);
        let mut restored = 0;
        for (user_key, snapshot) in snapshots {
            let tracked = Tracked {
                state: snapshot.state,
                partition,
                applied_through: snapshot
                    .applied_through
                    .into_iter()
                    .map(|a| (Arc::<str>::from(a.topic), a.offset))
                    .collect(),
                dirty_since: None,
                pending: Vec::new(),
            };
            self.users.insert(user_key, tracked);
            restored += 1;
        }
        restored
    }

    /// Drops the users of revoked input partition numbers, with their unscored changes and
    /// held tokens (the partitions' next owner reads those records again), and forgets the
    /// partitions' watermarks. Returns how many users were dropped.
    pub fn revoke(&mut self, partitions: &[i32]) -> usize {
        let before = self.users.len();
        self.users.retain(|_, t| !partitions.contains(&t.partition));
        self.newest.retain(|(_, p), _| !partitions.contains(p));
        for partition in partitions {
            self.epochs.remove(partition);
        }
        before - self.users.len()
    }

    /// Drops users idle past the TTL. Only users that any later event would restart anyway
    /// are dropped (idle longer than TTL plus allowed lateness behind the slowest partition),
    /// so eviction never changes a result; dirty users wait for their scoring.
    pub fn evict_idle(&mut self) -> Vec<Dropped> {
        let Some(&clock) = self.newest.values().filter(|&&t| t != i64::MIN).min() else {
            return Vec::new();
        };
        let horizon = clock - self.config.state.user_ttl_ms - self.config.allowed_lateness_ms;
        let mut dropped = Vec::new();
        self.users.retain(|key, t| {
            let keep = t.dirty_since.is_some() || t.state.newest_ms() >= horizon;
            if !keep {
                dropped.push(Dropped { user_key: key.clone(), partition: t.partition });
            }
            keep
        });
        dropped
    }

    /// The newest event time seen on an input partition (its watermark before lateness).
    pub fn watermark(&self, topic: &Arc<str>, partition: i32) -> Option<i64> {
        self.newest.get(&(topic.clone(), partition)).copied().filter(|&t| t != i64::MIN)
    }

    /// Starts an input partition from a watermark carried over from its previous owner.
    pub fn set_watermark(&mut self, topic: &Arc<str>, partition: i32, watermark: i64) {
        let newest = self.newest.entry((topic.clone(), partition)).or_insert(i64::MIN);
        *newest = (*newest).max(watermark);
    }

    /// The assignment epoch of an input partition number (0 where never restored).
    pub fn epoch(&self, partition: i32) -> u64 {
        self.epochs.get(&partition).copied().unwrap_or(0)
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Users with changes not yet handed out for scoring.
    pub fn dirty(&self) -> usize {
        self.users.values().filter(|t| t.dirty_since.is_some()).count()
    }

    /// Approximate bytes of all user state.
    pub fn state_bytes(&self) -> usize {
        self.users.iter().map(|(id, t)| id.len() + t.state.approx_bytes()).sum()
    }

    /// The current window of a user, if held.
    pub fn state(&self, user_id: &str) -> Option<&UserState> {
        self.users.get(&self.pseudonymizer.key(user_id)).map(|t| &t.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Action, Click, EventBody};
    use crate::window::WindowSpec;

    fn store(coalesce_ms: u64) -> Store<i64> {
        let config = StoreConfig {
            state: StateSpec {
                window: WindowSpec::default(),
                user_ttl_ms: 86_400_000,
                interest_half_life_ms: 86_400_000,
                interests_tracked: 8,
            },
            allowed_lateness_ms: 60_000,
            coalesce: Duration::from_millis(coalesce_ms),
            explain_candidates: 2,
            top_interests: 3,
            changelog: true,
            rescore_restored: true,
        };
        let key = Arc::new(Pseudonymizer::new(b"0123456789abcdef").unwrap());
        Store::new(config, key)
    }

    fn event(user: &str, time_ms: i64) -> Event {
        Event {
            user_id: user.into(),
            event_id: format!("{user}-{time_ms}"),
            event_time_ms: time_ms,
            opt_out: false,
            body: EventBody::Click(Click {
                action: Action::View,
                item_id: "i".into(),
                category_id: "c".into(),
                price: None,
                discount: None,
                quantity: None,
            }),
        }
    }

    fn lineage(partition: i32, offset: i64) -> Lineage {
        Lineage { topic: "t".into(), partition, offset }
    }

    #[test]
    fn a_burst_gives_one_scoring_with_every_token() {
        let mut store = store(100);
        let t0 = Instant::now();
        for i in 0..5 {
            let at = t0 + Duration::from_millis(i * 10);
            assert!(matches!(
                store.apply(event("u", 1_000_000 + i as i64), lineage(0, i as i64), i as i64, at),
                Applied::Accepted
            ));
        }
        assert!(store.take_due(t0 + Duration::from_millis(99), 10).0.is_empty());
        let (due, more) = store.take_due(t0 + Duration::from_millis(100), 10);
        assert!(!more);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].context.pending, [0, 1, 2, 3, 4]);
        assert_eq!(due[0].context.facts.events.len(), 5);
        assert_eq!(due[0].candidates, [3, 4]);
        assert!(store.take_due(t0 + Duration::from_secs(10), 10).0.is_empty());
    }

    #[test]
    fn take_due_respects_the_limit() {
        let mut store = store(0);
        let now = Instant::now();
        for user in ["a", "b", "c"] {
            store.apply(event(user, 1_000), lineage(0, 0), 0, now);
        }
        let (first, more) = store.take_due(now, 2);
        assert_eq!((first.len(), more), (2, true));
        let (rest, more) = store.take_due(now, 2);
        assert_eq!((rest.len(), more), (1, false));
        let sequences: Vec<u64> = first.iter().chain(&rest).map(|r| r.context.sequence).collect();
        assert_eq!(sequences, [0, 1, 2], "requests are numbered in the order they are made");
    }

    #[test]
    fn late_events_are_rejected_per_partition() {
        let mut store = store(0);
        let now = Instant::now();
        store.apply(event("a", 10_000_000), lineage(0, 0), 0, now);
        match store.apply(event("b", 10_000_000 - 61_000), lineage(0, 1), 1, now) {
            Applied::Late(rejection, token) => {
                assert_eq!(rejection.reason, RejectReason::Late);
                assert_eq!(token, 1);
            }
            _ => panic!("expected late"),
        }
        let other_partition = store.apply(event("b", 10_000_000 - 61_000), lineage(1, 0), 2, now);
        assert!(matches!(other_partition, Applied::Accepted));
    }

    #[test]
    fn delete_request_drops_state_however_late_it_comes() {
        let mut store = store(1_000);
        let now = Instant::now();
        store.apply(event("u", 10_000_000), lineage(0, 0), 0, now);
        // Far behind the partition's newest event, which would make any other event late.
        let mut erase = event("u", 1);
        erase.body = EventBody::DeleteUser;
        match store.apply(erase, lineage(0, 1), 1, now) {
            Applied::Deleted { user_key, partition, released } => {
                assert_eq!(released, [0, 1], "the user's held tokens and the request's own");
                assert_eq!(partition, 0);
                assert_eq!(user_key, store.pseudonymizer.key("u"));
            }
            _ => panic!("expected a deletion"),
        }
        assert_eq!(store.users(), 0);
        assert!(store.take_all().is_empty(), "nothing left to score");

        let mut unknown = event("never-seen", 5);
        unknown.body = EventBody::DeleteUser;
        let applied = store.apply(unknown, lineage(0, 2), 2, now);
        assert!(matches!(applied, Applied::Deleted { released, .. } if released == [2]));
    }

    #[test]
    fn a_late_opt_out_is_honoured_and_does_not_move_the_watermark() {
        let mut store = store(1_000);
        let now = Instant::now();
        store.apply(event("u", 10_000_000), lineage(0, 0), 0, now);
        store.apply(event("v", 10_000_000), lineage(0, 1), 1, now);
        let mut quit = event("u", 1);
        quit.opt_out = true;
        assert!(matches!(store.apply(quit, lineage(0, 2), 2, now), Applied::OptedOut { .. }));
        let mut future = event("v", 90_000_000_000);
        future.opt_out = true;
        assert!(matches!(store.apply(future, lineage(0, 3), 3, now), Applied::OptedOut { .. }));
        let next = store.apply(event("w", 10_000_001), lineage(0, 4), 4, now);
        assert!(
            matches!(next, Applied::Accepted),
            "an opt-out dated far ahead must not make the next event late"
        );
    }

    #[test]
    fn opt_out_drops_state_and_releases_tokens() {
        let mut store = store(1_000);
        let now = Instant::now();
        store.apply(event("u", 1_000), lineage(0, 0), 0, now);
        let mut quit = event("u", 2_000);
        quit.opt_out = true;
        match store.apply(quit, lineage(0, 1), 1, now) {
            Applied::OptedOut { user_key, partition, released } => {
                assert_eq!(released, [0, 1]);
                assert_eq!(partition, 0);
                assert_eq!(
                    user_key,
                    store.pseudonymizer.key("u"),
                    "tombstone key is the pseudonym"
                );
            }
            _ => panic!("expected opt-out"),
        }
        assert_eq!(store.users(), 0);
        assert!(store.take_all().is_empty());
    }

    #[test]
    fn eviction_spares_dirty_and_recent_users() {
        let mut store = store(0);
        let now = Instant::now();
        store.apply(event("old", 1_000), lineage(0, 0), 0, now);
        store.take_all();
        store.apply(event("new", 1_000 + 2 * 86_400_000), lineage(0, 1), 1, now);
        let evicted = store.evict_idle();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].user_key, store.pseudonymizer.key("old"));
        assert!(store.state("old").is_none());
        assert!(store.state("new").is_some());
    }

    #[test]
    fn requests_carry_a_snapshot_of_the_scored_state() {
        let mut store = store(0);
        let now = Instant::now();
        store.apply(event("u", 1_000), lineage(3, 7), 0, now);
        let (due, _) = store.take_due(now, 10);
        let scoring = &due[0].context;
        assert_eq!(scoring.partition, 3);
        let snapshot = state::decode(scoring.changelog.as_deref().unwrap()).unwrap();
        assert_eq!(&snapshot.state, store.state("u").unwrap());
        assert_eq!(snapshot.partition, 3);
        assert_eq!(snapshot.applied_through, [AppliedThrough { topic: "t".into(), offset: 7 }]);
        assert!(!scoring.facts.user_key.contains('u'), "requests carry the pseudonym only");
    }

    #[test]
    fn records_read_again_after_a_restore_are_scored_but_not_applied_twice() {
        let mut first = store(0);
        let now = Instant::now();
        for offset in 0..3 {
            first.apply(event("u", 1_000 + offset), lineage(1, offset), offset, now);
        }
        let (due, _) = first.take_due(now, 10);
        let snapshot = state::decode(due[0].context.changelog.as_deref().unwrap()).unwrap();

        // The next owner restores that snapshot, then reads from an older committed offset.
        let mut second = store(0);
        let key = second.pseudonymizer.key("u");
        assert_eq!(second.restore(1, 5, [(key, snapshot.clone())]), 1);
        assert!(second.take_due(now, 10).0.is_empty(), "a restored user is clean");
        assert!(matches!(
            second.apply(event("u", 1_002), lineage(1, 2), 2, now),
            Applied::AlreadyApplied(None)
        ));
        assert!(matches!(
            second.apply(event("u", 1_003), lineage(1, 3), 3, now),
            Applied::Accepted
        ));
        let (due, _) = second.take_due(now, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].context.pending, [2, 3]);
        assert_eq!(due[0].context.epoch, 5);
        assert_eq!(second.state("u").unwrap().applied(), snapshot.state.applied() + 1);
    }

    #[test]
    fn revoking_a_partition_drops_only_its_users() {
        let mut store = store(1_000);
        let now = Instant::now();
        store.apply(event("a", 1_000), lineage(0, 0), 0, now);
        store.apply(event("b", 1_000), lineage(1, 0), 1, now);
        assert_eq!(store.revoke(&[1]), 1);
        assert!(store.state("a").is_some());
        assert!(store.state("b").is_none());
        let remaining = store.take_all();
        assert_eq!(remaining.len(), 1, "the dropped user's due entry is skipped");
        assert_eq!(remaining[0].context.pending, [0]);
    }

    #[test]
    fn exactly_once_does_not_rescore_records_already_in_a_restored_state() {
        let mut first = store(0);
        let now = Instant::now();
        first.apply(event("u", 1_000), lineage(0, 4), 4, now);
        let (due, _) = first.take_due(now, 10);
        let snapshot = state::decode(due[0].context.changelog.as_deref().unwrap()).unwrap();

        let mut second = store(0);
        second.config.rescore_restored = false;
        let key = second.pseudonymizer.key("u");
        second.restore(0, 1, [(key, snapshot)]);
        match second.apply(event("u", 1_000), lineage(0, 4), 4, now) {
            Applied::AlreadyApplied(Some(token)) => assert_eq!(token, 4),
            _ => panic!("expected the token back"),
        }
        assert!(second.take_all().is_empty(), "nothing to score: its signal was committed");
    }

    #[test]
    fn a_second_record_with_a_held_event_id_is_a_duplicate() {
        let mut store = store(0);
        let now = Instant::now();
        let first = event("u", 1_000);
        assert!(!store.is_duplicate(&first, &lineage(0, 0)));
        store.apply(first.clone(), lineage(0, 0), 0, now);
        assert!(store.is_duplicate(&first, &lineage(0, 1)), "another record, same id");
        assert!(!store.is_duplicate(&first, &lineage(0, 0)), "the same record read again");
        let other_user = Event { user_id: "v".into(), ..first };
        assert!(!store.is_duplicate(&other_user, &lineage(0, 2)), "ids are per user");
    }
}
