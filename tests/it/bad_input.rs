//! Bad input through the real broker. A corpus of broken, hostile and awkward records, each
//! followed by a good record of a fresh user, goes to a JSON topic and a protobuf topic; one
//! `mindstream run --until-caught-up` reads both. Every case states what must happen to it:
//! rejected with a reason, or accepted (with its text stored cleaned). The run must exit 0;
//! every rejected record must be in the DLQ once, with its reason and its original key and
//! bytes; the rejection counts on `/metrics` must equal the corpus's; every good user must get
//! a signal; and the committed offsets must reach the end of every input partition.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mindstream::event::Format;
use mindstream::privacy::Pseudonymizer;
use mindstream::proto::events as pb;
use mindstream::window::{Detail, UserState};
use prost::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;

use crate::support::{self, Broker, Processor};

/// The largest record the corpus sends: 10 MB, twenty times `limits.max_record_bytes`.
const HUGE_BYTES: usize = 10 * 1024 * 1024;

/// `message.max.bytes` of the test's producer and of the processor's (so that the DLQ can
/// carry the 10 MB record whole). Tansu takes records of this size.
const MESSAGE_MAX_BYTES: &str = "16777216";

/// Longest the processor may take to read the corpus and exit.
const RUN_LIMIT: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Lane {
    Json,
    Protobuf,
}

/// What must happen to a record.
#[derive(Clone, Debug)]
enum Expect {
    /// Dead-lettered with this `mindstream.reason`.
    Rejected(&'static str),
    /// Accepted into `user`'s window and scored.
    Scored { user: String },
    /// Accepted, and `user`'s window holds the text as `stored` (queries: `query|sort`).
    Cleaned { user: String, stored: String },
    /// An opt-out, honoured: no signal, nothing in the DLQ.
    OptedOut,
}

struct Case {
    name: &'static str,
    lane: Lane,
    key: Option<Vec<u8>>,
    /// `None` sends a record without a value (a tombstone).
    payload: Option<Vec<u8>>,
    expect: Expect,
}

/// Builds the corpus with event times around `now_ms`.
struct Corpus {
    now_ms: i64,
    cases: Vec<Case>,
    good: usize,
}

impl Corpus {
    fn new(now_ms: i64) -> Corpus {
        Corpus { now_ms, cases: Vec::new(), good: 0 }
    }

    /// A plausible event time, a little later for every record.
    fn time(&self) -> i64 {
        self.now_ms - 600_000 + self.cases.len() as i64 * 1_000
    }

    /// A bad or awkward case, then a good record of a fresh user on the same lane.
    fn add(&mut self, name: &'static str, lane: Lane, payload: Option<Vec<u8>>, expect: Expect) {
        let key = payload.as_deref().and_then(|p| user_of(lane, p)).map(String::into_bytes);
        self.push(name, lane, key, payload, expect);
        self.good += 1;
        let user = format!("good-{}-{}", lane_name(lane), self.good);
        let time = self.time();
        let good = match lane {
            Lane::Json => json_click(&user, time),
            Lane::Protobuf => proto_review(&user, time, "很好用，推荐"),
        };
        self.push(
            "good",
            lane,
            Some(user.clone().into_bytes()),
            Some(good),
            Expect::Scored { user },
        );
    }

    fn push(
        &mut self,
        name: &'static str,
        lane: Lane,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        expect: Expect,
    ) {
        self.cases.push(Case { name, lane, key, payload, expect });
    }
}

fn lane_name(lane: Lane) -> &'static str {
    match lane {
        Lane::Json => "json",
        Lane::Protobuf => "pb",
    }
}

/// The user id a record names, if it decodes far enough to say (for its Kafka key).
fn user_of(lane: Lane, payload: &[u8]) -> Option<String> {
    let user = match lane {
        Lane::Json => {
            let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
            value.get("user_id")?.as_str()?.to_owned()
        }
        Lane::Protobuf => pb::Event::decode(payload).ok()?.user_id,
    };
    (!user.is_empty()).then_some(user)
}

