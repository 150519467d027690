//! Soak: the real processor fed at a steady rate for a long time, its resident memory sampled
//! every few seconds, to show whether memory stays flat once its state has stopped growing.
//!
//! The events are the Taobao slice's real clicks, given to a fixed population of USERS users
//! (each slice user is mapped to one of them) with event times that advance with the replay,
//! so every window fills up during the warm-up and stays full: after that, the state has no
//! reason to grow and any growth of the resident set is a leak or fragmentation. A Tansu broker
//! on loopback; `mindstream replay --rate RATE` produces while the bench samples `VmRSS` of the
//! processor and scrapes its `/metrics` every SAMPLE seconds.
//!
//! `cargo bench --bench soak -- [MINUTES] [RATE] [USERS]` (defaults 10, 100, 500). The verdict
//! compares the resident set at the end with the one after the warm-up (the first 40% of the
//! run); flat means within 10%.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Broker;
use mindstream::event::{Event, Format};

const KEY: &str = "soak-secret-0123456789abcdef";
/// Seconds between samples.
const SAMPLE: Duration = Duration::from_secs(5);
/// Share of the run counted as warm-up.
const WARM_UP: f64 = 0.4;

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .filter_map(|a| a.parse().ok())
        .collect();
    let quick = common::quick();
    let minutes = args.first().copied().unwrap_or(if quick { 0.3 } else { 10.0 });
    let rate = args.get(1).copied().unwrap_or(100.0);
    let users = args.get(2).copied().unwrap_or(if quick { 50.0 } else { 500.0 }) as u64;
    let count = (minutes * 60.0 * rate) as usize;

    let slice = common::taobao_events();
    if slice.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join("soak.jsonl");
    write_events(&file, &soak_events(&slice, count, rate, users));
    let broker = Broker::start();
    let lane = Lane::new(&broker, dir.path());
    let mut processor = lane.command().arg("run").spawn().expect("start the processor");
    common::wait_ready(&lane.http, &mut processor);

    let started = Instant::now();
    let mut replay = lane
        .command()
        .args(["replay", "--input"])
        .arg(&file)
        .args(["--topic", "soak-clicks", "--format", "json", "--rate", &rate.to_string()])
        .spawn()
        .expect("start the replay");
    let mut samples = Vec::new();
    let mut replay_done = None;
    loop {
        std::thread::sleep(SAMPLE);
        let sample = lane.sample(processor.id(), started.elapsed());
        let read = sample.records_in;
        samples.push(sample);
        if replay_done.is_none() && replay.try_wait().expect("replay status").is_some() {
            replay_done = Some(started.elapsed());
        }
        if replay_done.is_some() && read >= count as f64 {
            break;
        }
        assert!(
            started.elapsed().as_secs_f64() < minutes * 60.0 * 2.0 + 60.0,
            "the processor did not read the replay within twice its duration"
        );
    }
    let caught_up = started.elapsed();
    let _ = Command::new("kill").args(["-TERM", &processor.id().to_string()]).status();
    let _ = processor.wait();

    report(&samples, count, rate, users, replay_done.unwrap_or(caught_up), caught_up);
}

/// `count` events at `rate` per second: the slice's clicks in order (repeated as needed), each
/// slice user mapped to one of `users`, times advancing with the replay.
fn soak_events(slice: &[Event], count: usize, rate: f64, users: u64) -> Vec<Event> {
    let start_ms = slice.iter().map(|e| e.event_time_ms).min().unwrap_or(0);
    let step_ms = 1_000.0 / rate;
    (0..count)
        .map(|i| {
            let mut event = slice[i % slice.len()].clone();
            let mut hasher = DefaultHasher::new();
            event.user_id.hash(&mut hasher);
            event.user_id = compact_str::format_compact!("soak-{}", hasher.finish() % users);
            event.event_id = compact_str::format_compact!("s{i}");
            event.event_time_ms = start_ms + (i as f64 * step_ms) as i64;
            event
        })
        .collect()
}

fn write_events(path: &Path, events: &[Event]) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    for event in events {
        out.write_all(&mindstream::event::encode(Format::Json, event)).expect("write");
        out.write_all(b"\n").expect("write");
    }
    out.flush().expect("flush");
}

struct Sample {
    at: Duration,
    rss: u64,
    records_in: f64,
    records_out: f64,
    users: f64,
    state_bytes: f64,
}

fn report(
    samples: &[Sample],
    count: usize,
    rate: f64,
    users: u64,
    replayed: Duration,
    end: Duration,
) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("| seconds | RSS MiB | records in | signal records | users | state MiB |");
    println!("|---|---|---|---|---|---|");
    for s in samples {
        println!(
            "| {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} |",
            s.at.as_secs_f64(),
            mib(s.rss),
            s.records_in,
            s.records_out,
            s.users,
            s.state_bytes / (1024.0 * 1024.0)
        );
    }
    let warm_index = samples.iter().position(|s| s.at.as_secs_f64() >= end.as_secs_f64() * WARM_UP);
    let (Some(warm), Some(last)) = (warm_index.map(|i| &samples[i]), samples.last()) else {
        return;
    };
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let change = last.rss as f64 / warm.rss.max(1) as f64 - 1.0;
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| events | {count} at {rate:.0}/s for {users} users |");
    println!(
        "| replay finished / all read | {:.0} s / {:.0} s |",
        replayed.as_secs_f64(),
        end.as_secs_f64()
    );
    println!("| RSS after warm-up ({:.0} s) | {:.1} MiB |", warm.at.as_secs_f64(), mib(warm.rss));
    println!("| RSS at the end | {:.1} MiB |", mib(last.rss));
    println!("| RSS peak | {:.1} MiB |", mib(peak));
    println!(
        "| change after warm-up | {:+.1}% ({}) |",
        change * 100.0,
        if change.abs() <= 0.10 { "flat" } else { "not flat" }
    );
}

/// The deployment: configuration, log and HTTP address.
struct Lane {
    config: PathBuf,
    log: PathBuf,
    http: String,
}

impl Lane {
    fn new(broker: &Broker, dir: &Path) -> Lane {
        let port = common::free_port();
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"soak\"\n\
             [kafka.consumer]\n\"fetch.wait.max.ms\" = \"20\"\n\
             [[inputs]]\ntopic = \"soak-clicks\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"soak-signals\"\nformat = \"json\"\ndlq_topic = \"soak-dlq\"\n\
             [state]\nchangelog_topic = \"soak-state\"\n\
             [scoring]\ncoalesce = \"100ms\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"json\"\nfilter = \"warn\"\n",
            broker.address
        );
        let config = dir.join("soak.toml");
        std::fs::write(&config, text).expect("write the configuration");
        let lane = Lane { config, log: dir.join("soak.log"), http: format!("127.0.0.1:{port}") };
        let status = lane.command().args(["topics", "--partitions", "4"]).status().expect("topics");
        assert!(status.success(), "mindstream topics failed");
        lane
    }

    fn command(&self) -> Command {
        common::mindstream(&self.config, &self.log, KEY)
    }

    fn sample(&self, pid: u32, at: Duration) -> Sample {
        let rss = common::rss_bytes_of(&pid.to_string());
        let body = common::http_get(&self.http, "/metrics").unwrap_or_default();
        let metric = |name: &str| -> f64 {
            body.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter(|l| l[name.len()..].starts_with([' ', '{']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Sample {
            at,
            rss,
            records_in: metric("mindstream_records_in_total"),
            records_out: metric("mindstream_signal_records_total"),
            users: metric("mindstream_active_users"),
            state_bytes: metric("mindstream_state_bytes"),
        }
    }
}
