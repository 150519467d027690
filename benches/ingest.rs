//! Ingest: events per second read, decoded and applied to windows (no inference), against a
//! raw consumer that only reads the same topic from the same broker.
//!
//! Starts a Tansu broker from `.tools/bin` on a free loopback port, writes the real Taobao
//! slice into a JSON topic of four partitions keyed by user, then reads it back to its end with
//! fresh consumer groups, alternately. The raw side polls the rust client's consumer and
//! counts. The windowed side is laid out as the processor is: a polling thread reads the
//! records from the record queue its partitions are routed to ([`Routing`]), up to 256 per
//! read, admits each with the processor's checks (input limits, decoding, validation) as it
//! copies them into one batch (an emptied one handed back, where one waits), and hands the
//! batch over a bounded channel; another thread applies each event to a real `Store`
//! (pseudonymisation, duplicates, watermarks, windows, interests, coalescing bookkeeping).
//! Metrics, offset tracking and the dead-letter topic are left out. After those rounds, a third
//! side reads the record queue the same way and only counts, so the windowed side is also
//! compared with the ceiling of its own way of reading. All sides set
//! `fetch.queue.backoff.ms` as the processor does. Each side is timed nine times and the
//! median kept, with the CPU time of the process and of its threads. The slice is written five
//! times, each copy with its own user ids and shifted ten days later (the slice spans nine), so
//! every side reads 551,500 records. The allocator keeps freed memory as the processor's does
//! ([`mindstream::allocator`]). Where the time goes is shown by timing the stages of the
//! windowed side on the same payloads in memory. `cargo bench --bench ingest`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mindstream::config::LimitsConfig;
use mindstream::event::{Event, Format};
use mindstream::privacy::Pseudonymizer;
use mindstream::source::{Admission, RecordBatch, Routing};
use mindstream::window::Lineage;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, ClientContext};

use common::Broker;
use mindstream::source::{POLLED_CAPACITY, READ_WAIT, SPARE_BATCHES};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench-clicks";
const REPEATS: usize = 9;
/// Copies of the slice written to the topic.
const COPIES: i64 = 5;
/// Event-time shift between copies.
const COPY_SHIFT_MS: i64 = 10 * 86_400_000;

fn main() {
    // The processor's allocator setting.
    mindstream::allocator::keep_freed_memory();
    // Under `cargo test`, one copy and one round keep it working.
    let (copies, repeats) = if common::quick() { (1, 1) } else { (COPIES, REPEATS) };
    let events = taobao_payloads(copies);
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    produce(&broker.address, &events);
    let total = events.len();

    let mut raw = Vec::new();
    let mut windowed = Vec::new();
    let mut batched = Vec::new();
    let (mut raw_broker_cpu, mut windowed_broker_cpu) = (0.0, 0.0);
    for round in 0..repeats {
        let before = broker.cpu_seconds();
        raw.push(read(&broker.address, total, &format!("raw-{round}"), Side::Raw));
        let middle = broker.cpu_seconds();
        windowed.push(read(&broker.address, total, &format!("window-{round}"), Side::Windowed));
        raw_broker_cpu += middle - before;
        windowed_broker_cpu += broker.cpu_seconds() - middle;
    }
    // Apart from the rounds above, whose windowed reads each reuse the memory the previous
    // one freed (the allocator keeps it ten seconds, and one read more in between would take
    // about that long).
    for round in 0..repeats {
        batched.push(read(&broker.address, total, &format!("batch-{round}"), Side::RawBatches));
    }
    let rounds = |reads: &[Read]| {
        let walls: Vec<String> =
            reads.iter().map(|r| format!("{:.2} s", r.wall.as_secs_f64())).collect();
        walls.join(", ")
    };
    let (raw_rounds, windowed_rounds) = (rounds(&raw), rounds(&windowed));
    let batched_rounds = rounds(&batched);
    let (raw, windowed, batched) = (median_read(raw), median_read(windowed), median_read(batched));
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| records | {total} (Taobao slice x {copies}, JSON, 4 partitions) |");
    println!(
        "| raw consumer | {:.0} records/s ({:.2} s) |",
        rate(raw.wall),
        raw.wall.as_secs_f64()
    );
    println!(
        "| read + decode + window | {:.0} events/s ({:.2} s) |",
        rate(windowed.wall),
        windowed.wall.as_secs_f64()
    );
    println!(
        "| ratio, windowed / raw | {:.3} |",
        raw.wall.as_secs_f64() / windowed.wall.as_secs_f64()
    );
    println!("| every round, raw | {raw_rounds} |");
    println!("| every round, windowed | {windowed_rounds} |");
    println!(
        "| raw reader taking batches from the record queue, as the processor does | {:.0} records/s ({:.2} s) |",
        rate(batched.wall),
        batched.wall.as_secs_f64()
    );
    println!(
        "| ratio, windowed / raw batches | {:.3} |",
        batched.wall.as_secs_f64() / windowed.wall.as_secs_f64()
    );
    println!("| every round, raw batches | {batched_rounds} |");
    println!(
        "| broker CPU per read (group join included), raw / windowed | {:.2} s / {:.2} s |",
        raw_broker_cpu / repeats as f64,
        windowed_broker_cpu / repeats as f64
    );
    println!(
        "| consumer process CPU in the median read (all threads), raw / windowed | {:.2} s / {:.2} s |",
        raw.process_cpu, windowed.process_cpu
    );
    println!(
        "| of which the poll thread / the windowing thread, windowed | {:.2} s / {:.2} s |",
        windowed.poll_cpu, windowed.window_cpu
    );
    stages(&events);
}

