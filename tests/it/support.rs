//! What the integration tests share: a real broker per test, fresh topic names, the shipped
//! model, real sample data, and helpers to run the binaries and read topics back.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mindstream::event::Format;
use mindstream::signals::{self, SignalRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
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
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
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
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Every record of `topic`, read from the beginning to the current end.
pub fn read_all(broker: &Broker, topic: &str) -> Vec<Read> {
    let mut client = broker.client();
    client.set("group.id", unique("reader")).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) =
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap();
        if high > low {
            ends.insert(partition, high);
            list.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    // Tansu reports the high watermark as the last batch's base offset plus one, so reading
    // goes on until no record has come for a while after the watermarks are reached.
    let mut last_record = Instant::now();
    while !ends.is_empty() || last_record.elapsed() < mindstream::ops::summary::QUIET {
        assert!(Instant::now() < deadline, "reading {topic} did not reach its end");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.unwrap();
        last_record = Instant::now();
        if ends.get(&message.partition()).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&message.partition());
        }
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
        out.push(Read {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
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
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for read in read_all(broker, topic) {
        let end = ends.entry(read.partition).or_default();
        *end = (*end).max(read.offset + 1);
    }
    let mut client = broker.client();
    client.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut list = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition(topic, p.id());
    }
    let mut out = Vec::new();
    {
        // The list must be dropped before the consumer, or dropping the consumer hangs.
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        for element in committed.elements() {
            let offset = element.offset().to_raw().unwrap_or(-1);
            let end = ends.get(&element.partition()).copied().unwrap_or(0);
            out.push((element.partition(), offset, end));
        }
    }
    out
}
