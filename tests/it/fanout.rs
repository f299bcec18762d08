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

/// Records read and requests found already done, from a daemon's metrics: a record read
/// twice shows in both.
fn reads(m: &HashMap<String, f64>) -> (f64, f64) {
    (
        metric_sum(m, "gdpr_consumer_records_read_total", ""),
        metric_sum(m, "gdpr_consumer_actions_total", "outcome=\"duplicate\""),
    )
}

/// Starts the daemon (with metrics), waits until the backend has `total` calls, and stops
/// it: its metrics and log.
async fn run_phase(
    ws: &Workspace,
    backend: &Backend,
    total: usize,
) -> (HashMap<String, f64>, String) {
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(60), "the backend calls", || {
        backend.count() >= total
    })
    .await;
    let m = metrics(&address).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
    (m, log)
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

/// A split while subscribed: the parent is read to its end (kinesis-mock never ends a
/// closed shard's subscription: the shard list says it closed, and its last records are
/// polled), then the children are subscribed to; every request once, each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_while_subscribed_reads_parents_before_children() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    // Slow enough that the parent still has unhandled records when the split happens.
    let backend = Backend::with_behaviour(Duration::from_millis(30), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    put(&client, "events", &requests(0, 40)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "a first call", || {
        backend.count() >= 3
    })
    .await;
    split_in_half(&client, "events", "shardId-000000000000").await;
    wait_active(&client, "events").await;
    assert!(
        backend.count() < 40,
        "the parent was drained before the split"
    );
    put(&client, "events", &requests(40, 80)).await;
    wait_until(Duration::from_secs(60), "all 80", || backend.count() >= 80).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");

    assert_each_once_in_key_order(&backend, 80);
    assert!(log.contains("shard read to its end"), "{log}");
    // kinesis-mock never ends a closed shard's subscription: the fallback finished it.
    assert!(
        log.contains("shard closed and its subscription idle"),
        "{log}"
    );
    for child in ["shardId-000000000001", "shardId-000000000002"] {
        assert!(
            log.lines()
                .any(|l| l.contains("starting shard") && l.contains(child)),
            "{child} not started: {log}"
        );
    }
    let (_, out, _) = ws.run(&[
        "checkpoints",
        "list",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    let checkpoints = json_lines(&out);
    assert!(
        checkpoints
            .iter()
            .any(|c| c["shard_id"] == "shardId-000000000000" && c["shard_end"] == true),
        "{out}"
    );
}

/// A stop and an immediate start mid-stream: the new subscriptions start after the
/// checkpoint, and Kinesis's ResourceInUseException (the old subscription still counted
/// as open) is waited out, not a failure; nothing repeated, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_resumes_after_the_checkpoint_through_resource_in_use() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let backend = Backend::with_behaviour(Duration::from_millis(20), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.with_metrics();
    put(&client, "events", &requests(0, 60)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "some calls", || {
        backend.count() >= 10
    })
    .await;
    let first = daemon.stderr();
    assert!(daemon.stop().success(), "{first}");
    let before = backend.count();
    assert!(before < 60, "everything handled before the restart");
    put(&client, "events", &requests(60, 80)).await;
    let (m, log) = run_phase(&ws, &backend, 80).await;

    assert_each_once_in_key_order(&backend, 80);
    assert_eq!(
        reads(&m),
        ((80 - before) as f64, 0.0),
        "the second run read a record the first had handled"
    );
    assert!(
        log.contains("ResourceInUseException"),
        "no ResourceInUse seen: nothing tested: {log}"
    );
    assert!(log.contains("Kinesis call failed; retrying"), "{log}");
    assert!(
        !log.contains("shard worker failed"),
        "ResourceInUse failed a worker: {log}"
    );
}

/// polling → fan-out → polling on one state file: each run goes on where the last one
/// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_read_modes_keeps_the_position() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    put(&client, "events", &requests(0, 20)).await;
    let (m, _) = run_phase(&ws, &backend, 20).await;
    assert_eq!(reads(&m), (20.0, 0.0), "polling");
    fan_out(&ws);
    put(&client, "events", &requests(20, 40)).await;
    let (m, log) = run_phase(&ws, &backend, 40).await;
    assert!(log.contains("enhanced fan-out consumer active"), "{log}");
    assert_eq!(reads(&m), (20.0, 0.0), "fan-out after polling");
    ws.edit_config("read = \"fan-out\"\n", "");
    put(&client, "events", &requests(40, 60)).await;
    let (m, _) = run_phase(&ws, &backend, 60).await;
    assert_eq!(reads(&m), (20.0, 0.0), "polling after fan-out");
    assert_each_once_in_key_order(&backend, 60);
}

