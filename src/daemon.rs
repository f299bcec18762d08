//! `run`: sets up every stage, then supervises one worker per shard until shutdown (or, in
//! dry-run, until every shard has caught up).
//!
//! The supervisor re-lists shards periodically and right after a shard ends, and starts a
//! child only when all its parents are finished.

use std::collections::HashSet;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;
use std::path::PathBuf;

use tokio::task::JoinSet;

use crate::actions::{ActionError, ActionSet};
use crate::capture::Capture;
use crate::clock::now_ms;
use crate::config::{ConfigError, Settings, StreamSettings};
use crate::keys::{KeyError, Keys};
use crate::pipeline::{Pipeline, PipelineError, Retried, ShardExit, Sink};
use crate::preview::{Ledger, OutputFormat, Preview};
use crate::rules::reload::{self, load_tested, LoadFailure, Rules, Sendable};
use crate::rules::Decision;
use crate::shutdown::Shutdown;
use crate::source::{
    ready_shards, Checkpoint, KinesisSource, Position, ShardInfo, ShardReader, SourceError,
};
use crate::state::{DeadLetterReason, State, StateError};
use crate::telemetry::{self, Served, ShardView, Telemetry};

/// Options of `run --dry-run`.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub format: OutputFormat,
    pub follow: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the rules in {dir} cannot be used:\n{failure}", dir = .0.display(), failure = .1)]
    Rules(PathBuf, LoadFailure),
    #[error(transparent)]
    Actions(#[from] ActionError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("a shard worker panicked: {0}")]
    WorkerPanicked(String),
    #[error("cannot listen on {listen} ([metrics] listen): {source}")]
    Listen {
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl RunError {
    /// 2 for what the user must fix in the config or rules before starting; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Rules(..) | RunError::Keys(_) => 2,
            RunError::Actions(ActionError::Client { .. }) => 1,
            RunError::Actions(_) => 2,
            _ => 1,
        }
    }
}

/// What the rules' test cases are held to: each expected decision must be one the
/// configured actions can turn into a request (no secrets needed to tell).
fn sendable(settings: &Settings) -> Result<Sendable, RunError> {
    let actions = ActionSet::new(&settings.actions, false)?;
    Ok(Arc::new(move |decision: &Decision| {
        actions
            .prepare(decision)
            .map(drop)
            .map_err(|e| e.to_string())
    }))
}

/// Runs the daemon (or the dry-run) to the end.
pub async fn run(settings: Settings, dry_run: Option<DryRun>) -> Result<(), RunError> {
    let action_names: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let sendable = sendable(&settings)?;
    let rules = load_tested(&settings.rules_dir, &action_names, &*sendable)
        .map_err(|failure| RunError::Rules(settings.rules_dir.clone(), failure))?;
    tracing::info!(
        rules = rules.rules().len(),
        hash = rules.hash(),
        "rules loaded"
    );
    let actions = ActionSet::new(&settings.actions, dry_run.is_none())?;
    let shutdown = Shutdown::new();
    let telemetry = Arc::new(Telemetry::new());
    let rule_names: Vec<String> = rules.rules().iter().map(|r| r.name.clone()).collect();
    let rules = Arc::new(Rules::new(
        rules,
        settings.rules_dir.clone(),
        action_names,
        sendable,
    ));
    let sink = match &dry_run {
        Some(options) => Sink::Preview(Box::new(Preview::new(
            options.format,
            options.follow,
            read_ledger(&settings),
            rule_names,
        ))),
        None => {
            // Lock the state before anything else can start, the listener included.
            let state = Arc::new(State::open(&settings.state_path)?);
            let keys = Keys::load_or_create(settings.key_env.as_deref(), &settings.key_file)?;
            if let Some(listen) = settings.metrics_listen {
                let served = Arc::new(Served {
                    telemetry: telemetry.clone(),
                    rules: rules.clone(),
                    state: state.clone(),
                });
                telemetry::serve(listen, served, shutdown.clone())
                    .await
                    .map_err(|source| RunError::Listen { listen, source })?;
            }
            Sink::Live { state, keys }
        }
    };
    let source = Arc::new(KinesisSource::connect(&settings.stream).await);
    spawn_signal_handler(shutdown.clone());

    if dry_run.is_none() {
        let (rules, shutdown) = (rules.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = reload::watch(rules, shutdown).await {
                tracing::error!(error = %e, "cannot watch the rules directory; hot reload is off");
            }
        });
    }
    let pipeline = Arc::new(Pipeline {
        stream: settings.stream.name.as_str().into(),
        rules,
        actions,
        sink,
        shutdown: shutdown.clone(),
        telemetry: telemetry.clone(),
        claims: Default::default(),
    });
    if let Sink::Live { .. } = &pipeline.sink {
        tokio::spawn(maintain(
            pipeline.clone(),
            settings.dead_letter_retry_interval,
            settings.ledger_retention,
        ));
    }
    let progress = match &pipeline.sink {
        Sink::Preview(_) if std::io::stderr().is_terminal() => {
            Some(spawn_progress(pipeline.clone(), shutdown.clone()))
        }
        _ => None,
    };
    let result = supervise(&settings.stream, &source, &pipeline, &telemetry).await;
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
    }
    if let Sink::Preview(preview) = &pipeline.sink {
        preview.finish();
    }
    result
}

