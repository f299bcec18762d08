//! Idle shards in polling mode: the poll interval backs off while a shard answers nothing,
//! and a request written after a quiet spell is still read within the idle interval.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// A workspace polling every 200 ms, backing off to 1600 ms when idle.
fn idle_workspace(endpoint: &str, backend: &str) -> Workspace {
    let ws = Workspace::new(endpoint, "events", backend);
    ws.edit_config(
        "idle_poll_interval_ms = 400",
        "idle_poll_interval_ms = 1600",
    );
    ws
}

/// Waits until the daemon has read the first request and every shard has caught up.
async fn wait_caught_up(daemon: &Daemon, backend: &Backend, shards: usize) {
    wait_until(Duration::from_secs(60), "the first request", || {
        backend.count() >= 1
    })
    .await;
    wait_until(Duration::from_secs(30), "every shard caught up", || {
        caught_up_count(&daemon.stderr()) >= shards
    })
    .await;
}

/// Over a quiet period, each idle shard is polled every 1600 ms at most, not every 200 ms:
/// counted by the proxy, and per shard by the daemon's own `get_records_calls_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shards_back_off_their_polling() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let proxy = FaultProxy::start(&kinesis.endpoint, move |operation, _| {
        if operation == "GetRecords" {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        None
    })
    .await;
    let backend = Backend::start().await;
    put(
        &client,
        "events",
        &[(
            "u-1".to_owned(),
            serde_json::to_vec(&deletion("r-1", "u-1")).unwrap(),
        )],
    )
    .await;
    let ws = idle_workspace(&proxy.endpoint, &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_caught_up(&daemon, &backend, 2).await;
    // 200 + 400 + 800 ms of back-off, then every 1600 ms.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let per_shard = |m: &std::collections::HashMap<String, f64>| {
        let mut calls: Vec<(String, f64)> = m
            .iter()
            .filter(|(k, _)| k.starts_with("gdpr_consumer_get_records_calls_total{"))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        calls.sort_by(|a, b| a.0.cmp(&b.0));
        calls
    };
    let (before, counted_before) = (calls.load(Ordering::SeqCst), metrics(&address).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (quiet, counted_after) = (
        calls.load(Ordering::SeqCst) - before,
        metrics(&address).await,
    );
    assert!(daemon.stop().success());
    let (counted_before, counted_after) = (per_shard(&counted_before), per_shard(&counted_after));
    assert_eq!(counted_after.len(), 2, "{counted_after:?}");
    for ((shard, b), (_, a)) in counted_before.iter().zip(&counted_after) {
        assert!(
            (1.0..=4.0).contains(&(a - b)),
            "{shard}: {} GetRecords calls over 4 quiet seconds",
            a - b
        );
    }
    // Per shard: 4 s / 1600 ms is 2.5 calls (3 at a boundary); at 200 ms it would be 20.
    assert!(
        (2..=2 * 4).contains(&quiet),
        "{quiet} GetRecords calls over 4 quiet seconds on 2 shards"
    );
    assert_eq!(backend.count(), 1);
}

/// A request written after a quiet spell, when the back-off is at its longest, reaches the
/// backend within `idle_poll_interval_ms` plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_quiet_spell_is_read_within_the_idle_interval() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let request = |n: usize| {
        (
            format!("u-{n}"),
            serde_json::to_vec(&deletion(&format!("r-{n}"), &format!("u-{n}"))).unwrap(),
        )
    };
    put(&client, "events", &[request(1)]).await;
    let ws = idle_workspace(&kinesis.endpoint, &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_caught_up(&daemon, &backend, 1).await;
    // Long enough that a back-off that kept doubling (3.2 s, then 6.4 s) would be late.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let written = Instant::now();
    put(&client, "events", &[request(2)]).await;
    wait_until(Duration::from_secs(30), "the second request", || {
        backend.count() >= 2
    })
    .await;
    let took = written.elapsed();
    assert!(daemon.stop().success());
    assert!(
        took <= Duration::from_millis(1_600 + 1_000),
        "the request after a quiet spell took {took:?}"
    );
    assert_eq!(backend.count(), 2);
}

/// An idle interval shorter than the poll interval is refused at start, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_interval_below_the_poll_interval_is_refused() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    ws.edit_config("idle_poll_interval_ms = 400", "idle_poll_interval_ms = 100");
    let config = ws.config();
    let (code, _, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config.to_str().unwrap(), "--dry-run"])
    });
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[stream] idle_poll_interval_ms = 100 is below poll_interval_ms = 200"),
        "{err}"
    );
}
