//! End to end: the daemon binary reads a 64-shard stream through aws-sdk-kinesis from an
//! in-process replay endpoint and calls a local backend.
//!
//! `cargo bench --bench end_to_end` replays 10k, 100k and 1M events and prints, per run, the
//! wall time, events/s, the daemon's CPU time per event and its peak RSS; then a latency run
//! releases events live at a steady rate and prints how long each deletion request took from
//! becoming readable to reaching the backend; then the daemon polls shards with nothing to
//! read, without and with the idle back-off, and the CPU time per idle shard-second and per
//! GetRecords call is printed. Every run fails loudly unless the backend got each request
//! exactly once and the daemon read each record once. Under `cargo test` the same runs on a
//! few hundred events and 4 shards.
//!
//! GetRecords answers are pre-built in memory, so what is measured is the SDK (HTTP client,
//! JSON, base64) and the daemon, not the endpoint. Each replay and the latency run go once
//! polling and once in fan-out mode (`[stream] read = "fan-out"`): the endpoint then also
//! answers DescribeStreamConsumer and serves SubscribeToShard event streams from the same
//! pre-built records (an event per pre-built batch, or per what became readable; a
//! heartbeat a second on an idle shard), and the idle run adds a fan-out daemon.

mod common;
#[path = "common/replay.rs"]
mod replay;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gdpr_consumer::source::RawRecord;
use replay::*;
use serde_json::Value;

const SEED: u64 = 0x5eed;

/// What one invocation runs: in full under `cargo bench`, a smoke pass under `cargo test`.
struct Plan {
    shards: usize,
    sizes: Vec<usize>,
    /// Daemons run on each replay, the best reported (the machine is shared).
    repeats: usize,
    live_events_per_second: f64,
    live_seconds: f64,
    /// Idle run: time for the poll back-off to settle, then the time measured.
    idle_settle: Duration,
    idle_measure: Duration,
}

#[tokio::main]
async fn main() {
    let plan = match std::env::args().any(|a| a == "--bench") {
        true => Plan {
            shards: 64,
            // `BENCH_EVENTS=10000,1000000` (say) runs only these replays.
            sizes: std::env::var("BENCH_EVENTS").map_or(vec![10_000, 100_000, 1_000_000], |v| {
                v.split(',')
                    .filter(|n| !n.trim().is_empty())
                    .map(|n| n.trim().parse().expect("BENCH_EVENTS lists numbers"))
                    .collect()
            }),
            repeats: 3,
            live_events_per_second: 20_000.0,
            live_seconds: 5.0,
            idle_settle: Duration::from_secs(10),
            idle_measure: Duration::from_secs(30),
        },
        false => Plan {
            shards: 4,
            sizes: vec![400],
            repeats: 1,
            live_events_per_second: 400.0,
            live_seconds: 1.0,
            idle_settle: Duration::from_millis(700),
            idle_measure: Duration::from_secs(1),
        },
    };
    print_machine(plan.shards);
    println!(
        "mode       events  records requests   wall s   events/s  records/s CPU µs/event peak RSS MiB"
    );
    for &events in &plan.sizes {
        for mode in [Mode::Polling, Mode::FanOut] {
            throughput(events, plan.shards, plan.repeats, mode)
                .await
                .print(mode);
        }
    }
    for mode in [Mode::Polling, Mode::FanOut] {
        latency(&plan, mode).await;
    }
    idle_polling(&plan).await;
}

/// How the daemon reads the replay endpoint (`[stream] read`).
#[derive(Clone, Copy)]
enum Mode {
    Polling,
    FanOut,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::FanOut => "fan-out",
        }
    }

    /// The `[stream]` lines of the mode (polling: its poll interval, and no idle back-off
    /// where `no_back_off`).
    fn config(self, no_back_off: bool) -> &'static str {
        match (self, no_back_off) {
            (Mode::Polling, false) => "poll_interval_ms = 200",
            (Mode::Polling, true) => "poll_interval_ms = 200\nidle_poll_interval_ms = 200",
            (Mode::FanOut, _) => "read = \"fan-out\"",
        }
    }
}

