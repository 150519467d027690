//! The processor: wires source, windows, model, signals and sink together.
//!
//! ```text
//! changelog ──restore on assign──┐
//! consumer ──decode──▶ Store (windows, watermarks, coalescing) ──requests──▶ model workers
//!    │  rejected ──▶ DLQ                                                        │ scores
//!    └─ commit ◀── offset tracker ◀── acknowledgements ◀── signal + changelog ◀─┘
//! ```
//!
//! The consumer's life has three phases: consuming, draining (stop reading, finish the batches
//! under way, wait for every acknowledgement, commit), done. Draining starts on SIGTERM or SIGINT,
//! or when `until_caught_up` is set and every assigned partition is read to its end with
//! nothing left in flight. A model or delivery failure stops the processor without committing
//! what it did not deliver.
//!
//! Partitions come and go while consuming (see [`crate::source`]): an assignment brings the
//! partitions' users back from the changelog before their first record; a revocation stops
//! publishing for them, waits for what was already handed to the producer, commits, and
//! drops their users. Scoring still running for them is dropped deliberately: its records'
//! offsets stay uncommitted, so the next owner reads them again on top of the restored state.
//!
//! # Layout
//!
//! This file holds the entry point, the consume loop, the handling of one record and the
//! drain; `publish` the task that turns scores into records; `rebalance` assignments and
//! revocations; `upkeep` commits, gauges, eviction, lag and the caught-up check; `checks` the
//! start-up topic check and the broker probe; `rejections` the burst-limited log of rejected
//! records.

mod backpressure;
mod checks;
mod publish;
mod rebalance;
mod rejections;
mod upkeep;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use crate::actions::{Actions, ActionsError, Marks};
use crate::config::Config;
use crate::config::DeliveryMode;
use crate::console::{Console, WindowRequest};
use crate::event::limits;
use crate::event::Rejection;
use crate::http::Health;
use crate::lookup::LatestSignals;
use crate::metrics as m;
use crate::model::batcher::{self, BatchConfig, ScoreRequest, Scored};
use crate::model::scorer::ModelError;
use crate::model::LoadedModel;
use crate::offsets::{OffsetRef, OffsetTracker, Partition};
use crate::sink::{Owner, Sink, SinkError};
use crate::source::{
    self, Admitted, Polled, Record, RestoreError, Shared, Source, SourceConsumer, Topics,
};
use crate::window::store::{Applied, Scoring, Store, StoreConfig};
use crate::window::Lineage;

use self::checks::{check_topics, probe_broker};
use self::publish::{publish, Done, Erasure, MarksUpdate, Outputs, Publisher, Sequenced};
use self::rejections::RejectionLog;

