//! Dedup: a request `(action, key)` that was done is not sent again.
//!
//! Two guards: the ledger in the state (done requests, by keyed hash under every key of the
//! ring, across restarts and replays), and claims held while a request is being carried out,
//! so the same request read from two shards at once (a producer's retry) is sent by one and
//! found done by the other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::keys::Keys;
use crate::state::{State, StateError};

/// Requests being carried out now, over all shards.
#[derive(Default)]
pub struct Claims(Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>);

impl Claims {
    /// Waits until no one else carries out the request `id`, and claims it until the
    /// returned guard is dropped (after its outcome is committed).
    pub async fn claim(&self, id: [u8; 32]) -> Claim<'_> {
        let lock = self.0.lock().unwrap().entry(id).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Claim {
            claims: self,
            id,
            lock,
            _guard: guard,
        }
    }
}

pub struct Claim<'a> {
    claims: &'a Claims,
    id: [u8; 32],
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut map = self.claims.0.lock().unwrap();
        // The map's copy, this one and the guard's: nobody else waits for it.
        if Arc::strong_count(&self.lock) <= 3 {
            map.remove(&self.id);
        }
    }
}

/// Whether the request `(action, key)` was done: in this batch (not committed yet), or in
/// the ledger under any key of the ring.
pub fn is_done(
    state: &State,
    keys: &Keys,
    done_in_batch: &HashSet<[u8; 32]>,
    action: &str,
    key: &str,
) -> Result<bool, StateError> {
    let ids = keys.request_ids(action, key);
    if ids.iter().any(|id| done_in_batch.contains(id)) {
        return Ok(true);
    }
    state.is_done_any(&ids)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_claimed_request_waits_for_its_holder() {
        let claims = Arc::new(super::Claims::default());
        let first = claims.claim([1; 32]).await;
        let other = claims.claim([2; 32]).await; // another request is not held up
        drop(other);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let waiter = {
            let claims = claims.clone();
            tokio::spawn(async move {
                let _second = claims.claim([1; 32]).await;
                let _ = tx.send(());
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the second claim must wait");
        drop(first);
        waiter.await.unwrap();
        assert!(
            claims.0.lock().unwrap().is_empty(),
            "released claims are forgotten"
        );
    }
}
