//! The JSON form of [`Event`]: one flat object per record, `kind` naming the body.
//!
//! ```json
//! {"user_id":"u1","event_id":"e1","event_time":1511658000000,"kind":"click",
//!  "action":"cart","item_id":"i9","category_id":"c3","price":19.9}
//! ```
//!
//! Unknown fields are ignored (they never reach the model); missing required fields and
//! wrong types are rejected with the offending field named.

use std::borrow::Cow;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::error::Category;

use super::{Action, Click, Event, EventBody, RejectReason, Rejection, Review, Search};

mod plain;

/// The JSON record as it arrives, every field optional so that validation can name what is
/// missing instead of failing on the first absent key.
#[derive(Debug, Default, Deserialize, PartialEq)]
struct Incoming<'a> {
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
    event_time: Option<i64>,
    opt_out: Option<bool>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    item_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    category_id: Option<Cow<'a, str>>,
    price: Option<f64>,
    discount: Option<f64>,
    quantity: Option<u32>,
    #[serde(borrow)]
    query: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sort: Option<Cow<'a, str>>,
    rating: Option<u8>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    language: Option<Cow<'a, str>>,
}

/// The JSON record as mindstream writes it (replays, imports, the offline scorer's input).
#[derive(Serialize)]
struct Outgoing<'a> {
    user_id: &'a str,
    event_id: &'a str,
    event_time: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    opt_out: bool,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item_id: Option<&'a str>,
    #[serde(skip_serializing_if = "is_empty")]
    category_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    discount: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    #[serde(skip_serializing_if = "is_empty")]
    sort: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rating: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "is_empty")]
    language: &'a str,
}

fn is_empty(s: &&str) -> bool {
    s.is_empty()
}

/// Decodes and validates one JSON record.
pub fn decode(bytes: &[u8]) -> Result<Event, Rejection> {
    decode_nested_at_most(bytes, None)
}

/// [`decode`], after checking that the record nests at most `max_depth` levels (at least one)
/// where it is given ([`limits::check_json_depth`](super::limits::check_json_depth)). The
/// common flat record is read without serde, and without that check: one flat object is
/// within any limit. serde_json reads everything else; only a record it refuses is decoded
/// again with path tracking, which costs a third of the decoding time, to name the field at
/// fault.
pub fn decode_nested_at_most(bytes: &[u8], max_depth: Option<usize>) -> Result<Event, Rejection> {
    let incoming = match plain::parse(bytes) {
        Some(incoming) => incoming,
        None => {
            if let Some(max_depth) = max_depth {
                super::limits::check_json_depth(bytes, max_depth)?;
            }
            read_with_serde(bytes)?
        }
    };
    let event = incoming.into_event()?;
    event.validate()?;
    Ok(event)
}

fn read_with_serde(bytes: &[u8]) -> Result<Incoming<'_>, Rejection> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Rejection::new(RejectReason::Malformed, "not a JSON object"));
    }
    if let Ok(incoming) = serde_json::from_slice(bytes) {
        return Ok(incoming);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let incoming: Incoming = serde_path_to_error::deserialize(&mut de).map_err(reject)?;
    de.end().map_err(|e| Rejection::new(RejectReason::Malformed, e.to_string()))?;
    Ok(incoming)
}

/// Whether the plain reader and serde_json agree on `bytes`: either the plain reader leaves
/// the record to serde_json, or both read the same values. The `decode_json` fuzz target
/// asserts it.
#[doc(hidden)]
pub fn plain_reader_agrees(bytes: &[u8]) -> bool {
    plain::parse(bytes).is_none_or(|plain| {
        serde_json::from_slice::<Incoming>(bytes).is_ok_and(|serde| serde == plain)
    })
}

fn reject(err: serde_path_to_error::Error<serde_json::Error>) -> Rejection {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        Category::Data => Rejection::new(
            RejectReason::InvalidField,
            format!("field `{path}` has the wrong type or value ({})", type_only(&inner)),
        ),
        _ => Rejection::new(RejectReason::Malformed, type_only(&inner)),
    }
}

/// serde_json messages can quote the offending value; keep only the part before the quote so
/// that the DLQ detail never repeats record content.
fn type_only(err: &serde_json::Error) -> String {
    let message = err.to_string();
    match message.find(['"', '`']) {
        Some(cut) => {
            format!("{}… at line {} column {}", message[..cut].trim_end(), err.line(), err.column())
        }
        None => message,
    }
}

impl Incoming<'_> {
    fn into_event(self) -> Result<Event, Rejection> {
        let owned = |v: Option<Cow<str>>| v.map(Cow::into_owned).unwrap_or_default();
        // Ids are short: most fit a `CompactString` inline, without an allocation.
        let id = |v: Option<Cow<str>>| v.as_deref().map(CompactString::from).unwrap_or_default();
        let body = match self.kind.as_deref() {
            None => return Err(Rejection::missing("kind")),
            Some("click") => EventBody::Click(Click {
                action: parse_action(self.action.as_deref())?,
                item_id: id(self.item_id),
                category_id: id(self.category_id),
                price: self.price,
                discount: self.discount,
                quantity: self.quantity,
            }),
            Some("search") => EventBody::Search(Search {
                query: self
                    .query
                    .map(Cow::into_owned)
                    .ok_or_else(|| Rejection::missing("query"))?,
                sort: owned(self.sort),
                category_id: id(self.category_id),
            }),
            Some("review") => EventBody::Review(Review {
                item_id: id(self.item_id),
                rating: self.rating,
                text: self.text.map(Cow::into_owned).ok_or_else(|| Rejection::missing("text"))?,
                language: owned(self.language),
            }),
            Some("delete_user") => EventBody::DeleteUser,
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::UnknownKind,
                    "field `kind` is not click, search, review or delete_user",
                ))
            }
        };
        Ok(Event {
            user_id: id(self.user_id),
            event_id: id(self.event_id),
            event_time_ms: self.event_time.ok_or_else(|| Rejection::missing("event_time"))?,
            opt_out: self.opt_out.unwrap_or(false),
            body,
        })
    }
}

