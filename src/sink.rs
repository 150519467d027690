//! The producer side: signal records to the signal topic, user state to the changelog, and
//! rejected records to the DLQ.
//!
//! Records are handed to librdkafka in order (so one user's records keep their order on the
//! topic). At-least-once: a task per record waits for the broker's acknowledgement and only
//! then releases the input offsets the record covers; a signal's offsets wait for its
//! changelog write too. Exactly-once: every record goes into the open transaction and releases
//! its offsets as soon as it is handed over; [`Sink::commit_transaction`] then commits the
//! records and the released offsets together. A record the producer finally cannot deliver
//! (or a transaction that cannot commit) is fatal: the processor stops without committing
//! its offsets, so the events are read again.
//!
//! Records of a user are published only while this instance holds the user's partition
//! under the assignment epoch the scoring began in; once a partition is let go, nothing more
//! is written for it (see [`Sink::release_partitions`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::{mpsc, Notify, RwLock};

use crate::actions::{ActionKind, ActionRecord};
use crate::config::{Config, DeliveryMode};
use crate::event::{Format, Rejection};
use crate::metrics as m;
use crate::offsets::{self, OffsetRef, OffsetTracker, Position};
use crate::signals::{self, SignalRecord};

/// Header names on dead-letter records.
pub mod dlq_headers {
    pub const REASON: &str = "mindstream.reason";
    pub const DETAIL: &str = "mindstream.detail";
    pub const TOPIC: &str = "mindstream.source.topic";
    pub const PARTITION: &str = "mindstream.source.partition";
    pub const OFFSET: &str = "mindstream.source.offset";
}

/// Why the producer side stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the Kafka producer")]
    Create(#[source] KafkaError),
    #[error("cannot deliver to {topic}")]
    Deliver {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("Kafka transaction step `{step}` failed")]
    Transaction {
        step: &'static str,
        #[source]
        source: KafkaError,
    },
}

/// Which user a record belongs to, for the ownership check.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    /// Input partition number.
    pub partition: i32,
    /// Assignment epoch the work began under.
    pub epoch: u64,
}

/// Shared handle on the producer; cheap to clone.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    signals_topic: Arc<str>,
    dlq_topic: Arc<str>,
    changelog_topic: Arc<str>,
    format: Format,
    mode: DeliveryMode,
    transaction_timeout: Duration,
    /// Offsets released on acknowledgement (at-least-once) or hand-over (exactly-once).
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Assignment epoch of each input partition number held; only ever locked briefly and
    /// never across an await.
    owned: Arc<Mutex<HashMap<i32, u64>>>,
    /// Exactly-once: hand-overs hold it shared, a transaction commit exclusively, so a commit
    /// sees every hand-over either wholly before it or wholly after.
    transaction: Arc<RwLock<()>>,
    /// Where a delivery failure is reported; the pipeline stops on the first.
    fatal: mpsc::UnboundedSender<SinkError>,
    /// Records handed to the producer and not yet acknowledged.
    in_flight: Arc<AtomicUsize>,
    /// The same, per input partition number of the records' users.
    in_flight_by_partition: Arc<Mutex<HashMap<i32, usize>>>,
    /// Woken whenever `in_flight` drops to zero.
    idle: Arc<Notify>,
}

/// Producer properties for the operational subcommands (`replay`, `delete-user`): the
/// processor's, without its transactional id, so that a tool run with a deployment's
/// configuration never fences the running instance that owns that id.
pub fn tool_producer_config(config: &Config) -> ClientConfig {
    let mut client = producer_config(config);
    client.remove("transactional.id");
    client.remove("transaction.timeout.ms");
    client
}

