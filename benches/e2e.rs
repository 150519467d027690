//! End to end through the broker with the real processor binary: the catch-up rate from a
//! backlog, the saturation rate in real time, model work per event, and the latency from an
//! event's produce to the delivery of a signal covering it at half the saturation rate.
//!
//! Starts a Tansu broker on loopback; every run is a deployment of its own (group and topics).
//! The catch-up and the baseline share one broker; each real-time run starts a fresh one, since
//! the test broker keeps every topic in memory and slows as earlier runs fill it. Topics have
//! two partitions (`E2E_PARTITIONS` sets another number), since that broker's work per fetch
//! grows with each fetched partition's stored batches.
//! - Catch-up: the Taobao slice is written into a JSON topic first, then
//!   `mindstream run --until-caught-up` reads it while the bench scrapes `/metrics` every
//!   100 ms; the rate is the events over the time from the first record read to the last signal
//!   delivered. A backlog lets coalescing merge each user's events, so this is the most
//!   favourable rate.
//! - Python baseline: `benches/python/baseline.py` (confluent-kafka, onnxruntime, tokenizers;
//!   one model call per event, one ONNX Runtime thread, its fastest setting here: with two
//!   threads it drained the slice at 617 events/s against 691 with one) drains its own copy of
//!   the same backlog. The bench checks that
//!   it computes the processor's scores for the same windows (records matched by user key and
//!   version, within 1e-3) and compares the catch-up rates.
//! - Saturation: the slice is replayed in real time at fractions of the catch-up rate, 0.4
//!   first, then up (0.5, 0.6, 0.8, 1) while the processor keeps up, or else down (0.3, 0.25,
//!   ...) until it does; the highest rate kept up with is the saturation rate. Keeping up:
//!   every event gets a signal and none of the last tenth waited over a second, so no backlog
//!   built up. The whole slice, because the work per event grows along it as users' windows
//!   fill.
//! - Latency: the whole slice is replayed at half the saturation rate; for every input event,
//!   the latency is the timestamp of the first signal record of its user that covers it
//!   (lineage at or after the event's offset) minus the event's own timestamp: create times,
//!   stamped by each producing client when it is handed the record.
//!
//! The processor runs with WORKERS model workers (default 1), `scoring.coalesce = 50ms`
//! (`E2E_COALESCE` overrides it) and `fetch.wait.max.ms = 20`. In real time a user's events
//! come seconds apart, so the debounce merges nothing there and adds its whole length to every
//! latency; on the backlog, 50 ms still merges a user's burst. The test broker answers a fetch
//! only when its wait runs out, not when data arrives as Kafka does, so librdkafka's 500 ms
//! default would add up to half a second to every event's latency.
//! `cargo bench --bench e2e -- [WORKERS]`; `cargo bench --bench e2e -- WORKERS RATE [EVENTS]`
//! runs only one real-time replay at RATE and prints its latencies;
//! `cargo bench --bench e2e -- WORKERS catch-up` only the catch-up and the Python baseline.
//! With `E2E_TRACE=1` the single replay also prints the slowest latency of each 100 ms of
//! produce time over its first five seconds, which shows stalls the tenths average out.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Broker;
use mindstream::event::Format;
use mindstream::privacy::Pseudonymizer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// The pseudonymisation secret of the bench's processors.
const KEY: &str = "bench-secret-0123456789abcdef";
const COALESCE: &str = "50ms";
/// Partitions of each topic. The test broker lists every record batch it holds for a
/// partition on each fetch of it, so its CPU grows with partitions times the batches written
/// so far; Kafka finds a fetch offset through an index. With four partitions that cost took a
/// third of the two cores by the end of a real-time replay (docs/PERFORMANCE.md).
const PARTITIONS: i32 = 2;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let workers: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
    // Diagnostics: `e2e -- WORKERS RATE EVENTS` runs only the latency lane at RATE.
    let fixed_rate: Option<f64> = args.get(1).and_then(|a| a.parse().ok());
    let catch_up_only = args.get(1).is_some_and(|a| a == "catch-up");
    let mut events = common::taobao_events();
    if common::quick() {
        events.truncate(3_000);
    }
    if let Some(limit) = args.get(2).and_then(|a| a.parse().ok()) {
        events.truncate(limit);
    }
    let users = events.iter().map(|e| &e.user_id).collect::<std::collections::BTreeSet<_>>().len();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join("events.jsonl");
    write_events(&file, &events);
    let broker = Broker::start();

    if let Some(rate) = fixed_rate {
        let run = latency_run(&broker, dir.path(), "fixed", &file, events.len(), workers, rate);
        let latencies = run.sorted();
        println!(
            "rate {rate:.0} requested, {:.0} achieved; {} of {} covered; keeps up: {}; \
             p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms; broker CPU {:.1} s",
            run.achieved,
            latencies.len(),
            events.len(),
            run.keeps_up(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.9),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            run.broker_cpu
        );
        for (tenth, part) in run.samples.chunks(run.samples.len().div_ceil(10).max(1)).enumerate() {
            let mut part: Vec<f64> = part.iter().map(|(_, latency)| *latency).collect();
            part.sort_by(f64::total_cmp);
            println!(
                "tenth {tenth}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                percentile(&part, 0.5),
                percentile(&part, 0.99),
                percentile(&part, 1.0)
            );
        }
        if std::env::var("E2E_TRACE").is_ok() {
            let start = run.samples.first().map_or(0, |(produced, _)| *produced);
            let mut slots: BTreeMap<i64, (usize, f64)> = BTreeMap::new();
            for (produced, latency) in &run.samples {
                let slot = slots.entry((produced - start) / 100).or_default();
                slot.0 += 1;
                slot.1 = slot.1.max(*latency);
            }
            for (slot, (count, slowest)) in slots.iter().take(50) {
                println!("from {} ms: {count} events, slowest {slowest:.0} ms", slot * 100);
            }
        }
        return;
    }

    // Catch-up: the whole slice waiting in the topic.
    let lane = Lane::new(&broker, dir.path(), "catchup", workers);
    lane.replay(&file, 0.0);
    let mut processor = lane.start(true);
    let run = watch(&lane, &mut processor, events.len());
    let seconds = (run.last_signal - run.first_record).as_secs_f64();
    let catch_up = events.len() as f64 / seconds;

    // The Python baseline on its own copy of the same backlog, and whether it computes the
    // processor's scores for the same windows.
    let baseline = python_baseline(&broker, dir.path(), &file, events.len(), BASELINE_THREADS);
    let (compared, max_diff) = agreement(&broker, &lane, &baseline.dump);
    assert!(compared > 0, "no processor record had a baseline scoring to compare with");
    assert!(max_diff < 1e-3, "the baseline's scores differ from the processor's by {max_diff}");
    if catch_up_only {
        print_catch_up((events.len(), users), workers, &run, &baseline, (compared, max_diff));
        return;
    }

    // Saturation: the highest of the trial rates, as fractions of the catch-up rate, that the
    // processor keeps up with when the events arrive in real time. The first trial decides the
    // direction: up while trials keep up, else down until one does.
    let mut trials = Vec::new();
    // Each real-time run gets a broker of its own: the test broker keeps every topic in
    // memory, and its CPU per request grows with what earlier lanes left in it (a shared
    // broker made the later trials fall behind at rates a fresh one sustains).
    drop(broker);
    let mut trial = |fraction: f64| {
        let rate = catch_up * fraction;
        let name = format!("trial{}", trials.len());
        let broker = Broker::start();
        let trial = latency_run(&broker, dir.path(), &name, &file, events.len(), workers, rate);
        let kept_up = trial.keeps_up();
        trials.push((rate, trial.achieved, trial.tail_max(), kept_up));
        kept_up.then_some(trial.achieved)
    };
    let saturation = if common::quick() {
        trial(0.2)
    } else if let Some(mut highest) = trial(FIRST_TRIAL) {
        for fraction in TRIALS_UP {
            let Some(achieved) = trial(fraction) else { break };
            highest = achieved;
        }
        Some(highest)
    } else {
        TRIALS_DOWN.into_iter().find_map(&mut trial)
    };
    let saturation = saturation.expect("the processor keeps up with one of the trial rates");

    // Latency at half the saturation rate, the whole slice.
    let broker = Broker::start();
    let latency =
        latency_run(&broker, dir.path(), "latency", &file, events.len(), workers, saturation / 2.0);
    let latencies = latency.sorted();

    print_catch_up((events.len(), users), workers, &run, &baseline, (compared, max_diff));
    for (rate, achieved, tail, kept_up) in &trials {
        println!(
            "| trial at {rate:.0} events/s ({achieved:.0} achieved) | \
             slowest of the last tenth {tail:.0} ms: {} |",
            if *kept_up { "keeps up" } else { "falls behind" }
        );
    }
    println!("| saturation rate (real time) | {saturation:.0} events/s |");
    println!(
        "| replay at half the saturation rate | {:.0} events/s requested, {:.0} achieved |",
        saturation / 2.0,
        latency.achieved
    );
    println!(
        "| signal records (scorings) per event, real time | {:.3} |",
        latency.records as f64 / events.len() as f64
    );
    println!("| events with a covering signal | {} of {} |", latencies.len(), events.len());
    println!("| latency p50 | {:.0} ms |", percentile(&latencies, 0.50));
    println!("| latency p99 | {:.0} ms |", percentile(&latencies, 0.99));
    println!("| latency max | {:.0} ms |", percentile(&latencies, 1.0));
    println!("| broker CPU during the replay | {:.1} s |", latency.broker_cpu);
}