/// The daemon's housekeeping until shutdown: retries dead letters that a backend fault left
/// (refusals wait for an operator), and forgets ledger entries older than the retention.
async fn maintain(pipeline: Arc<Pipeline>, retry_every: Duration, ledger_retention: Duration) {
    let Sink::Live { state, .. } = &pipeline.sink else {
        return;
    };
    let mut last_expiry: Option<std::time::Instant> = None;
    while pipeline.shutdown.sleep(retry_every).await.is_ok() {
        if last_expiry.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
            let before = now_ms().saturating_sub(ledger_retention.as_millis() as u64);
            match state.expire_done(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    expired = n,
                    "ledger entries older than the retention forgotten"
                ),
                Err(e) => tracing::error!(error = %e, "cannot expire ledger entries"),
            }
            last_expiry = Some(std::time::Instant::now());
        }
        let letters = match state.dead_letters() {
            Ok(letters) => letters,
            Err(e) => {
                tracing::error!(error = %e, "cannot read dead letters");
                continue;
            }
        };
        for (id, letter) in letters {
            if !matches!(
                letter.reason,
                DeadLetterReason::ActionFailed {
                    retryable: true,
                    ..
                }
            ) {
                continue;
            }
            match pipeline.retry_dead_letter(id, letter).await {
                Ok(Retried::Resolved) => {
                    tracing::info!(dead_letter = id, "dead letter retried: done")
                }
                Ok(Retried::StillFailing(error)) => {
                    tracing::warn!(dead_letter = id, %error, "dead letter retried: still failing")
                }
                Ok(Retried::Interrupted) => return,
                Err(e) => {
                    tracing::error!(dead_letter = id, error = %e, "cannot retry a dead letter")
                }
            }
        }
    }
}

/// `dead-letters retry`: retries the given dead letters (or all) now, with the current
/// rules and config, the daemon stopped. Returns what became of each.
pub async fn retry_dead_letters(
    settings: Settings,
    ids: Option<Vec<u64>>,
) -> Result<Vec<(u64, Retried)>, RunError> {
    let action_names: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let sendable = sendable(&settings)?;
    let rules = load_tested(&settings.rules_dir, &action_names, &*sendable)
        .map_err(|failure| RunError::Rules(settings.rules_dir.clone(), failure))?;
    let actions = ActionSet::new(&settings.actions, true)?;
    let state = Arc::new(State::open_existing(&settings.state_path)?);
    let keys = Keys::load_or_create(settings.key_env.as_deref(), &settings.key_file)?;
    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone());
    let pipeline = Pipeline {
        stream: settings.stream.name.as_str().into(),
        rules: Arc::new(Rules::new(
            rules,
            settings.rules_dir.clone(),
            action_names,
            sendable,
        )),
        actions,
        sink: Sink::Live {
            state: state.clone(),
            keys,
        },
        shutdown,
        telemetry: Arc::new(Telemetry::new()),
        claims: Default::default(),
    };
    let mut results = Vec::new();
    for (id, letter) in state.dead_letters()? {
        if ids.as_ref().is_some_and(|ids| !ids.contains(&id)) {
            continue;
        }
        let outcome = pipeline.retry_dead_letter(id, letter).await?;
        let stop = outcome == Retried::Interrupted;
        results.push((id, outcome));
        if stop {
            break;
        }
    }
    if let Some(missing) = ids
        .iter()
        .flatten()
        .find(|id| !results.iter().any(|(r, _)| r == *id))
    {
        return Err(RunError::State(StateError::NoDeadLetter {
            path: settings.state_path.clone(),
            id: *missing,
        }));
    }
    Ok(results)
}

