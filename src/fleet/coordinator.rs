//! One worker's leases, KCL 2.x style: renew what it holds every third of the lease
//! duration, take expired and free leases up to its fair share, then steal one lease a
//! round from the most loaded worker.
//!
//! Expiry needs no synchronised clocks: a lease whose `leaseCounter` has not moved for a
//! lease duration, by this worker's monotonic clock, is expired. A lease lost (renewal or
//! checkpoint refused by the counter) is dropped at once and its token cancelled, so its
//! shard's worker stops before its next backend call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{Fenced, Lease, LeaseError, LeaseTable};
use crate::shutdown::Shutdown;
use crate::source::{Checkpoint, ShardInfo};
use crate::telemetry::Telemetry;

/// Renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 16;

/// A lease this worker holds, as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct HeldLease {
    /// Cancelled when the lease is lost or released: stop before the next backend call.
    pub token: CancellationToken,
    /// The shard's parents (the supervisor starts it only after they are finished).
    pub parents: Vec<String>,
    /// Where the shard stood when this worker took it.
    pub checkpoint: Option<Checkpoint>,
}

struct Held {
    /// The lease as last written by this worker; the lock serialises its writes.
    lease: tokio::sync::Mutex<Lease>,
    /// A lease duration after the last successful write was sent: past it, another worker
    /// may have taken the lease by its own clock (it saw the counter move after we sent).
    valid_until: Mutex<Instant>,
    token: CancellationToken,
    parents: Vec<String>,
    taken_at: Option<Checkpoint>,
}

impl Held {
    fn written(&self, sent: Instant, duration: Duration) {
        *self.valid_until.lock().unwrap() = sent + duration;
    }

    fn valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap()
    }
}

/// One worker's leases.
pub struct Coordinator {
    table: LeaseTable,
    worker_id: String,
    lease_duration: Duration,
    telemetry: Arc<Telemetry>,
    held: Mutex<BTreeMap<String, Arc<Held>>>,
    /// Per shard: the counter last seen and when it was first seen at that value.
    seen: Mutex<HashMap<String, (u64, Instant)>>,
    owned: watch::Sender<BTreeMap<String, HeldLease>>,
}

