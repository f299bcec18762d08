//! The shutdown signal every long-running task watches (SIGINT/SIGTERM, or the end of a
//! dry-run).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable handle: `trigger` once, every clone sees it.
#[derive(Clone, Default)]
pub struct Shutdown(CancellationToken);

/// Returned by a wait that shutdown cut short.
#[derive(Debug)]
pub struct Stopped;

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when shutdown is triggered.
    pub async fn triggered(&self) {
        self.0.cancelled().await
    }

    /// Sleeps, unless shutdown comes first.
    pub async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.0.cancelled() => Err(Stopped),
        }
    }
}
