//! The main job end to end: every deletion request reaches the backend exactly once,
//! across duplicates in the stream and restarts of the daemon.

use std::collections::HashSet;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::support::*;

/// Checks every request the backend got and returns the request numbers N (of `r-N`).
fn check_requests(received: &[Received]) -> Vec<usize> {
    received
        .iter()
        .map(|r| {
            let user = r
                .path
                .strip_prefix("/v1/users/")
                .and_then(|p| p.strip_suffix("/anonymize"))
                .unwrap_or_else(|| panic!("unexpected path {}", r.path));
            let n: usize = user
                .strip_prefix("del-user-")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected user {user}"));
            assert_eq!(r.method, "POST");
            assert_eq!(
                r.authorization.as_deref(),
                Some(format!("Bearer {TOKEN}").as_str())
            );
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            assert_eq!(r.body, format!(r#"{{"user_id":"del-user-{n}"}}"#));
            let expected_key = hex::encode(Sha256::digest(format!("anonymize_user\nr-{n}")));
            assert_eq!(r.idempotency_key.as_deref(), Some(expected_key.as_str()));
            n
        })
        .collect()
}

fn assert_each_once(numbers: &[usize], count: usize) {
    let unique: HashSet<_> = numbers.iter().collect();
    assert_eq!(
        unique.len(),
        numbers.len(),
        "a request was sent twice: {numbers:?}"
    );
    assert_eq!(numbers.len(), count, "requests received: {numbers:?}");
    assert!(numbers.iter().all(|&n| n < count));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_reaches_the_backend_exactly_once() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 4).await;
    let records = traffic(5_000, 50, 10);
    assert_eq!(records.len(), 5_010);
    put(&client, "events", &records).await;

    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(90), "50 requests", || {
        backend.count() >= 50
    })
    .await;
    // Every shard caught up: the retried duplicates at the end have been read too.
    wait_until(Duration::from_secs(60), "all 4 shards caught up", || {
        caught_up_count(&daemon.stderr()) >= 4
    })
    .await;
    let log = daemon.stderr();
    assert!(daemon.stop().success());

    assert_each_once(&check_requests(&backend.received()), 50);
    assert!(ws.dead_letters().is_empty());
    // The log names no user and no request.
    assert!(!log.contains("del-user-"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_loses_nor_repeats_a_request() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 4).await;
    put(&client, "events", &traffic(5_000, 50, 10)).await;

    // A slow backend, so the stop lands halfway.
    let backend = Backend::with_behaviour(Duration::from_millis(60), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);

    let first = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(90), "some requests", || {
        backend.count() >= 15
    })
    .await;
    let status = first.stop();
    assert!(status.success(), "SIGTERM must exit 0: {status}");
    let halfway = backend.count();
    assert!(
        halfway < 50,
        "the stop came too late to test anything ({halfway})"
    );

    ws.with_metrics();
    let second = ws.start_daemon(&[]);
    let address = metrics_address(&second).await;
    wait_until(Duration::from_secs(90), "all requests", || {
        backend.count() >= 50
    })
    .await;
    wait_until(Duration::from_secs(60), "all shards caught up", || {
        caught_up_count(&second.stderr()) >= 4
    })
    .await;
    let read_again = records_read(&address).await;
    assert!(second.stop().success());
    assert_each_once(&check_requests(&backend.received()), 50);
    // The restart read from the checkpoints, not from the start of the stream.
    assert!(
        read_again < 5_010.0,
        "the second run read {read_again} records: checkpoints were not used"
    );

    // Nothing new on the stream: a third run reads nothing again and sends nothing.
    let third = ws.start_daemon(&[]);
    let address = metrics_address(&third).await;
    wait_until(Duration::from_secs(60), "all shards caught up", || {
        caught_up_count(&third.stderr()) >= 4
    })
    .await;
    assert_eq!(records_read(&address).await, 0.0);
    assert!(third.stop().success());
    assert_eq!(backend.count(), 50);
}

/// Records read so far, over every shard, from `/metrics`.
async fn records_read(address: &str) -> f64 {
    metrics(address)
        .await
        .iter()
        .filter(|(name, _)| name.starts_with("gdpr_consumer_records_read_total"))
        .map(|(_, value)| value)
        .sum()
}

/// SIGTERM while a request waits for its next attempt: the daemon stops at once, leaves
/// the request unsettled (no dead letter), and the next start sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_retry_wait_leaves_the_request_for_the_next_start() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let backend = Backend::with_behaviour(
        Duration::ZERO,
        |_, earlier| if earlier == 0 { 503 } else { 200 },
    )
    .await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let text = std::fs::read_to_string(ws.config())
        .unwrap()
        .replace("initial_backoff_ms = 20", "initial_backoff_ms = 20000")
        .replace("max_backoff_ms = 200", "max_backoff_ms = 20000");
    std::fs::write(ws.config(), text).unwrap();
    let first = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "the first attempt", || {
        backend.count() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    assert!(first.stop().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the stop waited for the retry"
    );
    assert_eq!(backend.count(), 1);
    assert!(
        ws.dead_letters().is_empty(),
        "an interrupted request is not a failure"
    );

    let second = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "the request", || {
        backend.count() == 2
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&second.stderr()) >= 1
    })
    .await;
    assert!(second.stop().success());
    let received = backend.received();
    assert_eq!(received[1].path, received[0].path);
    assert_eq!(received[1].idempotency_key, received[0].idempotency_key);
    assert!(ws.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_on_two_shards_at_once_is_sent_once() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    // Each request written twice under two partition keys (a producer's retry), so the two
    // copies often sit on different shards and are read at the same moment.
    let mut records = Vec::new();
    for n in 0..30 {
        let data = deletion(&format!("r-{n}"), &format!("del-user-{n}"))
            .to_string()
            .into_bytes();
        records.push((format!("first-{n}"), data.clone()));
        records.push((format!("retry-{n}"), data));
    }
    put(&client, "events", &records).await;
    let backend = Backend::with_behaviour(Duration::from_millis(30), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "30 requests", || {
        backend.count() >= 30
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    assert!(daemon.stop().success());
    assert_each_once(&check_requests(&backend.received()), 30);
}
