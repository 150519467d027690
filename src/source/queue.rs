//! The queue the assigned partitions' records are read from, many records per call.
//!
//! The Kafka client's `poll` takes one event off the consumer's queue per call: a lock, clock
//! reads and the rust client's event handling for every record. librdkafka's batch call
//! (`rd_kafka_consume_batch_queue`) takes up to a whole handover batch per call instead. It
//! cannot be used on the consumer's own queue, where the group's rebalance events arrive: it
//! would answer each of those itself, with an unassign, since the rust client asks for them as
//! events rather than registering a callback. So each partition's records are routed to a
//! queue of their own as the partition is assigned ([`RecordQueue::route`], called before the
//! assignment takes effect); rebalances, errors and the client's other events stay on the
//! consumer's queue, which the polling thread still serves with `poll` between reads.
//!
//! Ordering and revocation stay as they were: one partition's records reach one queue, in
//! order; and before a rebalance is handed to the application, librdkafka pauses the assigned
//! partitions behind a version barrier, so records fetched before it and not yet read are
//! dropped by either call, never read after the rebalance.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Timestamp;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

/// Most records one [`RecordQueue::read`] takes: the pipeline's handover batch.
pub const MOST_PER_READ: usize = super::HANDOVER_BATCH;

/// A queue of the consumer's, created empty, that assigned partitions' records are routed to.
/// It must be dropped before the consumer (see [`Routing::open`]).
pub(crate) struct RecordQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
}

// SAFETY: librdkafka's queues are locked internally and may be used from any thread.
unsafe impl Send for RecordQueue {}
// SAFETY: as above; `&self` methods only call librdkafka's thread-safe queue functions.
unsafe impl Sync for RecordQueue {}

/// One record read from a [`RecordQueue`], borrowing the client's buffers; valid only inside
/// the callback it is handed to.
#[derive(Clone, Copy)]
pub struct RawRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Timestamp,
}

impl RecordQueue {
    /// A new, empty queue of `consumer`'s.
    fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> RecordQueue {
        // SAFETY: the client pointer is valid while `consumer` lives; the queue is destroyed
        // on drop, which the owner arranges before the consumer goes.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        RecordQueue { queue: NonNull::new(queue).expect("librdkafka returned no queue") }
    }

    /// Routes the records of `topic`'s `partition` to this queue from now on. Called as the
    /// partition is assigned, before its fetching starts, so that none of its records reach
    /// the consumer's queue; routing lasts until the partition is unassigned.
    fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
    ) -> Result<(), KafkaError> {
        let name = CString::new(topic)?;
        // SAFETY: valid client and topic name; the partition's queue handle is released
        // right after forwarding, which keeps its own reference to this queue.
        unsafe {
            let client = consumer.client().native_ptr();
            let from = rd::rd_kafka_queue_get_partition(client, name.as_ptr(), partition);
            if from.is_null() {
                return Err(KafkaError::Subscription(format!(
                    "no queue for partition {partition} of {topic}"
                )));
            }
            rd::rd_kafka_queue_forward(from, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(from);
        }
        Ok(())
    }

    /// Reads at most `max` (at most [`MOST_PER_READ`]) of the records ready, waiting up to
    /// `wait` for the first where none is, and hands each (or the error the client put in its
    /// place) to `each`; returns how many were read.
    fn read(
        &self,
        wait: Duration,
        max: usize,
        mut each: impl FnMut(Result<RawRecord<'_>, KafkaError>),
    ) -> usize {
        let mut messages = [std::ptr::null_mut(); MOST_PER_READ];
        let max = max.min(MOST_PER_READ);
        // librdkafka's batch call waits until it has as many records as it was asked for, so
        // a wait is spent on the first record only, and the rest are those ready with it.
        let mut read = self.take(Duration::ZERO, &mut messages[..max]);
        if read == 0 && max > 0 && !wait.is_zero() {
            read = self.take(wait, &mut messages[..1]);
            if read == 1 {
                read += self.take(Duration::ZERO, &mut messages[1..max]);
            }
        }
        // Every message taken is destroyed, also where `each` panics part-way.
        let mut taken = Taken { messages, read, next: 0 };
        while taken.next < taken.read {
            let message = taken.messages[taken.next];
            taken.next += 1;
            let _destroy = Destroy(message);
            // SAFETY: librdkafka filled the first `read` slots with messages the caller owns;
            // this one is borrowed only inside `each` and destroyed when `_destroy` drops.
            each(unsafe { record(&*message) });
        }
        read
    }

    /// Fills the start of `into` with records, waiting up to `wait` until it is full; returns
    /// how many it took.
    fn take(&self, wait: Duration, into: &mut [*mut rd::rd_kafka_message_t]) -> usize {
        if into.is_empty() {
            return 0;
        }
        // Rounded up: a wait under a millisecond is still a wait.
        let wait_ms = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `into` has room for `into.len()` message pointers.
        let taken = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                wait_ms,
                into.as_mut_ptr(),
                into.len(),
            )
        };
        usize::try_from(taken).unwrap_or(0)
    }
}

