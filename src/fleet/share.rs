//! What the rest of the daemon sees of the fleet: the checkpoints in the lease table (for
//! the shared state) and this worker's leases (for the supervisor).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::coordinator::Coordinator;
use super::lease::{LeaseError, LeaseTable};
use crate::keys::{KeySource, Keys};
use crate::source::{Checkpoint, ShardInfo, StartPosition};
use crate::state::shared::{BoxFuture, CheckpointStore, SharedSettings, COMMAND_PREFIX};
use crate::state::{Access, LocalState, SharedState, State, StateError};
use crate::supervisor::Leases;

/// The lease sentinel a new shard starts at, KCL's name for the configured start.
pub fn initial_sentinel(start: &StartPosition) -> &'static str {
    match start {
        StartPosition::TrimHorizon => "TRIM_HORIZON",
        StartPosition::Latest => "LATEST",
        StartPosition::AtTimestamp(_) => "AT_TIMESTAMP",
    }
}

/// Checkpoints in the lease table: read by anyone, written by the worker holding the
/// lease (fenced by it), reset by an operator's command.
pub struct LeaseCheckpoints {
    /// For reads and resets: a client of the state's own runtime.
    pub table: LeaseTable,
    /// The running worker's leases; none for a command.
    pub coordinator: Option<Arc<Coordinator>>,
}

fn state_error(e: LeaseError) -> StateError {
    match e {
        LeaseError::Lost { shard } => StateError::LeaseLost { shard_id: shard },
        other => StateError::Leases(other.to_string()),
    }
}

impl CheckpointStore for LeaseCheckpoints {
    fn read(&self, shard_id: &str) -> BoxFuture<'_, Result<Option<Checkpoint>, StateError>> {
        let shard_id = shard_id.to_owned();
        Box::pin(async move {
            let lease = self.table.get(&shard_id).await.map_err(state_error)?;
            Ok(lease.and_then(|l| l.position()))
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<(String, Checkpoint)>, StateError>> {
        Box::pin(async move {
            let leases = self.table.list().await.map_err(state_error)?;
            Ok(leases
                .into_iter()
                .filter_map(|l| Some((l.shard_id.clone(), l.position()?)))
                .collect())
        })
    }

    fn write(
        &self,
        shard_id: String,
        checkpoint: Checkpoint,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            match &self.coordinator {
                Some(coordinator) => coordinator
                    .checkpoint(&shard_id, &checkpoint)
                    .await
                    .map_err(state_error),
                None => Err(StateError::LeaseLost { shard_id }),
            }
        })
    }

    fn reset(&self, shard_id: Option<String>) -> BoxFuture<'_, Result<usize, StateError>> {
        Box::pin(async move {
            let leases = self.table.list().await.map_err(state_error)?;
            let mut reset = 0;
            for lease in leases {
                if shard_id.as_ref().is_some_and(|id| *id != lease.shard_id) {
                    continue;
                }
                if lease.position().is_none() {
                    continue;
                }
                // From the shard's start: what was done is found done again.
                self.table
                    .reset_checkpoint(&lease.shard_id, None, "TRIM_HORIZON")
                    .await
                    .map_err(state_error)?;
                reset += 1;
            }
            Ok(reset)
        })
    }

    fn holds(&self, shard_id: &str) -> bool {
        self.coordinator.as_ref().is_some_and(|c| c.holds(shard_id))
    }
}

/// Opens the state a command works on: the state file, or a fleet's tables (read and
/// written directly, with or without workers running; never created by a command).
pub fn open_for_command(
    state_path: &std::path::Path,
    keys: KeySource,
    fleet: Option<&SharedSettings>,
    access: Access,
) -> Result<(State, Keys), StateError> {
    let Some(fleet) = fleet else {
        return LocalState::open(state_path, keys, access)
            .map(|(state, keys)| (State::local(state), keys));
    };
    let fleet = SharedSettings {
        create_tables: false,
        worker_id: format!("{COMMAND_PREFIX}{}", std::process::id()),
        ..fleet.clone()
    };
    let lease_table = fleet.lease_table.clone();
    let (state, keys) = SharedState::open(&fleet, keys, move |client| {
        Arc::new(LeaseCheckpoints {
            table: LeaseTable::new(client, lease_table),
            coordinator: None,
        })
    })?;
    Ok((State::Shared(state), keys))
}

/// This worker's leases, as the supervisor reads them.
pub struct WorkerLeases {
    pub coordinator: Arc<Coordinator>,
    pub owned: tokio::sync::Mutex<
        tokio::sync::watch::Receiver<
            std::collections::BTreeMap<String, super::coordinator::HeldLease>,
        >,
    >,
    pub initial: &'static str,
}

impl Leases for WorkerLeases {
    fn held(&self) -> HashSet<String> {
        let owned = self.coordinator.owned();
        let held = owned.borrow().keys().cloned().collect();
        held
    }

    fn changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut owned = self.owned.lock().await;
            if owned.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }

    fn sync<'a>(
        &'a self,
        shards: &'a [ShardInfo],
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let Err(e) = self.coordinator.sync_shards(shards, self.initial).await {
                tracing::warn!(error = %e, "cannot bring the lease table in line with the stream's shards; tried again at the next sync");
            }
        })
    }
}
