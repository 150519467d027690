//! Which input offsets may be committed.
//!
//! An offset is done when its record was rejected and the DLQ acknowledged it, when its
//! event was dropped on purpose (opt-out), or when a signal record covering its event was
//! acknowledged. A partition's commit position is its lowest offset not yet done, so a
//! committed offset never runs ahead of a delivered signal, also when users finish out of
//! order.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub topic: Arc<str>,
    pub partition: i32,
}

/// One input record awaiting its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetRef {
    pub partition: Partition,
    pub offset: i64,
    /// Broker timestamp of the record, ms since the epoch (for end-to-end latency).
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct Track {
    /// Offsets read but not yet done.
    open: BTreeSet<i64>,
    /// One past the highest offset read.
    next: i64,
    /// Position last committed.
    committed: Option<i64>,
}

/// Open offsets per assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, Track>,
}

impl OffsetTracker {
    /// Records that `offset` was read and is not done yet.
    pub fn open(&mut self, partition: &Partition, offset: i64) {
        let track = self.partitions.entry(partition.clone()).or_default();
        track.open.insert(offset);
        track.next = track.next.max(offset + 1);
    }

    /// Marks an offset done. Offsets of partitions no longer tracked (revoked) are ignored.
    pub fn done(&mut self, partition: &Partition, offset: i64) {
        if let Some(track) = self.partitions.get_mut(partition) {
            track.open.remove(&offset);
        }
    }

    /// Offsets read and not yet done, over all partitions.
    pub fn open_count(&self) -> usize {
        self.partitions.values().map(|t| t.open.len()).sum()
    }

    /// The position to commit for each partition whose position moved since the last commit.
    pub fn to_commit(&self) -> Vec<(Partition, i64)> {
        let mut out: Vec<(Partition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(p, track)| {
                let position = track.open.first().copied().unwrap_or(track.next);
                (Some(position) != track.committed && position > 0).then(|| (p.clone(), position))
            })
            .collect();
        out.sort();
        out
    }

    /// Records a successful commit.
    pub fn committed(&mut self, positions: &[(Partition, i64)]) {
        for (partition, position) in positions {
            if let Some(track) = self.partitions.get_mut(partition) {
                track.committed = Some(*position);
            }
        }
    }

    /// Forgets a revoked partition; returns its position if it has one to commit.
    pub fn revoke(&mut self, partition: &Partition) -> Option<i64> {
        let track = self.partitions.remove(partition)?;
        let position = track.open.first().copied().unwrap_or(track.next);
        (position > 0 && Some(position) != track.committed).then_some(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_waits_for_the_lowest_open_offset() {
        let p = Partition { topic: "t".into(), partition: 0 };
        let mut tracker = OffsetTracker::default();
        for offset in 0..4 {
            tracker.open(&p, offset);
        }
        tracker.done(&p, 1);
        tracker.done(&p, 3);
        assert!(tracker.to_commit().is_empty(), "offset 0 is still open");
        tracker.done(&p, 0);
        assert_eq!(tracker.to_commit(), [(p.clone(), 2)]);
        tracker.committed(&[(p.clone(), 2)]);
        assert!(tracker.to_commit().is_empty());
        tracker.done(&p, 2);
        assert_eq!(tracker.to_commit(), [(p.clone(), 4)]);
        assert_eq!(tracker.open_count(), 0);
    }

    #[test]
    fn revoked_partitions_ignore_late_acknowledgements() {
        let p = Partition { topic: "t".into(), partition: 3 };
        let mut tracker = OffsetTracker::default();
        tracker.open(&p, 10);
        tracker.open(&p, 11);
        tracker.done(&p, 10);
        assert_eq!(tracker.revoke(&p), Some(11));
        tracker.done(&p, 11);
        assert!(tracker.to_commit().is_empty());
    }
}
