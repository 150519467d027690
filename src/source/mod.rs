//! The consumer side: a consumer group over the input topics, the restore of each assigned
//! partition's user state from the changelog, and the admission of each record, as it is
//! polled, into an event or a rejection for the DLQ ([`Admission`]).
//!
//! Offsets are never committed automatically; the pipeline commits what the offset tracker
//! says is done. Everything the pipeline learns from the consumer travels over one ordered
//! channel ([`Polled`]), so a partition's restored state always arrives before its first
//! record, and a revocation after every record read before it:
//!
//! - **assign**: the rebalance callback reads the changelog partitions of the newly held
//!   partition numbers to their end and hands the users over before it returns, so no record
//!   of those partitions is handed out before their state;
//! - **revoke**: the callback asks the pipeline to let go of the partitions (it stops
//!   publishing for them, waits for what it handed to the producer, and drops their users),
//!   waits for its answer, then commits the partitions' done positions (at-least-once; in
//!   exactly-once mode the pipeline has committed its transaction instead).
//!
//! Records are read a batch at a time from a queue of their own, which each partition is
//! routed to as it is assigned ([`Routing`]); the rebalances above, errors and the client's
//! other events stay on the consumer's queue, served between reads.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{Config, DeliveryMode};
use crate::metrics as m;
use crate::offsets::{self, OffsetTracker, Partition};
use crate::state::Snapshot;

mod admission;
mod batch;
mod queue;
mod restore;
mod topics;

pub use admission::{admit, decode, Admission};
pub use batch::{Admitted, Record, RecordBatch};
pub use queue::{RawRecord, Routing, MOST_PER_READ};
pub use restore::RestoreError;
use restore::Restorer;
pub use topics::{Input, Topics};

/// Partitions currently assigned to this instance and restored (for readiness and the
/// caught-up check).
pub type Assignment = Arc<Mutex<BTreeSet<Partition>>>;

/// What the polling thread hands to the pipeline, in order.
pub enum Polled {
    /// Records in the order polled: those that were ready together, up to
    /// [`HANDOVER_BATCH`].
    Records(RecordBatch),
    Error(KafkaError),
    /// Partitions newly assigned, with the restored users of the partition numbers this
    /// instance did not hold before, and the group's committed positions of the partitions.
    Assigned {
        partitions: Vec<Partition>,
        restored: Vec<Restored>,
        committed: Vec<Committed>,
    },
    /// Partitions being revoked. The pipeline lets go of the partition numbers no longer held
    /// (`numbers`), then answers on `done`; the partitions move only after that.
    Revoked {
        partitions: Vec<Partition>,
        numbers: Vec<i32>,
        done: std_mpsc::SyncSender<()>,
    },
    /// The changelog could not be read; the processor stops.
    RestoreFailed(RestoreError),
}

/// The users of one input partition number, read back from the changelog.
pub struct Restored {
    pub partition: i32,
    /// A number that grows with every assignment, so work begun under an earlier assignment of
    /// the same partition is recognised as stale.
    pub epoch: u64,
    pub users: Vec<(String, Snapshot)>,
}

/// Consumer context: the rebalance protocol described in the module documentation, plus
/// client logs and rebalance counts.
pub struct SourceContext {
    tracker: Arc<Mutex<OffsetTracker>>,
    assignment: Assignment,
    /// Set while a restore runs (readiness).
    restoring: Arc<AtomicBool>,
    to_pipeline: mpsc::Sender<Polled>,
    /// Records polled and not yet handed over. Only the polling thread touches it (rebalance
    /// callbacks run inside its `poll`), and anything else handed over goes after them.
    polled: Mutex<RecordBatch>,
    /// Decodes and checks each record as it is polled.
    admission: Admission,
    /// The queue assigned partitions' records are read from, many per call.
    routing: Routing,
    /// Emptied batches handed back by the pipeline ([`Source::recycle`]), filled again instead
    /// of new ones.
    spare: Mutex<std_mpsc::Receiver<RecordBatch>>,
    /// Set once the pipeline stops reading; callbacks then only commit.
    stopping: Arc<AtomicBool>,
    restorer: Restorer,
    epoch: AtomicU64,
    mode: DeliveryMode,
    /// Longest a revocation waits for the pipeline.
    revoke_timeout: Duration,
}

