//! The consume loop's periodic work: offset commits (or transaction commits), the gauges,
//! idle-user eviction, consumer lag, the progress line, and the caught-up check.

use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;

use crate::config::DeliveryMode;
use crate::metrics as m;
use crate::offsets::{self, Partition};
use crate::source::{Source, SourceConsumer};

use super::{PipelineError, Processor};

impl Processor {
    /// Commits every partition whose done position moved: a consumer commit (at-least-once)
    /// or the open transaction (exactly-once).
    pub(super) async fn commit(
        &self,
        consumer: &SourceConsumer,
        mode: CommitMode,
    ) -> Result<(), PipelineError> {
        if self.mode == DeliveryMode::ExactlyOnce {
            return self.commit_transaction(consumer).await;
        }
        let positions = self.tracker.lock().expect("offset tracker lock poisoned").to_commit();
        if positions.is_empty() {
            return Ok(());
        }
        let list = match offsets::commit_list(&positions) {
            Ok(list) => list,
            Err(err) => {
                tracing::warn!(cause = %err, "cannot build the commit list");
                return Ok(());
            }
        };
        let started = Instant::now();
        match consumer.commit(&list, mode) {
            Ok(()) => {
                metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                self.tracker.lock().expect("offset tracker lock poisoned").committed(&positions);
            }
            Err(err) => {
                metrics::counter!(m::COMMIT_FAILURES).increment(1);
                tracing::warn!(cause = %err, "offset commit failed");
            }
        }
        Ok(())
    }

    /// Exactly-once: commits the open transaction with the input positions it covers. A
    /// failure stops the processor; the restart resumes from the last committed transaction.
    pub(super) async fn commit_transaction(
        &self,
        consumer: &SourceConsumer,
    ) -> Result<(), PipelineError> {
        let Some(group) = consumer.group_metadata() else {
            return Err(PipelineError::Consumer(KafkaError::ClientCreation(
                "the consumer has no group metadata for the transaction".into(),
            )));
        };
        let positions = self.sink.commit_transaction(&group).await?;
        metrics::counter!(m::TRANSACTIONS).increment(1);
        if !positions.is_empty() {
            tracing::debug!(partitions = positions.len(), "transaction committed");
        }
        Ok(())
    }

    /// Gauges, idle-user eviction, consumer lag and a progress line.
    pub(super) async fn housekeeping(&mut self, consumer: &SourceConsumer) {
        let open = self.tracker.lock().expect("offset tracker lock poisoned").open_count();
        tracing::info!(
            records_in = self.records_in,
            users = self.store.users(),
            unscored_users = self.store.dirty(),
            open_offsets = open,
            in_flight = self.sink.in_flight(),
            paused = self.paused,
            "progress"
        );
        self.rejections.flush(Instant::now());
        let evicted = self.store.evict_idle();
        if !evicted.is_empty() {
            metrics::counter!(m::USERS_EVICTED).increment(evicted.len() as u64);
        }
        for dropped in evicted {
            self.erase(dropped.user_key, dropped.partition, Vec::new(), false, dropped.marks);
        }
        metrics::gauge!(m::ACTIVE_USERS).set(self.store.users() as f64);
        self.report_segments();
        metrics::gauge!(m::STATE_BYTES).set(self.store.state_bytes() as f64);
        self.report_lag(consumer).await;
    }

    /// Sets the segment size gauges, and hands the sizes to the console.
    fn report_segments(&self) {
        if self.segments.is_empty() {
            return;
        }
        let sizes = self.store.segment_sizes(&self.segments);
        for (segment, size) in &sizes {
            metrics::gauge!(m::SEGMENT_MEMBERS, "segment" => segment.clone()).set(*size as f64);
        }
        if let Some(console) = &self.console {
            console.sample_segments(&sizes, crate::time::now_ms());
        }
    }

    /// Sets the lag gauge of every assigned partition, and zeroes it for partitions reported
    /// before and no longer assigned, so that a revoked partition's last lag does not linger
    /// beside its new owner's.
    async fn report_lag(&mut self, consumer: &SourceConsumer) {
        let lags = self.lag(consumer).await.unwrap_or_default();
        let assigned: std::collections::HashSet<Partition> = match self.health.assignment.lock() {
            Ok(assignment) => assignment.iter().cloned().collect(),
            Err(_) => return,
        };
        let gone: Vec<Partition> =
            self.lag_reported.iter().filter(|p| !assigned.contains(*p)).cloned().collect();
        for partition in gone {
            metrics::gauge!(m::CONSUMER_LAG, &lag_labels(&partition)).set(0.0);
            self.lag_reported.remove(&partition);
        }
        for (partition, lag) in lags {
            metrics::gauge!(m::CONSUMER_LAG, &lag_labels(&partition)).set(lag as f64);
            self.lag_reported.insert(partition);
        }
    }

    /// Records behind the high watermark per assigned partition; `None` when unknown.
    pub(super) async fn lag(&self, consumer: &SourceConsumer) -> Option<Vec<(Partition, i64)>> {
        let assigned: Vec<Partition> =
            self.health.assignment.lock().ok()?.iter().cloned().collect();
        if assigned.is_empty() {
            return None;
        }
        let positions = consumer.position().ok()?;
        let mut lags = Vec::with_capacity(assigned.len());
        for partition in assigned {
            let (low, high) = tokio::task::block_in_place(|| {
                consumer.fetch_watermarks(&partition.topic, partition.partition, WATERMARK_TIMEOUT)
            })
            .ok()?;
            // Before its first record a partition has no position: it starts at the committed
            // offset, or at the beginning for a new group.
            let position = positions
                .find_partition(&partition.topic, partition.partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|&p| p >= 0)
                .or_else(|| self.start_positions.get(&partition).copied())
                .unwrap_or(low);
            lags.push((partition, (high - position).max(0)));
        }
        Some(lags)
    }

    /// Every assigned partition read to its end, nothing dirty, nothing in flight, and no
    /// record for [`CAUGHT_UP_QUIET`] (some brokers report high watermarks below the end).
    pub(super) async fn is_caught_up(&self, source: &Source) -> bool {
        let open = self.tracker.lock().expect("offset tracker lock poisoned").open_count();
        if open > 0 || source.buffered() > 0 || self.sink.in_flight() > 0 {
            return false;
        }
        if self.store.dirty() > 0 {
            return false;
        }
        if self.last_record.elapsed() < CAUGHT_UP_QUIET {
            return false;
        }
        match self.lag(source.consumer()).await {
            Some(lags) => lags.iter().all(|(_, lag)| *lag == 0),
            None => false,
        }
    }
}

fn lag_labels(partition: &Partition) -> [(&'static str, String); 2] {
    [("topic", partition.topic.to_string()), ("partition", partition.partition.to_string())]
}

/// Bound on one watermark query.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(2);
/// Quiet time after the last record before `until_caught_up` may stop.
const CAUGHT_UP_QUIET: Duration = Duration::from_secs(2);
