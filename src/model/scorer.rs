//! The model behind a small trait: token sequences in, one score per signal out.
//!
//! [`OrtScorer`] runs the ONNX graph through ONNX Runtime and follows the model contract:
//! inputs `input_ids` and `attention_mask` (int64, `[batch, seq]`, padding on the right), plus
//! `position_ids` when the graph asks for it (`cumsum(mask) - 1`, as Hugging Face exports
//! expect); output `scores` (`[batch, signals]`) when the heads are in the graph, else
//! `last_hidden_state` with the card's head weights applied by [`crate::model::heads`]. Either
//! way the card's Platt scaling, when it has one, turns the head outputs into the calibrated
//! probabilities that every caller sees.
//!
//! With `model.io_binding` the same graph runs through ONNX Runtime's IO binding: each batch's
//! inputs are bound, and only the output read here is bound, to host memory, so a device
//! provider copies nothing else back. The scores are the same as without it.

use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionOutputs};
use ort::value::Tensor;
use sha2::{Digest, Sha256};

use crate::config::{ExecutionProvider, ModelConfig};
use crate::model::card::{HeadWeights, ModelCard, Platt};
use crate::model::prefix::PrefixScorer;
use crate::model::{heads, runtime};

/// Turns token sequences into scores. One instance per worker thread (`Session::run` needs
/// exclusive access).
pub trait Scorer: Send {
    /// Number of scores per sequence.
    fn outputs(&self) -> usize;

    /// Scores each sequence; returns `[sequences.len(), outputs()]` row-major.
    fn score(&mut self, sequences: &[&[u32]]) -> Result<Vec<f32>, ModelError>;

    /// The scorer of leave-one-out variants from cached prefixes, when the model has a prefix
    /// graph and `model.prefix_reuse` is on.
    fn prefix(&mut self) -> Option<&mut PrefixScorer> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has SHA-256 {actual}, the model card says {expected}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("model graph: {0}")]
    Contract(String),
    #[error("execution provider {provider}: {message}")]
    Provider { provider: &'static str, message: String },
    #[error("inference failed")]
    Run(#[source] ort::Error),
    #[error("cannot bind the session's inputs or output (model.io_binding)")]
    Binding(#[source] ort::Error),
}

/// What the graph hands back.
enum Output {
    /// `scores [batch, signals]`, sigmoid applied in the graph.
    Scores,
    /// `last_hidden_state [batch, seq, n_embd]`; heads applied here.
    Hidden { heads: HeadWeights, n_embd: usize },
}

impl Output {
    /// The graph output read.
    fn name(&self) -> &'static str {
        match self {
            Output::Scores => "scores",
            Output::Hidden { .. } => "last_hidden_state",
        }
    }
}

pub struct OrtScorer {
    session: Session,
    /// With `model.io_binding`: the session's binding, whose inputs and output are bound
    /// again for each batch (their shapes change); dropped with the scorer.
    binding: Option<IoBinding>,
    needs_position_ids: bool,
    output: Output,
    signals: usize,
    /// One scaling per signal (column), or none for cards without calibration.
    calibration: Vec<Platt>,
    /// The execution provider actually in use.
    provider: &'static str,
    /// The prefix graph's session, when the card has one and `model.prefix_reuse` is on.
    prefix: Option<PrefixScorer>,
}

impl OrtScorer {
    /// Loads `card.onnx_file` from `dir`, checking its SHA-256 against the card.
    pub fn load(dir: &Path, card: &ModelCard, config: &ModelConfig) -> Result<Self, ModelError> {
        let path = dir.join(&card.onnx_file);
        verify_checksum(&path, &card.onnx_sha256)?;
        let (session, provider) = open_session(&path, config)?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return Err(ModelError::Contract(format!("no `{required}` input (has {names:?})")));
            }
        }
        if let Some(extra) =
            names.iter().find(|n| !matches!(**n, "input_ids" | "attention_mask" | "position_ids"))
        {
            return Err(ModelError::Contract(format!("unsupported input `{extra}`")));
        }
        let needs_position_ids = names.contains(&"position_ids");
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        let output = if outputs.contains(&"scores") {
            Output::Scores
        } else if outputs.contains(&"last_hidden_state") {
            let heads = card.heads.clone().ok_or_else(|| {
                ModelError::Contract("graph has no `scores` and the card no head weights".into())
            })?;
            Output::Hidden { heads, n_embd: card.backbone.n_embd }
        } else {
            return Err(ModelError::Contract(format!(
                "no `scores` or `last_hidden_state` output (has {outputs:?})"
            )));
        };
        let binding = if config.io_binding {
            Some(session.create_binding().map_err(ModelError::Binding)?)
        } else {
            None
        };
        let prefix = match config.prefix_reuse {
            true => PrefixScorer::load(dir, card, config)?,
            false => None,
        };
        Ok(OrtScorer {
            session,
            binding,
            needs_position_ids,
            output,
            signals: card.signals.len(),
            calibration: card.calibration.clone(),
            provider,
            prefix,
        })
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }
}

