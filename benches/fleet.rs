//! A fleet on one machine: 1, 2, then 3 worker processes of the daemon binary share a
//! 64-shard stream through DynamoDB leases and a shared state (dynalite, the JS emulator),
//! reading the in-process replay endpoint of the end-to-end bench.
//!
//! `cargo bench --bench fleet` replays 200k events (1% deletion requests, a quarter of the
//! plain ones written again later under another partition key, so on another shard) to
//! each fleet size, each run with a fresh dynalite and a fresh endpoint over the same data.
//! A run: start the workers, wait until the leases are spread (each worker within one of
//! its fair share), then open the stream (every record readable at once) and measure until
//! the backend got every request and every shard is checkpointed at its last record; then
//! SIGTERM every worker. Printed per run: wall time and events/s over that window, the
//! workers' CPU time per event (the scheduler's CPU time of every thread of every worker, from
//! /proc/PID/task/*/schedstat), dynalite's, each worker's peak RSS, and the DynamoDB calls per event
//! and per request by table and operation, counted by a proxy in front of dynalite, with
//! the read and write request units an on-demand table would bill for them.
//!
//! Fails loudly unless the backend got each request exactly once (repeats are printed
//! first) and the lease table ends with each shard checkpointed at its last record. Under
//! `cargo test` the same runs on 4 shards, 2k events, 1 and 2 workers.

mod common;
#[path = "common/replay.rs"]
mod replay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use gdpr_consumer::actions::idempotency_key;
use gdpr_consumer::source::RawRecord;
use replay::*;
use serde_json::Value;

const SEED: u64 = 0xf1ee7;
/// The state key every worker shares (hex, 32 bytes).
const STATE_KEY: &str = "5f0c6a1e9b2d4c3f8a7e6d5c4b3a29180f1e2d3c4b5a69788796a5b4c3d2e1f0";
const LEASE_TABLE: &str = "gdpr-consumer";
const STATE_TABLE: &str = "gdpr-consumer-state";
/// Every `AGAIN`th plain deletion request is written a second time, [`AGAIN_AFTER`]
/// records later (another shard: records are dealt round-robin) under another key.
const AGAIN: usize = 4;
const AGAIN_AFTER: usize = 997;

/// What one invocation runs: in full under `cargo bench`, a smoke pass under `cargo test`.
struct Plan {
    shards: usize,
    events: usize,
    workers: Vec<usize>,
    lease_ms: u64,
}

#[tokio::main]
async fn main() {
    let plan = match std::env::args().any(|a| a == "--bench") {
        true => Plan {
            shards: 64,
            events: std::env::var("BENCH_EVENTS").map_or(200_000, |v| {
                v.trim().parse().expect("BENCH_EVENTS is a number")
            }),
            workers: vec![1, 2, 3],
            // Short enough that leases spread in seconds (a steal a third of it), long
            // enough that renewals stay a small part of the calls.
            lease_ms: 3_000,
        },
        false => Plan {
            shards: 4,
            events: 2_000,
            workers: vec![1, 2],
            lease_ms: 1_500,
        },
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "gdpr-consumer workers <- replay endpoint ({} shards, in this process); leases and state \
         in dynalite (Node.js) behind a counting proxy; lease_duration_ms = {}; {cpus} CPUs",
        plan.shards, plan.lease_ms
    );
    let mut runs = Vec::new();
    for &workers in &plan.workers {
        runs.push(run(&plan, workers).await);
    }
    println!();
    println!(
        "workers   events  records requests spread s   wall s   events/s CPU µs/event \
         dynalite µs/event  peak RSS MiB per worker  records read"
    );
    for r in &runs {
        r.print();
    }
    for r in &runs {
        r.print_calls();
    }
}

// ---------------------------------------------------------------------------------------
// The data.

/// The stream, with every `AGAIN`th plain deletion request written again.
struct Data {
    records: Vec<RawRecord>,
    events: usize,
    requests: Vec<String>,
    written_twice: usize,
}