#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Stop once every assigned partition is read to its end and everything is delivered.
    pub until_caught_up: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot create the Kafka consumer")]
    Consumer(#[source] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("the model failed")]
    Model(#[from] ModelError),
    #[error("the model workers stopped")]
    WorkersGone,
    #[error("draining did not finish within shutdown.drain_timeout ({0:?})")]
    DrainTimeout(Duration),
    #[error("cannot restore state from the changelog")]
    Restore(#[from] RestoreError),
    #[error("{0}")]
    Topics(String),
    #[error(transparent)]
    Actions(#[from] ActionsError),
}

/// Why consuming stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    CaughtUp,
}

type Request = ScoreRequest<Scoring<OffsetRef>>;
type Outcome = Result<Scored<Scoring<OffsetRef>>, ModelError>;

/// State the consume loop works on (the consumer itself is kept apart so that a borrowed
/// message can be handled while this is mutated).
struct Processor {
    topics: Topics,
    store: Store<OffsetRef>,
    tracker: Arc<Mutex<OffsetTracker>>,
    sink: Sink,
    /// Scoring requests to the model workers; dropped when draining so the workers finish.
    requests: Option<flume::Sender<Request>>,
    /// The same queue's receiving end, to take back requests no worker has started when
    /// draining.
    queued: flume::Receiver<Request>,
    /// Entries of the request order without a scoring (requests taken back, tombstones), for
    /// the publisher; dropped when draining.
    sequenced: Option<mpsc::UnboundedSender<Sequenced>>,
    health: Arc<Health>,
    mode: DeliveryMode,
    /// Longest a revocation waits for the producer.
    drain_timeout: Duration,
    /// Input partition numbers held (restored and not revoked).
    held: std::collections::HashSet<i32>,
    /// Committed position of each partition when it was assigned: where reading starts.
    start_positions: std::collections::HashMap<Partition, i64>,
    /// When the last input record arrived (for the caught-up check).
    last_record: Instant,
    /// Consumption is paused because too many users wait for scoring (see
    /// [`backpressure::keep_paused`]).
    paused: bool,
    /// `scoring.max_waiting`.
    max_waiting: usize,
    /// Records read since start, for the progress log.
    records_in: u64,
    /// Rejections waiting for their log line.
    rejections: RejectionLog,
    /// Partitions whose lag gauge was set, to zero it once they are no longer assigned.
    lag_reported: std::collections::HashSet<Partition>,
    /// Bytes of key and value a dead-letter record may carry.
    dead_letter_room: usize,
    /// The console's aggregates, when it is on.
    console: Option<Arc<Console>>,
    /// The console's questions for a user's window; `None` when the console is off or the
    /// HTTP server has gone.
    windows: Option<mpsc::Receiver<WindowRequest>>,
    /// Marks the publisher decided, for the store; the publisher holds the sending end.
    marks: mpsc::UnboundedReceiver<MarksUpdate>,
    /// Configured segment names, for the size gauges.
    segments: Vec<String>,
}

/// Failures reported by tasks other than the consume loop.
struct Fatal {
    sink: mpsc::UnboundedReceiver<SinkError>,
    model: mpsc::UnboundedReceiver<ModelError>,
}

impl Fatal {
    async fn next(&mut self) -> PipelineError {
        tokio::select! {
            Some(err) = self.sink.recv() => PipelineError::Sink(err),
            Some(err) = self.model.recv() => PipelineError::Model(err),
            else => std::future::pending().await,
        }
    }
}

/// Where the processor reports to the HTTP server: readiness, the latest record per user when
/// the lookup is on, and the console's aggregates and window questions when it is on.
pub struct Reporting {
    pub health: Arc<Health>,
    pub latest: Option<Arc<LatestSignals>>,
    pub console: Option<Arc<Console>>,
    /// Questions from the console for a user's current window; the HTTP server holds the
    /// sending end.
    pub windows: Option<mpsc::Receiver<WindowRequest>>,
}

/// Runs the processor until a signal or, with `until_caught_up`, the end of the input.
pub async fn run(
    config: Config,
    model: LoadedModel,
    key: crate::privacy::Pseudonymizer,
    reporting: Reporting,
    options: RunOptions,
) -> Result<StopReason, PipelineError> {
    let Reporting { health, latest, console, windows } = reporting;
    let card = model.card.clone();
    let actions = Arc::new(Actions::compile(&config, &card)?);
    let input_topics: Vec<String> = config.inputs.iter().map(|i| i.topic.clone()).collect();
    m::register_series(&input_topics, &actions.segment_names());
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let (sink_fatal, sink_errors) = mpsc::unbounded_channel();
    let sink = tokio::task::block_in_place(|| Sink::new(&config, tracker.clone(), sink_fatal))?;
    tokio::task::block_in_place(|| check_topics(&config, &sink))?;
    let probe = tokio::spawn(probe_broker(sink.clone(), health.clone()));

    let (request_tx, request_rx) = flume::bounded(config.scoring.queue_capacity);
    let (result_tx, result_rx) = flume::bounded(config.scoring.queue_capacity);
    let (sequenced_tx, sequenced_rx) = mpsc::unbounded_channel();
    let batch = BatchConfig::new(&config.scoring, card.max_tokens);
    let queued = request_rx.clone();
    let workers =
        batcher::spawn_workers(model.scorers, &model.tokenizer, batch, request_rx, result_tx);
    health.model_loaded.store(true, Ordering::SeqCst);
    let (model_fatal, model_errors) = mpsc::unbounded_channel();
    let explain_top = config.scoring.explain_top;
    let done = Done { results: result_rx, sequenced: sequenced_rx };
    let (marks_tx, marks_rx) = mpsc::unbounded_channel();
    let outputs = Outputs { latest: latest.clone(), console: console.clone(), marks: marks_tx };
    let publisher = Publisher {
        sink: sink.clone(),
        card: card.clone(),
        actions: actions.clone(),
        explain_top,
        outputs,
        fatal: model_fatal,
    };
    let publisher = tokio::spawn(publish(done, publisher));
    let mut fatal = Fatal { sink: sink_errors, model: model_errors };

    let shared = Shared {
        tracker: tracker.clone(),
        assignment: health.assignment.clone(),
        restoring: health.restoring.clone(),
    };
    let mut source = Source::start(&config, shared).map_err(PipelineError::Consumer)?;
    tracing::info!(
        inputs = config.inputs.len(),
        group = %config.kafka.group_id,
        delivery = ?config.delivery.mode,
        assignment_strategy = source::assignment_strategy(&config),
        "consuming"
    );
    let mut processor = Processor {
        topics: Topics::new(&config),
        store: Store::new(StoreConfig::resolve(&config, &card), Arc::new(key)),
        tracker,
        sink,
        requests: Some(request_tx),
        queued,
        sequenced: Some(sequenced_tx),
        health,
        mode: config.delivery.mode,
        drain_timeout: config.shutdown.drain_timeout,
        held: std::collections::HashSet::new(),
        start_positions: std::collections::HashMap::new(),
        last_record: Instant::now(),
        paused: false,
        max_waiting: config.scoring.max_waiting,
        records_in: 0,
        rejections: RejectionLog::default(),
        lag_reported: std::collections::HashSet::new(),
        dead_letter_room: limits::dead_letter_room(&config),
        console,
        windows,
        marks: marks_rx,
        segments: actions.segment_names(),
    };

    let consumed = processor.consume(&mut source, &config, options, &mut fatal).await;
    let reason = match consumed {
        Ok(reason) => reason,
        Err(err) => {
            probe.abort();
            return Err(err);
        }
    };
    tracing::info!(?reason, "draining");
    let timeout = config.shutdown.drain_timeout;
    let drained =
        tokio::time::timeout(timeout, processor.drain(&mut source, publisher, &mut fatal)).await;
    probe.abort();
    drained.map_err(|_| PipelineError::DrainTimeout(timeout))??;
    tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join())))
        .await
        .ok();
    tracing::info!(?reason, "done");
    Ok(reason)
}

