//! `run`: sets up every stage, then supervises one worker per shard until shutdown (or, in
//! dry-run, until every shard has caught up).
//!
//! The supervisor re-lists shards periodically and right after a shard ends, and starts a
//! child only when all its parents are finished.

use std::collections::HashSet;
use std::sync::Arc;

use std::collections::BTreeSet;
use std::path::PathBuf;

use tokio::task::JoinSet;

use crate::actions::{ActionError, ActionSet};
use crate::config::{ConfigError, Settings};
use crate::keys::{KeyError, Keys};
use crate::pipeline::{Pipeline, PipelineError, ShardExit, Sink};
use crate::preview::{OutputFormat, Preview};
use crate::rules::reload::{self, load_tested, LoadFailure, Rules};
use crate::shutdown::Shutdown;
use crate::source::{ready_shards, KinesisSource, ShardReader, SourceError};
use crate::state::{State, StateError};

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

/// Runs the daemon (or the dry-run) to the end.
pub async fn run(settings: Settings, dry_run: Option<DryRun>) -> Result<(), RunError> {
    let action_names: BTreeSet<String> = settings.actions.keys().cloned().collect();
    let rules = load_tested(&settings.rules_dir, &action_names)
        .map_err(|failure| RunError::Rules(settings.rules_dir.clone(), failure))?;
    tracing::info!(
        rules = rules.rules().len(),
        hash = rules.hash(),
        "rules loaded"
    );
    let actions = ActionSet::new(&settings.actions, dry_run.is_none())?;
    let sink = match &dry_run {
        Some(options) => Sink::Preview(Preview::new(
            options.format,
            options.follow,
            rules.rules().iter().map(|r| r.name.clone()),
        )),
        None => {
            // Lock the state before anything else can start.
            let state = State::open(&settings.state_path)?;
            let keys = Keys::load_or_create(settings.key_env.as_deref(), &settings.key_file)?;
            Sink::Live {
                state: Arc::new(state),
                keys,
            }
        }
    };
    let source = Arc::new(KinesisSource::connect(&settings.stream).await);
    let shutdown = Shutdown::new();
    spawn_signal_handler(shutdown.clone());

    let rules = Arc::new(Rules::new(rules, settings.rules_dir.clone(), action_names));
    if dry_run.is_none() {
        let (rules, shutdown) = (rules.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = reload::watch(rules, shutdown).await {
                tracing::error!(error = %e, "cannot watch the rules directory; hot reload is off");
            }
        });
    }
    let pipeline = Arc::new(Pipeline {
        stream: settings.stream.name.clone(),
        rules,
        actions,
        sink,
        shutdown: shutdown.clone(),
    });
    let result = supervise(&settings, &source, &pipeline, dry_run.is_some()).await;
    if let Sink::Preview(preview) = &pipeline.sink {
        preview.finish();
    }
    result
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

/// Starts a worker for every ready shard, re-lists shards periodically, and waits for the
/// workers when shutdown comes.
async fn supervise(
    settings: &Settings,
    source: &Arc<KinesisSource>,
    pipeline: &Arc<Pipeline>,
    dry_run: bool,
) -> Result<(), RunError> {
    let shutdown = pipeline.shutdown.clone();
    // The stream must be reachable at start: a wrong name or endpoint is reported at once.
    let mut shards = source.list_shards().await?;
    tracing::info!(
        stream = source.stream(),
        shards = shards.len(),
        "stream reachable"
    );
    let mut started: HashSet<String> = HashSet::new();
    let mut workers: JoinSet<(String, Result<ShardExit, PipelineError>)> = JoinSet::new();
    let mut outcome = Ok(());

    while !shutdown.is_triggered() {
        let mut state_error = None;
        let ready = ready_shards(
            &shards,
            &started,
            |id| match pipeline.checkpoint(id) {
                Ok(cp) => cp,
                Err(e) => {
                    state_error.get_or_insert(e);
                    None
                }
            },
            &settings.stream.start,
        );
        if let Some(e) = state_error {
            outcome = Err(e.into());
            break;
        }
        for (shard, position) in ready {
            tracing::info!(shard_id = %shard.id, %position, "starting shard");
            started.insert(shard.id.clone());
            let reader = ShardReader::new(
                source.clone(),
                shard.id.clone(),
                position.clone(),
                settings.stream.poll_interval,
            );
            let pipeline = pipeline.clone();
            workers.spawn(async move {
                let result = pipeline.run_shard(reader, &shard.id, position).await;
                (shard.id, result)
            });
        }
        if dry_run && workers.is_empty() {
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
                        if dry_run {
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
            _ = tokio::time::sleep(settings.stream.shard_sync_interval) => relist_now = true,
            _ = shutdown.triggered() => break,
        }
        if relist_now {
            match source.list_shards().await {
                Ok(list) => shards = list,
                Err(e) => tracing::warn!(error = %e, "cannot refresh the shard list; will retry"),
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