fn parse_action(action: Option<&str>) -> Result<Action, Rejection> {
    let action = action.ok_or_else(|| Rejection::missing("action"))?;
    Action::parse(action)
        .ok_or_else(|| Rejection::invalid("action", "is not view, cart, fav, buy or remove_cart"))
}

/// Encodes one event as a single JSON line (without the newline).
pub fn encode(event: &Event) -> Vec<u8> {
    let mut out = Outgoing {
        user_id: &event.user_id,
        event_id: &event.event_id,
        event_time: event.event_time_ms,
        opt_out: event.opt_out,
        kind: event.kind().as_str(),
        action: None,
        item_id: None,
        category_id: "",
        price: None,
        discount: None,
        quantity: None,
        query: None,
        sort: "",
        rating: None,
        text: None,
        language: "",
    };
    match &event.body {
        EventBody::Click(c) => {
            out.action = Some(c.action.as_str());
            out.item_id = Some(&c.item_id);
            out.category_id = &c.category_id;
            out.price = c.price;
            out.discount = c.discount;
            out.quantity = c.quantity;
        }
        EventBody::Search(s) => {
            out.query = Some(&s.query);
            out.sort = &s.sort;
            out.category_id = &s.category_id;
        }
        EventBody::Review(r) => {
            out.item_id = Some(&r.item_id);
            out.rating = r.rating;
            out.text = Some(&r.text);
            out.language = &r.language;
        }
        EventBody::DeleteUser => {}
    }
    serde_json::to_vec(&out).expect("serialising plain fields cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click() -> Event {
        Event {
            user_id: "u1".into(),
            event_id: "e1".into(),
            event_time_ms: 1_511_658_000_000,
            opt_out: false,
            body: EventBody::Click(Click {
                action: Action::Cart,
                item_id: "i9".into(),
                category_id: "c3".into(),
                price: Some(19.9),
                discount: None,
                quantity: Some(2),
            }),
        }
    }

    #[test]
    fn roundtrip_every_kind() {
        let search = Event {
            body: EventBody::Search(Search {
                query: "red \"shoes\" 女鞋".into(),
                sort: "price_asc".into(),
                category_id: Default::default(),
            }),
            ..click()
        };
        let review = Event {
            body: EventBody::Review(Review {
                item_id: "i9".into(),
                rating: Some(2),
                text: "too small\nreturned it".into(),
                language: "en".into(),
            }),
            opt_out: true,
            ..click()
        };
        for event in [click(), search, review] {
            assert_eq!(decode(&encode(&event)).unwrap(), event);
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let line = br#"{"user_id":"u","event_id":"e","event_time":5,"kind":"click",
            "action":"view","item_id":"i","extra":{"deep":[1,2,3]}}"#;
        assert!(decode(line).is_ok());
    }

    #[test]
    fn rejections_name_reason_and_field() {
        let cases: [(&[u8], RejectReason, &str); 8] = [
            (b"{\"user_id\":", RejectReason::Malformed, ""),
            (b"[1,2]", RejectReason::Malformed, ""),
            (
                br#"{"event_id":"e","event_time":5,"kind":"click","action":"view","item_id":"i"}"#,
                RejectReason::MissingField,
                "user_id",
            ),
            (
                br#"{"user_id":"u","event_id":"e","event_time":"soon","kind":"click"}"#,
                RejectReason::InvalidField,
                "event_time",
            ),
            (
                br#"{"user_id":"u","event_id":"e","event_time":5,"kind":"teleport"}"#,
                RejectReason::UnknownKind,
                "kind",
            ),
            (
                br#"{"user_id":"u","event_id":"e","event_time":5,"kind":"click","action":"view",
                "item_id":"i","price":-1}"#,
                RejectReason::InvalidField,
                "price",
            ),
            (
                br#"{"user_id":"u","event_id":"e","event_time":5,"kind":"review","item_id":"i",
                "text":"ok","rating":9}"#,
                RejectReason::InvalidField,
                "rating",
            ),
            (b"{\"user_id\":\"u\"} trailing", RejectReason::Malformed, ""),
        ];
        for (bytes, reason, field) in cases {
            let err = decode(bytes).unwrap_err();
            assert_eq!(err.reason, reason, "{}", String::from_utf8_lossy(bytes));
            assert!(err.detail.contains(field), "{err}");
        }
    }

    #[test]
    fn detail_never_quotes_record_content() {
        let line = br#"{"user_id":"u","event_id":"e","event_time":"alice@example.com"}"#;
        let err = decode(line).unwrap_err();
        assert!(!err.detail.contains("alice"), "{err}");
    }

    #[test]
    fn a_discount_just_below_one_reads_back_exactly() {
        let mut event = click();
        if let EventBody::Click(c) = &mut event.body {
            c.discount = Some(f64::from_bits(0x3FEF_FFFF_FFFF_FFFF));
        }
        assert_eq!(decode(&encode(&event)).unwrap(), event);
    }
}
