//! The shutdown signal every long-running task watches (SIGINT/SIGTERM, or the end of a
//! dry-run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable handle: `trigger` once, every clone sees it.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// Read for every record: an atomic load, where the token would take a lock.
    triggered: Arc<AtomicBool>,
    /// A child's parent's flag: a child is stopped with its parent, or alone.
    parent: Option<Arc<AtomicBool>>,
}

/// Returned by a wait that shutdown cut short.
#[derive(Debug)]
pub struct Stopped;

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown of its own that the parent's triggers too (a fleet's shard worker stops
    /// alone when its lease is lost).
    pub fn child(&self) -> Self {
        Shutdown {
            token: self.token.child_token(),
            triggered: Arc::default(),
            parent: Some(self.triggered.clone()),
        }
    }

    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::Acquire)
            || self
                .parent
                .as_ref()
                .is_some_and(|parent| parent.load(Ordering::Acquire))
    }

    /// Resolves when shutdown is triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// Sleeps, unless shutdown comes first.
    pub async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.token.cancelled() => Err(Stopped),
        }
    }
}
