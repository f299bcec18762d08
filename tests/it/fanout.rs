//! Enhanced fan-out (`[stream] read = "fan-out"`) on kinesis-mock, which serves
//! RegisterStreamConsumer and SubscribeToShard (over HTTP/1.1; see docs/operations.md for
//! HTTP/2): the same guarantees as polling.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

/// Deletion requests `f-{from}`..`f-{to}`, on five partition keys.
fn requests(from: usize, to: usize) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|n| {
            let user = format!("f-{n}");
            (
                format!("key-{}", n % 5),
                deletion(&user, &user).to_string().into_bytes(),
            )
        })
        .collect()
}

/// The request numbers the backend received, in order.
fn numbers(backend: &Backend) -> Vec<usize> {
    backend
        .received()
        .iter()
        .filter_map(|r| {
            r.path
                .strip_prefix("/v1/users/f-")
                .and_then(|p| p.strip_suffix("/anonymize"))
                .map(|n| n.parse().unwrap())
        })
        .collect()
}

/// Every request `0..n` exactly once, and each partition key's in order.
fn assert_each_once_in_key_order(backend: &Backend, n: usize) {
    let got = numbers(backend);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..n).collect::<Vec<_>>(),
        "lost or repeated: {got:?}"
    );
    for key in 0..5 {
        let order: Vec<usize> = got.iter().copied().filter(|m| m % 5 == key).collect();
        let mut expected = order.clone();
        expected.sort();
        assert_eq!(order, expected, "key {key} out of order");
    }
}

fn fan_out(ws: &Workspace) {
    ws.edit_config("[stream]\n", "[stream]\nread = \"fan-out\"\n");
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Sums a metric's series whose labels contain `fragment`.
fn metric_sum(m: &HashMap<String, f64>, name: &str, fragment: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(name) && k.contains(fragment))
        .map(|(_, v)| v)
        .sum()
}

async fn consumer_status(client: &aws_sdk_kinesis::Client, stream: &str) -> Option<String> {
    let arn = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .unwrap()
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_owned();
    client
        .describe_stream_consumer()
        .stream_arn(arn)
        .consumer_name("gdpr-consumer")
        .send()
        .await
        .ok()
        .and_then(|o| {
            o.consumer_description()
                .map(|c| c.consumer_status().as_str().to_owned())
        })
}

/// The consumer is registered at start, records written before and while subscribed all
/// reach the backend once, in key order; reads are counted as fan-out, `/status` says so,
/// and the consumer stays registered after the daemon stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_sends_every_request_once_and_keeps_the_consumer() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.with_metrics();
    assert_eq!(consumer_status(&client, "events").await, None);
    put(&client, "events", &requests(0, 20)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "the first 20", || {
        backend.count() >= 20
    })
    .await;
    // Pushed while subscribed.
    put(&client, "events", &requests(20, 40)).await;
    wait_until(Duration::from_secs(30), "all 40", || backend.count() >= 40).await;
    let address = metrics_address(&daemon).await;
    let m = metrics(&address).await;
    let (_, status) = get(&address, "/status").await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");

    assert_each_once_in_key_order(&backend, 40);
    assert!(
        log.contains("registered the enhanced fan-out consumer"),
        "{log}"
    );
    assert_eq!(
        metric(
            &m,
            "gdpr_consumer_subscriptions_started_total{reason=\"initial\"}"
        ),
        2.0,
        "{m:?}"
    );
    assert!(metric_sum(&m, "gdpr_consumer_subscription_events_total", "") >= 2.0);
    assert_eq!(
        metric_sum(&m, "gdpr_consumer_get_records_calls_total", ""),
        0.0,
        "polled in fan-out mode"
    );
    assert!(
        metric_sum(
            &m,
            "gdpr_consumer_records_read_total",
            "read_mode=\"fan-out\""
        ) >= 40.0,
        "{m:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{status}");
    assert!(
        shards.iter().all(|s| s["read_mode"] == "fan-out"),
        "{status}"
    );
    assert!(
        shards.iter().all(|s| s["millis_behind_latest"].is_i64()),
        "{status}"
    );
    assert_eq!(
        consumer_status(&client, "events").await.as_deref(),
        Some("ACTIVE"),
        "the daemon removed its consumer"
    );
}