fn data(events: usize) -> Data {
    let stream = common::stream(SEED, events, 0);
    let finder = memchr::memmem::Finder::new(br#""type":"privacy_request""#);
    let mut records = Vec::with_capacity(stream.records.len() + stream.requests.len());
    let mut again: Vec<(usize, RawRecord)> = Vec::new();
    let mut seen = 0;
    let (mut written_twice, mut extra_events) = (0, 0);
    for (n, record) in stream.records.into_iter().enumerate() {
        // Plain JSON only (not gzip, not a KPL aggregate): one event, one request.
        if record.data.first() == Some(&b'{') && finder.find(&record.data).is_some() {
            seen += 1;
            if seen % AGAIN == 0 {
                let mut copy = record.clone();
                copy.partition_key = format!("again-{}", copy.partition_key);
                again.push((n + AGAIN_AFTER, copy));
            }
        }
        records.push(record);
        while again.first().is_some_and(|(at, _)| *at <= n) {
            records.push(again.remove(0).1);
            written_twice += 1;
            extra_events += 1;
        }
    }
    for (_, copy) in again {
        records.push(copy);
        written_twice += 1;
        extra_events += 1;
    }
    Data {
        records,
        events: stream.events + extra_events,
        requests: stream.requests,
        written_twice,
    }
}

// ---------------------------------------------------------------------------------------
// dynalite and the counting proxy.

/// dynalite on a free loopback port, stopped when dropped.
struct Dynalite {
    child: Child,
    endpoint: String,
}

impl Dynalite {
    fn start() -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/dynalite");
        assert!(
            dir.join("node_modules/dynalite").exists(),
            "dynalite is not installed: run `npm ci --prefix tools/dynalite`"
        );
        let mut child = Command::new("node")
            .arg(dir.join("start-loopback.js"))
            .env("DYNALITE_PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (is Node.js installed?)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected dynalite output {line:?}"));
        Dynalite {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    /// A client straight to dynalite (not counted): the bench's own reads of the leases.
    fn client(&self) -> aws_sdk_dynamodb::Client {
        use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
        let conf = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("AKIDBENCH", "secret", None, None, "bench"))
            .build();
        aws_sdk_dynamodb::Client::from_conf(conf)
    }
}

impl Drop for Dynalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One table's calls of one operation.
#[derive(Clone, Copy, Default)]
struct Count {
    calls: u64,
    /// Read request units an on-demand table bills: what dynalite reports (DynamoDB's
    /// rules: 1 per 4 KB read, half for an eventually consistent read, a Query or Scan 1
    /// per 4 KB of all it read), at least 1 (or half) per call, as DynamoDB bills an empty
    /// Query or a missing item.
    rru: f64,
    /// Write request units: what dynalite reports (1 per 1 KB of the larger of the old and
    /// new item), at least 1 per call; a conditional write refused is billed too (1 WRU,
    /// the items being under 1 KB) though no answer says so.
    wru: f64,
    /// Conditional writes refused.
    refused: u64,
    /// The calls' times, summed: from the proxy taking the call to dynalite's answer.
    busy: Duration,
}

type Counts = BTreeMap<(&'static str, String), Count>;

/// A proxy in front of dynalite that counts calls by table (`TableName`) and operation
/// (`X-Amz-Target`), and asks dynalite for the capacity each consumed
/// (`ReturnConsumedCapacity`; dynalite does not check signatures). Answers pass unchanged.
struct Proxy {
    target: String,
    client: reqwest::Client,
    counts: Mutex<Counts>,
    /// Calls in flight now, and the most there were since [`Proxy::reset_peak`].
    in_flight: AtomicU64,
    peak: AtomicU64,
}

impl Proxy {
    fn router(self: Arc<Self>) -> Router {
        Router::new().fallback(proxy).with_state(self)
    }

    fn reset_peak(&self) {
        self.peak
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }
}

fn table_kind(name: &str) -> &'static str {
    match name {
        LEASE_TABLE => "lease",
        STATE_TABLE => "state",
        _ => "other",
    }
}