pub(crate) fn verify_checksum(path: &Path, expected: &str) -> Result<(), ModelError> {
    let bytes =
        std::fs::read(path).map_err(|source| ModelError::Read { path: path.into(), source })?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != expected {
        return Err(ModelError::Checksum { path: path.into(), expected: expected.into(), actual });
    }
    Ok(())
}

/// A session over the graph at `path` on the execution provider `config` names (falling back
/// to the CPU where it allows); returns the provider in use. The scorer's sessions and the
/// inference bench's bare session come from here.
pub fn open_session(
    path: &Path,
    config: &ModelConfig,
) -> Result<(Session, &'static str), ModelError> {
    let library = runtime::locate_library(config.ort_library.as_deref())?;
    let env = runtime::environment(&library)?;
    build_session(env, path, config)
}

fn build_session(
    env: &ort::environment::Environment,
    path: &Path,
    config: &ModelConfig,
) -> Result<(Session, &'static str), ModelError> {
    match config.execution_provider {
        ExecutionProvider::Cpu => {
            Ok((runtime::cpu_session(env, path, config.intra_threads)?, "cpu"))
        }
        ExecutionProvider::Cuda => match cuda_session(env, path, config) {
            Ok(session) => Ok((session, "cuda")),
            Err(err) if config.allow_cpu_fallback => {
                tracing::warn!(cause = %err, "cuda unavailable, running on the cpu as configured");
                Ok((runtime::cpu_session(env, path, config.intra_threads)?, "cpu"))
            }
            Err(err) => Err(err),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda_session(
    env: &ort::environment::Environment,
    path: &Path,
    config: &ModelConfig,
) -> Result<Session, ModelError> {
    let provider =
        |e: ort::Error| ModelError::Provider { provider: "cuda", message: e.to_string() };
    let cuda = ort::ep::CUDA::default().build().error_on_failure();
    Session::builder(env)
        .map_err(provider)?
        .with_intra_threads(config.intra_threads)
        .map_err(|e| provider(e.into()))?
        .with_execution_providers([cuda])
        .map_err(|e| provider(e.into()))?
        .commit_from_file(path)
        .map_err(provider)
}

#[cfg(not(feature = "cuda"))]
fn cuda_session(
    _env: &ort::environment::Environment,
    _path: &Path,
    _config: &ModelConfig,
) -> Result<Session, ModelError> {
    Err(ModelError::Provider {
        provider: "cuda",
        message: "this build has no CUDA support (build with --features cuda)".into(),
    })
}

/// Right-padded `input_ids`, `attention_mask` and `position_ids` for a batch.
pub fn pad_batch(sequences: &[&[u32]]) -> (usize, Vec<i64>, Vec<i64>, Vec<i64>) {
    let seq = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; sequences.len() * seq];
    let mut mask = vec![0i64; sequences.len() * seq];
    let mut positions = vec![0i64; sequences.len() * seq];
    for (row, tokens) in sequences.iter().enumerate() {
        for (t, &token) in tokens.iter().enumerate() {
            ids[row * seq + t] = i64::from(token);
            mask[row * seq + t] = 1;
            positions[row * seq + t] = t as i64;
        }
    }
    (seq, ids, mask, positions)
}

impl Scorer for OrtScorer {
    fn outputs(&self) -> usize {
        self.signals
    }

    fn prefix(&mut self) -> Option<&mut PrefixScorer> {
        self.prefix.as_mut()
    }

    fn score(&mut self, sequences: &[&[u32]]) -> Result<Vec<f32>, ModelError> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let batch = sequences.len();
        let (seq, ids, mask, positions) = pad_batch(sequences);
        let shape = vec![batch as i64, seq as i64];
        let tensor =
            |data: Vec<i64>| Tensor::from_array((shape.clone(), data)).map_err(ModelError::Run);
        let mut inputs =
            vec![("input_ids", tensor(ids)?), ("attention_mask", tensor(mask.clone())?)];
        if self.needs_position_ids {
            inputs.push(("position_ids", tensor(positions)?));
        }
        let outputs = match self.binding.as_mut() {
            None => self.session.run(inputs).map_err(ModelError::Run)?,
            Some(binding) => run_bound(&mut self.session, binding, &inputs, self.output.name())?,
        };
        let mut scores = match &self.output {
            Output::Scores => {
                let (_, scores) =
                    outputs["scores"].try_extract_tensor::<f32>().map_err(ModelError::Run)?;
                if scores.len() != batch * self.signals {
                    return Err(ModelError::Contract(format!(
                        "`scores` has {} values, expected {batch} x {}",
                        scores.len(),
                        self.signals
                    )));
                }
                scores.to_vec()
            }
            Output::Hidden { heads: weights, n_embd } => {
                let (_, hidden) = outputs["last_hidden_state"]
                    .try_extract_tensor::<f32>()
                    .map_err(ModelError::Run)?;
                if hidden.len() != batch * seq * n_embd {
                    return Err(ModelError::Contract(format!(
                        "`last_hidden_state` has {} values, expected {batch} x {seq} x {n_embd}",
                        hidden.len()
                    )));
                }
                let pooled = heads::pool(hidden, batch, seq, *n_embd, &mask);
                heads::apply(weights, &pooled, batch)
            }
        };
        calibrate(&self.calibration, &mut scores);
        Ok(scores)
    }
}

/// Binds this batch's inputs and the one output read, to host memory, and runs the graph.
///
/// The output is bound again for every batch: a bound output keeps the shape of its first
/// run, and the batch and sequence sizes change from one call to the next.
fn run_bound<'s>(
    session: &'s mut Session,
    binding: &'s mut IoBinding,
    inputs: &[(&str, Tensor<i64>)],
    output: &str,
) -> Result<SessionOutputs<'s>, ModelError> {
    for (name, value) in inputs {
        binding.bind_input(*name, value).map_err(ModelError::Binding)?;
    }
    let host =
        MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput)
            .map_err(ModelError::Binding)?;
    binding.bind_output_to_device(output, &host).map_err(ModelError::Binding)?;
    session.run_binding(binding).map_err(ModelError::Run)
}

