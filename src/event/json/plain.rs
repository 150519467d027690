//! The common JSON record, read without serde: one flat object of the known fields, strings
//! without escapes, whole numbers without sign or exponent, and decimals without exponent.
//!
//! Producers almost always write exactly that, and serde_json's generic path costs several
//! times more per record. [`parse`] reads such a record straight into [`Incoming`] and gives
//! up (`None`) on anything else: an unknown or repeated field, an escape, a control
//! character, invalid UTF-8, a signed integer, an exponent, a nested value, trailing bytes.
//! The caller then decodes the record with serde_json, which accepts or rejects it and names
//! the fault. So this path never decides a rejection: whatever it returns, serde_json returns
//! too, value for value; a unit test and the `decode_json` fuzz target compare the two.

use std::borrow::Cow;

use super::Incoming;

/// Reads `bytes` as a plain record, or `None` when serde_json must decide.
pub(super) fn parse(bytes: &[u8]) -> Option<Incoming<'_>> {
    let mut cursor = Cursor { bytes, at: 0 };
    let mut incoming = Incoming::default();
    let mut seen = 0u32;
    cursor.expect(b'{')?;
    if cursor.peek()? == b'}' {
        cursor.at += 1;
    } else {
        loop {
            let key = cursor.raw_string()?;
            cursor.expect(b':')?;
            let field = Field::named(key)?;
            // serde rejects a repeated field, even one that was `null` the first time.
            let bit = 1 << field as u32;
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            cursor.value(field, &mut incoming)?;
            match cursor.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
    }
    cursor.skip_whitespace();
    (cursor.at == bytes.len()).then_some(incoming)
}

/// The fields of [`Incoming`], numbered for the repeated-field check.
#[derive(Clone, Copy)]
enum Field {
    UserId,
    EventId,
    EventTime,
    OptOut,
    Kind,
    Action,
    ItemId,
    CategoryId,
    Price,
    Discount,
    Quantity,
    Query,
    Sort,
    Rating,
    Text,
    Language,
}

impl Field {
    /// The field a key names. Keys are told apart by length first, so each is compared with
    /// at most four names.
    fn named(key: &[u8]) -> Option<Field> {
        let field = |name: &[u8], field: Field| (key == name).then_some(field);
        match key.len() {
            4 => field(b"kind", Field::Kind)
                .or_else(|| field(b"sort", Field::Sort))
                .or_else(|| field(b"text", Field::Text)),
            5 => field(b"price", Field::Price).or_else(|| field(b"query", Field::Query)),
            6 => field(b"action", Field::Action).or_else(|| field(b"rating", Field::Rating)),
            7 => field(b"user_id", Field::UserId)
                .or_else(|| field(b"item_id", Field::ItemId))
                .or_else(|| field(b"opt_out", Field::OptOut)),
            8 => field(b"event_id", Field::EventId)
                .or_else(|| field(b"discount", Field::Discount))
                .or_else(|| field(b"quantity", Field::Quantity))
                .or_else(|| field(b"language", Field::Language)),
            10 => field(b"event_time", Field::EventTime),
            11 => field(b"category_id", Field::CategoryId),
            _ => None,
        }
    }
}

