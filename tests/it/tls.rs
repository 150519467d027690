//! Transport security: the processor and its tools against the test broker over TLS with a
//! client certificate, and with SASL PLAIN inside TLS, on a certificate authority each test
//! makes for itself.
//!
//! Tansu 0.6 takes `--cert` and `--key` but serves plain TCP only (the two options even exclude
//! each other), so each test puts a TLS front of its own before the broker: it terminates TLS
//! on a loopback port and relays the bytes to Tansu's plaintext listener. Tansu advertises the
//! front's address, so every connection a client opens after the bootstrap is TLS as well.
//! Tansu's own SASL cannot log anyone in here, so the front also checks SASL PLAIN.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mindstream::event::{self, Format};
use mindstream::import;
use mindstream::privacy::Pseudonymizer;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use openssl::symm::Cipher;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support;

/// The pass phrase of the client's private key (`ssl.key.password`).
const KEY_PASSWORD: &str = "client-key-pass-7f3a";
/// The SASL PLAIN account the front accepts.
const SASL_USER: &str = "mindstream";
const SASL_PASSWORD: &str = "sasl-pass-51c9";

/// CDNOW purchases replayed per test.
const EVENTS: usize = 300;

/// A certificate authority, a server certificate for 127.0.0.1 and localhost, a client
/// certificate with an encrypted key, and a second, unrelated authority; all as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let (ca, ca_key) = authority("mindstream test CA");
        let (server, server_key) = leaf(&ca, &ca_key, "127.0.0.1", Use::Server);
        let (client, client_key) = leaf(&ca, &ca_key, "mindstream", Use::Client);
        let (other_ca, _) = authority("unrelated test CA");
        let write = |name: &str, pem: Vec<u8>| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let encrypted = client_key
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), KEY_PASSWORD.as_bytes())
            .unwrap();
        Pki {
            ca: write("ca.pem", ca.to_pem().unwrap()),
            server_cert: write("server.pem", server.to_pem().unwrap()),
            server_key: write("server.key", server_key.private_key_to_pem_pkcs8().unwrap()),
            client_cert: write("client.pem", client.to_pem().unwrap()),
            client_key: write("client.key", encrypted),
            other_ca: write("other-ca.pem", other_ca.to_pem().unwrap()),
        }
    }
}

#[derive(Clone, Copy)]
enum Use {
    Server,
    Client,
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(common_name: &str) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, common_name).unwrap();
    name.build()
}

/// A certificate builder valid from a minute ago for a day, with a random serial number.
fn builder(subject: &X509Name, key: &PKey<Private>) -> openssl::x509::X509Builder {
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(127, MsbOption::MAYBE_ZERO, false).unwrap();
    builder.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    builder.set_subject_name(subject).unwrap();
    builder.set_pubkey(key).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = i64::try_from(now.as_secs()).unwrap();
    builder.set_not_before(&Asn1Time::from_unix(now - 60).unwrap()).unwrap();
    builder.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
    builder
}

/// A self-signed certificate authority and its key.
fn authority(common_name: &str) -> (X509, PKey<Private>) {
    let key = new_key();
    let subject = name(common_name);
    let mut builder = builder(&subject, &key);
    builder.set_issuer_name(&subject).unwrap();
    builder.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    let usage = KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap();
    builder.append_extension(usage).unwrap();
    let identifier = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None));
    builder.append_extension(identifier.unwrap()).unwrap();
    builder.sign(&key, MessageDigest::sha256()).unwrap();
    (builder.build(), key)
}