/// Applies one scaling per column to `scores` (`[rows, calibration.len()]`); nothing when
/// there is no calibration.
pub(crate) fn calibrate(calibration: &[Platt], scores: &mut [f32]) {
    if calibration.is_empty() {
        return;
    }
    for row in scores.chunks_exact_mut(calibration.len()) {
        for (score, platt) in row.iter_mut().zip(calibration) {
            *score = platt.apply(*score);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::card::{Backbone, HeadWeights};
    use crate::train::export::{export_onnx, ExportMeta};
    use crate::train::gpt2::{Gpt2, Gpt2Config, Heads};

    fn card(onnx: &Path, heads: Option<HeadWeights>) -> ModelCard {
        let bytes = std::fs::read(onnx).unwrap();
        let mut signals = crate::train::catalog::head_signals();
        signals.truncate(2);
        ModelCard {
            card_version: crate::model::card::CARD_VERSION,
            model_version: "test".into(),
            description: String::new(),
            onnx_file: onnx.file_name().unwrap().to_string_lossy().into(),
            onnx_sha256: hex::encode(Sha256::digest(&bytes)),
            precision: crate::model::card::Precision::Fp32,
            tokenizer_file: String::new(),
            render_version: crate::render::RENDER_VERSION,
            max_tokens: 32,
            window: crate::window::WindowSpec::default(),
            user_ttl_ms: 86_400_000,
            signals,
            derived: Vec::new(),
            heads,
            prefix_graph: None,
            calibration: Vec::new(),
            backbone: Backbone {
                architecture: "gpt2".into(),
                vocab_size: 100,
                n_positions: 32,
                n_embd: 16,
                n_layer: 1,
                n_head: 2,
                parameters: 0,
            },
            training: None,
            evaluation: Vec::new(),
        }
    }

    /// Writes `inside.onnx` (two heads in the graph) and `outside.onnx` (backbone only) to
    /// `dir`; returns the heads.
    fn export_graphs(dir: &Path) -> Heads {
        let config = Gpt2Config {
            vocab_size: 100,
            n_positions: 32,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        };
        let model = Gpt2::new_random(config, &candle_core::Device::Cpu, 3).unwrap();
        let heads = Heads::new_random(2, 32, 4).unwrap();
        let (inside, outside) = (dir.join("inside.onnx"), dir.join("outside.onnx"));
        let meta =
            ExportMeta { model_version: "test".into(), signals: vec!["a".into(), "b".into()] };
        export_onnx(&model, Some(&heads), &inside, &meta).unwrap();
        let bare = ExportMeta { model_version: "test".into(), signals: Vec::new() };
        export_onnx(&model, None, &outside, &bare).unwrap();
        heads
    }

    const ROWS: [&[u32]; 3] = [&[1, 2, 3], &[7], &[5, 9, 11, 13, 2, 4]];

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// A graph with only `last_hidden_state` plus head weights in the card scores the same
    /// as the graph with the heads inside; a file that does not match the card is refused.
    #[test]
    fn hidden_state_graphs_score_with_card_heads() {
        let dir = tempfile::tempdir().unwrap();
        let heads = export_graphs(dir.path());
        let (inside, outside) = (dir.path().join("inside.onnx"), dir.path().join("outside.onnx"));
        let config = ModelConfig::default();
        let mut with_heads = OrtScorer::load(dir.path(), &card(&inside, None), &config).unwrap();
        let weights = HeadWeights::from(&heads);
        let card_heads = card(&outside, Some(weights));
        let mut from_card = OrtScorer::load(dir.path(), &card_heads, &config).unwrap();
        let a = with_heads.score(&ROWS).unwrap();
        let b = from_card.score(&ROWS).unwrap();
        assert_eq!(a.len(), 6);
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "graph heads and card heads differ by {diff}");

        let mut wrong = card(&inside, None);
        wrong.onnx_sha256 = "0".repeat(64);
        let err = OrtScorer::load(dir.path(), &wrong, &config).err().unwrap();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err}");
        let no_heads = card(&outside, None);
        let err = OrtScorer::load(dir.path(), &no_heads, &config).err().unwrap();
        assert!(err.to_string().contains("no head weights"), "{err}");
    }
    /// Both score paths serve the card's Platt scaling of the raw head outputs, so the two
    /// still agree; a calibration that does not match the signals is refused at load.
    #[test]
    fn card_calibration_applies_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let heads = export_graphs(dir.path());
        let (inside, outside) = (dir.path().join("inside.onnx"), dir.path().join("outside.onnx"));
        let config = ModelConfig::default();
        let raw = OrtScorer::load(dir.path(), &card(&inside, None), &config)
            .unwrap()
            .score(&ROWS)
            .unwrap();

        let mut calibrated = card(&inside, None);
        calibrated.calibration = calibrated
            .signals
            .iter()
            .zip([(0.5, -1.0), (2.0, 0.7)])
            .map(|(s, (a, b))| Platt { signal: s.name.clone(), a, b })
            .collect();
        let mut from_card = card(&outside, Some(HeadWeights::from(&heads)));
        from_card.calibration = calibrated.calibration.clone();
        let a = OrtScorer::load(dir.path(), &calibrated, &config).unwrap().score(&ROWS).unwrap();
        let b = OrtScorer::load(dir.path(), &from_card, &config).unwrap().score(&ROWS).unwrap();
        let want: Vec<f32> =
            raw.iter().enumerate().map(|(k, &p)| calibrated.calibration[k % 2].apply(p)).collect();
        assert!(max_diff(&a, &want) < 1e-6, "graph path: {a:?}, want {want:?}");
        assert!(max_diff(&b, &want) < 1e-5, "card-heads path: {b:?}, want {want:?}");
        assert!(max_diff(&a, &raw) > 0.01, "the calibration changed nothing: {a:?}");

        let path = dir.path().join("model.json");
        calibrated.calibration.pop();
        calibrated.save(&path).unwrap();
        let err = ModelCard::load(&path).err().unwrap();
        assert!(err.to_string().contains("calibration covers"), "{err}");
    }

    /// With `model.io_binding` both kinds of graph give exactly the scores of the plain run,
    /// over batches whose shapes change from call to call (the output is bound again each
    /// time), on the CPU provider where both run the same kernels.
    #[test]
    fn io_binding_scores_equal_plain_scores() {
        let dir = tempfile::tempdir().unwrap();
        let heads = export_graphs(dir.path());
        let (inside, outside) = (dir.path().join("inside.onnx"), dir.path().join("outside.onnx"));
        let plain = ModelConfig::default();
        let bound = ModelConfig { io_binding: true, ..ModelConfig::default() };
        let batches: [&[&[u32]]; 3] = [&ROWS, &[&[4, 4, 4, 4, 4, 4, 4, 4, 4]], &ROWS[..2]];
        for card in [card(&inside, None), card(&outside, Some(HeadWeights::from(&heads)))] {
            let mut a = OrtScorer::load(dir.path(), &card, &plain).unwrap();
            let mut b = OrtScorer::load(dir.path(), &card, &bound).unwrap();
            assert!(b.binding.is_some() && a.binding.is_none());
            for batch in batches {
                let (a, b) = (a.score(batch).unwrap(), b.score(batch).unwrap());
                assert_eq!(a.len(), batch.len() * 2);
                assert_eq!(a, b, "io binding changed the scores of {} rows", batch.len());
            }
        }
    }

    /// A card written before calibration existed has no `calibration` key; it loads, and its
    /// scores are the raw head outputs.
    #[test]
    fn cards_without_calibration_load_and_score_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        export_graphs(dir.path());
        let inside = dir.path().join("inside.onnx");
        let path = dir.path().join("model.json");
        card(&inside, None).save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("calibration"), "an empty calibration was written: {text}");

        let loaded = ModelCard::load(&path).unwrap();
        assert!(loaded.calibration.is_empty());
        let config = ModelConfig::default();
        let scores = OrtScorer::load(dir.path(), &loaded, &config).unwrap().score(&ROWS).unwrap();
        let mut session = runtime::cpu_session(
            runtime::environment(&runtime::locate_library(None).unwrap()).unwrap(),
            &inside,
            1,
        )
        .unwrap();
        let (seq, ids, mask, _) = pad_batch(&ROWS);
        let shape = vec![ROWS.len() as i64, seq as i64];
        let outputs = session
            .run(ort::inputs![
                "input_ids" => Tensor::from_array((shape.clone(), ids)).unwrap(),
                "attention_mask" => Tensor::from_array((shape, mask)).unwrap(),
            ])
            .unwrap();
        let (_, graph) = outputs["scores"].try_extract_tensor::<f32>().unwrap();
        assert_eq!(scores, graph.to_vec(), "the scorer changed the graph's scores");
    }
}
