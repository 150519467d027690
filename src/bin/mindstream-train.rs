//! `mindstream-train`: turns public e-commerce history into the model `mindstream` runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mindstream::cli::{self, EXIT_FAILURE};
use mindstream::event::{self, Format};
use mindstream::import::{self, Source};
use mindstream::train::build::{self, BuildOptions};

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
        Command::Build { data, out, lm_steps, seed, max_train, max_eval, finetune_steps } => {
            let options = BuildOptions {
                data,
                out,
                lm_steps,
                seed,
                max_train,
                max_eval,
                finetune_steps,
                ..Default::default()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            match build::build(&options, &command) {
                Ok(card) => {
                    for row in &card.evaluation {
                        println!(
                            "{:<18} {:<11} test n={:<6} AUC {:.4}  baseline {:.4} ({})",
                            row.signal,
                            row.dataset,
                            row.examples,
                            row.auc,
                            row.baseline_auc,
                            row.baseline
                        );
                    }
                    println!("model {} written to {}", card.model_version, options.out.display());
                    ExitCode::SUCCESS
                }
                Err(err) => cli::report(&err, EXIT_FAILURE),
            }
        }
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
