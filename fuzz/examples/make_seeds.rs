//! Writes the generated part of the fuzz seed corpus with mindstream's own encoders:
//!
//! - `seeds/decode_protobuf/`: every JSON seed that decodes, encoded as protobuf, and a few
//!   protobuf records the decoder must reject (bad enum value, rating too large, no body, zero
//!   time, truncated, invalid UTF-8, unknown and repeated fields);
//! - `seeds/render_tokenize/`: JSON-lines sessions that fill and overflow the window and the
//!   token budget, mix users, arrive late or out of order, opt out, delete and restart after
//!   the TTL.
//!
//! The JSON seeds in `seeds/decode_json/` are written by hand and read from there. Run from the
//! repository root after a change to the event formats (the main target folder already holds
//! the dependencies of this plain debug build):
//! `CARGO_TARGET_DIR=target cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.

use std::fs;
use std::path::{Path, PathBuf};

use mindstream::event::{self, Action, Click, Event, EventBody, Format, Review, Search};
use mindstream::proto::events as pb;
use prost::Message;

fn main() -> std::io::Result<()> {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    protobuf_seeds(&seeds)?;
    session_seeds(&seeds.join("render_tokenize"))
}

fn protobuf_seeds(seeds: &Path) -> std::io::Result<()> {
    let out = seeds.join("decode_protobuf");
    fs::create_dir_all(&out)?;
    let mut from_json = 0;
    let mut names: Vec<PathBuf> = fs::read_dir(seeds.join("decode_json"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for path in names {
        let Ok(event) = event::decode(Format::Json, &fs::read(&path)?) else { continue };
        let stem = path.file_stem().expect("a seed file name").to_string_lossy();
        fs::write(out.join(format!("{stem}.pb")), event::encode(Format::Protobuf, &event))?;
        from_json += 1;
    }

    let click = |action: i32| pb::Event {
        user_id: "u1".into(),
        event_id: "e1".into(),
        event_time_ms: 1_511_658_000_000,
        opt_out: false,
        body: Some(pb::event::Body::Click(pb::Click {
            action,
            item_id: "i9".into(),
            category_id: "c3".into(),
            price: Some(19.9),
            discount: Some(0.25),
            quantity: Some(3),
        })),
    };
    let review = |rating: u32| pb::Event {
        body: Some(pb::event::Body::Review(pb::Review {
            item_id: "i1".into(),
            rating: Some(rating),
            text: "坏了".into(),
            language: "zh".into(),
        })),
        ..click(1)
    };
    let valid = click(2).encode_to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("reject-action-unspecified", click(0).encode_to_vec()),
        ("reject-action-unknown", click(42).encode_to_vec()),
        ("reject-rating-300", review(300).encode_to_vec()),
        ("reject-no-body", pb::Event { body: None, ..click(1) }.encode_to_vec()),
        ("reject-zero-time", pb::Event { event_time_ms: 0, ..click(1) }.encode_to_vec()),
        ("reject-negative-time", pb::Event { event_time_ms: -1, ..click(1) }.encode_to_vec()),
        ("reject-truncated", valid[..valid.len() - 3].to_vec()),
        ("reject-empty", Vec::new()),
        ("reject-garbage", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01".to_vec()),
    ];
    // user_id (field 1, length-delimited) holding bytes that are not UTF-8.
    let mut bad_utf8 = vec![0x0a, 0x02, 0xc3, 0x28];
    bad_utf8.extend_from_slice(&valid[4..]);
    cases.push(("reject-invalid-utf8", bad_utf8));
    // The same record followed by an unknown varint field 99 and a repeated user_id, which
    // protobuf readers skip and overwrite respectively.
    let mut extended = valid.clone();
    extended.extend_from_slice(&[0x98, 0x06, 0x2a, 0x0a, 0x02, b'u', b'2']);
    cases.push(("click-unknown-and-repeated-fields", extended));
    // Two bodies: the last one read wins.
    let mut two_bodies = valid.clone();
    two_bodies.extend_from_slice(&review(4).encode_to_vec());
    cases.push(("two-bodies", two_bodies));
    let extra = cases.len();
    for (name, bytes) in cases {
        fs::write(out.join(format!("{name}.pb")), bytes)?;
    }
    println!("decode_protobuf: {from_json} from the JSON seeds, {extra} more");
    Ok(())
}

const BASE_MS: i64 = 1_511_658_000_000;
const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

fn base(user: &str, id: String, time_ms: i64, body: EventBody) -> Event {
    Event { user_id: user.into(), event_id: id, event_time_ms: time_ms, opt_out: false, body }
}

fn click(
    user: &str,
    n: i64,
    time_ms: i64,
    action: Action,
    item: &str,
    price: Option<f64>,
) -> Event {
    let body = EventBody::Click(Click {
        action,
        item_id: item.into(),
        category_id: format!("{}", 4_756_105 + n % 3),
        price,
        discount: (n % 4 == 0).then_some(0.1),
        quantity: (n % 5 == 0).then_some(2),
    });
    base(user, format!("c{n}"), time_ms, body)
}

fn search(user: &str, n: i64, time_ms: i64, query: &str, sort: &str) -> Event {
    let body = EventBody::Search(Search {
        query: query.into(),
        sort: sort.into(),
        category_id: String::new(),
    });
    base(user, format!("s{n}"), time_ms, body)
}

fn review(user: &str, n: i64, time_ms: i64, item: &str, rating: u8, text: &str) -> Event {
    let body = EventBody::Review(Review {
        item_id: item.into(),
        rating: Some(rating),
        text: text.into(),
        language: "zh".into(),
    });
    base(user, format!("r{n}"), time_ms, body)
}

fn lines(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        out.extend(event::encode(Format::Json, event));
        out.push(b'\n');
    }
    out
}

fn session_seeds(out: &Path) -> std::io::Result<()> {
    fs::create_dir_all(out)?;
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();

    // One shopper's afternoon, the README's example window.
    let afternoon = [
        click("u1", 1, BASE_MS, Action::View, "i1", Some(12.49)),
        click("u1", 2, BASE_MS + 2 * MINUTE, Action::Cart, "i1", Some(12.49)),
        click("u1", 3, BASE_MS + 3 * MINUTE, Action::Buy, "i2", None),
        search("u1", 4, BASE_MS + 70 * MINUTE, "red shoes", "price_asc"),
        review("u1", 5, BASE_MS + 4 * DAY, "i2", 2, "strap broke after a week, call 13812345678"),
    ];
    seeds.push(("afternoon.jsonl", lines(&afternoon)));

    // More events than the window keeps and more tokens than the card allows.
    let busy: Vec<Event> = (0..40)
        .map(|n| {
            let action = [Action::View, Action::Fav, Action::Cart, Action::RemoveCart][n % 4];
            let item = format!("item-{}", n % 7);
            let n = n as i64;
            click("u2", n, BASE_MS + n * MINUTE, action, &item, Some(0.5 + n as f64 * 37.3))
        })
        .collect();
    seeds.push(("busy.jsonl", lines(&busy)));

    // Long reviews: one alone overflows the budget and is cut; a small budget is asked for too.
    let long = ["质量很好，物流很快，", "但是尺码偏小，", "客服态度一般，退货流程太慢了。"]
        .concat()
        .repeat(6);
    let mut reviews: Vec<Event> = (0..4)
        .map(|n| review("u3", n, BASE_MS + n * DAY, &format!("i{n}"), 1 + n as u8, &long))
        .collect();
    reviews.push(search("u3", 9, BASE_MS + 5 * DAY, &"very long query ".repeat(20), "newest"));
    let mut bytes = b"#40\n".to_vec();
    bytes.extend(lines(&reviews));
    seeds.push(("long-text.jsonl", bytes));

    // Users interleaved, an event within the allowed lateness and one far behind it, an
    // opt-out, a deletion, a restart after the TTL and lines that do not decode.
    let mut mixed = lines(&[
        click("a", 1, BASE_MS + 10 * MINUTE, Action::View, "i1", Some(3.0)),
        click("b", 2, BASE_MS + 11 * MINUTE, Action::Cart, "i1", Some(3.0)),
        click("a", 3, BASE_MS + 9 * MINUTE, Action::Cart, "i1", Some(3.0)),
        click("b", 4, BASE_MS - 30 * DAY, Action::Buy, "i1", Some(3.0)),
        click("a", 5, BASE_MS + 200 * DAY, Action::Buy, "i9", Some(999.0)),
        Event { opt_out: true, ..click("b", 6, BASE_MS + 200 * DAY, Action::View, "i1", None) },
    ]);
    mixed.extend_from_slice(br#"{"user_id":"c","event_id":"d","event_time":1528938000000,"#);
    mixed.extend_from_slice(b"\"kind\":\"delete_user\"}\n");
    mixed.extend_from_slice(b"not json\n{\"user_id\":\"a\"}\n\n#3\n");
    seeds.push(("mixed-users.jsonl", mixed));

    // No budget at all, and the largest times the decoder accepts.
    let mut edge = b"#0\n".to_vec();
    edge.extend(lines(&[
        click("z", 1, i64::MAX - 1, Action::View, "i1", Some(1e300)),
        click("z", 2, i64::MAX, Action::Buy, "i1", Some(5e-324)),
        search("z", 3, i64::MAX, "", ""),
    ]));
    seeds.push(("extremes.jsonl", edge));

    for (name, bytes) in &seeds {
        fs::write(out.join(name), bytes)?;
    }
    println!("render_tokenize: {} sessions", seeds.len());
    Ok(())
}
