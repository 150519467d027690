//! Privacy through the real broker: personal data planted in real reviews appears nowhere the
//! processor writes (log, metrics, the lookup, signal, changelog and DLQ topics) except in the
//! DLQ's copy of the original bytes; a delete-user request erases the user's state and latest
//! record; opted-out users are not scored and their state is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use mindstream::event::{self, Action, Click, Event, EventBody, Format};
use mindstream::import;
use mindstream::privacy::Pseudonymizer;
use mindstream::signals::SignalRecord;

use crate::support::{self, Broker, Processor, Read};

/// Longest wait for the processor to reach an expected state.
const PATIENCE: Duration = Duration::from_secs(120);

/// Personal data written into review texts, as shoppers write it.
fn planted() -> Vec<String> {
    vec![
        "li.wei.1988@example.com".into(),
        "zhang_san@mail.example.cn".into(),
        "13800138000".into(),
        "139 1234 5678".into(),
        "+86 137-0000-1234".into(),
        "+44 20 7946 0958".into(),
        "１３９１２３４５６７８".into(),
        "4111 1111 1111 1111".into(),
        "5500-0000-0000-0004".into(),
        cn_id("11010519491231002"),
        cn_id("44030419900307661"),
    ]
}

/// A Chinese resident ID number with its ISO 7064 MOD 11-2 check character.
fn cn_id(first17: &str) -> String {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17.chars().zip(WEIGHTS).map(|(c, w)| c.to_digit(10).unwrap() * w).sum();
    let check = ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'][(sum % 11) as usize];
    format!("{first17}{check}")
}

/// The digits of `text`, to catch a number that reappears with other grouping.
fn digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

