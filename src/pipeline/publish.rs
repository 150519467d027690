//! The publisher task: turns the model workers' scores into signal records, in the order the
//! scoring requests were made, and hands them to the sink (and to the signals lookup).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::console::Console;
use crate::lookup::LatestSignals;
use crate::model::batcher::Scored;
use crate::model::card::ModelCard;
use crate::model::scorer::ModelError;
use crate::offsets::OffsetRef;
use crate::signals;
use crate::sink::{Owner, Sink};
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
    /// A deletion or an opt-out, published after every record requested before it, so that a
    /// scoring still under way for the user cannot land after its tombstones.
    Erase(Erasure),
}

/// The tombstones of a deleted or opted-out user.
pub(super) struct Erasure {
    pub(super) sequence: u64,
    pub(super) user_key: String,
    pub(super) owner: Owner,
    /// Offsets released once the tombstones are delivered.
    pub(super) released: Vec<OffsetRef>,
    /// A deletion also tombstones the signal topic; an opt-out only the changelog.
    pub(super) signals_too: bool,
}

enum Entry {
    Scored(Box<Scored<Scoring<OffsetRef>>>),
    Skipped,
    Erase(Erasure),
}

/// Turns scores into records and publishes them in the order the requests were made (see
/// [`Scoring::sequence`]); results that finish early wait for the ones before them. Ends when
/// the workers and the drain are done. Each record handed to the producer also becomes its
/// user's entry in `latest`, when the lookup is on; an erasure takes the user out of it.
pub(super) async fn publish(
    mut done: Done,
    sink: Sink,
    card: Arc<ModelCard>,
    explain_top: usize,
    latest: Option<Arc<LatestSignals>>,
    console: Option<Arc<Console>>,
    fatal: mpsc::UnboundedSender<ModelError>,
) {
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
                    let _ = fatal.send(err);
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
                Entry::Erase(erasure) => erase(&sink, latest.as_deref(), erasure).await,
                Entry::Scored(scored) => {
                    let record = publish_one(&sink, &card, explain_top, *scored).await;
                    if let Some(console) = &console {
                        console.observe(&record);
                    }
                    if let Some(latest) = &latest {
                        latest.insert(record);
                    }
                }
            }
        }
    }
}

/// Builds a scoring's record and hands it, with its changelog state, to the sink.
async fn publish_one(
    sink: &Sink,
    card: &ModelCard,
    explain_top: usize,
    scored: Scored<Scoring<OffsetRef>>,
) -> signals::SignalRecord {
    let Scoring { facts, pending, partition, epoch, changelog, .. } = scored.context;
    let now = crate::time::now_ms();
    let record =
        signals::build(card, facts, &scored.full, &scored.without, &scored.kept, explain_top, now);
    sink.publish(&record, changelog, Owner { partition, epoch }, pending).await;
    record
}

async fn erase(sink: &Sink, latest: Option<&LatestSignals>, erasure: Erasure) {
    if let Some(latest) = latest {
        latest.remove(&erasure.user_key);
    }
    let Erasure { user_key, owner, released, signals_too, .. } = erasure;
    if signals_too {
        sink.erase(&user_key, owner, released).await;
    } else {
        sink.tombstone(&user_key, owner, released).await;
    }
}
