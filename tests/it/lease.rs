//! The fleet's lease layer against dynalite: fencing by the lease counter, renewal, expiry,
//! stealing toward an even share, hand-off on release, table creation, cleanup of finished
//! shards.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gdpr_consumer::fleet::coordinator::Coordinator;
use gdpr_consumer::fleet::lease::{Fenced, Lease, LeaseError, LeaseTable, TRIM_HORIZON};
use gdpr_consumer::source::{Checkpoint, ShardInfo};
use gdpr_consumer::telemetry::Telemetry;

use crate::support::Dynalite;

const SHORT: Duration = Duration::from_millis(600);
/// Long enough that expiry cannot explain what a test sees.
const LONG: Duration = Duration::from_secs(600);

async fn table(dynalite: &Dynalite) -> LeaseTable {
    let table = LeaseTable::new(dynalite.client(), "leases");
    table.ensure(true).await.unwrap();
    table
}

fn coordinator(table: &LeaseTable, worker: &str, lease_duration: Duration) -> Arc<Coordinator> {
    Arc::new(Coordinator::new(
        table.clone(),
        worker.to_owned(),
        lease_duration,
        Arc::new(Telemetry::new()),
    ))
}

fn shard(i: usize) -> String {
    format!("shardId-{i:012}")
}

fn shards(ids: &[(usize, &[usize])]) -> Vec<ShardInfo> {
    ids.iter()
        .map(|(id, parents)| ShardInfo {
            id: shard(*id),
            parents: parents.iter().map(|p| shard(*p)).collect(),
            closed: false,
            hash_range: Some((format!("{id}0"), format!("{id}9"))),
        })
        .collect()
}

