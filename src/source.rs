//! The consumer side: a consumer group over the input topics, and the decoding of each record
//! into an [`Event`] or a [`Rejection`] for the DLQ.
//!
//! Offsets are never committed automatically; the pipeline commits what the offset tracker
//! says is done. On a revocation the context commits the revoked partitions' done positions
//! before they move to another instance, and forgets them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::event::{self, Event, Format, RejectReason, Rejection};
use crate::metrics as m;
use crate::offsets::{OffsetTracker, Partition};

/// Partitions currently assigned to this instance (for readiness and the caught-up check).
pub type Assignment = Arc<Mutex<BTreeSet<Partition>>>;

/// Consumer context: logs client events, counts rebalances, keeps the assignment current.
pub struct SourceContext {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub assignment: Assignment,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(cause = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else { return };
        metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
        let revoked = partitions_of(partitions);
        let mut commit = TopicPartitionList::new();
        {
            let mut tracker = self.tracker.lock().expect("offset tracker lock poisoned");
            for partition in &revoked {
                if let Some(position) = tracker.revoke(partition) {
                    let _ = commit.add_partition_offset(
                        &partition.topic,
                        partition.partition,
                        Offset::Offset(position),
                    );
                }
            }
        }
        if commit.count() > 0 {
            if let Err(err) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(cause = %err, "commit on revocation failed");
            }
        }
        let mut assignment = self.assignment.lock().expect("assignment lock poisoned");
        for partition in &revoked {
            assignment.remove(partition);
        }
        tracing::info!(partitions = revoked.len(), "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
                let assigned = partitions_of(partitions);
                tracing::info!(partitions = assigned.len(), "partitions assigned");
                self.assignment.lock().expect("assignment lock poisoned").extend(assigned);
            }
            Rebalance::Error(err) => tracing::warn!(cause = %err, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| Partition { topic: e.topic().into(), partition: e.partition() })
        .collect()
}

pub type SourceConsumer = BaseConsumer<SourceContext>;

/// Records (or consumer errors) handed from the polling thread to the pipeline.
pub type Polled = Result<OwnedMessage, KafkaError>;

/// Records buffered between the polling thread and the pipeline.
const POLLED_CAPACITY: usize = 1024;
/// Longest one poll waits, and so the longest the thread takes to notice a stop.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// The consumer and the thread that polls it.
///
/// librdkafka needs `poll` at least every `max.poll.interval.ms`, also while every partition
/// is paused for backpressure; a thread of its own polls continuously and hands records over
/// a bounded channel, so the pipeline may pause, commit and query the consumer at any time
/// without ever being the one that keeps it alive.
pub struct Source {
    consumer: Arc<SourceConsumer>,
    /// Records from the polling thread; closed when the thread stops.
    records: mpsc::Receiver<Polled>,
    /// Tells the polling thread to stop; set by [`Source::stop`] and on drop.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Source {
    /// Creates the consumer, subscribes it to every input topic and starts polling.
    pub fn start(config: &Config, context: SourceContext) -> Result<Source, KafkaError> {
        let consumer: SourceConsumer = consumer_config(config).create_with_context(context)?;
        let topics: Vec<&str> = config.inputs.iter().map(|i| i.topic.as_str()).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let (sender, records) = mpsc::channel(POLLED_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("mindstream-poll".into())
            .spawn({
                let (consumer, stop) = (consumer.clone(), stop.clone());
                move || poll_loop(&consumer, &sender, &stop)
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("cannot start the poll thread: {e}"))
            })?;
        Ok(Source { consumer, records, stop, thread: Some(thread) })
    }

    pub fn consumer(&self) -> &SourceConsumer {
        &self.consumer
    }

    /// The next record or consumer error; pending forever once the thread has stopped.
    pub async fn recv(&mut self) -> Polled {
        match self.records.recv().await {
            Some(polled) => polled,
            None => std::future::pending().await,
        }
    }

    /// Records polled and not yet taken by the pipeline.
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

fn poll_loop(consumer: &SourceConsumer, sender: &mpsc::Sender<Polled>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let polled = match consumer.poll(POLL_TIMEOUT) {
            None => continue,
            Some(Ok(message)) => Ok(message.detach()),
            Some(Err(err)) => Err(err),
        };
        if sender.blocking_send(polled).is_err() {
            tracing::debug!("poll thread stopped: the pipeline closed its end");
            return;
        }
    }
    tracing::debug!("poll thread stopped");
}

/// Consumer properties: manual commits from the beginning of the topic for a new group; then
/// the user's `kafka.client` and `kafka.consumer` maps, which win.
pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    for (key, value) in config.kafka.client.iter().chain(&config.kafka.consumer) {
        client.set(key, value);
    }
    client
}

/// Input topics by name, with their format and an interned name for lineage.
pub struct Topics {
    by_name: HashMap<String, (Arc<str>, Format)>,
}

impl Topics {
    pub fn new(config: &Config) -> Topics {
        let by_name = config
            .inputs
            .iter()
            .map(|i| (i.topic.clone(), (Arc::<str>::from(i.topic.as_str()), i.format)))
            .collect();
        Topics { by_name }
    }

    pub fn get(&self, topic: &str) -> Option<&(Arc<str>, Format)> {
        self.by_name.get(topic)
    }
}

/// Decodes a record's payload. An absent payload (a tombstone) is malformed input.
pub fn decode(format: Format, payload: Option<&[u8]>) -> Result<Event, Rejection> {
    match payload {
        None | Some([]) => Err(Rejection::new(RejectReason::Malformed, "empty record")),
        Some(bytes) => event::decode(format, bytes),
    }
}