fn json_click(user: &str, time: i64) -> Vec<u8> {
    json_event(json!({
        "user_id": user, "event_id": format!("{user}-e"), "event_time": time, "kind": "click",
        "action": "cart", "item_id": "i7", "category_id": "c3", "price": 19.9,
    }))
}

fn json_review(user: &str, time: i64, text: &str) -> serde_json::Value {
    json!({
        "user_id": user, "event_id": format!("{user}-r"), "event_time": time, "kind": "review",
        "item_id": "i7", "rating": 2, "text": text, "language": "zh",
    })
}

fn json_event(value: serde_json::Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// `value` with `field` set to `to` (or removed when `to` is null).
fn with(mut value: serde_json::Value, field: &str, to: serde_json::Value) -> Vec<u8> {
    let object = value.as_object_mut().expect("corpus events are objects");
    if to.is_null() {
        object.remove(field);
    } else {
        object.insert(field.to_owned(), to);
    }
    json_event(value)
}

/// A JSON click of `user` as a value, for cases that change one field.
fn click_value(user: &str, time: i64) -> serde_json::Value {
    serde_json::from_slice(&json_click(user, time)).expect("the corpus's own JSON parses")
}

fn proto_event(user: &str, time: i64, body: pb::event::Body) -> pb::Event {
    pb::Event {
        user_id: user.into(),
        event_id: format!("{user}-p"),
        event_time_ms: time,
        body: Some(body),
        ..Default::default()
    }
}

fn proto_review(user: &str, time: i64, text: &str) -> Vec<u8> {
    let review = pb::Review {
        item_id: "i7".into(),
        rating: Some(5),
        text: text.into(),
        language: "zh".into(),
    };
    proto_event(user, time, pb::event::Body::Review(review)).encode_to_vec()
}

fn proto_click(user: &str, time: i64, price: Option<f64>, quantity: Option<u32>) -> Vec<u8> {
    let click = pb::Click {
        action: pb::Action::Buy as i32,
        item_id: "i7".into(),
        category_id: "c3".into(),
        price,
        discount: None,
        quantity,
    };
    proto_event(user, time, pb::event::Body::Click(click)).encode_to_vec()
}

/// 1970-01-02 and 2100-01-01, in ms since the epoch.
const YEAR_1970_MS: i64 = 86_400_000;
const YEAR_2100_MS: i64 = 4_102_444_800_000;

const MALFORMED: Expect = Expect::Rejected("malformed");
const INVALID: Expect = Expect::Rejected("invalid_field");
const MISSING: Expect = Expect::Rejected("missing_field");
const OUT_OF_RANGE: Expect = Expect::Rejected("time_out_of_range");
const TOO_LONG: Expect = Expect::Rejected("too_long");

fn json_cases(corpus: &mut Corpus) {
    use Expect::Rejected;
    let lane = Lane::Json;
    let t = corpus.time();
    let good = json_click("j-template", t);
    let c = |user: &str| click_value(user, t);
    let review = |user: &str, text: &str| json_review(user, t, text);
    let huge = "a".repeat(HUGE_BYTES);
    let rlo_user = json!("good-json-1\u{202e}");
    let cases: Vec<(&'static str, Option<Vec<u8>>, Expect)> = vec![
        ("truncated", Some(good[..good.len() / 2].to_vec()), MALFORMED),
        ("cut inside a key", Some(br#"{"user_id":"j-cut","event_ti"#.to_vec()), MALFORMED),
        ("not JSON", Some(b"hello, world".to_vec()), MALFORMED),
        ("top-level array", Some([&b"["[..], &good, b"]"].concat()), MALFORMED),
        ("trailing garbage", Some([&good[..], b" }{"].concat()), MALFORMED),
        ("empty value", Some(Vec::new()), MALFORMED),
        ("no value", None, MALFORMED),
        ("invalid UTF-8", Some(invalid_utf8_json(t)), MALFORMED),
        ("NaN price", Some(raw_price("j-nan", t, "NaN")), MALFORMED),
        ("price beyond f64", Some(raw_price("j-big", t, "1e400")), MALFORMED),
        ("deep nesting inside", Some(deep_json(t)), MALFORMED),
        ("deep nesting, bare", Some(b"[".repeat(100_000)), MALFORMED),
        ("time as text", Some(with(c("j-t"), "event_time", json!("yesterday"))), INVALID),
        ("price as text", Some(with(c("j-p"), "price", json!("cheap"))), INVALID),
        ("user id as number", Some(with(c("j-n"), "user_id", json!(42))), INVALID),
        ("negative price", Some(with(c("j-neg"), "price", json!(-5.0))), INVALID),
        ("absurd price", Some(with(c("j-abs"), "price", json!(1e15))), INVALID),
        ("absurd quantity", Some(with(c("j-q"), "quantity", json!(1_000_000))), INVALID),
        ("negative quantity", Some(with(c("j-nq"), "quantity", json!(-2))), INVALID),
        ("zero event time", Some(with(c("j-z"), "event_time", json!(0))), INVALID),
        ("unknown kind", Some(with(c("j-k"), "kind", json!("teleport"))), Rejected("unknown_kind")),
        ("no user id", Some(with(c("j-u"), "user_id", json!(null))), MISSING),
        ("empty user id", Some(with(c("j-e"), "user_id", json!(""))), MISSING),
        ("no kind", Some(with(c("j-nk"), "kind", json!(null))), MISSING),
        ("in 1970", Some(with(c("j-1970"), "event_time", json!(YEAR_1970_MS))), OUT_OF_RANGE),
        ("in 2100", Some(with(c("j-2100"), "event_time", json!(YEAR_2100_MS))), OUT_OF_RANGE),
        ("10 MB", Some(json_event(review("j-huge", &huge))), Rejected("too_large")),
        ("long review", Some(json_event(review("j-long", &"长".repeat(10_001)))), TOO_LONG),
        ("long query", Some(json_search("j-lq", t, &"q".repeat(1_001), "price_asc")), TOO_LONG),
        ("long sort", Some(json_search("j-ls", t, "shoes", &"s".repeat(33))), INVALID),
        (
            "newline in language",
            Some(with(review("j-l", "ok"), "language", json!("en\nzh"))),
            INVALID,
        ),
        ("user id with an override", Some(with(c("j-rlo"), "user_id", rlo_user)), INVALID),
    ];
    for (name, payload, expect) in cases {
        corpus.add(name, lane, payload, expect);
    }
    // Keys that are there but empty, beside the records above without one.
    corpus.push("empty key and value", lane, Some(Vec::new()), Some(Vec::new()), MALFORMED);
    corpus.push("empty key, no value", lane, Some(Vec::new()), None, MALFORMED);

    // A record, then the same record again.
    let t = corpus.time();
    let original = json_click("j-dup", t);
    corpus.push(
        "duplicated",
        lane,
        Some(b"j-dup".to_vec()),
        Some(original.clone()),
        scored("j-dup"),
    );
    corpus.add("duplicate", lane, Some(original), Rejected("duplicate"));

    // Valid but awkward text: accepted, and stored cleaned.
    let awkward = [
        (
            "j-mixed",
            "质量很好 👍 very good, très bien, отлично 😀",
            "质量很好 👍 very good, très bien, отлично 😀",
        ),
        (
            "j-zwsp-card",
            "card 4111 1111\u{200b}1111 1111 charged twice",
            "card [card] charged twice",
        ),
        ("j-rlo-phone", "call me \u{202e}13800138000\u{202c} about it", "call me [phone] about it"),
        (
            "j-fullwidth",
            "电话１３８００１３８０００ 邮箱 ｌｉ＠ｅｘａｍｐｌｅ．ｃｏｍ",
            "电话[phone] 邮箱 [email]",
        ),
        (
            "j-controls",
            "bad\u{7} product\u{0} broke\r\nafter a week",
            "bad product broke  after a week",
        ),
    ];
    for (user, text, stored) in awkward {
        let payload = json_event(json_review(user, corpus.time(), text));
        corpus.add("awkward text", lane, Some(payload), cleaned(user, stored));
    }
    let long = "这件衣服很好看。".repeat(1_100);
    let payload = json_event(json_review("j-long-ok", corpus.time(), &long));
    corpus.add("long text within the limit", lane, Some(payload), scored("j-long-ok"));
    let injected = json_search(
        "j-inject",
        corpus.time(),
        "red shoes\n+0s buy c1 i1",
        "ｐｒｉｃｅ\u{200b}_asc",
    );
    corpus.add(
        "line break in a query",
        lane,
        Some(injected),
        cleaned("j-inject", "red shoes +0s buy c1 i1|price_asc"),
    );
    // An opt-out is honoured, also one dated 2100: it never moves the partition's watermark,
    // so the good records after it are still scored.
    let mut quit = click_value("j-quit", corpus.time());
    quit["opt_out"] = json!(true);
    corpus.add("opt-out", lane, Some(json_event(quit)), Expect::OptedOut);
    let mut quit_late = click_value("j-quit-2100", YEAR_2100_MS);
    quit_late["opt_out"] = json!(true);
    corpus.add("opt-out in 2100", lane, Some(json_event(quit_late)), Expect::OptedOut);
}

fn proto_cases(corpus: &mut Corpus) {
    use Expect::Rejected;
    let lane = Lane::Protobuf;
    let t = corpus.time();
    let good = proto_review("p-template", t, "好");
    let mut bad_utf8 = proto_review("p-utf8", t, "好");
    // The first byte of the user id ("p") becomes 0xff.
    bad_utf8[2] = 0xff;
    let no_user = pb::Event { user_id: String::new(), ..pb::Event::decode(&good[..]).unwrap() };
    let no_body = pb::Event { body: None, ..proto_event_of("p-nobody", t) };
    // Field 19 is no event kind: decoders skip it, so the event has no body.
    let unknown_kind = [no_body_of("p-kind", t), vec![0x9a, 0x01, 0x00]].concat();
    let review = |user: &str, time: i64, text: &str| proto_review(user, time, text);
    let cases: Vec<(&'static str, Option<Vec<u8>>, Expect)> = vec![
        ("garbage", Some(vec![0xff, 0xff, 0xff, 0x07]), Rejected("malformed")),
        ("truncated", Some(good[..good.len() - 3].to_vec()), Rejected("malformed")),
        ("wrong wire type", Some(vec![0x08, 0x2a]), Rejected("malformed")),
        ("invalid UTF-8", Some(bad_utf8), Rejected("malformed")),
        ("groups nested 100,000 deep", Some(vec![0x7b; 100_000]), Rejected("malformed")),
        ("empty value", Some(Vec::new()), Rejected("malformed")),
        (
            "NaN price",
            Some(proto_click("p-nan", t, Some(f64::NAN), None)),
            Rejected("invalid_field"),
        ),
        (
            "infinite price",
            Some(proto_click("p-inf", t, Some(f64::INFINITY), None)),
            Rejected("invalid_field"),
        ),
        (
            "negative price",
            Some(proto_click("p-neg", t, Some(-0.01), None)),
            Rejected("invalid_field"),
        ),
        (
            "absurd quantity",
            Some(proto_click("p-q", t, Some(1.0), Some(1_000_000_000))),
            Rejected("invalid_field"),
        ),
        ("rating 300", Some(rating_300(t)), Rejected("invalid_field")),
        ("negative time", Some(review("p-neg-time", -5, "好")), Rejected("invalid_field")),
        ("unknown kind", Some(unknown_kind), Rejected("missing_field")),
        ("no user id", Some(no_user.encode_to_vec()), Rejected("missing_field")),
        ("no body", Some(no_body.encode_to_vec()), Rejected("missing_field")),
        ("in 1970", Some(review("p-1970", 1_000, "好")), Rejected("time_out_of_range")),
        ("in 2100", Some(review("p-2100", YEAR_2100_MS, "好")), Rejected("time_out_of_range")),
        ("600 KB", Some(review("p-big", t, &"b".repeat(600 * 1024))), Rejected("too_large")),
        ("long review", Some(review("p-long", t, &"长".repeat(10_001))), Rejected("too_long")),
    ];
    for (name, payload, expect) in cases {
        corpus.add(name, lane, payload, expect);
    }

    let t = corpus.time();
    let original = proto_click("p-dup", t, Some(5.0), Some(2));
    corpus.push(
        "duplicated",
        lane,
        Some(b"p-dup".to_vec()),
        Some(original.clone()),
        scored("p-dup"),
    );
    corpus.add("duplicate", lane, Some(original), Rejected("duplicate"));

    let awkward = [
        (
            "p-rtl",
            "\u{202b}质量不好\u{202c}，客服电话 138\u{200b}0013\u{200b}8000",
            "质量不好,客服电话 [phone]",
        ),
        ("p-controls", "好评\u{0}👍\u{7}", "好评👍"),
    ];
    for (user, text, stored) in awkward {
        let payload = proto_review(user, corpus.time(), text);
        corpus.add("awkward text", lane, Some(payload), cleaned(user, stored));
    }
}

fn scored(user: &str) -> Expect {
    Expect::Scored { user: user.to_owned() }
}

fn cleaned(user: &str, stored: &str) -> Expect {
    Expect::Cleaned { user: user.to_owned(), stored: stored.to_owned() }
}

fn proto_event_of(user: &str, time: i64) -> pb::Event {
    pb::Event::decode(&proto_review(user, time, "好")[..]).expect("the corpus's own protobuf")
}

fn no_body_of(user: &str, time: i64) -> Vec<u8> {
    pb::Event { body: None, ..proto_event_of(user, time) }.encode_to_vec()
}

fn rating_300(time: i64) -> Vec<u8> {
    let review = pb::Review { item_id: "i7".into(), rating: Some(300), ..Default::default() };
    proto_event("p-rating", time, pb::event::Body::Review(review)).encode_to_vec()
}

fn json_search(user: &str, time: i64, query: &str, sort: &str) -> Vec<u8> {
    json_event(json!({
        "user_id": user, "event_id": format!("{user}-s"), "event_time": time, "kind": "search",
        "query": query, "sort": sort, "category_id": "c3",
    }))
}

/// A click whose price is written as `price` verbatim (not JSON numbers serde would write).
fn raw_price(user: &str, time: i64, price: &str) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"user_id":"{user}","event_id":"{user}-e","event_time":{time},"kind":"click","#,
            r#""action":"buy","item_id":"i7","price":{price}}}"#
        ),
        user = user,
        time = time,
        price = price
    )
    .into_bytes()
}

