//! `mindstream replay`: produces an event file (JSON lines) into a topic at a chosen rate,
//! for demos, back-fills and load tests.
//!
//! In JSON mode each line is sent as it is, so a file with bad lines exercises the DLQ. In
//! protobuf mode each line is decoded and re-encoded; a line that does not decode cannot be
//! converted and is skipped and counted. Records are keyed by the raw user id, as a shop's
//! own producer would key them.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::event::{self, json, Format};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the producer")]
    Producer(#[source] KafkaError),
    #[error("cannot send to {topic}")]
    Send {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("{failed} records were not acknowledged by the broker")]
    Undelivered { failed: u64 },
}

#[derive(Debug, Default)]
pub struct ReplayStats {
    pub sent: u64,
    pub skipped: u64,
    pub seconds: f64,
}

/// Counts acknowledgements and failures.
#[derive(Default)]
struct Counting {
    failed: Arc<AtomicU64>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, _)) = result {
            tracing::warn!(cause = %err, "replay record not delivered");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct Replay<'a> {
    pub client: &'a ClientConfig,
    pub input: &'a Path,
    pub topic: &'a str,
    pub format: Format,
    /// Records per second; 0 sends as fast as the broker takes them.
    pub rate: f64,
}

impl Replay<'_> {
    pub fn run(&self) -> Result<ReplayStats, ReplayError> {
        let read_err = |source| ReplayError::Read { path: self.input.into(), source };
        let file = std::fs::File::open(self.input).map_err(read_err)?;
        let failed = Arc::new(AtomicU64::new(0));
        let context = Counting { failed: failed.clone() };
        let mut client = self.client.clone();
        client.set("linger.ms", "20").set("enable.idempotence", "true");
        let producer: ThreadedProducer<Counting> =
            client.create_with_context(context).map_err(ReplayError::Producer)?;

        let begun = Instant::now();
        let mut started = begun;
        let mut stats = ReplayStats::default();
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.map_err(read_err)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let decoded = json::decode(&line);
            let payload = match (self.format, &decoded) {
                (Format::Json, _) => line.clone(),
                (Format::Protobuf, Ok(event)) => event::encode(Format::Protobuf, event),
                (Format::Protobuf, Err(_)) => {
                    stats.skipped += 1;
                    continue;
                }
            };
            let key = decoded.as_ref().ok().map(|e| e.user_id.as_str());
            self.send(&producer, key, &payload)?;
            stats.sent += 1;
            if stats.sent == 1 && self.rate > 0.0 {
                // An idempotent producer sends nothing until the broker has given it an id,
                // which takes some hundreds of milliseconds; the rate is kept from the first
                // acknowledgement on, so that the records after it are not held back in a
                // burst.
                producer
                    .flush(Duration::from_secs(60))
                    .map_err(|source| ReplayError::Send { topic: self.topic.into(), source })?;
                started = Instant::now();
            }
            self.pace(started, stats.sent - 1);
        }
        producer
            .flush(Duration::from_secs(60))
            .map_err(|source| ReplayError::Send { topic: self.topic.into(), source })?;
        stats.seconds = begun.elapsed().as_secs_f64();
        match failed.load(Ordering::Relaxed) {
            0 => Ok(stats),
            failed => Err(ReplayError::Undelivered { failed }),
        }
    }

    fn send(
        &self,
        producer: &ThreadedProducer<Counting>,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<(), ReplayError> {
        let mut record = BaseRecord::to(self.topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((source, _)) => {
                    return Err(ReplayError::Send { topic: self.topic.into(), source })
                }
            }
        }
    }

    /// Sleeps so that `sent` records after the first take `sent / rate` seconds.
    fn pace(&self, started: Instant, sent: u64) {
        if self.rate <= 0.0 {
            return;
        }
        let due = Duration::from_secs_f64(sent as f64 / self.rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}