/// Subscriptions renewed every second (Kinesis's five minutes, shortened) while records
/// keep coming: each renewal goes on from the last continuation sequence number, nothing
/// lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_subscriptions_lose_and_repeat_nothing() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.edit_config("[stream]\n", "[stream]\nsubscription_renew_ms = 1000\n");
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    // kinesis-mock holds a dropped subscription open for a few seconds: each renewal
    // waits out its ResourceInUseException (real Kinesis lets a new one take over).
    for wave in 0..12 {
        put(&client, "events", &requests(wave * 5, wave * 5 + 5)).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    wait_until(Duration::from_secs(30), "all 60", || backend.count() >= 60).await;
    let address = metrics_address(&daemon).await;
    let m = metrics(&address).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");

    assert_each_once_in_key_order(&backend, 60);
    assert_eq!(reads(&m), (60.0, 0.0), "a record read twice");
    let renewed = metric(
        &m,
        "gdpr_consumer_subscriptions_started_total{reason=\"renewal\"}",
    );
    assert!(renewed >= 2.0, "renewals: {m:?}");
    // A planned renewal is quiet: the old subscription still counted open for a moment is
    // no fault, no retry, and no failed attempt counts as a subscription started.
    assert_eq!(
        metric(
            &m,
            "gdpr_consumer_subscriptions_started_total{reason=\"error\"}"
        ),
        0.0,
        "{m:?}"
    );
    assert!(!log.contains("kinesis_retry"), "{log}");
}

/// The consumer removed while the daemon runs (by hand, or `consumer deregister`): it is
/// registered again, as at start, and reading goes on; nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_removed_while_running_is_registered_again() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.edit_config("[stream]\n", "[stream]\nsubscription_renew_ms = 1000\n");
    let daemon = ws.start_daemon(&[]);
    put(&client, "events", &requests(0, 5)).await;
    wait_until(Duration::from_secs(30), "5", || backend.count() >= 5).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&[
            "consumer",
            "deregister",
            "--config",
            ws.config().to_str().unwrap(),
        ])
    });
    assert_eq!(code, 0, "{out}{err}");
    // Found gone at the next subscription (kinesis-mock keeps open ones going).
    wait_until(Duration::from_secs(30), "registered again", || {
        daemon.stderr().contains("registering it again")
    })
    .await;
    put(&client, "events", &requests(5, 10)).await;
    wait_until(Duration::from_secs(60), "10", || backend.count() >= 10).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
    assert_each_once_in_key_order(&backend, 10);
    assert!(
        consumer_status(&client, "events").await.is_some(),
        "the consumer is registered"
    );
}

