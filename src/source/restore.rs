//! The restore of assigned partitions' user state: each changelog partition read to its end,
//! the latest snapshot per user kept.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::Config;
use crate::state::{self, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot create the changelog reader")]
    Client(#[source] KafkaError),
    #[error("cannot read changelog topic {topic}")]
    Read {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("changelog {topic} partition {partition} offset {offset} holds a bad state")]
    Decode {
        topic: String,
        partition: i32,
        offset: i64,
        #[source]
        source: state::StateError,
    },
    #[error(
        "restoring {topic} partitions {partitions:?} took longer than state.restore_timeout \
         ({timeout:?})"
    )]
    Timeout { topic: String, partitions: Vec<i32>, timeout: Duration },
}

/// Users by pseudonymised key, as restored.
type Users = Vec<(String, Snapshot)>;

/// Reads changelog partitions back into user states.
pub(super) struct Restorer {
    client: ClientConfig,
    topic: String,
    timeout: Duration,
}

impl Restorer {
    pub(super) fn new(config: &Config) -> Restorer {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.kafka.brokers);
        for (key, value) in &config.kafka.client {
            client.set(key, value);
        }
        client
            .set("group.id", format!("{}-restore", config.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // Aborted transactions never reach the state (where the broker honours this).
            .set("isolation.level", "read_committed");
        Restorer {
            client,
            topic: config.state.changelog_topic.clone(),
            timeout: config.state.restore_timeout,
        }
    }

    /// Each partition's users, latest value per key, tombstones applied.
    pub(super) fn restore(&self, numbers: &[i32]) -> Result<Vec<(i32, Users)>, RestoreError> {
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let consumer: BaseConsumer<RestoreContext> =
            self.client.create_with_context(RestoreContext).map_err(RestoreError::Client)?;
        let read_err = |source| RestoreError::Read { topic: self.topic.clone(), source };
        let mut list = TopicPartitionList::new();
        for &number in numbers {
            list.add_partition_offset(&self.topic, number, Offset::Beginning).map_err(read_err)?;
        }
        consumer.assign(&list).map_err(read_err)?;
        let mut latest: HashMap<i32, HashMap<Vec<u8>, Option<Snapshot>>> =
            numbers.iter().map(|&n| (n, HashMap::new())).collect();
        let mut open: BTreeSet<i32> = numbers.iter().copied().collect();
        let deadline = Instant::now() + self.timeout;
        while !open.is_empty() {
            if Instant::now() > deadline {
                let partitions = open.into_iter().collect();
                return Err(RestoreError::Timeout {
                    topic: self.topic.clone(),
                    partitions,
                    timeout: self.timeout,
                });
            }
            let message = match consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    open.remove(&partition);
                    continue;
                }
                Some(Err(err)) if is_transient(&err) => {
                    tracing::warn!(cause = %err, "changelog read retried");
                    continue;
                }
                Some(Err(err)) => return Err(read_err(err)),
                Some(Ok(message)) => message,
            };
            let Some(key) = message.key() else { continue };
            let value = match message.payload() {
                None | Some([]) => None,
                Some(bytes) => {
                    Some(state::decode(bytes).map_err(|source| RestoreError::Decode {
                        topic: self.topic.clone(),
                        partition: message.partition(),
                        offset: message.offset(),
                        source,
                    })?)
                }
            };
            if let Some(users) = latest.get_mut(&message.partition()) {
                users.insert(key.to_vec(), value);
            }
        }
        Ok(latest
            .into_iter()
            .map(|(partition, users)| {
                let users = users
                    .into_iter()
                    .filter_map(|(key, snapshot)| Some((String::from_utf8(key).ok()?, snapshot?)))
                    .collect();
                (partition, users)
            })
            .collect())
    }
}

/// The changelog reader's context: the end of a partition is how a restore knows it is done,
/// not an error to log.
struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(cause = %error, reason, "changelog reader error");
        }
    }
}

impl ConsumerContext for RestoreContext {}

/// Errors a reader rides out (the client retries underneath).
fn is_transient(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
        )
    )
}