/// A certificate signed by `ca`: for a server, valid for 127.0.0.1 and localhost.
fn leaf(ca: &X509, ca_key: &PKey<Private>, common_name: &str, role: Use) -> (X509, PKey<Private>) {
    let key = new_key();
    let mut builder = builder(&name(common_name), &key);
    builder.set_issuer_name(ca.subject_name()).unwrap();
    builder.append_extension(BasicConstraints::new().build().unwrap()).unwrap();
    let usage = KeyUsage::new().critical().digital_signature().key_agreement().build().unwrap();
    builder.append_extension(usage).unwrap();
    let purpose = match role {
        Use::Server => ExtendedKeyUsage::new().server_auth().build().unwrap(),
        Use::Client => ExtendedKeyUsage::new().client_auth().build().unwrap(),
    };
    builder.append_extension(purpose).unwrap();
    let authority_key =
        AuthorityKeyIdentifier::new().keyid(true).build(&builder.x509v3_context(Some(ca), None));
    builder.append_extension(authority_key.unwrap()).unwrap();
    if let Use::Server = role {
        let names = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&builder.x509v3_context(Some(ca), None))
            .unwrap();
        builder.append_extension(names).unwrap();
    }
    builder.sign(ca_key, MessageDigest::sha256()).unwrap();
    (builder.build(), key)
}

/// A TLS listener on a loopback port that relays each connection, once its handshake is
/// done, to a plaintext address. Client certificates signed by the test's authority are
/// required; with an account, SASL PLAIN with it too (see [`authenticate`]). Stopped, with
/// every relayed connection, when dropped.
struct TlsFront {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Why each connection was refused: OpenSSL's words for a failed handshake, or what the
    /// SASL check did not accept.
    refused: Arc<Mutex<Vec<String>>>,
}

/// The user name and password SASL PLAIN must present; `None`: no SASL.
type Account = Option<(&'static str, &'static str)>;