/// The table's rows of the catch-up run and the Python baseline. The users are counted in the
/// events: the processor's user gauge is sampled and lags the end of a short run.
fn print_catch_up(
    (events, users): (usize, usize),
    workers: usize,
    run: &Run,
    baseline: &Baseline,
    (compared, max_diff): (usize, f64),
) {
    let seconds = (run.last_signal - run.first_record).as_secs_f64();
    let catch_up = events as f64 / seconds;
    println!("| measure | value |");
    println!("|---|---|");
    println!("| events | {} (Taobao slice, JSON, {} partitions) |", events, partitions());
    println!("| model workers | {workers} |");
    println!("| users | {users} |");
    println!(
        "| catch-up rate (backlog) | {catch_up:.0} events/s ({seconds:.1} s, first record to \
         last signal) |"
    );
    println!(
        "| signal records (scorings) per event, catch-up | {:.3} ({} records; one per user \
         would be {:.3}) |",
        run.records as f64 / events as f64,
        run.records,
        users as f64 / events as f64
    );
    println!(
        "| model calls per event, catch-up | {:.3} ({} calls) |",
        run.model_calls as f64 / events as f64,
        run.model_calls
    );
    println!(
        "| Python baseline, catch-up rate (backlog) | {:.0} events/s ({:.1} s) |",
        baseline.rate,
        events as f64 / baseline.rate
    );
    println!("| catch-up rate, processor / Python baseline | {:.2} |", catch_up / baseline.rate);
    println!(
        "| baseline scores against the processor's, same windows | {compared} records, \
         largest difference {max_diff:.1e} |"
    );
}

