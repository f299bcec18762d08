//! `run`: sets up every stage (rules, actions, the state and its key, the listener), runs
//! the [`crate::supervisor`] until shutdown (or, in dry-run, until every shard has caught
//! up) beside the housekeeping (dead-letter retries, ledger expiry), then drains. Also the
//! other commands that need the whole pipeline: `dead-letters retry` and `capture`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::actions::{ActionError, ActionSet};
use crate::capture::Capture;
use crate::clock::now_ms;
use crate::config::{ConfigError, Settings, StreamSettings};
use crate::console;
use crate::control;
use crate::fleet::coordinator::Coordinator;
use crate::fleet::lease::{LeaseError, LeaseTable};
use crate::fleet::share::{initial_sentinel, open_for_command, LeaseCheckpoints, WorkerLeases};
use crate::keys::{KeyError, KeySource};
use crate::pipeline::{Pipeline, PipelineError, Retried, Sink};
use crate::preview::{Done, Ledger, OutputFormat, Preview};
use crate::rules::reload::{self, load_tested, LoadFailure, Rules, Sendable};
use crate::rules::Decision;
use crate::shutdown::Shutdown;
use crate::source::{Checkpoint, KinesisSource, Position, ReadMode, ShardReader};
use crate::state::shared::{dynamodb_client, SharedSettings};
use crate::state::{
    Access, DeadLetterReason, LocalState, SharedState, State, StateError, DEAD_LETTER_PAGE,
};
use crate::supervisor::{self, ShardExit, ShardWork, SupervisorError};
use crate::telemetry::{self, Served, Telemetry};

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
    State(#[from] StateError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("cannot listen on {listen} ([metrics] listen)")]
    Listen {
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for {0}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("cannot write to stdout")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Leases(#[from] LeaseError),
    #[error("{0}")]
    TablesMissing(String),
}

impl RunError {
    /// 2 for what the user must fix in the config, its environment or the rules before
    /// starting; 1 otherwise (a damaged or foreign state included: restore it).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Rules(..) => 2,
            // A fleet's table missing: created by the operator, or by `create_tables`.
            RunError::Leases(LeaseError::MissingTable { .. })
            | RunError::State(StateError::SharedMissing { .. })
            | RunError::TablesMissing(_) => 2,
            RunError::Console(e) if e.is_usage() => 2,
            RunError::State(StateError::Key(
                KeyError::MissingEnv { .. } | KeyError::BadEnv { .. },
            )) => 2,
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
pub async fn run(
    settings: Settings,
    dry_run: Option<DryRun>,
    control: Option<control::Handler>,
) -> Result<(), RunError> {
    // First of all: a SIGHUP (a reload asked too early, or sent to a dry-run) must never
    // kill the process. Once a handler is installed, it stays for the process's life.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| RunError::Signal("SIGHUP", e))?;
    let action_names: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let sendable = sendable(&settings)?;
    let rules = load_tested(&settings.rules_dir, &action_names, &*sendable)
        .map_err(|failure| RunError::Rules(settings.rules_dir.clone(), failure))?;
    // A console without its token is refused before anything starts.
    let console_token = match (&settings.console, &dry_run) {
        (Some(console), None) => Some(console::token(console)?),
        _ => None,
    };
    tracing::info!(
        rules = rules.rules().len(),
        hash = rules.hash(),
        "rules loaded"
    );
    // From here on a SIGINT or SIGTERM is a clean stop, even while the stream does not
    // answer yet.
    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone());
    let telemetry = Arc::new(Telemetry::new());
    let actions = ActionSet::new(&settings.actions, dry_run.is_none())?.observed(telemetry.clone());
    let rule_names: Vec<String> = rules.rules().iter().map(|r| r.name.clone()).collect();
    let rules = Arc::new(Rules::new(
        rules,
        settings.rules_dir.clone(),
        action_names,
        sendable,
    ));
    // A preview never takes the fan-out consumer's subscriptions from the daemon.
    let mut settings = settings;
    if dry_run.is_some() {
        settings.stream.read = ReadMode::Polling;
    }
    let source = connect(&settings.stream, &telemetry).await;
    let mut listener = None;
    let mut served = None;
    let mut fleet_worker: Option<FleetWorker> = None;
    let sink = match &dry_run {
        Some(options) => Sink::Preview(Box::new(Preview::new(
            options.format,
            options.follow,
            read_ledger(&settings),
            rule_names,
        ))),
        None => {
            check_ledger_retention(&source, &settings).await?;
            // Lock the state before anything else can start, the listener included.
            let (state, keys) = match &settings.fleet {
                None => {
                    let (state, keys) =
                        LocalState::open(&settings.state_path, key_source(&settings), Access::Run)?;
                    (State::local(state), keys)
                }
                Some(fleet) => {
                    let (state, keys, worker) = join_fleet(fleet, &settings, &telemetry).await?;
                    fleet_worker = Some(worker);
                    (State::Shared(state), keys)
                }
            };
            let state = Arc::new(state);
            let status = Arc::new(Served {
                telemetry: telemetry.clone(),
                rules: rules.clone(),
                state: state.clone(),
                source: source.clone(),
            });
            if let Some(listen) = settings.metrics_listen {
                listener = Some(
                    telemetry::serve(listen, status.clone(), shutdown.clone())
                        .await
                        .map_err(|source| RunError::Listen { listen, source })?,
                );
            }
            served = Some(status);
            Sink::Live { state, keys }
        }
    };

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
        release_lock: Default::default(),
        letters_in_retry: Default::default(),
    });
    // Commands run while the daemon holds the state are served by it, and by its console.
    let mut channel = None;
    let mut console = None;
    let console_commands = tokio_util::task::TaskTracker::new();
    if let (Some(handler), Sink::Live { .. }) = (control, &pipeline.sink) {
        // A fleet's commands go to the shared tables themselves: no local channel.
        if fleet_worker.is_none() {
            channel = Some(
                control::serve(
                    &settings.state_path,
                    pipeline.clone(),
                    handler.clone(),
                    shutdown.clone(),
                )
                .await?,
            );
        }
        if let (Some(settings), Some(token), Some(served)) =
            (&settings.console, console_token, served)
        {
            console = Some(
                console::serve(
                    settings,
                    token,
                    served,
                    pipeline.clone(),
                    (handler, console_commands.clone()),
                    shutdown.clone(),
                )
                .await?,
            );
        }
    }
    let housekeeping = match &pipeline.sink {
        Sink::Live { .. } => Some(tokio::spawn(maintain(
            pipeline.clone(),
            settings.dead_letter_retry_interval,
            settings.ledger_retention,
        ))),
        Sink::Preview(_) => None,
    };
    let jobs = match &pipeline.sink {
        Sink::Live { .. } => Some(tokio::spawn(follow_jobs(
            pipeline.clone(),
            pipeline.job_round(),
        ))),
        Sink::Preview(_) => None,
    };
    let progress = match &pipeline.sink {
        Sink::Preview(_) if std::io::stderr().is_terminal() => {
            Some(spawn_progress(pipeline.clone(), shutdown.clone()))
        }
        _ => None,
    };
    let beating = fleet_worker
        .as_ref()
        .map(|worker| worker.start(&pipeline, &shutdown));
    let result = supervisor::supervise(
        &settings.stream,
        &source,
        &pipeline,
        &telemetry,
        fleet_worker
            .as_ref()
            .map(|w| &w.leases as &dyn supervisor::Leases),
    )
    .await;
    // The drain: a dead letter being retried finishes (or is left as it was) like the
    // shards' requests.
    shutdown.trigger();
    if let Some(housekeeping) = housekeeping {
        if let Err(e) = housekeeping.await {
            tracing::error!(error = %e, "dead letter retries panicked");
        }
    }
    if let Some(jobs) = jobs {
        if let Err(e) = jobs.await {
            tracing::error!(error = %e, "job polling panicked");
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
    }
    // The control channel stops taking commands and removes its socket.
    if let Some(channel) = channel {
        let _ = channel.await;
    }
    // A client that keeps its connection open does not hold the stop up for long.
    for mut listener in listener.into_iter().chain(console) {
        if tokio::time::timeout(Duration::from_secs(2), &mut listener)
            .await
            .is_err()
        {
            listener.abort();
            let _ = listener.await;
        }
    }
    // Commands the console started finish, as the control channel's do.
    console_commands.close();
    console_commands.wait().await;
    // Every shard checkpointed: the leases go to the other workers at once.
    if let (Some(worker), Some(beating)) = (&fleet_worker, beating) {
        worker.hand_off(&pipeline, beating).await;
    }
    let finished = match &pipeline.sink {
        Sink::Preview(preview) => preview.finish().map_err(RunError::Output),
        Sink::Live { .. } => Ok(()),
    };
    let live = matches!(pipeline.sink, Sink::Live { .. });
    // Said only when true: a state that could not be written at the end kept the
    // checkpoints where they were (their records are read again, and found done).
    let unwritten = pipeline.telemetry.state_fault();
    // The last holder of the state: the file is closed and its lock let go here, so a
    // command run right after the daemon said it stopped finds it free.
    drop(pipeline);
    match (live, unwritten) {
        (true, None) => tracing::info!("stopped; checkpoints flushed"),
        (true, Some(error)) => tracing::warn!(
            %error,
            "stopped; the last checkpoints could not be written (the state is not writable): their records are read again at the next start, and found done"
        ),
        (false, _) => {}
    }
    drop(hangup);
    result?;
    finished
}

/// A fleet's worker: its leases, their coordinator's loop, and its heartbeat.
struct FleetWorker {
    coordinator: Arc<Coordinator>,
    leases: WorkerLeases,
    /// The heartbeat's own stop: it beats until the leases are handed off.
    stop: Shutdown,
    lease_duration: Duration,
}

/// Joins the fleet: the lease table (created when asked), the shared state, and this
/// worker's coordinator.
async fn join_fleet(
    fleet: &SharedSettings,
    settings: &Settings,
    telemetry: &Arc<Telemetry>,
) -> Result<(SharedState, crate::keys::Keys, FleetWorker), RunError> {
    let table = LeaseTable::new(dynamodb_client(fleet).await, fleet.lease_table.clone());
    let lease_table_missing = match table.ensure(fleet.create_tables).await {
        Err(e @ LeaseError::MissingTable { .. }) => Some(e),
        other => {
            other?;
            None
        }
    };
    let coordinator = Arc::new(Coordinator::new(
        table,
        fleet.worker_id.clone(),
        fleet.lease_duration,
        telemetry.clone(),
    ));
    let lease_table = fleet.lease_table.clone();
    let writer = coordinator.clone();
    let opened = SharedState::open(fleet, key_source(settings), move |client| {
        Arc::new(LeaseCheckpoints {
            table: LeaseTable::new(client, lease_table),
            coordinator: Some(writer),
        })
    });
    // Both tables missing: both named at once.
    let (state, keys) = match (opened, lease_table_missing) {
        (Err(state @ StateError::SharedMissing { .. }), Some(leases)) => {
            return Err(RunError::TablesMissing(format!("{leases}\n{state}")))
        }
        (_, Some(leases)) => return Err(leases.into()),
        (opened, None) => opened?,
    };
    if state.id_in_use()? {
        tracing::warn!(
            worker_id = %fleet.worker_id,
            "a worker with this worker_id beat moments ago: if it still runs (not a restart after a kill), stop one of them; two workers under one id take leases from each other"
        );
    }
    tracing::info!(
        worker_id = %fleet.worker_id,
        lease_table = %fleet.lease_table,
        state_table = %fleet.state_table,
        "joined the fleet"
    );
    let leases = WorkerLeases {
        owned: tokio::sync::Mutex::new(coordinator.owned()),
        coordinator: coordinator.clone(),
        initial: initial_sentinel(&settings.stream.start),
    };
    Ok((
        state,
        keys,
        FleetWorker {
            coordinator,
            leases,
            stop: Shutdown::new(),
            lease_duration: fleet.lease_duration,
        },
    ))
}

impl FleetWorker {
    /// Starts the coordinator's loop (it takes no lease after `shutdown`, and renews those
    /// it holds until they are handed off) and the heartbeat, every third of a lease
    /// duration: this worker's claims live as long as it beats.
    fn start(
        &self,
        pipeline: &Arc<Pipeline>,
        shutdown: &Shutdown,
    ) -> [tokio::task::JoinHandle<()>; 2] {
        let coordinator = self.coordinator.clone();
        let leases = tokio::spawn(coordinator.clone().run(shutdown.clone()));
        let (pipeline, stop) = (pipeline.clone(), self.stop.clone());
        let period = self.lease_duration / 3;
        let beating = tokio::spawn(async move {
            let Sink::Live { state, .. } = &pipeline.sink else {
                return;
            };
            let State::Shared(shared) = &**state else {
                return;
            };
            let mut releasing: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                let hash = pipeline.rules.load().hash().to_owned();
                let held = coordinator.owned().borrow().len() as u64;
                if let Err(e) = shared.heartbeat(hash, held, false).await {
                    pipeline.telemetry.state_write(Some(&e));
                }
                pipeline.telemetry.refresh_state(state);
                // Held requests no pause holds back (an action resumed, a legal hold
                // released or a request denied from another host) are settled now, not at
                // the next scheduled retry — beside the heartbeat, never in its way (a
                // worker that stops beating while it sends has its claims taken over).
                // Those still on legal hold are passed over by the release.
                let releasable = match (state.held_counts(), state.pauses()) {
                    (Ok(held), Ok(pauses)) => held.keys().any(|action| {
                        !pauses
                            .iter()
                            .any(|(a, p)| a == action && p.resuming_since_ms.is_none())
                    }),
                    _ => false,
                } || state
                    .held_counts_by(true)
                    .is_ok_and(|legal| !legal.is_empty());
                let idle = releasing.as_ref().is_none_or(|task| task.is_finished());
                if releasable && idle && !pipeline.shutdown.is_triggered() {
                    let pipeline = pipeline.clone();
                    releasing = Some(tokio::spawn(async move {
                        if let Err(e) = pipeline.release_held().await {
                            tracing::error!(error = %telemetry::chain(&e), "cannot send held requests");
                        }
                    }));
                }
                if stop.sleep(period).await.is_err() {
                    if let Some(task) = releasing {
                        let _ = task.await;
                    }
                    return;
                }
            }
        });
        [leases, beating]
    }

    /// SIGTERM's last step: the shards have checkpointed; the leases are released for the
    /// other workers to take at once, and the heartbeat says this worker stopped.
    async fn hand_off(&self, pipeline: &Arc<Pipeline>, tasks: [tokio::task::JoinHandle<()>; 2]) {
        // Bounded: a table that does not answer within a lease duration lets the leases
        // expire instead, and the others take them then.
        let patience = self.lease_duration;
        match tokio::time::timeout(patience, self.coordinator.release_all()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %telemetry::chain(&e), "cannot release every lease; the others take them when they expire")
            }
            Err(_) => tracing::warn!(
                "the lease table did not answer in time; the others take the leases when they expire"
            ),
        }
        self.stop.trigger();
        for mut task in tasks {
            if tokio::time::timeout(patience, &mut task).await.is_err() {
                task.abort();
            }
        }
        if let Sink::Live { state, .. } = &pipeline.sink {
            if let State::Shared(shared) = &**state {
                let hash = pipeline.rules.load().hash().to_owned();
                let said = tokio::time::timeout(patience, shared.heartbeat(hash, 0, true)).await;
                if !matches!(said, Ok(Ok(()))) {
                    tracing::warn!(
                        "cannot say this worker stopped; the others see it stopped beating"
                    );
                }
            }
        }
    }
}