/// Messages taken from the queue; those not yet handed on are destroyed on drop.
struct Taken {
    messages: [*mut rd::rd_kafka_message_t; MOST_PER_READ],
    read: usize,
    next: usize,
}

impl Drop for Taken {
    fn drop(&mut self) {
        for &message in &self.messages[self.next..self.read] {
            // SAFETY: taken from the queue and not yet destroyed.
            unsafe { rd::rd_kafka_message_destroy(message) };
        }
    }
}

/// Destroys one message on drop.
struct Destroy(*mut rd::rd_kafka_message_t);

impl Drop for Destroy {
    fn drop(&mut self) {
        // SAFETY: a message taken from the queue, destroyed once, after its last borrow.
        unsafe { rd::rd_kafka_message_destroy(self.0) };
    }
}

impl Drop for RecordQueue {
    fn drop(&mut self) {
        // SAFETY: the queue was created by `rd_kafka_queue_new` and is destroyed once; records
        // still in it are dropped (they are read again by the partitions' next owner).
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// A consumer context's [`RecordQueue`]: opened once the consumer exists, given each partition
/// as it is assigned (from the context's `pre_rebalance`), and closed before the consumer is
/// dropped. Until it is opened, and after it is closed, it reads nothing.
#[derive(Default)]
pub struct Routing {
    queue: Mutex<Option<RecordQueue>>,
}

impl Routing {
    /// Creates the queue; call before the consumer subscribes.
    ///
    /// # Safety
    /// [`Routing::close`] must be called before `consumer` is dropped: the queue must not
    /// outlive the client, and records left in it would keep the client from closing.
    pub unsafe fn open<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(RecordQueue::new(consumer));
    }

    /// Routes the partitions of an assignment to the queue. Routing fails only where
    /// librdkafka has no queue for a partition, which a consumer always has; should it happen,
    /// the partition's records are not read, and the error says so.
    pub fn route_assigned<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        assigned: &TopicPartitionList,
    ) {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = queue.as_ref() else { return };
        for element in assigned.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            if let Err(err) = queue.route(consumer, topic, partition) {
                tracing::error!(cause = %err, topic, partition, "partition not routed: not read");
            }
        }
    }

    /// [`RecordQueue::read`]; waits `wait` and reads nothing while the queue is not open.
    pub fn read(
        &self,
        wait: Duration,
        max: usize,
        each: impl FnMut(Result<RawRecord<'_>, KafkaError>),
    ) -> usize {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        match queue.as_ref() {
            Some(queue) => queue.read(wait, max, each),
            None => {
                drop(queue);
                std::thread::sleep(wait);
                0
            }
        }
    }

    /// Drops the queue and the records still in it; call before the consumer is dropped.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// The record `message` holds, or the error the client put in its place.
///
/// # Safety
/// `message` must be a live message from a consumer queue.
unsafe fn record(message: &rd::rd_kafka_message_t) -> Result<RawRecord<'_>, KafkaError> {
    if message.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(match message.err {
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                KafkaError::PartitionEOF(message.partition)
            }
            err => KafkaError::MessageConsumption(RDKafkaErrorCode::from(err)),
        });
    }
    let bytes = |data: *mut std::ffi::c_void, len: usize| {
        // SAFETY: librdkafka's pointer and length, valid while the message lives.
        (!data.is_null()).then(|| unsafe { std::slice::from_raw_parts(data as *const u8, len) })
    };
    // SAFETY: a message's topic handle and its name live as long as the message.
    let topic = unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(message.rkt)) };
    let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    // SAFETY: reads the message's timestamp and its type.
    let time = unsafe { rd::rd_kafka_message_timestamp(message, &mut kind) };
    let timestamp = match kind {
        _ if time == -1 => Timestamp::NotAvailable,
        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => {
            Timestamp::CreateTime(time)
        }
        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
            Timestamp::LogAppendTime(time)
        }
        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => Timestamp::NotAvailable,
    };
    Ok(RawRecord {
        // Kafka topic names are ASCII.
        topic: topic.to_str().unwrap_or_default(),
        key: bytes(message.key, message.key_len),
        payload: bytes(message.payload, message.len),
        partition: message.partition,
        offset: message.offset,
        timestamp,
    })
}