/// ONNX Runtime threads of the Python baseline: one is its fastest setting on two cores, since
/// its per-event batches are too small to split.
const BASELINE_THREADS: usize = 1;

/// The first trial rate, as a fraction of the catch-up rate.
const FIRST_TRIAL: f64 = 0.4;
/// Trial rates tried in turn while they keep up, after a first trial that did.
const TRIALS_UP: [f64; 4] = [0.5, 0.6, 0.8, 1.0];
/// Trial rates tried in turn until one keeps up, after a first trial that fell behind.
const TRIALS_DOWN: [f64; 5] = [0.3, 0.25, 0.2, 0.15, 0.1];
/// A trial keeps up when every event got a signal and none of the last tenth of its events
/// waited longer than this.
const KEEPS_UP_MS: f64 = 1_000.0;

/// A real-time run of `events` events: the achieved replay rate, and per input event covered
/// by a signal its produce time and its latency in milliseconds, in produce order.
struct LatencyRun {
    events: usize,
    achieved: f64,
    samples: Vec<(i64, f64)>,
    records: usize,
    /// CPU seconds the broker used from the replay's start until the signals stopped.
    broker_cpu: f64,
}

impl LatencyRun {
    fn sorted(&self) -> Vec<f64> {
        let mut out: Vec<f64> = self.samples.iter().map(|(_, latency)| *latency).collect();
        out.sort_by(f64::total_cmp);
        out
    }