/// The stream, its retried calls reported to `telemetry`.
async fn connect(stream: &StreamSettings, telemetry: &Arc<Telemetry>) -> Arc<KinesisSource> {
    let telemetry = telemetry.clone();
    let hook = move |call: &str, error: &str| telemetry.kinesis_retry(call, error);
    Arc::new(
        KinesisSource::connect(stream)
            .await
            .observed(Box::new(hook)),
    )
}

fn key_source(settings: &Settings) -> KeySource<'_> {
    KeySource {
        env: settings.key_env.as_deref(),
        file: &settings.key_file,
    }
}

/// A ledger that forgets requests before the stream forgets their records would let a
/// replay send them again: refused at start (when the retention can be read).
async fn check_ledger_retention(
    source: &KinesisSource,
    settings: &Settings,
) -> Result<(), RunError> {
    match source.retention().await {
        Ok(retention) if settings.ledger_retention < retention => {
            Err(RunError::Config(ConfigError::Invalid(format!(
                "[state] ledger_retention_days = {} is shorter than the stream's retention ({} days): a replay could send requests again; make it at least {}",
                settings.ledger_retention.as_secs() / 86_400,
                retention.as_secs_f64() / 86_400.0,
                retention.as_secs().div_ceil(86_400),
            ))))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the stream's retention (kinesis:DescribeStreamSummary); ledger retention not checked, no retention alarm");
            Ok(())
        }
    }
}

