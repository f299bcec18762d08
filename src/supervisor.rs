//! The supervisor: one worker per shard, started when the shard is ready (every parent
//! finished), restarted with capped exponential backoff when it fails, stopped on shutdown.
//!
//! Shared by the daemon (and its dry-run) and `capture`: what a worker does with its
//! shard's records is a [`ShardWork`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::pipeline::PipelineError;
use crate::shutdown::Shutdown;
use crate::source::{
    ready_shards, Checkpoint, KinesisSource, Position, ReadMode, ShardInfo, ShardReader,
    SourceError, StreamSettings,
};
use crate::state::StateError;
use crate::telemetry::{ShardView, Telemetry};

/// First pause before a failed shard worker is started again; it doubles with each failure
/// in a row, up to [`MAX_RESTART_DELAY`].
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A worker that ran this long before failing starts its backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot read the checkpoints")]
    Checkpoints(#[source] StateError),
    #[error("shard {shard_id}")]
    Worker {
        shard_id: String,
        #[source]
        source: Box<PipelineError>,
    },
    #[error("a shard worker panicked: {0}")]
    Panicked(String),
}

/// How a shard's worker ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ShardExit {
    /// Read to its end and checkpointed as finished: its children may start.
    Finished,
    /// Caught up with the stream (dry-run ends a shard here unless it follows).
    CaughtUp,
    /// Shutdown: everything settled is checkpointed.
    Stopped,
}

/// What is done with each shard's records: the pipeline (daemon, dry-run) or a capture.
pub trait ShardWork: Send + Sync + 'static {
    /// Every shard's stored progress.
    fn checkpoints(&self) -> Result<HashMap<String, Checkpoint>, StateError>;
    /// Reads and handles one shard until it ends, catches up (when the run ends there) or
    /// shutdown.
    fn run_shard(
        self: Arc<Self>,
        reader: ShardReader,
        shard_id: String,
        start: Position,
        stop: Shutdown,
    ) -> impl Future<Output = Result<ShardExit, PipelineError>> + Send;
    fn shutdown(&self) -> &Shutdown;
    /// Whether the run ends once every shard has caught up (dry-run, capture): then a
    /// failing worker ends the run instead of being restarted.
    fn ends_when_caught_up(&self) -> bool;
}

/// A fleet worker's share of the stream, its leases: the supervisor reads only these shards,
/// and stops a shard's worker when its lease goes to another worker.
pub trait Leases: Send + Sync + 'static {
    /// The shards whose leases this worker holds now.
    fn held(&self) -> HashSet<String>;
    /// Resolves when the held shards may have changed.
    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Brings the lease table in line with the stream's shards (new shards get a lease,
    /// finished ones whose children finished are cleaned up).
    fn sync<'a>(&'a self, shards: &'a [ShardInfo])
        -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// A shard whose worker failed: when it may start again, and how many failures in a row.
struct Failing {
    restart_at: Instant,
    failures: u32,
    /// Whether its worker is yet to be started again (once started, the count stays for
    /// the backoff should it fail again soon).
    waiting: bool,
}

