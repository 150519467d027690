//! A Hugging Face GPT-2 checkpoint folder as the starting point of a build
//! (`mindstream-train build --init-from DIR`).
//!
//! The folder holds `config.json` (`model_type` `gpt2`), `model.safetensors` (a `GPT2Model` or
//! `GPT2LMHeadModel` save: names with or without the `transformer.` prefix, Conv1D weights
//! `[in, out]`; `lm_head.weight` and the attention buffers are ignored, the LM head being tied
//! to `wte`), and its tokenizer: `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`.
//! This module checks the pieces fit together and hands on the model and the tokenizer; the
//! build then skips tokenizer training and continues training from these weights.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::tokenize::{TextTokenizer, TokenizeError};
use crate::train::gpt2::{Gpt2, Gpt2Config, Gpt2Error};

/// File names inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const VOCAB_FILE: &str = "vocab.json";
pub const MERGES_FILE: &str = "merges.txt";

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error(
        "{0} is missing (a Hugging Face GPT-2 folder holds config.json, model.safetensors and \
         tokenizer.json or vocab.json + merges.txt)"
    )]
    Missing(PathBuf),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: model_type is {found:?}, only \"gpt2\" is supported")]
    ModelType { path: PathBuf, found: String },
    #[error("{path} is not a usable GPT-2 config")]
    Config {
        path: PathBuf,
        #[source]
        source: Box<Gpt2Error>,
    },
    #[error("cannot load the tokenizer")]
    Tokenizer(#[source] TokenizeError),
    #[error(
        "vocabulary mismatch: tokenizer {tokenizer} has {tokens} tokens, \
         {config} says vocab_size {vocab_size}"
    )]
    VocabMismatch { tokenizer: PathBuf, tokens: usize, config: PathBuf, vocab_size: usize },
    #[error(
        "{0} does not exist (give a tokenizer.json, or a folder with tokenizer.json or \
         vocab.json + merges.txt)"
    )]
    NoTokenizer(PathBuf),
    #[error("cannot load the weights of {path}")]
    Weights {
        path: PathBuf,
        #[source]
        source: Box<Gpt2Error>,
    },
}

impl From<PretrainedError> for crate::train::build::BuildError {
    fn from(err: PretrainedError) -> Self {
        crate::train::build::BuildError::Pretrained(Box::new(err))
    }
}

/// A loaded checkpoint: the model, its tokenizer and the file the tokenizer came from.
pub struct Pretrained {
    pub model: Gpt2,
    pub tokenizer: TextTokenizer,
    pub tokenizer_source: PathBuf,
}

/// Loads the checkpoint folder `dir` onto `device`, checking every file is there and that
/// the tokenizer's vocabulary is the model's.
pub fn load(dir: &Path, device: &Device) -> Result<Pretrained, PretrainedError> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    for path in [&config_path, &weights_path] {
        if !path.is_file() {
            return Err(PretrainedError::Missing(path.clone()));
        }
    }
    let config = read_config(&config_path)?;
    let (tokenizer, tokenizer_source) = load_tokenizer(dir)?;
    let tokens = tokenizer.vocab_size();
    if tokens != config.vocab_size {
        return Err(PretrainedError::VocabMismatch {
            tokenizer: tokenizer_source,
            tokens,
            config: config_path,
            vocab_size: config.vocab_size,
        });
    }
    let model = Gpt2::load_safetensors(&weights_path, config, device).map_err(|source| {
        PretrainedError::Weights { path: weights_path.clone(), source: Box::new(source) }
    })?;
    tracing::info!(
        dir = %dir.display(),
        vocab_size = tokens,
        n_positions = model.config().n_positions,
        n_embd = model.config().n_embd,
        n_layer = model.config().n_layer,
        parameters = model.num_parameters(),
        "loaded a Hugging Face GPT-2 checkpoint"
    );
    Ok(Pretrained { model, tokenizer, tokenizer_source })
}

/// Reads `config.json`, refusing a `model_type` other than `gpt2`.
fn read_config(path: &Path) -> Result<Gpt2Config, PretrainedError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PretrainedError::Read { path: path.into(), source })?;
    let kind = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(str::to_owned));
    if let Some(found) = kind.filter(|t| t != "gpt2") {
        return Err(PretrainedError::ModelType { path: path.into(), found });
    }
    Gpt2Config::from_hf_json(&text)
        .map_err(|source| PretrainedError::Config { path: path.into(), source: Box::new(source) })
}

/// `tokenizer.json`, else `vocab.json` + `merges.txt`; returns the tokenizer and its file.
fn load_tokenizer(dir: &Path) -> Result<(TextTokenizer, PathBuf), PretrainedError> {
    let json = dir.join(TOKENIZER_FILE);
    if json.is_file() {
        let tokenizer = TextTokenizer::from_file(&json).map_err(PretrainedError::Tokenizer)?;
        return Ok((tokenizer, json));
    }
    let (vocab, merges) = (dir.join(VOCAB_FILE), dir.join(MERGES_FILE));
    if !vocab.is_file() {
        return Err(PretrainedError::Missing(json));
    }
    if !merges.is_file() {
        return Err(PretrainedError::Missing(merges));
    }
    let tokenizer =
        TextTokenizer::from_vocab_merges(&vocab, &merges).map_err(PretrainedError::Tokenizer)?;
    Ok((tokenizer, vocab))
}

/// Loads a tokenizer from a `tokenizer.json` file or from a folder (`tokenizer.json`, or
/// `vocab.json` + `merges.txt`), for the frozen-backbone heads.
pub fn tokenizer_at(path: &Path) -> Result<TextTokenizer, PretrainedError> {
    if path.is_dir() {
        return load_tokenizer(path).map(|(tokenizer, _)| tokenizer);
    }
    if !path.is_file() {
        return Err(PretrainedError::NoTokenizer(path.into()));
    }
    TextTokenizer::from_file(path).map_err(PretrainedError::Tokenizer)
}

#[cfg(test)]
mod tests;
