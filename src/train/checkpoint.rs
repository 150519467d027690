//! Training checkpoints of a build (`--checkpoint-dir`, `--resume`).
//!
//! Each checkpoint is a folder in the checkpoint directory holding `model.safetensors` (the
//! weights, bare Hugging Face names), `state.json` ([`State`]: the phase, the steps taken, the
//! settings of the run and the facts so far) and, in the middle of the language model,
//! `optimizer.safetensors` (the AdamW moments). The batch order needs no saving: it is a
//! function of the seed and the steps taken, and the language model replays it.
//!
//! Folders: `lm-NNNNNNNN` every `checkpoint_every` language-model steps (only the newest is
//! kept), `lm-done` at the end of the language model and `finetune-done` at the end of
//! fine-tuning. A folder is written under a temporary name and renamed into place, so an
//! interrupted save never leaves a half checkpoint behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::train::build::BuildOptions;
use crate::train::gpt2::{Gpt2, Gpt2Config};

const WEIGHTS: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const LM_DONE: &str = "lm-done";
const FINETUNE_DONE: &str = "finetune-done";
const LM_PREFIX: &str = "lm-";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint state {path} is not valid")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot save or load the tensors of {path}")]
    Tensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error(
        "checkpoint {path} was made with other settings ({differing}); resume with the same \
         options or use another --checkpoint-dir"
    )]
    Settings { path: PathBuf, differing: String },
    #[error("--resume needs --checkpoint-dir")]
    NoDirectory,
}

/// The phase a checkpoint ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// In the middle of the language model, after `step` steps.
    LanguageModel,
    LanguageModelDone,
    FineTuned,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub phase: Phase,
    /// Optimiser steps taken in the phase.
    pub step: usize,
    /// The options that decide the result; a resume with others is refused.
    pub settings: serde_json::Value,
    /// The phase's facts so far, as its trainer keeps them.
    pub facts: serde_json::Value,
}

/// A checkpoint on disk.
pub struct Saved {
    pub dir: PathBuf,
    pub state: State,
}

impl Saved {
    /// Overwrites `model`'s weights with the checkpoint's.
    pub fn restore_weights(&self, model: &Gpt2) -> Result<(), crate::train::gpt2::Gpt2Error> {
        model.restore_safetensors(&self.dir.join(WEIGHTS))
    }

    /// The saved AdamW moments.
    pub fn optimizer(&self) -> Result<HashMap<String, Tensor>, CheckpointError> {
        let path = self.dir.join(OPTIMIZER);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|source| CheckpointError::Tensors { path, source })
    }
}

/// The checkpoint directory of a build.
pub struct Store {
    dir: PathBuf,
    /// [`settings`] of this run, stamped on every checkpoint and compared on resume.
    settings: serde_json::Value,
}

/// The options and model sizes that decide a build's training result.
pub fn settings(options: &BuildOptions, config: &Gpt2Config) -> serde_json::Value {
    serde_json::json!({
        "data": options.data.canonicalize().unwrap_or_else(|_| options.data.clone()),
        "init_from": options.init_from.as_ref().map(|p| p.display().to_string()),
        "config": config,
        "max_tokens": options.max_tokens,
        "max_train": options.max_train,
        "max_eval": options.max_eval,
        "lm_steps": options.lm_steps,
        "lm_batch_tokens": options.lm_batch_tokens,
        "lr": options.lr,
        "finetune_steps": options.finetune_steps,
        "finetune_lr": options.finetune_lr,
        "seed": options.seed,
        "horizons_ms": [
            options.horizons.click_ms,
            options.horizons.churn_ms,
            options.horizons.price_ms,
        ],
    })
}