/// Starts a worker for every ready shard, re-lists shards periodically, restarts failed
/// workers with backoff, and waits for the workers when shutdown comes.
pub async fn supervise<W: ShardWork>(
    settings: &StreamSettings,
    source: &Arc<KinesisSource>,
    work: &Arc<W>,
    telemetry: &Telemetry,
    leases: Option<&dyn Leases>,
) -> Result<(), SupervisorError> {
    let shutdown = work.shutdown().clone();
    let ends_when_caught_up = work.ends_when_caught_up();
    // The stream must be reachable at start: a wrong name or endpoint is reported at once.
    let mut shards = tokio::select! {
        listed = source.list_shards() => listed?,
        // A stop while the stream does not answer yet: nothing has started.
        _ = shutdown.triggered() => return Ok(()),
    };
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
    if source.read_mode() == ReadMode::FanOut {
        // Every subscription needs the consumer: registered (when missing) before any.
        if source.ensure_consumer(&shutdown).await?.is_none() {
            return Ok(());
        }
    }
    if let Some(leases) = leases {
        leases.sync(&shards).await;
    }
    let mut started: HashSet<String> = HashSet::new();
    // Each running worker's own stop (a fleet's worker stops alone when its lease is lost).
    let mut stops: HashMap<String, Shutdown> = HashMap::new();
    let at_start: HashSet<String> = shards.iter().map(|s| s.id.clone()).collect();
    let mut workers: JoinSet<(String, Result<ShardExit, PipelineError>)> = JoinSet::new();
    let mut began: HashMap<String, Instant> = HashMap::new();
    let mut failing: HashMap<String, Failing> = HashMap::new();
    let mut outcome = Ok(());

    while !shutdown.is_triggered() {
        // Failed workers whose pause is over may start again.
        let now = Instant::now();
        for (shard_id, f) in failing.iter_mut() {
            if f.waiting && f.restart_at <= now {
                started.remove(shard_id);
                f.waiting = false;
                telemetry.shard_recovered(shard_id);
            }
        }
        // Every shard's progress, read once a round (in a fleet, one scan of the lease
        // table, not a read per shard).
        let (checkpoints, state_error) = match work.checkpoints() {
            Ok(checkpoints) => (checkpoints, None),
            Err(e) => (HashMap::new(), Some(e)),
        };
        let ready = ready_shards(
            &shards,
            &started,
            &at_start,
            |id| checkpoints.get(id).cloned(),
            &settings.start,
        );
        // A fleet's worker reads the shards it holds, and stops those it no longer holds.
        let held = leases.map(|l| l.held());
        if let Some(held) = &held {
            for (shard_id, stop) in &stops {
                if !held.contains(shard_id) && !stop.is_triggered() {
                    tracing::info!(%shard_id, "lease gone: stopping the shard's worker");
                    stop.trigger();
                }
            }
        }
        let ready = match state_error {
            Some(e) if ends_when_caught_up => {
                outcome = Err(SupervisorError::Checkpoints(e));
                break;
            }
            // The state cannot be read now (a failing disk): no shard starts without its
            // checkpoint (it would start over, or at the tip); said so, and tried again at
            // the next sync. Running workers go on (their writes fail on their own).
            Some(e) => {
                telemetry.state_write(Some(&e));
                Vec::new()
            }
            None => ready,
        };
        let ready: Vec<_> = ready
            .into_iter()
            .filter(|(shard, _)| held.as_ref().is_none_or(|held| held.contains(&shard.id)))
            .collect();
        telemetry.set_shards(shard_views(
            &shards,
            &started,
            &ready,
            |id| checkpoints.get(id).cloned(),
            source.read_mode(),
            held.as_ref(),
        ));
        for (shard, position) in ready {
            tracing::info!(shard_id = %shard.id, %position, "starting shard");
            started.insert(shard.id.clone());
            began.insert(shard.id.clone(), Instant::now());
            let reader = ShardReader::new(
                source.clone(),
                shard.id.clone(),
                position.clone(),
                settings.poll_interval,
            );
            let work = work.clone();
            let stop = shutdown.child();
            stops.insert(shard.id.clone(), stop.clone());
            workers.spawn(async move {
                let result = work
                    .run_shard(reader, shard.id.clone(), position, stop)
                    .await;
                (shard.id, result)
            });
        }
        if ends_when_caught_up && workers.is_empty() {
            break;
        }
        let next_restart = failing
            .values()
            .filter(|f| f.waiting && f.restart_at > now)
            .map(|f| f.restart_at)
            .min();

        let mut relist_now = false;
        tokio::select! {
            joined = workers.join_next(), if !workers.is_empty() => {
                let joined = match joined {
                    // Its lease went to another worker: not a failure of the shard.
                    Some(Ok((shard_id, Err(e)))) if e.is_lease_lost() => {
                        tracing::info!(%shard_id, "lease lost: the shard's worker stopped");
                        Some(Ok((shard_id, Ok(ShardExit::Stopped))))
                    }
                    other => other,
                };
                if let (Some(Ok((shard_id, result))), Some(_)) = (&joined, leases) {
                    stops.remove(shard_id);
                    // A fleet's shard goes on wherever its lease is: here again when this
                    // worker takes it back.
                    if matches!(result, Ok(ShardExit::Stopped)) {
                        started.remove(shard_id);
                    }
                }
                match joined {
                    Some(Ok((shard_id, Ok(exit)))) => {
                        failing.remove(&shard_id);
                        telemetry.shard_recovered(&shard_id);
                        if exit == ShardExit::Finished {
                            tracing::debug!(%shard_id, "worker finished");
                            relist_now = true;
                        }
                    }
                    Some(Ok((shard_id, Err(e)))) => {
                        if ends_when_caught_up {
                            outcome = Err(SupervisorError::Worker { shard_id, source: Box::new(e) });
                            break;
                        }
                        let ran = began.get(&shard_id).map_or(Duration::ZERO, |t| t.elapsed());
                        let failures = match failing.get(&shard_id) {
                            Some(f) if ran < HEALTHY_RUN => f.failures + 1,
                            _ => 1,
                        };
                        let delay = restart_delay(failures);
                        telemetry.shard_failed(&shard_id, &e, failures, delay);
                        failing.insert(shard_id, Failing { restart_at: Instant::now() + delay, failures, waiting: true });
                    }
                    Some(Err(join_error)) => {
                        tracing::error!(error = %join_error, "shard worker panicked");
                        outcome = Err(SupervisorError::Panicked(join_error.to_string()));
                        break;
                    }
                    None => {}
                }
            }
            _ = tokio::time::sleep_until(next_restart.unwrap_or(now + settings.shard_sync_interval)), if next_restart.is_some() => {}
            _ = tokio::time::sleep(settings.shard_sync_interval) => relist_now = true,
            _ = async { match leases { Some(l) => l.changed().await, None => std::future::pending().await } } => {}
            _ = shutdown.triggered() => break,
        }
        if relist_now {
            // A failure is counted and logged by the source (a kinesis_retry); the list is
            // asked for again next time.
            if let Ok(list) = source.list_shards().await {
                shards = list;
                if let Some(leases) = leases {
                    leases.sync(&shards).await;
                }
            }
        }
    }

    shutdown.trigger();
    while let Some(joined) = workers.join_next().await {
        if let Ok((shard_id, Err(e))) = joined {
            tracing::error!(%shard_id, error = %crate::telemetry::chain(&e), "shard worker failed while stopping");
        }
    }
    outcome
}