    /// The slowest latency among the last tenth of the events produced.
    fn tail_max(&self) -> f64 {
        let tail = self.samples.len() - self.samples.len() / 10;
        self.samples[tail.min(self.samples.len().saturating_sub(1))..]
            .iter()
            .map(|(_, latency)| *latency)
            .fold(0.0, f64::max)
    }

    /// Whether the processor kept up: no backlog built up by the end of the replay.
    fn keeps_up(&self) -> bool {
        self.samples.len() == self.events && self.tail_max() <= KEEPS_UP_MS
    }
}

/// The Python baseline's rate over a backlog, and its whole-window scores by (user key,
/// version).
struct Baseline {
    rate: f64,
    dump: BTreeMap<(String, u64), BTreeMap<String, f64>>,
}

/// Writes the events into a topic of their own, then runs `benches/python/baseline.py` over it
/// to its end.
fn python_baseline(
    broker: &Broker,
    dir: &Path,
    file: &Path,
    events: usize,
    threads: usize,
) -> Baseline {
    let lane = Lane::new(broker, dir, "python", 1);
    lane.replay(file, 0.0);
    let python = PathBuf::from(".tools/venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh", python.display());
    let dump = dir.join("baseline-dump.jsonl");
    let output = Command::new(python)
        .arg("benches/python/baseline.py")
        .args(["--brokers", &broker.address, "--topic", &lane.input])
        .args(["--signals-topic", &lane.signals, "--group", "python-baseline"])
        .args(["--model-dir", "models", "--events", &events.to_string()])
        .args(["--threads", &threads.to_string()])
        .arg("--dump")
        .arg(&dump)
        .env("MINDSTREAM_PSEUDONYM_KEY", KEY)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the Python baseline");
    assert!(output.status.success(), "the Python baseline failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().expect("the baseline's summary line");
    let summary: serde_json::Value = serde_json::from_str(last).expect("a JSON summary");
    let rate = summary["events_per_s"].as_f64().expect("events_per_s");
    let mut scores = BTreeMap::new();
    for line in std::fs::read_to_string(&dump).expect("the baseline's dump").lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("a dump line");
        let key = (
            row["user_key"].as_str().expect("user_key").to_owned(),
            row["version"].as_u64().expect("version"),
        );
        let values = row["scores"]
            .as_object()
            .expect("scores")
            .iter()
            .map(|(name, value)| (name.clone(), value.as_f64().expect("a score")))
            .collect();
        scores.insert(key, values);
    }
    Baseline { rate, dump: scores }
}

/// Compares every score of the lane's signal records with the baseline's score for the same
/// user, version and signal; returns the records compared and the largest difference.
fn agreement(
    broker: &Broker,
    lane: &Lane,
    dump: &BTreeMap<(String, u64), BTreeMap<String, f64>>,
) -> (usize, f64) {
    let (mut compared, mut largest) = (0, 0f64);
    for record in read_topic(&broker.address, &lane.signals) {
        let signal =
            mindstream::signals::decode(Format::Json, &record.payload).expect("signal decodes");
        let Some(expected) = dump.get(&(signal.user_key, signal.version)) else { continue };
        compared += 1;
        for score in &signal.scores {
            if let Some(value) = expected.get(&score.signal) {
                largest = largest.max((f64::from(score.value) - value).abs());
            }
        }
    }
    (compared, largest)
}