/// Polls the backend's jobs until shutdown: every `round` (the shortest poll interval),
/// the jobs whose own interval is up are asked, each in its own task; a poll still under
/// way is not started twice. At shutdown the polls under way end (cut short: asked again
/// after the restart).
async fn follow_jobs(pipeline: Arc<Pipeline>, round: Duration) {
    let mut polls = tokio::task::JoinSet::new();
    let mut in_poll = std::collections::HashSet::new();
    loop {
        while let Some(joined) = polls.try_join_next() {
            poll_ended(joined, &mut in_poll);
        }
        if let Err(e) = pipeline.start_due_polls(&mut polls, &mut in_poll) {
            tracing::error!(error = %telemetry::chain(&e), "cannot poll jobs");
        }
        if pipeline.shutdown.sleep(round).await.is_err() {
            while let Some(joined) = polls.join_next().await {
                poll_ended(joined, &mut in_poll);
            }
            return;
        }
    }
}

/// A job's poll ended: said when the job finished or the poll failed.
fn poll_ended(
    joined: Result<(u64, Result<bool, PipelineError>), tokio::task::JoinError>,
    in_poll: &mut std::collections::HashSet<u64>,
) {
    let (id, polled) = joined.expect("a job's poll does not panic");
    in_poll.remove(&id);
    match polled {
        Ok(false) => {}
        Ok(true) => tracing::info!(job = id, "job finished"),
        Err(e) => tracing::error!(job = id, error = %telemetry::chain(&e), "cannot poll a job"),
    }
}

