//! Ingest: events per second read, decoded and applied to windows (no inference), against a
//! raw consumer that only reads the same topic from the same broker.
//!
//! Starts a Tansu broker from `.tools/bin` on a free loopback port, writes the real Taobao slice
//! into a JSON topic of four partitions keyed by user, then reads it back to its end with fresh
//! consumer groups, alternately: the raw side polls and counts; the other is laid out as the
//! processor is (a polling thread handing records over a bounded channel) and decodes each
//! record with the processor's decoder and applies it to a real `Store` (watermarks, windows,
//! interests, coalescing bookkeeping). Each side is timed three times and the median kept.
//! The slice is written five times, each copy with its own user ids and shifted ten days (the slice spans nine)
//! later, so both sides read 551,500 records. Where the time goes is shown by timing the stages
//! of the windowed side on the same payloads in memory. `cargo bench --bench ingest`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mindstream::event::Format;
use mindstream::offsets::Partition;
use mindstream::privacy::Pseudonymizer;
use mindstream::window::store::{Store, StoreConfig};
use mindstream::window::{Lineage, StateSpec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench-clicks";
const REPEATS: usize = 3;
/// Copies of the slice written to the topic.
const COPIES: i64 = 5;
/// Event-time shift between copies.
const COPY_SHIFT_MS: i64 = 10 * 86_400_000;

fn main() {
    // `cargo test` runs bench targets without `--bench`: one copy, one round keeps it working.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (copies, repeats) = if quick { (1, 1) } else { (COPIES, REPEATS) };
    let events = taobao_events(copies);
    let broker = Broker::start();
    produce(&broker.address, &events);
    let total = events.len();

    let mut raw = Vec::new();
    let mut windowed = Vec::new();
    let (mut raw_broker_cpu, mut windowed_broker_cpu) = (0.0, 0.0);
    for round in 0..repeats {
        let before = broker.cpu_seconds();
        raw.push(read(&broker.address, total, &format!("raw-{round}"), false));
        let middle = broker.cpu_seconds();
        windowed.push(read(&broker.address, total, &format!("window-{round}"), true));
        raw_broker_cpu += middle - before;
        windowed_broker_cpu += broker.cpu_seconds() - middle;
    }
    let (raw, windowed) = (median(raw), median(windowed));
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| records | {total} (Taobao slice x {copies}, JSON, 4 partitions) |");
    println!("| raw consumer | {:.0} records/s ({:.2} s) |", rate(raw), raw.as_secs_f64());
    println!(
        "| read + decode + window | {:.0} events/s ({:.2} s) |",
        rate(windowed),
        windowed.as_secs_f64()
    );
    println!("| ratio, windowed / raw | {:.3} |", raw.as_secs_f64() / windowed.as_secs_f64());
    println!(
        "| broker CPU per read (group join included), raw / windowed | {:.2} s / {:.2} s |",
        raw_broker_cpu / repeats as f64,
        windowed_broker_cpu / repeats as f64
    );
    stages(&events);
}

/// Per-event cost of each stage of the windowed side, on the payloads in memory.
fn stages(payloads: &[Vec<u8>]) {
    let per_event = |elapsed: Duration| elapsed.as_nanos() as f64 / payloads.len() as f64;
    let started = Instant::now();
    let decoded: Vec<_> = payloads
        .iter()
        .map(|p| mindstream::source::decode(Format::Json, Some(p)).expect("decodes"))
        .collect();
    let decode = per_event(started.elapsed());
    let key = Pseudonymizer::new(b"bench-secret-0123456789").expect("key");
    let started = Instant::now();
    let keys: usize = decoded.iter().map(|e| key.key(&e.user_id).len()).sum();
    let pseudonymise = per_event(started.elapsed());
    assert!(keys > 0);
    let mut store = new_store();
    let lineage = Lineage { topic: TOPIC.into(), partition: 0, offset: 0 };
    let now = Instant::now();
    let started = Instant::now();
    for (offset, event) in decoded.into_iter().enumerate() {
        let lineage = Lineage { offset: offset as i64, ..lineage.clone() };
        let _ = store.apply(event, lineage, (), now);
    }
    let apply = per_event(started.elapsed());
    println!();
    println!("| stage, in memory | ns per event |");
    println!("|---|---|");
    println!("| JSON decode and validation | {decode:.0} |");
    println!("| pseudonymisation alone (HMAC-SHA-256 of the user id) | {pseudonymise:.0} |");
    println!("| `Store::apply` (pseudonymisation, window, interests) | {apply:.0} |");
}

fn taobao_events(copies: i64) -> Vec<Vec<u8>> {
    let candidates = [
        PathBuf::from(".tools/data/clickstream/taobao-userbehavior-slice.csv"),
        PathBuf::from("../shared/data/clickstream/taobao-userbehavior-slice.csv"),
    ];
    let Some(path) = candidates.iter().find(|p| p.exists()) else {
        panic!("the Taobao slice is missing: run scripts/sample-data.sh")
    };
    let events = mindstream::import::events(mindstream::import::Source::Taobao, path)
        .expect("import the Taobao slice");
    let mut payloads = Vec::with_capacity(events.len() * copies as usize);
    for copy in 0..copies {
        for event in &events {
            let mut event = event.clone();
            event.user_id = format!("{}#{copy}", event.user_id);
            event.event_time_ms += copy * COPY_SHIFT_MS;
            payloads.push(mindstream::event::encode(Format::Json, &event));
        }
    }
    payloads
}

fn produce(address: &str, events: &[Vec<u8>]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let admin_wait = Instant::now();
    for payload in events {
        let event = mindstream::event::decode(Format::Json, payload).expect("own encoding");
        let mut record = BaseRecord::to(TOPIC).key(event.user_id.as_str()).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    eprintln!("produced {} records in {:.1} s", events.len(), admin_wait.elapsed().as_secs_f64());
}

/// Reads the topic to `total` records with a fresh group. The raw side polls and counts. The
/// windowed side is laid out as the processor is: a thread polls and hands records over a
/// bounded channel, and another decodes each record and applies it to a store.
fn read(address: &str, total: usize, group: &str, window: bool) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    if !window {
        let mut seen = 0;
        let mut started = None;
        while seen < total {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            message.expect("record");
            // The clock starts at the first record, so the group join is not counted.
            started.get_or_insert_with(Instant::now);
            seen += 1;
        }
        return started.map_or(Duration::ZERO, |s| s.elapsed());
    }

    let (sender, records) = std::sync::mpsc::sync_channel::<OwnedMessage>(HANDOVER_CAPACITY);
    let (first_tx, first_rx) = std::sync::mpsc::channel::<Instant>();
    let poller = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < total {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            if seen == 0 {
                let _ = first_tx.send(Instant::now());
            }
            seen += 1;
            if sender.send(message.expect("record").detach()).is_err() {
                return;
            }
        }
    });
    let mut store = new_store();
    let topic: Arc<str> = TOPIC.into();
    let now = Instant::now();
    for message in records.iter() {
        let partition = Partition { topic: topic.clone(), partition: message.partition() };
        let lineage = Lineage {
            topic: partition.topic.clone(),
            partition: message.partition(),
            offset: message.offset(),
        };
        if let Ok(event) = mindstream::source::decode(Format::Json, message.payload()) {
            let _ = store.apply(event, lineage, (), now);
        }
    }
    let ended = Instant::now();
    poller.join().expect("poll thread");
    let started = first_rx.recv().expect("a first record");
    ended - started
}