/// Per-event cost of each stage of the windowed side, on the payloads in memory.
fn stages(payloads: &[Vec<u8>]) {
    let per_event = |elapsed: Duration| elapsed.as_nanos() as f64 / payloads.len() as f64;
    let limits = LimitsConfig::default();
    let admit = |p: &Vec<u8>| {
        mindstream::source::admit(&limits, Format::Json, None, Some(p), None).expect("admitted")
    };
    let started = Instant::now();
    let admitted = payloads.iter().map(|p| admit(p).event_time_ms).filter(|&t| t > 0).count();
    assert_eq!(admitted, payloads.len());
    let decode = per_event(started.elapsed());
    let decoded: Vec<_> = payloads.iter().map(admit).collect();
    let key = Pseudonymizer::new(b"bench-secret-0123456789").expect("key");
    let started = Instant::now();
    for event in &decoded {
        std::hint::black_box(key.user_key(&event.user_id));
    }
    let pseudonymise = per_event(started.elapsed());
    // Into a new store, whose memory is dropped (not timed) when it returns.
    let apply_all = |events: Vec<Event>| {
        let mut store = common::processor_store();
        let lineage = Lineage { topic: TOPIC.into(), partition: 0, offset: 0 };
        let now = Instant::now();
        let started = Instant::now();
        for (offset, event) in events.into_iter().enumerate() {
            let lineage = Lineage { offset: offset as i64, ..lineage.clone() };
            let _ = store.apply(event, lineage, (), now);
        }
        per_event(started.elapsed())
    };
    let apply = apply_all(decoded.clone());
    let again = apply_all(decoded);
    println!();
    println!("| stage, in memory | ns per event |");
    println!("|---|---|");
    println!("| admission: input limits, JSON decode and validation | {decode:.0} |");
    println!("| pseudonymisation alone (HMAC-SHA-256 of the user id) | {pseudonymise:.0} |");
    println!("| `Store::apply` (pseudonymisation, duplicates, window, interests) | {apply:.0} |");
    println!(
        "| the same again, into a store built just after the first was dropped | {again:.0} |"
    );
}