fn print_machine(shards: usize) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |m| m.trim_start_matches([' ', '\t', ':']));
    println!(
        "gdpr-consumer binary <- aws-sdk-kinesis <- replay endpoint ({shards} shards, in this process); \
         {cpus} CPUs ({model}); 10 rules with PREFILTER; state in {}",
        std::env::temp_dir().display()
    );
}

/// What a daemon took to complete its work: wall time from its spawn, and what its process
/// used by then (from /proc).
struct Usage {
    wall: Duration,
    cpu: Duration,
    peak_rss_kib: u64,
}

/// The daemon binary in a temporary directory (config, 10 rules, state), stdout dropped,
/// its log kept to show when something fails.
struct Daemon {
    child: Child,
    spawned: Instant,
    status_url: String,
    metrics_url: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// `polling` goes in the `[stream]` section as it is (poll and idle intervals).
    fn start(kinesis: &str, backend: &str, polling: &str) -> Self {
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
{polling}

[state]
path = "state.redb"

[rules]
dir = "rules"

[actions.anonymize_user]
method = "POST"
url = "{backend}/v1/users/{{user_id}}/anonymize"
bearer_token_env = "BACKEND_TOKEN"
allow_insecure_http = true

[metrics]
listen = "{metrics}"
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let spawned = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_gdpr-consumer"))
            .current_dir(dir.path())
            .args(["run", "--config", "config.toml"])
            .env("BACKEND_TOKEN", "bench-token")
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KINESIS")
            .env("GDPR_CONSUMER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            child,
            spawned,
            status_url: format!("http://{metrics}/status"),
            metrics_url: format!("http://{metrics}/metrics"),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Polls `/status` every 20 ms until `done` holds for it; fails if the daemon exits or
    /// `timeout` passes first.
    async fn wait_for(&mut self, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            if let Ok(response) = client.get(&self.status_url).send().await {
                if response.json::<Value>().await.is_ok_and(|s| done(&s)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every shard of `last` has been polled and found nothing more to read.
    async fn wait_until_polling(&mut self, last: &HashMap<String, String>) {
        self.wait_for(Duration::from_secs(60), "every shard polled", |s| {
            all_caught_up(s, last)
        })
        .await;
    }

    /// Records read, over all shards (`records_read_total`).
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

    /// Waits until every shard of `last` is checkpointed at its last record, stops the
    /// daemon, and checks it read each of the stream's `records` once.
    ///
    /// Wall and CPU time count from the moment `/status` answers: the rules are compiled
    /// and tested by then, and no shard is read yet, so process start-up is left out.
    async fn complete(mut self, last: &HashMap<String, String>, records: usize) -> Usage {
        self.wait_for(Duration::from_secs(60), "the status endpoint", |_| true)
            .await;
        let started = self.usage();
        let timeout = Duration::from_secs(60) + Duration::from_millis(records as u64);
        self.wait_for(
            timeout,
            "every shard checkpointed at its last record",
            |s| all_checkpointed(s, last),
        )
        .await;
        let end = self.usage();
        let usage = Usage {
            wall: end.wall - started.wall,
            cpu: end.cpu - started.cpu,
            peak_rss_kib: end.peak_rss_kib,
        };
        let read = self.records_read().await;
        self.stop().await;
        assert_eq!(read, records as u64, "records read by the daemon");
        usage
    }

    fn usage(&self) -> Usage {
        let wall = self.spawned.elapsed();
        let pid = self.child.id();
        Usage {
            wall,
            cpu: common::cpu_time(pid),
            peak_rss_kib: common::peak_rss_kib(pid),
        }
    }

    /// SIGTERM, then the clean exit (0) the daemon promises.
    async fn stop(mut self) {
        let log = self.dir.path().join("daemon.log");
        common::stop(&mut self.child, &log, "the daemon").await;
    }
}

impl Drop for Daemon {
    /// A run that failed leaves no daemon behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every shard of `last` has its checkpoint at its last record.
fn all_checkpointed(status: &Value, last: &HashMap<String, String>) -> bool {
    shards_where(status, last, |id, shard| {
        shard["checkpoint"] == last[id].as_str()
    })
}

/// Every shard of `last` has answered a GetRecords call with nothing left to read.
fn all_caught_up(status: &Value, last: &HashMap<String, String>) -> bool {
    shards_where(status, last, |_, shard| shard["millis_behind_latest"] == 0)
}

fn shards_where(
    status: &Value,
    last: &HashMap<String, String>,
    holds: impl Fn(&str, &Value) -> bool,
) -> bool {
    let shards = status["shards"].as_array().map_or(&[][..], Vec::as_slice);
    let matching = shards
        .iter()
        .filter_map(|s| Some((s["shard_id"].as_str()?, s)))
        .filter(|(id, s)| last.contains_key(*id) && holds(id, s))
        .count();
    matching == last.len()
}

// ---------------------------------------------------------------------------------------
// The runs.

/// One replay run's figures.
struct Row {
    events: usize,
    records: usize,
    requests: usize,
    usage: Usage,
}

impl Row {
    fn print(&self, mode: Mode) {
        let wall = self.usage.wall.as_secs_f64();
        println!(
            "{:<7} {:>9} {:>8} {:>8} {:>8.2} {:>10.0} {:>10.0} {:>12.1} {:>12.1}",
            mode.name(),
            self.events,
            self.records,
            self.requests,
            wall,
            self.events as f64 / wall,
            self.records as f64 / wall,
            self.usage.cpu.as_secs_f64() * 1e6 / self.events as f64,
            self.usage.peak_rss_kib as f64 / 1024.0,
        );
    }
}

/// Replays `events` events over `shards` shards to a daemon, from its start until every
/// shard is checkpointed at its last record; `repeats` times, each with a fresh daemon and
/// state. The fastest run is the one reported.
async fn throughput(events: usize, shards: usize, repeats: usize, mode: Mode) -> Row {
    let stream = common::stream(SEED, events, 0);
    let (records, events, requests) = (stream.records.len(), stream.events, stream.requests);
    let endpoint = Arc::new(Endpoint::replay(stream.records, shards));
    let last = endpoint.last_sequence_numbers();
    let kinesis = Server::start(endpoint.router()).await;
    let mut best: Option<Usage> = None;
    for _ in 0..repeats {
        let calls = Calls::default();
        let backend = Server::start(calls.router()).await;
        let daemon = Daemon::start(&kinesis.url, &backend.url, mode.config(false));
        let usage = daemon.complete(&last, records).await;
        calls.check(&requests);
        if best.as_ref().is_none_or(|b| usage.wall < b.wall) {
            best = Some(usage);
        }
    }
    Row {
        events,
        records,
        requests: requests.len(),
        usage: best.expect("at least one run"),
    }
}

/// Releases events live at a steady rate once every shard is being polled, and measures
/// each deletion request from its record becoming readable to its backend call.
async fn latency(plan: &Plan, mode: Mode) {
    let rate = plan.live_events_per_second;
    let stream = common::stream(SEED + 1, (rate * plan.live_seconds) as usize, 0);
    let duration = Duration::from_secs_f64(stream.events as f64 / rate);
    let (release, readable_at) = schedule(&stream.records, duration);
    let records = stream.records.len();
    let endpoint = Arc::new(Endpoint::live(stream.records, release, plan.shards));
    let last = endpoint.last_sequence_numbers();
    let kinesis = Server::start(endpoint.clone().router()).await;
    let calls = Calls::default();
    let backend = Server::start(calls.router()).await;

    // No idle back-off: events are released once every shard is polled, and the figure is
    // the poll interval's.
    let mut daemon = Daemon::start(&kinesis.url, &backend.url, mode.config(true));
    daemon.wait_until_polling(&last).await;
    let epoch = Instant::now();
    endpoint.epoch.set(epoch).unwrap();
    daemon.complete(&last, records).await;
    let mut latencies: Vec<Duration> = calls
        .check(&stream.requests)
        .iter()
        .map(|(id, at)| at.duration_since(epoch + readable_at[id]))
        .collect();
    latencies.sort();
    println!(
        "latency, {}, readable -> backend ({rate} events/s released over {} shards for {:.1} s{}): \
         {} requests, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        mode.name(),
        plan.shards,
        duration.as_secs_f64(),
        match mode {
            Mode::Polling => ", poll 200 ms",
            Mode::FanOut => ", events pushed as records become readable",
        },
        latencies.len(),
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99),
        percentile_ms(&latencies, 1.0),
    );
}

/// Nearest rank, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank].as_secs_f64() * 1e3
}

/// When each record becomes readable: spread evenly over `duration`, in stream order; and,
/// by request id, when the record holding each deletion request does. The ids are found in
/// the record's bytes, gunzipped if need be (a KPL aggregate keeps its events' bytes as
/// they are).
fn schedule(
    records: &[RawRecord],
    duration: Duration,
) -> (Vec<Duration>, HashMap<String, Duration>) {
    let finder = memchr::memmem::Finder::new(br#""request_id":""#);
    let mut release = Vec::with_capacity(records.len());
    let mut readable_at = HashMap::new();
    for (n, raw) in records.iter().enumerate() {
        let at = duration.mul_f64(n as f64 / records.len() as f64);
        release.push(at);
        let bytes = gunzipped(&raw.data);
        for found in finder.find_iter(&bytes) {
            let id = &bytes[found + finder.needle().len()..];
            let id = &id[..memchr::memchr(b'"', id).expect("a JSON string ends")];
            readable_at.insert(String::from_utf8(id.to_vec()).unwrap(), at);
        }
    }
    (release, readable_at)
}

fn gunzipped(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::io::Read;
    if !data.starts_with(&[0x1f, 0x8b]) {
        return data.into();
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out.into()
}

/// The cost of following shards that have nothing new: a daemon polling every shard of a
/// stream where nothing is readable. Prints, for polling without back-off and with the
/// default back-off, the daemon's CPU time per idle shard-second and per GetRecords call
/// (the SDK's work, the HTTP exchange and the daemon's handling of an empty answer),
/// measured once the back-off has settled.
async fn idle_polling(plan: &Plan) {
    let fan_out = (
        "fan-out, a heartbeat event a second per shard",
        "read = \"fan-out\"",
    );
    let runs: [(&str, &str); 3] = match plan.shards {
        // Smoke pass: short intervals, to run in a few seconds.
        4 => [
            (
                "poll 200 ms, no back-off",
                "poll_interval_ms = 200\nidle_poll_interval_ms = 200",
            ),
            (
                "poll 200 ms, back-off to 400 ms",
                "poll_interval_ms = 200\nidle_poll_interval_ms = 400",
            ),
            fan_out,
        ],
        _ => [
            ("poll 1000 ms, no back-off", "idle_poll_interval_ms = 1000"),
            ("defaults: poll 1000 ms, back-off to 5000 ms", ""),
            fan_out,
        ],
    };
    for (name, polling) in runs {
        let stream = common::stream(SEED + 2, plan.shards * 10, 0);
        // Live, and never opened: nothing is readable, every shard is at its tip.
        let release = vec![Duration::ZERO; stream.records.len()];
        let endpoint = Arc::new(Endpoint::live(stream.records, release, plan.shards));
        let last = endpoint.last_sequence_numbers();
        let kinesis = Server::start(endpoint.clone().router()).await;
        let calls = Calls::default();
        let backend = Server::start(calls.router()).await;
        let mut daemon = Daemon::start(&kinesis.url, &backend.url, polling);
        daemon.wait_until_polling(&last).await;
        // Each shard's pause doubles after each empty answer: 1 + 2 + 4 s to reach 5 s.
        tokio::time::sleep(plan.idle_settle).await;
        // A GetRecords call, or a subscription's event.
        let calls = || {
            endpoint.get_records_calls.load(Ordering::Relaxed)
                + endpoint.subscription_events.load(Ordering::Relaxed)
        };
        let (before, polls_before) = (daemon.usage(), calls());
        tokio::time::sleep(plan.idle_measure).await;
        let (after, polls) = (daemon.usage(), calls());
        daemon.stop().await;
        let polls = polls - polls_before;
        assert!(polls > 0, "the daemon read its shards");
        let seconds = (after.wall - before.wall).as_secs_f64();
        let cpu_micros = (after.cpu - before.cpu).as_secs_f64() * 1e6;
        println!(
            "idle, {} shards, {name}: {polls} GetRecords calls or events in {seconds:.1} s, \
             {:.0} µs of CPU per idle shard-second, {:.0} µs per call or event",
            plan.shards,
            cpu_micros / (plan.shards as f64 * seconds),
            cpu_micros / polls as f64,
        );
    }
}
