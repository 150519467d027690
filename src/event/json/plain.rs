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
    // Checked once here rather than string by string: bytes beyond ASCII can only stand in a
    // string, so a record that is not UTF-8 is serde_json's to reject anyway.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut cursor = Cursor { text, at: 0 };
    let mut incoming = Incoming::default();
    let mut seen = 0u32;
    cursor.expect(b'{')?;
    if cursor.peek()? == b'}' {
        cursor.at += 1;
    } else {
        loop {
            let field = cursor.key()?;
            cursor.expect(b':')?;
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
    /// The field's name as records spell it.
    fn name(self) -> &'static [u8] {
        match self {
            Field::UserId => b"user_id",
            Field::EventId => b"event_id",
            Field::EventTime => b"event_time",
            Field::OptOut => b"opt_out",
            Field::Kind => b"kind",
            Field::Action => b"action",
            Field::ItemId => b"item_id",
            Field::CategoryId => b"category_id",
            Field::Price => b"price",
            Field::Discount => b"discount",
            Field::Quantity => b"quantity",
            Field::Query => b"query",
            Field::Sort => b"sort",
            Field::Rating => b"rating",
            Field::Text => b"text",
            Field::Language => b"language",
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

/// Where a plain string stops in `rest` (the first byte [`ENDS_STRING`] marks), eight bytes
/// at a time: a byte is found equal to the quote or the backslash, or below 0x20, by the
/// borrow of subtracting from it. The lowest marked byte of each test is exact, and so is the
/// lowest of the three together.
fn string_end(rest: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH_BITS: u64 = u64::from_le_bytes([0x80; 8]);
    let zero_bytes = |word: u64| word.wrapping_sub(ONES) & !word;
    let mut at = 0;
    while let Some(chunk) = rest.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let marked = (zero_bytes(word ^ (ONES * u64::from(b'"')))
            | zero_bytes(word ^ (ONES * u64::from(b'\\')))
            | (word.wrapping_sub(ONES * 0x20) & !word))
            & HIGH_BITS;
        if marked != 0 {
            return Some(at + marked.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let tail = rest[at..].iter().position(|&byte| ENDS_STRING[usize::from(byte)])?;
    Some(at + tail)
}

struct Cursor<'a> {
    /// The record, known to be UTF-8.
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The record's bytes.
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// JSON's whitespace: space, tab, line feed and carriage return, nothing else.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes().get(self.at).copied()
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

    /// A string without escapes or control characters, borrowed from the record. Its ends
    /// are next to quotes, so always on character boundaries.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let end = start + string_end(&self.bytes()[start..])?;
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// A key that is one of the fields' names, closed by its quote: compared in place rather
    /// than scanned for its end first (each comparison is of a constant length, which the
    /// compiler reads as a few words). Any other key, or one with an escape, is `None`.
    fn key(&mut self) -> Option<Field> {
        self.expect(b'"')?;
        let rest = &self.bytes()[self.at..];
        let is = |name: &[u8]| rest.starts_with(name);
        let field = match rest.first()? {
            b'u' if is(b"user_id\"") => Field::UserId,
            b'e' if is(b"event_id\"") => Field::EventId,
            b'e' if is(b"event_time\"") => Field::EventTime,
            b'o' if is(b"opt_out\"") => Field::OptOut,
            b'k' if is(b"kind\"") => Field::Kind,
            b'a' if is(b"action\"") => Field::Action,
            b'i' if is(b"item_id\"") => Field::ItemId,
            b'c' if is(b"category_id\"") => Field::CategoryId,
            b'p' if is(b"price\"") => Field::Price,
            b'd' if is(b"discount\"") => Field::Discount,
            b'q' if is(b"quantity\"") => Field::Quantity,
            b'q' if is(b"query\"") => Field::Query,
            b's' if is(b"sort\"") => Field::Sort,
            b'r' if is(b"rating\"") => Field::Rating,
            b't' if is(b"text\"") => Field::Text,
            b'l' if is(b"language\"") => Field::Language,
            _ => return None,
        };
        self.at += field.name().len() + 1;
        Some(field)
    }

    /// Consumes `word` (`null`, `true`, `false`) if it comes next.
    fn word(&mut self, word: &[u8]) -> bool {
        let found = self.bytes()[self.at..].starts_with(word);
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
        // Accumulated as the digits are read; more than 18 are refused below, so the value
        // wraps only when it is not used.
        let mut value = 0u64;
        while let Some(&digit @ b'0'..=b'9') = self.bytes().get(self.at) {
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit - b'0'));
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || digits > 18 || (digits > 1 && self.bytes()[start] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes().get(self.at) {
            return None;
        }
        Some(value)
    }

    /// A decimal without exponent, `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, of at most 40 bytes, read
    /// with correct rounding, as serde_json's `float_roundtrip` does.
    fn decimal(&mut self) -> Option<f64> {
        let start = self.at;
        if self.bytes().get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let first = self.at;
        let whole = self.digits();
        if whole == 0 || (whole > 1 && self.bytes()[first] == b'0') {
            return None;
        }
        if self.bytes().get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.bytes().get(self.at) {
            return None;
        }
        let text = &self.bytes()[start..self.at];
        if text.len() > 40 {
            return None;
        }
        // ASCII digits, sign and point only.
        std::str::from_utf8(text).ok()?.parse().ok()
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.bytes().get(self.at).is_some_and(u8::is_ascii_digit) {
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

    #[test]
    fn finds_a_string_end_as_a_byte_by_byte_scan_does() {
        let scan = |rest: &[u8]| rest.iter().position(|&byte| ENDS_STRING[usize::from(byte)]);
        // Every stop byte and some that are not, at every offset of strings of up to 24
        // bytes, so that each lands in every lane of a word and in the tail.
        let stops = [b'"', b'\\', 0x00, 0x1f, b'\n'];
        let fillers = [b'a', b' ', 0x20, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff];
        for len in 0..24 {
            for &filler in &fillers {
                let plain = vec![filler; len];
                assert_eq!(string_end(&plain), scan(&plain), "{plain:?}");
                for at in 0..len {
                    for &stop in &stops {
                        let mut bytes = plain.clone();
                        bytes[at] = stop;
                        assert_eq!(string_end(&bytes), Some(at), "{bytes:?}");
                    }
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..20_000 {
            let bytes: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
            assert_eq!(string_end(&bytes), scan(&bytes), "{bytes:?}");
        }
    }

    #[test]
    fn takes_only_whole_field_names_as_keys() {
        for record in [
            &br#"{"user_idx":"u"}"#[..],
            br#"{"user_i":"u"}"#,
            br#"{"event_tim":5}"#,
            br#"{"event_":"e"}"#,
            br#"{"querys":"q"}"#,
            br#"{"":"u"}"#,
            br#"{"user_id"#,
            br#"{"user_id""#,
            br#"{"e"#,
        ] {
            assert_eq!(parse(record), None, "{}", String::from_utf8_lossy(record));
        }
        let record = br#"{"event_time":5,"event_id":"e","quantity":2,"query":"q"}"#;
        assert_eq!(parse(record), serde(record));
        assert!(parse(record).is_some());
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