/// A deployment of its own (`name`), started and ready, then the `events` events of `file`
/// replayed into it at `rate` per second.
fn latency_run(
    broker: &Broker,
    dir: &Path,
    name: &str,
    file: &Path,
    events: usize,
    workers: usize,
    rate: f64,
) -> LatencyRun {
    let lane = Lane::new(broker, dir, name, workers);
    let mut processor = lane.start(false);
    lane.wait_ready(&mut processor);
    let started = Instant::now();
    let cpu = broker.cpu_seconds();
    lane.replay(file, rate);
    let achieved = events as f64 / started.elapsed().as_secs_f64();
    lane.wait_quiet(events);
    let broker_cpu = broker.cpu_seconds() - cpu;
    processor.terminate();
    let (mut samples, records) = latencies(broker, &lane);
    samples.sort_by_key(|(produced, _)| *produced);
    LatencyRun { events, achieved, samples, records, broker_cpu }
}

/// Partitions of every topic of a deployment: [`PARTITIONS`], or `E2E_PARTITIONS`.
fn partitions() -> i32 {
    std::env::var("E2E_PARTITIONS").ok().and_then(|p| p.parse().ok()).unwrap_or(PARTITIONS)
}

fn write_events(path: &Path, events: &[mindstream::event::Event]) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for event in events {
        out.write_all(&mindstream::event::encode(Format::Json, event)).expect("write");
        out.write_all(b"\n").expect("write");
    }
    out.flush().expect("flush");
}

/// One deployment: its configuration, group and topics.
struct Lane {
    config: PathBuf,
    /// The processes' standard error, for when something fails.
    log: PathBuf,
    input: String,
    signals: String,
    http: String,
}

