//! Partitions coming and going: taking over assigned partitions with the users restored from
//! the changelog, and letting go of revoked ones once what was handed to the producer is
//! delivered or committed.

use rdkafka::consumer::Consumer;

use crate::config::DeliveryMode;
use crate::metrics as m;
use crate::offsets::Partition;
use crate::source::{Committed, Restored, SourceConsumer};

use super::{PipelineError, Processor};

impl Processor {
    /// Takes over newly assigned partitions with their restored users.
    pub(super) fn assigned(
        &mut self,
        consumer: &SourceConsumer,
        partitions: &[Partition],
        restored: Vec<Restored>,
        committed: Vec<Committed>,
    ) {
        for position in committed {
            if let Some(watermark) = position.watermark {
                let partition = &position.partition;
                self.store.set_watermark(&partition.topic, partition.partition, watermark);
            }
            self.start_positions.insert(position.partition, position.offset);
        }
        for Restored { partition, epoch, users } in restored {
            let count = self.store.restore(partition, epoch, users);
            metrics::counter!(m::USERS_RESTORED).increment(count as u64);
            self.sink.hold_partition(partition, epoch);
            self.held.insert(partition);
        }
        // A partition keeps the paused flag it had when it was last revoked; give the new ones
        // the current backpressure state.
        let mut list = rdkafka::TopicPartitionList::new();
        for partition in partitions {
            list.add_partition(&partition.topic, partition.partition);
        }
        let result = if self.paused { consumer.pause(&list) } else { consumer.resume(&list) };
        if let Err(err) = result {
            tracing::warn!(cause = %err, "cannot set the assigned partitions' pause state");
        }
        tracing::debug!(partitions = partitions.len(), "assignment taken over");
    }

    /// Lets go of revoked partition numbers: nothing more is published for their users, what
    /// was handed to the producer is delivered (at-least-once) or committed (exactly-once),
    /// and their users are dropped. The source commits the done positions afterwards.
    pub(super) async fn revoked(
        &mut self,
        consumer: &SourceConsumer,
        numbers: &[i32],
    ) -> Result<(), PipelineError> {
        self.sink.release_partitions(numbers);
        match self.mode {
            DeliveryMode::AtLeastOnce => {
                if !self.sink.wait_partitions_idle(numbers, self.drain_timeout).await {
                    tracing::warn!(
                        partitions = ?numbers,
                        "revoked partitions still had records in flight; their offsets stay \
                         uncommitted"
                    );
                }
            }
            DeliveryMode::ExactlyOnce => self.commit_transaction(consumer).await?,
        }
        let dropped = self.store.revoke(numbers);
        for number in numbers {
            self.held.remove(number);
        }
        self.start_positions.retain(|p, _| !numbers.contains(&p.partition));
        tracing::info!(partitions = ?numbers, users = dropped, "revoked partitions let go");
        Ok(())
    }
}