fn taobao_payloads(copies: i64) -> Vec<Vec<u8>> {
    let events = common::taobao_events();
    let mut payloads = Vec::with_capacity(events.len() * copies as usize);
    for copy in 0..copies {
        for event in &events {
            let mut event = event.clone();
            event.user_id = compact_str::format_compact!("{}#{copy}", event.user_id);
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

/// The windowed side's consumer context: routes each assigned partition's records to the
/// record queue, as the processor's does.
#[derive(Default)]
struct Routed(Routing);

impl ClientContext for Routed {}

impl ConsumerContext for Routed {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            self.0.route_assigned(consumer, assigned);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// Polls and counts.
    Raw,
    /// Laid out as the processor is.
    Windowed,
    /// Reads the record queue a batch at a time, as the processor does, and counts.
    RawBatches,
}

/// One read of the topic: wall time from the first record, and CPU seconds spent meanwhile.
struct Read {
    wall: Duration,
    /// Every thread of this process (the consumer's librdkafka threads included).
    process_cpu: f64,
    poll_cpu: f64,
    window_cpu: f64,
}

/// A read that only counted, from the thread CPU time, process CPU time and instant of its
/// first record.
fn counted((poll_cpu, process, started): (f64, f64, Instant)) -> Read {
    Read {
        wall: started.elapsed(),
        process_cpu: process_cpu() - process,
        poll_cpu: thread_cpu() - poll_cpu,
        window_cpu: 0.0,
    }
}

fn median_read(mut reads: Vec<Read>) -> Read {
    reads.sort_by_key(|r| r.wall);
    let middle = reads.len() / 2;
    reads.swap_remove(middle)
}

/// Reads the topic to `total` records with a fresh group. The raw side polls and counts. The
/// windowed side is laid out as the processor is: a thread polls, admits each record and hands
/// the records over a bounded channel in batches of those that were ready together, and
/// another applies each event to a store.
fn read(address: &str, total: usize, group: &str, side: Side) -> Read {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", address)
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.queue.backoff.ms", mindstream::source::FETCH_QUEUE_BACKOFF_MS);
    if side == Side::Raw {
        let consumer: BaseConsumer = config.create().expect("consumer");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        let mut seen = 0;
        let mut started = None;
        while seen < total {
            let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
            message.expect("record");
            // The clock starts at the first record, so the group join is not counted.
            started.get_or_insert_with(|| (thread_cpu(), process_cpu(), Instant::now()));
            seen += 1;
        }
        return counted(started.expect("a first record"));
    }

    let consumer: BaseConsumer<Routed> =
        config.create_with_context(Routed::default()).expect("consumer");
    // SAFETY: the reading thread closes the routing before it returns, and the consumer is
    // dropped after that.
    unsafe { consumer.context().0.open(&consumer) };
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    if side == Side::RawBatches {
        let routing = &consumer.context().0;
        let (mut seen, mut started) = (0, None);
        while seen < total {
            while let Some(served) = consumer.poll(Duration::ZERO) {
                served.expect("no consumer error");
            }
            seen += routing.read(READ_WAIT, mindstream::source::MOST_PER_READ, |record| {
                record.expect("record");
                started.get_or_insert_with(|| (thread_cpu(), process_cpu(), Instant::now()));
            });
        }
        routing.close();
        return counted(started.expect("a first record"));
    }
    let batch = mindstream::source::HANDOVER_BATCH;
    let (sender, records) = std::sync::mpsc::sync_channel::<RecordBatch>(POLLED_CAPACITY);
    // Emptied batches go back to be filled again, as the processor's do.
    let (spare, spares) = std::sync::mpsc::sync_channel::<RecordBatch>(SPARE_BATCHES);
    let (first_tx, first_rx) = std::sync::mpsc::channel::<(Instant, f64)>();
    // Shared, so that the consumer's threads still run when the CPU time is read.
    let consumer = Arc::new(consumer);
    let polling = consumer.clone();
    let poller = std::thread::spawn(move || {
        let consumer = polling;
        let admission = Admission::with_inputs(LimitsConfig::default(), [(TOPIC, Format::Json)]);
        let routing = &consumer.context().0;
        let mut seen = 0;
        let (mut cpu, mut polled) = (None, None);
        while seen < total {
            // Rebalances (where the partitions are routed) and the client's events; the
            // records come from the record queue.
            while let Some(served) = consumer.poll(Duration::ZERO) {
                served.expect("no consumer error");
            }
            let filling = polled.get_or_insert_with(|| {
                spares.try_recv().unwrap_or_else(|_| RecordBatch::with_capacity(batch, 64 * 1024))
            });
            seen += routing.read(READ_WAIT, batch, |record| {
                // The clock starts at the first record, so the group join is not counted.
                if cpu.is_none() {
                    cpu = Some(thread_cpu());
                    let _ = first_tx.send((Instant::now(), process_cpu()));
                }
                filling.push_raw(&record.expect("record"), &admission);
            });
            if filling.is_empty() {
                continue;
            }
            if sender.send(polled.take().expect("a batch being filled")).is_err() {
                break;
            }
        }
        routing.close();
        thread_cpu() - cpu.unwrap_or(0.0)
    });
    let mut store = common::processor_store();
    let topic: Arc<str> = TOPIC.into();
    let now = Instant::now();
    let mut window_cpu = None;
    for mut polled in records.iter() {
        window_cpu.get_or_insert_with(thread_cpu);
        for (record, admitted) in polled.admitted() {
            let lineage = Lineage {
                topic: topic.clone(),
                partition: record.partition(),
                offset: record.offset(),
            };
            if let Some(Ok(event)) = admitted {
                let _ = store.apply(event, lineage, (), now);
            }
        }
        polled.clear();
        let _ = spare.try_send(polled);
    }
    let ended = Instant::now();
    let window_cpu = thread_cpu() - window_cpu.unwrap_or(0.0);
    let (started, process) = first_rx.recv().expect("a first record");
    let poll_cpu = poller.join().expect("poll thread");
    let process_cpu = process_cpu() - process;
    drop(consumer);
    Read { wall: ended - started, process_cpu, poll_cpu, window_cpu }
}

/// CPU seconds this thread has run (`/proc/thread-self/schedstat`, in nanoseconds).
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// CPU seconds this process has run, exited threads included (`/proc/self/stat`, in clock
/// ticks of 1/100 s).
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name, which ends with the last `)`, utime and stime are the 12th and
    // 13th fields.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
