//! Which input offsets may be committed.
//!
//! An offset is done when its record was rejected and the DLQ acknowledged it, when its
//! event was dropped on purpose (opt-out), or when a signal record covering its event was
//! acknowledged. A partition's commit position is its lowest offset not yet done, so a
//! committed offset never runs ahead of a delivered signal, also when users finish out of
//! order.
//!
//! Each commit also carries, as the offset's metadata, the partition's event-time watermark
//! as of the committed position (the newest event time of the records before it). The next
//! owner of the partition starts from that watermark, so an event is judged late after a
//! restart or a rebalance exactly as it would have been without one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

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

/// A position to commit: the partition's lowest offset not yet done (or one past the last
/// read), and the watermark as of that position.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub partition: Partition,
    pub offset: i64,
    /// Newest event time of the records before `offset`; `None` before the first event.
    pub watermark: Option<i64>,
}

#[derive(Debug, Default)]
struct Track {
    /// Offsets read but not yet done, each with the watermark before it.
    open: BTreeMap<i64, Option<i64>>,
    /// One past the highest offset read.
    next: i64,
    /// Watermark after the highest offset read.
    watermark: Option<i64>,
    /// Position last committed.
    committed: Option<i64>,
}

impl Track {
    fn position(&self, partition: &Partition) -> Position {
        let (offset, watermark) = match self.open.first_key_value() {
            Some((&offset, &watermark)) => (offset, watermark),
            None => (self.next, self.watermark),
        };
        Position { partition: partition.clone(), offset, watermark }
    }
}

/// Open offsets per assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, Track>,
}

impl OffsetTracker {
    /// Records that `offset` was read and is not done yet; `watermark` is the partition's
    /// watermark before it.
    pub fn open(&mut self, partition: &Partition, offset: i64, watermark: Option<i64>) {
        let track = self.partitions.entry(partition.clone()).or_default();
        track.open.insert(offset, watermark);
        track.next = track.next.max(offset + 1);
        track.watermark = watermark;
    }

    /// Records the partition's watermark after the record last opened.
    pub fn watermark(&mut self, partition: &Partition, watermark: Option<i64>) {
        if let Some(track) = self.partitions.get_mut(partition) {
            track.watermark = watermark;
        }
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
    pub fn to_commit(&self) -> Vec<Position> {
        let mut out: Vec<Position> = self
            .partitions
            .iter()
            .map(|(p, track)| (track, track.position(p)))
            .filter(|(track, position)| {
                Some(position.offset) != track.committed && position.offset > 0
            })
            .map(|(_, position)| position)
            .collect();
        out.sort();
        out
    }

    /// Records a successful commit.
    pub fn committed(&mut self, positions: &[Position]) {
        for position in positions {
            if let Some(track) = self.partitions.get_mut(&position.partition) {
                track.committed = Some(position.offset);
            }
        }
    }

    /// Forgets a revoked partition; returns its position if it has one to commit.
    pub fn revoke(&mut self, partition: &Partition) -> Option<Position> {
        let track = self.partitions.remove(partition)?;
        let position = track.position(partition);
        (position.offset > 0 && Some(position.offset) != track.committed).then_some(position)
    }
}

/// Prefix of the offset metadata mindstream writes; metadata without it is ignored.
const METADATA_PREFIX: &str = "mindstream.watermark=";

/// The commit list for `positions`, each offset with its watermark as metadata.
pub fn commit_list(positions: &[Position]) -> KafkaResult<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for position in positions {
        let mut element =
            list.add_partition(&position.partition.topic, position.partition.partition);
        element.set_offset(Offset::Offset(position.offset))?;
        if let Some(watermark) = position.watermark {
            element.set_metadata(format!("{METADATA_PREFIX}{watermark}"));
        }
    }
    Ok(list)
}

/// The watermark in a committed offset's metadata, if mindstream wrote it.
pub fn watermark_of(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(METADATA_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_waits_for_the_lowest_open_offset() {
        let p = Partition { topic: "t".into(), partition: 0 };
        let mut tracker = OffsetTracker::default();
        let at = |offset, watermark| Position { partition: p.clone(), offset, watermark };
        for offset in 0..4 {
            tracker.open(&p, offset, (offset > 0).then_some(offset * 100));
        }
        tracker.watermark(&p, Some(400));
        tracker.done(&p, 1);
        tracker.done(&p, 3);
        assert!(tracker.to_commit().is_empty(), "offset 0 is still open");
        tracker.done(&p, 0);
        assert_eq!(tracker.to_commit(), [at(2, Some(200))], "the watermark before offset 2");
        tracker.committed(&tracker.to_commit());
        assert!(tracker.to_commit().is_empty());
        tracker.done(&p, 2);
        assert_eq!(tracker.to_commit(), [at(4, Some(400))], "the watermark after the last read");
        assert_eq!(tracker.open_count(), 0);
    }

    #[test]
    fn revoked_partitions_ignore_late_acknowledgements() {
        let p = Partition { topic: "t".into(), partition: 3 };
        let mut tracker = OffsetTracker::default();
        tracker.open(&p, 10, None);
        tracker.open(&p, 11, Some(5));
        tracker.done(&p, 10);
        assert_eq!(tracker.revoke(&p).map(|position| position.offset), Some(11));
        tracker.done(&p, 11);
        assert!(tracker.to_commit().is_empty());
    }

    #[test]
    fn watermarks_travel_in_commit_metadata() {
        let p = Partition { topic: "t".into(), partition: 1 };
        let positions = [Position { partition: p, offset: 7, watermark: Some(1_600_000_000_123) }];
        let list = commit_list(&positions).unwrap();
        let element = list.find_partition("t", 1).unwrap();
        assert_eq!(element.offset(), Offset::Offset(7));
        assert_eq!(watermark_of(element.metadata()), Some(1_600_000_000_123));
        assert_eq!(watermark_of("written by another tool"), None);
    }
}