impl TlsFront {
    fn start(listener: TcpListener, backend: String, pki: &Pki, account: Account) -> TlsFront {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        acceptor.set_certificate_chain_file(&pki.server_cert).unwrap();
        acceptor.set_private_key_file(&pki.server_key, SslFiletype::PEM).unwrap();
        acceptor.check_private_key().unwrap();
        acceptor.set_ca_file(&pki.ca).unwrap();
        acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        let acceptor = acceptor.build();
        listener.set_nonblocking(true).unwrap();
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let log = refused.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            runtime.unwrap().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    () = accept_loop(listener, acceptor, backend, account, log) => {}
                    _ = stopped => {}
                }
            });
        });
        TlsFront { stop: Some(stop), thread: Some(thread), refused }
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: SslAcceptor,
    backend: String,
    account: Account,
    refused: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let ssl = Ssl::new(acceptor.context()).unwrap();
        let (backend, refused) = (backend.clone(), refused.clone());
        tokio::spawn(async move {
            let mut tls = tokio_openssl::SslStream::new(ssl, socket).unwrap();
            if let Err(err) = Pin::new(&mut tls).accept().await {
                refused.lock().unwrap().push(err.to_string());
                return;
            }
            let Ok(mut plain) = TcpStream::connect(&backend).await else { return };
            if let Some(account) = account {
                match authenticate(&mut tls, &mut plain, account).await {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => return refused.lock().unwrap().push(why),
                    Err(_) => return,
                }
            }
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// Kafka API keys the SASL check reads.
const SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const SASL_AUTHENTICATE: i16 = 36;
/// Kafka error codes it answers with.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

/// SASL PLAIN as a Kafka broker does it, for Tansu, which cannot here (PLAIN is not among its
/// mechanisms, and its in-memory storage keeps no SCRAM credentials): `ApiVersions` requests
/// go to the broker, `SaslHandshake` (v1) and `SaslAuthenticate` (v0, v1) are answered here,
/// and anything else before a successful login ends the connection. `Ok(Err(why))` is a
/// refusal.
async fn authenticate(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    broker: &mut TcpStream,
    (user, password): (&str, &str),
) -> std::io::Result<Result<(), String>> {
    loop {
        let request = read_frame(client).await?;
        let mut reader = Bytes(&request);
        let (api_key, version, correlation) = (reader.i16(), reader.i16(), reader.i32());
        let client_id = reader.i16();
        reader.skip(usize::try_from(client_id).unwrap_or(0));
        let mut response = correlation.to_be_bytes().to_vec();
        match api_key {
            API_VERSIONS => {
                write_frame(broker, &request).await?;
                let answer = read_frame(broker).await?;
                write_frame(client, &answer).await?;
            }
            SASL_HANDSHAKE => {
                let mechanism = reader.string();
                let error = if mechanism == "PLAIN" { 0 } else { UNSUPPORTED_SASL_MECHANISM };
                response.extend(error.to_be_bytes());
                response.extend(1_i32.to_be_bytes());
                response.extend(5_i16.to_be_bytes());
                response.extend(b"PLAIN");
                write_frame(client, &response).await?;
                if error != 0 {
                    return Ok(Err(format!("SASL mechanism {mechanism}")));
                }
            }
            SASL_AUTHENTICATE => {
                let token = reader.bytes();
                // authorisation id, user name, password
                let fields: Vec<&[u8]> = token.split(|&b| b == 0).collect();
                let accepted = fields.len() == 3
                    && fields[1] == user.as_bytes()
                    && fields[2] == password.as_bytes();
                let message = "Authentication failed: invalid user name or password";
                if accepted {
                    response.extend(0_i16.to_be_bytes());
                    response.extend((-1_i16).to_be_bytes());
                } else {
                    response.extend(SASL_AUTHENTICATION_FAILED.to_be_bytes());
                    response.extend(i16::try_from(message.len()).unwrap().to_be_bytes());
                    response.extend(message.as_bytes());
                }
                response.extend(0_i32.to_be_bytes());
                if version >= 1 {
                    response.extend(0_i64.to_be_bytes());
                }
                write_frame(client, &response).await?;
                let name = String::from_utf8_lossy(fields.get(1).copied().unwrap_or_default());
                return Ok(if accepted { Ok(()) } else { Err(format!("SASL login of {name}")) });
            }
            other => return Ok(Err(format!("API {other} before SASL"))),
        }
    }
}

/// A big-endian reader of a Kafka request body; past the end it reads zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn skip(&mut self, n: usize) {
        self.take(n);
    }

    fn i16(&mut self) -> i16 {
        let mut bytes = [0; 2];
        let head = self.take(2);
        bytes[..head.len()].copy_from_slice(head);
        i16::from_be_bytes(bytes)
    }

    fn i32(&mut self) -> i32 {
        let mut bytes = [0; 4];
        let head = self.take(4);
        bytes[..head.len()].copy_from_slice(head);
        i32::from_be_bytes(bytes)
    }

    fn string(&mut self) -> String {
        let len = usize::try_from(self.i16()).unwrap_or(0);
        String::from_utf8_lossy(self.take(len)).into_owned()
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = usize::try_from(self.i32()).unwrap_or(0);
        self.take(len).to_vec()
    }
}

