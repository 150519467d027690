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

use foldhash::fast::RandomState as FastHash;
use smallvec::{smallvec, SmallVec};

use crate::actions::Marks;
use crate::config::DeliveryMode;
use crate::console::TimelineEvent;
use crate::event::{Event, EventBody, RejectReason, Rejection};
use crate::model::batcher::ScoreRequest;
use crate::privacy::{Pseudonymizer, UserKey};
use crate::render;
use crate::signals::{InterestFeed, WindowFacts};
use crate::state::{self, AppliedThrough, Snapshot};
use crate::window::{focus_review, Lineage, StateSpec, UserState, WindowEvent};

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub state: StateSpec,
    /// How far behind its partition's newest event time an event may be.
    pub allowed_lateness_ms: i64,
    /// Per-user debounce before a changed window is scored.
    pub coalesce: Duration,
    /// Newest events tried for leave-one-out explanations.
    pub explain_candidates: usize,
    /// Categories and items reported per record.
    pub interest_feed: InterestFeed,
    /// Whether scoring requests carry the user's encoded state for the changelog.
    pub changelog: bool,
    /// Whether a record found already applied in a restored state rescores its user. Needed
    /// at-least-once (the state's signal may not have been delivered); not exactly-once,
    /// where a restored state and its signal were committed in the same transaction.
    pub rescore_restored: bool,
    /// Reject an event whose `event_id` is already in the user's window from another record
    /// (`limits.reject_duplicates`).
    pub reject_duplicates: bool,
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
            interest_feed: InterestFeed {
                top_categories: config.interests.top_k,
                top_items: config.interests.top_items,
                half_life_ms: config.interests.half_life.as_millis() as i64,
            },
            changelog: true,
            rescore_restored: config.delivery.mode == DeliveryMode::AtLeastOnce,
            reject_duplicates: config.limits.reject_duplicates,
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
    /// The user's marks as the store held them when the request was made (the snapshot
    /// carries the same); the publisher may know newer ones.
    pub marks: Option<Box<Marks>>,
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
    /// Behind the watermark (`late`), or an `event_id` the user's window already holds from
    /// another record (`duplicate`): the caller dead-letters the record and releases the
    /// token.
    Rejected(Rejection, T),
    /// The user opted out: state dropped; the caller writes a tombstone for `user_key` and
    /// releases these tokens (this event's included) when it is delivered.
    OptedOut { user_key: String, partition: i32, released: Vec<T>, marks: Option<Box<Marks>> },
    /// A request to erase the user: state dropped; the caller writes tombstones for `user_key`
    /// to the changelog and the signal topic and releases these tokens when they are delivered.
    Deleted { user_key: String, partition: i32, released: Vec<T>, marks: Option<Box<Marks>> },
}

/// A user dropped from the store whose changelog entry must be deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct Dropped {
    pub user_key: String,
    pub partition: i32,
    pub marks: Option<Box<Marks>>,
}

struct Tracked<T> {
    state: UserState,
    /// The input partition number the user's events come from.
    partition: i32,
    /// Per input topic, the last offset applied to `state`. Users of a single topic, nearly
    /// all, hold it inline: no allocation, and no pointer to follow on every event.
    applied_through: SmallVec<[(Arc<str>, i64); 1]>,
    /// When the first change since the last scoring request arrived; `None` when clean.
    dirty_since: Option<Instant>,
    pending: Vec<T>,
    /// Segment membership and alert de-duplication, set from the publisher; `None` (one
    /// pointer) for the many users with none.
    marks: Option<Box<Marks>>,
}

impl<T> Tracked<T> {
    /// Whether the window holds an event with this `event_id` from an earlier record: a
    /// duplicate. A record read again after a restore is not one: either its own event is the
    /// one held (same lineage), or the id is held from a later offset of the same partition,
    /// which the record preceded when it was first read. Ids that have left the window are
    /// not remembered.
    fn holds_from_another_record(&self, event_id: &str, lineage: &Lineage) -> bool {
        let preceded = |held: &Lineage| {
            held.partition == lineage.partition
                && held.offset > lineage.offset
                && same_topic(&held.topic, &lineage.topic)
        };
        self.state.events().iter().any(|held| {
            &*held.event_id == event_id && held.lineage != *lineage && !preceded(&held.lineage)
        })
    }