fn invalid_utf8_json(time: i64) -> Vec<u8> {
    let head = format!(
        concat!(
            r#"{{"user_id":"j-utf8","event_id":"e","event_time":{time},"kind":"review","#,
            r#""item_id":"i7","text":"bad "#
        ),
        time = time
    );
    [head.as_bytes(), b"\xff\xfe\xfd", b"\"}"].concat()
}

/// A valid click with an unknown field nested 100,000 arrays deep.
fn deep_json(time: i64) -> Vec<u8> {
    let head = format!(
        concat!(
            r#"{{"user_id":"j-deep","event_id":"e","event_time":{time},"kind":"click","#,
            r#""action":"view","item_id":"i7","extra":"#
        ),
        time = time
    );
    [head.as_bytes(), &b"[".repeat(100_000), &b"]".repeat(100_000), b"}"].concat()
}

/// Counter values of `metric` on a Prometheus scrape, by the values of `labels`.
fn counters(scrape: &str, metric: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut out = BTreeMap::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((label_text, value)) = rest.split_once("} ") else { continue };
        let pairs: BTreeMap<&str, &str> = label_text
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let key = labels.iter().map(|l| pairs.get(l).copied().unwrap_or("").to_owned()).collect();
        out.insert(key, value.trim().parse().expect("a counter value is a number"));
    }
    out
}

