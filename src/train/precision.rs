//! Model folders at another precision: `mindstream-train fp16` and `build --fp16`.
//!
//! It receives a finished float32 model folder (card, ONNX graph, tokenizer), such as the
//! shipped `models/` whose training checkpoint is not shipped, and hands on a second folder
//! whose graph is [`to_fp16`]'s float16 rewrite of the first, whose card says
//! `precision = "fp16"` and carries the new file's SHA-256, and whose tokenizer is a copy.
//!
//! The card's `model_version` gains a `-fp16` suffix, in the card and in the graph's metadata:
//! float16 scores differ from float32 ones in the third or fourth decimal, so a consumer can
//! tell which variant produced a record. Calibration, evaluation figures and training facts
//! are the float32 model's, and the description says so.

use std::path::{Path, PathBuf};

use onnx_protobuf::{Message, ModelProto};
use sha2::{Digest, Sha256};

use crate::model::card::{CardError, ModelCard, Precision};
use crate::model::CARD_FILE;
use crate::train::export::{to_fp16, Fp16Error, Fp16Summary, META_MODEL_VERSION};

/// Suffix of the float16 variant's `model_version`.
pub const FP16_VERSION_SUFFIX: &str = "-fp16";

/// Tokenizer files a model folder may hold, besides the one the card names.
const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "vocab.json", "merges.txt"];

