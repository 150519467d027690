//! Start-up and background checks: the topics a deployment needs, and whether the broker
//! still answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::http::Health;
use crate::sink::Sink;

use super::{interval, PipelineError};

/// Checks at start-up that the changelog exists with a partition for every input partition
/// number, so that every assigned partition has somewhere to restore from.
pub(super) fn check_topics(config: &Config, sink: &Sink) -> Result<(), PipelineError> {
    let changelog = &config.state.changelog_topic;
    let count = |topic: &str| -> Result<usize, PipelineError> {
        let partitions = sink.partition_count(topic, TOPIC_CHECK_TIMEOUT).map_err(|err| {
            PipelineError::Topics(format!("cannot read the metadata of topic `{topic}`: {err}"))
        })?;
        if partitions == 0 {
            return Err(PipelineError::Topics(format!(
                "topic `{topic}` does not exist; create it first (`mindstream topics` creates \
                 every topic of the configuration)"
            )));
        }
        Ok(partitions)
    };
    let changelog_partitions = count(changelog)?;
    if !config.segments.is_empty() {
        count(&config.output.segments_topic)?;
    }
    if config.alerts.enabled {
        count(&config.output.alerts_topic)?;
    }
    for input in &config.inputs {
        let partitions = count(&input.topic)?;
        if partitions > changelog_partitions {
            return Err(PipelineError::Topics(format!(
                "state.changelog_topic `{changelog}` has {changelog_partitions} partitions but \
                 input `{}` has {partitions}; the changelog needs one per input partition",
                input.topic
            )));
        }
    }
    Ok(())
}

/// Keeps `broker_down` current: a broker that stops answering (a network partition, a
/// stalled broker) does not always make the client report an error.
pub(super) async fn probe_broker(sink: Sink, health: Arc<Health>) {
    let mut tick = interval(BROKER_PROBE_PERIOD);
    loop {
        tick.tick().await;
        let probe = sink.clone();
        let reachable =
            tokio::task::spawn_blocking(move || probe.broker_reachable(BROKER_PROBE_TIMEOUT))
                .await
                .unwrap_or(false);
        let was_down = health.broker_down.swap(!reachable, Ordering::SeqCst);
        if was_down == reachable {
            if reachable {
                tracing::info!("broker reachable again");
            } else {
                tracing::warn!(timeout = ?BROKER_PROBE_TIMEOUT, "broker unreachable");
            }
        }
    }
}

/// Bound on the start-up metadata queries.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the broker's reachability is checked, and how long one check may take.
const BROKER_PROBE_PERIOD: Duration = Duration::from_secs(2);
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
