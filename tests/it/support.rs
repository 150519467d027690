//! What the integration tests share: a real broker per test, fresh topic names, the shipped
//! model, real sample data, and helpers to run the binaries and read topics back.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use mindstream::event::Format;
use mindstream::signals::{self, SignalRecord};
use mindstream::window::UserState;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The pseudonymisation secret the tests run with.
pub const KEY: &str = "integration-test-secret-0123456789";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Tansu broker on a free loopback port, stopped when dropped.
pub struct Broker {
    child: Child,
    pub address: String,
}

impl Broker {
    pub fn start() -> Broker {
        let tansu = root().join(".tools/bin/tansu");
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

    /// Freezes the broker: connections stay open and nothing answers, as in a network
    /// partition. A restart would be no outage but a new, empty broker (Tansu keeps nothing).
    pub fn pause(&self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Lets a paused broker go on where it stopped.
    pub fn resume(&self) {
        send_signal(self.child.id(), "CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("a bound socket has an address").port()
}

/// Sends the signal `name` (`TERM`, `KILL`, `STOP`, `CONT`) to process `pid`.
pub fn send_signal(pid: u32, name: &str) {
    let status =
        Command::new("kill").args(["-s", name, &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -s {name} {pid} failed: {status}");
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{prefix}-{}-{}", std::process::id(), nanos.as_nanos() % 1_000_000_000)
}

/// Real sample data prepared by `scripts/sample-data.sh`.
pub fn sample_data() -> PathBuf {
    let dir = root().join(".tools/data");
    assert!(
        dir.join("purchases/cdnow-master.txt").exists(),
        "sample data missing: run scripts/sample-data.sh (make test does)"
    );
    dir
}

pub fn mindstream() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mindstream"));
    command.current_dir(root()).env_remove("MINDSTREAM_CONFIG");
    for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("MINDSTREAM__")) {
        command.env_remove(var);
    }
    command.env("MINDSTREAM_PSEUDONYM_KEY", KEY);
    command
}

/// Runs a command to completion within `limit`, killing it past that.
pub fn run_with_limit(mut command: Command, limit: Duration) -> Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "command ran past {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes a processor configuration for `broker` into `dir`.
pub fn write_config(dir: &Path, broker: &Broker, group: &str, body: &str) -> PathBuf {
    let path = dir.join("mindstream.toml");
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ncommit_interval = \"200ms\"\n\
         [kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\
         \"heartbeat.interval.ms\" = \"1000\"\n\
         [shutdown]\ndrain_timeout = \"5s\"\n{body}",
        broker.address, group
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// One record read back from a topic.
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The value; empty for a tombstone, which `has_value` tells from an empty value.
    pub payload: Vec<u8>,
    pub has_value: bool,
    pub headers: BTreeMap<String, String>,
}

/// Every record of `topic`, read from the beginning to the current end.
pub fn read_all(broker: &Broker, topic: &str) -> Vec<Read> {
    let consumer = reader(broker, "read_uncommitted");
    let mut ends = assign_from_beginning(&consumer, topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    // Tansu reports the high watermark as the last batch's base offset plus one, so reading
    // goes on until no record has come for a while after the watermarks are reached.
    let mut last_record = Instant::now();
    while !ends.is_empty() || last_record.elapsed() < mindstream::ops::summary::QUIET {
        assert!(Instant::now() < deadline, "reading {topic} did not reach its end {ends:?}");
        // In a topic written by transactions the last offset is often a commit marker, which
        // no reader is given; the consumer's position moves past it all the same.
        forget_reached(&consumer, &mut ends);
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.unwrap();
        last_record = Instant::now();
        if ends.get(&message.partition()).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&message.partition());
        }
        out.push(read_of(&message));
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// Removes from `ends` each partition whose consumer position has reached its end.
fn forget_reached(consumer: &BaseConsumer, ends: &mut BTreeMap<i32, i64>) {
    if ends.is_empty() {
        return;
    }
    let Ok(positions) = consumer.position() else { return };
    for element in positions.elements() {
        let position = element.offset().to_raw().unwrap_or(-1);
        if ends.get(&element.partition()).is_some_and(|&end| position >= end) {
            ends.remove(&element.partition());
        }
    }
}

/// How long a `read_committed` reader waits for more before it takes a topic as read.
const COMMITTED_QUIET: Duration = Duration::from_secs(3);

/// Every record of `topic` that a `read_committed` consumer is given. Records of a
/// transaction still open are held back, and the watermarks count them, so reading stops
/// once nothing has come for [`COMMITTED_QUIET`] rather than at the watermarks.
pub fn read_committed(broker: &Broker, topic: &str) -> Vec<Read> {
    let consumer = reader(broker, "read_committed");
    assign_from_beginning(&consumer, topic);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    let mut last_record = Instant::now();
    while last_record.elapsed() < COMMITTED_QUIET {
        assert!(Instant::now() < deadline, "reading {topic} (read_committed) did not end");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.expect("read_committed consumer error");
        last_record = Instant::now();
        out.push(read_of(&message));
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// A consumer outside any group's work (it only assigns), with the given isolation level.
fn reader(broker: &Broker, isolation: &str) -> BaseConsumer {
    let mut client = broker.client();
    client
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation);
    client.create().expect("create a reading consumer")
}

/// Assigns every partition of `topic` from its beginning; returns the high watermark of each
/// partition that holds records.
fn assign_from_beginning(consumer: &BaseConsumer, topic: &str) -> BTreeMap<i32, i64> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) =
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap();
        if high > low {
            ends.insert(partition, high);
        }
        list.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    ends
}

fn read_of(message: &BorrowedMessage<'_>) -> Read {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                    (h.key.to_owned(), value.unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default();
    Read {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().unwrap_or_default().to_vec(),
        has_value: message.payload().is_some(),
        headers,
    }
}

/// One past the highest offset read, per partition.
pub fn ends_of(reads: &[Read]) -> BTreeMap<i32, i64> {
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for read in reads {
        let end = ends.entry(read.partition).or_default();
        *end = (*end).max(read.offset + 1);
    }
    ends
}

/// Decodes signal records, keeping topic order.
pub fn signal_records(reads: &[Read], format: Format) -> Vec<(i32, SignalRecord)> {
    reads
        .iter()
        .map(|r| (r.partition, signals::decode(format, &r.payload).expect("signal decodes")))
        .collect()
}

/// Each user's record with the highest version.
pub fn latest(records: impl IntoIterator<Item = SignalRecord>) -> BTreeMap<String, SignalRecord> {
    let mut out: BTreeMap<String, SignalRecord> = BTreeMap::new();
    for record in records {
        match out.get(&record.user_key) {
            Some(previous) if previous.version >= record.version => {}
            _ => {
                out.insert(record.user_key.clone(), record);
            }
        }
    }
    out
}

/// Committed offset of `group` for each partition of `topic`, and the partition's end (one
/// past the last offset read; the test broker's high watermarks are not exact).
pub fn committed_and_end(broker: &Broker, group: &str, topic: &str) -> Vec<(i32, i64, i64)> {
    let ends = ends_of(&read_all(broker, topic));
    committed(broker, group, topic)
        .into_iter()
        .map(|(partition, offset)| (partition, offset, ends.get(&partition).copied().unwrap_or(0)))
        .collect()
}

/// Committed offset of `group` for each partition of `topic` (negative where nothing is
/// committed).
pub fn committed(broker: &Broker, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let mut client = broker.client();
    client.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut list = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition(topic, p.id());
    }
    let mut out = BTreeMap::new();
    {
        // The list must be dropped before the consumer, or dropping the consumer hangs.
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        for element in committed.elements() {
            out.insert(element.partition(), element.offset().to_raw().unwrap_or(-1));
        }
    }
    out
}

/// Each changelog key's latest window state, from records in topic order; tombstones (empty
/// values) are passed over, so a key's last stored state is what is kept.
pub fn changelog_windows<'a>(
    reads: impl IntoIterator<Item = &'a Read>,
) -> BTreeMap<String, UserState> {
    let mut windows = BTreeMap::new();
    for read in reads {
        let key = read.key.as_deref().expect("changelog records are keyed by user");
        if read.payload.is_empty() {
            windows.remove(&*String::from_utf8_lossy(key));
            continue;
        }
        let snapshot = mindstream::state::decode(&read.payload).unwrap_or_else(|err| {
            panic!("changelog record {}@{} does not decode: {err}", read.partition, read.offset)
        });
        windows.insert(String::from_utf8_lossy(key).into_owned(), snapshot.state);
    }
    windows
}

/// Answers a plain HTTP/1.0 GET of `path` on `address` with (status, body); `None` when the
/// server does not answer within a second.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(1);
    let socket = address.parse().expect("an HTTP address is ip:port");
    let mut stream = TcpStream::connect_timeout(&socket, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// A `mindstream run` in the background. Its stderr (the log) goes to a file, so the test can
/// read the log while it runs and show its tail on failure; killed if still running when
/// dropped, so a failed test leaves no processor behind.
pub struct Processor {
    child: Child,
    log: PathBuf,
}

impl Processor {
    /// Starts `mindstream run` with `config`, logging into `log`.
    pub fn start(config: &Path, until_caught_up: bool, log: PathBuf) -> Processor {
        let stderr = std::fs::File::create(&log).expect("create the processor's log file");
        let mut command = mindstream();
        command.args(["--config", config.to_str().expect("config path is UTF-8"), "run"]);
        if until_caught_up {
            command.arg("--until-caught-up");
        }
        let child =
            command.stdout(Stdio::null()).stderr(stderr).spawn().expect("start mindstream run");
        Processor { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal `name` (`TERM`, `STOP`, `CONT`...).
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the processor");
        self.child.wait().expect("reap the killed processor");
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("query the processor's state")
    }

    /// Waits up to `limit` for the process to end; `None` if it is still running then.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        format!(
            "--- last {} lines of {} ---\n{}",
            lines.len() - from,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// The log's JSON lines whose `message` is `message`.
    pub fn log_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["message"] == message)
            .collect()
    }
}

/// Log lines a failure message shows.
const LOG_TAIL_LINES: usize = 40;

impl Drop for Processor {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
