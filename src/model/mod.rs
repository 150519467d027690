//! The model stage: the model card, ONNX Runtime sessions over the model contract, and the
//! batching workers that feed them.

pub mod batcher;
pub mod card;
pub mod heads;
pub mod prefix;
pub mod runtime;
pub mod scorer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::tokenize::{TextTokenizer, TokenizeError};
use card::{CardError, ModelCard};
use scorer::{ModelError, OrtScorer, Scorer};

/// File name of the model card inside a model folder.
pub const CARD_FILE: &str = "model.json";

/// A model folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Card(#[from] CardError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model folder {0} does not exist")]
    NoFolder(PathBuf),
}

/// A model ready to score: its card, tokenizer, and one scorer per worker.
pub struct LoadedModel {
    pub card: Arc<ModelCard>,
    pub tokenizer: TextTokenizer,
    pub scorers: Vec<Box<dyn Scorer>>,
    /// The execution provider in use (`cpu` or `cuda`).
    pub provider: &'static str,
    /// Whether the workers score leave-one-out variants from cached prefixes.
    pub prefix_reuse: bool,
}

impl LoadedModel {
    /// Loads the card, the tokenizer and `workers` sessions from `config.dir`.
    pub fn load(config: &ModelConfig, workers: usize) -> Result<LoadedModel, LoadError> {
        let dir = config.dir.as_path();
        if !dir.is_dir() {
            return Err(LoadError::NoFolder(dir.into()));
        }
        let card = ModelCard::load(&dir.join(CARD_FILE))?;
        let tokenizer = load_tokenizer(dir, &card)?;
        let mut scorers: Vec<Box<dyn Scorer>> = Vec::with_capacity(workers);
        let mut provider = "cpu";
        let mut prefix_reuse = false;
        for _ in 0..workers.max(1) {
            let mut scorer = OrtScorer::load(dir, &card, config)?;
            provider = scorer.provider();
            prefix_reuse = scorer.prefix().is_some();
            scorers.push(Box::new(scorer));
        }
        if card.precision == card::Precision::Fp16 && provider == "cpu" {
            tracing::warn!(
                model_version = %card.model_version,
                "fp16 model on the cpu provider: ONNX Runtime computes its arithmetic in fp32 \
                 behind inserted casts, no faster than the fp32 model"
            );
        }
        Ok(LoadedModel { card: Arc::new(card), tokenizer, scorers, provider, prefix_reuse })
    }
}

/// The tokenizer the card names, else the one in `dir` (`tokenizer.json`, or GPT-2
/// `vocab.json` + `merges.txt`).
pub fn load_tokenizer(dir: &Path, card: &ModelCard) -> Result<TextTokenizer, TokenizeError> {
    let named = dir.join(&card.tokenizer_file);
    if !card.tokenizer_file.is_empty() && named.is_file() {
        return TextTokenizer::from_file(&named);
    }
    TextTokenizer::from_dir(dir)
}