#[test]
fn planted_personal_data_never_leaves_except_in_dlq_originals() {
    let pii = planted();
    let data = support::sample_data();
    let mut reviews: Vec<Event> = import::reviews_zh(&data.join("reviews-zh"))
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    reviews.truncate(240);
    reviews.sort_by_key(|e| e.event_time_ms);
    let raw_ids: BTreeSet<String> = reviews.iter().map(|e| e.user_id.to_string()).collect();
    for (i, review) in reviews.iter_mut().enumerate() {
        if let EventBody::Review(r) = &mut review.body {
            let secret = &pii[i % pii.len()];
            r.text = match i % 3 {
                0 => format!("{} 联系我 {secret}", r.text),
                1 => format!("Call me on {secret} if it breaks. {}", r.text),
                _ => format!("{}（{secret}）", r.text),
            };
        }
    }
    let mut lines: Vec<Vec<u8>> = reviews.iter().map(|e| event::encode(Format::Json, e)).collect();
    // Rejected records carrying personal data: kept in the DLQ as they came, never quoted.
    let rejected = [
        format!(r#"{{"user_id":"u-dlq-1","event_id":"d1","kind":"review","text":"{}"}}"#, pii[0]),
        format!(
            concat!(
                r#"{{"user_id":"u-dlq-2","event_id":"d2","event_time":5,"#,
                r#""kind":"teleport","text":"{}"}}"#
            ),
            pii[2]
        ),
        format!(
            r#"{{"user_id":"{}","event_id":"d3","event_time":"soon","kind":"review"}}"#,
            pii[8]
        ),
    ];
    for (i, bad) in rejected.iter().enumerate() {
        lines.insert(30 + i * 50, bad.as_bytes().to_vec());
    }

    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", support::free_port());
    let lane = Lane::new(&broker, dir.path(), &http, "debug,rdkafka=info");
    lane.replay(&lines, dir.path());
    let mut processor = Processor::start(&lane.config, false, dir.path().join("processor.log"));
    let users: BTreeSet<String> =
        raw_ids.iter().map(|id| lane.key.key(id)).collect::<BTreeSet<_>>();
    let latest = lane.wait_for_users(&broker, &users, &mut processor);
    let scrape = support::http_get(&http, "/metrics").map(|(_, body)| body).unwrap_or_default();
    let mut looked_up = String::new();
    for key in latest.keys().take(20) {
        if let Some((_, body)) = support::http_get(&http, &format!("/users/{key}/signals")) {
            looked_up.push_str(&body);
        }
    }
    processor.signal("TERM");
    assert!(processor.wait_for_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));

    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("the log".into(), processor.log().into_bytes()),
        ("/metrics".into(), scrape.into_bytes()),
        ("the lookup".into(), looked_up.into_bytes()),
    ];
    for topic in [&lane.signals, &lane.changelog] {
        for read in support::read_all(&broker, topic) {
            outputs.push((format!("{topic} key"), read.key.clone().unwrap_or_default()));
            outputs.push((format!("{topic}[{}]@{}", read.partition, read.offset), read.payload));
        }
    }
    let dlq = support::read_all(&broker, &lane.dlq);
    assert_eq!(dlq.len(), rejected.len(), "every rejected record reaches the DLQ");
    for read in &dlq {
        assert!(rejected.iter().any(|r| r.as_bytes() == read.payload), "original bytes kept");
        let headers: String = read.headers.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        // The key and the payload are the original record's; only the headers are ours.
        outputs.push((format!("DLQ headers @{}", read.offset), headers.into_bytes()));
    }

    let mut leaks = Vec::new();
    for (place, bytes) in &outputs {
        let text = String::from_utf8_lossy(bytes);
        let text_digits = digits(&text);
        for secret in &pii {
            let found = text.contains(secret.as_str())
                || (digits(secret).len() >= 11 && text_digits.contains(&digits(secret)));
            if found {
                leaks.push(format!("{secret:?} in {place}"));
            }
        }
        for raw in &raw_ids {
            if text.contains(raw.as_str()) {
                leaks.push(format!("raw user id {raw:?} in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "{} leaks:\n{}", leaks.len(), leaks.join("\n"));
    let scrubbed = outputs.iter().any(|(_, b)| String::from_utf8_lossy(b).contains("[phone]"));
    assert!(scrubbed, "the placeholders reach the changelog state");
}

#[test]
fn delete_user_and_opt_out_through_the_broker() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", support::free_port());
    let lane = Lane::new(&broker, dir.path(), &http, "info");
    // Four shoppers: one to delete, one who opts out half-way, one opted out from the start,
    // and one who stays, each with six real-looking clicks.
    let (erased, quitting, never, staying) =
        ("shopper-erase", "shopper-quit", "shopper-never", "shopper-stay");
    let mut before = Vec::new();
    let mut opting_out = Vec::new();
    for (u, user) in [erased, quitting, never, staying].into_iter().enumerate() {
        for i in 0..6 {
            let mut event = click(user, i, 1_700_000_000_000 + (u * 100 + i) as i64 * 60_000);
            event.opt_out = user == never || (user == quitting && i >= 3);
            let line = event::encode(Format::Json, &event);
            if user == quitting && i >= 3 {
                opting_out.push(line);
            } else {
                before.push(line);
            }
        }
    }
    lane.replay(&before, dir.path());
    let mut processor = Processor::start(&lane.config, false, dir.path().join("processor.log"));
    let keys: BTreeMap<&str, String> =
        [erased, quitting, never, staying].into_iter().map(|u| (u, lane.key.key(u))).collect();
    let expected: BTreeSet<String> =
        [keys[erased].clone(), keys[staying].clone(), keys[quitting].clone()].into();
    let latest = lane.wait_for_users(&broker, &expected, &mut processor);
    assert!(!latest.contains_key(&keys[never]), "a user opted out from the start is never scored");

    // The quitting user opts out once scored: their state goes, and they are scored no more.
    lane.replay(&opting_out, dir.path());
    wait_for_tombstone(&broker, &lane.changelog, &keys[quitting], &processor, "the opt-out");
    let lookup =
        |key: &str| support::http_get(&http, &format!("/users/{key}/signals")).map(|(s, _)| s);
    assert_eq!(lookup(&keys[erased]), Some(200), "the user is served before the deletion");

    let mut delete = support::mindstream();
    delete.args(["--config", lane.config.to_str().unwrap(), "delete-user", "--user-id", erased]);
    support::assert_success(
        &support::run_with_limit(delete, Duration::from_secs(60)),
        "delete-user",
    );
    wait_for_tombstone(&broker, &lane.signals, &keys[erased], &processor, "the deletion");
    assert_eq!(lookup(&keys[erased]), Some(404), "the lookup forgets a deleted user");
    assert_eq!(lookup(&keys[staying]), Some(200));
    let scrape = support::http_get(&http, "/metrics").map(|(_, b)| b).unwrap_or_default();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("mindstream_users_deleted_total") && l.ends_with(" 1")),
        "one deletion counted:\n{scrape}"
    );
    processor.signal("TERM");
    assert!(processor.wait_for_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));

    // The signal topic: the deleted user's last record is a tombstone; the opted-out user's
    // records all cover events before the opt-out.
    let signals = support::read_all(&broker, &lane.signals);
    let last = last_by_key(&signals);
    assert!(last[&keys[erased]].payload.is_empty(), "the deleted user ends in a tombstone");
    assert!(!last[&keys[staying]].payload.is_empty());
    let quit_offsets: Vec<i64> = signals
        .iter()
        .filter(|r| r.key.as_deref() == Some(keys[quitting].as_bytes()) && !r.payload.is_empty())
        .map(|r| decode(r).lineage.offset)
        .collect();
    assert!(!quit_offsets.is_empty(), "the quitting user was scored before opting out");
    let opt_out_offset = lane.offset_of(&broker, quitting, 3);
    assert!(
        quit_offsets.iter().all(|&o| o < opt_out_offset),
        "records after the opt-out at offset {opt_out_offset}: {quit_offsets:?}"
    );

    // The changelog: tombstones for the deleted and both opted-out users, state for the other.
    let changelog_reads = support::read_all(&broker, &lane.changelog);
    let changelog = last_by_key(&changelog_reads);
    for user in [erased, quitting] {
        assert!(changelog[&keys[user]].payload.is_empty(), "{user}'s state is deleted");
    }
    assert!(changelog.get(&keys[never]).is_none_or(|r| r.payload.is_empty()));
    assert!(!changelog[&keys[staying]].payload.is_empty(), "the staying user keeps state");
}