/// The daemon's housekeeping until shutdown: retries dead letters that a backend fault left
/// (refusals wait for an operator), a page at a time, and forgets ledger entries older than
/// the retention.
async fn maintain(pipeline: Arc<Pipeline>, retry_every: Duration, ledger_retention: Duration) {
    let Sink::Live { state, .. } = &pipeline.sink else {
        return;
    };
    let mut last_expiry: Option<std::time::Instant> = None;
    // At start too: requests held while the daemon was stopped and their action resumed.
    loop {
        match pipeline.release_held().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sent = n, "held requests of resumed actions settled"),
            Err(e) => {
                tracing::error!(error = %telemetry::chain(&e), "cannot send held requests")
            }
        }
        if last_expiry.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
            let before = now_ms().saturating_sub(ledger_retention.as_millis() as u64);
            match state.expire_done(before) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    expired = n,
                    "ledger entries older than the retention forgotten"
                ),
                Err(e) => pipeline.telemetry.state_write(Some(&e)),
            }
            last_expiry = Some(std::time::Instant::now());
        }
        let mut after = 0;
        loop {
            let page = match state.dead_letters_after(after, DEAD_LETTER_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %telemetry::chain(&e), "cannot read dead letters");
                    break;
                }
            };
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (id, letter) in page {
                let retryable = matches!(
                    letter.reason,
                    DeadLetterReason::ActionFailed {
                        retryable: true,
                        ..
                    }
                );
                let DeadLetterReason::ActionFailed { action, .. } = &letter.reason else {
                    continue;
                };
                // A paused action's letters wait for its resume like its new requests.
                if !retryable || state.pause(action).ok().flatten().is_some() {
                    continue;
                }
                match pipeline.retry_dead_letter(id, letter, None).await {
                    Ok(Retried::Resolved) => {
                        tracing::info!(
                            event = "dead_letter_resolved",
                            dead_letter = id,
                            "dead letter retried: done"
                        )
                    }
                    Ok(Retried::StillFailing(error)) => {
                        tracing::warn!(event = "dead_letter_still_failing", dead_letter = id, %error, "dead letter retried: still failing")
                    }
                    Ok(Retried::Interrupted) => return,
                    Err(e) => {
                        tracing::error!(dead_letter = id, error = %telemetry::chain(&e), "cannot retry a dead letter")
                    }
                }
                if pipeline.shutdown.is_triggered() {
                    return;
                }
            }
        }
        if pipeline.shutdown.sleep(retry_every).await.is_err() {
            return;
        }
    }
}

