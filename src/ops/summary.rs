//! `mindstream summary`: reads a signal topic from the beginning to its end, keeps each user's
//! latest record (highest version), and prints what a marketer would ask first: how many
//! users, how each signal is distributed, and a few users with the events behind their
//! scores; then the segment sizes and the service alerts, from their topics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::actions::alerts;
use crate::actions::segments::{self, Change, SegmentChange};
use crate::event::Format;
use crate::signals::{self, SignalRecord};

#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("cannot read topic {topic}")]
    Kafka {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("did not reach the end of {topic} within {timeout:?}")]
    Timeout { topic: String, timeout: Duration },
}

/// What the topic held.
#[derive(Debug, Default)]
pub struct ReadBack {
    pub records: usize,
    /// Records that did not decode with the schema.
    pub undecodable: usize,
    /// Records whose version was not above the user's previous one.
    pub not_newer: usize,
    pub latest: BTreeMap<String, SignalRecord>,
}

/// How long a read waits for more records after reaching the high watermarks. Some brokers
/// (Tansu among them) report a partition's high watermark as the base offset of its last
/// batch plus one, so the records of that last batch are still to come.
pub const QUIET: Duration = Duration::from_millis(1500);

/// Reads `topic` from the beginning until the high watermarks seen at the start are reached
/// and no record has come for [`QUIET`], keeping each user's latest signal record.
pub fn read_latest(
    client: &ClientConfig,
    topic: &str,
    format: Format,
    timeout: Duration,
) -> Result<ReadBack, SummaryError> {
    let mut back = ReadBack::default();
    read_topic(client, topic, timeout, |_, payload| {
        back.records += 1;
        let Some(payload) = payload else { return };
        match signals::decode(format, payload) {
            Ok(record) => back.keep(record),
            Err(_) => back.undecodable += 1,
        }
    })?;
    Ok(back)
}

/// Reads `topic` from the beginning to its end (as [`read_latest`] does), handing each
/// record's key and value to `each`.
fn read_topic(
    client: &ClientConfig,
    topic: &str,
    timeout: Duration,
    mut each: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> Result<(), SummaryError> {
    let kafka = |source| SummaryError::Kafka { topic: topic.into(), source };
    let mut client = client.clone();
    let group = format!("mindstream-summary-{}", std::process::id());
    client.set("group.id", &group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().map_err(kafka)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .ok_or_else(|| SummaryError::NoTopic(topic.into()))?;

    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        let (low, high) =
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).map_err(kafka)?;
        if high > low {
            ends.insert(partition, high);
            list.add_partition_offset(topic, partition, Offset::Beginning).map_err(kafka)?;
        }
    }
    consumer.assign(&list).map_err(kafka)?;

    let deadline = Instant::now() + timeout;
    let mut last_record = Instant::now();
    while !ends.is_empty() || last_record.elapsed() < QUIET {
        if Instant::now() > deadline {
            return Err(SummaryError::Timeout { topic: topic.into(), timeout });
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.map_err(kafka)?;
        last_record = Instant::now();
        if ends.get(&message.partition()).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&message.partition());
        }
        each(message.key(), message.payload());
    }
    Ok(())
}