/// Dry-run on a terminal: a progress line on stderr while a backlog is scanned.
fn spawn_progress(pipeline: Arc<Pipeline>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let _clear = ClearOnDrop(bar.clone());
        while !shutdown.is_triggered() {
            if let Sink::Preview(preview) = &pipeline.sink {
                let (records, matches) = preview.progress();
                let rate = records as f64 / started.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!(
                    "{records} records read ({rate:.0}/s), {matches} would-be actions, {} shards caught up",
                    preview.shards_caught_up()
                ));
                bar.tick();
            }
            let _ = shutdown.sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

struct ClearOnDrop(indicatif::ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Captures records from the stream as JSON lines into `out` (see [`crate::capture`]).
pub async fn capture<W: std::io::Write + Send + 'static>(
    stream: &StreamSettings,
    out: W,
    limit: Option<u64>,
) -> Result<W, RunError> {
    let source = Arc::new(KinesisSource::connect(stream).await);
    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone());
    let capture = Arc::new(Capture::new(stream.name.clone(), out, limit, shutdown));
    supervise(stream, &source, &capture, &Telemetry::new()).await?;
    tracing::info!(records = capture.written(), "capture done");
    let capture = Arc::into_inner(capture).expect("every worker has ended");
    Ok(capture.into_inner())
}

/// The daemon's dedup ledger, for dry-run to mark requests already done. Never creates,
/// locks for long, or writes anything; says why when it cannot.
fn read_ledger(settings: &Settings) -> Option<Ledger> {
    if !settings.state_path.exists() {
        tracing::info!("no state file yet: no request is marked as already done");
        return None;
    }
    let keys = match Keys::load_existing(settings.key_env.as_deref(), &settings.key_file) {
        Ok(Some(keys)) => keys,
        Ok(None) => {
            tracing::warn!(path = %settings.key_file.display(), "no state key: cannot tell which requests the daemon has already done");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell which requests the daemon has already done");
            return None;
        }
    };
    match State::read_done_set(&settings.state_path) {
        Ok(done) => {
            tracing::info!(
                done = done.len(),
                "compared with the daemon's dedup ledger: requests it has done are marked"
            );
            Some(Ledger { keys, done })
        }
        Err(StateError::Locked { .. }) => {
            tracing::warn!("the state file is in use by the running daemon: dry-run cannot tell which requests it has already done");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell which requests the daemon has already done");
            None
        }
    }
}

fn spawn_signal_handler(shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight actions and flushing checkpoints");
        shutdown.trigger();
    });
}

/// What is done with each shard's records: the pipeline (daemon, dry-run) or a capture.
pub trait ShardWork: Send + Sync + 'static {
    /// The shard's stored progress.
    fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError>;
    /// Reads and handles one shard until it ends, catches up (when the run ends there) or
    /// shutdown.
    fn run_shard(
        self: Arc<Self>,
        reader: ShardReader,
        shard_id: String,
        start: Position,
    ) -> impl Future<Output = Result<ShardExit, PipelineError>> + Send;
    fn shutdown(&self) -> &Shutdown;
    /// Whether the run ends once every shard has caught up (dry-run, capture).
    fn ends_when_caught_up(&self) -> bool;
}

