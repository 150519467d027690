//! Every metric mindstream exports, named once here, and the Prometheus recorder.
//!
//! Names follow `mindstream_<thing>_<unit>`, counters end in `_total`, durations are seconds,
//! sizes bytes. Labels take bounded values only (topic, partition, kind, reason, signal) and
//! never a user id. README.md ("Metrics") lists them with their meaning.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Records read from an input topic. Labels: `topic`.
pub const RECORDS_IN: &str = "mindstream_records_in_total";
/// Events accepted into windows. Labels: `topic`, `kind`.
pub const EVENTS_ACCEPTED: &str = "mindstream_events_accepted_total";
/// Records rejected to the DLQ. Labels: `topic`, `reason`.
pub const RECORDS_REJECTED: &str = "mindstream_records_rejected_total";
/// Events of opted-out users, dropped unscored. Labels: `topic`.
pub const EVENTS_OPTED_OUT: &str = "mindstream_events_opted_out_total";
/// Signal records delivered to the signal topic.
pub const RECORDS_OUT: &str = "mindstream_signal_records_total";
/// Scores delivered, per signal. Labels: `signal`.
pub const SIGNALS_OUT: &str = "mindstream_signals_total";
/// Records not published because their user's partition was revoked meanwhile.
pub const RECORDS_DROPPED_REVOKED: &str = "mindstream_records_dropped_revoked_total";
/// Users restored from the changelog on assignment.
pub const USERS_RESTORED: &str = "mindstream_users_restored_total";
/// Input records already in a restored state (read again after a restart), not applied twice.
pub const EVENTS_ALREADY_APPLIED: &str = "mindstream_events_already_applied_total";
/// Exactly-once transactions committed.
pub const TRANSACTIONS: &str = "mindstream_transactions_total";
/// Users with state in memory.
pub const ACTIVE_USERS: &str = "mindstream_active_users";
/// Approximate bytes of user state in memory.
pub const STATE_BYTES: &str = "mindstream_state_bytes";
/// Users evicted after the idle TTL.
pub const USERS_EVICTED: &str = "mindstream_users_evicted_total";
/// Scoring requests waiting for a model worker.
pub const SCORING_QUEUE_DEPTH: &str = "mindstream_scoring_queue_depth";
/// Sequences per model call.
pub const BATCH_SEQUENCES: &str = "mindstream_batch_sequences";
/// Seconds per model call.
pub const INFERENCE_SECONDS: &str = "mindstream_inference_seconds";
/// Seconds from the newest event's broker timestamp to the delivery of its signal record.
pub const END_TO_END_SECONDS: &str = "mindstream_end_to_end_seconds";
/// Seconds from handing a record to the producer to its acknowledgement.
pub const PRODUCE_SECONDS: &str = "mindstream_produce_seconds";
/// Seconds per offset commit.
pub const COMMIT_SECONDS: &str = "mindstream_commit_seconds";
/// Offset commits that failed.
pub const COMMIT_FAILURES: &str = "mindstream_commit_failures_total";
/// Segment entries and exits delivered. Labels: `segment`, `change` (`entered`, `left`).
pub const SEGMENT_CHANGES: &str = "mindstream_segment_changes_total";
/// Users held by this instance who are in a segment. Labels: `segment`.
pub const SEGMENT_MEMBERS: &str = "mindstream_segment_members";
/// Service alerts delivered. Labels: `reason`.
pub const SERVICE_ALERTS: &str = "mindstream_service_alerts_total";
/// Service alerts not sent because one about the same user and item went out within
/// `alerts.dedup_period`. Labels: `reason`.
pub const SERVICE_ALERTS_SUPPRESSED: &str = "mindstream_service_alerts_suppressed_total";
/// Delete-user requests honoured. Labels: `topic`.
pub const USERS_DELETED: &str = "mindstream_users_deleted_total";
/// Consumer group rebalances. Labels: `kind` (`assign`, `revoke`).
pub const REBALANCES: &str = "mindstream_rebalances_total";
/// 1 while the input partitions are paused for scoring backpressure, else 0.
pub const CONSUMER_PAUSED: &str = "mindstream_consumer_paused";
/// Records behind the partition's high watermark. Labels: `topic`, `partition`.
pub const CONSUMER_LAG: &str = "mindstream_consumer_lag_records";
/// Always 1; labels describe the loaded model. Labels: `model_version`, `execution_provider`.
pub const MODEL_INFO: &str = "mindstream_model_info";
/// Always 1; labels describe the build. Labels: `version`.
pub const BUILD_INFO: &str = "mindstream_build_info";
/// 1 when `/readyz` would answer ready, else 0; taken at each scrape.
pub const READY: &str = "mindstream_ready";

/// Bucket bounds of the seconds histograms.
const SECONDS_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bucket bounds of the batch-size histogram.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the global Prometheus recorder and describes every metric.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let mut builder = PrometheusBuilder::new();
    for name in [INFERENCE_SECONDS, END_TO_END_SECONDS, PRODUCE_SECONDS, COMMIT_SECONDS] {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), &SECONDS_BUCKETS)?;
    }
    builder =
        builder.set_buckets_for_metric(Matcher::Full(BATCH_SEQUENCES.into()), &BATCH_BUCKETS)?;
    let handle = builder.install_recorder()?;
    describe();
    Ok(handle)
}