/// What the segments and alerts topics held.
#[derive(Debug, Default)]
pub struct ActionsBack {
    /// Per segment: entries, exits, and users whose latest record is an entry.
    pub segments: BTreeMap<String, SegmentCounts>,
    /// Alerts per reason.
    pub alerts: BTreeMap<&'static str, usize>,
    /// Alerts about distinct (user, item) pairs.
    pub alerted_pairs: usize,
    pub undecodable: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentCounts {
    pub entered: usize,
    pub left: usize,
    pub members: usize,
}

/// Reads the segments topic (when `segments_topic` is given) and the alerts topic (when
/// `alerts_topic` is given) to their ends.
pub fn read_actions(
    client: &ClientConfig,
    segments_topic: Option<&str>,
    alerts_topic: Option<&str>,
    format: Format,
    timeout: Duration,
) -> Result<ActionsBack, SummaryError> {
    let mut back = ActionsBack::default();
    if let Some(topic) = segments_topic {
        // The latest change per key, kept by version as a consumer would.
        let mut latest: BTreeMap<Vec<u8>, Option<SegmentChange>> = BTreeMap::new();
        read_topic(client, topic, timeout, |key, payload| {
            let key = key.unwrap_or_default().to_vec();
            let Some(payload) = payload else {
                latest.insert(key, None);
                return;
            };
            let Ok(change) = segments::decode(format, payload) else {
                back.undecodable += 1;
                return;
            };
            let counts = back.segments.entry(change.segment.clone()).or_default();
            match change.change {
                Change::Entered => counts.entered += 1,
                Change::Left => counts.left += 1,
            }
            let newer = match latest.get(&key) {
                Some(Some(previous)) => change.version > previous.version,
                _ => true,
            };
            if newer {
                latest.insert(key, Some(change));
            }
        })?;
        for change in latest.into_values().flatten() {
            if change.change == Change::Entered {
                back.segments.entry(change.segment).or_default().members += 1;
            }
        }
    }
    if let Some(topic) = alerts_topic {
        let mut pairs = std::collections::BTreeSet::new();
        read_topic(client, topic, timeout, |_, payload| {
            let Some(payload) = payload else { return };
            match alerts::decode(format, payload) {
                Ok(alert) => {
                    *back.alerts.entry(alert.reason.as_str()).or_default() += 1;
                    pairs.insert((alert.user_key, alert.item_id));
                }
                Err(_) => back.undecodable += 1,
            }
        })?;
        back.alerted_pairs = pairs.len();
    }
    Ok(back)
}

/// The printed summary of the segments and alerts topics.
pub fn render_actions(back: &ActionsBack) -> String {
    let mut out = String::new();
    if !back.segments.is_empty() {
        let _ = writeln!(out, "segments (from the segments topic)");
        let _ =
            writeln!(out, "  {:<24} {:>8} {:>8} {:>8}", "segment", "members", "entered", "left");
        for (segment, counts) in &back.segments {
            let SegmentCounts { entered, left, members } = counts;
            let _ = writeln!(out, "  {segment:<24} {members:>8} {entered:>8} {left:>8}");
        }
        out.push('\n');
    }
    let total: usize = back.alerts.values().sum();
    let _ = writeln!(out, "service alerts: {total} about {} user-item pairs", back.alerted_pairs);
    for (reason, count) in &back.alerts {
        let _ = writeln!(out, "  {reason:<30} {count}");
    }
    if back.undecodable > 0 {
        let _ = writeln!(out, "  undecodable records: {}", back.undecodable);
    }
    out
}

impl ReadBack {
    fn keep(&mut self, record: SignalRecord) {
        match self.latest.get(&record.user_key) {
            Some(previous) if previous.version >= record.version => self.not_newer += 1,
            _ => {
                self.latest.insert(record.user_key.clone(), record);
            }
        }
    }
}

/// The printed summary.
pub fn render(back: &ReadBack, topic: &str, format: Format, examples: usize) -> String {
    let mut out = String::new();
    let latest: Vec<&SignalRecord> = back.latest.values().collect();
    let _ = writeln!(out, "signal topic {topic} ({}, schema proto/signals.proto)", format.as_str());
    let _ = writeln!(out, "  records read        {}", back.records);
    let _ = writeln!(out, "  undecodable         {}", back.undecodable);
    let _ = writeln!(out, "  users scored        {}", latest.len());
    let _ = writeln!(out, "  superseded records  {}", back.not_newer);
    if let Some((span_s, rate)) = throughput(&latest, back.records) {
        let _ = writeln!(out, "  produced over       {span_s:.1} s ({rate:.0} records/s)");
    }
    let models: BTreeMap<&str, usize> = latest.iter().fold(BTreeMap::new(), |mut acc, r| {
        *acc.entry(r.model_version.as_str()).or_default() += 1;
        acc
    });
    for (model, users) in models {
        let _ = writeln!(out, "  model               {model} ({users} users)");
    }
    out.push('\n');
    distributions(&mut out, &latest);
    interests(&mut out, &latest);
    example_users(&mut out, &latest, examples);
    out
}

fn throughput(latest: &[&SignalRecord], records: usize) -> Option<(f64, f64)> {
    let first = latest.iter().map(|r| r.produced_at_ms).min()?;
    let last = latest.iter().map(|r| r.produced_at_ms).max()?;
    let span = (last - first) as f64 / 1000.0;
    (span > 0.0).then(|| (span, records as f64 / span))
}

fn distributions(out: &mut String, latest: &[&SignalRecord]) {
    let mut by_signal: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for record in latest {
        for score in &record.scores {
            by_signal.entry(&score.signal).or_default().push(score.value);
        }
    }
    let _ = writeln!(out, "signals (latest record per user)");
    let _ = writeln!(
        out,
        "  {:<18} {:>7} {:>6} {:>6} {:>6} {:>6}  histogram 0..1",
        "signal", "users", "mean", "p10", "p50", "p90"
    );
    for (signal, mut values) in by_signal {
        values.sort_by(f32::total_cmp);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let q = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
        let _ = writeln!(
            out,
            "  {signal:<18} {:>7} {mean:>6.3} {:>6.3} {:>6.3} {:>6.3}  {}",
            values.len(),
            q(0.1),
            q(0.5),
            q(0.9),
            sparkline(&values)
        );
    }
    out.push('\n');
}

/// Ten bins over [0, 1], drawn with block characters scaled to the fullest bin.
fn sparkline(values: &[f32]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let mut bins = [0usize; 10];
    for v in values {
        bins[((v.clamp(0.0, 1.0) * 10.0) as usize).min(9)] += 1;
    }
    let top = bins.iter().copied().max().unwrap_or(0).max(1);
    bins.iter().map(|&n| if n == 0 { ' ' } else { BARS[(n * 7).div_ceil(top).min(7)] }).collect()
}

fn interests(out: &mut String, latest: &[&SignalRecord]) {
    let mut mass: BTreeMap<&str, f32> = BTreeMap::new();
    for record in latest {
        for interest in &record.interests {
            *mass.entry(&interest.category_id).or_default() += interest.weight;
        }
    }
    let mut ranked: Vec<(&str, f32)> = mass.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> =
        ranked.iter().take(8).map(|(c, w)| format!("{c} ({:.1} users)", w)).collect();
    let _ = writeln!(out, "top interest categories: {}\n", top.join(", "));
}

fn example_users(out: &mut String, latest: &[&SignalRecord], examples: usize) {
    let _ = writeln!(out, "example users (highest purchase intent, then lowest sentiment)");
    let mut chosen: Vec<&SignalRecord> = Vec::new();
    let mut by = |signal: &str, descending: bool| {
        let mut candidates: Vec<&SignalRecord> =
            latest.iter().copied().filter(|r| r.score(signal).is_some()).collect();
        candidates.sort_by(|a, b| {
            let (x, y) = (a.score(signal).map(|s| s.value), b.score(signal).map(|s| s.value));
            let order = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
            if descending {
                order.reverse()
            } else {
                order
            }
        });
        for record in candidates.into_iter().take(examples.div_ceil(2)) {
            if !chosen.iter().any(|c| c.user_key == record.user_key) {
                chosen.push(record);
            }
        }
    };
    by("purchase_intent", true);
    by("sentiment", false);
    for record in chosen {
        let _ = writeln!(
            out,
            "  user {}…  version {}  {} events  lineage {}[{}]@{}",
            &record.user_key[..12.min(record.user_key.len())],
            record.version,
            record.event_count,
            record.lineage.topic,
            record.lineage.partition,
            record.lineage.offset
        );
        for score in &record.scores {
            let drivers: Vec<String> = score
                .top_events
                .iter()
                .map(|c| format!("{} ({:+.3})", c.summary, c.delta))
                .collect();
            let _ = writeln!(
                out,
                "    {:<18} {:.3}  top events: {}",
                score.signal,
                score.value,
                if drivers.is_empty() { "-".to_owned() } else { drivers.join(", ") }
            );
        }
    }
}