/// Starts a worker for every ready shard, re-lists shards periodically, and waits for the
/// workers when shutdown comes.
pub async fn supervise<W: ShardWork>(
    settings: &StreamSettings,
    source: &Arc<KinesisSource>,
    work: &Arc<W>,
    telemetry: &Telemetry,
) -> Result<(), RunError> {
    let shutdown = work.shutdown().clone();
    let ends_when_caught_up = work.ends_when_caught_up();
    // The stream must be reachable at start: a wrong name or endpoint is reported at once.
    let mut shards = source.list_shards().await?;
    telemetry.set_stream_reachable(true);
    match source.retention().await {
        Ok(retention) => telemetry.set_retention(retention, settings.retention_margin),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the stream's retention; no retention alarm")
        }
    }
    tracing::info!(
        stream = source.stream(),
        shards = shards.len(),
        "stream reachable"
    );
    let mut started: HashSet<String> = HashSet::new();
    let at_start: HashSet<String> = shards.iter().map(|s| s.id.clone()).collect();
    let mut workers: JoinSet<(String, Result<ShardExit, PipelineError>)> = JoinSet::new();
    let mut outcome = Ok(());

    while !shutdown.is_triggered() {
        let mut state_error = None;
        let ready = ready_shards(
            &shards,
            &started,
            &at_start,
            |id| match work.checkpoint(id) {
                Ok(cp) => cp,
                Err(e) => {
                    state_error.get_or_insert(e);
                    None
                }
            },
            &settings.start,
        );
        if let Some(e) = state_error {
            outcome = Err(e.into());
            break;
        }
        telemetry.set_shards(shard_views(&shards, &started, &ready, |id| {
            work.checkpoint(id).ok().flatten()
        }));
        for (shard, position) in ready {
            tracing::info!(shard_id = %shard.id, %position, "starting shard");
            started.insert(shard.id.clone());
            let reader = ShardReader::new(
                source.clone(),
                shard.id.clone(),
                position.clone(),
                settings.poll_interval,
            );
            let work = work.clone();
            workers.spawn(async move {
                let result = work.run_shard(reader, shard.id.clone(), position).await;
                (shard.id, result)
            });
        }
        if ends_when_caught_up && workers.is_empty() {
            break;
        }

        let mut relist_now = false;
        tokio::select! {
            joined = workers.join_next(), if !workers.is_empty() => {
                match joined {
                    Some(Ok((shard_id, Ok(ShardExit::Finished)))) => {
                        tracing::debug!(%shard_id, "worker finished");
                        relist_now = true;
                    }
                    Some(Ok((_, Ok(_)))) => {}
                    Some(Ok((shard_id, Err(e)))) => {
                        tracing::error!(%shard_id, error = %e, "shard worker failed");
                        if ends_when_caught_up {
                            outcome = Err(e.into());
                            break;
                        }
                        // Retried at the next shard sync.
                        started.remove(&shard_id);
                    }
                    Some(Err(join_error)) => {
                        tracing::error!(error = %join_error, "shard worker panicked");
                        outcome = Err(RunError::WorkerPanicked(join_error.to_string()));
                        break;
                    }
                    None => {}
                }
            }
            _ = tokio::time::sleep(settings.shard_sync_interval) => relist_now = true,
            _ = shutdown.triggered() => break,
        }
        if relist_now {
            match source.list_shards().await {
                Ok(list) => {
                    shards = list;
                    telemetry.set_stream_reachable(true);
                }
                Err(e) => {
                    telemetry.set_stream_reachable(false);
                    tracing::warn!(error = %e, "cannot refresh the shard list; will retry");
                }
            }
        }
    }

    shutdown.trigger();
    while let Some(joined) = workers.join_next().await {
        if let Ok((shard_id, Err(e))) = joined {
            tracing::error!(%shard_id, error = %e, "shard worker failed while stopping");
        }
    }
    tracing::info!("stopped; checkpoints flushed");
    outcome
}

/// Each listed shard as `/status` shows it.
fn shard_views(
    shards: &[ShardInfo],
    started: &HashSet<String>,
    starting: &[(ShardInfo, Position)],
    checkpoint: impl Fn(&str) -> Option<Checkpoint>,
) -> Vec<ShardView> {
    shards
        .iter()
        .map(|shard| {
            let own = checkpoint(&shard.id);
            let state = if own.as_ref().is_some_and(|c| c.shard_end) {
                "finished"
            } else if started.contains(&shard.id) || starting.iter().any(|(s, _)| s.id == shard.id)
            {
                "reading"
            } else if !shard.parents.is_empty() {
                "waiting_for_parent"
            } else {
                "not_started"
            };
            ShardView {
                shard_id: shard.id.clone(),
                state,
                checkpoint: own.and_then(|c| c.sequence_number),
                millis_behind_latest: None,
            }
        })
        .collect()
}

impl ShardWork for Pipeline {
    fn checkpoint(&self, shard_id: &str) -> Result<Option<Checkpoint>, StateError> {
        Pipeline::checkpoint(self, shard_id)
    }

    async fn run_shard(
        self: Arc<Self>,
        reader: ShardReader,
        shard_id: String,
        start: Position,
    ) -> Result<ShardExit, PipelineError> {
        Pipeline::run_shard(&self, reader, &shard_id, start).await
    }

    fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    fn ends_when_caught_up(&self) -> bool {
        matches!(&self.sink, Sink::Preview(preview) if !preview.follow())
    }
}