fn is_data_plane(operation: &str) -> bool {
    matches!(
        operation,
        "GetItem"
            | "PutItem"
            | "UpdateItem"
            | "DeleteItem"
            | "Query"
            | "Scan"
            | "BatchGetItem"
            | "BatchWriteItem"
            | "TransactGetItems"
            | "TransactWriteItems"
    )
}

fn is_read(operation: &str) -> bool {
    matches!(
        operation,
        "GetItem" | "Query" | "Scan" | "BatchGetItem" | "TransactGetItems"
    )
}

async fn proxy(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let taken = Instant::now();
    let now = proxy.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    proxy.peak.fetch_max(now, Ordering::Relaxed);
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.split_once('.'))
        .map_or("", |(_, op)| op)
        .to_owned();
    let mut request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let table = table_kind(request["TableName"].as_str().unwrap_or(""));
    let consistent = request["ConsistentRead"].as_bool() == Some(true);
    let read = is_read(&operation);
    let forwarded = if is_data_plane(&operation) && request.is_object() {
        request["ReturnConsumedCapacity"] = "TOTAL".into();
        serde_json::to_vec(&request).unwrap()
    } else {
        body.to_vec()
    };
    let mut call = proxy.client.post(&proxy.target).body(forwarded);
    for (name, value) in &headers {
        if !matches!(name.as_str(), "host" | "content-length") {
            call = call.header(name, value);
        }
    }
    let answer = match call.send().await {
        Ok(answer) => answer,
        Err(e) => {
            proxy.in_flight.fetch_sub(1, Ordering::Relaxed);
            return (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
        }
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let answer_body = answer.bytes().await.unwrap_or_default();
    proxy.in_flight.fetch_sub(1, Ordering::Relaxed);
    {
        let parsed: Value = serde_json::from_slice(&answer_body).unwrap_or(Value::Null);
        let mut counts = proxy.counts.lock().unwrap();
        let count = counts.entry((table, operation)).or_default();
        count.calls += 1;
        count.busy += taken.elapsed();
        let reported = parsed["ConsumedCapacity"]["CapacityUnits"].as_f64();
        let refused = parsed["__type"]
            .as_str()
            .is_some_and(|t| t.ends_with("ConditionalCheckFailedException"));
        count.refused += u64::from(refused);
        match (reported, refused) {
            (Some(units), _) if read => count.rru += units.max(if consistent { 1.0 } else { 0.5 }),
            (Some(units), _) => count.wru += units.max(1.0),
            (None, true) => count.wru += 1.0,
            (None, false) => {} // a failed call, or not a data-plane one
        }
    }
    let mut response = Response::builder().status(status.as_u16());
    for (name, value) in &answer_headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            response = response.header(name, value);
        }
    }
    response.body(axum::body::Body::from(answer_body)).unwrap()
}

