//! `mindstream score`: the processor's decode, window, render, model and signal code over an
//! event file (JSON lines), without Kafka.
//!
//! The file is treated as one partition read in order (lineage: the file name, partition 0,
//! the line number as offset). Every user's final window is scored once at the end, so each
//! user's record equals the latest record the Kafka path publishes for the same events.
//! Rejected lines are counted by reason and, if asked, listed in a rejects file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Config, LimitsConfig};
use crate::event::Format;
use crate::model::batcher::{self, BatchConfig};
use crate::model::scorer::ModelError;
use crate::model::LoadedModel;
use crate::privacy::Pseudonymizer;
use crate::signals::{self, SignalRecord};
use crate::window::store::{Applied, Store, StoreConfig};
use crate::window::Lineage;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
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
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the model workers stopped")]
    WorkersGone,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct OfflineStats {
    pub lines: usize,
    pub accepted: usize,
    pub rejected: BTreeMap<&'static str, usize>,
    pub opted_out: usize,
    /// Delete-user requests honoured (the user has no record in the output).
    pub deleted: usize,
    pub users: usize,
    pub records: usize,
}

/// Scores `input` and writes one record per user, sorted by user key, to `output`.
pub fn score_file(
    config: &Config,
    model: LoadedModel,
    key: Pseudonymizer,
    input: &Path,
    output: &Path,
    rejects: Option<&Path>,
) -> Result<OfflineStats, OfflineError> {
    let card = model.card.clone();
    let mut store_config = StoreConfig::resolve(config, &card);
    store_config.changelog = false;
    let mut store: Store<()> = Store::new(store_config, Arc::new(key));
    let mut stats = read_events(input, &config.limits, &mut store, rejects)?;
    stats.users = store.users();

    let (request_tx, request_rx) = flume::bounded(config.scoring.queue_capacity);
    let (result_tx, result_rx) = flume::unbounded();
    let batch = BatchConfig::new(&config.scoring, card.max_tokens);
    let workers =
        batcher::spawn_workers(model.scorers, &model.tokenizer, batch, request_rx, result_tx);
    let requests = store.take_all();
    let feeder = std::thread::spawn(move || {
        for request in requests {
            if request_tx.send(request).is_err() {
                break;
            }
        }
    });

    let now = crate::time::now_ms();
    let mut records: Vec<SignalRecord> = Vec::with_capacity(stats.users);
    for outcome in result_rx.iter() {
        let scored = outcome?;
        let explain_top = config.scoring.explain_top;
        let model = signals::ModelScores::from(&scored);
        records.push(signals::build(&card, &scored.context.facts, model, explain_top, now));
    }
    feeder.join().map_err(|_| OfflineError::WorkersGone)?;
    for worker in workers {
        worker.join().map_err(|_| OfflineError::WorkersGone)?;
    }
    if records.len() != stats.users {
        return Err(OfflineError::WorkersGone);
    }
    records.sort_by(|a, b| a.user_key.cmp(&b.user_key));
    write_records(output, &records)?;
    stats.records = records.len();
    Ok(stats)
}

fn read_events(
    input: &Path,
    limits: &LimitsConfig,
    store: &mut Store<()>,
    rejects: Option<&Path>,
) -> Result<OfflineStats, OfflineError> {
    let read_err = |source| OfflineError::Read { path: input.into(), source };
    let file = std::fs::File::open(input).map_err(read_err)?;
    let mut rejects = match rejects {
        None => None,
        Some(path) => Some((
            path,
            BufWriter::new(
                std::fs::File::create(path)
                    .map_err(|source| OfflineError::Write { path: path.into(), source })?,
            ),
        )),
    };
    let topic: Arc<str> = format!("file:{}", input.display()).into();
    let mut stats = OfflineStats::default();
    let now = Instant::now();
    for (number, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(read_err)?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        stats.lines += 1;
        let lineage = Lineage { topic: topic.clone(), partition: 0, offset: number as i64 };
        // The processor's checks (duplicates are the store's). A line has no key and no broker
        // timestamp, so its size is its value's, and event times are not checked against a
        // broker's clock.
        let rejection = match crate::source::admit(limits, Format::Json, None, Some(&line), None) {
            Err(rejection) => Some(rejection),
            Ok(event) => match store.apply(event, lineage, (), now) {
                Applied::Accepted | Applied::AlreadyApplied(_) => {
                    stats.accepted += 1;
                    None
                }
                Applied::Rejected(rejection, ()) => Some(rejection),
                Applied::OptedOut { .. } => {
                    stats.opted_out += 1;
                    None
                }
                Applied::Deleted { .. } => {
                    stats.deleted += 1;
                    None
                }
            },
        };
        if let Some(rejection) = rejection {
            *stats.rejected.entry(rejection.reason.as_str()).or_default() += 1;
            if let Some((path, out)) = &mut rejects {
                let row = serde_json::json!({
                    "line": number + 1,
                    "reason": rejection.reason.as_str(),
                    "detail": rejection.detail,
                });
                writeln!(out, "{row}")
                    .map_err(|source| OfflineError::Write { path: (*path).into(), source })?;
            }
        }
    }
    if let Some((path, mut out)) = rejects {
        out.flush().map_err(|source| OfflineError::Write { path: path.into(), source })?;
    }
    Ok(stats)
}

fn write_records(path: &Path, records: &[SignalRecord]) -> Result<(), OfflineError> {
    let write_err = |source| OfflineError::Write { path: path.into(), source };
    let mut out = BufWriter::new(std::fs::File::create(path).map_err(write_err)?);
    for record in records {
        serde_json::to_writer(&mut out, record).map_err(|e| write_err(e.into()))?;
        out.write_all(b"\n").map_err(write_err)?;
    }
    out.flush().map_err(write_err)
}
