//! `mindstream topics`: the input, signal, DLQ, changelog, segments and alerts topics of a
//! configuration.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("cannot create the admin client")]
    Client(#[source] KafkaError),
    #[error("cannot create topic {topic}")]
    Create {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// Creates every topic the configuration names; existing topics are left as they are.
/// The signal topic is compacted (a consumer needs only each user's latest record), and so
/// is the state changelog (a restore needs only each user's latest state). The changelog
/// gets the same partition count as the inputs: its partition `p` holds the users of input
/// partition `p`.
pub async fn create(
    config: &Config,
    partitions: i32,
    replication: i32,
) -> Result<Vec<(String, bool)>, TopicsError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (key, value) in &config.kafka.client {
        client.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(TopicsError::Client)?;
    let replication = || TopicReplication::Fixed(replication);
    let mut topics: Vec<NewTopic> =
        config.inputs.iter().map(|i| NewTopic::new(&i.topic, partitions, replication())).collect();
    topics.push(
        NewTopic::new(&config.output.signals_topic, partitions, replication())
            .set("cleanup.policy", "compact"),
    );
    topics.push(NewTopic::new(&config.output.dlq_topic, partitions, replication()));
    topics.push(
        NewTopic::new(&config.state.changelog_topic, partitions, replication())
            .set("cleanup.policy", "compact"),
    );
    if !config.segments.is_empty() {
        // Keyed by user and segment: the latest record of a key is the current membership.
        topics.push(
            NewTopic::new(&config.output.segments_topic, partitions, replication())
                .set("cleanup.policy", "compact"),
        );
    }
    if config.alerts.enabled {
        // Alerts are events, each one kept until retention drops it.
        topics.push(NewTopic::new(&config.output.alerts_topic, partitions, replication()));
    }

    let results = admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .map_err(|source| TopicsError::Create { topic: "(all)".into(), source })?;
    let mut created = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(topic) => created.push((topic, true)),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => created.push((topic, false)),
            Err((topic, code)) => {
                return Err(TopicsError::Create { topic, source: KafkaError::AdminOp(code) })
            }
        }
    }
    Ok(created)
}
