//! Byte-level BPE tokenizer training (GPT-2's scheme) on rendered windows.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// GPT-2's end-of-text token, kept as the only special token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
#[error("tokenizer training failed: {0}")]
pub struct BpeError(String);

/// Trains a byte-level BPE tokenizer with `vocab_size` entries on `texts`.
pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer, BpeError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer.train(&mut trainer, texts).map_err(|e| BpeError(e.to_string()))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_frequent_pieces_and_round_trips() {
        let lines: Vec<String> = (0..200)
            .map(|i| format!("+1m view c{} i{} $12\n+5m cart c42 i1 $12\n好评 {i}\n", i % 7, i % 3))
            .collect();
        let tokenizer = train(lines.iter(), 400).unwrap();
        assert!(tokenizer.get_vocab_size(true) <= 400);
        let text = "+5m cart c42 i1 $12\n好评\n";
        let encoding = tokenizer.encode(text, false).unwrap();
        let tokens = encoding.get_tokens();
        assert!(tokens.iter().any(|t| t == "Ġcart"), "a frequent word is one token: {tokens:?}");
        assert!(tokens.len() <= 13, "merges shorten common text: {tokens:?}");
        assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), text);
        assert_eq!(tokenizer.token_to_id(END_OF_TEXT), Some(0));
    }
}
