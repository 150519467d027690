//! Pseudonymous user keys and scrubbing of personal data from free text.
//!
//! Raw user ids and raw text never leave the process: outputs carry [`Pseudonymizer::key`]
//! instead of the id, and review and search text is passed through [`scrub`] before it is
//! stored in a window, so neither the model nor the changelog ever sees an e-mail address,
//! phone number, card number or Chinese resident id number.

use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

/// Keyed hash of user ids (HMAC-SHA-256). The secret comes from a file or an environment
/// variable and is never logged or printed.
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: Hmac<Sha256>,
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
        let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| KeyError::TooShort)?;
        Ok(Pseudonymizer { mac })
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
        let mut mac = self.mac.clone();
        mac.update(user_id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
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
pub fn scrub(text: &str) -> String {
    let text = EMAIL.replace_all(text, "[email]");
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
        assert_eq!(a.key("user-1").len(), 32);
        assert!(!a.key("user-1").contains("user"));
        assert!(Pseudonymizer::new(b"short").is_err());
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
}
