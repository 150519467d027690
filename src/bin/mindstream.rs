//! `mindstream`: the stream processor and its operational subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mindstream::cli::{self, EXIT_FAILURE, EXIT_USAGE};
use mindstream::config::Config;
use mindstream::event::Format;
use mindstream::http::Health;
use mindstream::lookup::LatestSignals;
use mindstream::model::LoadedModel;
use mindstream::ops::{delete, replay, summary, topics};
use mindstream::pipeline::{self, RunOptions};
use mindstream::privacy::Pseudonymizer;

/// mimalloc keeps per-user state about a quarter smaller in resident memory than the system
/// allocator, and applies events faster (`cargo bench --bench state`, docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mindstream", version, about = "Shopping-psychology signals from event streams")]
struct Args {
    /// Configuration file (TOML); `MINDSTREAM__*` variables override it.
    #[arg(long, short, global = true, env = "MINDSTREAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the processor: consume the input topics, publish signals.
    Run {
        /// Stop once every assigned partition is read to its end and all signals are delivered.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Score an event file (JSON lines) without Kafka; one record per user.
    Score {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Write rejected lines' numbers and reasons here (JSON lines).
        #[arg(long)]
        rejects: Option<PathBuf>,
    },
    /// Produce an event file (JSON lines) into a topic at a chosen rate.
    Replay {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "json")]
        format: Format,
        /// Records per second; 0 is as fast as the broker takes them.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Ask the processor to erase users: their state, changelog entry and latest signal record.
    DeleteUser {
        /// The shop's own user id (repeat for several users).
        #[arg(long = "user-id", required = true)]
        user_ids: Vec<String>,
        /// Input topic to send the requests to; the first input topic by default.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Create the input, signal, DLQ and state changelog topics of the configuration.
    Topics {
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication: i32,
    },
    /// Read the signal topic to its end and summarise each user's latest record.
    Summary {
        /// Users to show as examples.
        #[arg(long, default_value_t = 4)]
        examples: usize,
        /// Fail unless at least this many users were scored.
        #[arg(long, default_value_t = 0)]
        min_users: usize,
        /// Write each user's latest record here (JSON lines, sorted by user key).
        #[arg(long)]
        latest_out: Option<PathBuf>,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let purge_delay_ms = mindstream::allocator::keep_freed_memory();
    let args = Args::parse();
    let config = match cli::load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => return cli::report(&err, EXIT_USAGE),
    };
    cli::init_logging(&config);
    tracing::debug!(purge_delay_ms, "freed memory is kept this long before it is returned");
    match args.command {
        Command::Run { until_caught_up } => run(config, RunOptions { until_caught_up }),
        Command::Score { input, output, rejects } => score(&config, &input, &output, rejects),
        Command::Replay { input, topic, format, rate } => {
            let client = mindstream::sink::tool_producer_config(&config);
            let replay =
                replay::Replay { client: &client, input: &input, topic: &topic, format, rate };
            match replay.run() {
                Ok(stats) => {
                    let rate = stats.sent as f64 / stats.seconds.max(1e-9);
                    tracing::info!(
                        sent = stats.sent,
                        skipped = stats.skipped,
                        seconds = stats.seconds,
                        rate,
                        topic,
                        "replay finished"
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => cli::report(&err, EXIT_FAILURE),
            }
        }
        Command::DeleteUser { user_ids, topic } => delete_users(&config, &user_ids, topic),
        Command::Topics { partitions, replication } => {
            let runtime = runtime();
            match runtime.block_on(topics::create(&config, partitions, replication)) {
                Ok(created) => {
                    for (topic, new) in created {
                        println!("{topic}: {}", if new { "created" } else { "exists" });
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => cli::report(&err, EXIT_FAILURE),
            }
        }
        Command::Summary { examples, min_users, latest_out, timeout } => {
            summarise(&config, examples, min_users, latest_out, timeout)
        }
        Command::CheckConfig => {
            print!("{}", config.redacted());
            ExitCode::SUCCESS
        }
    }
}

fn delete_users(config: &Config, user_ids: &[String], topic: Option<String>) -> ExitCode {
    let input = match &topic {
        Some(topic) => config.inputs.iter().find(|i| &i.topic == topic),
        None => config.inputs.first(),
    };
    let Some(input) = input else {
        eprintln!(
            "error: {} is not an input topic of the configuration",
            topic.as_deref().map_or("no topic".into(), |t| format!("`{t}`"))
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let events = match delete::requests(user_ids, mindstream::time::now_ms()) {
        Ok(events) => events,
        Err(err) => return cli::report(&err, EXIT_USAGE),
    };
    let client = mindstream::sink::tool_producer_config(config);
    let runtime = runtime();
    match runtime.block_on(delete::send(&client, &input.topic, input.format, &events)) {
        Ok(sent) => {
            // The raw ids are not logged; the event ids identify the requests.
            tracing::info!(requests = sent, topic = %input.topic, "delete-user requests sent");
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts unless the process is out of resources")
}

fn load_model_and_key(config: &Config) -> Result<(LoadedModel, Pseudonymizer), ExitCode> {
    let key =
        Pseudonymizer::from_config(&config.privacy).map_err(|e| cli::report(&e, EXIT_USAGE))?;
    let model = LoadedModel::load(&config.model, config.scoring.workers)
        .map_err(|e| cli::report(&e, EXIT_FAILURE))?;
    log_loaded(&model, config);
    Ok((model, key))
}

/// The `model loaded` log line.
fn log_loaded(model: &LoadedModel, config: &Config) {
    tracing::info!(model_version = %model.card.model_version, provider = model.provider,
        precision = model.card.precision.as_str(), io_binding = config.model.io_binding,
        prefix_reuse = model.prefix_reuse, signals = model.card.signals.len(), "model loaded");
}

fn run(config: Config, options: RunOptions) -> ExitCode {
    if let Err(err) = config.check_runnable() {
        return cli::report(&err, EXIT_USAGE);
    }
    tracing::info!(config = %config.redacted(), "starting");
    let key = match Pseudonymizer::from_config(&config.privacy) {
        Ok(key) => key,
        Err(err) => return cli::report(&err, EXIT_USAGE),
    };
    let runtime = runtime();
    let metrics = match mindstream::metrics::install() {
        Ok(handle) => handle,
        Err(err) => return cli::report(&err, EXIT_FAILURE),
    };
    metrics::gauge!(mindstream::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    let health = Arc::new(Health::default());
    let latest = config
        .http
        .signals_lookup
        .then(|| Arc::new(LatestSignals::new(config.http.signals_lookup_capacity)));

    // The console needs the server; its window questions go to the consume loop.
    let (console, windows) = if config.http.listen.is_some() && config.http.console {
        let (access, windows) = mindstream::console::Access::new(segment_names(&config));
        (Some(access), Some(windows))
    } else {
        (None, None)
    };

    let result = runtime.block_on(async {
        // Listening before the model loads: a probe sees a live process that is not ready.
        if let Some(listen) = config.http.listen {
            let (health, latest, access) = (health.clone(), latest.clone(), console.clone());
            let served = mindstream::http::serve(listen, metrics, health, latest, access).await;
            if let Err(err) = served {
                return Err(cli::report(&err, EXIT_FAILURE));
            }
        }
        let model = load_model(&config).await?;
        // Segment rules parsed with the config; the signals they name are known only now.
        if let Err(err) = mindstream::actions::Actions::compile(&config, &model.card) {
            return Err(cli::report(&err, EXIT_USAGE));
        }
        let console = console.map(|access| access.console);
        let reporting = pipeline::Reporting { health, latest, console, windows };
        // On a worker thread: the pipeline makes short blocking broker queries in place.
        let pipeline = tokio::spawn(pipeline::run(config, model, key, reporting, options));
        match pipeline.await {
            Ok(result) => result.map_err(|err| cli::report(&err, EXIT_FAILURE)),
            Err(err) => Err(cli::report(&err, EXIT_FAILURE)),
        }
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// The configured segment names, for the console.
fn segment_names(config: &Config) -> Vec<String> {
    config.segments.iter().map(|s| s.name.clone()).collect()
}

/// Loads the model off the runtime's threads, logs it and sets `mindstream_model_info`.
async fn load_model(config: &Config) -> Result<LoadedModel, ExitCode> {
    let (model_config, workers) = (config.model.clone(), config.scoring.workers);
    let loaded = tokio::task::spawn_blocking(move || LoadedModel::load(&model_config, workers))
        .await
        .map_err(|err| cli::report(&err, EXIT_FAILURE))?;
    let model = loaded.map_err(|err| cli::report(&err, EXIT_FAILURE))?;
    log_loaded(&model, config);
    let labels = [
        ("model_version", model.card.model_version.clone()),
        ("execution_provider", model.provider.to_owned()),
    ];
    metrics::gauge!(mindstream::metrics::MODEL_INFO, &labels).set(1.0);
    Ok(model)
}

fn score(config: &Config, input: &Path, output: &Path, rejects: Option<PathBuf>) -> ExitCode {
    let (model, key) = match load_model_and_key(config) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match mindstream::offline::score_file(config, model, key, input, output, rejects.as_deref()) {
        Ok(stats) => {
            tracing::info!(lines = stats.lines, accepted = stats.accepted,
                rejected = ?stats.rejected, opted_out = stats.opted_out, deleted = stats.deleted,
                users = stats.users,
                records = stats.records, "scored");
            ExitCode::SUCCESS
        }
        Err(err) => cli::report(&err, EXIT_FAILURE),
    }
}

fn summarise(
    config: &Config,
    examples: usize,
    min_users: usize,
    latest_out: Option<PathBuf>,
    timeout: Duration,
) -> ExitCode {
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (key, value) in config.kafka.client.iter().chain(&config.kafka.consumer) {
        client.set(key, value);
    }
    let topic = &config.output.signals_topic;
    let back = match summary::read_latest(&client, topic, config.output.format, timeout) {
        Ok(back) => back,
        Err(err) => return cli::report(&err, EXIT_FAILURE),
    };
    print!("{}", summary::render(&back, topic, config.output.format, examples));
    let segments_topic = (!config.segments.is_empty()).then_some(&*config.output.segments_topic);
    let alerts_topic = config.alerts.enabled.then_some(&*config.output.alerts_topic);
    let format = config.output.format;
    match summary::read_actions(&client, segments_topic, alerts_topic, format, timeout) {
        Ok(actions) => print!("{}", summary::render_actions(&actions)),
        Err(err) => return cli::report(&err, EXIT_FAILURE),
    }
    if let Some(path) = latest_out {
        let lines: String = back
            .latest
            .values()
            .map(|r| serde_json::to_string(r).map(|s| s + "\n").unwrap_or_default())
            .collect();
        if let Err(err) = std::fs::write(&path, lines) {
            return cli::report(&err, EXIT_FAILURE);
        }
    }
    if back.latest.len() < min_users {
        eprintln!("error: {} users scored, fewer than --min-users {min_users}", back.latest.len());
        return ExitCode::from(EXIT_FAILURE);
    }
    ExitCode::SUCCESS
}
