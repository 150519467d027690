//! The publisher task: turns the model workers' scores into signal records, in the order the
//! scoring requests were made, and hands them to the sink (and to the signals lookup).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::lookup::LatestSignals;
use crate::model::batcher::Scored;
use crate::model::card::ModelCard;
use crate::model::scorer::ModelError;
use crate::offsets::OffsetRef;
use crate::signals;
use crate::sink::{Owner, Sink};
use crate::window::store::Scoring;

use super::Outcome;

/// What comes back from scoring: the workers' results, and the sequence numbers of requests
/// taken back unscored at shutdown.
pub(super) struct Done {
    pub(super) results: flume::Receiver<Outcome>,
    pub(super) skipped: mpsc::UnboundedReceiver<u64>,
}

/// Turns scores into records and publishes them in the order the requests were made (see
/// [`Scoring::sequence`]); results that finish early wait for the ones before them. Ends when
/// the workers and the drain are done. Each record handed to the producer also becomes its
/// user's entry in `latest`, when the lookup is on.
pub(super) async fn publish(
    mut done: Done,
    sink: Sink,
    card: Arc<ModelCard>,
    explain_top: usize,
    latest: Option<Arc<LatestSignals>>,
    fatal: mpsc::UnboundedSender<ModelError>,
) {
    let mut next = 0u64;
    let mut early: BTreeMap<u64, Option<Scored<Scoring<OffsetRef>>>> = BTreeMap::new();
    let (mut results_open, mut skipped_open) = (true, true);
    while results_open || skipped_open {
        tokio::select! {
            outcome = done.results.recv_async(), if results_open => match outcome {
                Ok(Ok(scored)) => {
                    early.insert(scored.context.sequence, Some(scored));
                }
                Ok(Err(err)) => {
                    let _ = fatal.send(err);
                    return;
                }
                Err(_) => results_open = false,
            },
            sequence = done.skipped.recv(), if skipped_open => match sequence {
                Some(sequence) => {
                    early.insert(sequence, None);
                }
                None => skipped_open = false,
            },
        }
        while let Some(entry) = early.remove(&next) {
            next += 1;
            let Some(scored) = entry else { continue };
            let Scoring { facts, pending, partition, epoch, changelog, .. } = scored.context;
            let now = crate::time::now_ms();
            let record = signals::build(
                &card,
                facts,
                &scored.full,
                &scored.without,
                &scored.kept,
                explain_top,
                now,
            );
            sink.publish(&record, changelog, Owner { partition, epoch }, pending).await;
            if let Some(latest) = &latest {
                latest.insert(&record.user_key, Arc::from(signals::to_json(&record)));
            }
        }
    }
}