/// A subscription lives past the Kinesis call time limit (`call_timeout_ms` bounds the
/// SubscribeToShard call, not its event stream): no error, no resubscription, and records
/// written late still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_the_call_timeout() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.edit_config("[stream]\n", "[stream]\ncall_timeout_ms = 1000\n");
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    put(&client, "events", &requests(0, 5)).await;
    wait_until(Duration::from_secs(30), "5", || backend.count() >= 5).await;
    // Past three attempts of one call.
    tokio::time::sleep(Duration::from_secs(5)).await;
    put(&client, "events", &requests(5, 10)).await;
    wait_until(Duration::from_secs(30), "10", || backend.count() >= 10).await;
    let m = metrics(&address).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
    assert_each_once_in_key_order(&backend, 10);
    let started = |reason: &str| {
        metric(
            &m,
            &format!("gdpr_consumer_subscriptions_started_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(
        (started("initial"), started("error"), started("ended")),
        (1.0, 0.0, 0.0),
        "{log}"
    );
}

/// Two shards merged while subscribed: both parents are read to their end before the
/// child starts; every request once, each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_while_subscribed_reads_both_parents_before_the_child() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let backend = Backend::with_behaviour(Duration::from_millis(30), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    fan_out(&ws);
    put(&client, "events", &requests(0, 40)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "a first call", || {
        backend.count() >= 3
    })
    .await;
    client
        .merge_shards()
        .stream_name("events")
        .shard_to_merge("shardId-000000000000")
        .adjacent_shard_to_merge("shardId-000000000001")
        .send()
        .await
        .unwrap();
    wait_active(&client, "events").await;
    assert!(
        backend.count() < 40,
        "the parents were drained before the merge"
    );
    put(&client, "events", &requests(40, 80)).await;
    wait_until(Duration::from_secs(60), "all 80", || backend.count() >= 80).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");

    assert_each_once_in_key_order(&backend, 80);
    assert!(
        log.lines()
            .any(|l| l.contains("starting shard") && l.contains("shardId-000000000002")),
        "the child did not start: {log}"
    );
    let (_, out, _) = ws.run(&[
        "checkpoints",
        "list",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    let ended = json_lines(&out)
        .iter()
        .filter(|c| c["shard_end"] == true)
        .count();
    assert_eq!(ended, 2, "{out}");
}

/// `run --dry-run` and `capture` poll even with a fan-out config, so they never take the
/// daemon's subscriptions: on kinesalite, which has no fan-out at all, both work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_capture_poll_in_a_fan_out_config() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &requests(0, 3)).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", "http://127.0.0.1:9");
    fan_out(&ws);
    let config = ws.config().to_str().unwrap().to_owned();
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", &config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0, "{err}");
    let decisions = json_lines(&out)
        .iter()
        .filter(|l| l["action"] == "anonymize_user")
        .count();
    assert_eq!(decisions, 3, "{out}");
    let (code, out, err) =
        tokio::task::block_in_place(|| ws.run(&["capture", "--config", &config]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // The daemon itself does fan-out: kinesalite refuses it at start.
    let (code, _, err) = tokio::task::block_in_place(|| ws.run(&["run", "--config", &config]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("consumer gdpr-consumer"), "{err}");
}

/// A TLS endpoint that speaks HTTP/2 only (ALPN `h2`), in front of kinesis-mock (which the
/// daemon cannot verify over TLS): each request is passed on over HTTP/1.1 and its answer
/// streamed back, so SubscribeToShard's event stream flows over HTTP/2 as with AWS. Its
/// certificate (tests/fixtures/h2-proxy) is signed by a test CA the daemon is told to trust
/// with `SSL_CERT_FILE`.
struct H2Proxy {
    endpoint: String,
    /// A shard whose subscriptions go silent after their first message, if any.
    stall: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// (HTTP version, operation) of each request received.
    seen: std::sync::Arc<std::sync::Mutex<Vec<(hyper::Version, String)>>>,
    _server: tokio::task::JoinHandle<()>,
}

/// A response body fed chunk by chunk from the upstream answer.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

impl H2Proxy {
    /// From now on, subscriptions to `shard` get their first message, then nothing.
    fn stall(&self, shard: &str) {
        *self.stall.lock().unwrap() = Some(shard.to_owned());
    }

    async fn start(upstream: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = repo().join("tests/fixtures/h2-proxy");
        let certs = vec![CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let seen: std::sync::Arc<std::sync::Mutex<Vec<(hyper::Version, String)>>> =
            Default::default();
        let client = reqwest::Client::new();
        let upstream = upstream.to_owned();
        let log = seen.clone();
        let stall: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let stalled = stall.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, client, upstream, log, stalled) = (
                    acceptor.clone(),
                    client.clone(),
                    upstream.clone(),
                    log.clone(),
                    stalled.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let stall = stalled.lock().unwrap().clone();
                        forward(
                            request,
                            client.clone(),
                            upstream.clone(),
                            log.clone(),
                            stall,
                        )
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        H2Proxy {
            endpoint,
            stall,
            seen,
            _server: server,
        }
    }
}

async fn forward(
    request: hyper::Request<hyper::body::Incoming>,
    client: reqwest::Client,
    upstream: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<(hyper::Version, String)>>>,
    stall: Option<String>,
) -> Result<hyper::Response<ChannelBody>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let operation = target.rsplit('.').next().unwrap_or("").to_owned();
    log.lock().unwrap().push((parts.version, operation.clone()));
    let body = body.collect().await.unwrap().to_bytes();
    let silent = operation == "SubscribeToShard"
        && stall.is_some_and(|shard| String::from_utf8_lossy(&body).contains(&shard));
    let mut upstream_request = client.post(&upstream).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            upstream_request = upstream_request.header(name.as_str(), value.as_bytes());
        }
    }
    let mut response = upstream_request.send().await.unwrap();
    let mut reply = hyper::Response::builder().status(response.status().as_u16());
    for (name, value) in response.headers() {
        let name = name.as_str();
        if ![
            "connection",
            "transfer-encoding",
            "content-length",
            "keep-alive",
        ]
        .contains(&name)
        {
            reply = reply.header(name, value.as_bytes());
        }
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        // Silent: the first message (so the call returns), then nothing until the reader
        // hangs up. A message starts with its total length (4 bytes, big-endian).
        let mut first: Vec<u8> = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            if !silent {
                if sender.send(chunk).await.is_err() {
                    return;
                }
                continue;
            }
            first.extend_from_slice(&chunk);
            if first.len() >= 4 {
                let length = u32::from_be_bytes(first[..4].try_into().unwrap()) as usize;
                if first.len() >= length {
                    first.truncate(length);
                    let _ = sender.send(first.into()).await;
                    sender.closed().await;
                    return;
                }
            }
        }
    });
    Ok(reply.body(ChannelBody(receiver)).unwrap())
}