/// `dead-letters retry`: retries the given dead letters (or all) now, with the current
/// rules and config, the daemon stopped. Returns what became of each.
pub async fn retry_dead_letters(
    settings: Settings,
    ids: Option<Vec<u64>>,
    by: &str,
) -> Result<Vec<(u64, Retried)>, RunError> {
    let action_names: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let sendable = sendable(&settings)?;
    let rules = load_tested(&settings.rules_dir, &action_names, &*sendable)
        .map_err(|failure| RunError::Rules(settings.rules_dir.clone(), failure))?;
    let telemetry = Arc::new(Telemetry::new());
    let actions = ActionSet::new(&settings.actions, true)?.observed(telemetry.clone());
    let (state, keys) = open_for_command(
        &settings.state_path,
        key_source(&settings),
        settings.fleet.as_ref(),
        Access::Write,
    )?;
    let state = Arc::new(state);
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
        telemetry,
        claims: Default::default(),
        release_lock: Default::default(),
        letters_in_retry: Default::default(),
    };
    // In a fleet, this command's claims live while it beats, as a worker's do.
    let beating = match (&*state, &settings.fleet) {
        (State::Shared(_), Some(fleet)) => {
            let (state, period) = (state.clone(), fleet.lease_duration / 3);
            Some(tokio::spawn(async move {
                let State::Shared(shared) = &*state else {
                    return;
                };
                loop {
                    let _ = shared.heartbeat(String::new(), 0, false).await;
                    tokio::time::sleep(period).await;
                }
            }))
        }
        _ => None,
    };
    let retried = retry_letters(&pipeline, ids, by).await;
    if let (Some(beating), State::Shared(shared)) = (beating, &*state) {
        beating.abort();
        let _ = shared.heartbeat(String::new(), 0, true).await;
    }
    retried
}

