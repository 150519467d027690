//! Pseudonymous user keys and scrubbing of personal data from free text.
//!
//! Raw user ids and raw text never leave the process: outputs carry [`Pseudonymizer::key`]
//! instead of the id, and review and search text is passed through [`scrub`] before it is
//! stored in a window, so neither the model nor the changelog ever sees an e-mail address,
//! phone number, card number or Chinese resident id number. [`scrub`] first [`normalize`]s the
//! text (NFKC, whitespace to spaces, control and invisible characters removed), so full-width
//! forms and characters hidden inside a number do not let personal data slip past it.

use std::sync::LazyLock;

use regex::Regex;
use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

/// Keyed hash of user ids (HMAC-SHA-256). The secret comes from a file or an environment
/// variable and is never logged or printed.
#[derive(Clone)]
pub struct Pseudonymizer {
    /// SHA-256's state after the key's inner pad, and after its outer pad (RFC 2104), so that
    /// an id costs only its own blocks: two compressions for an id of up to 55 bytes.
    inner: [u32; 8],
    outer: [u32; 8],
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// SHA-256's state after one block of `key` (zero-padded to 64 bytes) XOR `pad`.
fn padded_state(key: &[u8; 64], pad: u8) -> [u32; 8] {
    let block: [u8; 64] = std::array::from_fn(|i| key[i] ^ pad);
    let mut state = SHA256_INITIAL;
    sha2::compress256(&mut state, &[GenericArray::clone_from_slice(&block)]);
    state
}

/// Finishes a SHA-256 whose first block (a pad) is already in `state`: compresses `message`,
/// then the padding: the 0x80 byte and the 8-byte bit length, in one more block when the
/// message's last block has no room for them.
fn finish_after_pad(mut state: [u32; 8], message: &[u8]) -> [u32; 8] {
    let compress = |state: &mut [u32; 8], block: &[u8]| {
        sha2::compress256(state, &[GenericArray::clone_from_slice(block)]);
    };
    let mut blocks = message.chunks_exact(64);
    for block in &mut blocks {
        compress(&mut state, block);
    }
    let tail = blocks.remainder();
    let mut last = [0u8; 64];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    if tail.len() >= 56 {
        compress(&mut state, &last);
        last = [0u8; 64];
    }
    let bits = (64 + message.len() as u64) * 8;
    last[56..].copy_from_slice(&bits.to_be_bytes());
    compress(&mut state, &last);
    state
}

/// The secret could not be found or is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read privacy.pseudonym_key_file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no pseudonymisation key: set privacy.pseudonym_key_file or the variable {env}")]
    Missing { env: String },
    #[error("the pseudonymisation key is shorter than 16 bytes")]
    TooShort,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer(<secret>)")
    }
}

impl Pseudonymizer {
    /// Minimum secret length, in bytes.
    pub const MIN_KEY_BYTES: usize = 16;

    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < Self::MIN_KEY_BYTES {
            return Err(KeyError::TooShort);
        }
        // HMAC's key block (RFC 2104): a key longer than a block is hashed first.
        let mut key = [0u8; 64];
        if secret.len() > key.len() {
            key[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            key[..secret.len()].copy_from_slice(secret);
        }
        let (inner, outer) = (padded_state(&key, 0x36), padded_state(&key, 0x5c));
        Ok(Pseudonymizer { inner, outer })
    }

    /// Loads the secret from `file`, else from the environment variable `env`.
    pub fn from_config(config: &crate::config::PrivacyConfig) -> Result<Self, KeyError> {
        if let Some(path) = &config.pseudonym_key_file {
            let bytes = std::fs::read(path)
                .map_err(|source| KeyError::Read { path: path.clone(), source })?;
            return Self::new(trim_newline(&bytes));
        }
        match std::env::var_os(&config.pseudonym_key_env) {
            Some(value) => Self::new(value.as_encoded_bytes()),
            None => Err(KeyError::Missing { env: config.pseudonym_key_env.clone() }),
        }
    }

    /// The user's key in every output: the first 128 bits of the HMAC, as 32 hex digits.
    pub fn key(&self, user_id: &str) -> String {
        self.user_key(user_id).to_string()
    }

    /// [`Pseudonymizer::key`] as a number, for holding and looking users up without an
    /// allocation.
    pub fn user_key(&self, user_id: &str) -> UserKey {
        // HMAC = H(outer pad || H(inner pad || id)); each pad is one block already hashed.
        let inner = finish_after_pad(self.inner, user_id.as_bytes());
        let mut digest = [0u8; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(inner) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        let outer = finish_after_pad(self.outer, &digest);
        UserKey(outer[..4].iter().fold(0, |key, &word| key << 32 | u128::from(word)))
    }
}

/// A pseudonymised user: the first 128 bits of the keyed hash, shown (`Display`) as the 32
/// lowercase hex digits that outputs carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserKey(u128);

impl UserKey {
    /// Reads a key as outputs show it; `None` for anything but 32 lowercase hex digits.
    pub fn parse(digits: &str) -> Option<UserKey> {
        let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        if digits.len() != 32 || !digits.as_bytes().iter().all(hex) {
            return None;
        }
        u128::from_str_radix(digits, 16).ok().map(UserKey)
    }
}

impl std::fmt::Display for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

fn trim_newline(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}").expect("regex")
});