/// The pause before a worker that failed `failures` times in a row starts again: doubling
/// from [`FIRST_RESTART_DELAY`] up to [`MAX_RESTART_DELAY`], with ±20 % jitter so shards
/// that fail together do not retry together.
fn restart_delay(failures: u32) -> Duration {
    let base = FIRST_RESTART_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_RESTART_DELAY);
    base.mul_f64(0.8 + rand::random::<f64>() * 0.4)
}

/// Each listed shard as `/status` shows it.
fn shard_views(
    shards: &[ShardInfo],
    started: &HashSet<String>,
    starting: &[(ShardInfo, Position)],
    checkpoint: impl Fn(&str) -> Option<Checkpoint>,
    mode: ReadMode,
    held: Option<&HashSet<String>>,
) -> Vec<ShardView> {
    shards
        .iter()
        .map(|shard| {
            let own = checkpoint(&shard.id);
            let state = if own.as_ref().is_some_and(|c| c.shard_end) {
                "finished"
            } else if held.is_some_and(|held| !held.contains(&shard.id)) {
                // A fleet's shard whose lease another worker holds (or no one yet).
                "other_worker"
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
                read_mode: mode.as_str(),
                last_error: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_up_to_a_cap() {
        let d = |n| restart_delay(n).as_secs_f64();
        assert!((0.8..=1.2).contains(&d(1)));
        assert!((1.6..=2.4).contains(&d(2)));
        assert!((6.4..=9.6).contains(&d(4)));
        assert!((48.0..=72.0).contains(&d(10)));
        assert!((48.0..=72.0).contains(&d(u32::MAX)));
    }
}
