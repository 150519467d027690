//! Real events through the broker to signals: JSON and protobuf inputs, the DLQ, keys and
//! versions, committed offsets, and the offline scorer's agreement with the Kafka path.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use mindstream::event::{self, Format};
use mindstream::import;
use mindstream::privacy::Pseudonymizer;
use mindstream::signals::SignalRecord;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::support::{self, Broker};

/// Bad JSON lines mixed into the click stream, with the reason each must be rejected for.
const BAD_JSON: [(&str, &str); 4] = [
    ("{\"user_id\":", "malformed"),
    (
        r#"{"event_id":"x1","event_time":5,"kind":"click","action":"view","item_id":"i"}"#,
        "missing_field",
    ),
    (r#"{"user_id":"u","event_id":"x2","event_time":5,"kind":"teleport"}"#, "unknown_kind"),
    (
        concat!(
            r#"{"user_id":"u","event_id":"x3","event_time":9,"kind":"click","#,
            r#""action":"buy","item_id":"i","price":-3}"#
        ),
        "invalid_field",
    ),
];

struct Fixture {
    clicks: Vec<event::Event>,
    reviews: Vec<event::Event>,
}

fn fixture() -> Fixture {
    let data = support::sample_data();
    let mut clicks =
        import::events(import::Source::Cdnow, &data.join("purchases/cdnow-master.txt")).unwrap();
    clicks.truncate(1_500);
    let mut reviews: Vec<event::Event> = import::reviews_zh(&data.join("reviews-zh"))
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .take(150)
        .collect();
    reviews.sort_by_key(|e| e.event_time_ms);
    Fixture { clicks, reviews }
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut file = std::fs::File::create(path).unwrap();
    for line in lines {
        file.write_all(line).unwrap();
        file.write_all(b"\n").unwrap();
    }
}

#[test]
fn events_in_signals_out_with_dlq_and_commits() {
    let fixture = fixture();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let (clicks_topic, reviews_topic) = (support::unique("clicks"), support::unique("reviews"));
    let (signals_topic, dlq_topic) = (support::unique("signals"), support::unique("dlq"));
    let group = support::unique("group");
    let config = support::write_config(
        dir.path(),
        &broker,
        &group,
        &format!(
            "[[inputs]]\ntopic = \"{clicks_topic}\"\nformat = \"json\"\n\
             [[inputs]]\ntopic = \"{reviews_topic}\"\nformat = \"protobuf\"\n\
             [output]\nsignals_topic = \"{signals_topic}\"\nformat = \"protobuf\"\n\
             dlq_topic = \"{dlq_topic}\"\n\
             [scoring]\ncoalesce = \"100ms\"\nexplain_candidates = 3\n"
        ),
    );

    // The click file: real CDNOW purchases with bad lines spread through it.
    let mut click_lines: Vec<Vec<u8>> =
        fixture.clicks.iter().map(|e| event::encode(Format::Json, e)).collect();
    for (i, (bad, _)) in BAD_JSON.iter().enumerate() {
        click_lines.insert(100 + i * 300, bad.as_bytes().to_vec());
    }
    let clicks_file = dir.path().join("clicks.jsonl");
    write_lines(&clicks_file, &click_lines);
    let reviews_file = dir.path().join("reviews.jsonl");
    let review_lines: Vec<Vec<u8>> =
        fixture.reviews.iter().map(|e| event::encode(Format::Json, e)).collect();
    write_lines(&reviews_file, &review_lines);

    let mut topics = support::mindstream();
    topics.args(["--config", config.to_str().unwrap(), "topics", "--partitions", "3"]);
    support::assert_success(&support::run_with_limit(topics, Duration::from_secs(60)), "topics");
    for (file, topic, format) in
        [(&clicks_file, &clicks_topic, "json"), (&reviews_file, &reviews_topic, "protobuf")]
    {
        let mut replay = support::mindstream();
        replay.args(["--config", config.to_str().unwrap(), "replay", "--input"]);
        replay.args([file.to_str().unwrap(), "--topic", topic, "--format", format]);
        support::assert_success(
            &support::run_with_limit(replay, Duration::from_secs(60)),
            "replay",
        );
    }
    // Two records the protobuf topic cannot use: garbage, and an envelope without a body.
    let producer: BaseProducer = broker.client().create().unwrap();
    let empty_body = mindstream::proto::events::Event {
        user_id: "zhrev:x".into(),
        event_id: "x9".into(),
        event_time_ms: 1_600_000_000_000,
        ..Default::default()
    };
    let bad_protobuf: [(Vec<u8>, &str); 2] = [
        (vec![0xff, 0xff, 0xff, 0x07], "malformed"),
        (prost::Message::encode_to_vec(&empty_body), "missing_field"),
    ];
    for (payload, _) in &bad_protobuf {
        producer.send(BaseRecord::<(), _>::to(&reviews_topic).payload(payload)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let mut run = support::mindstream();
    run.args(["--config", config.to_str().unwrap(), "run", "--until-caught-up"]);
    let output = support::run_with_limit(run, Duration::from_secs(240));
    support::assert_success(&output, "mindstream run");

    // DLQ: every bad record once, with its reason, source and original bytes.
    let dlq = support::read_all(&broker, &dlq_topic);
    let mut reasons: Vec<String> =
        dlq.iter().map(|r| r.headers["mindstream.reason"].clone()).collect();
    reasons.sort();
    let mut expected: Vec<String> = BAD_JSON
        .iter()
        .map(|(_, r)| r.to_string())
        .chain(bad_protobuf.iter().map(|(_, r)| r.to_string()))
        .collect();
    expected.sort();
    let details: Vec<&String> = dlq.iter().map(|r| &r.headers["mindstream.detail"]).collect();
    assert_eq!(reasons, expected, "{details:?}");
    for read in &dlq {
        let source = &read.headers["mindstream.source.topic"];
        assert!(source == &clicks_topic || source == &reviews_topic);
        assert!(read.headers["mindstream.source.offset"].parse::<i64>().is_ok());
        let original = BAD_JSON.iter().any(|(b, _)| b.as_bytes() == read.payload)
            || bad_protobuf.iter().any(|(b, _)| *b == read.payload);
        assert!(original, "the DLQ keeps the original bytes");
    }

    // Signals: one key per user, keyed by the pseudonym, versions rising per user.
    let key = Pseudonymizer::new(support::KEY.as_bytes()).unwrap();
    let users: BTreeSet<String> =
        fixture.clicks.iter().chain(&fixture.reviews).map(|e| key.key(&e.user_id)).collect();
    let reads = support::read_all(&broker, &signals_topic);
    for read in &reads {
        let record = mindstream::signals::decode(Format::Protobuf, &read.payload).unwrap();
        assert_eq!(read.key.as_deref(), Some(record.user_key.as_bytes()), "record key");
    }
    let records = support::signal_records(&reads, Format::Protobuf);
    let mut last_version: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, record) in &records {
        if let Some(previous) = last_version.insert(&record.user_key, record.version) {
            assert!(record.version > previous, "versions rise per user in topic order");
        }
    }
    let latest = support::latest(records.iter().map(|(_, r)| r.clone()));
    let scored: BTreeSet<String> = latest.keys().cloned().collect();
    let raw: BTreeMap<String, &str> = fixture
        .clicks
        .iter()
        .chain(&fixture.reviews)
        .map(|e| (key.key(&e.user_id), e.user_id.as_str()))
        .collect();
    let missing: Vec<&str> = users.difference(&scored).take(5).map(|k| raw[k]).collect();
    let extra: Vec<&String> = scored.difference(&users).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} users, {} scored in {} records; missing {missing:?}, unexpected {extra:?}\n{}",
        users.len(),
        scored.len(),
        records.len(),
        String::from_utf8_lossy(&output.stderr)
    );
    let reviewer_keys: BTreeSet<String> =
        fixture.reviews.iter().map(|e| key.key(&e.user_id)).collect();
    for record in latest.values() {
        assert!(record.scores.iter().all(|s| (0.0..=1.0).contains(&s.value)));
        let reviewer = reviewer_keys.contains(&record.user_key);
        assert_eq!(record.score("purchase_intent").is_some(), !reviewer, "click heads");
        assert_eq!(record.score("sentiment").is_some(), reviewer, "review heads");
        assert!(!record.lineage.topic.is_empty() && record.lineage.offset >= 0);
    }
    let reviewers: Vec<&SignalRecord> =
        latest.values().filter(|r| r.score("sentiment").is_some()).collect();
    assert_eq!(reviewers.len(), fixture.reviews.len(), "each review window gets a sentiment");

    // Offsets: committed up to the end of every input partition.
    for topic in [&clicks_topic, &reviews_topic] {
        for (partition, committed, end) in support::committed_and_end(&broker, &group, topic) {
            assert_eq!(committed, end, "{topic}[{partition}] committed offset");
        }
    }

    // The offline scorer agrees with the Kafka path on every user's latest record.
    let offline_input = dir.path().join("all.jsonl");
    let mut all = click_lines.clone();
    all.extend(review_lines);
    write_lines(&offline_input, &all);
    let offline = offline_scores(&config, &offline_input, &dir.path().join("signals.jsonl"));
    assert_eq!(offline.len(), latest.len());
    for record in &offline {
        let kafka = &latest[&record.user_key];
        assert_same_signal(record, kafka);
    }
}

