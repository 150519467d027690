//! Token ids for rendered windows, through the `tokenizers` crate.
//!
//! Accepts a `tokenizer.json` (as `mindstream-train` writes, or any Hugging Face tokenizer
//! file) or a GPT-2 style `vocab.json` + `merges.txt` pair (byte-level BPE). Each rendered
//! segment is encoded on its own and the ids are concatenated, so an event's tokens can be
//! removed from a sequence for explanations without encoding the window again; training
//! encodes the same way.

use std::ops::Range;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use crate::render::Segment;

/// A tokenizer could not be loaded or failed on input.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("no tokenizer in {0}: expected tokenizer.json or vocab.json + merges.txt")]
    NotFound(PathBuf),
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

/// A loaded tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
}

/// A window's token ids and, per event, the range of ids it contributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// `(window event index, id range)`, in window order, for the events that fit.
    pub events: Vec<(usize, Range<usize>)>,
}

impl Encoded {
    /// The ids with one event's tokens left out.
    pub fn without(&self, event: usize) -> Vec<u32> {
        match self.events.iter().find(|(e, _)| *e == event) {
            None => self.ids.clone(),
            Some((_, range)) => {
                let mut ids = Vec::with_capacity(self.ids.len() - range.len());
                ids.extend_from_slice(&self.ids[..range.start]);
                ids.extend_from_slice(&self.ids[range.end..]);
                ids
            }
        }
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        Err(TokenizeError::NotFound(dir.to_path_buf()))
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizeError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizeError::Load { path: path.into(), message: e.to_string() })?;
        Ok(TextTokenizer { inner })
    }

    /// A GPT-2 byte-level BPE tokenizer from its vocabulary and merges files.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self, TokenizeError> {
        let load = |e: tokenizers::Error| TokenizeError::Load {
            path: vocab.into(),
            message: e.to_string(),
        };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(load)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(TextTokenizer { inner })
    }

    /// Wraps a tokenizer built elsewhere (the training binary trains one).
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        TextTokenizer { inner }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes a rendered window in at most `max_tokens` ids: the header, then as many of the
    /// newest events as fit, in window order. If even the newest event does not fit, its ids
    /// are cut at the end.
    pub fn encode_window(
        &self,
        segments: &[Segment],
        max_tokens: usize,
    ) -> Result<Encoded, TokenizeError> {
        let mut header = Vec::new();
        let mut events: Vec<(usize, Vec<u32>)> = Vec::new();
        for segment in segments {
            let ids = self.encode(&segment.text)?;
            match segment.event {
                None => header.extend(ids),
                Some(event) => events.push((event, ids)),
            }
        }
        header.truncate(max_tokens);

        let mut budget = max_tokens - header.len();
        let mut keep = events.len();
        while keep > 0 && events[keep - 1].1.len() <= budget {
            budget -= events[keep - 1].1.len();
            keep -= 1;
        }
        if keep == events.len() && budget > 0 {
            if let Some((_, newest)) = events.last_mut() {
                newest.truncate(budget);
                keep -= 1;
            }
        }

        let mut ids = header;
        let mut spans = Vec::with_capacity(events.len() - keep);
        for (event, event_ids) in events.drain(keep..) {
            let start = ids.len();
            ids.extend(event_ids);
            spans.push((event, start..ids.len()));
        }
        Ok(Encoded { ids, events: spans })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_dir() -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/gpt2");
        if dir.join("vocab.json").is_file() {
            Some(dir)
        } else {
            eprintln!("skipped: ../shared/data/gpt2 is absent (real GPT-2 vocabulary)");
            None
        }
    }

    #[test]
    fn real_gpt2_vocabulary_encodes_hello_world() {
        let Some(dir) = gpt2_dir() else { return };
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tokenizer.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!(tokenizer.vocab_size(), 50_257);
    }

    #[test]
    fn window_truncation_keeps_header_and_newest_events() {
        let Some(dir) = gpt2_dir() else { return };
        let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
        let segment = |text: &str, event| Segment { text: text.into(), event };
        let segments = [
            segment("user 1d old\n", None),
            segment("+0s view c1 i1\n", Some(0)),
            segment("+1m cart c1 i1\n", Some(1)),
            segment("+1m buy c1 i1\n", Some(2)),
        ];
        let full = tokenizer.encode_window(&segments, 1000).unwrap();
        assert_eq!(full.events.len(), 3);
        let header_len = full.events[0].1.start;
        let last_two = full.ids.len() - full.events[1].1.start;
        let cut = tokenizer.encode_window(&segments, header_len + last_two).unwrap();
        assert_eq!(cut.events.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(cut.ids.len(), header_len + last_two);
        let without = full.without(1);
        assert_eq!(without.len(), full.ids.len() - full.events[1].1.len());
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path()).err().unwrap();
        assert!(err.to_string().contains("tokenizer.json or vocab.json + merges.txt"));
    }
}
