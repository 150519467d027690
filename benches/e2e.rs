//! End to end through the broker with the real processor binary: events per second at
//! saturation, model work per event, and the latency from an event's produce to the delivery
//! of a signal covering it at half the saturation rate.
//!
//! Starts a Tansu broker on loopback. Saturation: the Taobao slice is written into a JSON topic
//! of four partitions first, then `mindstream run --until-caught-up` reads it while the bench
//! scrapes `/metrics` every 100 ms; the rate is the events over the time from the first record
//! read to the last signal delivered. Latency: a second deployment (its own group and topics) is
//! started and ready first, then the slice is replayed into its input at half the measured rate;
//! for every input event, the latency is the broker timestamp of the first signal record of its
//! user that covers it (lineage at or after the event's offset) minus the event's own broker
//! timestamp. The processor runs with `scoring.coalesce = 100ms` and WORKERS model workers
//! (default 1). `cargo bench --bench e2e -- [WORKERS]`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
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
const COALESCE: &str = "100ms";

fn main() {
    let workers: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let mut events = common::taobao_events();
    if common::quick() {
        events.truncate(3_000);
    }
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join("events.jsonl");
    write_events(&file, &events);
    let broker = Broker::start();

    // Saturation.
    let lane = Lane::new(&broker, dir.path(), "saturation", workers);
    lane.replay(&file, 0.0);
    let mut processor = lane.start(true);
    let run = watch(&lane, &mut processor, events.len());
    let seconds = (run.last_signal - run.first_record).as_secs_f64();
    let rate = events.len() as f64 / seconds;

    // Latency at half that rate.
    let lane_b = Lane::new(&broker, dir.path(), "latency", workers);
    let mut processor_b = lane_b.start(false);
    lane_b.wait_ready(&mut processor_b);
    let started = Instant::now();
    lane_b.replay(&file, rate / 2.0);
    let replay_seconds = started.elapsed().as_secs_f64();
    lane_b.wait_quiet(events.len());
    processor_b.terminate();
    let latencies = latencies(&broker, &lane_b);

    println!("| measure | value |");
    println!("|---|---|");
    println!("| events | {} (Taobao slice, JSON, 4 partitions) |", events.len());
    println!("| model workers | {workers} |");
    println!("| users | {} |", run.users);
    println!(
        "| saturation rate | {rate:.0} events/s ({seconds:.1} s, first record to last signal) |"
    );
    println!(
        "| signal records (scorings) per event | {:.3} ({} records; one per user would be {:.3}) |",
        run.records as f64 / events.len() as f64,
        run.records,
        run.users as f64 / events.len() as f64
    );
    println!(
        "| model calls per event | {:.3} ({} calls) |",
        run.model_calls as f64 / events.len() as f64,
        run.model_calls
    );
    println!(
        "| replay at half rate | {:.0} events/s requested, {:.0} achieved |",
        rate / 2.0,
        events.len() as f64 / replay_seconds
    );
    println!("| events with a covering signal | {} of {} |", latencies.len(), events.len());
    println!("| latency p50 | {:.0} ms |", percentile(&latencies, 0.50));
    println!("| latency p99 | {:.0} ms |", percentile(&latencies, 0.99));
    println!("| latency max | {:.0} ms |", percentile(&latencies, 1.0));
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
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{name}\"\n\
             [kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
             [shutdown]\ndrain_timeout = \"5s\"\n\
             [[inputs]]\ntopic = \"{input}\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"{signals}\"\nformat = \"json\"\ndlq_topic = \"{name}-dlq\"\n\
             [state]\nchangelog_topic = \"{name}-state\"\n\
             [scoring]\ncoalesce = \"{COALESCE}\"\nworkers = {workers}\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\nfilter = \"warn\"\n",
            broker.address
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).expect("write the configuration");
        let log = dir.join(format!("{name}.log"));
        let lane = Lane { config, log, input, signals, http: format!("127.0.0.1:{port}") };
        let status = lane.command().args(["topics", "--partitions", "4"]).status().expect("topics");
        assert!(status.success(), "mindstream topics failed");
        lane
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mindstream"));
        command.arg("--config").arg(&self.config).env("MINDSTREAM_PSEUDONYM_KEY", KEY);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the lane's log");
        command.stdout(Stdio::null()).stderr(log);
        command
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
        let body = http_get(&self.http, "/metrics")?;
        Some(Metrics::parse(&body))
    }

    fn wait_ready(&self, processor: &mut Processor) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(&self.http, "/readyz").is_none_or(|b| !b.starts_with("ready")) {
            assert!(processor.0.try_wait().expect("status").is_none(), "the processor exited");
            assert!(Instant::now() < deadline, "the processor did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
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
    users: u64,
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
        users: m.sum("mindstream_active_users") as u64,
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

fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.split_whitespace().nth(1).is_some_and(|code| code == "200").then(|| body.to_owned())
}

/// One record read back: partition, offset, payload, broker timestamp.
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
    for partition in 0..4 {
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

/// Per input event, milliseconds from its produce to the first signal covering it.
fn latencies(broker: &Broker, lane: &Lane) -> Vec<f64> {
    let key = Pseudonymizer::new(KEY.as_bytes()).expect("key");
    let mut signals: BTreeMap<String, Vec<(i64, i32, i64)>> = BTreeMap::new();
    for record in read_topic(&broker.address, &lane.signals) {
        let signal =
            mindstream::signals::decode(Format::Json, &record.payload).expect("signal decodes");
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
            out.push((delivered - record.timestamp_ms) as f64);
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
