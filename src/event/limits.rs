//! Input limits: what a record may be beyond its schema.
//!
//! Receives a record's raw key and value before they are parsed ([`check_size`], and
//! [`check_json_depth`] for JSON that is not one flat object) and the decoded event with the
//! record's broker timestamp ([`check_event`]: ids, text lengths, `sort` and `language`,
//! price, event time), each with the configured [`LimitsConfig`], and hands back the event or
//! a [`Rejection`] for the dead-letter topic. The processor and the offline scorer call them
//! in the same order, so both reject the same records. Duplicate `event_id`s need the user's
//! window and are found by the store ([`crate::window::store::Store::apply`]), which also
//! keys the user only once.
//!
//! Everything here is a plain function of its arguments: nothing recurses on a record or
//! allocates in proportion to it.

use std::time::Duration;

use crate::config::{Config, LimitsConfig};
use crate::event::{Event, EventBody, RejectReason, Rejection};
use crate::privacy::is_invisible;

/// Longest `sort` of a search, in characters. It reaches the model text (cleaned and
/// scrubbed like a query), so it is kept short.
pub const MAX_SORT_CHARS: usize = 32;

/// Longest `language` tag of a review, in characters (the longest BCP 47 tags in use fit).
pub const MAX_LANGUAGE_CHARS: usize = 35;

/// librdkafka's default `message.max.bytes`, the largest record its producer sends.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a dead-letter record needs besides the original key and value: its headers (reason,
/// detail, source topic, partition and offset) and the record framing.
const DEAD_LETTER_HEADROOM: usize = 16 * 1024;