/// Retries the given dead letters (or all) through `pipeline`: a command's own, or the
/// running daemon's (its action limits then hold for the retries too).
pub async fn retry_letters(
    pipeline: &Pipeline,
    ids: Option<Vec<u64>>,
    by: &str,
) -> Result<Vec<(u64, Retried)>, RunError> {
    let Sink::Live { state, .. } = &pipeline.sink else {
        return Ok(Vec::new());
    };
    // An id that is not a letter is refused before anything is sent (and a state that
    // cannot be read says so, rather than that the letter is missing).
    for id in ids.iter().flatten() {
        state.dead_letter(*id)?;
    }
    let mut results = Vec::new();
    let mut after = 0;
    'pages: loop {
        let page = state.dead_letters_after(after, DEAD_LETTER_PAGE)?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (id, letter) in page {
            if ids.as_ref().is_some_and(|ids| !ids.contains(&id)) {
                continue;
            }
            let outcome = pipeline.retry_dead_letter(id, letter, Some(by)).await?;
            let stop = outcome == Retried::Interrupted;
            results.push((id, outcome));
            if stop {
                break 'pages;
            }
        }
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
    let telemetry = Arc::new(Telemetry::new());
    // A capture never takes the fan-out consumer's subscriptions from the daemon.
    let stream = &StreamSettings {
        read: ReadMode::Polling,
        ..stream.clone()
    };
    let source = connect(stream, &telemetry).await;
    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone());
    let capture = Arc::new(Capture::new(stream.name.clone(), out, limit, shutdown));
    supervisor::supervise(stream, &source, &capture, &telemetry, None).await?;
    tracing::info!(records = capture.written(), "capture done");
    let capture = Arc::into_inner(capture).expect("every worker has ended");
    Ok(capture.into_inner())
}