/// `mindstream score` over the event file `input`: each user's latest record, written to
/// `output` and read back.
fn offline_scores(config: &Path, input: &Path, output: &Path) -> Vec<SignalRecord> {
    let mut score = support::mindstream();
    score.args(["--config", config.to_str().unwrap(), "score", "--input"]);
    score.args([input.to_str().unwrap(), "--output"]);
    score.arg(output);
    support::assert_success(&support::run_with_limit(score, Duration::from_secs(240)), "score");
    std::fs::read_to_string(output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Equal records apart from lineage and production time (scores within float noise from
/// different batch shapes).
fn assert_same_signal(offline: &SignalRecord, kafka: &SignalRecord) {
    let who = &offline.user_key;
    assert_eq!(offline.version, kafka.version, "{who} version");
    assert_eq!(offline.model_version, kafka.model_version);
    assert_eq!(
        (offline.window_start_ms, offline.window_end_ms, offline.event_count),
        (kafka.window_start_ms, kafka.window_end_ms, kafka.event_count),
        "{who} window"
    );
    assert_eq!(offline.interests, kafka.interests, "{who} interests");
    assert_eq!(offline.scores.len(), kafka.scores.len(), "{who} signals");
    for (a, b) in offline.scores.iter().zip(&kafka.scores) {
        assert_eq!(a.signal, b.signal);
        assert!((a.value - b.value).abs() < 1e-4, "{who} {}: {} vs {}", a.signal, a.value, b.value);
        assert_eq!(a.top_events.len(), b.top_events.len(), "{who} {} explanation", a.signal);
        for (i, (x, y)) in a.top_events.iter().zip(&b.top_events).enumerate() {
            assert!((x.delta - y.delta).abs() < 1e-4, "{who} {} delta {i}", a.signal);
        }
        // Events clearly above the last listed one must be named by both; near the cut, ties
        // with events left out of the list may swap.
        let cut = a.top_events.last().map_or(0.0, |c| c.delta.abs()) + 2e-4;
        for x in a.top_events.iter().filter(|x| x.delta.abs() > cut) {
            let named = b.top_events.iter().any(|y| y.event_id == x.event_id);
            assert!(named, "{who} {} names {}", a.signal, x.event_id);
        }
    }
}

/// A backlog larger than `scoring.max_waiting` pauses the input, which resumes once half of
/// it is scored; nothing read before a pause is lost or scored twice, and every offset is
/// committed at the end.
#[test]
fn backpressure_pauses_and_resumes_without_losing_events() {
    let fixture = fixture();
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let (clicks_topic, signals_topic) = (support::unique("clicks"), support::unique("signals"));
    let group = support::unique("group");
    const MAX_WAITING: usize = 16;
    let config = support::write_config(
        dir.path(),
        &broker,
        &group,
        &format!(
            "[[inputs]]\ntopic = \"{clicks_topic}\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"{signals_topic}\"\nformat = \"json\"\n\
             dlq_topic = \"{}\"\n\
             [scoring]\ncoalesce = \"10ms\"\nqueue_capacity = 4\nbatch_size = 4\n\
             max_waiting = {MAX_WAITING}\nexplain_candidates = 0\n\
             [log]\nformat = \"json\"\nfilter = \"info\"\n",
            support::unique("dlq")
        ),
    );
    let lines: Vec<Vec<u8>> =
        fixture.clicks.iter().map(|e| event::encode(Format::Json, e)).collect();
    let clicks_file = dir.path().join("clicks.jsonl");
    write_lines(&clicks_file, &lines);
    let mut topics = support::mindstream();
    topics.args(["--config", config.to_str().unwrap(), "topics", "--partitions", "3"]);
    support::assert_success(&support::run_with_limit(topics, Duration::from_secs(60)), "topics");
    let mut replay = support::mindstream();
    replay.args(["--config", config.to_str().unwrap(), "replay", "--input"]);
    replay.args([clicks_file.to_str().unwrap(), "--topic", &clicks_topic, "--format", "json"]);
    support::assert_success(&support::run_with_limit(replay, Duration::from_secs(60)), "replay");

    let mut processor = support::Processor::start(&config, true, dir.path().join("run.log"));
    let status = processor.wait_for_exit(Duration::from_secs(240));
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", processor.log_tail());

    // The input paused above the limit and resumed at half of it, in turns.
    let turns = processor.log_events("scoring backpressure");
    assert!(turns.len() >= 2, "no pause and resume:\n{}", processor.log_tail());
    for (i, turn) in turns.iter().enumerate() {
        let (paused, waiting) = (turn["paused"].as_bool(), turn["waiting"].as_u64());
        let waiting = waiting.unwrap() as usize;
        if i % 2 == 0 {
            assert_eq!(paused, Some(true), "turn {i}: {turn}");
            assert!(waiting > MAX_WAITING, "turn {i}: {turn}");
        } else {
            assert_eq!(paused, Some(false), "turn {i}: {turn}");
            assert!(waiting <= MAX_WAITING / 2, "turn {i}: {turn}");
        }
    }

    // Every user's latest record covers all of its events: the same as the offline scorer's.
    let records =
        support::signal_records(&support::read_all(&broker, &signals_topic), Format::Json);
    let mut versions = BTreeSet::new();
    for (_, record) in &records {
        assert!(versions.insert((record.user_key.clone(), record.version)), "scored twice");
    }
    let latest = support::latest(records.into_iter().map(|(_, r)| r));
    let offline = offline_scores(&config, &clicks_file, &dir.path().join("signals.jsonl"));
    assert_eq!(offline.len(), latest.len(), "users scored");
    for record in &offline {
        let kafka = &latest[&record.user_key];
        assert_eq!(
            (record.event_count, record.window_end_ms),
            (kafka.event_count, kafka.window_end_ms),
            "{} window",
            record.user_key
        );
    }
    for (partition, committed, end) in support::committed_and_end(&broker, &group, &clicks_topic) {
        assert_eq!(committed, end, "{clicks_topic}[{partition}] committed offset");
    }
}