/// Checks a record's size before it is parsed: key plus value, at most
/// `limits.max_record_bytes` (`too_large`).
pub fn check_size(
    limits: &LimitsConfig,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<(), Rejection> {
    let size = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
    if size > limits.max_record_bytes {
        let detail = format!(
            "record of {size} bytes is larger than limits.max_record_bytes ({})",
            limits.max_record_bytes
        );
        return Err(Rejection::new(RejectReason::TooLarge, detail));
    }
    Ok(())
}

/// Rejects JSON whose arrays and objects nest deeper than `max_depth`, by one pass over the
/// bytes that skips strings. Whether the rest is valid JSON is the decoder's business.
pub fn check_json_depth(bytes: &[u8], max_depth: usize) -> Result<(), Rejection> {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        match byte {
            b'"' => {
                // To the closing quote, a vectorised search at a time; an escape skips the
                // byte after it. An unterminated string ends the scan (the decoder rejects it).
                loop {
                    let Some(rest) = bytes.get(at..) else { return Ok(()) };
                    let Some(found) = memchr::memchr2(b'"', b'\\', rest) else { return Ok(()) };
                    at += found + 1;
                    if rest[found] == b'"' {
                        break;
                    }
                    at += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    let detail = format!(
                        "JSON nests deeper than limits.max_json_depth ({max_depth} levels)"
                    );
                    return Err(Rejection::new(RejectReason::Malformed, detail));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a decoded event against the limits and hands it back. `broker_time_ms` is the
/// record's broker timestamp; without a usable one (absent, or not after 1970) the event
/// time is not checked. A deletion or an opt-out is honoured whatever its time: the store
/// never windows either, nor lets it move a watermark, so a wrong date harms nothing, and a
/// privacy request is not refused for its producer's clock.
pub fn check_event(
    limits: &LimitsConfig,
    event: Event,
    broker_time_ms: Option<i64>,
) -> Result<Event, Rejection> {
    check_visible_id("user_id", &event.user_id)?;
    check_visible_id("event_id", &event.event_id)?;
    match &event.body {
        EventBody::Click(click) => {
            check_visible_id("item_id", &click.item_id)?;
            check_visible_id("category_id", &click.category_id)?;
            if click.price.is_some_and(|price| price > limits.max_price) {
                return Err(Rejection::invalid("price", "is above limits.max_price"));
            }
        }
        EventBody::Search(search) => {
            check_visible_id("category_id", &search.category_id)?;
            check_length("query", &search.query, limits.max_query_chars, "limits.max_query_chars")?;
            if longer_than(&search.sort, MAX_SORT_CHARS) {
                let why = format!("is longer than {MAX_SORT_CHARS} characters");
                return Err(Rejection::invalid("sort", &why));
            }
        }
        EventBody::Review(review) => {
            check_visible_id("item_id", &review.item_id)?;
            check_length("text", &review.text, limits.max_review_chars, "limits.max_review_chars")?;
            check_language(&review.language)?;
        }
        EventBody::DeleteUser => {}
    }
    if !matches!(event.body, EventBody::DeleteUser) && !event.opt_out {
        check_time(limits, event.event_time_ms, broker_time_ms)?;
    }
    Ok(event)
}

/// Ids may not hide characters: two ids that look the same must be the same id.
fn check_visible_id(field: &str, value: &str) -> Result<(), Rejection> {
    // Every invisible character is outside ASCII.
    if !value.is_ascii() && value.chars().any(is_invisible) {
        return Err(Rejection::invalid(field, "contains invisible formatting characters"));
    }
    Ok(())
}

fn check_length(field: &str, text: &str, max: usize, key: &str) -> Result<(), Rejection> {
    if longer_than(text, max) {
        let detail = format!("field `{field}` is longer than {key} ({max} characters)");
        return Err(Rejection::new(RejectReason::TooLong, detail));
    }
    Ok(())
}

/// Whether `text` has more than `max` characters, counting no further than needed.
fn longer_than(text: &str, max: usize) -> bool {
    text.len() > max && text.chars().nth(max).is_some()
}

/// A language tag is short and plain: ASCII letters, digits, `-` and `_` (`en`, `zh-Hans`).
fn check_language(language: &str) -> Result<(), Rejection> {
    let plain = language.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain || language.len() > MAX_LANGUAGE_CHARS {
        let why = format!(
            "is not a language tag (ASCII letters, digits, `-`, `_`; at most {MAX_LANGUAGE_CHARS})"
        );
        return Err(Rejection::invalid("language", &why));
    }
    Ok(())
}

fn check_time(
    limits: &LimitsConfig,
    event_time_ms: i64,
    broker_time_ms: Option<i64>,
) -> Result<(), Rejection> {
    let Some(broker_time_ms) = broker_time_ms.filter(|&t| t > 0) else { return Ok(()) };
    let ahead_ms = event_time_ms.saturating_sub(broker_time_ms);
    let (allowed, key, side) = if ahead_ms > 0 {
        (limits.max_future, "limits.max_future", "after")
    } else {
        (limits.max_past, "limits.max_past", "before")
    };
    let distance_ms = ahead_ms.unsigned_abs();
    if u128::from(distance_ms) <= allowed.as_millis() {
        return Ok(());
    }
    let by = humantime::format_duration(Duration::from_secs(distance_ms / 1000));
    let detail = format!("event time is {by} {side} the record's broker timestamp ({key})");
    Err(Rejection::new(RejectReason::TimeOutOfRange, detail))
}

/// Bytes a dead-letter record's key and value may take together: the producer's
/// `message.max.bytes` (from `kafka.producer`, else `kafka.client`, else librdkafka's
/// default) less room for the headers, so that a rejected record can always be delivered.
pub fn dead_letter_room(config: &Config) -> usize {
    let property = "message.max.bytes";
    let configured = config.kafka.producer.get(property).or(config.kafka.client.get(property));
    configured
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
        .saturating_sub(DEAD_LETTER_HEADROOM)
}

/// The key and value a dead-letter record carries: the originals when together they fit in
/// `room` bytes, else their first bytes (the key's first), and whether anything was cut.
pub fn fit_dead_letter<'a>(
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    room: usize,
) -> (Option<&'a [u8]>, Option<&'a [u8]>, bool) {
    let len = |part: Option<&[u8]>| part.map_or(0, <[u8]>::len);
    if len(key).saturating_add(len(payload)) <= room {
        return (key, payload, false);
    }
    let key = key.map(|k| &k[..k.len().min(room)]);
    let left = room - len(key);
    (key, payload.map(|p| &p[..p.len().min(left)]), true)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::event::{self, json, Action, Click, Format, Review, Search};

    /// 2026-12-01, a broker timestamp.
    const NOW_MS: i64 = 1_796_083_200_000;

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn event(body: EventBody) -> Event {
        Event {
            user_id: "u1".into(),
            event_id: "e1".into(),
            event_time_ms: NOW_MS - 60_000,
            opt_out: false,
            body,
        }
    }

    fn click(price: Option<f64>) -> Event {
        event(EventBody::Click(Click {
            action: Action::Buy,
            item_id: "i1".into(),
            category_id: "c1".into(),
            price,
            discount: None,
            quantity: None,
        }))
    }

    fn review(text: &str, language: &str) -> Event {
        event(EventBody::Review(Review {
            item_id: "i1".into(),
            rating: Some(2),
            text: text.into(),
            language: language.into(),
        }))
    }

    fn search(query: &str, sort: &str) -> Event {
        event(EventBody::Search(Search {
            query: query.into(),
            sort: sort.into(),
            category_id: Default::default(),
        }))
    }

    fn reason(result: Result<Event, Rejection>) -> Option<RejectReason> {
        result.err().map(|r| r.reason)
    }

    #[test]
    fn size_counts_key_and_value_before_parsing() {
        let limits = LimitsConfig { max_record_bytes: 10, ..limits() };
        let check = |key: &[u8], value: &[u8]| {
            check_size(&limits, Some(key), Some(value)).map_err(|r| r.reason)
        };
        assert_eq!(check(b"key", b"1234567"), Ok(()));
        assert_eq!(check(b"key", b"12345678"), Err(RejectReason::TooLarge));
        let err = check_size(&limits, None, Some(&[b'{'; 11])).unwrap_err();
        assert_eq!(err.detail, "record of 11 bytes is larger than limits.max_record_bytes (10)");
    }

    #[test]
    fn deep_json_is_malformed_without_recursion() {
        let deep = format!(
            r#"{{"user_id":"u","event_id":"e","event_time":5,"kind":"search","query":"q",
                "extra":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = check_json_depth(deep.as_bytes(), 32).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed);
        assert_eq!(err.detail, "JSON nests deeper than limits.max_json_depth (32 levels)");
        // The decoder skips an unknown value without recursing, so it survives such a record
        // on its own; the check is what refuses it.
        assert!(json::decode(deep.as_bytes()).is_ok());
        let bare = "[".repeat(100_000);
        assert_eq!(json::decode(bare.as_bytes()).unwrap_err().reason, RejectReason::Malformed);

        let at_limit = format!("{}{}", "[".repeat(31), "]".repeat(31));
        assert!(check_json_depth(format!("{{\"a\":{at_limit}}}").as_bytes(), 32).is_ok());
        assert!(check_json_depth(format!("{{\"a\":[{at_limit}]}}").as_bytes(), 32).is_err());
        let in_strings = br#"{"a":"[[[[{{{{","b":"\"[[[[","c":"\\","d":[[1]]}"#;
        assert!(check_json_depth(in_strings, 3).is_ok());
        assert!(check_json_depth(in_strings, 2).is_err());
    }

    /// Whether a byte-at-a-time scan finds the nesting within `max_depth`.
    fn reference_depth_check(bytes: &[u8], max_depth: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &byte in bytes {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max_depth {
                        return false;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        true
    }

    #[test]
    fn the_depth_scan_agrees_with_a_byte_at_a_time_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"{}[]\"\\a:,";
        let (mut refused, mut passed) = (0, 0);
        for _ in 0..100_000 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> =
                (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let max_depth = rng.random_range(0..4);
            let expected = reference_depth_check(&bytes, max_depth);
            let got = check_json_depth(&bytes, max_depth).is_ok();
            assert_eq!(got, expected, "{:?} at depth {max_depth}", String::from_utf8_lossy(&bytes));
            if expected {
                passed += 1
            } else {
                refused += 1
            }
        }
        assert!(refused > 10_000 && passed > 10_000, "both outcomes drawn: {refused} / {passed}");
    }

    #[test]
    fn deep_protobuf_groups_are_malformed() {
        // Field 15 (unknown) as a start-group tag, 100,000 times: groups nested without end.
        let deep = vec![0x7b; 100_000];
        let err = event::decode(Format::Protobuf, &deep).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed);
    }

    #[test]
    fn invalid_utf8_and_wrong_types_are_named() {
        let head = r#"{"user_id":"u","event_id":"e","event_time":5,"kind":"#;
        let mut line = format!(r#"{head}"review","item_id":"i","text":"bad "#).into_bytes();
        line.extend_from_slice(b"\xff\xfe\"}");
        assert_eq!(json::decode(&line).unwrap_err().reason, RejectReason::Malformed);
        let priced = |price: &str| {
            format!(r#"{head}"click","action":"buy","item_id":"i","price":{price}}}"#)
        };
        let err = json::decode(priced("1e400").as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed, "{err}");
        let err = json::decode(priced("NaN").as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed, "{err}");
        let err = json::decode(priced("\"cheap\"").as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidField, "{err}");
        let mut wire = crate::proto::events::Event {
            user_id: "u".into(),
            event_id: "e".into(),
            event_time_ms: NOW_MS,
            ..Default::default()
        }
        .encode_to_vec();
        // user_id's bytes are not UTF-8.
        wire[2] = 0xff;
        let err = event::decode(Format::Protobuf, &wire).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed);
    }

    #[test]
    fn text_lengths_count_characters() {
        let limits = LimitsConfig { max_review_chars: 4, max_query_chars: 3, ..limits() };
        assert!(check_event(&limits, review("坏了坏了", "zh"), None).is_ok());
        let err = check_event(&limits, review("坏了坏了!", "zh"), None).unwrap_err();
        assert_eq!(err.reason, RejectReason::TooLong);
        let want = "field `text` is longer than limits.max_review_chars (4 characters)";
        assert_eq!(err.detail, want);
        assert!(check_event(&limits, search("红鞋子", ""), None).is_ok());
        let long_query = check_event(&limits, search("红鞋子s", ""), None);
        assert_eq!(reason(long_query), Some(RejectReason::TooLong));
    }

    #[test]
    fn sort_and_language_are_bounded() {
        assert!(check_event(&limits(), search("shoes", "price_asc"), None).is_ok());
        assert!(check_event(&limits(), search("shoes", &"x".repeat(32)), None).is_ok());
        let long_sort = check_event(&limits(), search("shoes", &"x".repeat(33)), None);
        assert_eq!(reason(long_sort), Some(RejectReason::InvalidField));
        for ok in ["", "en", "zh-Hans-CN", "en_GB"] {
            assert!(check_event(&limits(), review("fine", ok), None).is_ok(), "{ok}");
        }
        for bad in ["en\nzh", "en zh", "\u{202e}ne", "中文", &"a".repeat(36)] {
            let result = check_event(&limits(), review("fine", bad), None);
            assert_eq!(reason(result), Some(RejectReason::InvalidField), "{bad:?}");
        }
    }

    #[test]
    fn ids_may_not_hide_characters() {
        let mut spoofed = click(None);
        spoofed.user_id = "user\u{202e}1".into();
        let result = check_event(&limits(), spoofed, None);
        assert_eq!(reason(result), Some(RejectReason::InvalidField));
        let mut hidden = click(None);
        hidden.event_id = "e\u{200b}1".into();
        let err = check_event(&limits(), hidden, None).unwrap_err();
        assert!(err.detail.contains("event_id"), "{err}");
    }

    #[test]
    fn absurd_prices_are_invalid() {
        assert!(check_event(&limits(), click(Some(999_999_999.0)), None).is_ok());
        assert_eq!(
            reason(check_event(&limits(), click(Some(1e300)), None)),
            Some(RejectReason::InvalidField)
        );
    }

    #[test]
    fn event_time_must_be_near_the_broker_timestamp() {
        let at = |time_ms: i64| {
            let mut event = click(None);
            event.event_time_ms = time_ms;
            event
        };
        let year_1970 = 86_400_000;
        let year_2100 = 4_102_444_800_000;
        let year_1997 = 852_076_800_000;
        for time in [year_1970, year_2100, NOW_MS + 3_600_001] {
            let err = check_event(&limits(), at(time), Some(NOW_MS)).unwrap_err();
            assert_eq!(err.reason, RejectReason::TimeOutOfRange, "{time}");
        }
        for time in [year_1997, NOW_MS + 3_600_000, NOW_MS] {
            assert!(check_event(&limits(), at(time), Some(NOW_MS)).is_ok(), "{time}");
        }
        let err = check_event(&limits(), at(year_2100), Some(NOW_MS)).unwrap_err();
        assert!(err.detail.starts_with("event time is 73years"), "{err}");
        assert!(err.detail.ends_with("after the record's broker timestamp (limits.max_future)"));
        // Without a usable broker timestamp the time is not checked.
        assert!(check_event(&limits(), at(year_1970), None).is_ok());
        assert!(check_event(&limits(), at(year_1970), Some(0)).is_ok());
        // A deletion or an opt-out is honoured whatever its time.
        let deletion = Event { body: EventBody::DeleteUser, ..at(year_1970) };
        assert!(check_event(&limits(), deletion, Some(NOW_MS)).is_ok());
        let opt_out = Event { opt_out: true, ..at(year_2100) };
        assert!(check_event(&limits(), opt_out, Some(NOW_MS)).is_ok());
    }

    #[test]
    fn dead_letters_fit_the_producer() {
        let mut config = Config::load(None, std::iter::empty()).unwrap();
        assert_eq!(dead_letter_room(&config), 1_000_000 - 16 * 1024);
        config.kafka.client.insert("message.max.bytes".into(), "2000000".into());
        assert_eq!(dead_letter_room(&config), 2_000_000 - 16 * 1024);
        config.kafka.producer.insert("message.max.bytes".into(), "20000000".into());
        assert_eq!(dead_letter_room(&config), 20_000_000 - 16 * 1024);

        let (key, value, cut) = fit_dead_letter(Some(b"user"), Some(b"0123456789"), 14);
        assert_eq!((key, value, cut), (Some(&b"user"[..]), Some(&b"0123456789"[..]), false));
        let (key, value, cut) = fit_dead_letter(Some(b"user"), Some(b"0123456789"), 8);
        assert_eq!((key, value, cut), (Some(&b"user"[..]), Some(&b"0123"[..]), true));
        let (key, value, cut) = fit_dead_letter(Some(b"user"), Some(b"0123456789"), 2);
        assert_eq!((key, value, cut), (Some(&b"us"[..]), Some(&b""[..]), true));
        // Absent and empty parts stay as they were.
        let (key, value, cut) = fit_dead_letter(None, Some(b""), 2);
        assert_eq!((key, value, cut), (None, Some(&b""[..]), false));
        let (key, value, cut) = fit_dead_letter(Some(b""), None, 2);
        assert_eq!((key, value, cut), (Some(&b""[..]), None, false));
    }

    #[test]
    fn limits_are_configured_and_checked_by_key() {
        let config = Config::load(None, std::iter::empty()).unwrap();
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.limits.max_record_bytes, 512 * 1024);
        assert_eq!(humantime::format_duration(config.limits.max_past).to_string(), "40years");
        let env =
            |key: &str, value: &str| [(format!("MINDSTREAM__LIMITS__{key}"), value.to_owned())];
        let config = Config::load(None, env("MAX_PAST", "7d")).unwrap();
        assert_eq!(config.limits.max_past, Duration::from_secs(7 * 86_400));
        for (key, value, named) in [
            ("MAX_RECORD_BYTES", "0", "limits.max_record_bytes"),
            ("MAX_JSON_DEPTH", "129", "limits.max_json_depth"),
            ("MAX_PRICE", "-1.0", "limits.max_price"),
            ("MAX_PAST", "0s", "limits.max_past"),
            ("MAX_FUTURE", "soon", "limits.max_future"),
            ("MAX_REVIEW_CHARZ", "9", "max_review_charz"),
        ] {
            let err = Config::load(None, env(key, value)).unwrap_err().to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
    }
}