/// Records between the polling thread and the windowing one (the processor's own bound).
const HANDOVER_CAPACITY: usize = 1024;

fn new_store() -> Store<()> {
    let card = mindstream::model::card::ModelCard::load(std::path::Path::new("models/model.json"))
        .expect("models/model.json (run from the repository root)");
    let config = StoreConfig {
        state: StateSpec {
            window: card.window,
            user_ttl_ms: card.user_ttl_ms,
            interest_half_life_ms: 7 * 86_400_000,
            interests_tracked: 32,
        },
        allowed_lateness_ms: 3_600_000,
        coalesce: Duration::from_millis(500),
        explain_candidates: 8,
        top_interests: 5,
        changelog: true,
        rescore_restored: true,
    };
    Store::new(config, Arc::new(Pseudonymizer::new(b"bench-secret-0123456789").expect("key")))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A Tansu broker on a free loopback port, stopped when dropped.
struct Broker {
    child: Child,
    address: String,
}

impl Broker {
    fn start() -> Broker {
        let tansu = PathBuf::from(".tools/bin/tansu");
        assert!(tansu.exists(), "{} is missing: run scripts/setup.sh", tansu.display());
        let port =
            TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {address}");
            std::thread::sleep(Duration::from_millis(20));
        }
        create_topic(&address);
        Broker { child, address }
    }
}

impl Broker {
    /// User and system CPU time the broker process has used, from `/proc`.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which ends with the last `)`: utime and stime are
        // the 12th and 13th, in clock ticks of 1/100 s.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_topic(address: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", address).create().expect("admin");
    let topic = NewTopic::new(TOPIC, 4, TopicReplication::Fixed(1));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime
        .block_on(admin.create_topics(&[topic], &AdminOptions::new()))
        .expect("create the topic");
}