/// Producer properties: idempotent, all replicas, Java-compatible key partitioning, batches
/// compressed with LZ4, and in exactly-once mode the transactional id; then the user's
/// `kafka.client` and `kafka.producer` maps, which win.
///
/// Signal records repeat field names, signal names and categories from record to record, so
/// batches shrink under LZ4 for little CPU: JSON signal records of the Taobao slice to 1/1.6
/// of their size alone, 1/3 in batches of four and 1/4 to 1/4.6 in batches of 16 to 64
/// (docs/PERFORMANCE.md). The broker stores and serves the smaller batches, and consumers of
/// every Kafka client read them.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("partitioner", "murmur2_random");
    if config.delivery.mode == DeliveryMode::ExactlyOnce {
        if let Some(id) = &config.delivery.transactional_id {
            client.set("transactional.id", id);
        }
        let timeout_ms = config.delivery.transaction_timeout.as_millis().max(1000);
        client.set("transaction.timeout.ms", timeout_ms.to_string());
    }
    for (key, value) in config.kafka.client.iter().chain(&config.kafka.producer) {
        client.set(key, value);
    }
    client
}

impl Sink {
    /// Creates the producer; in exactly-once mode also fences any earlier producer with the
    /// same transactional id (aborting its open transaction) and opens the first transaction.
    pub fn new(
        config: &Config,
        tracker: Arc<Mutex<OffsetTracker>>,
        fatal: mpsc::UnboundedSender<SinkError>,
    ) -> Result<Sink, SinkError> {
        let producer: FutureProducer =
            producer_config(config).create().map_err(SinkError::Create)?;
        let mode = config.delivery.mode;
        let transaction_timeout = config.delivery.transaction_timeout;
        if mode == DeliveryMode::ExactlyOnce {
            let step = |step| move |source| SinkError::Transaction { step, source };
            producer.init_transactions(transaction_timeout).map_err(step("init"))?;
            producer.begin_transaction().map_err(step("begin"))?;
            tracing::info!(
                transactional_id = config.delivery.transactional_id.as_deref().unwrap_or(""),
                "transactional producer ready"
            );
        }
        Ok(Sink {
            producer,
            signals_topic: config.output.signals_topic.as_str().into(),
            dlq_topic: config.output.dlq_topic.as_str().into(),
            changelog_topic: config.state.changelog_topic.as_str().into(),
            format: config.output.format,
            mode,
            transaction_timeout,
            tracker,
            owned: Arc::new(Mutex::new(HashMap::new())),
            transaction: Arc::new(RwLock::new(())),
            fatal,
            in_flight: Arc::new(AtomicUsize::new(0)),
            in_flight_by_partition: Arc::new(Mutex::new(HashMap::new())),
            idle: Arc::new(Notify::new()),
        })
    }

    /// Starts publishing for input partition numbers restored under `epoch`.
    pub fn hold_partition(&self, partition: i32, epoch: u64) {
        self.owned.lock().expect("ownership lock poisoned").insert(partition, epoch);
    }

    /// Stops publishing for these partition numbers: from the return of this call on,
    /// nothing more is handed to the producer for their users.
    pub fn release_partitions(&self, partitions: &[i32]) {
        let mut owned = self.owned.lock().expect("ownership lock poisoned");
        for partition in partitions {
            owned.remove(partition);
        }
    }

    /// Publishes a signal record, the records derived from it (segment changes, alerts) and
    /// the state it was computed from; `covers` are released when all are delivered. Nothing
    /// is published when `owner` no longer holds the user.
    pub async fn publish(
        &self,
        record: &SignalRecord,
        changelog: Option<Vec<u8>>,
        derived: Vec<ActionRecord>,
        owner: Owner,
        covers: Vec<OffsetRef>,
    ) {
        let payload = signals::encode(self.format, record);
        let signal_names: Vec<String> = record.scores.iter().map(|s| s.signal.clone()).collect();
        let key = record.user_key.as_bytes();
        let mut records = Vec::with_capacity(2 + derived.len());
        if let Some(state) = &changelog {
            let to = Target::Partition(self.changelog_topic.clone(), owner.partition);
            records.push(Outgoing { to, key: Some(key), payload: Some(state), headers: None });
        }
        let to = Target::Keyed(self.signals_topic.clone());
        records.push(Outgoing { to, key: Some(key), payload: Some(&payload), headers: None });
        records.extend(derived.iter().map(outgoing));
        let kinds: Vec<ActionKind> = derived.iter().map(|d| d.kind.clone()).collect();
        self.send(records, Some(owner), covers, move || {
            metrics::counter!(m::RECORDS_OUT).increment(1);
            for signal in signal_names {
                metrics::counter!(m::SIGNALS_OUT, "signal" => signal).increment(1);
            }
            count_actions(kinds);
        })
        .await;
    }