/// The bytes a plain string stops at: its closing quote, or what only serde_json reads (an
/// escape, or a control character, which JSON does not allow unescaped).
static ENDS_STRING: [bool; 256] = {
    let mut ends = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        ends[byte] = true;
        byte += 1;
    }
    ends[b'"' as usize] = true;
    ends[b'\\' as usize] = true;
    ends
};

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// JSON's whitespace: space, tab, line feed and carriage return, nothing else.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes.get(self.at).copied()
    }

    /// The next byte after whitespace, consumed.
    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// A string without escapes or control characters, borrowed from the record.
    fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.raw_string()?).ok()
    }

    /// The bytes of a string without escapes or control characters. Keys are read so: they
    /// are only compared with the field names, which are ASCII.
    fn raw_string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let rest = &self.bytes[self.at..];
        // Ids and words are short: one plain pass beats a vectorised search's setup.
        let end = rest.iter().position(|&byte| ENDS_STRING[usize::from(byte)])?;
        if rest[end] != b'"' {
            return None;
        }
        self.at += end + 1;
        Some(&rest[..end])
    }

    /// Consumes `word` (`null`, `true`, `false`) if it comes next.
    fn word(&mut self, word: &[u8]) -> bool {
        let found = self.bytes[self.at..].starts_with(word);
        if found {
            self.at += word.len();
        }
        found
    }

    /// The digits of a whole number: `0`, or up to 18 digits without a leading zero (so the
    /// value fits any integer type serde_json would read it into), not followed by a fraction
    /// or an exponent.
    fn whole(&mut self) -> Option<u64> {
        let start = self.at;
        let digits = self.digits();
        let text = &self.bytes[start..self.at];
        if digits == 0 || digits > 18 || (digits > 1 && text[0] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        Some(text.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
    }

    /// A decimal without exponent, `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, of at most 40 bytes, read
    /// with correct rounding, as serde_json's `float_roundtrip` does.
    fn decimal(&mut self) -> Option<f64> {
        let start = self.at;
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let first = self.at;
        let whole = self.digits();
        if whole == 0 || (whole > 1 && self.bytes[first] == b'0') {
            return None;
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        let text = &self.bytes[start..self.at];
        if text.len() > 40 {
            return None;
        }
        // ASCII digits, sign and point only.
        std::str::from_utf8(text).ok()?.parse().ok()
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        self.at - start
    }

    /// Reads `field`'s value into `incoming`; `null` leaves it absent, as serde does.
    fn value(&mut self, field: Field, incoming: &mut Incoming<'a>) -> Option<()> {
        if self.peek()? == b'n' {
            return self.word(b"null").then_some(());
        }
        let text = |cursor: &mut Self| cursor.string().map(|s| Some(Cow::Borrowed(s)));
        match field {
            Field::UserId => incoming.user_id = text(self)?,
            Field::EventId => incoming.event_id = text(self)?,
            Field::Kind => incoming.kind = text(self)?,
            Field::Action => incoming.action = text(self)?,
            Field::ItemId => incoming.item_id = text(self)?,
            Field::CategoryId => incoming.category_id = text(self)?,
            Field::Query => incoming.query = text(self)?,
            Field::Sort => incoming.sort = text(self)?,
            Field::Text => incoming.text = text(self)?,
            Field::Language => incoming.language = text(self)?,
            Field::EventTime => incoming.event_time = Some(i64::try_from(self.whole()?).ok()?),
            Field::Quantity => incoming.quantity = Some(u32::try_from(self.whole()?).ok()?),
            Field::Rating => incoming.rating = Some(u8::try_from(self.whole()?).ok()?),
            Field::Price => incoming.price = Some(self.decimal()?),
            Field::Discount => incoming.discount = Some(self.decimal()?),
            Field::OptOut => {
                incoming.opt_out = Some(if self.word(b"true") {
                    true
                } else if self.word(b"false") {
                    false
                } else {
                    return None;
                })
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// What serde_json reads, for comparison.
    fn serde(bytes: &[u8]) -> Option<Incoming<'_>> {
        serde_json::from_slice(bytes).ok()
    }

    #[test]
    fn reads_the_common_records_as_serde_does() {
        let records: [&[u8]; 6] = [
            br#"{"user_id":"u1","event_id":"e1","event_time":1511658000000,"kind":"click",
                "action":"cart","item_id":"i9","category_id":"c3","price":19.9}"#,
            r#" { "user_id" : "u" , "event_id":"e", "event_time":5, "kind":"review",
                "item_id":"i", "rating":2, "text":"too small 女鞋", "language":"zh" } "#
                .as_bytes(),
            br#"{"user_id":"u","event_id":"e","event_time":5,"kind":"search","query":"red shoes",
                "sort":"price_asc","opt_out":true}"#,
            br#"{"user_id":"u","event_id":"e","event_time":0,"kind":"click","action":"view",
                "item_id":"i","price":-0.0,"discount":0.25,"quantity":3}"#,
            br#"{"user_id":null,"event_id":"e","event_time":5,"kind":"delete_user",
                "opt_out":false}"#,
            br#"{}"#,
        ];
        for record in records {
            let plain = parse(record);
            assert!(plain.is_some(), "{}", String::from_utf8_lossy(record));
            assert_eq!(plain, serde(record), "{}", String::from_utf8_lossy(record));
        }
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        let records: [&[u8]; 14] = [
            br#"{"user_id":"u\"1"}"#,
            br#"{"user\u005fid":"u"}"#,
            br#"{"extra":1}"#,
            br#"{"user_id":"u","user_id":"v"}"#,
            br#"{"user_id":null,"user_id":"v"}"#,
            br#"{"event_time":-5}"#,
            br#"{"event_time":05}"#,
            br#"{"event_time":5.0}"#,
            br#"{"price":1e3}"#,
            br#"{"rating":300}"#,
            br#"{"user_id":"u"} x"#,
            b"{\"user_id\":\"a\x01b\"}",
            b"{\"user_id\":\"\xff\"}",
            br#"{"opt_out":1}"#,
        ];
        for record in records {
            assert_eq!(parse(record), None, "{}", String::from_utf8_lossy(record));
        }
    }

    /// Random records built from the fields' usual and unusual values, then damaged at random:
    /// whatever the plain reader accepts, serde_json reads to the same values.
    #[test]
    fn agrees_with_serde_on_random_records() {
        let mut rng = StdRng::seed_from_u64(7);
        let keys = ["user_id", "event_id", "event_time", "opt_out", "kind", "action", "item_id"];
        let more = ["category_id", "price", "discount", "quantity", "query", "sort", "rating"];
        let values = [
            "\"a\"",
            "\"\"",
            "\"女\"",
            "null",
            "true",
            "false",
            "0",
            "7",
            "-3",
            "01",
            "1.5",
            "-0.25",
            "0.1",
            "12345678901234567890",
            "1e2",
            "255",
            "256",
            "4294967296",
            "[]",
            "{}",
            "\"\\n\"",
            "3.",
            ".5",
            "-",
            "-0",
            "99999999999999999",
        ];
        let mut accepted = 0;
        for _ in 0..100_000 {
            let mut record = String::from("{");
            for i in 0..rng.random_range(0..6usize) {
                if i > 0 {
                    record.push(',');
                }
                let key = if rng.random() {
                    keys[rng.random_range(..keys.len())]
                } else {
                    more[rng.random_range(..more.len())]
                };
                let value = values[rng.random_range(..values.len())];
                record.push_str(&format!("{}\"{key}\"{}:{value}", ws(&mut rng), ws(&mut rng)));
            }
            record.push('}');
            let mut bytes = record.into_bytes();
            if rng.random_range(0..4u8) == 0 {
                let at = rng.random_range(..bytes.len());
                bytes[at] = rng.random();
            }
            let plain = parse(&bytes);
            if plain.is_some() {
                accepted += 1;
                assert_eq!(plain, serde(&bytes), "{}", String::from_utf8_lossy(&bytes));
            }
        }
        // The comparison means something only if many records took the plain path.
        assert!(accepted > 10_000, "{accepted}");
    }

    fn ws(rng: &mut StdRng) -> &'static str {
        [" ", "", "", "\n\t", "\r"][rng.random_range(0..5usize)]
    }
}