impl Processor {
    /// The consuming phase.
    async fn consume(
        &mut self,
        source: &mut Source,
        config: &Config,
        options: RunOptions,
        fatal: &mut Fatal,
    ) -> Result<StopReason, PipelineError> {
        let tick_period = (config.scoring.coalesce / 4).clamp(Duration::from_millis(1), TICK_MAX);
        let mut coalesce = interval(tick_period);
        let mut commit = interval(config.kafka.commit_interval);
        let mut housekeeping = interval(HOUSEKEEPING_PERIOD);
        let mut caught_up = interval(CAUGHT_UP_PERIOD);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            // Unbiased: tokio picks among ready branches at random, so neither a backlog of
            // records nor the timers can starve the other.
            tokio::select! {
                err = fatal.next() => return Err(err),
                () = &mut shutdown => return Ok(StopReason::Signal),
                _ = coalesce.tick() => self.dispatch_due(source.consumer())?,
                _ = commit.tick() => self.commit(source.consumer(), CommitMode::Async).await?,
                _ = housekeeping.tick() => self.housekeeping(source.consumer()).await,
                _ = caught_up.tick(), if options.until_caught_up => {
                    if self.is_caught_up(source).await {
                        return Ok(StopReason::CaughtUp);
                    }
                }
                Some(update) = self.marks.recv() => {
                    self.store.set_marks(&update.user_key, update.epoch, update.marks);
                }
                asked = next_question(&mut self.windows) => match asked {
                    Some(question) => {
                        let _ = question.reply.send(self.store.timeline(&question.user_key));
                    }
                    None => self.windows = None,
                },
                polled = source.recv() => match polled {
                    Polled::Records(mut records) => {
                        for (record, admitted) in records.admitted() {
                            self.handle(record, admitted).await;
                        }
                        source.recycle(records);
                    }
                    Polled::Error(err) => self.client_error(&err),
                    Polled::Assigned { partitions, restored, committed } => {
                        self.assigned(source.consumer(), &partitions, restored, committed);
                    }
                    Polled::Revoked { numbers, done, .. } => {
                        self.revoked(source.consumer(), &numbers).await?;
                        let _ = done.send(());
                    }
                    Polled::RestoreFailed(err) => return Err(err.into()),
                },
            }
        }
    }

    /// One input record, admitted on the polling thread: window its event, or send it to the
    /// DLQ.
    async fn handle(&mut self, message: Record<'_>, admitted: Admitted) {
        self.health.broker_down.store(false, Ordering::SeqCst);
        self.last_record = Instant::now();
        self.records_in += 1;
        let (Some(input), Some(admitted)) = (self.topics.get(message.topic()), admitted) else {
            tracing::warn!(topic = message.topic(), "record from a topic not subscribed");
            return;
        };
        let topic = input.name.clone();
        if !self.held.contains(&message.partition()) {
            // Read before its partition was revoked; the next owner reads it again.
            return;
        }
        let partition = Partition { topic: topic.clone(), partition: message.partition() };
        let offset = message.offset();
        let before = self.store.watermark(&topic, message.partition());
        self.tracker.lock().expect("offset tracker lock poisoned").open(&partition, offset, before);
        input.records_in.increment(1);
        let token = OffsetRef { partition, offset, timestamp_ms: message.timestamp().to_millis() };

        let lineage = Lineage { topic: topic.clone(), partition: message.partition(), offset };
        let event = match admitted {
            Ok(event) => event,
            Err(rejection) => return self.reject(message, rejection, token).await,
        };
        let kind = event.kind();
        let applied = self.store.apply(event, lineage, token, Instant::now());
        let after = self.store.watermark(&topic, message.partition());
        if after != before {
            let partition = Partition { topic: topic.clone(), partition: message.partition() };
            self.tracker.lock().expect("offset tracker lock poisoned").watermark(&partition, after);
        }
        match applied {
            Applied::Accepted => {
                if let Some(accepted) = input.accepted(kind) {
                    accepted.increment(1);
                }
            }
            Applied::AlreadyApplied(released) => {
                metrics::counter!(m::EVENTS_ALREADY_APPLIED, "topic" => topic.to_string())
                    .increment(1);
                if let Some(token) = released {
                    let mut tracker = self.tracker.lock().expect("offset tracker lock poisoned");
                    tracker.done(&token.partition, token.offset);
                }
            }
            Applied::Rejected(rejection, token) => self.reject(message, rejection, token).await,
            Applied::Deleted { user_key, partition, released, marks } => {
                metrics::counter!(m::USERS_DELETED, "topic" => topic.to_string()).increment(1);
                self.erase(user_key, partition, released, true, marks);
            }
            Applied::OptedOut { user_key, partition, released, marks } => {
                metrics::counter!(m::EVENTS_OPTED_OUT, "topic" => topic.to_string()).increment(1);
                self.erase(user_key, partition, released, false, marks);
            }
        }
    }

    /// Queues a user's tombstones behind the scorings already requested (see
    /// [`Sequenced::Erase`]); `all` adds the signal topic's.
    fn erase(
        &mut self,
        user_key: String,
        partition: i32,
        released: Vec<OffsetRef>,
        all: bool,
        marks: Option<Box<Marks>>,
    ) {
        let owner = Owner { partition, epoch: self.store.epoch(partition) };
        let sequence = self.store.reserve_sequence();
        let erasure = Erasure { sequence, user_key, owner, released, signals_too: all, marks };
        if let Some(sequenced) = &self.sequenced {
            // The publisher outlives the consuming phase, when nothing else sends here.
            let _ = sequenced.send(Sequenced::Erase(erasure));
        }
    }

    /// Counts, logs and dead-letters a rejected record. One place for all rejections. The
    /// dead-letter record carries the original key and value, or as much of them as the
    /// producer can send (a record too large for it would otherwise stop the processor).
    async fn reject(&mut self, message: Record<'_>, mut rejection: Rejection, token: OffsetRef) {
        let topic = token.partition.topic.to_string();
        let reason = rejection.reason.as_str();
        metrics::counter!(m::RECORDS_REJECTED, "topic" => topic.clone(), "reason" => reason)
            .increment(1);
        self.rejections.note(&topic, reason, Instant::now());
        tracing::debug!(
            topic,
            partition = token.partition.partition,
            offset = token.offset,
            reason,
            "record rejected"
        );
        // An absent key or value stays absent, and an empty one empty.
        let (key, payload, cut) =
            limits::fit_dead_letter(message.key(), message.payload(), self.dead_letter_room);
        if cut {
            let kept = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
            let note = format!("; the dead-letter record keeps its first {kept} bytes");
            rejection.detail.push_str(&note);
        }
        self.sink.dead_letter(key, payload, &rejection, token).await;
    }

    fn client_error(&self, err: &KafkaError) {
        tracing::warn!(cause = %err, "consumer error");
        if matches!(
            err.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.broker_down.store(true, Ordering::SeqCst);
        }
    }

    /// Hands the users whose debounce has passed to the model workers, as many as the queue
    /// has room for. While too many users wait the input partitions are paused, so the
    /// backlog stays in Kafka and the consumer keeps polling (and stays in its group).
    fn dispatch_due(&mut self, consumer: &SourceConsumer) -> Result<(), PipelineError> {
        let Some(sender) = &self.requests else { return Ok(()) };
        let room = sender.capacity().unwrap_or(usize::MAX).saturating_sub(sender.len());
        let (due, _) = self.store.take_due(Instant::now(), room);
        for request in due {
            // Only this task sends, so the room counted above is still there.
            sender.try_send(request).map_err(|_| PipelineError::WorkersGone)?;
        }
        metrics::gauge!(m::SCORING_QUEUE_DEPTH).set(sender.len() as f64);
        let pause = backpressure::keep_paused(self.paused, self.store.waiting(), self.max_waiting);
        self.set_paused(consumer, pause);
        Ok(())
    }

    fn set_paused(&mut self, consumer: &SourceConsumer, pause: bool) {
        if pause == self.paused {
            return;
        }
        let Ok(assignment) = consumer.assignment() else { return };
        let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
        if let Err(err) = result {
            tracing::warn!(cause = %err, pause, "cannot pause or resume the input partitions");
            return;
        }
        tracing::info!(paused = pause, waiting = self.store.waiting(), "scoring backpressure");
        metrics::gauge!(m::CONSUMER_PAUSED).set(f64::from(u8::from(pause)));
        self.paused = pause;
    }

    /// The draining phase: score every dirty user, let the workers finish, wait for every
    /// acknowledgement, commit, leave the group.
    async fn drain(
        &mut self,
        source: &mut Source,
        publisher: tokio::task::JoinHandle<()>,
        fatal: &mut Fatal,
    ) -> Result<(), PipelineError> {
        // Requests no worker has started are taken back: their events stay uncommitted and
        // are read again by the partitions' next owner, so the drain waits only for the
        // batches under way, never for a backlog.
        let taken_back: Vec<Request> = self.queued.drain().collect();
        if let Some(skipped) = self.sequenced.take() {
            for request in &taken_back {
                let _ = skipped.send(Sequenced::Skipped(request.context.sequence));
            }
        }
        self.requests = None;
        tracing::info!(
            taken_back = taken_back.len(),
            unscored_users = self.store.dirty(),
            "finishing the batches under way; unscored events stay uncommitted"
        );
        drop(taken_back);
        let finish = async {
            let _ = publisher.await;
            self.sink.wait_idle().await;
        };
        tokio::select! {
            biased;
            err = fatal.next() => return Err(err),
            () = finish => {}
        }
        source.stop();
        self.commit(source.consumer(), CommitMode::Sync).await?;
        source.consumer().unsubscribe();
        Ok(())
    }
}

/// Longest pause between coalescing checks.
const TICK_MAX: Duration = Duration::from_millis(10);
/// How often gauges, eviction, lag and the progress line are refreshed.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(10);
/// How often `until_caught_up` looks at the partitions' ends.
const CAUGHT_UP_PERIOD: Duration = Duration::from_millis(500);

/// A timer that, after a late tick, waits a whole period again instead of catching up.
fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// The console's next question; pending forever when there is no console.
async fn next_question(
    windows: &mut Option<mpsc::Receiver<WindowRequest>>,
) -> Option<WindowRequest> {
    match windows {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}
