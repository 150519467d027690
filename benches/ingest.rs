//! Ingest: events per second read, decoded and applied to windows (no inference), against a
//! raw consumer that only reads the same topic from the same broker.
//!
//! Starts a Tansu broker from `.tools/bin` on a free loopback port, writes the real Taobao slice
//! into a JSON topic of four partitions keyed by user, then reads it back to its end with fresh
//! consumer groups, alternately: the raw side polls and counts; the other is laid out as the
//! processor is (a polling thread handing over the records that were ready together, up to
//! 256 at a time, over a bounded channel) and decodes each record with the processor's decoder
//! and applies it to a real `Store` (watermarks, windows, interests, coalescing bookkeeping).
//! Both sides set `fetch.queue.backoff.ms` as the processor does. Each side is timed three
//! times and the median kept. The slice is written five times, each copy with its own user ids
//! and shifted ten days later (the slice spans nine), so both sides read 551,500 records. Where the time goes is shown by timing the stages
//! of the windowed side on the same payloads in memory. `cargo bench --bench ingest`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mindstream::event::Format;
use mindstream::offsets::Partition;
use mindstream::privacy::Pseudonymizer;
use mindstream::window::Lineage;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use common::{median, Broker};
use mindstream::source::POLLED_CAPACITY;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench-clicks";
const REPEATS: usize = 3;
/// Copies of the slice written to the topic.
const COPIES: i64 = 5;
/// Event-time shift between copies.
const COPY_SHIFT_MS: i64 = 10 * 86_400_000;

fn main() {
    // Under `cargo test`, one copy and one round keep it working.
    let (copies, repeats) = if common::quick() { (1, 1) } else { (COPIES, REPEATS) };
    let events = taobao_payloads(copies);
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
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
    let mut store = common::processor_store();
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

fn taobao_payloads(copies: i64) -> Vec<Vec<u8>> {
    let events = common::taobao_events();
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
/// windowed side is laid out as the processor is: a thread polls and hands the records over a
/// bounded channel in batches of those that were ready together, and another decodes each
/// record and applies it to a store.
fn read(address: &str, total: usize, group: &str, window: bool) -> Duration {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", mindstream::source::FETCH_QUEUE_BACKOFF_MS)
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

    let batch = mindstream::source::HANDOVER_BATCH;
    let (sender, records) = std::sync::mpsc::sync_channel::<Vec<OwnedMessage>>(POLLED_CAPACITY);
    let (first_tx, first_rx) = std::sync::mpsc::channel::<Instant>();
    let poller = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < total {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            if seen == 0 {
                let _ = first_tx.send(Instant::now());
            }
            seen += 1;
            let mut polled = vec![message.expect("record").detach()];
            while polled.len() < batch && seen < total {
                let Some(message) = consumer.poll(Duration::ZERO) else { break };
                seen += 1;
                polled.push(message.expect("record").detach());
            }
            if sender.send(polled).is_err() {
                return;
            }
        }
    });
    let mut store = common::processor_store();
    let topic: Arc<str> = TOPIC.into();
    let now = Instant::now();
    for message in records.iter().flatten() {
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