    /// Erases a user: a tombstone for `user_key` on the changelog, one on the signal topic
    /// too when `signals_too`, and the `derived` tombstones (segment memberships), so that
    /// compaction removes them all; `covers` are released when all are delivered.
    pub async fn erase(
        &self,
        user_key: &str,
        owner: Owner,
        covers: Vec<OffsetRef>,
        signals_too: bool,
        derived: Vec<ActionRecord>,
    ) {
        let key = Some(user_key.as_bytes());
        let changelog = Target::Partition(self.changelog_topic.clone(), owner.partition);
        let mut records = vec![Outgoing { to: changelog, key, payload: None, headers: None }];
        if signals_too {
            let signals = Target::Keyed(self.signals_topic.clone());
            records.push(Outgoing { to: signals, key, payload: None, headers: None });
        }
        records.extend(derived.iter().map(outgoing));
        self.send(records, Some(owner), covers, || {}).await;
    }

    /// Sends a rejected record's original bytes to the DLQ with the reason and its source.
    pub async fn dead_letter(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        rejection: &Rejection,
        token: OffsetRef,
    ) {
        let partition = token.partition.partition.to_string();
        let offset = token.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: dlq_headers::REASON, value: Some(rejection.reason.as_str()) })
            .insert(Header { key: dlq_headers::DETAIL, value: Some(rejection.detail.as_str()) })
            .insert(Header { key: dlq_headers::TOPIC, value: Some(&*token.partition.topic) })
            .insert(Header { key: dlq_headers::PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: dlq_headers::OFFSET, value: Some(offset.as_str()) });
        let to = Target::Keyed(self.dlq_topic.clone());
        let record = Outgoing { to, key, payload, headers: Some(headers) };
        self.send(vec![record], None, vec![token], || {}).await;
    }

    /// Hands `records` to the producer in order, if `owner` (when given) still holds its
    /// partition, and arranges for `covers` to be released and `on_delivered` to run once all
    /// of them are delivered. A failure is reported on the fatal channel.
    async fn send(
        &self,
        records: Vec<Outgoing<'_>>,
        owner: Option<Owner>,
        covers: Vec<OffsetRef>,
        on_delivered: impl FnOnce() + Send + 'static,
    ) {
        let started = Instant::now();
        let _gate = match self.mode {
            DeliveryMode::ExactlyOnce => Some(self.transaction.read().await),
            DeliveryMode::AtLeastOnce => None,
        };
        let mut deliveries = Vec::with_capacity(records.len());
        for outgoing in records {
            let topic = outgoing.to.topic().to_owned();
            match self.enqueue(outgoing, owner).await {
                Ok(Some(delivery)) => deliveries.push((topic, delivery)),
                Ok(None) => {
                    metrics::counter!(m::RECORDS_DROPPED_REVOKED).increment(1);
                    return;
                }
                Err(source) => {
                    let _ = self.fatal.send(SinkError::Deliver { topic, source });
                    return;
                }
            }
        }
        if self.mode == DeliveryMode::ExactlyOnce {
            // The transaction commit delivers these records and these offsets together.
            self.release(&covers);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Some(owner) = owner {
            let mut by_partition = self.in_flight_by_partition.lock().expect("in-flight lock");
            *by_partition.entry(owner.partition).or_default() += 1;
        }
        let sink = self.clone();
        tokio::spawn(async move {
            let mut delivered = true;
            for (topic, delivery) in deliveries {
                let failure = match delivery.await {
                    Ok(Ok(_)) => None,
                    Ok(Err((source, _))) => Some(source),
                    Err(_cancelled) => Some(KafkaError::Canceled),
                };
                if let Some(source) = failure {
                    let _ = sink.fatal.send(SinkError::Deliver { topic, source });
                    delivered = false;
                    break;
                }
            }
            if delivered {
                metrics::histogram!(m::PRODUCE_SECONDS).record(started.elapsed().as_secs_f64());
                if sink.mode == DeliveryMode::AtLeastOnce {
                    sink.release(&covers);
                }
                on_delivered();
            }
            if let Some(owner) = owner {
                let mut by_partition = sink.in_flight_by_partition.lock().expect("in-flight lock");
                if let Some(count) = by_partition.get_mut(&owner.partition) {
                    *count -= 1;
                    if *count == 0 {
                        by_partition.remove(&owner.partition);
                    }
                }
            }
            if sink.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                sink.idle.notify_waiters();
            }
        });
    }

    /// Hands one record to the producer, waiting while its queue is full. `None` when the
    /// owner's partition is no longer held (checked under the ownership lock, so a release
    /// never races a hand-over).
    async fn enqueue(
        &self,
        outgoing: Outgoing<'_>,
        owner: Option<Owner>,
    ) -> Result<Option<rdkafka::producer::DeliveryFuture>, KafkaError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(outgoing.to.topic());
        if let Some(key) = outgoing.key {
            record = record.key(key);
        }
        if let Some(payload) = outgoing.payload {
            record = record.payload(payload);
        }
        if let Target::Partition(_, partition) = &outgoing.to {
            record = record.partition(*partition);
        }
        if let Some(headers) = outgoing.headers {
            record = record.headers(headers);
        }
        loop {
            let attempt = {
                let owned = self.owned.lock().expect("ownership lock poisoned");
                if let Some(owner) = owner {
                    if owned.get(&owner.partition) != Some(&owner.epoch) {
                        return Ok(None);
                    }
                }
                self.producer.send_result(record)
            };
            match attempt {
                Ok(delivery) => return Ok(Some(delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => return Err(source),
            }
        }
    }

    /// Exactly-once: commits the open transaction with the input positions released so far
    /// (each with its watermark), and opens the next one. Returns the positions committed.
    pub async fn commit_transaction(
        &self,
        group: &ConsumerGroupMetadata,
    ) -> Result<Vec<Position>, SinkError> {
        let _exclusive = self.transaction.write().await;
        let positions = self.tracker.lock().expect("offset tracker lock poisoned").to_commit();
        let step = |step| move |source| SinkError::Transaction { step, source };
        let timeout = self.transaction_timeout;
        let started = Instant::now();
        tokio::task::block_in_place(|| {
            if !positions.is_empty() {
                let list = offsets::commit_list(&positions).map_err(step("offsets"))?;
                self.producer
                    .send_offsets_to_transaction(&list, group, timeout)
                    .map_err(step("send_offsets"))?;
            }
            self.producer.commit_transaction(timeout).map_err(step("commit"))?;
            self.producer.begin_transaction().map_err(step("begin"))
        })?;
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        self.tracker.lock().expect("offset tracker lock poisoned").committed(&positions);
        Ok(positions)
    }

    fn release(&self, covers: &[OffsetRef]) {
        let now_ms = crate::time::now_ms();
        let mut tracker = self.tracker.lock().expect("offset tracker lock poisoned");
        for token in covers {
            tracker.done(&token.partition, token.offset);
            if let Some(produced) = token.timestamp_ms {
                let seconds = (now_ms - produced).max(0) as f64 / 1000.0;
                metrics::histogram!(m::END_TO_END_SECONDS).record(seconds);
            }
        }
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How many partitions `topic` has (0 when it does not exist). Blocks the calling thread.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<usize, KafkaError> {
        let metadata = self.producer.client().fetch_metadata(Some(topic), timeout)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    }

    /// Whether a broker answers a metadata request within `timeout`. Blocks the calling
    /// thread.
    pub fn broker_reachable(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(Some(&self.signals_topic), timeout).is_ok()
    }

    /// Waits until no record of these partition numbers' users is awaiting its
    /// acknowledgement; false when `timeout` passes first.
    pub async fn wait_partitions_idle(&self, partitions: &[i32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = {
                let by_partition = self.in_flight_by_partition.lock().expect("in-flight lock");
                partitions.iter().any(|p| by_partition.contains_key(p))
            };
            if !busy {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until every record handed over so far is acknowledged (or failed).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Where one outgoing record goes.
enum Target {
    /// Partitioned by key with the Java client's partitioner.
    Keyed(Arc<str>),
    /// An explicit partition (changelog records follow their input partition).
    Partition(Arc<str>, i32),
}

impl Target {
    fn topic(&self) -> &str {
        match self {
            Target::Keyed(topic) | Target::Partition(topic, _) => topic,
        }
    }
}

fn outgoing(record: &ActionRecord) -> Outgoing<'_> {
    let to = Target::Keyed(record.topic.clone());
    // An action record with an empty payload is a tombstone.
    let payload = (!record.payload.is_empty()).then_some(&record.payload[..]);
    Outgoing { to, key: Some(&record.key), payload, headers: None }
}

/// Counts delivered segment changes and alerts.
fn count_actions(kinds: Vec<ActionKind>) {
    for kind in kinds {
        match kind {
            ActionKind::Entered(segment) => {
                metrics::counter!(m::SEGMENT_CHANGES, "segment" => segment, "change" => "entered")
                    .increment(1);
            }
            ActionKind::Left(segment) => {
                metrics::counter!(m::SEGMENT_CHANGES, "segment" => segment, "change" => "left")
                    .increment(1);
            }
            ActionKind::Alert(reason) => {
                metrics::counter!(m::SERVICE_ALERTS, "reason" => reason.as_str()).increment(1);
            }
            ActionKind::Erased => {}
        }
    }
}

struct Outgoing<'a> {
    to: Target,
    /// `None` for a record without a key (a dead letter of a record that had none).
    key: Option<&'a [u8]>,
    /// `None` for a tombstone. A dead letter keeps its original's absent or empty value.
    payload: Option<&'a [u8]>,
    headers: Option<OwnedHeaders>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_never_take_the_processors_transactional_id() {
        let env = [
            ("MINDSTREAM__DELIVERY__MODE", "exactly_once"),
            ("MINDSTREAM__DELIVERY__TRANSACTIONAL_ID", "mindstream-0"),
        ];
        let env = env.map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::load(None, env).expect("a valid exactly-once configuration");
        assert_eq!(producer_config(&config).get("transactional.id"), Some("mindstream-0"));
        let tool = tool_producer_config(&config);
        assert_eq!(tool.get("transactional.id"), None);
        assert_eq!(tool.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn batches_are_compressed_unless_the_producer_map_says_otherwise() {
        let config = Config::load(None, std::iter::empty()).expect("the default configuration");
        assert_eq!(producer_config(&config).get("compression.type"), Some("lz4"));
        let env = [("MINDSTREAM__KAFKA__PRODUCER__COMPRESSION_TYPE", "zstd")];
        let env = env.map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::load(None, env).expect("a valid configuration");
        assert_eq!(producer_config(&config).get("compression.type"), Some("zstd"));
        assert_eq!(tool_producer_config(&config).get("compression.type"), Some("zstd"));
    }
}