/// `after - before`, per table and operation.
fn minus(after: &Counts, before: &Counts) -> Counts {
    after
        .iter()
        .map(|(key, a)| {
            let b = before.get(key).copied().unwrap_or_default();
            let count = Count {
                calls: a.calls - b.calls,
                rru: a.rru - b.rru,
                wru: a.wru - b.wru,
                refused: a.refused - b.refused,
                busy: a.busy - b.busy,
            };
            (key.clone(), count)
        })
        .filter(|(_, c)| c.calls > 0)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The workers.

/// One worker: the daemon binary in its own directory (config, 10 rules), its log kept.
struct Worker {
    child: Child,
    status_url: String,
    metrics_url: String,
    dir: tempfile::TempDir,
}

impl Worker {
    fn start(kinesis: &str, backend: &str, dynamo: &str, lease_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        common::write_rules(&rules, 10, common::Shape::Prefilter);
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = format!(
            r#"[stream]
name = "{STREAM}"
endpoint_url = "{kinesis}"
region = "us-east-1"
start = "trim-horizon"
poll_interval_ms = 200
idle_poll_interval_ms = 200

[state]
path = "state.redb"
key_env = "BENCH_STATE_KEY"

[rules]
dir = "rules"

[actions.anonymize_user]
method = "POST"
url = "{backend}/v1/users/{{user_id}}/anonymize"
bearer_token_env = "BACKEND_TOKEN"
allow_insecure_http = true

[metrics]
listen = "{metrics}"

[coordination]
kind = "dynamodb"
region = "us-east-1"
endpoint_url = "{dynamo}"
create_tables = true
lease_duration_ms = {lease_ms}
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gdpr-consumer"))
            .current_dir(dir.path())
            .args(["run", "--config", "config.toml"])
            .env("BACKEND_TOKEN", "bench-token")
            .env("BENCH_STATE_KEY", STATE_KEY)
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KINESIS")
            .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
            .env("GDPR_CONSUMER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Worker {
            child,
            status_url: format!("http://{metrics}/status"),
            metrics_url: format!("http://{metrics}/metrics"),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Fails (with its log) if the worker has exited.
    fn check_alive(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("a worker exited ({status}) before {what}:\n{}", self.log());
        }
    }

    async fn status(&self, client: &reqwest::Client) -> Option<Value> {
        client
            .get(&self.status_url)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// Records read, over the shards it read (`records_read_total`).
    async fn records_read(&self) -> u64 {
        let text = reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("gdpr_consumer_records_read_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// CPU time of every thread of the process, and its peak RSS.
    fn usage(&self) -> (Duration, u64) {
        let pid = self.child.id();
        (common::cpu_time(pid), common::peak_rss_kib(pid))
    }

    /// SIGTERM, then the clean exit (0) the daemon promises.
    async fn stop(mut self) {
        let log = self.dir.path().join("daemon.log");
        common::stop(&mut self.child, &log, "a worker").await;
    }
}

impl Drop for Worker {
    /// A run that failed leaves no worker behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every item of the lease table, read straight from dynalite.
async fn leases(client: &aws_sdk_dynamodb::Client) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    let mut start = None;
    loop {
        let Ok(page) = client
            .scan()
            .table_name(LEASE_TABLE)
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
        else {
            return out; // not created yet
        };
        for item in page.items.unwrap_or_default() {
            out.push(
                item.into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_s().ok()?.clone())))
                    .collect(),
            );
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return out;
        }
    }
}

/// Whether `workers` workers hold all `shards` leases, each within one of its fair share.
async fn spread(client: &aws_sdk_dynamodb::Client, workers: usize, shards: usize) -> bool {
    let mut owners: HashMap<String, usize> = HashMap::new();
    for lease in leases(client).await {
        if let Some(owner) = lease.get("leaseOwner") {
            *owners.entry(owner.clone()).or_default() += 1;
        }
    }
    let fair = shards.div_ceil(workers);
    owners.len() == workers
        && owners.values().sum::<usize>() == shards
        && owners.values().all(|&n| n + 1 >= fair && n <= fair)
}

// ---------------------------------------------------------------------------------------
// A run.

struct Run {
    workers: usize,
    events: usize,
    records: usize,
    requests: usize,
    written_twice: usize,
    /// From the first worker's start to the leases spread.
    spread: Duration,
    /// From the stream's opening to the last request and checkpoint.
    wall: Duration,
    cpu: Duration,
    dynalite_cpu: Duration,
    peak_rss_kib: Vec<u64>,
    records_read: u64,
    /// The most DynamoDB calls in flight at once while the records were read.
    peak_in_flight: u64,
    /// DynamoDB calls while the leases spread, and while the records were read.
    start_up: Counts,
    counts: Counts,
}

async fn run(plan: &Plan, workers: usize) -> Run {
    let data = data(plan.events);
    let records = data.records.len();
    let release = vec![Duration::ZERO; records];
    // Live, and opened only once the leases are spread: until then nothing is readable.
    let endpoint = Arc::new(Endpoint::live(data.records, release, plan.shards));
    let last = endpoint.last_sequence_numbers();
    let kinesis = Server::start(endpoint.clone().router()).await;
    let calls = Calls::default();
    let backend = Server::start(calls.router()).await;
    let dynalite = Dynalite::start();
    let counter = Arc::new(Proxy {
        target: dynalite.endpoint.clone(),
        client: reqwest::Client::new(),
        counts: Mutex::default(),
        in_flight: AtomicU64::new(0),
        peak: AtomicU64::new(0),
    });
    let dynamo = Server::start(counter.clone().router()).await;
    let direct = dynalite.client();
    let http = reqwest::Client::new();

    let started = Instant::now();
    let mut fleet: Vec<Worker> = (0..workers)
        .map(|_| Worker::start(&kinesis.url, &backend.url, &dynamo.url, plan.lease_ms))
        .collect();
    let deadline = started + Duration::from_secs(180);
    while !spread(&direct, workers, plan.shards).await {
        for w in &mut fleet {
            w.check_alive("the leases spread");
        }
        assert!(
            Instant::now() < deadline,
            "leases not spread over {workers} workers:\n{}",
            fleet
                .iter()
                .map(Worker::log)
                .collect::<Vec<_>>()
                .join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spread_took = started.elapsed();
    let before_counts = counter.snapshot();
    let before_cpu: Vec<Duration> = fleet.iter().map(|w| w.usage().0).collect();
    let before_dynalite = common::cpu_time(dynalite.child.id());
    counter.reset_peak();
    let opened = Instant::now();
    endpoint.epoch.set(opened).unwrap();

    let keys: HashSet<String> = data
        .requests
        .iter()
        .map(|id| idempotency_key("anonymize_user", id))
        .collect();
    let deadline = opened + Duration::from_secs(600);
    loop {
        let sent: HashSet<String> = calls
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, k)| k.clone())
            .collect();
        if keys.iter().all(|k| sent.contains(k)) {
            let mut checkpointed: HashSet<String> = HashSet::new();
            for w in &fleet {
                let Some(status) = w.status(&http).await else {
                    continue;
                };
                for shard in status["shards"].as_array().map_or(&[][..], Vec::as_slice) {
                    let id = shard["shard_id"].as_str().unwrap_or("");
                    if last
                        .get(id)
                        .is_some_and(|l| shard["checkpoint"] == l.as_str())
                    {
                        checkpointed.insert(id.to_owned());
                    }
                }
            }
            if checkpointed.len() == last.len() {
                break;
            }
        }
        for w in &mut fleet {
            w.check_alive("every request was sent and every shard checkpointed");
        }
        assert!(
            Instant::now() < deadline,
            "timed out: every request sent and every shard checkpointed at its last record:\n{}",
            fleet
                .iter()
                .map(Worker::log)
                .collect::<Vec<_>>()
                .join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = opened.elapsed();
    let after_counts = counter.snapshot();
    let peak_in_flight = counter.peak.load(Ordering::Relaxed);
    let dynalite_cpu = common::cpu_time(dynalite.child.id()) - before_dynalite;
    let usage: Vec<(Duration, u64)> = fleet.iter().map(Worker::usage).collect();
    let cpu = usage
        .iter()
        .zip(&before_cpu)
        .map(|((after, _), before)| *after - *before)
        .sum();
    let mut records_read = 0;
    for w in &fleet {
        records_read += w.records_read().await;
    }
    for w in fleet {
        w.stop().await;
    }

    // The lease table ends with every shard checkpointed at its last record.
    let checkpoints: HashMap<String, String> = leases(&direct)
        .await
        .into_iter()
        .filter_map(|l| Some((l.get("leaseKey")?.clone(), l.get("checkpoint")?.clone())))
        .collect();
    for (shard, sequence_number) in &last {
        assert_eq!(
            checkpoints.get(shard),
            Some(sequence_number),
            "{shard}'s checkpoint in the lease table"
        );
    }
    // Each request reached the backend exactly once; repeats are printed before failing.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, key) in calls.0.lock().unwrap().iter() {
        *seen.entry(key.clone()).or_default() += 1;
    }
    let missing = keys.iter().filter(|k| !seen.contains_key(*k)).count();
    let repeated: usize = seen.values().map(|n| n - 1).sum();
    let unknown = seen.keys().filter(|k| !keys.contains(*k)).count();
    println!(
        "{workers} worker(s): {} requests ({} written twice): {missing} missing, {repeated} \
         sent again, {unknown} unknown; {records_read} records read of {records}",
        keys.len(),
        data.written_twice
    );
    assert!(
        missing == 0 && repeated == 0 && unknown == 0,
        "backend: {missing} requests missing, {repeated} sent again, {unknown} unknown"
    );
    assert!(
        records_read >= records as u64,
        "{records_read} records read of {records}"
    );

    Run {
        workers,
        events: data.events,
        records,
        requests: keys.len(),
        written_twice: data.written_twice,
        spread: spread_took,
        wall,
        cpu,
        dynalite_cpu,
        peak_rss_kib: usage.iter().map(|(_, rss)| *rss).collect(),
        records_read,
        peak_in_flight,
        start_up: minus(&before_counts, &Counts::default()),
        counts: minus(&after_counts, &before_counts),
    }
}

impl Run {
    fn print(&self) {
        let wall = self.wall.as_secs_f64();
        let rss: Vec<String> = self
            .peak_rss_kib
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect();
        println!(
            "{:>7} {:>8} {:>8} {:>8} {:>8.1} {:>8.2} {:>10.0} {:>12.1} {:>17.1}  {:>23}  {:>12}",
            self.workers,
            self.events,
            self.records,
            self.requests,
            self.spread.as_secs_f64(),
            wall,
            self.events as f64 / wall,
            self.cpu.as_secs_f64() * 1e6 / self.events as f64,
            self.dynalite_cpu.as_secs_f64() * 1e6 / self.events as f64,
            rss.join(" / "),
            self.records_read,
        );
    }

    /// The calls while the records were read, per 1,000 events and per request, with the
    /// request units a real on-demand table would bill; then the start-up's in one line.
    fn print_calls(&self) {
        let wall = self.wall.as_secs_f64();
        let (events, requests) = (self.events as f64, self.requests as f64);
        println!();
        println!(
            "{} worker(s), DynamoDB calls while {} events ({} requests, {} written twice) were \
             read in {wall:.1} s:",
            self.workers, self.events, self.requests, self.written_twice
        );
        println!(
            "table  operation        calls  /1k events  /request    per s  RRU/1k ev  WRU/1k ev  \
             RRU/req  WRU/req  refused"
        );
        let (mut rru, mut wru, mut total, mut busy) = (0.0, 0.0, 0, Duration::ZERO);
        for ((table, operation), c) in &self.counts {
            let (r, w) = (c.rru, c.wru);
            rru += r;
            wru += w;
            total += c.calls;
            busy += c.busy;
            println!(
                "{table:<6} {operation:<14} {:>7} {:>11.2} {:>9.2} {:>8.1} {:>10.2} {:>10.2} {:>8.2} {:>8.2} {:>8}",
                c.calls,
                c.calls as f64 * 1e3 / events,
                c.calls as f64 / requests,
                c.calls as f64 / wall,
                r * 1e3 / events,
                w * 1e3 / events,
                r / requests,
                w / requests,
                c.refused,
            );
        }
        println!(
            "total  {:<14} {total:>7} {:>11.2} {:>9.2} {:>8.1} {:>10.2} {:>10.2} {:>8.2} {:>8.2}",
            "",
            total as f64 * 1e3 / events,
            total as f64 / requests,
            total as f64 / wall,
            rru * 1e3 / events,
            wru * 1e3 / events,
            rru / requests,
            wru / requests,
        );
        println!(
            "DynamoDB calls in flight (through the proxy): {:.2} on average (the calls' summed \
             time over the wall time), {} at most; a call took {:.2} ms on average",
            busy.as_secs_f64() / wall,
            self.peak_in_flight,
            busy.as_secs_f64() * 1e3 / total.max(1) as f64,
        );
        let start_up: Vec<String> = self
            .start_up
            .iter()
            .map(|((table, op), c)| format!("{table} {op} {}", c.calls))
            .collect();
        println!(
            "start-up ({:.1} s, tables created, leases spread): {}",
            self.spread.as_secs_f64(),
            start_up.join(", ")
        );
    }
}