/// One Kafka frame's content, without its size.
async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut size = [0; 4];
    stream.read_exact(&mut size).await?;
    let size = usize::try_from(i32::from_be_bytes(size)).unwrap_or(0);
    let mut frame = vec![0; size];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(stream: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> std::io::Result<()> {
    let size = i32::try_from(frame.len()).unwrap();
    stream.write_all(&size.to_be_bytes()).await?;
    stream.write_all(frame).await?;
    stream.flush().await
}

/// A Tansu broker reachable only through a [`TlsFront`], with SASL PLAIN when `account` is
/// given. Both stop when dropped.
struct SecureBroker {
    /// The front's address: the bootstrap servers for clients.
    address: String,
    front: TlsFront,
    tansu: Child,
}

impl SecureBroker {
    fn start(pki: &Pki, account: Account) -> SecureBroker {
        let tansu = support::root().join(".tools/bin/tansu");
        assert!(tansu.exists(), "{} is missing: run scripts/setup.sh", tansu.display());
        let front = TcpListener::bind("127.0.0.1:0").expect("bind the TLS front");
        let address = front.local_addr().unwrap().to_string();
        let backend = format!("127.0.0.1:{}", support::free_port());
        let tansu = Command::new(tansu)
            .arg("broker")
            .args(["--listener-url", &format!("tcp://{backend}")])
            .args(["--advertised-listener-url", &format!("tcp://{address}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&backend).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {backend}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let front = TlsFront::start(front, backend, pki, account);
        SecureBroker { address, front, tansu }
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}

/// librdkafka properties of a TLS client with the test's client certificate; with `sasl`,
/// SASL PLAIN on top.
fn secure_properties(pki: &Pki, sasl: bool) -> Vec<(&'static str, String)> {
    let path = |p: &Path| p.to_str().expect("temporary paths are UTF-8").to_owned();
    let mut properties = vec![
        ("security.protocol", if sasl { "sasl_ssl" } else { "ssl" }.to_owned()),
        ("ssl.ca.location", path(&pki.ca)),
        // librdkafka's default, stated: the broker's name must match its certificate.
        ("ssl.endpoint.identification.algorithm", "https".to_owned()),
        ("ssl.certificate.location", path(&pki.client_cert)),
        ("ssl.key.location", path(&pki.client_key)),
        ("ssl.key.password", KEY_PASSWORD.to_owned()),
    ];
    if sasl {
        properties.push(("sasl.mechanisms", "PLAIN".to_owned()));
        properties.push(("sasl.username", SASL_USER.to_owned()));
        properties.push(("sasl.password", SASL_PASSWORD.to_owned()));
    }
    properties
}

fn client(broker: &SecureBroker, properties: &[(&str, String)]) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &broker.address);
    for (key, value) in properties {
        client.set(*key, value);
    }
    client
}

/// Topic and group names of one test.
struct Names {
    clicks: String,
    signals: String,
    dlq: String,
    changelog: String,
    group: String,
}

impl Names {
    fn new() -> Names {
        Names {
            clicks: support::unique("clicks"),
            signals: support::unique("signals"),
            dlq: support::unique("dlq"),
            changelog: support::unique("state"),
            group: support::unique("group"),
        }
    }
}

/// Writes a processor configuration whose `kafka.client` map holds `properties`. Its
/// producers compress with zstd; Tansu keeps batches as produced, so the processor also reads
/// zstd-compressed input.
fn write_config(
    dir: &Path,
    broker: &SecureBroker,
    names: &Names,
    properties: &[(&str, String)],
) -> PathBuf {
    let mut text = format!(
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ncommit_interval = \"200ms\"\n\
         [kafka.client]\n",
        broker.address, names.group
    );
    for (key, value) in properties {
        text.push_str(&format!("\"{key}\" = \"{value}\"\n"));
    }
    text.push_str(&format!(
        "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n\
         \"heartbeat.interval.ms\" = \"1000\"\n\
         [kafka.producer]\n\"compression.type\" = \"zstd\"\n\
         [shutdown]\ndrain_timeout = \"5s\"\n\
         [[inputs]]\ntopic = \"{}\"\nformat = \"json\"\n\
         [output]\nsignals_topic = \"{}\"\ndlq_topic = \"{}\"\n\
         [state]\nchangelog_topic = \"{}\"\n\
         [scoring]\ncoalesce = \"100ms\"\n",
        names.clicks, names.signals, names.dlq, names.changelog
    ));
    let path = dir.join("mindstream.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The first [`EVENTS`] CDNOW purchases as a JSON-lines file in `dir`; with the set of their
/// users' pseudonymised keys.
fn purchases(dir: &Path) -> (PathBuf, BTreeSet<String>) {
    let data = support::sample_data();
    let mut events =
        import::events(import::Source::Cdnow, &data.join("purchases/cdnow-master.txt")).unwrap();
    events.truncate(EVENTS);
    let path = dir.join("purchases.jsonl");
    let mut file = std::fs::File::create(&path).unwrap();
    for event in &events {
        file.write_all(&event::encode(Format::Json, event)).unwrap();
        file.write_all(b"\n").unwrap();
    }
    let key = Pseudonymizer::new(support::KEY.as_bytes()).unwrap();
    (path, events.iter().map(|e| key.key(&e.user_id)).collect())
}

/// `mindstream --config config ARGS`, to completion within `limit`.
fn mindstream(config: &Path, args: &[&str], limit: Duration) -> Output {
    let mut command = support::mindstream();
    command.args(["--config", config.to_str().unwrap()]).args(args);
    support::run_with_limit(command, limit)
}

/// Creates the topics, replays the purchases, runs the processor until it has caught up and
/// reads the signal topic back over `reader`; asserts that every user got a signal and that
/// no secret of the configuration reached the log.
fn signals_for_every_user(dir: &Path, config: &Path, names: &Names, reader: &ClientConfig) {
    let (input, users) = purchases(dir);
    let minute = Duration::from_secs(60);
    let topics = mindstream(config, &["topics", "--partitions", "2"], minute);
    support::assert_success(&topics, "mindstream topics");
    let input = input.to_str().unwrap();
    let replay =
        mindstream(config, &["replay", "--input", input, "--topic", &names.clicks], minute);
    support::assert_success(&replay, "mindstream replay");
    let run = mindstream(config, &["run", "--until-caught-up"], Duration::from_secs(240));
    support::assert_success(&run, "mindstream run");
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("<redacted>"), "the configuration is logged, secrets redacted:\n{log}");
    for secret in [KEY_PASSWORD, SASL_PASSWORD] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }

    let reads = read_topic(reader, &names.signals);
    let records = support::signal_records(&reads, Format::Protobuf);
    let latest = support::latest(records.into_iter().map(|(_, r)| r));
    let scored: BTreeSet<String> = latest.keys().cloned().collect();
    assert_eq!(scored, users, "{} users, {} scored\n{log}", users.len(), scored.len());
    for record in latest.values() {
        let intent = record.score("purchase_intent").map(|s| s.value);
        assert!(intent.is_some_and(|v| (0.0..=1.0).contains(&v)), "{intent:?}");
    }

    // `summary` builds a client of its own: it reads the same users back.
    let min_users = users.len().to_string();
    let summary = mindstream(config, &["summary", "--min-users", &min_users], minute);
    support::assert_success(&summary, "mindstream summary");
}

/// Every record of `topic`, read from the beginning to the end with the client `reader`.
fn read_topic(reader: &ClientConfig, topic: &str) -> Vec<support::Read> {
    let mut reader = reader.clone();
    reader.set("group.id", support::unique("reader")).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = reader.create().expect("create a TLS reader");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut ends = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        let id = partition.id();
        let (low, high) = consumer.fetch_watermarks(topic, id, Duration::from_secs(10)).unwrap();
        if high > low {
            ends.insert(id, high);
        }
        list.add_partition_offset(topic, id, Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    // Past the high watermarks the test broker may still hold the rest of a last batch.
    let mut last_record = Instant::now();
    while !ends.is_empty() || last_record.elapsed() < mindstream::ops::summary::QUIET {
        assert!(Instant::now() < deadline, "reading {topic} did not reach its end {ends:?}");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.expect("read over TLS");
        last_record = Instant::now();
        if ends.get(&message.partition()).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&message.partition());
        }
        out.push(support::Read {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            has_value: message.payload().is_some(),
            headers: BTreeMap::new(),
        });
    }
    out
}

/// Whether a client with `properties` gets the broker's metadata within `limit`.
fn gets_metadata(broker: &SecureBroker, properties: &[(&str, String)], limit: Duration) -> bool {
    let consumer: BaseConsumer = client(broker, properties).create().expect("create a client");
    consumer.fetch_metadata(None, limit).is_ok()
}

#[test]
fn processor_runs_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let broker = SecureBroker::start(&pki, None);
    let names = Names::new();
    let properties = secure_properties(&pki, false);
    let config = write_config(dir.path(), &broker, &names, &properties);
    signals_for_every_user(dir.path(), &config, &names, &client(&broker, &properties));
    assert!(broker.front.refused().is_empty(), "refused: {:?}", broker.front.refused());
}

#[test]
fn processor_runs_over_sasl_plain_inside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let broker = SecureBroker::start(&pki, Some((SASL_USER, SASL_PASSWORD)));
    let names = Names::new();
    let properties = secure_properties(&pki, true);
    let config = write_config(dir.path(), &broker, &names, &properties);
    signals_for_every_user(dir.path(), &config, &names, &client(&broker, &properties));

    assert!(broker.front.refused().is_empty(), "refused: {:?}", broker.front.refused());

    // TLS without SASL gets nothing from the broker.
    let tls_only = secure_properties(&pki, false);
    assert!(!gets_metadata(&broker, &tls_only, Duration::from_secs(5)), "no SASL, no metadata");
    assert!(broker.front.refused().contains(&"API 3 before SASL".to_owned()));

    // A tool with a wrong password fails, and the front refused that login.
    let mut wrong = properties.clone();
    for (key, value) in &mut wrong {
        if *key == "sasl.password" {
            *value = "not-the-password".to_owned();
        }
    }
    let config = write_config(dir.path(), &broker, &names, &wrong);
    let started = Instant::now();
    let summary = mindstream(&config, &["summary"], Duration::from_secs(60));
    assert!(!summary.status.success(), "summary logged in with a wrong password");
    assert!(started.elapsed() < Duration::from_secs(30), "failed after {:?}", started.elapsed());
    let login = format!("SASL login of {SASL_USER}");
    assert!(broker.front.refused().contains(&login), "{:?}", broker.front.refused());
}