#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("{path} is already a float16 model")]
    AlreadyHalf { path: PathBuf },
    #[error("{path} has SHA-256 {actual}, its card says {expected}")]
    Checksum { path: PathBuf, expected: String, actual: String },
    #[error("the output folder {0} is the input folder")]
    SameFolder(PathBuf),
    #[error("{path} is not an ONNX model")]
    Parse {
        path: PathBuf,
        #[source]
        source: protobuf::Error,
    },
    #[error("cannot convert {path} to float16")]
    Convert {
        path: PathBuf,
        #[source]
        source: Fp16Error,
    },
    #[error("cannot serialise the float16 graph")]
    Serialise(#[source] protobuf::Error),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`fp16_folder`] wrote.
#[derive(Debug)]
pub struct Fp16Folder {
    pub card: ModelCard,
    pub summary: Fp16Summary,
    /// Sizes of the float32 and the float16 graph files, in bytes.
    pub bytes: (usize, usize),
}

/// Writes the float16 variant of the model folder `from` to `to` (created if needed).
pub fn fp16_folder(from: &Path, to: &Path) -> Result<Fp16Folder, PrecisionError> {
    let mut card = ModelCard::load(&from.join(CARD_FILE))?;
    if card.precision == Precision::Fp16 {
        return Err(PrecisionError::AlreadyHalf { path: from.into() });
    }
    if same_folder(from, to) {
        return Err(PrecisionError::SameFolder(to.into()));
    }
    let source = from.join(&card.onnx_file);
    let bytes = read(&source)?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if actual != card.onnx_sha256 {
        let expected = card.onnx_sha256.clone();
        return Err(PrecisionError::Checksum { path: source, expected, actual });
    }

    let mut model = ModelProto::parse_from_bytes(&bytes)
        .map_err(|source| PrecisionError::Parse { path: from.join(&card.onnx_file), source })?;
    let summary = to_fp16(&mut model)
        .map_err(|source| PrecisionError::Convert { path: from.join(&card.onnx_file), source })?;
    let fp32_version = card.model_version.clone();
    card.model_version = format!("{fp32_version}{FP16_VERSION_SUFFIX}");
    for prop in model.metadata_props.iter_mut().filter(|p| p.key == META_MODEL_VERSION) {
        prop.value = card.model_version.clone();
    }
    let half = model.write_to_bytes().map_err(PrecisionError::Serialise)?;

    std::fs::create_dir_all(to)
        .map_err(|source| PrecisionError::Write { path: to.into(), source })?;
    write(&to.join(&card.onnx_file), &half)?;
    copy_tokenizer(from, to, &card)?;
    card.onnx_sha256 = hex::encode(Sha256::digest(&half));
    card.precision = Precision::Fp16;
    // The prefix graph stays float32; the variant scores every sequence whole.
    card.prefix_graph = None;
    card.description = format!(
        "{} Float16 variant of {fp32_version} (`mindstream-train fp16`): weights and arithmetic \
         in float16 for the cuda execution provider, inputs and outputs as in the model \
         contract; calibration and evaluation figures are those of the float32 model.",
        card.description.trim_end()
    );
    let card_path = to.join(CARD_FILE);
    card.save(&card_path).map_err(|source| PrecisionError::Write { path: card_path, source })?;
    Ok(Fp16Folder { card, summary, bytes: (bytes.len(), half.len()) })
}

/// Copies the tokenizer the card names and the usual tokenizer files that exist.
fn copy_tokenizer(from: &Path, to: &Path, card: &ModelCard) -> Result<(), PrecisionError> {
    let named = (!card.tokenizer_file.is_empty()).then_some(card.tokenizer_file.as_str());
    for name in named.into_iter().chain(TOKENIZER_FILES) {
        let source = from.join(name);
        if source.is_file() {
            let target = to.join(name);
            std::fs::copy(&source, &target)
                .map_err(|source| PrecisionError::Write { path: target, source })?;
        }
    }
    Ok(())
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PrecisionError> {
    std::fs::read(path).map_err(|source| PrecisionError::Read { path: path.into(), source })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PrecisionError> {
    std::fs::write(path, bytes)
        .map_err(|source| PrecisionError::Write { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::ModelConfig;
    use crate::event::Event;
    use crate::import::{self, Source};
    use crate::model::scorer::{OrtScorer, Scorer};
    use crate::window::{Lineage, UserState, WindowEvent};

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// The shipped model converts; its variant's card names the new file, says `fp16`, and
    /// its tokenizer is a copy. A second conversion, or one over itself, is refused.
    #[test]
    fn shipped_model_converts_to_an_fp16_folder() {
        let out = tempfile::tempdir().unwrap();
        let shipped = root().join("models");
        let written = fp16_folder(&shipped, out.path()).unwrap();
        let fp32 = ModelCard::load(&shipped.join(CARD_FILE)).unwrap();
        let card = ModelCard::load(&out.path().join(CARD_FILE)).unwrap();
        assert_eq!(card.precision, Precision::Fp16);
        assert_eq!(card.model_version, format!("{}{FP16_VERSION_SUFFIX}", fp32.model_version));
        let onnx = std::fs::read(out.path().join(&card.onnx_file)).unwrap();
        assert_eq!(card.onnx_sha256, hex::encode(Sha256::digest(&onnx)));
        let tokenizer = |dir: &Path| std::fs::read(dir.join(&fp32.tokenizer_file)).unwrap();
        assert!(tokenizer(&shipped) == tokenizer(out.path()), "the tokenizer is not a copy");
        let (before, after) = written.bytes;
        assert!(after * 100 < before * 55, "{before} -> {after} bytes: weights not halved");
        assert_eq!(written.summary.saturated, 1, "{:?}", written.summary);

        let again = tempfile::tempdir().unwrap();
        let err = fp16_folder(out.path(), again.path()).unwrap_err();
        assert!(matches!(err, PrecisionError::AlreadyHalf { .. }), "{err}");
        let err = fp16_folder(&shipped, &shipped).unwrap_err();
        assert!(matches!(err, PrecisionError::SameFolder(_)), "{err}");
    }

    /// Token sequences of real windows, up to `users` of them: the Taobao slice where the
    /// shared data folder has it, else the CDNOW purchases of `scripts/sample-data.sh`.
    fn real_sequences(dir: &Path, card: &ModelCard, users: usize) -> Vec<Vec<u32>> {
        let taobao = "clickstream/taobao-userbehavior-slice.csv";
        let cdnow = ".tools/data/purchases/cdnow-master.txt";
        let (source, path) = [".tools/data", "../shared/data"]
            .iter()
            .map(|d| root().join(d).join(taobao))
            .find(|p| p.is_file())
            .map(|p| (Source::Taobao, p))
            .unwrap_or((Source::Cdnow, root().join(cdnow)));
        assert!(path.is_file(), "no sample data at {}: run scripts/sample-data.sh", path.display());
        let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for event in import::events(source, &path).unwrap() {
            by_user.entry(event.user_id.to_string()).or_default().push(event);
        }
        let spec = crate::train::build::state_spec();
        let tokenizer = crate::model::load_tokenizer(dir, card).unwrap();
        let lineage = Lineage { topic: "t".into(), partition: 0, offset: 0 };
        let windows = by_user.into_values().filter(|e| e.len() >= 3).take(users);
        windows
            .map(|events| {
                let mut stored = events
                    .iter()
                    .filter_map(|e| WindowEvent::from_event(e, lineage.clone(), &spec.window));
                let mut state = UserState::new(stored.next().unwrap(), &spec);
                stored.for_each(|e| state.apply(e, &spec));
                let segments = crate::render::render(&state);
                tokenizer.encode_window(&segments, card.max_tokens).unwrap().ids
            })
            .collect()
    }

    /// Largest difference between a served float16 and float32 score accepted: below the
    /// smallest expected calibration error the shipped card reports (0.0021, purchase intent on
    /// Taobao), so the variant moves no score by more than the model's own calibration error.
    /// Measured on the CPU: 9.8e-4 on 1,500 Taobao windows, 6.5e-4 on 1,500 CDNOW windows.
    const FP16_TOLERANCE: f32 = 2e-3;

    /// On real windows, the float16 variant serves the float32 model's scores to within
    /// [`FP16_TOLERANCE`] on the CPU provider. ONNX Runtime 1.31's CPU provider on x86 has
    /// no float16 kernels for this graph's arithmetic (Add, Mul, Sub, Div, MatMul, Gemm, Tanh,
    /// Sigmoid, ReduceSum, Where, the softmax): at load it inserts casts around them and
    /// computes them in float32. So this checks the rounded weights and the graph's float16
    /// plumbing; float16 arithmetic runs only on the GPU, where the inference bench prints the
    /// same difference.
    #[test]
    fn fp16_scores_match_fp32_on_real_windows() {
        let out = tempfile::tempdir().unwrap();
        let shipped = root().join("models");
        fp16_folder(&shipped, out.path()).unwrap();
        let fp32 = ModelCard::load(&shipped.join(CARD_FILE)).unwrap();
        let fp16 = ModelCard::load(&out.path().join(CARD_FILE)).unwrap();
        let config = ModelConfig::default();
        let mut a = OrtScorer::load(&shipped, &fp32, &config).unwrap();
        let mut b = OrtScorer::load(out.path(), &fp16, &config).unwrap();

        let mut sequences = real_sequences(&shipped, &fp32, 400);
        sequences.sort_by_key(Vec::len);
        let (mut largest, mut total, mut count) = (0.0f32, 0.0f64, 0usize);
        for batch in sequences.chunks(32) {
            let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
            let (x, y) = (a.score(&refs).unwrap(), b.score(&refs).unwrap());
            for (x, y) in x.iter().zip(&y) {
                assert!(y.is_finite(), "a float16 score is {y}");
                largest = largest.max((x - y).abs());
                total += f64::from((x - y).abs());
                count += 1;
            }
        }
        println!(
            "{} windows: largest score difference {largest:.2e}, mean {:.2e}",
            sequences.len(),
            total / count as f64
        );
        assert!(largest <= FP16_TOLERANCE, "float16 scores differ by up to {largest}");
    }
}