/// What the pipeline shares with the consumer side.
pub struct Shared {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub assignment: Assignment,
    pub restoring: Arc<AtomicBool>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(cause = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => self.revoke(consumer, partitions_of(partitions)),
            // Before the assignment takes effect, so that no record of it is fetched to the
            // consumer's own queue.
            Rebalance::Assign(partitions) => self.routing.route_assigned(consumer, partitions),
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => self.assign(consumer, partitions),
            Rebalance::Error(err) => tracing::warn!(cause = %err, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

impl SourceContext {
    fn held_numbers(&self) -> BTreeSet<i32> {
        let assignment = self.assignment.lock().expect("assignment lock poisoned");
        assignment.iter().map(|p| p.partition).collect()
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
        let assigned = partitions_of(list);
        if assigned.is_empty() {
            return;
        }
        let numbers = numbers_outside(&assigned, &self.held_numbers());
        self.restoring.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let restored = match self.restorer.restore(&numbers) {
            Ok(users) => users,
            Err(err) => {
                self.send(Polled::RestoreFailed(err));
                return;
            }
        };
        let restored: Vec<Restored> = restored
            .into_iter()
            .map(|(partition, users)| {
                let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                Restored { partition, epoch, users }
            })
            .collect();
        let users: usize = restored.iter().map(|r| r.users.len()).sum();
        let committed = committed_positions(consumer, list);
        let watermarks = committed.iter().filter(|c| c.watermark.is_some()).count();
        tracing::info!(
            partitions = ?assigned.iter().map(|p| p.partition).collect::<Vec<_>>(),
            restored_partitions = ?numbers,
            restored_users = users,
            restored_watermarks = watermarks,
            restore_ms = started.elapsed().as_millis() as u64,
            "partitions assigned"
        );
        self.send(Polled::Assigned { partitions: assigned.clone(), restored, committed });
        self.assignment.lock().expect("assignment lock poisoned").extend(assigned);
        self.restoring.store(false, Ordering::SeqCst);
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, revoked: Vec<Partition>) {
        metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
        let remaining: BTreeSet<i32> = {
            let mut assignment = self.assignment.lock().expect("assignment lock poisoned");
            for partition in &revoked {
                assignment.remove(partition);
            }
            assignment.iter().map(|p| p.partition).collect()
        };
        let numbers = numbers_outside(&revoked, &remaining);
        let (done, finished) = std_mpsc::sync_channel(1);
        let handed = self.send(Polled::Revoked { partitions: revoked.clone(), numbers, done });
        if handed && finished.recv_timeout(self.revoke_timeout).is_err() {
            tracing::warn!(
                timeout = ?self.revoke_timeout,
                "the pipeline did not let go of revoked partitions in time"
            );
        }
        let mut commit = TopicPartitionList::new();
        {
            let mut tracker = self.tracker.lock().expect("offset tracker lock poisoned");
            let positions: Vec<_> = revoked.iter().filter_map(|p| tracker.revoke(p)).collect();
            match offsets::commit_list(&positions) {
                Ok(list) => commit = list,
                Err(err) => tracing::warn!(cause = %err, "cannot build the commit list"),
            }
        }
        // In exactly-once mode offsets are committed only inside transactions.
        if self.mode == DeliveryMode::AtLeastOnce && commit.count() > 0 {
            if let Err(err) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(cause = %err, "commit on revocation failed");
            }
        }
        tracing::info!(
            partitions = ?revoked.iter().map(|p| p.partition).collect::<Vec<_>>(),
            "partitions revoked"
        );
    }

    /// Admits a polled record and keeps it for the next handover; returns how many are kept.
    fn keep(&self, message: &BorrowedMessage<'_>) -> usize {
        let mut polled = self.polled.lock().expect("polled records lock poisoned");
        polled.push(message, &self.admission);
        polled.len()
    }

    /// Reads records from the record queue, waiting up to `wait` for the first, and keeps
    /// them for the next handover, up to [`HANDOVER_BATCH`] in all.
    fn read_routed(&self, wait: Duration) {
        let mut errors = Vec::new();
        {
            let mut polled = self.polled.lock().expect("polled records lock poisoned");
            let room = HANDOVER_BATCH.saturating_sub(polled.len());
            if room == 0 {
                return;
            }
            self.routing.read(wait, room, |record| match record {
                Ok(record) => polled.push_raw(&record, &self.admission),
                Err(err) => errors.push(err),
            });
        }
        for err in errors {
            self.send(Polled::Error(err));
        }
    }

    /// The records kept so far, in order.
    fn take_polled(&self) -> RecordBatch {
        let mut polled = self.polled.lock().expect("polled records lock poisoned");
        if polled.is_empty() {
            return RecordBatch::default();
        }
        let spare = self.spare.lock().expect("spare batches lock poisoned").try_recv();
        let next =
            spare.unwrap_or_else(|_| RecordBatch::with_capacity(HANDOVER_BATCH, BATCH_BYTES));
        std::mem::replace(&mut *polled, next)
    }

    /// Hands the kept records to the pipeline from the polling thread, waiting for room;
    /// false when it no longer reads.
    fn hand_over_polled(&self) -> bool {
        let records = self.take_polled();
        records.is_empty() || self.to_pipeline.blocking_send(Polled::Records(records)).is_ok()
    }

    /// Hands the kept records and then `polled` to the pipeline; false when it no longer
    /// reads. Never blocks a thread of the async runtime (the consumer's close may run these
    /// callbacks on one).
    fn send(&self, polled: Polled) -> bool {
        let records = self.take_polled();
        if !records.is_empty() && !self.try_hand_over(Polled::Records(records)) {
            return false;
        }
        self.try_hand_over(polled)
    }

    fn try_hand_over(&self, mut polled: Polled) -> bool {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            match self.to_pipeline.try_send(polled) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    polled = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

/// The group's committed position of one partition, with the event-time watermark its
/// metadata carries (see [`crate::offsets`]).
#[derive(Clone, Debug)]
pub struct Committed {
    pub partition: Partition,
    pub offset: i64,
    pub watermark: Option<i64>,
}

/// The committed positions of `list`'s partitions; none where the group has no commit yet or
/// the broker cannot say.
fn committed_positions(
    consumer: &BaseConsumer<SourceContext>,
    list: &TopicPartitionList,
) -> Vec<Committed> {
    let committed = match consumer.committed_offsets(list.clone(), COMMITTED_TIMEOUT) {
        Ok(committed) => committed,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot read committed offsets; watermarks start afresh");
            return Vec::new();
        }
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| {
            let offset = e.offset().to_raw().filter(|&o| o >= 0)?;
            let partition = Partition { topic: e.topic().into(), partition: e.partition() };
            Some(Committed { partition, offset, watermark: offsets::watermark_of(e.metadata()) })
        })
        .collect()
}

/// Bound on reading the committed offsets of newly assigned partitions.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// The partition numbers of `partitions` that are not in `held`, each once, in order.
fn numbers_outside(partitions: &[Partition], held: &BTreeSet<i32>) -> Vec<i32> {
    let numbers: BTreeSet<i32> =
        partitions.iter().map(|p| p.partition).filter(|n| !held.contains(n)).collect();
    numbers.into_iter().collect()
}

fn partitions_of(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| Partition { topic: e.topic().into(), partition: e.partition() })
        .collect()
}

/// The processor's consumer. Dropping it drops the record queue first, which must go before
/// the client (records left in it hold references that would keep the client's threads from
/// ending), with the partitions paused, so that nothing is fetched for a queue that is gone;
/// then the consumer closes as usual.
pub struct SourceConsumer {
    inner: BaseConsumer<SourceContext>,
}

impl std::ops::Deref for SourceConsumer {
    type Target = BaseConsumer<SourceContext>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Drop for SourceConsumer {
    fn drop(&mut self) {
        if let Ok(assignment) = self.inner.assignment() {
            if assignment.count() > 0 {
                let _ = self.inner.pause(&assignment);
            }
        }
        self.inner.context().routing.close();
    }
}

/// Items (mostly batches of records) buffered between the polling thread and the pipeline.
pub const POLLED_CAPACITY: usize = 8;
/// Most records handed over as one item.
pub const HANDOVER_BATCH: usize = 256;
/// Emptied batches kept for the polling thread to fill again: as many as can be in flight, so
/// that a steady stream of records allocates no batch.
pub const SPARE_BATCHES: usize = POLLED_CAPACITY + 2;
/// Room reserved for a batch's bytes: 256 records of about 250 bytes with their topic names.
const BATCH_BYTES: usize = 64 * 1024;
/// Longest one read of the record queue waits, and so the longest the polling thread takes to
/// serve a rebalance, or to notice a stop, while no records come.
pub const READ_WAIT: Duration = Duration::from_millis(10);

/// The consumer and the thread that polls it.
///
/// librdkafka needs `poll` at least every `max.poll.interval.ms`, also while every partition
/// is paused for backpressure; a thread of its own polls continuously and hands records over
/// a bounded channel, so the pipeline may pause, commit and query the consumer at any time
/// without ever being the one that keeps it alive. Rebalance callbacks run on that thread.
pub struct Source {
    consumer: Arc<SourceConsumer>,
    /// Records from the polling thread; closed when the thread stops.
    records: mpsc::Receiver<Polled>,
    /// Hands emptied batches back to the polling thread.
    spare: std_mpsc::SyncSender<RecordBatch>,
    /// Tells the polling thread (and the rebalance callbacks) to stop; set by
    /// [`Source::stop`] and on drop.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Source {
    /// Creates the consumer, subscribes it to every input topic and starts polling.
    pub fn start(config: &Config, shared: Shared) -> Result<Source, KafkaError> {
        let (sender, records) = mpsc::channel(POLLED_CAPACITY);
        let (spare, spares) = std_mpsc::sync_channel(SPARE_BATCHES);
        let stop = Arc::new(AtomicBool::new(false));
        let context = SourceContext {
            tracker: shared.tracker,
            assignment: shared.assignment,
            restoring: shared.restoring,
            to_pipeline: sender,
            polled: Mutex::new(RecordBatch::with_capacity(HANDOVER_BATCH, BATCH_BYTES)),
            admission: Admission::new(config),
            routing: Routing::default(),
            spare: Mutex::new(spares),
            stopping: stop.clone(),
            restorer: Restorer::new(config),
            epoch: AtomicU64::new(0),
            mode: config.delivery.mode,
            revoke_timeout: config.shutdown.drain_timeout,
        };
        let consumer =
            SourceConsumer { inner: consumer_config(config).create_with_context(context)? };
        // SAFETY: `SourceConsumer`'s drop closes the routing before the client goes.
        unsafe { consumer.context().routing.open(&consumer) };
        let topics: Vec<&str> = config.inputs.iter().map(|i| i.topic.as_str()).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let thread = std::thread::Builder::new()
            .name("mindstream-poll".into())
            .spawn({
                let (consumer, stop) = (consumer.clone(), stop.clone());
                move || poll_loop(&consumer, &stop)
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the poll thread: {e}"))
            })?;
        Ok(Source { consumer, records, spare, stop, thread: Some(thread) })
    }

    pub fn consumer(&self) -> &SourceConsumer {
        &self.consumer
    }

    /// The next item from the consumer; pending forever once the thread has stopped.
    pub async fn recv(&mut self) -> Polled {
        match self.records.recv().await {
            Some(polled) => polled,
            None => std::future::pending().await,
        }
    }

    /// Hands a batch the pipeline is done with back to the polling thread, which fills it
    /// again instead of allocating a new one. Fresh memory costs more than the copy into it
    /// (the kernel zeroes each new page); at most [`SPARE_BATCHES`] wait, the rest are freed.
    pub fn recycle(&self, mut batch: RecordBatch) {
        batch.clear();
        let _ = self.spare.try_send(batch);
    }

    /// Items polled and not yet taken by the pipeline.
    pub fn buffered(&self) -> usize {
        self.records.len()
    }

    /// Stops polling; records not yet handed over are left for the next owner of the
    /// partitions (their offsets are not committed).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.records.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls until stopped. Each round serves the consumer's own queue without waiting
/// (rebalances, errors, the client's events, and the records of any partition that could not
/// be routed), then reads the record queue. The records that are ready together, up to
/// [`HANDOVER_BATCH`], are handed over as one item, so that the pipeline is woken once per
/// batch rather than once per record.
fn poll_loop(consumer: &SourceConsumer, stop: &AtomicBool) {
    let context = consumer.context();
    while !stop.load(Ordering::SeqCst) {
        let mut kept = 0;
        loop {
            match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    kept = context.keep(&message);
                    if kept >= HANDOVER_BATCH {
                        break;
                    }
                }
                Some(Err(err)) => {
                    context.send(Polled::Error(err));
                    break;
                }
            }
        }
        context.read_routed(if kept > 0 { Duration::ZERO } else { READ_WAIT });
        if !context.hand_over_polled() {
            tracing::debug!("poll thread stopped: the pipeline closed its end");
            return;
        }
    }
    tracing::debug!("poll thread stopped");
}

/// Consumer properties: manual commits from the beginning of the topic for a new group, and
/// an assignment strategy that keeps each user's partitions together (see
/// [`assignment_strategy`]); then the user's `kafka.client` and `kafka.consumer` maps, which
/// win.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("partition.assignment.strategy", assignment_strategy(config));
    for (key, value) in config.kafka.client.iter().chain(&config.kafka.consumer) {
        client.set(key, value);
    }
    client
}

/// How long librdkafka waits before fetching again once a partition's prefetched records
/// exceed its queue limits (`queued.min.messages`, `queued.max.messages.kbytes`). Its default,
/// a second, leaves a consumer that drains the queue faster than that idle for the rest of
/// the second: reading a backlog without the model, that halved the rate.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// `cooperative-sticky` with one input topic: a rebalance moves only the partitions that
/// change owner. With several input topics a user's events arrive on the same partition
/// number of each, and only `range` assigns equal numbers of co-partitioned topics to the same
/// instance, so that is the default there.
pub fn assignment_strategy(config: &Config) -> &'static str {
    if config.inputs.len() > 1 {
        "range"
    } else {
        "cooperative-sticky"
    }
}