#[test]
fn tls_listener_refuses_what_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let broker = SecureBroker::start(&pki, None);
    let properties = secure_properties(&pki, false);
    let five = Duration::from_secs(5);
    assert!(gets_metadata(&broker, &properties, Duration::from_secs(10)), "TLS client");

    let refused = |what: &str| broker.front.refused().iter().any(|why| why.contains(what));
    assert!(broker.front.refused().is_empty(), "refused: {:?}", broker.front.refused());

    // Plaintext on the TLS port: no metadata; the front got no TLS handshake.
    assert!(!gets_metadata(&broker, &[], five), "a plaintext client got metadata");
    assert!(refused("wrong version number"), "{:?}", broker.front.refused());

    // Without a client certificate the front ends the handshake.
    let client_side =
        |key: &str| key.starts_with("ssl.certificate.") || key.starts_with("ssl.key.");
    let anonymous: Vec<_> = properties.iter().filter(|(k, _)| !client_side(k)).cloned().collect();
    assert!(!gets_metadata(&broker, &anonymous, five), "a client without a certificate");
    assert!(refused("peer did not return a certificate"), "{:?}", broker.front.refused());

    // A processor that trusts another authority names the failed certificate check in its
    // log and gives up on the broker.
    let names = Names::new();
    let mut wrong_ca = properties.clone();
    for (key, value) in &mut wrong_ca {
        if *key == "ssl.ca.location" {
            *value = pki.other_ca.to_str().unwrap().to_owned();
        }
    }
    let config = write_config(dir.path(), &broker, &names, &wrong_ca);
    let mut processor = support::Processor::start(&config, true, dir.path().join("run.log"));
    let status = processor.wait_for_exit(Duration::from_secs(90));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{}", processor.log_tail());
    let log = processor.log();
    assert!(log.contains("certificate verify failed"), "{}", processor.log_tail());
    assert!(refused("unknown ca"), "the client did not reject the server's certificate");
}
