//! The publisher task: turns the model workers' scores into signal records, in the order the
//! scoring requests were made, derives segment changes and service alerts from them, and
//! hands them to the sink (and to the signals lookup and the console).
//!
//! A user's marks (segment membership, alert de-duplication; see [`crate::actions`]) are
//! decided here and kept in three places: the changelog snapshot published with the record
//! (so they survive restarts), the store (through the `marks` channel, so later snapshots
//! carry them), and [`Remembered`], for the requests the store made before it learnt them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::actions::{Actions, Marks};
use crate::console::Console;
use crate::lookup::LatestSignals;
use crate::metrics as m;
use crate::model::batcher::Scored;
use crate::model::card::ModelCard;
use crate::model::scorer::ModelError;
use crate::offsets::OffsetRef;
use crate::signals;
use crate::sink::{Owner, Sink};
use crate::state;
use crate::window::store::Scoring;

use super::Outcome;

/// What comes back from scoring: the workers' results, and the entries that take a place in
/// the request order without a scoring.
pub(super) struct Done {
    pub(super) results: flume::Receiver<Outcome>,
    pub(super) sequenced: mpsc::UnboundedReceiver<Sequenced>,
}

/// An entry of the request order that is not a scoring.
pub(super) enum Sequenced {
    /// A request taken back unscored at shutdown.
    Skipped(u64),
    /// A deletion, an opt-out or an eviction, published after every record requested before
    /// it, so that a scoring still under way for the user cannot land after its tombstones.
    Erase(Erasure),
}

/// The tombstones of a deleted, opted-out or evicted user.
pub(super) struct Erasure {
    pub(super) sequence: u64,
    pub(super) user_key: String,
    pub(super) owner: Owner,
    /// Offsets released once the tombstones are delivered.
    pub(super) released: Vec<OffsetRef>,
    /// A deletion also tombstones the signal topic; an opt-out or eviction only the
    /// changelog. Every one tombstones the user's segment memberships.
    pub(super) signals_too: bool,
    /// The user's marks as the store held them.
    pub(super) marks: Option<Box<Marks>>,
}

/// A user's marks as decided here, for the store to keep.
pub(super) struct MarksUpdate {
    pub(super) user_key: String,
    pub(super) epoch: u64,
    pub(super) marks: Option<Box<Marks>>,
}

/// Where the publisher's records go besides the sink.
pub(super) struct Outputs {
    pub(super) latest: Option<Arc<LatestSignals>>,
    pub(super) console: Option<Arc<Console>>,
    /// The marks decided for each record, for the store; the consume loop holds the
    /// receiving end and applies them.
    pub(super) marks: mpsc::UnboundedSender<MarksUpdate>,
}

enum Entry {
    Scored(Box<Scored<Scoring<OffsetRef>>>),
    Skipped,
    Erase(Erasure),
}

/// The marks decided here recently, by user key, with the partition epoch they were decided
/// under. A request the store made before it applied them carries older marks; these win
/// under the same epoch. Kept in two generations of [`REMEMBERED`] users: by the time an entry
/// ages out, the store has long applied it.
#[derive(Default)]
struct Remembered {
    current: HashMap<String, (u64, Option<Box<Marks>>)>,
    older: HashMap<String, (u64, Option<Box<Marks>>)>,
}

const REMEMBERED: usize = 32_768;

impl Remembered {
    /// The user's marks: the ones decided here under `epoch`, else `from_store`.
    fn marks(&self, user_key: &str, epoch: u64, from_store: Option<&Marks>) -> Marks {
        let found = self.current.get(user_key).or_else(|| self.older.get(user_key));
        match found {
            Some((decided_under, marks)) if *decided_under == epoch => {
                marks.as_deref().cloned().unwrap_or_default()
            }
            _ => from_store.cloned().unwrap_or_default(),
        }
    }

    fn insert(&mut self, user_key: String, epoch: u64, marks: Option<Box<Marks>>) {
        self.older.remove(&user_key);
        self.current.insert(user_key, (epoch, marks));
        if self.current.len() >= REMEMBERED {
            self.older = std::mem::take(&mut self.current);
        }
    }

    fn remove(&mut self, user_key: &str) -> Option<(u64, Option<Box<Marks>>)> {
        let older = self.older.remove(user_key);
        self.current.remove(user_key).or(older)
    }
}

/// What the publisher works with.
pub(super) struct Publisher {
    pub(super) sink: Sink,
    pub(super) card: Arc<ModelCard>,
    pub(super) actions: Arc<Actions>,
    pub(super) explain_top: usize,
    pub(super) outputs: Outputs,
    pub(super) fatal: mpsc::UnboundedSender<ModelError>,
}