fn click(user: &str, i: usize, time_ms: i64) -> Event {
    Event {
        user_id: user.into(),
        event_id: compact_str::format_compact!("{user}-{i}"),
        event_time_ms: time_ms,
        opt_out: false,
        body: EventBody::Click(Click {
            action: if i % 3 == 2 { Action::Cart } else { Action::View },
            item_id: compact_str::format_compact!("item-{}", 100 + i),
            category_id: "cat-7".into(),
            price: Some(19.5 + i as f64),
            discount: None,
            quantity: None,
        }),
    }
}

fn decode(read: &Read) -> SignalRecord {
    mindstream::signals::decode(Format::Json, &read.payload).expect("a signal record")
}

/// The last record of each key, in topic order.
fn last_by_key(reads: &[Read]) -> BTreeMap<String, &Read> {
    let mut last = BTreeMap::new();
    for read in reads {
        if let Some(key) = &read.key {
            last.insert(String::from_utf8_lossy(key).into_owned(), read);
        }
    }
    last
}

/// Waits until the latest record of `key` on `topic` is a tombstone, written after `what`.
fn wait_for_tombstone(broker: &Broker, topic: &str, key: &str, run: &Processor, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !tombstones(broker, topic).contains_key(key) {
        assert!(
            Instant::now() < deadline,
            "no tombstone on {topic} after {what}\n{}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Keys whose latest record on `topic` is a tombstone.
fn tombstones(broker: &Broker, topic: &str) -> BTreeMap<String, i64> {
    let reads = support::read_all(broker, topic);
    last_by_key(&reads)
        .into_iter()
        .filter(|(_, r)| r.payload.is_empty())
        .map(|(k, r)| (k, r.offset))
        .collect()
}

/// One deployment's topics and configuration (JSON in and out, two partitions).
struct Lane {
    config: std::path::PathBuf,
    input: String,
    signals: String,
    dlq: String,
    changelog: String,
    key: Pseudonymizer,
}

impl Lane {
    fn new(broker: &Broker, dir: &Path, http: &str, log_filter: &str) -> Lane {
        let (input, signals) = (support::unique("in"), support::unique("signals"));
        let (dlq, changelog) = (support::unique("dlq"), support::unique("state"));
        let config = support::write_config(
            dir,
            broker,
            &support::unique("group"),
            &format!(
                "[[inputs]]\ntopic = \"{input}\"\nformat = \"json\"\n\
                 [output]\nsignals_topic = \"{signals}\"\nformat = \"json\"\n\
                 dlq_topic = \"{dlq}\"\n\
                 [state]\nchangelog_topic = \"{changelog}\"\n\
                 [scoring]\ncoalesce = \"50ms\"\nexplain_candidates = 2\n\
                 [http]\nlisten = \"{http}\"\n\
                 [log]\nformat = \"json\"\nfilter = \"{log_filter}\"\n"
            ),
        );
        let mut topics = support::mindstream();
        topics.args(["--config", config.to_str().unwrap(), "topics", "--partitions", "2"]);
        support::assert_success(
            &support::run_with_limit(topics, Duration::from_secs(60)),
            "topics",
        );
        let key = Pseudonymizer::new(support::KEY.as_bytes()).unwrap();
        Lane { config, input, signals, dlq, changelog, key }
    }

    fn replay(&self, lines: &[Vec<u8>], dir: &Path) {
        let file = dir.join(format!("{}.jsonl", support::unique("part")));
        let mut out = std::fs::File::create(&file).unwrap();
        for line in lines {
            out.write_all(line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        let mut replay = support::mindstream();
        replay.args(["--config", self.config.to_str().unwrap(), "replay", "--input"]);
        replay.args([file.to_str().unwrap(), "--topic", &self.input, "--format", "json"]);
        support::assert_success(
            &support::run_with_limit(replay, Duration::from_secs(60)),
            "replay",
        );
    }

    /// Waits until every key in `users` has a record on the signal topic; returns each
    /// user's latest record.
    fn wait_for_users(
        &self,
        broker: &Broker,
        users: &BTreeSet<String>,
        processor: &mut Processor,
    ) -> BTreeMap<String, SignalRecord> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let reads = support::read_all(broker, &self.signals);
            let records = reads.iter().filter(|r| !r.payload.is_empty()).map(decode);
            let latest = support::latest(records);
            if users.iter().all(|u| latest.contains_key(u)) {
                return latest;
            }
            assert!(processor.exited().is_none(), "the processor exited\n{}", processor.log_tail());
            assert!(
                Instant::now() < deadline,
                "{} of {} users scored\n{}",
                users.iter().filter(|u| latest.contains_key(*u)).count(),
                users.len(),
                processor.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The input offset of `user`'s `index`th event.
    fn offset_of(&self, broker: &Broker, user: &str, index: usize) -> i64 {
        let event_id = format!("{user}-{index}");
        support::read_all(broker, &self.input)
            .iter()
            .find(|r| event::decode(Format::Json, &r.payload).is_ok_and(|e| e.event_id == event_id))
            .map(|r| r.offset)
            .expect("the event is in the input topic")
    }
}