    fn already_applied(&self, lineage: &Lineage) -> bool {
        self.applied_through
            .iter()
            .any(|(topic, offset)| same_topic(topic, &lineage.topic) && lineage.offset <= *offset)
    }

    fn record_applied(&mut self, lineage: &Lineage) {
        match self.applied_through.iter_mut().find(|(topic, _)| same_topic(topic, &lineage.topic)) {
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
            marks: self.marks.as_deref().cloned().unwrap_or_default(),
        }
    }
}

/// The newest event time of each source partition, by partition number, then topic.
type Watermarks = HashMap<i32, SmallVec<[(Arc<str>, i64); 1]>, FastHash>;

/// Whether two topic names are the same: the processor hands out one `Arc` per input topic, so
/// the pointers usually answer, and the names where they differ (a restored state's).
fn same_topic(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The newest event time of a source partition, `i64::MIN` where none is known yet.
fn newest_mut<'a>(newest: &'a mut Watermarks, topic: &Arc<str>, partition: i32) -> &'a mut i64 {
    let topics = newest.entry(partition).or_default();
    let at = match topics.iter().position(|(held, _)| same_topic(held, topic)) {
        Some(at) => at,
        None => {
            topics.push((topic.clone(), i64::MIN));
            topics.len() - 1
        }
    };
    &mut topics[at].1
}

pub struct Store<T> {
    config: StoreConfig,
    pseudonymizer: Arc<Pseudonymizer>,
    /// Users by pseudonymised key. The keys are keyed HMAC outputs, which nobody can choose
    /// to collide, so the map uses a fast hash instead of the standard library's SipHash.
    /// They are held as numbers, so that looking a user up reads no memory outside the table.
    users: HashMap<UserKey, Box<Tracked<T>>, FastHash>,
    /// Newest event time seen per source partition, by partition number, then topic: a
    /// number hashes without reading the topic's name, and the topics of one number (one per
    /// input topic) are told apart by pointer, the name compared only where two differ.
    newest: Watermarks,
    /// Assignment epoch per input partition number (0 where never restored).
    epochs: HashMap<i32, u64>,
    /// Number of the next scoring request.
    next_sequence: u64,
    /// Users in order of their first unscored change; entries whose user was scored or
    /// changed again since are skipped when they come up.
    due: VecDeque<(Instant, UserKey)>,
}