/// Fan-out over HTTP/2 and TLS, as against AWS: every Kinesis call (SubscribeToShard
/// included) goes over HTTP/2, and the requests arrive once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_over_http2() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let proxy = H2Proxy::start(&kinesis.endpoint).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&proxy.endpoint, "events", &backend.url);
    fan_out(&ws);
    put(&client, "events", &requests(0, 10)).await;
    let ca = repo().join("tests/fixtures/h2-proxy/ca.pem");
    let daemon = ws.start_daemon_with_env(&[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    wait_until(Duration::from_secs(30), "the first 10", || {
        backend.count() >= 10
    })
    .await;
    put(&client, "events", &requests(10, 20)).await;
    wait_until(Duration::from_secs(30), "all 20", || backend.count() >= 20).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
    assert_each_once_in_key_order(&backend, 20);
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|(_, op)| op == "SubscribeToShard"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(version, _)| *version == hyper::Version::HTTP_2),
        "{seen:?}"
    );
}

/// A shard whose subscription goes silent (no event, not even a heartbeat) holds none of
/// `batches_in_flight` while it waits: with one slot for four shards, the other shards'
/// requests all arrive, wave after wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_does_not_hold_up_the_other_shards() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 4).await;
    let keys = shard_keys(&client, "events").await;
    let proxy = H2Proxy::start(&kinesis.endpoint).await;
    proxy.stall("shardId-000000000000");
    let backend = Backend::start().await;
    let ws = Workspace::new(&proxy.endpoint, "events", &backend.url);
    fan_out(&ws);
    ws.edit_config("[stream]\n", "[stream]\nbatches_in_flight = 1\n");
    let ca = repo().join("tests/fixtures/h2-proxy/ca.pem");
    let daemon = ws.start_daemon_with_env(&[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    // Requests on shards 1 to 3 only, written once every shard is subscribed.
    wait_until(Duration::from_secs(20), "four subscriptions", || {
        proxy
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, op)| op == "SubscribeToShard")
            .count()
            >= 4
    })
    .await;
    // In waves: kinesis-mock pushes what a shard has in one event, so each wave needs
    // each shard to read again after the silent one started waiting.
    for wave in 0..3 {
        let records: Vec<(String, Vec<u8>)> = (wave * 12..wave * 12 + 12)
            .map(|n| {
                let user = format!("f-{n}");
                (
                    keys[1 + n % 3].clone(),
                    deletion(&user, &user).to_string().into_bytes(),
                )
            })
            .collect();
        put(&client, "events", &records).await;
        wait_until(Duration::from_secs(20), "the wave's requests", || {
            backend.count() >= wave * 12 + 12
        })
        .await;
    }
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
    let mut got = numbers(&backend);
    got.sort();
    assert_eq!(got, (0..36).collect::<Vec<_>>());
}
