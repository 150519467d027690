//! The validated event every stage works with, and its two wire forms.
//!
//! Records arrive as JSON ([`json`]) or protobuf ([`protobuf`]); both decoders check the same
//! rules in [`Event::validate`] and return a [`Rejection`] with a bounded reason code when a
//! record cannot be used. Rejections go to the dead-letter queue; nothing here panics on input.

pub mod json;
pub mod limits;
pub mod protobuf;

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Upper bound on identifier lengths (user, event, item, category ids), in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Highest quantity a click may carry; larger values are treated as producer errors.
pub const MAX_QUANTITY: u32 = 10_000;

/// One shopper event after decoding and validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The shop's own user id. Never leaves the process: outputs carry its keyed hash.
    pub user_id: CompactString,
    /// Producer-assigned id, unique per user.
    pub event_id: CompactString,
    /// Event time, milliseconds since the Unix epoch.
    pub event_time_ms: i64,
    /// The user withdrew consent to profiling.
    pub opt_out: bool,
    pub body: EventBody,
}

/// The event kinds: three that describe the shopper, and a request to forget them.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    Click(Click),
    Search(Search),
    Review(Review),
    /// Erase the user: state in memory and in the changelog, and the latest signal record
    /// (a tombstone on the signal topic). Never windowed or scored.
    DeleteUser,
}

/// What a user did to an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    View,
    Cart,
    Fav,
    Buy,
    RemoveCart,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Click {
    pub action: Action,
    pub item_id: CompactString,
    /// Empty when the shop did not say.
    pub category_id: CompactString,
    /// Unit price, finite and non-negative.
    pub price: Option<f64>,
    /// Fraction of the list price taken off, in [0, 1).
    pub discount: Option<f64>,
    /// Units, 1..=[`MAX_QUANTITY`].
    pub quantity: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    /// Raw query text; scrubbed of personal data before it is rendered for the model.
    pub query: String,
    /// Requested sort order such as `price_asc`; empty when none.
    pub sort: String,
    /// Category filter; empty when none.
    pub category_id: CompactString,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Review {
    pub item_id: CompactString,
    /// Star rating 1..=5.
    pub rating: Option<u8>,
    /// Raw review text; scrubbed of personal data before it is rendered for the model.
    pub text: String,
    /// Language tag such as `en` or `zh`; empty when unknown.
    pub language: String,
}

/// The kind of an event, for metrics labels and rendering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Click,
    Search,
    Review,
    DeleteUser,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Click => "click",
            EventKind::Search => "search",
            EventKind::Review => "review",
            EventKind::DeleteUser => "delete_user",
        }
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::View => "view",
            Action::Cart => "cart",
            Action::Fav => "fav",
            Action::Buy => "buy",
            Action::RemoveCart => "remove_cart",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "view" => Action::View,
            "cart" => Action::Cart,
            "fav" => Action::Fav,
            "buy" => Action::Buy,
            "remove_cart" => Action::RemoveCart,
            _ => return None,
        })
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.body {
            EventBody::Click(_) => EventKind::Click,
            EventBody::Search(_) => EventKind::Search,
            EventBody::Review(_) => EventKind::Review,
            EventBody::DeleteUser => EventKind::DeleteUser,
        }
    }

    /// Checks the rules both wire forms share. Decoders call it; producers of events inside
    /// the crate (importers) call it too, so an importer cannot emit what the processor rejects.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_id("user_id", &self.user_id)?;
        check_id("event_id", &self.event_id)?;
        if self.event_time_ms <= 0 {
            return Err(Rejection::invalid("event_time", "must be a positive epoch-ms value"));
        }
        match &self.body {
            EventBody::Click(c) => c.validate(),
            EventBody::Search(s) => check_optional_id("category_id", &s.category_id),
            EventBody::Review(r) => r.validate(),
            EventBody::DeleteUser => Ok(()),
        }
    }
}

impl Click {
    fn validate(&self) -> Result<(), Rejection> {
        check_id("item_id", &self.item_id)?;
        check_optional_id("category_id", &self.category_id)?;
        if let Some(price) = self.price {
            if !price.is_finite() || price < 0.0 {
                return Err(Rejection::invalid("price", "must be finite and non-negative"));
            }
        }
        if let Some(discount) = self.discount {
            if !(0.0..1.0).contains(&discount) {
                return Err(Rejection::invalid("discount", "must be in [0, 1)"));
            }
        }
        match self.quantity {
            Some(q) if q == 0 || q > MAX_QUANTITY => {
                Err(Rejection::invalid("quantity", "must be in 1..=10000"))
            }
            _ => Ok(()),
        }
    }
}

impl Review {
    fn validate(&self) -> Result<(), Rejection> {
        check_id("item_id", &self.item_id)?;
        match self.rating {
            Some(r) if !(1..=5).contains(&r) => Err(Rejection::invalid("rating", "must be 1..=5")),
            _ => Ok(()),
        }
    }
}

fn check_id(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::missing(field));
    }
    check_optional_id(field, value)
}

fn check_optional_id(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.len() > MAX_ID_BYTES {
        return Err(Rejection::invalid(field, "longer than 256 bytes"));
    }
    // Printable ASCII, nearly every id, needs one pass.
    let printable = value.bytes().all(|b| (0x20..0x7f).contains(&b));
    let control = if printable {
        false
    } else if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err(Rejection::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Why a record was rejected. The code is a bounded metrics label and a DLQ header; the detail
/// is for people reading the DLQ and never holds record content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

/// Bounded set of rejection reasons, stable across releases (they are metric label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not parseable as the topic's format (syntax, truncation, invalid UTF-8).
    Malformed,
    /// A required field is absent or empty.
    MissingField,
    /// A field has the wrong type or a value outside its range.
    InvalidField,
    /// `kind` names no known event kind.
    UnknownKind,
    /// The event time is older than the watermark minus the allowed lateness.
    Late,
    /// The record is larger than the configured maximum.
    TooLarge,
    /// A review text or search query is longer than its configured maximum.
    TooLong,
    /// The event time lies too far before or after the record's broker timestamp.
    TimeOutOfRange,
    /// The user's window already holds an event with this `event_id`.
    Duplicate,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Malformed,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::UnknownKind,
        RejectReason::Late,
        RejectReason::TooLarge,
        RejectReason::TooLong,
        RejectReason::TimeOutOfRange,
        RejectReason::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::Late => "late",
            RejectReason::TooLarge => "too_large",
            RejectReason::TooLong => "too_long",
            RejectReason::TimeOutOfRange => "time_out_of_range",
            RejectReason::Duplicate => "duplicate",
        }
    }
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }

    pub fn missing(field: &str) -> Self {
        Rejection::new(RejectReason::MissingField, format!("missing field `{field}`"))
    }

    pub fn invalid(field: &str, why: &str) -> Self {
        Rejection::new(RejectReason::InvalidField, format!("field `{field}` {why}"))
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

impl std::error::Error for Rejection {}

/// The wire format of a topic or file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Protobuf => "protobuf",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::Json),
            "protobuf" | "proto" => Ok(Format::Protobuf),
            other => Err(format!("unknown format `{other}` (expected json or protobuf)")),
        }
    }
}

/// Decodes one record in `format`.
pub fn decode(format: Format, bytes: &[u8]) -> Result<Event, Rejection> {
    match format {
        Format::Json => json::decode(bytes),
        Format::Protobuf => protobuf::decode(bytes),
    }
}

/// Encodes one event in `format`.
pub fn encode(format: Format, event: &Event) -> Vec<u8> {
    match format {
        Format::Json => json::encode(event),
        Format::Protobuf => protobuf::encode(event),
    }
}
