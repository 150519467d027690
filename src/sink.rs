//! The producer side: signal records to the signal topic and rejected records to the DLQ.
//!
//! Records are handed to librdkafka in order (so one user's records keep their order on the
//! topic); a task per record waits for the broker's acknowledgement and only then releases
//! the input offsets the record covers. A record the producer finally cannot deliver is fatal:
//! the processor stops without committing its offsets, so the events are read again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::event::{Format, Rejection};
use crate::metrics as m;
use crate::offsets::{OffsetRef, OffsetTracker};
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
}

/// Shared handle on the producer; cheap to clone.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer,
    signals_topic: Arc<str>,
    dlq_topic: Arc<str>,
    format: Format,
    /// Offsets released on acknowledgement.
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Where a delivery failure is reported; the pipeline stops on the first.
    fatal: mpsc::UnboundedSender<SinkError>,
    /// Records handed to the producer and not yet acknowledged.
    in_flight: Arc<AtomicUsize>,
    /// Woken whenever `in_flight` drops to zero.
    idle: Arc<Notify>,
}

/// Producer properties: idempotent, all replicas, Java-compatible key partitioning; then the
/// user's `kafka.client` and `kafka.producer` maps, which win.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random");
    for (key, value) in config.kafka.client.iter().chain(&config.kafka.producer) {
        client.set(key, value);
    }
    client
}

impl Sink {
    pub fn new(
        config: &Config,
        tracker: Arc<Mutex<OffsetTracker>>,
        fatal: mpsc::UnboundedSender<SinkError>,
    ) -> Result<Sink, SinkError> {
        let producer = producer_config(config).create().map_err(SinkError::Create)?;
        Ok(Sink {
            producer,
            signals_topic: config.output.signals_topic.as_str().into(),
            dlq_topic: config.output.dlq_topic.as_str().into(),
            format: config.output.format,
            tracker,
            fatal,
            in_flight: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
        })
    }

    /// Publishes a signal record; `covers` are released when the broker acknowledges it.
    pub async fn publish(&self, record: &SignalRecord, covers: Vec<OffsetRef>) {
        let payload = signals::encode(self.format, record);
        let signal_names: Vec<String> = record.scores.iter().map(|s| s.signal.clone()).collect();
        let topic = self.signals_topic.clone();
        let sent = self
            .send(&topic, &record.user_key, &payload, OwnedHeaders::new(), covers, move || {
                metrics::counter!(m::RECORDS_OUT).increment(1);
                for signal in signal_names {
                    metrics::counter!(m::SIGNALS_OUT, "signal" => signal).increment(1);
                }
            })
            .await;
        if let Err(err) = sent {
            let _ = self.fatal.send(err);
        }
    }

    /// Sends a rejected record's original bytes to the DLQ with the reason and its source.
    pub async fn dead_letter(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
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
        let topic = self.dlq_topic.clone();
        let key = key.unwrap_or_default();
        if let Err(err) = self.send(&topic, key, payload, headers, vec![token], || {}).await {
            let _ = self.fatal.send(err);
        }
    }

    async fn send<K: rdkafka::message::ToBytes + ?Sized>(
        &self,
        topic: &str,
        key: &K,
        payload: &[u8],
        headers: OwnedHeaders,
        covers: Vec<OffsetRef>,
        on_delivered: impl FnOnce() + Send + 'static,
    ) -> Result<(), SinkError> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
        let started = Instant::now();
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    return Err(SinkError::Deliver { topic: topic.into(), source });
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let sink = self.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let outcome = delivery.await;
            match outcome {
                Ok(Ok(_)) => {
                    metrics::histogram!(m::PRODUCE_SECONDS).record(started.elapsed().as_secs_f64());
                    sink.release(&covers);
                    on_delivered();
                }
                Ok(Err((source, _))) => {
                    let _ = sink.fatal.send(SinkError::Deliver { topic, source });
                }
                Err(_cancelled) => {
                    let source = KafkaError::Canceled;
                    let _ = sink.fatal.send(SinkError::Deliver { topic, source });
                }
            }
            if sink.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                sink.idle.notify_waiters();
            }
        });
        Ok(())
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