impl Lane {
    fn new(broker: &Broker, dir: &Path, name: &str, workers: usize) -> Lane {
        let port = common::free_port();
        let (input, signals) = (format!("{name}-clicks"), format!("{name}-signals"));
        let coalesce = std::env::var("E2E_COALESCE").unwrap_or_else(|_| COALESCE.to_owned());
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{name}\"\n\
             [kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\"fetch.wait.max.ms\" = \"20\"\n\
             [shutdown]\ndrain_timeout = \"5s\"\n\
             [[inputs]]\ntopic = \"{input}\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"{signals}\"\nformat = \"json\"\ndlq_topic = \"{name}-dlq\"\n\
             [state]\nchangelog_topic = \"{name}-state\"\n\
             [scoring]\ncoalesce = \"{coalesce}\"\nworkers = {workers}\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\nfilter = \"warn\"\n",
            broker.address
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).expect("write the configuration");
        let log = dir.join(format!("{name}.log"));
        let lane = Lane { config, log, input, signals, http: format!("127.0.0.1:{port}") };
        let status = lane
            .command()
            .args(["topics", "--partitions", &partitions().to_string()])
            .status()
            .expect("topics");
        assert!(status.success(), "mindstream topics failed");
        lane
    }

    fn command(&self) -> Command {
        common::mindstream(&self.config, &self.log, KEY)
    }

    fn replay(&self, file: &Path, rate: f64) {
        let status = self
            .command()
            .args(["replay", "--input"])
            .arg(file)
            .args(["--topic", &self.input, "--format", "json", "--rate", &rate.to_string()])
            .status()
            .expect("replay");
        assert!(status.success(), "replay failed");
    }

    fn start(&self, until_caught_up: bool) -> Processor {
        let mut command = self.command();
        command.arg("run");
        if until_caught_up {
            command.arg("--until-caught-up");
        }
        Processor(command.spawn().expect("start the processor"))
    }

    fn scrape(&self) -> Option<Metrics> {
        let body = common::http_get(&self.http, "/metrics")?;
        Some(Metrics::parse(&body))
    }

    fn wait_ready(&self, processor: &mut Processor) {
        common::wait_ready(&self.http, &mut processor.0);
    }

    /// Waits until every event was read and no signal came for two seconds.
    fn wait_quiet(&self, events: usize) {
        let (mut last, mut changed) = (0.0, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            assert!(Instant::now() < deadline, "the latency run did not finish");
            if let Some(m) = self.scrape() {
                if m.sum("mindstream_signal_records_total") != last {
                    last = m.sum("mindstream_signal_records_total");
                    changed = Instant::now();
                }
                let read = m.sum("mindstream_records_in_total") as usize;
                if read >= events && changed.elapsed() > Duration::from_secs(2) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Processor(Child);

impl Processor {
    fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Run {
    first_record: Instant,
    last_signal: Instant,
    records: u64,
    model_calls: u64,
}

/// Scrapes a run to the end: when the first record was read, when the last signal record was
/// delivered, and the final counts.
fn watch(lane: &Lane, processor: &mut Processor, events: usize) -> Run {
    let mut first_record = None;
    let (mut last_signal, mut records, mut last) = (Instant::now(), 0.0, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while processor.0.try_wait().expect("status").is_none() {
        assert!(Instant::now() < deadline, "the saturation run did not finish");
        if let Some(m) = lane.scrape() {
            if first_record.is_none() && m.sum("mindstream_records_in_total") > 0.0 {
                first_record = Some(Instant::now());
            }
            let delivered = m.sum("mindstream_signal_records_total");
            if delivered > records {
                records = delivered;
                last_signal = Instant::now();
            }
            last = Some(m);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(m) = last else {
        let log = std::fs::read_to_string(&lane.log).unwrap_or_default();
        panic!("the processor exited before its metrics could be read:\n{log}");
    };
    assert!(m.sum("mindstream_records_in_total") as usize >= events, "every event read");
    Run {
        first_record: first_record.expect("a record was read"),
        last_signal,
        records: records as u64,
        model_calls: m.sum("mindstream_batch_sequences_count") as u64,
    }
}

/// Prometheus text, summed over label sets.
struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    fn parse(body: &str) -> Metrics {
        let mut sums = BTreeMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let name = series.split('{').next().unwrap_or(series);
            if let Ok(value) = value.parse::<f64>() {
                *sums.entry(name.to_owned()).or_insert(0.0) += value;
            }
        }
        Metrics(sums)
    }

    fn sum(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

/// One record read back: partition, offset, payload, timestamp.
struct Record {
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
    timestamp_ms: i64,
}

/// Every record of `topic`, read until nothing has come for two seconds.
fn read_topic(broker: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("bench-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions() {
        list.add_partition_offset(topic, partition, Offset::Beginning).expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.expect("record");
        last = Instant::now();
        out.push(Record {
            partition: message.partition(),
            offset: message.offset(),
            payload: message.payload().unwrap_or_default().to_vec(),
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
        });
    }
    out
}

/// Per input event, its produce time and the milliseconds from then to the first signal
/// covering it; and the number of signal records.
fn latencies(broker: &Broker, lane: &Lane) -> (Vec<(i64, f64)>, usize) {
    let key = Pseudonymizer::new(KEY.as_bytes()).expect("key");
    let mut signals: BTreeMap<String, Vec<(i64, i32, i64)>> = BTreeMap::new();
    let mut records = 0;
    for record in read_topic(&broker.address, &lane.signals) {
        let signal =
            mindstream::signals::decode(Format::Json, &record.payload).expect("signal decodes");
        records += 1;
        signals.entry(signal.user_key).or_default().push((
            record.timestamp_ms,
            signal.lineage.partition,
            signal.lineage.offset,
        ));
    }
    for list in signals.values_mut() {
        list.sort_unstable();
    }
    let mut out = Vec::new();
    for record in read_topic(&broker.address, &lane.input) {
        let event = mindstream::event::decode(Format::Json, &record.payload).expect("event");
        let Some(list) = signals.get(&key.key(&event.user_id)) else { continue };
        let covering = list.iter().find(|(_, partition, offset)| {
            *partition == record.partition && *offset >= record.offset
        });
        if let Some((delivered, _, _)) = covering {
            out.push((record.timestamp_ms, (delivered - record.timestamp_ms) as f64));
        }
    }
    (out, records)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