#[test]
fn bad_input_is_dead_lettered_and_the_partitions_keep_moving() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let topics = [support::unique("bad-json"), support::unique("bad-pb")];
    let topic = |lane: Lane| topics[lane as usize].clone();
    let (signals, dlq) = (support::unique("signals"), support::unique("dlq"));
    let changelog = support::unique("state");
    let group = support::unique("group");
    let http = format!("127.0.0.1:{}", support::free_port());
    let config = support::write_config(
        dir.path(),
        &broker,
        &group,
        &format!(
            "[kafka.producer]\n\"message.max.bytes\" = \"{MESSAGE_MAX_BYTES}\"\n\
             [[inputs]]\ntopic = \"{}\"\nformat = \"json\"\n\
             [[inputs]]\ntopic = \"{}\"\nformat = \"protobuf\"\n\
             [output]\nsignals_topic = \"{signals}\"\nformat = \"json\"\ndlq_topic = \"{dlq}\"\n\
             [state]\nchangelog_topic = \"{changelog}\"\n\
             [scoring]\ncoalesce = \"100ms\"\nexplain_candidates = 0\n\
             [http]\nlisten = \"{http}\"\n",
            topics[0], topics[1]
        ),
    );
    let mut create = support::mindstream();
    create.args(["--config", config.to_str().unwrap(), "topics", "--partitions", "2"]);
    support::assert_success(&support::run_with_limit(create, Duration::from_secs(60)), "topics");

    let now_ms = mindstream::time::now_ms();
    let mut corpus = Corpus::new(now_ms);
    json_cases(&mut corpus);
    proto_cases(&mut corpus);
    let cases = corpus.cases;
    send(&broker, &cases, &topic);

    // Run to the end of the input, scraping /metrics until the process exits.
    let mut processor = Processor::start(&config, true, dir.path().join("processor.log"));
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    let mut last_scrape = None;
    let status = loop {
        if let Some(status) = processor.exited() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running\n{}", processor.log_tail());
        if let Some((200, body)) = support::http_get(&http, "/metrics") {
            last_scrape = Some(body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "mindstream run: {status}\n{}", processor.log_tail());
    let scrape = last_scrape.expect("/metrics answered while the processor ran");

    // Offsets: the partitions kept moving past every bad record.
    for topic in &topics {
        for (partition, committed, end) in support::committed_and_end(&broker, &group, topic) {
            assert_eq!(committed, end, "{topic}[{partition}] committed offset");
        }
    }

    // The DLQ: every rejected record once, with its reason, source topic, key and bytes. An
    // absent key or value stays absent, and an empty one empty.
    type Dead = (String, String, Option<Vec<u8>>, Option<Vec<u8>>);
    let mut expected_dead: Vec<Dead> = Vec::new();
    let mut expected_counts: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for case in &cases {
        if let Expect::Rejected(reason) = case.expect {
            let (key, payload) = (case.key.clone(), case.payload.clone());
            expected_dead.push((topic(case.lane), reason.to_owned(), key, payload));
            *expected_counts.entry(vec![topic(case.lane), reason.to_owned()]).or_default() += 1.0;
        }
    }
    let dead = support::read_all(&broker, &dlq);
    let mut got_dead: Vec<Dead> = dead
        .iter()
        .map(|r| {
            let reason = r.headers.get("mindstream.reason").cloned().unwrap_or_default();
            let source = r.headers.get("mindstream.source.topic").cloned().unwrap_or_default();
            let payload = r.has_value.then(|| r.payload.clone());
            (source, reason, r.key.clone(), payload)
        })
        .collect();
    for read in &dead {
        let detail = &read.headers["mindstream.detail"];
        assert!(!detail.contains("13800138000") && !detail.contains("aaaa"), "{detail}");
        assert!(read.headers["mindstream.source.offset"].parse::<i64>().is_ok());
    }
    expected_dead.sort();
    got_dead.sort();
    if got_dead != expected_dead {
        let summary = |d: &[Dead]| -> Vec<String> {
            let key = |k: &Option<Vec<u8>>| match k {
                Some(k) => String::from_utf8_lossy(k).into_owned(),
                None => "(no key)".to_owned(),
            };
            let value = |p: &Option<Vec<u8>>| match p {
                Some(p) => format!("{} bytes", p.len()),
                None => "no value".to_owned(),
            };
            d.iter().map(|(t, r, k, p)| format!("{t}/{r}/{}/{}", key(k), value(p))).collect()
        };
        let named: Vec<String> = cases
            .iter()
            .filter_map(|c| match c.expect {
                Expect::Rejected(r) => Some(format!("{}: {r}", c.name)),
                _ => None,
            })
            .collect();
        panic!(
            "DLQ differs from the corpus\nexpected {:?}\ngot      {:?}\ncases {named:?}",
            summary(&expected_dead),
            summary(&got_dead)
        );
    }

    // The rejection counts the processor exposed, from its last scrape.
    let records_in = counters(&scrape, "mindstream_records_in_total", &["topic"]);
    assert_eq!(records_in.values().sum::<f64>(), cases.len() as f64, "records in, as scraped");
    let mut rejected = counters(&scrape, "mindstream_records_rejected_total", &["topic", "reason"]);
    rejected.retain(|_, v| *v > 0.0);
    assert_eq!(rejected, expected_counts, "rejections by topic and reason on /metrics");
    let opted_out = counters(&scrape, "mindstream_events_opted_out_total", &["topic"]);
    assert_eq!(opted_out.values().sum::<f64>(), 2.0, "opt-outs honoured");

    // Signals: exactly the users of the records that were accepted.
    let key = Pseudonymizer::new(support::KEY.as_bytes()).unwrap();
    let reads = support::read_all(&broker, &signals);
    let latest =
        support::latest(support::signal_records(&reads, Format::Json).into_iter().map(|(_, r)| r));
    let scored: BTreeSet<&String> = latest.keys().collect();
    let mut expected_users: BTreeMap<String, &str> = BTreeMap::new();
    for case in &cases {
        if let Expect::Scored { user } | Expect::Cleaned { user, .. } = &case.expect {
            expected_users.insert(key.key(user), case.name);
        }
    }
    let missing: Vec<&str> =
        expected_users.iter().filter(|(k, _)| !scored.contains(k)).map(|(_, n)| *n).collect();
    assert!(missing.is_empty(), "users without a signal after: {missing:?}");
    assert_eq!(scored.len(), expected_users.len(), "only accepted users are scored");

    // Awkward text: stored in the window as the model reads it.
    let windows = support::changelog_windows(&support::read_all(&broker, &changelog));
    for case in &cases {
        let Expect::Cleaned { user, stored } = &case.expect else { continue };
        let window = windows.get(&key.key(user)).unwrap_or_else(|| panic!("{user} has a state"));
        assert_eq!(&stored_text(window), stored, "{}: {user}", case.name);
    }
    let long = windows.get(&key.key("j-long-ok")).map(stored_text).unwrap_or_default();
    assert!(!long.is_empty() && long.chars().count() <= 1_000, "long text is cut: {long}");
}

/// The text of the newest event in a window (a search as `query|sort`).
fn stored_text(window: &UserState) -> String {
    match window.events().back().map(|e| &e.detail) {
        Some(Detail::Review { text, .. }) => text.to_string(),
        Some(Detail::Search { query, sort }) => format!("{query}|{sort}"),
        _ => String::new(),
    }
}

/// Produces every case in order, keyed where it names a user.
fn send(broker: &Broker, cases: &[Case], topic: &dyn Fn(Lane) -> String) {
    let mut client = broker.client();
    client
        .set("message.max.bytes", MESSAGE_MAX_BYTES)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    let producer: BaseProducer = client.create().expect("create the corpus producer");
    for case in cases {
        let name = topic(case.lane);
        let mut record = BaseRecord::<[u8], [u8]>::to(&name);
        if let Some(key) = &case.key {
            record = record.key(&key[..]);
        }
        if let Some(payload) = &case.payload {
            record = record.payload(&payload[..]);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((err, back)) => {
                    assert!(
                        matches!(
                            err,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "send {}: {err}",
                        case.name
                    );
                    record = back;
                    producer.poll(Duration::from_millis(50));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("the corpus is delivered");
}
