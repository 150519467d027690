//! `mindstream-train`: turns public e-commerce history into the model `mindstream` runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mindstream::cli::{self, EXIT_FAILURE};
use mindstream::event::{self, Format};
use mindstream::import::{self, Source};
use mindstream::model::card::{Evaluation, Figures};
use mindstream::train::build::{self, BuildOptions};
use mindstream::train::catalog::Horizons;
use mindstream::train::evaluate;
use mindstream::train::frozen;
use mindstream::train::precision;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mindstream-train", version, about = "Train the model mindstream runs")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a public data set into mindstream events (JSON lines, in time order).
    Import {
        #[arg(long, value_enum)]
        source: Source,
        /// The data set's file (or folder, for reviews-zh).
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Keep only the first N events (after sorting by time).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Train tokenizer, GPT-2 and signal heads; export the model folder with its card.
    Build {
        /// Folder of the public data sets (the layout of ../shared/data).
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// Folder of the evaluation report (Markdown and plots).
        #[arg(long, default_value = "docs/evaluation")]
        report: PathBuf,
        /// Optimiser steps of the language model.
        #[arg(long, default_value_t = BuildOptions::default().lm_steps)]
        lm_steps: usize,
        #[arg(long, default_value_t = BuildOptions::default().seed)]
        seed: u64,
        /// Most training examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_train)]
        max_train: usize,
        /// Most validation and test examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_eval)]
        max_eval: usize,
        /// Fine-tuning steps on the signal labels (0: heads on the language model only).
        #[arg(long, default_value_t = BuildOptions::default().finetune_steps)]
        finetune_steps: usize,
        /// Label horizon of purchase intent and cart abandonment (e.g. `20m`).
        #[arg(long, default_value = "20m", value_parser = parse_horizon)]
        click_horizon: i64,
        /// Label horizon of churn risk (e.g. `90d`).
        #[arg(long, default_value = "90d", value_parser = parse_horizon)]
        churn_horizon: i64,
        /// Label horizon of price sensitivity (e.g. `180d`).
        #[arg(long, default_value = "180d", value_parser = parse_horizon)]
        price_horizon: i64,
        /// Start from a Hugging Face GPT-2 folder (config.json, model.safetensors, and
        /// tokenizer.json or vocab.json + merges.txt) instead of training a tokenizer and
        /// starting from random weights.
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// Save training checkpoints in this folder.
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// Language-model steps between checkpoints.
        #[arg(long, default_value_t = BuildOptions::default().checkpoint_every as u64,
            value_parser = clap::value_parser!(u64).range(1..))]
        checkpoint_every: u64,
        /// Continue from the newest checkpoint in --checkpoint-dir.
        #[arg(long, requires = "checkpoint_dir")]
        resume: bool,
        /// Also write the float16 variant of the built model to this folder (as `fp16` does;
        /// the build itself, its calibration and its evaluation stay in float32).
        #[arg(long, value_name = "DIR")]
        fp16: Option<PathBuf>,
    },
    /// Write the float16 variant of a model folder: weights and arithmetic in float16 for the
    /// cuda execution provider, int64 inputs and float32 `scores` as in the model contract; a
    /// card with the new SHA-256 and `precision = "fp16"`, and a copy of the tokenizer.
    Fp16 {
        /// The float32 model folder (model.json, model.onnx, tokenizer).
        #[arg(long, default_value = "models")]
        model: PathBuf,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the prefix graph of a float32 model folder (model.prefix.onnx): the same weights,
    /// continuing from cached keys and values, so the processor scores each leave-one-out
    /// variant from its window's prefix. The card gains the file and the head weights.
    Prefix {
        /// The model folder (model.json, model.onnx).
        #[arg(long, default_value = "models")]
        model: PathBuf,
    },
    /// Fit signal heads on a frozen ONNX GPT-2 (any graph with a `last_hidden_state` output)
    /// and write a model folder whose card carries the heads.
    Heads {
        /// The backbone graph; a config.json next to it, if any, gives the card its sizes.
        #[arg(long)]
        backbone: PathBuf,
        /// tokenizer.json, or a folder with it or with vocab.json + merges.txt.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Folder of the public data sets (the layout of ../shared/data).
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Most training examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_train)]
        max_train: usize,
        /// Most validation and test examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_eval)]
        max_eval: usize,
        /// Longest token sequence (capped at the backbone's n_positions when known).
        #[arg(long, default_value_t = BuildOptions::default().max_tokens)]
        max_tokens: usize,
        #[arg(long, default_value_t = BuildOptions::default().seed)]
        seed: u64,
    },
    /// Score a model folder on the test splits of the public data sets (the examples `build`
    /// makes with the same caps and seed) against baselines, and write the evaluation report.
    Evaluate {
        /// The model folder (model.json, model.onnx, tokenizer).
        #[arg(long, default_value = "models")]
        model: PathBuf,
        /// Folder of the public data sets (the layout of ../shared/data).
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        /// Folder of the report (Markdown and plots).
        #[arg(long, default_value = "docs/evaluation")]
        report: PathBuf,
        /// Most training examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_train)]
        max_train: usize,
        /// Most validation and test examples per data set.
        #[arg(long, default_value_t = BuildOptions::default().max_eval)]
        max_eval: usize,
        #[arg(long, default_value_t = BuildOptions::default().seed)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = mindstream::config::Config::load(None, std::env::vars())
        .unwrap_or_else(|_| toml::from_str("").expect("an empty config is valid"));
    cli::init_logging(&config);
    match args.command {
        Command::Import { source, input, output, limit } => {
            run_import(source, &input, &output, limit)
        }
        Command::Build {
            data,
            out,
            report,
            lm_steps,
            seed,
            max_train,
            max_eval,
            finetune_steps,
            click_horizon,
            churn_horizon,
            price_horizon,
            init_from,
            checkpoint_dir,
            checkpoint_every,
            resume,
            fp16,
        } => {
            let options = BuildOptions {
                data,
                out,
                report,
                lm_steps,
                seed,
                max_train,
                max_eval,
                finetune_steps,
                horizons: Horizons {
                    click_ms: click_horizon,
                    churn_ms: churn_horizon,
                    price_ms: price_horizon,
                },
                init_from,
                checkpoint_dir,
                checkpoint_every: checkpoint_every as usize,
                resume,
                ..Default::default()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            match build::build(&options, &command) {
                Ok(card) => {
                    print_evaluation(&card.evaluation);
                    println!("model {} written to {}", card.model_version, options.out.display());
                    println!("evaluation report written to {}", options.report.display());
                    match fp16 {
                        Some(half) => run_fp16(&options.out, &half),
                        None => ExitCode::SUCCESS,
                    }
                }
                Err(err) => cli::report(&err, EXIT_FAILURE),
            }
        }
        Command::Fp16 { model, out } => run_fp16(&model, &out),
        Command::Prefix { model } => match mindstream::train::prefix::prefix_folder(&model) {
            Ok(card) => {
                let graph = card.prefix_graph.as_ref().map(|g| g.onnx_file.as_str());
                println!(
                    "prefix graph {} written to {} for {}",
                    graph.unwrap_or_default(),
                    model.display(),
                    card.model_version
                );
                ExitCode::SUCCESS
            }
            Err(err) => cli::report(&err, EXIT_FAILURE),
        },
        Command::Heads {
            backbone,
            tokenizer,
            data,
            out,
            max_train,
            max_eval,
            max_tokens,
            seed,
        } => run_heads(frozen::HeadsOptions {
            backbone,
            tokenizer,
            build: BuildOptions {
                data,
                out,
                max_train,
                max_eval,
                max_tokens,
                seed,
                ..Default::default()
            },
        }),
        Command::Evaluate { model, data, report, max_train, max_eval, seed } => {
            let options = BuildOptions { data, max_train, max_eval, seed, ..Default::default() };
            run_evaluate(&model, &options, &report)
        }
    }
}

/// `mindstream-train evaluate`: writes the report and prints the figures.
fn run_evaluate(model: &Path, options: &BuildOptions, report: &Path) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let to = evaluate::Destination { dir: report, command: &command };
    match evaluate::evaluate_folder(model, options, to) {
        Ok(outcome) => {
            print_evaluation(&outcome.evaluations());
            println!("evaluation report written to {}", report.display());
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}

/// `mindstream-train fp16`: writes the variant and says what changed.
fn run_fp16(model: &Path, out: &Path) -> ExitCode {
    match precision::fp16_folder(model, out) {
        Ok(written) => {
            let s = written.summary;
            println!(
                "float16: {} initializers ({} values, {} saturated to ±{}), {} constants, \
                 {} casts, {} outputs cast back to float32; {} -> {} bytes",
                s.initializers,
                s.values,
                s.saturated,
                mindstream::train::export::SATURATED,
                s.constants,
                s.casts,
                s.outputs,
                written.bytes.0,
                written.bytes.1
            );
            println!("model {} written to {}", written.card.model_version, out.display());
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}

/// One line per signal and data set: AUC and calibrated ECE of the model and the baseline.
fn print_evaluation(rows: &[Evaluation]) {
    for row in rows {
        let ece = |f: Option<&Figures>| f.map_or(f64::NAN, |f| f.ece);
        let baseline = row.baselines.first().map(|b| &b.figures);
        println!(
            "{:<18} {:<11} test n={:<6} AUC {:.4} ECE {:.4}  baseline AUC {:.4} ECE {:.4} ({})",
            row.signal,
            row.dataset,
            row.examples,
            row.auc,
            ece(row.model.as_ref()),
            row.baseline_auc,
            ece(baseline),
            row.baseline
        );
    }
}

/// A label horizon such as `20m` or `90d`, in milliseconds; it must be positive.
fn parse_horizon(text: &str) -> Result<i64, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    match i64::try_from(duration.as_millis()) {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("`{text}` is not a positive duration")),
    }
}

/// `mindstream-train heads`: prints the evaluation like `build` does.
fn run_heads(options: frozen::HeadsOptions) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    match frozen::heads(&options, &command) {
        Ok(card) => {
            for row in &card.evaluation {
                println!(
                    "{:<18} {:<11} test n={:<6} AUC {:.4}  baseline {:.4} ({})",
                    row.signal, row.dataset, row.examples, row.auc, row.baseline_auc, row.baseline
                );
            }
            println!("model {} written to {}", card.model_version, options.build.out.display());
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}

fn run_import(source: Source, input: &Path, output: &Path, limit: Option<usize>) -> ExitCode {
    let mut events = match import::events(source, input) {
        Ok(events) => events,
        Err(err) => return cli::report(&err, EXIT_FAILURE),
    };
    if let Some(limit) = limit {
        events.truncate(limit);
    }
    let write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(output)?);
        for event in &events {
            out.write_all(&event::encode(Format::Json, event))?;
            out.write_all(b"\n")?;
        }
        out.flush()
    };
    match write() {
        Ok(()) => {
            tracing::info!(source = source.name(), events = events.len(),
                output = %output.display(), "imported");
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}