impl Store {
    /// The store of `options.checkpoint_dir`, created if missing; `None` without one.
    pub fn open(
        options: &BuildOptions,
        config: &Gpt2Config,
    ) -> Result<Option<Store>, CheckpointError> {
        let Some(dir) = &options.checkpoint_dir else {
            return if options.resume { Err(CheckpointError::NoDirectory) } else { Ok(None) };
        };
        std::fs::create_dir_all(dir)
            .map_err(|source| CheckpointError::Write { path: dir.clone(), source })?;
        Ok(Some(Store { dir: dir.clone(), settings: settings(options, config) }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn settings(&self) -> &serde_json::Value {
        &self.settings
    }

    /// Saves a checkpoint of `phase` after `step` steps; `optimizer` are the AdamW moments.
    pub fn save(
        &self,
        phase: Phase,
        step: usize,
        facts: serde_json::Value,
        model: &Gpt2,
        optimizer: Option<&HashMap<String, Tensor>>,
    ) -> Result<PathBuf, CheckpointError> {
        let name = folder_name(phase, step);
        let target = self.dir.join(&name);
        let staging = self.dir.join(format!(".{name}.partial"));
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Write { path, source }
        };
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(write_err(&staging))?;
        }
        std::fs::create_dir_all(&staging).map_err(write_err(&staging))?;

        let weights = staging.join(WEIGHTS);
        let tensors: HashMap<String, Tensor> = model.weights().into_iter().collect();
        save_tensors(&tensors, &weights)?;
        if let Some(moments) = optimizer {
            save_tensors(moments, &staging.join(OPTIMIZER))?;
        }
        let state = State { phase, step, settings: self.settings.clone(), facts };
        let text = serde_json::to_string_pretty(&state)
            .map_err(|source| CheckpointError::State { path: staging.join(STATE), source })?;
        std::fs::write(staging.join(STATE), text).map_err(write_err(&staging.join(STATE)))?;

        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(write_err(&target))?;
        }
        std::fs::rename(&staging, &target).map_err(write_err(&target))?;
        if phase == Phase::LanguageModel {
            self.prune_steps_before(step)?;
        }
        tracing::info!(checkpoint = %target.display(), step, "checkpoint saved");
        Ok(target)
    }

    /// Removes mid-language-model checkpoints older than `step`.
    fn prune_steps_before(&self, step: usize) -> Result<(), CheckpointError> {
        for (older, dir) in self.step_folders()? {
            if older < step {
                std::fs::remove_dir_all(&dir)
                    .map_err(|source| CheckpointError::Write { path: dir.clone(), source })?;
            }
        }
        Ok(())
    }

    /// `(step, folder)` of every mid-language-model checkpoint.
    fn step_folders(&self) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|source| CheckpointError::Read { path: self.dir.clone(), source })?;
        let mut found = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|source| CheckpointError::Read { path: self.dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(LM_PREFIX).and_then(|s| s.parse::<usize>().ok());
            if let Some(step) = step {
                found.push((step, entry.path()));
            }
        }
        Ok(found)
    }

    /// The newest language-model checkpoint: `lm-done`, else the mid-phase one with the most
    /// steps.
    pub fn newest_language_model(&self) -> Result<Option<Saved>, CheckpointError> {
        let done = self.dir.join(LM_DONE);
        if done.is_dir() {
            return self.read(done).map(Some);
        }
        let newest = self.step_folders()?.into_iter().max_by_key(|(step, _)| *step);
        newest.map(|(_, dir)| self.read(dir)).transpose()
    }

    /// The fine-tuning checkpoint, if fine-tuning finished.
    pub fn fine_tuned(&self) -> Result<Option<Saved>, CheckpointError> {
        let done = self.dir.join(FINETUNE_DONE);
        if done.is_dir() {
            return self.read(done).map(Some);
        }
        Ok(None)
    }

    /// Reads a checkpoint's state, refusing one made with other settings.
    fn read(&self, dir: PathBuf) -> Result<Saved, CheckpointError> {
        let path = dir.join(STATE);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| CheckpointError::Read { path: path.clone(), source })?;
        let state: State = serde_json::from_str(&text)
            .map_err(|source| CheckpointError::State { path: path.clone(), source })?;
        if state.settings != self.settings {
            let differing = differing_settings(&state.settings, &self.settings);
            return Err(CheckpointError::Settings { path, differing });
        }
        Ok(Saved { dir, state })
    }
}

/// `key: saved -> now` for every setting that differs, for the refusal of a resume.
fn differing_settings(saved: &serde_json::Value, now: &serde_json::Value) -> String {
    let null = serde_json::Value::Null;
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return format!("saved {saved}, now {now}");
    };
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed = keys.into_iter().filter_map(|key| {
        let (was, is) = (saved.get(key).unwrap_or(&null), now.get(key).unwrap_or(&null));
        (was != is).then(|| format!("{key}: {was} -> {is}"))
    });
    changed.collect::<Vec<_>>().join(", ")
}

fn folder_name(phase: Phase, step: usize) -> String {
    match phase {
        Phase::LanguageModel => format!("{LM_PREFIX}{step:08}"),
        Phase::LanguageModelDone => LM_DONE.into(),
        Phase::FineTuned => FINETUNE_DONE.into(),
    }
}

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), CheckpointError> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|source| CheckpointError::Tensors { path: path.into(), source })
}

/// Facts as JSON that survives NaN (written as `null`, read back as NaN).
pub fn f32_or_nan(value: &serde_json::Value) -> f32 {
    value.as_f64().map_or(f32::NAN, |v| v as f32)
}

#[cfg(test)]
mod tests;