/// Turns scores into records and publishes them in the order the requests were made (see
/// [`Scoring::sequence`]); results that finish early wait for the ones before them. Ends when
/// the workers and the drain are done. Each record handed to the producer also becomes its
/// user's entry in `latest`, when the lookup is on; an erasure takes the user out of it.
pub(super) async fn publish(mut done: Done, publisher: Publisher) {
    let mut remembered = Remembered::default();
    let mut next = 0u64;
    let mut early: BTreeMap<u64, Entry> = BTreeMap::new();
    let (mut results_open, mut sequenced_open) = (true, true);
    while results_open || sequenced_open {
        tokio::select! {
            outcome = done.results.recv_async(), if results_open => match outcome {
                Ok(Ok(scored)) => {
                    early.insert(scored.context.sequence, Entry::Scored(Box::new(scored)));
                }
                Ok(Err(err)) => {
                    let _ = publisher.fatal.send(err);
                    return;
                }
                Err(_) => results_open = false,
            },
            entry = done.sequenced.recv(), if sequenced_open => match entry {
                Some(Sequenced::Skipped(sequence)) => {
                    early.insert(sequence, Entry::Skipped);
                }
                Some(Sequenced::Erase(erasure)) => {
                    early.insert(erasure.sequence, Entry::Erase(erasure));
                }
                None => sequenced_open = false,
            },
        }
        while let Some(entry) = early.remove(&next) {
            next += 1;
            match entry {
                Entry::Skipped => {}
                Entry::Erase(erasure) => publisher.erase(&mut remembered, erasure).await,
                Entry::Scored(scored) => publisher.publish_one(&mut remembered, *scored).await,
            }
        }
    }
}

impl Publisher {
    /// Builds a scoring's record and what it gives rise to, and hands them, with the
    /// changelog state, to the sink.
    async fn publish_one(&self, remembered: &mut Remembered, scored: Scored<Scoring<OffsetRef>>) {
        let now = crate::time::now_ms();
        let model = signals::ModelScores::from(&scored);
        let record =
            signals::build(&self.card, &scored.context.facts, model, self.explain_top, now);
        let Scoring { facts, pending, partition, epoch, mut changelog, marks, .. } = scored.context;

        let mut derived = Vec::new();
        if !self.actions.is_empty() {
            let before = remembered.marks(&facts.user_key, epoch, marks.as_deref());
            let review = self.card.signal_index(signals::SENTIMENT).zip(scored.focus.as_deref());
            let review_sentiment = review.map(|(index, focus)| focus[index]);
            let outcome = self.actions.derive(&record, &facts.events, &before, review_sentiment);
            for reason in outcome.suppressed {
                metrics::counter!(m::SERVICE_ALERTS_SUPPRESSED, "reason" => reason.as_str())
                    .increment(1);
            }
            derived = outcome.records;
            if outcome.marks != marks.as_deref().cloned().unwrap_or_default() {
                changelog = changelog.map(|bytes| with_marks(bytes, &outcome.marks));
            }
            if outcome.marks != before {
                let boxed = outcome.marks.boxed();
                remembered.insert(facts.user_key.clone(), epoch, boxed.clone());
                let user_key = facts.user_key.clone();
                let _ = self.outputs.marks.send(MarksUpdate { user_key, epoch, marks: boxed });
            }
        }

        let owner = Owner { partition, epoch };
        self.sink.publish(&record, changelog, derived, owner, pending).await;
        if let Some(console) = &self.outputs.console {
            console.observe(&record);
        }
        if let Some(latest) = &self.outputs.latest {
            latest.insert(record);
        }
    }

    async fn erase(&self, remembered: &mut Remembered, erasure: Erasure) {
        if let Some(latest) = &self.outputs.latest {
            latest.remove(&erasure.user_key);
        }
        let Erasure { user_key, owner, released, signals_too, marks, .. } = erasure;
        let marks = match remembered.remove(&user_key) {
            Some((epoch, decided)) if epoch == owner.epoch => decided,
            _ => marks,
        };
        let derived = marks.map_or_else(Vec::new, |m| self.actions.erase(&user_key, &m));
        self.sink.erase(&user_key, owner, released, signals_too, derived).await;
    }
}

/// The changelog value `bytes` with its marks replaced.
fn with_marks(bytes: Vec<u8>, marks: &Marks) -> Vec<u8> {
    match state::decode(&bytes) {
        Ok(mut snapshot) => {
            snapshot.marks = marks.clone();
            state::encode(&snapshot)
        }
        // The store encoded it a moment ago; a failure here is a bug, and the old marks are
        // the safer value to keep than none.
        Err(err) => {
            tracing::error!(cause = %err, "cannot re-read a changelog value to set its marks");
            bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member_of(segment: &str) -> Marks {
        Marks { segments: vec![segment.into()], ..Marks::default() }
    }

    #[test]
    fn marks_decided_here_win_over_older_ones_of_the_same_epoch_only() {
        let mut remembered = Remembered::default();
        let from_store = member_of("old");
        assert_eq!(remembered.marks("u", 1, Some(&from_store)), from_store);

        // The user left every segment: the empty marks decided here still win.
        remembered.insert("u".into(), 1, None);
        assert_eq!(remembered.marks("u", 1, Some(&from_store)), Marks::default());
        // After the partition was let go and taken again, the restored marks count.
        assert_eq!(remembered.marks("u", 2, Some(&from_store)), from_store);

        assert_eq!(remembered.remove("u").map(|(epoch, _)| epoch), Some(1));
        assert_eq!(remembered.marks("u", 1, None), Marks::default());
    }

    #[test]
    fn remembered_users_age_out_in_two_generations() {
        let mut remembered = Remembered::default();
        remembered.insert("first".into(), 1, member_of("a").boxed());
        for i in 0..REMEMBERED {
            remembered.insert(format!("u{i}"), 1, None);
        }
        assert_eq!(remembered.marks("first", 1, None), member_of("a"), "in the older generation");
        for i in 0..REMEMBERED {
            remembered.insert(format!("w{i}"), 1, None);
        }
        assert_eq!(remembered.marks("first", 1, None), Marks::default(), "aged out");
    }
}