/// The daemon's dedup ledger, for dry-run to mark requests already done. Never creates,
/// locks for long, or writes anything; says why when it cannot.
fn read_ledger(settings: &Settings) -> Option<Ledger> {
    if settings.fleet.is_none() && !settings.state_path.exists() {
        tracing::info!("no state file yet: no request is marked as already done");
        return None;
    }
    let opened = open_for_command(
        &settings.state_path,
        key_source(settings),
        settings.fleet.as_ref(),
        Access::Peek,
    )
    .and_then(|(state, keys)| Ok((state.done_set()?, keys)));
    match opened {
        Ok((done, keys)) => {
            tracing::info!(
                done = done.len(),
                "compared with the daemon's dedup ledger: requests it has done are marked"
            );
            Some(Ledger {
                keys,
                done: Done::Read(done),
            })
        }
        Err(StateError::Locked { .. }) => ask_the_daemon(settings),
        Err(e) => {
            tracing::warn!(error = %telemetry::chain(&e), "cannot tell which requests the daemon has already done");
            None
        }
    }
}

/// The running daemon holds the state: each would-be request is looked up by asking it
/// over its control channel (by keyed hashes: the key ring is read here, never the key).
fn ask_the_daemon(settings: &Settings) -> Option<Ledger> {
    let keys = match crate::keys::Keys::load(key_source(settings)) {
        Ok(Some(keys)) => keys,
        _ => {
            tracing::warn!("the daemon holds the state and its key cannot be read here: dry-run cannot tell which requests it has already done");
            return None;
        }
    };
    let path = settings.state_path.clone();
    let ask = move |ids: &[[u8; 32]]| {
        let stream = control::connect(&path)?;
        let mut argv = vec![
            "audit".to_owned(),
            "done".to_owned(),
            "--state".to_owned(),
            path.display().to_string(),
            "--ids".to_owned(),
        ];
        argv.extend(ids.iter().map(hex::encode));
        let mut answer = Vec::new();
        match control::run_remote(stream, &path, argv, &mut answer) {
            Ok(0) => Some(answer.starts_with(b"true")),
            _ => None,
        }
    };
    tracing::info!("the daemon holds the state: requests are looked up in its ledger as they come");
    Some(Ledger {
        keys,
        done: Done::Ask(Box::new(ask)),
    })
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

impl ShardWork for Pipeline {
    fn checkpoints(&self) -> Result<std::collections::HashMap<String, Checkpoint>, StateError> {
        Pipeline::checkpoints(self)
    }

    async fn run_shard(
        self: Arc<Self>,
        reader: ShardReader,
        shard_id: String,
        start: Position,
        stop: Shutdown,
    ) -> Result<ShardExit, PipelineError> {
        Pipeline::run_shard(&self, reader, &shard_id, start, stop).await
    }

    fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    fn ends_when_caught_up(&self) -> bool {
        matches!(&self.sink, Sink::Preview(preview) if !preview.follow())
    }
}