/// Chinese resident identity numbers: 17 digits and a check character (digit or X).
static CN_ID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?-u:\b)[1-9]\d{5}(?:19|20)\d{2}\d{7}[0-9x](?-u:\b)").expect("regex")
});

/// Runs of 13-19 digits, optionally grouped by spaces or dashes: card candidates, Luhn-checked.
static DIGIT_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)\d(?:[ \-]?\d){12,18}(?-u:\b)").expect("regex"));

/// Phone numbers: Chinese mobiles (1[3-9] and 9 digits, optional +86) and international or
/// grouped forms of 8 or more digits.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?:\+?86[ \-]?)?(?-u:\b)1[3-9]\d(?:[ \-]?\d{4}){2}(?-u:\b)",
        r"|\+\d{1,3}[ \-.]?(?:\(\d{1,4}\)[ \-.]?)?\d{2,4}(?:[ \-.]?\d{2,4}){1,4}",
        r"|\(?(?-u:\b)\d{3}\)?[ \-.]\d{3}[ \-.]\d{4}(?-u:\b)",
    ))
    .expect("regex")
});

/// Replaces personal data in `text` with placeholders: `[email]`, `[id]`, `[card]`, `[phone]`.
/// The text is [`normalize`]d first, so full-width digits and `＠`, and digits split by
/// invisible characters, are found too; what comes back is the text the model may see.
pub fn scrub(text: &str) -> String {
    let text = normalize(text);
    let text = EMAIL.replace_all(&text, "[email]");
    let text = CN_ID.replace_all(&text, |caps: &regex::Captures| {
        if cn_id_checksum_ok(&caps[0]) {
            "[id]".to_owned()
        } else {
            caps[0].to_owned()
        }
    });
    let text = DIGIT_RUN.replace_all(&text, |caps: &regex::Captures| {
        if luhn_ok(&caps[0]) {
            "[card]".to_owned()
        } else {
            caps[0].to_owned()
        }
    });
    PHONE.replace_all(&text, "[phone]").into_owned()
}

/// Free text as the patterns above and the model read it: folded to Unicode NFKC (full-width
/// and other compatibility forms become their plain forms: `１３８` is `138`, `＠` is `@`),
/// every kind of whitespace a plain space, other control characters and the invisible
/// characters of [`is_invisible`] removed.
pub fn normalize(text: &str) -> String {
    text.nfkc()
        .filter_map(|c| match c {
            c if c.is_whitespace() => Some(' '),
            c if c.is_control() || is_invisible(c) => None,
            c => Some(c),
        })
        .collect()
}

/// Characters drawn as nothing, or that only steer how text around them is drawn: Unicode's
/// format characters (general category Cf: zero-width space and joiners, word joiner, byte
/// order mark, the bidirectional embeddings, overrides and isolates, soft hyphen, tags) and
/// its other default-ignorable code points (variation selectors, Hangul fillers). Hidden in
/// a number they would break it up for the patterns; around it they can disguise it.
pub fn is_invisible(c: char) -> bool {
    if c < '\u{ad}' {
        return false;
    }
    INVISIBLE.iter().any(|&(first, last)| (first..=last).contains(&c))
}

/// The ranges of [`is_invisible`], in code point order.
const INVISIBLE: [(char, char); 25] = [
    ('\u{00ad}', '\u{00ad}'),
    ('\u{034f}', '\u{034f}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061c}', '\u{061c}'),
    ('\u{06dd}', '\u{06dd}'),
    ('\u{070f}', '\u{070f}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08e2}', '\u{08e2}'),
    ('\u{115f}', '\u{1160}'),
    ('\u{17b4}', '\u{17b5}'),
    ('\u{180b}', '\u{180f}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{206f}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{fe00}', '\u{fe0f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{ffa0}', '\u{ffa0}'),
    ('\u{fff0}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0000}', '\u{e0fff}'),
];

