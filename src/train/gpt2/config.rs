//! [`Gpt2Config`], the model's hyper-parameters, and its Hugging Face `config.json`: parsing
//! (rejecting settings this model would silently compute differently), writing and checking.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Gpt2Error, Result};

/// The GPT-2 hyper-parameters, named as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Number of token ids; `wte` has this many rows and the LM head this many outputs.
    pub vocab_size: usize,
    /// Longest sequence the model accepts; `wpe` has this many rows.
    pub n_positions: usize,
    /// Width of the hidden states.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// Epsilon added to the variance in every layer norm.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
}

fn default_layer_norm_epsilon() -> f64 {
    1e-5
}

/// The keys read from a Hugging Face config besides [`Gpt2Config`]'s own; others are ignored.
#[derive(Deserialize)]
struct HfConfigIn {
    #[serde(flatten)]
    config: Gpt2Config,
    activation_function: Option<String>,
    n_inner: Option<usize>,
}

/// What [`Gpt2Config::to_hf_json`] writes: enough for `transformers` to load the model.
#[derive(Serialize)]
struct HfConfigOut<'a> {
    model_type: &'static str,
    architectures: [&'static str; 1],
    #[serde(flatten)]
    config: &'a Gpt2Config,
    n_ctx: usize,
    activation_function: &'static str,
    tie_word_embeddings: bool,
}

impl Gpt2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Width of the pooled features the heads read: `2 * n_embd`.
    pub fn pooled_dim(&self) -> usize {
        2 * self.n_embd
    }

    /// Number of scalar parameters of a model of this shape (the tied LM head counted once).
    pub fn num_parameters(&self) -> usize {
        let (v, p, d) = (self.vocab_size, self.n_positions, self.n_embd);
        (v + p) * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d
    }

    /// The model card's description of a backbone of these sizes.
    pub fn card_backbone(&self) -> crate::model::card::Backbone {
        crate::model::card::Backbone {
            architecture: "gpt2".into(),
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            parameters: self.num_parameters(),
        }
    }

    /// Checks the sizes are usable, so a bad config fails here and not deep in a matmul.
    pub fn validate(&self) -> Result<()> {
        let sizes = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_head];
        if sizes.contains(&0) {
            return Err(Gpt2Error::InvalidConfig { reason: "every size must be positive" });
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Gpt2Error::InvalidConfig { reason: "n_head must divide n_embd" });
        }
        let eps = self.layer_norm_epsilon;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Gpt2Error::InvalidConfig {
                reason: "layer_norm_epsilon must be positive and finite",
            });
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`, ignoring keys this model does not use.
    ///
    /// Rejects an `activation_function` other than `gelu_new` and an `n_inner` other than
    /// `4 * n_embd`, because this model would silently compute something else for them.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let parsed: HfConfigIn =
            serde_json::from_str(text).map_err(|source| Gpt2Error::ConfigJson { source })?;
        if let Some(activation) = parsed.activation_function {
            if activation != "gelu_new" {
                return Err(Gpt2Error::UnsupportedActivation { activation });
            }
        }
        let expected = 4 * parsed.config.n_embd;
        if let Some(n_inner) = parsed.n_inner.filter(|&n| n != expected) {
            return Err(Gpt2Error::UnsupportedInner { n_inner, expected });
        }
        parsed.config.validate()?;
        Ok(parsed.config)
    }

    /// The config as Hugging Face `config.json` text (`model_type` `gpt2`,
    /// `GPT2LMHeadModel`).
    pub fn to_hf_json(&self) -> Result<String> {
        let out = HfConfigOut {
            model_type: "gpt2",
            architectures: ["GPT2LMHeadModel"],
            config: self,
            n_ctx: self.n_positions,
            activation_function: "gelu_new",
            tie_word_embeddings: true,
        };
        serde_json::to_string_pretty(&out).map_err(|source| Gpt2Error::ConfigJson { source })
    }

    /// Reads a Hugging Face `config.json` file.
    pub fn read_hf_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Gpt2Error::ConfigRead { path: path.into(), source })?;
        Self::from_hf_json(&text)
    }

    /// Writes the config as a Hugging Face `config.json` file.
    pub fn write_hf_config(&self, path: &Path) -> Result<()> {
        let text = self.to_hf_json()?;
        std::fs::write(path, text)
            .map_err(|source| Gpt2Error::ConfigWrite { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::gpt2::testing::tiny_config;

    #[test]
    fn hf_config_roundtrips_and_ignores_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = tiny_config();
        config.write_hf_config(&path).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written["model_type"], "gpt2");
        assert_eq!(written["architectures"][0], "GPT2LMHeadModel");
        assert_eq!(written["n_embd"], 32);
        assert_eq!(Gpt2Config::read_hf_config(&path).unwrap(), config);

        let hf = r#"{"activation_function": "gelu_new", "attn_pdrop": 0.1, "n_ctx": 1024,
            "n_embd": 768, "n_head": 12, "n_inner": null, "n_layer": 12, "n_positions": 1024,
            "layer_norm_epsilon": 1e-05, "vocab_size": 50257, "model_type": "gpt2",
            "task_specific_params": {"text-generation": {"do_sample": true}}}"#;
        let gpt2 = Gpt2Config::from_hf_json(hf).unwrap();
        assert_eq!((gpt2.vocab_size, gpt2.n_layer, gpt2.head_dim()), (50257, 12, 64));

        let relu = r#"{"activation_function": "relu", "n_embd": 8, "n_head": 2, "n_layer": 1,
            "n_positions": 8, "vocab_size": 10}"#;
        let err = Gpt2Config::from_hf_json(relu).unwrap_err();
        assert!(matches!(err, Gpt2Error::UnsupportedActivation { .. }), "{err}");
        let odd =
            r#"{"n_embd": 10, "n_head": 3, "n_layer": 1, "n_positions": 8, "vocab_size": 10}"#;
        assert!(matches!(Gpt2Config::from_hf_json(odd), Err(Gpt2Error::InvalidConfig { .. })));
    }
}