/// Polls `check` until it holds; panics with `what` after a generous deadline.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn owners(table: &LeaseTable) -> BTreeMap<String, Option<String>> {
    table
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.shard_id, l.owner))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_for_one_lease_exactly_one_wins_and_the_loser_is_fenced() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    assert!(table
        .create(&Lease::new(shard(0), Vec::new(), TRIM_HORIZON))
        .await
        .unwrap());
    // Already there: fine, and nothing is overwritten.
    assert!(!table
        .create(&Lease::new(shard(0), Vec::new(), "LATEST"))
        .await
        .unwrap());
    let seen = table.get(&shard(0)).await.unwrap().unwrap();
    assert_eq!(seen.checkpoint, TRIM_HORIZON);

    // Both saw the same counter and take at once.
    let (a, b) = tokio::join!(table.take(&seen, "a"), table.take(&seen, "b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (winner, won, loser) = match (&a, &b) {
        (Fenced::Won(lease), Fenced::Lost) => ("a", lease.clone(), "b"),
        (Fenced::Lost, Fenced::Won(lease)) => ("b", lease.clone(), "a"),
        other => panic!("exactly one take must win: {other:?}"),
    };
    assert_eq!(won.owner.as_deref(), Some(winner));
    assert_eq!(won.counter, seen.counter + 1);
    assert_eq!(won.owner_switches, 1);

    // The loser, believing it took the lease as it saw it, cannot checkpoint, renew or
    // release it; the winner can.
    let mut believed = seen.clone();
    believed.owner = Some(loser.to_owned());
    let at = Checkpoint::at("100".into());
    assert_eq!(
        table.checkpoint(&believed, loser, &at).await.unwrap(),
        Fenced::Lost
    );
    assert_eq!(table.renew(&believed, loser).await.unwrap(), Fenced::Lost);
    assert_eq!(table.release(&believed, loser).await.unwrap(), Fenced::Lost);
    // Even at the current counter, the owner's name is checked.
    assert_eq!(table.renew(&won, loser).await.unwrap(), Fenced::Lost);
    let Fenced::Won(after) = table.checkpoint(&won, winner, &at).await.unwrap() else {
        panic!("the winner's checkpoint is refused");
    };
    assert_eq!(after.owner_switches, 0);
    assert_eq!(after.counter, won.counter + 1);

    // Two coordinators race for a free lease: exactly one holds it; the other's
    // checkpoint is refused as lost.
    assert!(table
        .create(&Lease::new(shard(1), Vec::new(), TRIM_HORIZON))
        .await
        .unwrap());
    let ca = coordinator(&table, "ca", LONG);
    let cb = coordinator(&table, "cb", LONG);
    let (ra, rb) = tokio::join!(ca.take_round(), cb.take_round());
    ra.unwrap();
    rb.unwrap();
    let (holder, other) = match (ca.holds(&shard(1)), cb.holds(&shard(1))) {
        (true, false) => (ca, cb),
        (false, true) => (cb, ca),
        other => panic!("exactly one coordinator must hold the lease: {other:?}"),
    };
    let error = other
        .checkpoint(&shard(1), &Checkpoint::at("7".into()))
        .await
        .unwrap_err();
    assert!(matches!(error, LeaseError::Lost { .. }), "{error:?}");
    holder
        .checkpoint(&shard(1), &Checkpoint::at("8".into()))
        .await
        .unwrap();
    assert_eq!(
        other.checkpoint_of(&shard(1)).await.unwrap(),
        Some(Checkpoint::at("8".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_was_stolen_cannot_checkpoint_over_the_new_owner() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", LONG);
    let b = coordinator(&table, "b", LONG);
    a.sync_shards(&shards(&[(0, &[]), (1, &[]), (2, &[])]), TRIM_HORIZON)
        .await
        .unwrap();
    // Alone, a takes all three.
    a.take_round().await.unwrap();
    assert_eq!(a.owned().borrow().len(), 3);
    let tokens: BTreeMap<String, _> = (0..3)
        .map(|i| (shard(i), a.token(&shard(i)).unwrap()))
        .collect();

    // b is short of its share (2 of 3): it steals one from a, which does not know yet.
    b.take_round().await.unwrap();
    let stolen = b.owned().borrow().keys().cloned().collect::<Vec<_>>();
    assert_eq!(stolen.len(), 1, "{stolen:?}");
    let stolen = &stolen[0];
    assert_eq!(owners(&table).await[stolen].as_deref(), Some("b"));
    assert!(a.holds(stolen));

    b.checkpoint(stolen, &Checkpoint::within("200".into(), 3))
        .await
        .unwrap();
    // a's checkpoint (its call was in flight during the steal) is refused, and a knows
    // the lease is lost: no longer held, its token cancelled.
    let error = a
        .checkpoint(stolen, &Checkpoint::at("150".into()))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "lease lost: shard {stolen} is now read by another worker; the checkpoint was not written"
        )
    );
    assert!(!a.holds(stolen));
    assert!(tokens[stolen].is_cancelled());
    assert!(!a.owned().borrow().contains_key(stolen));
    // The table keeps the new owner's checkpoint.
    assert_eq!(
        a.checkpoint_of(stolen).await.unwrap(),
        Some(Checkpoint::within("200".into(), 3))
    );
    // a's other leases are untouched and renew.
    a.renew_all().await;
    assert_eq!(a.owned().borrow().len(), 2);
    assert!(tokens
        .iter()
        .filter(|(s, _)| *s != stolen)
        .all(|(_, t)| !t.is_cancelled()));
    // 2 and 1: within one of the share; b steals no more (nor would a steal back).
    b.take_round().await.unwrap();
    assert_eq!(b.owned().borrow().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_lease_and_a_lease_not_renewed_expires_to_the_other_worker() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", SHORT);
    let b = coordinator(&table, "b", SHORT);
    a.sync_shards(&shards(&[(0, &[])]), TRIM_HORIZON)
        .await
        .unwrap();
    a.take_round().await.unwrap();
    assert!(a.holds(&shard(0)));
    let a_token = a.token(&shard(0)).unwrap();

    let a_stop = gdpr_consumer::shutdown::Shutdown::new();
    let b_stop = gdpr_consumer::shutdown::Shutdown::new();
    let a_run = tokio::spawn(a.clone().run(a_stop.clone()));
    let b_run = tokio::spawn(b.clone().run(b_stop.clone()));
    // Renewed every third of the lease duration, a keeps it over five lease durations
    // while b watches for it to expire.
    let renewals_from = table.get(&shard(0)).await.unwrap().unwrap().counter;
    tokio::time::sleep(SHORT * 5).await;
    let lease = table.get(&shard(0)).await.unwrap().unwrap();
    assert_eq!(lease.owner.as_deref(), Some("a"));
    assert!(lease.counter > renewals_from, "{lease:?}");
    assert!(a.holds(&shard(0)) && !b.holds(&shard(0)));

    // a stops renewing (as a worker killed -9 would): after a lease duration b takes it.
    a_run.abort();
    let _ = a_run.await;
    eventually("b takes the expired lease", || async { b.holds(&shard(0)) }).await;
    assert_eq!(owners(&table).await[&shard(0)].as_deref(), Some("b"));
    // a finds out at its next renewal.
    a.renew_all().await;
    assert!(!a.holds(&shard(0)));
    assert!(a_token.is_cancelled());
    b_stop.trigger();
    b.release_all().await.unwrap();
    b_run.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_eight_leases_settle_at_three_three_two() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let workers: Vec<Arc<Coordinator>> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| coordinator(&table, w, SHORT))
        .collect();
    let all: Vec<(usize, &[usize])> = (0..8).map(|i| (i, &[][..])).collect();
    workers[0]
        .sync_shards(&shards(&all), TRIM_HORIZON)
        .await
        .unwrap();
    let stop = gdpr_consumer::shutdown::Shutdown::new();
    let runs: Vec<_> = workers
        .iter()
        .map(|w| tokio::spawn(w.clone().run(stop.clone())))
        .collect();
    let spread = || async {
        let owners = owners(&table).await;
        let mut counts: Vec<usize> = workers
            .iter()
            .map(|w| {
                owners
                    .values()
                    .filter(|o| o.as_deref() == Some(w.worker_id()))
                    .count()
            })
            .collect();
        // Each worker's own view agrees with the table (the losers noticed).
        let agree = workers
            .iter()
            .zip(&counts)
            .all(|(w, n)| w.owned().borrow().len() == *n);
        counts.sort();
        (counts, agree)
    };
    eventually("an even spread of the leases", || async {
        spread().await == (vec![2, 3, 3], true)
    })
    .await;
    // Settled: a few more rounds move nothing (every take counts an owner switch; no
    // checkpoint resets them here).
    let switches = || async {
        let leases = table.list().await.unwrap();
        leases.iter().map(|l| l.owner_switches).sum::<u64>()
    };
    let before = (owners(&table).await, switches().await);
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!((owners(&table).await, switches().await), before);
    assert_eq!(spread().await, (vec![2, 3, 3], true));
    stop.trigger();
    for worker in &workers {
        worker.release_all().await.unwrap();
    }
    for run in runs {
        run.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_all_hands_the_leases_to_another_worker_at_once() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", LONG);
    let b = coordinator(&table, "b", LONG);
    a.sync_shards(&shards(&[(0, &[])]), TRIM_HORIZON)
        .await
        .unwrap();
    a.take_round().await.unwrap();
    let tokens = [a.token(&shard(0)).unwrap()];
    // b sees a's lease alive and a at its share: nothing to take.
    b.take_round().await.unwrap();
    assert!(b.owned().borrow().is_empty());

    a.release_all().await.unwrap();
    assert!(a.owned().borrow().is_empty());
    assert!(tokens.iter().all(|t| t.is_cancelled()));
    assert!(owners(&table).await.values().all(Option::is_none));
    // A free lease: b takes it now, not a lease duration (ten minutes) later.
    b.take_round().await.unwrap();
    assert!(b.holds(&shard(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_named_or_created() {
    let dynalite = Dynalite::start();
    let table = LeaseTable::new(dynalite.client(), "fleet-leases");
    let error = table.ensure(false).await.unwrap_err().to_string();
    assert!(
        error.contains("lease table fleet-leases does not exist"),
        "{error}"
    );
    assert!(error.contains("create_tables = true"), "{error}");
    assert!(
        error.contains("aws dynamodb create-table --table-name fleet-leases"),
        "{error}"
    );
    table.ensure(true).await.unwrap();
    table.ensure(false).await.unwrap();
    // Created as the command says: leaseKey is the key.
    assert!(table
        .create(&Lease::new(shard(0), Vec::new(), TRIM_HORIZON))
        .await
        .unwrap());
    assert_eq!(table.list().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_parent_is_deleted_only_after_its_children_finish() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", LONG);
    // Shard 0 split into 1 and 2.
    let split = shards(&[(0, &[]), (1, &[0]), (2, &[0])]);
    a.sync_shards(&split, TRIM_HORIZON).await.unwrap();
    let parent = table.get(&shard(0)).await.unwrap().unwrap();
    assert_eq!(parent.children, vec![shard(1), shard(2)]);
    assert_eq!(
        table.get(&shard(1)).await.unwrap().unwrap().parents,
        vec![shard(0)]
    );
    a.take_round().await.unwrap();
    assert_eq!(a.owned().borrow()[&shard(1)].parents, vec![shard(0)]);

    // The parent read to its end: released, never taken again.
    a.checkpoint(&shard(0), &Checkpoint::end(Some("90".into())))
        .await
        .unwrap();
    assert!(!a.holds(&shard(0)));
    a.take_round().await.unwrap();
    assert!(!a.holds(&shard(0)));
    assert_eq!(
        a.checkpoint_of(&shard(0)).await.unwrap(),
        Some(Checkpoint::end(Some("90".into())))
    );

    // The parent is gone from the stream, its children are not finished: kept.
    let children = shards(&[(1, &[0]), (2, &[0])]);
    a.sync_shards(&children, TRIM_HORIZON).await.unwrap();
    assert!(table.get(&shard(0)).await.unwrap().is_some());
    a.checkpoint(&shard(1), &Checkpoint::end(None))
        .await
        .unwrap();
    a.sync_shards(&children, TRIM_HORIZON).await.unwrap();
    assert!(table.get(&shard(0)).await.unwrap().is_some());
    // Both children finished: the parent's lease is cleaned up; the children's stay.
    a.checkpoint(&shard(2), &Checkpoint::end(None))
        .await
        .unwrap();
    a.sync_shards(&children, TRIM_HORIZON).await.unwrap();
    assert!(table.get(&shard(0)).await.unwrap().is_none());
    assert_eq!(
        owners(&table).await.into_keys().collect::<Vec<_>>(),
        vec![shard(1), shard(2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_reset_fences_the_holder() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", LONG);
    a.sync_shards(&shards(&[(0, &[])]), "LATEST").await.unwrap();
    a.take_round().await.unwrap();
    a.checkpoint(&shard(0), &Checkpoint::at("100".into()))
        .await
        .unwrap();
    // `checkpoints reset` while a holds the shard: back to the start.
    let Fenced::Won(reset) = table
        .reset_checkpoint(&shard(0), None, "LATEST")
        .await
        .unwrap()
    else {
        panic!("reset refused");
    };
    assert_eq!(reset.checkpoint, "LATEST");
    assert_eq!(a.checkpoint_of(&shard(0)).await.unwrap(), None);
    // a's next checkpoint would undo the reset: refused.
    assert!(a
        .checkpoint(&shard(0), &Checkpoint::at("101".into()))
        .await
        .is_err());
    assert_eq!(a.checkpoint_of(&shard(0)).await.unwrap(), None);
    // No lease for a shard: nothing is created.
    assert_eq!(
        table
            .reset_checkpoint(&shard(9), None, "LATEST")
            .await
            .unwrap(),
        Fenced::Lost
    );
    assert!(table.get(&shard(9)).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_table_stops_holding_after_a_lease_duration() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", SHORT);
    a.sync_shards(&shards(&[(0, &[])]), TRIM_HORIZON)
        .await
        .unwrap();
    a.take_round().await.unwrap();
    assert!(a.holds(&shard(0)));
    let token = a.token(&shard(0)).unwrap();
    // The table becomes unreachable. Another worker takes the lease a lease duration after
    // it last saw the counter move; by then a no longer holds it, whether or not its
    // renewal loop has run in between.
    drop(dynalite);
    tokio::time::sleep(SHORT).await;
    assert!(!a.holds(&shard(0)));
    // The renewal fails and drops the lease.
    a.renew_all().await;
    assert!(token.is_cancelled());
    assert!(a.owned().borrow().is_empty());
    assert!(a
        .checkpoint(&shard(0), &Checkpoint::at("1".into()))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_a_worker_keeps_its_leases_until_it_releases_them() {
    let dynalite = Dynalite::start();
    let table = table(&dynalite).await;
    let a = coordinator(&table, "a", SHORT);
    let b = coordinator(&table, "b", SHORT);
    a.sync_shards(&shards(&[(0, &[])]), TRIM_HORIZON)
        .await
        .unwrap();
    a.take_round().await.unwrap();
    let (a_stop, b_stop) = (
        gdpr_consumer::shutdown::Shutdown::new(),
        gdpr_consumer::shutdown::Shutdown::new(),
    );
    let a_run = tokio::spawn(a.clone().run(a_stop.clone()));
    let b_run = tokio::spawn(b.clone().run(b_stop.clone()));
    // SIGTERM: a's shard workers finish their calls and checkpoint, which may take longer
    // than a lease duration; a keeps the lease meanwhile.
    a_stop.trigger();
    tokio::time::sleep(SHORT * 4).await;
    assert!(a.holds(&shard(0)));
    assert!(!a_run.is_finished());
    a.checkpoint(&shard(0), &Checkpoint::at("5".into()))
        .await
        .unwrap();
    // Then it hands the lease off, and its coordinator ends.
    a.release_all().await.unwrap();
    a_run.await.unwrap();
    eventually("b takes the released lease", || async {
        b.holds(&shard(0))
    })
    .await;
    assert_eq!(
        b.owned().borrow()[&shard(0)].checkpoint,
        Some(Checkpoint::at("5".into()))
    );
    b_stop.trigger();
    b.release_all().await.unwrap();
    b_run.await.unwrap();
}