/// The Luhn check over the digits of `s`.
pub fn luhn_ok(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 13 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// GB 11643-1999 check character of an 18-character resident id number.
fn cn_id_checksum_ok(s: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = s.as_bytes();
    if bytes.len() != 18 || !bytes[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = bytes[..17].iter().zip(WEIGHTS).map(|(b, w)| u32::from(b - b'0') * w).sum();
    CHECK[(sum % 11) as usize] == bytes[17].to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_keyed_and_opaque() {
        let a = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        let b = Pseudonymizer::new(b"fedcba9876543210").unwrap();
        assert_eq!(a.key("user-1"), a.key("user-1"));
        assert_ne!(a.key("user-1"), a.key("user-2"));
        assert_ne!(a.key("user-1"), b.key("user-1"));
        // HMAC-SHA-256 of the id under the secret, first 16 bytes in lowercase hex, as
        // Python's `hmac.new(secret, id, hashlib.sha256).hexdigest()[:32]` gives it.
        assert_eq!(a.key("user-1"), "9671a70114c638eedd26dab7f09610ba");
        assert!(!a.key("user-1").contains("user"));
        assert!(Pseudonymizer::new(b"short").is_err());
    }

    /// The pads' states give the HMAC crate's keys, for ids on both sides of one block and
    /// for secrets shorter and longer than a block.
    #[test]
    fn keys_hash_as_the_hmac_crate_does() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        let chars = ['a', 'Z', '7', ':', '#', ' ', 'é', '女', '\u{1F600}'];
        for _ in 0..2_000 {
            let secret: Vec<u8> = (0..rng.random_range(16..150)).map(|_| rng.random()).collect();
            let keys = Pseudonymizer::new(&secret).unwrap();
            let id: String = (0..rng.random_range(0..70))
                .map(|_| chars[rng.random_range(..chars.len())])
                .collect();
            assert_eq!(keys.key(&id), reference(&secret, &id), "id of {} bytes", id.len());
        }
        // Every length around the one-block limit.
        let keys = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        for len in 0..=57 {
            let id = "x".repeat(len);
            assert_eq!(keys.key(&id), reference(b"0123456789abcdef", &id), "id of {len} bytes");
        }
    }

    /// The hmac crate's HMAC-SHA-256 of `id`, first 16 bytes in hex.
    fn reference(secret: &[u8], id: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(id.as_bytes());
        mac.finalize().into_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn user_keys_read_back_from_their_digits_and_nothing_else() {
        let key = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        for id in ["user-1", "", "女鞋", "taobao:543462#4"] {
            let user = key.user_key(id);
            assert_eq!(user.to_string(), key.key(id));
            assert_eq!(UserKey::parse(&key.key(id)), Some(user));
        }
        // Leading zeros are kept.
        assert_eq!(UserKey(1).to_string(), format!("{}1", "0".repeat(31)));
        let digits = key.key("user-1");
        for bad in [&digits[1..], &digits.to_uppercase(), &format!("+{}", &digits[1..]), "user-1"] {
            assert_eq!(UserKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn scrubs_emails_phones_cards_and_ids() {
        let cases = [
            ("mail me at Jane.Doe+shop@example.co.uk today", "mail me at [email] today"),
            ("call 138 1234 5678 please", "call [phone] please"),
            ("手机13812345678联系", "手机[phone]联系"),
            ("+86 139-1234-5678", "[phone]"),
            ("ring +44 20 7946 0958 now", "ring [phone] now"),
            ("US (415) 555-2671", "US [phone]"),
            ("card 4111 1111 1111 1111 ok", "card [card] ok"),
            ("order 4111 1111 1111 1112 ok", "order 4111 1111 1111 1112 ok"),
            ("身份证 11010519491231002X 号", "身份证 [id] 号"),
            ("size 38, 2 pairs, 99 yuan", "size 38, 2 pairs, 99 yuan"),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input}");
        }
    }

    #[test]
    fn full_width_forms_are_folded_before_scrubbing() {
        let cases = [
            ("电话１３８００１３８０００，谢谢", "电话[phone],谢谢"),
            ("手机：＋８６ １３９－１２３４－５６７８", "手机:[phone]"),
            ("联系 ｗａｎｇ．ｌｅｉ＠ｅｘａｍｐｌｅ．ｃｎ 或者", "联系 [email] 或者"),
            ("write to li.na＠example.com please", "write to [email] please"),
            ("身份证１１０１０５１９４９１２３１００２Ｘ", "身份证[id]"),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input}");
        }
    }

    #[test]
    fn invisible_characters_cannot_hide_personal_data() {
        let cases = [
            ("card 4111 1111\u{200b}1111 1111 thanks", "card [card] thanks"),
            ("call \u{202e}13800138000\u{202c} now", "call [phone] now"),
            ("138\u{2060}0013\u{feff}8000", "[phone]"),
            ("mail\u{2066} jane\u{200d}@example.com\u{2069}", "mail [email]"),
            ("tel\u{00ad}: 138-0013-8000", "tel: [phone]"),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input:?}");
        }
    }

    #[test]
    fn normalize_keeps_scripts_and_emoji_and_drops_controls() {
        assert_eq!(normalize("质量很好 👍 très bien"), "质量很好 👍 très bien");
        let breaks = "line\none\r\ttab\u{85}nel\u{2028}sep";
        assert_eq!(normalize(breaks), "line one  tab nel sep");
        assert_eq!(normalize("bell\u{7}null\u{0}esc\u{1b}[31m"), "bellnullesc[31m");
        assert_eq!(normalize("\u{202b}שלום\u{202c} ok"), "שלום ok");
        assert_eq!(normalize("ｆｕｌｌ　ｗｉｄｔｈ"), "full width");
        assert!(!normalize("a\u{200b}b\u{200c}c\u{200d}d\u{fe0f}").contains(is_invisible));
    }
}
