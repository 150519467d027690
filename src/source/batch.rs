//! Records handed from the polling thread to the pipeline, a batch at a time.
//!
//! librdkafka's messages borrow its buffers and must be copied before they cross threads.
//! Copying each into an owned message costs three allocations per record (topic, key and
//! value) and as many frees on the pipeline's thread; a batch copies its records' bytes into
//! one buffer instead, so a batch of a few hundred records costs two allocations, and none
//! once the pipeline hands its emptied batches back to be filled again.
//!
//! Each record is admitted ([`super::admit`]) as it is copied in, on the polling thread, so
//! decoding overlaps the pipeline's windowing of the batch before.

use std::ops::Range;

use rdkafka::message::{BorrowedMessage, Message, Timestamp};

use super::{Admission, RawRecord};
use crate::event::{Event, Rejection};

/// Records in the order polled, each with what its admission made of it.
#[derive(Default)]
pub struct RecordBatch {
    /// Topic names, keys and values, back to back.
    bytes: Vec<u8>,
    records: Vec<Meta>,
    /// One per record: its event or the reason it is rejected; `None` for a record of a topic
    /// that is not an input.
    admitted: Vec<Admitted>,
}

/// What admission made of one record; `None` for a record of a topic that is not an input.
pub type Admitted = Option<Result<Event, Rejection>>;

/// Where one record's parts lie in the batch's bytes, and its position.
struct Meta {
    topic: Range<usize>,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
}

/// One record of a [`RecordBatch`].
#[derive(Clone, Copy)]
pub struct Record<'a> {
    bytes: &'a [u8],
    meta: &'a Meta,
}

impl RecordBatch {
    /// An empty batch with room for `records` records of about `bytes` bytes in all.
    pub fn with_capacity(records: usize, bytes: usize) -> RecordBatch {
        RecordBatch {
            bytes: Vec::with_capacity(bytes),
            records: Vec::with_capacity(records),
            admitted: Vec::with_capacity(records),
        }
    }

    /// Admits a polled record and copies it in.
    pub fn push(&mut self, message: &BorrowedMessage<'_>, admission: &Admission) {
        let record = RawRecord {
            topic: message.topic(),
            key: message.key(),
            payload: message.payload(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
        };
        self.push_raw(&record, admission);
    }

    /// Admits a record read from the record queue and copies it in.
    pub fn push_raw(&mut self, record: &RawRecord<'_>, admission: &Admission) {
        let RawRecord { topic, key, payload, partition, offset, timestamp } = *record;
        let admitted = admission.admit(topic, key, payload, timestamp);
        self.push_parts(topic, key, payload, (partition, offset), timestamp, admitted);
    }

    fn push_parts(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        (partition, offset): (i32, i64),
        timestamp: Timestamp,
        admitted: Admitted,
    ) {
        let topic = self.append(Some(topic.as_bytes())).expect("a topic name");
        let key = self.append(key);
        let payload = self.append(payload);
        self.records.push(Meta { topic, key, payload, partition, offset, timestamp });
        self.admitted.push(admitted);
    }

    fn append(&mut self, part: Option<&[u8]>) -> Option<Range<usize>> {
        let part = part?;
        let start = self.bytes.len();
        self.bytes.extend_from_slice(part);
        Some(start..self.bytes.len())
    }

    /// Empties the batch and keeps its buffers, so that it can be filled again without
    /// allocating.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
        self.admitted.clear();
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records in order, each with what its admission made of it. The admissions are
    /// moved out, so the batch is read this way once, then cleared.
    pub fn admitted(&mut self) -> impl ExactSizeIterator<Item = (Record<'_>, Admitted)> {
        let RecordBatch { bytes, records, admitted } = self;
        let bytes = &*bytes;
        records
            .iter()
            .zip(admitted.iter_mut())
            .map(move |(meta, admitted)| (Record { bytes, meta }, admitted.take()))
    }
}

impl<'a> Record<'a> {
    pub fn topic(&self) -> &'a str {
        // Copied from a `&str` in `push`.
        std::str::from_utf8(&self.bytes[self.meta.topic.clone()]).expect("a UTF-8 topic name")
    }

    pub fn key(&self) -> Option<&'a [u8]> {
        self.meta.key.clone().map(|range| &self.bytes[range])
    }

    /// The record's value; `None` for a tombstone.
    pub fn payload(&self) -> Option<&'a [u8]> {
        self.meta.payload.clone().map(|range| &self.bytes[range])
    }

    pub fn partition(&self) -> i32 {
        self.meta.partition
    }

    pub fn offset(&self) -> i64 {
        self.meta.offset
    }

    pub fn timestamp(&self) -> Timestamp {
        self.meta.timestamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RejectReason;

    #[test]
    fn records_come_back_in_order_with_absent_and_empty_parts_apart() {
        let mut batch = RecordBatch::with_capacity(4, 64);
        assert!(batch.is_empty());
        let time = Timestamp::CreateTime(1_511_658_000_000);
        let empty = || Some(Err(Rejection::new(RejectReason::Malformed, "empty record")));
        batch.push_parts("clicks", Some(b"u1"), Some(b"{\"a\":1}"), (3, 41), time, None);
        batch.push_parts("clicks", None, None, (3, 42), Timestamp::NotAvailable, empty());
        let at = Timestamp::LogAppendTime(5);
        batch.push_parts("reviews", Some(b""), Some(b""), (0, 7), at, empty());
        assert_eq!(batch.len(), 3);
        let seen: Vec<_> = batch
            .admitted()
            .map(|(r, a)| {
                (r.topic(), r.key(), r.payload(), r.partition(), r.offset(), r.timestamp(), a)
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("clicks", Some(&b"u1"[..]), Some(&b"{\"a\":1}"[..]), 3, 41, time, None),
                ("clicks", None, None, 3, 42, Timestamp::NotAvailable, empty()),
                (
                    "reviews",
                    Some(&b""[..]),
                    Some(&b""[..]),
                    0,
                    7,
                    Timestamp::LogAppendTime(5),
                    empty()
                ),
            ]
        );
        batch.clear();
        assert!(batch.is_empty());
        let event = crate::event::decode(crate::event::Format::Json, CLICK).expect("a click");
        batch.push_parts("reviews", None, Some(b"x"), (1, 9), time, Some(Ok(event.clone())));
        let seen: Vec<_> = batch
            .admitted()
            .map(|(r, a)| (r.topic(), r.key(), r.payload(), r.offset(), a))
            .collect();
        assert_eq!(seen, [("reviews", None, Some(&b"x"[..]), 9, Some(Ok(event)))]);
    }

    const CLICK: &[u8] = br#"{"user_id":"u1","event_id":"e1","event_time":1511658000000,
        "kind":"click","action":"view","item_id":"i1"}"#;
}