impl<T> Store<T> {
    pub fn new(config: StoreConfig, pseudonymizer: Arc<Pseudonymizer>) -> Self {
        Store {
            config,
            pseudonymizer,
            users: HashMap::default(),
            newest: HashMap::default(),
            epochs: HashMap::new(),
            next_sequence: 0,
            due: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
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
        let user_key = self.pseudonymizer.user_key(&event.user_id);
        // A deletion or an opt-out is honoured however late it comes, is never windowed, and
        // does not move the partition's watermark.
        if matches!(event.body, EventBody::DeleteUser) || event.opt_out {
            let (mut released, marks) =
                self.users.remove(&user_key).map_or((Vec::new(), None), |t| (t.pending, t.marks));
            released.push(token);
            let partition = lineage.partition;
            let user_key = user_key.to_string();
            return if event.opt_out && !matches!(event.body, EventBody::DeleteUser) {
                Applied::OptedOut { user_key, partition, released, marks }
            } else {
                Applied::Deleted { user_key, partition, released, marks }
            };
        }
        let held = self.users.get_mut(&user_key);
        if self.config.reject_duplicates
            && held.as_ref().is_some_and(|t| t.holds_from_another_record(&event.event_id, &lineage))
        {
            let detail = "event_id is already in the user's window";
            return Applied::Rejected(Rejection::new(RejectReason::Duplicate, detail), token);
        }
        let newest = newest_mut(&mut self.newest, &lineage.topic, lineage.partition);
        if *newest != i64::MIN && event.event_time_ms < *newest - self.config.allowed_lateness_ms {
            let behind = humantime::format_duration(Duration::from_millis(
                (*newest - event.event_time_ms).unsigned_abs(),
            ));
            let detail = format!("event time is {behind} behind the partition's newest event");
            return Applied::Rejected(Rejection::new(RejectReason::Late, detail), token);
        }
        *newest = (*newest).max(event.event_time_ms);

        // The lineage moves into the stored event, once nothing else needs it.
        let window = &self.config.state.window;
        let stored = |lineage| {
            let Some(stored) = WindowEvent::from_event(&event, lineage, window) else {
                unreachable!("deletions return above");
            };
            stored
        };
        match held {
            Some(tracked) => {
                let outcome = if tracked.already_applied(&lineage) {
                    if !self.config.rescore_restored {
                        return Applied::AlreadyApplied(Some(token));
                    }
                    Applied::AlreadyApplied(None)
                } else {
                    tracked.record_applied(&lineage);
                    tracked.state.apply(stored(lineage), &self.config.state);
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
                let (partition, applied) =
                    (lineage.partition, (lineage.topic.clone(), lineage.offset));
                let tracked = Tracked {
                    state: UserState::new(stored(lineage), &self.config.state),
                    partition,
                    applied_through: smallvec![applied],
                    dirty_since: Some(now),
                    pending: vec![token],
                    marks: None,
                };
                self.users.insert(user_key, Box::new(tracked));
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
            if let Some(request) = self.request_if_dirty_since(user, since) {
                out.push(request);
            }
        }
        (out, false)
    }

    /// Scoring requests for every dirty user, regardless of debounce (shutdown, end of file).
    pub fn take_all(&mut self) -> Vec<ScoreRequest<Scoring<T>>> {
        let mut out = Vec::new();
        while let Some((since, user)) = self.due.pop_front() {
            if let Some(request) = self.request_if_dirty_since(user, since) {
                out.push(request);
            }
        }
        out
    }

    fn request_if_dirty_since(
        &mut self,
        user: UserKey,
        since: Instant,
    ) -> Option<ScoreRequest<Scoring<T>>> {
        let tracked = self.users.get_mut(&user)?;
        if tracked.dirty_since != Some(since) {
            return None;
        }
        tracked.dirty_since = None;
        let pending = std::mem::take(&mut tracked.pending);
        let facts = WindowFacts::of(user.to_string(), &tracked.state, self.config.interest_feed);
        let segments = render::render(&tracked.state);
        // A window that is its review alone needs no second scoring of the same text.
        let focus = focus_review(tracked.state.events().iter())
            .map(|review| render::render(&UserState::new(review.clone(), &self.config.state)))
            .filter(|focus| *focus != segments);
        let count = tracked.state.events().len();
        let candidates = (count.saturating_sub(self.config.explain_candidates)..count).collect();
        let changelog = self.config.changelog.then(|| state::encode(&tracked.snapshot()));
        let partition = tracked.partition;
        let epoch = self.epochs.get(&partition).copied().unwrap_or(0);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let marks = tracked.marks.clone();
        let context = Scoring { facts, pending, partition, epoch, changelog, marks, sequence };
        Some(ScoreRequest { segments, candidates, focus, context })
    }

    /// Takes over the users of input partition `partition` from their changelog snapshots,
    /// under a new assignment `epoch`. A snapshot of a user already held replaces it; one whose
    /// key is not a user key (32 lowercase hex digits, as this processor writes them) is
    /// skipped with a warning.
    pub fn restore(
        &mut self,
        partition: i32,
        epoch: u64,
        snapshots: impl IntoIterator<Item = (String, Snapshot)>,
    ) -> usize {
        self.epochs.insert(partition, epoch);
        let mut restored = 0;
        for (user_key, snapshot) in snapshots {
            let Some(user_key) = UserKey::parse(&user_key) else {
                tracing::warn!(partition, "changelog record skipped: its key is not a user key");
                continue;
            };
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
                marks: snapshot.marks.boxed(),
            };
            self.users.insert(user_key, Box::new(tracked));
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
        self.newest.retain(|p, _| !partitions.contains(p));
        for partition in partitions {
            self.epochs.remove(partition);
        }
        before - self.users.len()
    }

    /// Drops users idle past the TTL. Only users that any later event would restart anyway
    /// are dropped (idle longer than TTL plus allowed lateness behind the slowest partition),
    /// so eviction never changes a result; dirty users wait for their scoring.
    pub fn evict_idle(&mut self) -> Vec<Dropped> {
        let times = self.newest.values().flatten().map(|&(_, t)| t);
        let Some(clock) = times.filter(|&t| t != i64::MIN).min() else {
            return Vec::new();
        };
        let horizon = clock - self.config.state.user_ttl_ms - self.config.allowed_lateness_ms;
        let mut dropped = Vec::new();
        self.users.retain(|key, t| {
            let keep = t.dirty_since.is_some() || t.state.newest_ms() >= horizon;
            if !keep {
                let marks = t.marks.take();
                dropped.push(Dropped { user_key: key.to_string(), partition: t.partition, marks });
            }
            keep
        });
        dropped
    }

    /// The newest event time seen on an input partition (its watermark before lateness).
    pub fn watermark(&self, topic: &Arc<str>, partition: i32) -> Option<i64> {
        let topics = self.newest.get(&partition)?;
        let &(_, newest) = topics.iter().find(|(held, _)| same_topic(held, topic))?;
        Some(newest).filter(|&t| t != i64::MIN)
    }

    /// Starts an input partition from a watermark carried over from its previous owner.
    pub fn set_watermark(&mut self, topic: &Arc<str>, partition: i32, watermark: i64) {
        let newest = newest_mut(&mut self.newest, topic, partition);
        *newest = (*newest).max(watermark);
    }

    /// The assignment epoch of an input partition number (0 where never restored).
    pub fn epoch(&self, partition: i32) -> u64 {
        self.epochs.get(&partition).copied().unwrap_or(0)
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Users waiting to be handed out for scoring, their debounce passed or not (an upper
    /// bound: entries of users scored or forgotten since are counted until they come up).
    pub fn waiting(&self) -> usize {
        self.due.len()
    }

    /// Users with changes not yet handed out for scoring.
    pub fn dirty(&self) -> usize {
        self.users.values().filter(|t| t.dirty_since.is_some()).count()
    }

    /// Approximate bytes of all user state.
    pub fn state_bytes(&self) -> usize {
        self.users.values().map(|t| size_of::<UserKey>() + t.state.approx_bytes()).sum()
    }

    /// The current window of a user, if held.
    pub fn state(&self, user_id: &str) -> Option<&UserState> {
        self.users.get(&self.pseudonymizer.user_key(user_id)).map(|t| &t.state)
    }

    /// Sets a user's marks as the publisher derived them from a record of the user's
    /// partition under `epoch`; ignored when the user is gone or the partition was let go
    /// since.
    pub fn set_marks(&mut self, user_key: &str, epoch: u64, marks: Option<Box<Marks>>) {
        let Some(tracked) = UserKey::parse(user_key).and_then(|key| self.users.get_mut(&key))
        else {
            return;
        };
        if self.epochs.get(&tracked.partition).copied().unwrap_or(0) == epoch {
            tracked.marks = marks;
        }
    }

    /// How many users held here are in each of `segments`.
    pub fn segment_sizes(&self, segments: &[String]) -> Vec<(String, u64)> {
        let mut sizes: Vec<(String, u64)> = segments.iter().map(|s| (s.clone(), 0)).collect();
        for marks in self.users.values().filter_map(|t| t.marks.as_deref()) {
            for (name, size) in &mut sizes {
                *size += u64::from(marks.segments.iter().any(|m| m == name.as_str()));
            }
        }
        sizes
    }

    /// The window of a pseudonymised user key as the console shows it, oldest event first.
    pub fn timeline(&self, user_key: &str) -> Option<Vec<TimelineEvent>> {
        let tracked = self.users.get(&UserKey::parse(user_key)?)?;
        Some(tracked.state.events().iter().map(TimelineEvent::of).collect())
    }
}

#[cfg(test)]
mod tests;