impl Coordinator {
    pub fn new(
        table: LeaseTable,
        worker_id: String,
        lease_duration: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Coordinator {
            table,
            worker_id,
            lease_duration,
            telemetry,
            held: Mutex::default(),
            seen: Mutex::default(),
            owned: watch::Sender::new(BTreeMap::new()),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn table(&self) -> &LeaseTable {
        &self.table
    }

    /// The shards held now; changes when a lease is taken, lost or released.
    pub fn owned(&self) -> watch::Receiver<BTreeMap<String, HeldLease>> {
        self.owned.subscribe()
    }

    /// The token of a held lease, cancelled when it is lost.
    pub fn token(&self, shard: &str) -> Option<CancellationToken> {
        self.held
            .lock()
            .unwrap()
            .get(shard)
            .map(|h| h.token.clone())
    }

    /// Does this worker hold the shard's lease? Cheap: for a check before each backend
    /// call. False as soon as the lease is lost, or a lease duration has passed since its
    /// last successful renewal was sent (another worker may have it by then).
    pub fn holds(&self, shard: &str) -> bool {
        self.held
            .lock()
            .unwrap()
            .get(shard)
            .is_some_and(|h| h.valid() && !h.token.is_cancelled())
    }

    /// Renews and takes leases every third of the lease duration. After shutdown it takes
    /// no more, but keeps renewing what it holds (while the shard workers finish their
    /// calls and checkpoint) and returns once nothing is held: after
    /// [`Coordinator::release_all`], or when every lease is lost. So call `release_all`
    /// before awaiting it.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let period = self.lease_duration / 3;
        let mut renew_at = Instant::now();
        loop {
            if Instant::now() >= renew_at {
                self.renew_all().await;
                renew_at = Instant::now() + period;
            }
            if shutdown.is_triggered() {
                break;
            }
            // One lease stolen a round; while still short of its share, a worker's next
            // round comes sooner, so a new worker reaches its share within a few lease
            // durations even of many shards.
            let pause = match self.take_round().await {
                Ok(true) => period / 4,
                Ok(false) => renew_at.saturating_duration_since(Instant::now()),
                Err(e) => {
                    self.telemetry.lease_table_error(&self.worker_id, &e);
                    renew_at.saturating_duration_since(Instant::now())
                }
            };
            if shutdown.sleep(pause).await.is_err() {
                break;
            }
        }
        let mut owned = self.owned.subscribe();
        while !self.held.lock().unwrap().is_empty() {
            if tokio::time::timeout(period, owned.changed()).await.is_err() {
                self.renew_all().await;
            }
        }
    }

    fn held_now(&self) -> Vec<(String, Arc<Held>)> {
        let held = self.held.lock().unwrap();
        held.iter().map(|(s, h)| (s.clone(), h.clone())).collect()
    }

    /// Renews every held lease once (several at a time, so many leases still renew
    /// within a third of the lease duration); a refused renewal loses the lease.
    pub async fn renew_all(self: &Arc<Self>) {
        let limit = Arc::new(tokio::sync::Semaphore::new(RENEWALS_AT_ONCE));
        let mut renewals = tokio::task::JoinSet::new();
        for (shard, held) in self.held_now() {
            let (this, limit) = (self.clone(), limit.clone());
            renewals.spawn(async move {
                let _permit = limit.acquire().await;
                this.renew(&shard, &held).await
            });
        }
        while renewals.join_next().await.is_some() {}
    }

    async fn renew(&self, shard: &str, held: &Arc<Held>) {
        let mut lease = held.lease.lock().await;
        if held.token.is_cancelled() {
            return;
        }
        let sent = Instant::now();
        match self.table.renew(&lease, &self.worker_id).await {
            Ok(Fenced::Won(renewed)) => {
                *lease = renewed;
                held.written(sent, self.lease_duration);
            }
            Ok(Fenced::Lost) => self.lose(shard, held, "renewal refused"),
            Err(e) => {
                self.telemetry.lease_table_error(&self.worker_id, &e);
                if !held.valid() {
                    self.lose(shard, held, "not renewed for a lease duration");
                }
            }
        }
    }

    /// Drops a lease this worker no longer holds (if `held` is still the one in the map).
    fn lose(&self, shard: &str, held: &Arc<Held>, reason: &'static str) {
        if self.forget(shard, held) {
            self.telemetry.lease_lost(shard, &self.worker_id, reason);
        }
    }

    /// Removes `held` from the map and cancels its token: `false` if it was gone already.
    fn forget(&self, shard: &str, held: &Arc<Held>) -> bool {
        let removed = {
            let mut map = self.held.lock().unwrap();
            match map.get(shard) {
                Some(current) if Arc::ptr_eq(current, held) => map.remove(shard).is_some(),
                _ => false,
            }
        };
        held.token.cancel();
        if removed {
            self.publish();
        }
        removed
    }

    fn publish(&self) {
        let view: BTreeMap<String, HeldLease> = self
            .held
            .lock()
            .unwrap()
            .iter()
            .map(|(shard, h)| {
                (
                    shard.clone(),
                    HeldLease {
                        token: h.token.clone(),
                        parents: h.parents.clone(),
                        checkpoint: h.taken_at.clone(),
                    },
                )
            })
            .collect();
        self.telemetry.leases_owned(view.len());
        self.owned.send_replace(view);
    }

    /// One taking round: list the table, then take expired and free leases up to the fair
    /// share, or steal one. Whether it stole one (it may still be short of its share).
    pub async fn take_round(&self) -> Result<bool, LeaseError> {
        let leases = self.table.list().await?;
        let now = Instant::now();
        let held: BTreeSet<String> = self.held.lock().unwrap().keys().cloned().collect();
        let views: Vec<LeaseView> = {
            let mut seen = self.seen.lock().unwrap();
            seen.retain(|shard, _| leases.iter().any(|l| &l.shard_id == shard));
            leases
                .iter()
                .map(|lease| {
                    let since = match seen.get(&lease.shard_id) {
                        Some((counter, since)) if *counter == lease.counter => *since,
                        _ => {
                            seen.insert(lease.shard_id.clone(), (lease.counter, now));
                            now
                        }
                    };
                    let mine = lease.owner.as_deref() == Some(self.worker_id.as_str());
                    LeaseView {
                        shard_id: lease.shard_id.clone(),
                        owner: lease.owner.clone(),
                        // A lease in my name I do not hold (a previous run of this worker id,
                        // or dropped): mine to take again at once.
                        expired: lease.owner.is_none()
                            || (mine && !held.contains(&lease.shard_id))
                            || (!mine && now.duration_since(since) >= self.lease_duration),
                        finished: lease.finished(),
                    }
                })
                .collect()
        };
        let plan = plan(&self.worker_id, &views);
        let by_shard: HashMap<&str, &Lease> =
            leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();
        for shard in &plan.take {
            self.take(by_shard[shard.as_str()], false).await?;
        }
        if let Some(shard) = &plan.steal {
            self.take(by_shard[shard.as_str()], true).await?;
        }
        Ok(plan.steal.is_some())
    }

    async fn take(&self, lease: &Lease, steal: bool) -> Result<(), LeaseError> {
        let sent = Instant::now();
        match self.table.take(lease, &self.worker_id).await? {
            Fenced::Won(taken) => {
                let previous = lease.owner.as_deref().filter(|o| *o != self.worker_id);
                match previous {
                    Some(from) if steal => {
                        self.telemetry
                            .lease_stolen(&lease.shard_id, &self.worker_id, from)
                    }
                    _ => self
                        .telemetry
                        .lease_taken(&lease.shard_id, &self.worker_id, previous),
                }
                let held = Arc::new(Held {
                    token: CancellationToken::new(),
                    parents: taken.parents.clone(),
                    taken_at: taken.position(),
                    lease: tokio::sync::Mutex::new(taken),
                    valid_until: Mutex::new(sent + self.lease_duration),
                });
                let replaced = self
                    .held
                    .lock()
                    .unwrap()
                    .insert(lease.shard_id.clone(), held);
                if let Some(old) = replaced {
                    old.token.cancel();
                }
                self.publish();
            }
            // Another worker was quicker, or the lease moved: seen again next round.
            Fenced::Lost => {}
        }
        Ok(())
    }

    /// Writes a shard's checkpoint, fenced by the lease: refused (and the lease dropped)
    /// when another worker took it. A shard-end checkpoint also releases the lease, which
    /// no one takes again.
    pub async fn checkpoint(&self, shard: &str, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        let lost = || LeaseError::Lost {
            shard: shard.to_owned(),
        };
        let held = self.held.lock().unwrap().get(shard).cloned();
        let Some(held) = held else {
            return Err(lost());
        };
        let mut lease = held.lease.lock().await;
        if held.token.is_cancelled() {
            return Err(lost());
        }
        let sent = Instant::now();
        match self
            .table
            .checkpoint(&lease, &self.worker_id, checkpoint)
            .await?
        {
            Fenced::Won(written) => {
                *lease = written;
                held.written(sent, self.lease_duration);
            }
            Fenced::Lost => {
                self.lose(shard, &held, "checkpoint refused");
                return Err(lost());
            }
        }
        if checkpoint.shard_end {
            // Written: a failed release only leaves our name on a finished lease, which no
            // one takes anyway.
            match self.table.release(&lease, &self.worker_id).await {
                Ok(Fenced::Won(released)) => *lease = released,
                Ok(Fenced::Lost) => {}
                Err(e) => self.telemetry.lease_table_error(&self.worker_id, &e),
            }
            if self.forget(shard, &held) {
                self.telemetry.lease_released(shard, &self.worker_id);
            }
        }
        Ok(())
    }

    /// A shard's checkpoint as the table holds it now (consistent read).
    pub async fn checkpoint_of(&self, shard: &str) -> Result<Option<Checkpoint>, LeaseError> {
        Ok(self.table.get(shard).await?.and_then(|l| l.position()))
    }

    /// Makes the table match the stream's shards: a lease for each listed shard without
    /// one (starting at the `initial` sentinel), and deletes the leases of shards no longer
    /// listed once they and all their children are finished.
    pub async fn sync_shards(&self, shards: &[ShardInfo], initial: &str) -> Result<(), LeaseError> {
        let leases = self.table.list().await?;
        let existing: BTreeMap<&str, &Lease> =
            leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();
        let mut children: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for shard in shards {
            for parent in &shard.parents {
                children
                    .entry(parent.as_str())
                    .or_default()
                    .push(shard.id.clone());
            }
        }
        for shard in shards {
            let kids = children.get(shard.id.as_str()).cloned().unwrap_or_default();
            match existing.get(shard.id.as_str()) {
                None => {
                    let mut lease = Lease::new(shard.id.clone(), shard.parents.clone(), initial);
                    lease.parents.sort();
                    lease.children = kids;
                    if let Some((start, end)) = &shard.hash_range {
                        lease.starting_hash_key = Some(start.clone());
                        lease.ending_hash_key = Some(end.clone());
                    }
                    self.table.create(&lease).await?;
                }
                Some(lease) => {
                    let missing: Vec<String> = kids
                        .into_iter()
                        .filter(|k| !lease.children.contains(k))
                        .collect();
                    self.table.add_children(&shard.id, &missing).await?;
                }
            }
        }
        let listed: BTreeSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        for lease in &leases {
            if listed.contains(lease.shard_id.as_str()) || !lease.finished() {
                continue;
            }
            let children_done = leases
                .iter()
                .filter(|l| l.parents.contains(&lease.shard_id))
                .all(Lease::finished);
            if children_done && self.table.delete(&lease.shard_id).await? {
                self.telemetry
                    .lease_deleted(&lease.shard_id, &self.worker_id);
            }
        }
        Ok(())
    }

    /// Releases every held lease (SIGTERM, after the shard workers checkpointed), so other
    /// workers take them at once. Tokens are cancelled. Call it once shutdown is triggered:
    /// before, `run`'s next taking round would take the free leases back.
    pub async fn release_all(&self) -> Result<(), LeaseError> {
        let mut first_error = None;
        for (shard, held) in self.held_now() {
            let lease = held.lease.lock().await;
            match self.table.release(&lease, &self.worker_id).await {
                Ok(Fenced::Won(_)) => {
                    if self.forget(&shard, &held) {
                        self.telemetry.lease_released(&shard, &self.worker_id);
                    }
                }
                Ok(Fenced::Lost) => self.lose(&shard, &held, "release refused"),
                Err(e) => {
                    self.forget(&shard, &held);
                    self.telemetry.lease_table_error(&self.worker_id, &e);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// One lease in a taking round's snapshot.
#[derive(Debug, Clone)]
pub struct LeaseView {
    pub shard_id: String,
    pub owner: Option<String>,
    /// Free, or its counter has not moved for a lease duration (or in `me`'s name without
    /// `me` holding it).
    pub expired: bool,
    /// `SHARD_END`: never taken.
    pub finished: bool,
}

/// What a taking round does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Expired or free leases, up to the fair share.
    pub take: Vec<String>,
    /// One lease of the most loaded worker, when nothing is free and `me` is below its
    /// share.
    pub steal: Option<String>,
}

/// Chooses the leases `me` takes: expired and free ones up to the fair share (the
/// unfinished leases over the live workers, rounded up; live: owning an unexpired lease,
/// and `me`), else one stolen from the most loaded worker, only when it holds more than
/// `me` plus one (so two workers never steal back and forth).
pub fn plan(me: &str, leases: &[LeaseView]) -> Plan {
    let active: Vec<&LeaseView> = leases.iter().filter(|l| !l.finished).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    counts.insert(me, 0);
    for lease in &active {
        if let (Some(owner), false) = (lease.owner.as_deref(), lease.expired) {
            *counts.entry(owner).or_default() += 1;
        }
    }
    let share = active.len().div_ceil(counts.len());
    let mine = counts[me];
    if mine >= share {
        return Plan::default();
    }
    let take: Vec<String> = active
        .iter()
        .filter(|l| l.expired)
        .take(share - mine)
        .map(|l| l.shard_id.clone())
        .collect();
    if !take.is_empty() {
        return Plan { take, steal: None };
    }
    let victim = counts
        .iter()
        .filter(|(worker, _)| **worker != me)
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
    let steal = match victim {
        Some((victim, &count)) if count > mine + 1 => {
            let theirs: Vec<&LeaseView> = active
                .iter()
                .copied()
                .filter(|l| l.owner.as_deref() == Some(*victim) && !l.expired)
                .collect();
            // Workers short of their share pick different leases of the same victim.
            let mut hasher = DefaultHasher::new();
            me.hash(&mut hasher);
            let pick = hasher.finish() as usize % theirs.len();
            Some(theirs[pick].shard_id.clone())
        }
        _ => None,
    };
    Plan {
        take: Vec::new(),
        steal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(shard: usize, owner: Option<&str>, expired: bool) -> LeaseView {
        LeaseView {
            shard_id: format!("shardId-{shard:012}"),
            owner: owner.map(str::to_owned),
            expired,
            finished: false,
        }
    }

    /// Applies `worker`'s plan to the snapshot as if every write won.
    fn apply(worker: &str, leases: &mut [LeaseView]) -> Plan {
        let plan = plan(worker, leases);
        for lease in leases.iter_mut() {
            if plan.take.contains(&lease.shard_id) || plan.steal.as_ref() == Some(&lease.shard_id) {
                lease.owner = Some(worker.to_owned());
                lease.expired = false;
            }
        }
        plan
    }

    fn spread(leases: &[LeaseView], workers: &[&str]) -> Vec<usize> {
        workers
            .iter()
            .map(|w| {
                leases
                    .iter()
                    .filter(|l| l.owner.as_deref() == Some(*w))
                    .count()
            })
            .collect()
    }

    #[test]
    fn eight_leases_over_three_workers_settle_at_three_three_two() {
        let workers = ["a", "b", "c"];
        // "a" took everything before the others came.
        let mut leases: Vec<LeaseView> = (0..8).map(|i| view(i, Some("a"), false)).collect();
        for _round in 0..6 {
            for w in workers {
                apply(w, &mut leases);
            }
        }
        let mut counts = spread(&leases, &workers);
        counts.sort();
        assert_eq!(counts, vec![2, 3, 3]);
        // Settled: no one moves any more.
        for w in workers {
            assert_eq!(plan(w, &leases), Plan::default(), "{w}");
        }
    }

    #[test]
    fn a_newcomer_takes_free_leases_up_to_its_share_first() {
        let mut leases: Vec<LeaseView> = (0..8).map(|i| view(i, None, true)).collect();
        // Alone, "a" takes them all: nobody else is live.
        assert_eq!(apply("a", &mut leases).take.len(), 8);
        leases[0].owner = None;
        leases[0].expired = true;
        leases[1].owner = Some("b".into());
        leases[2].owner = Some("c".into());
        // a: 5 live, b: 1, c: 1; share 3: b takes the free one before stealing.
        let p = plan("b", &leases);
        assert_eq!(p.take, vec![leases[0].shard_id.clone()]);
        assert_eq!(p.steal, None);
    }

    #[test]
    fn expired_leases_are_taken_before_any_steal() {
        let mut leases: Vec<LeaseView> = (0..6).map(|i| view(i, Some("a"), false)).collect();
        leases[4].owner = Some("dead".into());
        leases[4].expired = true;
        leases[5].owner = Some("dead".into());
        leases[5].expired = true;
        // Live: a (4) and b (0); share 3: b takes both expired leases, steals nothing.
        let p = plan("b", &leases);
        assert_eq!(
            p.take,
            vec![leases[4].shard_id.clone(), leases[5].shard_id.clone()]
        );
        assert_eq!(p.steal, None);
        // A dead worker does not count: alone among the live, a's share is all six.
        assert_eq!(plan("a", &leases).take.len(), 2);
    }

    #[test]
    fn two_workers_at_four_each_do_not_steal_back_and_forth() {
        let mut leases: Vec<LeaseView> = (0..8)
            .map(|i| view(i, Some(if i < 4 { "a" } else { "b" }), false))
            .collect();
        assert_eq!(plan("a", &leases), Plan::default());
        assert_eq!(plan("b", &leases), Plan::default());
        // 7 leases at 4/3: within one; the one at 3 does not steal.
        leases.pop();
        assert_eq!(plan("b", &leases), Plan::default());
        // 5/3: the one at 3 steals one, and then neither moves.
        leases.push(view(7, Some("a"), false));
        assert_eq!(spread(&leases, &["a", "b"]), vec![5, 3]);
        assert!(apply("b", &mut leases).steal.is_some());
        assert_eq!(spread(&leases, &["a", "b"]), vec![4, 4]);
        assert_eq!(plan("a", &leases), Plan::default());
        assert_eq!(plan("b", &leases), Plan::default());
    }

    #[test]
    fn finished_leases_are_never_taken_nor_counted() {
        let mut leases: Vec<LeaseView> = (0..4).map(|i| view(i, None, true)).collect();
        leases[0].finished = true;
        leases[1].finished = true;
        let p = plan("a", &leases);
        assert_eq!(
            p.take,
            vec![leases[2].shard_id.clone(), leases[3].shard_id.clone()]
        );
        leases[2].owner = Some("b".into());
        leases[2].expired = false;
        // Two unfinished leases, two live workers: a's share is one.
        assert_eq!(plan("a", &leases).take, vec![leases[3].shard_id.clone()]);
    }
}
