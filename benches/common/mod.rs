//! What the benchmarks share: the real Taobao slice, a Tansu broker on loopback, and the
//! process's resident memory.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mindstream::event::Event;
use rdkafka::ClientConfig;

/// The real Taobao slice as events, from `.tools/data` or `../shared/data`. Where it is absent
/// (it comes only from the shared data folder) the bench says so and stops without failing.
pub fn taobao_events() -> Vec<Event> {
    let candidates = [
        PathBuf::from(".tools/data/clickstream/taobao-userbehavior-slice.csv"),
        PathBuf::from("../shared/data/clickstream/taobao-userbehavior-slice.csv"),
    ];
    let Some(path) = candidates.iter().find(|p| p.exists()) else {
        println!(
            "skipped: the Taobao slice is absent (it comes from ../shared/data; \
             scripts/sample-data.sh links it into .tools/data)"
        );
        std::process::exit(0);
    };
    mindstream::import::events(mindstream::import::Source::Taobao, path)
        .expect("import the Taobao slice")
}

/// A Tansu broker on a free loopback port, stopped when dropped.
pub struct Broker {
    child: Child,
    pub address: String,
}

impl Broker {
    pub fn start() -> Broker {
        let tansu = PathBuf::from(".tools/bin/tansu");
        assert!(tansu.exists(), "{} is missing: run scripts/setup.sh", tansu.display());
        let port = free_port();
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
        Broker { child, address }
    }

    pub fn client(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.address);
        client
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            self.client().create().expect("admin client");
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime
            .block_on(admin.create_topics(&[new], &AdminOptions::new()))
            .expect("create the topic");
    }

    /// User and system CPU time the broker process has used, from `/proc`.
    pub fn cpu_seconds(&self) -> f64 {
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

/// The body of a plain HTTP/1.0 GET of `path` on `address` when it answers 200.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.split_whitespace().nth(1).is_some_and(|code| code == "200").then(|| body.to_owned())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port()
}

/// A `mindstream` command with `config`, the key `key`, and its standard error appended to
/// `log` (for when something fails).
pub fn mindstream(config: &std::path::Path, log: &std::path::Path, key: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mindstream"));
    command.arg("--config").arg(config).env("MINDSTREAM_PSEUDONYM_KEY", key);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the processor's log");
    command.stdout(Stdio::null()).stderr(log);
    command
}

/// Waits until the processor serving `http` answers ready; fails if it exits first.
pub fn wait_ready(http: &str, processor: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(http, "/readyz").is_none_or(|b| !b.starts_with("ready")) {
        assert!(processor.try_wait().expect("status").is_none(), "the processor exited");
        assert!(Instant::now() < deadline, "the processor did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Resident memory of this process, from `/proc`.
pub fn rss_bytes() -> u64 {
    rss_bytes_of("self")
}

/// Resident memory of process `pid` (or `self`), from `/proc`.
pub fn rss_bytes_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A store as the processor makes it: the default configuration with the shipped model's
/// window shape and TTL (`models/`, so benches run from the repository root).
pub fn processor_store() -> mindstream::window::store::Store<()> {
    use mindstream::window::store::{Store, StoreConfig};
    let card = mindstream::model::card::ModelCard::load(std::path::Path::new("models/model.json"))
        .expect("models/model.json (run from the repository root)");
    let config = mindstream::config::Config::load(None, std::iter::empty())
        .expect("the default configuration");
    let key = mindstream::privacy::Pseudonymizer::new(b"bench-secret-0123456789").expect("key");
    Store::new(StoreConfig::resolve(&config, &card), std::sync::Arc::new(key))
}

/// `cargo test` runs bench targets without `--bench`; benches then do a small run that keeps
/// them working.
pub fn quick() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

pub fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}