/// Puts every counter and gauge without a per-event label into the exposition at zero, and
/// the per-topic ones for each input topic, so that dashboards and alert rules see a series
/// (a `rate()` of nothing is no data, not zero) before the first event of its kind.
pub fn register_series(input_topics: &[String], segments: &[String]) {
    let counters =
        [RECORDS_OUT, USERS_EVICTED, COMMIT_FAILURES, RECORDS_DROPPED_REVOKED, USERS_RESTORED];
    for name in counters.into_iter().chain([TRANSACTIONS]) {
        metrics::counter!(name).increment(0);
    }
    for name in [ACTIVE_USERS, STATE_BYTES, SCORING_QUEUE_DEPTH, CONSUMER_PAUSED] {
        metrics::gauge!(name).set(0.0);
    }
    for kind in ["assign", "revoke"] {
        metrics::counter!(REBALANCES, "kind" => kind).increment(0);
    }
    for topic in input_topics {
        for name in [RECORDS_IN, EVENTS_OPTED_OUT, EVENTS_ALREADY_APPLIED, USERS_DELETED] {
            metrics::counter!(name, "topic" => topic.clone()).increment(0);
        }
    }
    for segment in segments {
        metrics::gauge!(SEGMENT_MEMBERS, "segment" => segment.clone()).set(0.0);
        for change in ["entered", "left"] {
            metrics::counter!(SEGMENT_CHANGES, "segment" => segment.clone(), "change" => change)
                .increment(0);
        }
    }
    for reason in ["negative_review_of_purchase", "falling_sentiment"] {
        metrics::counter!(SERVICE_ALERTS, "reason" => reason).increment(0);
        metrics::counter!(SERVICE_ALERTS_SUPPRESSED, "reason" => reason).increment(0);
    }
}

fn describe() {
    describe_counter!(RECORDS_IN, Unit::Count, "Records read from an input topic.");
    describe_counter!(EVENTS_ACCEPTED, Unit::Count, "Events accepted into windows.");
    describe_counter!(RECORDS_REJECTED, Unit::Count, "Records rejected to the dead-letter topic.");
    describe_counter!(EVENTS_OPTED_OUT, Unit::Count, "Events of opted-out users, not scored.");
    describe_counter!(USERS_DELETED, Unit::Count, "Delete-user requests honoured.");
    describe_counter!(SEGMENT_CHANGES, Unit::Count, "Segment entries and exits delivered.");
    describe_gauge!(SEGMENT_MEMBERS, Unit::Count, "Users held here who are in a segment.");
    describe_counter!(SERVICE_ALERTS, Unit::Count, "Service alerts delivered.");
    describe_counter!(
        SERVICE_ALERTS_SUPPRESSED,
        Unit::Count,
        "Service alerts not sent: one about the same user and item went out within the period."
    );
    describe_counter!(RECORDS_OUT, Unit::Count, "Signal records delivered.");
    describe_counter!(SIGNALS_OUT, Unit::Count, "Scores delivered, per signal.");
    describe_gauge!(ACTIVE_USERS, Unit::Count, "Users with state in memory.");
    describe_gauge!(STATE_BYTES, Unit::Bytes, "Approximate bytes of user state in memory.");
    describe_counter!(USERS_EVICTED, Unit::Count, "Users evicted after the idle TTL.");
    describe_gauge!(SCORING_QUEUE_DEPTH, Unit::Count, "Scoring requests waiting for a worker.");
    describe_histogram!(BATCH_SEQUENCES, Unit::Count, "Sequences per model call.");
    describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "Seconds per model call.");
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Seconds from the newest event's broker timestamp to delivery of its signal record."
    );
    describe_histogram!(PRODUCE_SECONDS, Unit::Seconds, "Seconds from send to acknowledgement.");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Seconds per offset commit.");
    describe_counter!(COMMIT_FAILURES, Unit::Count, "Offset commits that failed.");
    describe_counter!(REBALANCES, Unit::Count, "Consumer group rebalances.");
    describe_counter!(
        RECORDS_DROPPED_REVOKED,
        Unit::Count,
        "Records not published because their partition was revoked."
    );
    describe_counter!(USERS_RESTORED, Unit::Count, "Users restored from the changelog.");
    describe_counter!(
        EVENTS_ALREADY_APPLIED,
        Unit::Count,
        "Input records already in a restored state, not applied twice."
    );
    describe_counter!(TRANSACTIONS, Unit::Count, "Exactly-once transactions committed.");
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Records behind the high watermark.");
    describe_gauge!(CONSUMER_PAUSED, Unit::Count, "1 while input is paused for backpressure.");
    describe_gauge!(MODEL_INFO, Unit::Count, "The loaded model (always 1).");
    describe_gauge!(BUILD_INFO, Unit::Count, "The running build (always 1).");
    describe_gauge!(READY, Unit::Count, "1 when ready (as /readyz), else 0.");
}
