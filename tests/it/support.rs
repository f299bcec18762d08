//! Test harness: kinesalite on loopback, a recording backend, the daemon binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use aws_sdk_kinesis::Client;

pub const TOKEN: &str = "test-token-7f3a";

/// The binary under test (the demo, an example, names it in `GDPR_CONSUMER_BIN`).
pub fn bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_gdpr-consumer") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("GDPR_CONSUMER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/debug/gdpr-consumer")),
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A kinesalite process on a free loopback port, killed on drop.
pub struct Kinesalite {
    child: Child,
    pub endpoint: String,
}

impl Kinesalite {
    pub fn start() -> Self {
        let (child, endpoint) = start_emulator("kinesalite", "KINESALITE_PORT");
        Kinesalite { child, endpoint }
    }

    pub fn client(&self) -> Client {
        client_for(&self.endpoint)
    }
}

/// Starts a pinned Node.js emulator (`tools/NAME/start-loopback.js`) on a free loopback
/// port (`port_env` = 0; it prints `listening PORT`): the process and its endpoint.
fn start_emulator(name: &str, port_env: &str) -> (Child, String) {
    let dir = repo().join("tools").join(name);
    assert!(
        dir.join("node_modules").join(name).exists(),
        "{name} is not installed: run `npm ci --prefix tools/{name}` (scripts/test.sh does)"
    );
    let mut child = Command::new("node")
        .arg(dir.join("start-loopback.js"))
        .env(port_env, "0")
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
        .unwrap_or_else(|| panic!("unexpected {name} output {line:?}"));
    (child, format!("http://127.0.0.1:{port}"))
}

/// A test client for a local Kinesis endpoint.
pub fn client_for(endpoint: &str) -> Client {
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .build();
    Client::from_conf(conf)
}

/// kinesis-mock (npm `kinesis-local`, pinned in tools/kinesis-mock), the second
/// implementation of the Kinesis API: real ListShards pagination and UpdateShardCount.
/// Slow as its streams grow, so tests give it little data. Killed on drop.
pub struct KinesisMock {
    child: Child,
    pub endpoint: String,
}

impl KinesisMock {
    pub fn start() -> Self {
        let dir = repo().join("tools/kinesis-mock/node_modules/kinesis-local");
        assert!(
            dir.exists(),
            "kinesis-mock is not installed: run `npm ci --prefix tools/kinesis-mock` (scripts/test.sh does)"
        );
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (plain, tls) = (free_port(), free_port());
        let mut command = Command::new("node");
        command
            .arg(dir.join("main.js"))
            .current_dir(&dir)
            .env("KINESIS_MOCK_CERT_PATH", dir.join("server.json"))
            .env("KINESIS_MOCK_PLAIN_PORT", plain.to_string())
            .env("KINESIS_MOCK_TLS_PORT", tls.to_string())
            .env("SHARD_LIMIT", "1000")
            .env("LOG_LEVEL", "ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for duration in [
            "CREATE_STREAM",
            "DELETE_STREAM",
            "SPLIT_SHARD",
            "MERGE_SHARDS",
            "UPDATE_SHARD_COUNT",
        ] {
            command.env(format!("{duration}_DURATION"), "0ms");
        }
        let child = command.spawn().expect("start node (is Node.js installed?)");
        let mock = KinesisMock {
            child,
            endpoint: format!("http://127.0.0.1:{plain}"),
        };
        // Ready when /healthcheck answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            use std::io::{Read, Write};
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", plain)) {
                let _ = stream.write_all(b"GET /healthcheck HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                    return mock;
                }
            }
            assert!(Instant::now() < deadline, "kinesis-mock did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn client(&self) -> Client {
        client_for(&self.endpoint)
    }
}

impl Drop for KinesisMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(client, name).await;
}

pub async fn wait_active(client: &Client, name: &str) {
    for _ in 0..200 {
        let out = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        if out.stream_description_summary().unwrap().stream_status() == &StreamStatus::Active {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("stream {name} did not become ACTIVE");
}

/// Writes records in batches of 500, in order, and checks none failed.
pub async fn put(client: &Client, stream: &str, records: &[(String, Vec<u8>)]) {
    for chunk in records.chunks(500) {
        let entries = chunk
            .iter()
            .map(|(pk, data)| {
                PutRecordsRequestEntry::builder()
                    .partition_key(pk)
                    .data(Blob::new(data.clone()))
                    .build()
                    .unwrap()
            })
            .collect::<Vec<_>>();
        let out = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

/// A deletion request the shipped rule matches.
pub fn deletion(request_id: &str, user_id: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "privacy_request", "tags": ["GDPR", "Delete User"], "client": "acme",
        "request_id": request_id, "user_id": user_id,
    })
}

/// Mixed traffic: page views, orders, logins, text log lines, and privacy requests the rule
/// must not match. Deterministic for a seed.
pub fn unrelated_event(i: usize) -> (String, Vec<u8>) {
    let user = format!("u-{}", (i * 7919) % 1000);
    let data = match i % 10 {
        0..=4 => serde_json::json!({"type": "page_view", "client": "acme", "user_id": user, "path": format!("/products/{}", i % 97), "referrer": "https://search.example/?q=shoes", "ua": "Mozilla/5.0"}).to_string(),
        5 | 6 => serde_json::json!({"type": "order", "client": "acme", "user_id": user, "order_id": format!("o-{i}"), "total_cents": (i * 37) % 10_000, "items": [{"sku": "sku-1", "qty": 1}]}).to_string(),
        7 => serde_json::json!({"type": "login", "client": "globex", "user_id": user, "ok": !i.is_multiple_of(3)}).to_string(),
        8 => format!("{} INFO GET /api/v1/items/{} 200 12ms", 1_700_000_000 + i, i % 50),
        _ => match i % 3 {
            // Privacy requests the rule must leave alone: another client, CCPA, an export.
            0 => serde_json::json!({"type": "privacy_request", "tags": ["GDPR", "Delete User"], "client": "globex", "request_id": format!("g-{i}"), "user_id": user}).to_string(),
            1 => serde_json::json!({"type": "privacy_request", "tags": ["CCPA", "Delete User"], "client": "acme", "request_id": format!("c-{i}"), "user_id": user}).to_string(),
            _ => serde_json::json!({"type": "privacy_request", "tags": ["GDPR", "Export Data"], "client": "acme", "request_id": format!("e-{i}"), "user_id": user}).to_string(),
        },
    };
    (user, data.into_bytes())
}

/// `total` events with `deletions` acme GDPR deletion requests spread evenly among them
/// (request ids `r-N`, users `del-user-N`), then the first `duplicates` of those requests
/// written again under another partition key (a producer retry, maybe on another shard).
pub fn traffic(total: usize, deletions: usize, duplicates: usize) -> Vec<(String, Vec<u8>)> {
    let every = total / deletions;
    let mut records: Vec<_> = (0..total)
        .map(|i| {
            let n = i / every;
            if i % every == every / 2 && n < deletions {
                let user = format!("del-user-{n}");
                let data = deletion(&format!("r-{n}"), &user).to_string().into_bytes();
                (user, data)
            } else {
                unrelated_event(i)
            }
        })
        .collect();
    for n in 0..duplicates {
        let user = format!("del-user-{n}");
        let data = deletion(&format!("r-{n}"), &user).to_string().into_bytes();
        records.push((format!("{user}-retry"), data));
    }
    records
}

/// One request the backend received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    /// Every header, names in lower case.
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// How the backend answers one request.
pub struct Reply {
    pub status: u16,
    pub retry_after_s: Option<u64>,
    /// Time taken before answering (longer than the client's timeout: a timeout).
    pub delay: Duration,
}

impl From<u16> for Reply {
    fn from(status: u16) -> Self {
        Reply {
            status,
            retry_after_s: None,
            delay: Duration::ZERO,
        }
    }
}

type Behaviour = dyn Fn(&Received, usize) -> Reply + Send + Sync;

/// A real HTTP server on loopback standing in for the client's backend. It records every
/// request; `behaviour(request, earlier attempts at the same path)` picks the status.
pub struct Backend {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
    _server: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> Self {
        Self::with_behaviour(Duration::ZERO, |_, _| 200).await
    }

    /// A backend that takes `delay` to answer each request, with the status `behaviour` picks.
    pub async fn with_behaviour(
        delay: Duration,
        behaviour: impl Fn(&Received, usize) -> u16 + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, move |r, earlier| Reply {
            delay,
            ..behaviour(r, earlier).into()
        })
    }

    /// A backend on `listener` whose replies `behaviour` chooses in full.
    pub fn serve(
        listener: tokio::net::TcpListener,
        behaviour: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let log = received.clone();
        let in_flight: Arc<(
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        )> = Arc::default();
        let counting = in_flight.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: String| {
                let log = log.clone();
                let behaviour = behaviour.clone();
                let counting = counting.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let request = Received {
                        method: method.to_string(),
                        path: uri
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        authorization: header("authorization"),
                        idempotency_key: header("idempotency-key"),
                        content_type: header("content-type"),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect(),
                        body,
                    };
                    let reply = {
                        let mut log = log.lock().unwrap();
                        let earlier = log.iter().filter(|r| r.path == request.path).count();
                        let reply = behaviour(&request, earlier);
                        log.push(request);
                        reply
                    };
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = counting.0.fetch_add(1, SeqCst) + 1;
                    counting.1.fetch_max(now, SeqCst);
                    tokio::time::sleep(reply.delay).await;
                    counting.0.fetch_sub(1, SeqCst);
                    let mut response = axum::http::Response::builder().status(reply.status);
                    if let Some(seconds) = reply.retry_after_s {
                        response = response.header("retry-after", seconds.to_string());
                    }
                    response.body(axum::body::Body::empty()).unwrap()
                }
            },
        );
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend {
            url,
            received,
            in_flight,
            _server: server,
        }
    }

    /// A backend that answers `status` to requests whose path contains `fragment`, and 200
    /// to the rest.
    pub async fn refusing(fragment: &'static str, status: u16) -> Self {
        Self::with_behaviour(Duration::ZERO, move |r, _| {
            if r.path.contains(fragment) {
                status
            } else {
                200
            }
        })
        .await
    }

    /// A backend that answers the status the test sets (200 until told otherwise).
    pub async fn switchable() -> (Self, Arc<std::sync::atomic::AtomicU16>) {
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let answer = status.clone();
        let backend = Self::with_behaviour(Duration::ZERO, move |_, _| {
            answer.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        (backend, status)
    }

    /// A backend that refuses (400) every request but del-user-0's until it is fixed
    /// (`true` stored in the flag it returns).
    pub async fn refusing_until_fixed() -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = fixed.clone();
        let backend = Self::with_behaviour(Duration::ZERO, move |r, _| {
            if !flag.load(std::sync::atomic::Ordering::SeqCst) && !r.path.contains("del-user-0") {
                400
            } else {
                200
            }
        })
        .await;
        (backend, fixed)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The most requests that were ever being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// A test's working directory: config, rules, state.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    /// A config for `stream` against `endpoint`, its one action posting to `backend`, with
    /// the shipped rules copied in.
    pub fn new(endpoint: &str, stream: &str, backend: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        for entry in std::fs::read_dir(repo().join("rules")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, rules.join(path.file_name().unwrap())).unwrap();
            }
        }
        let config = format!(
            r#"
[stream]
name = "{stream}"
endpoint_url = "{endpoint}"
region = "us-east-1"
start = "trim-horizon"
poll_interval_ms = 200
idle_poll_interval_ms = 400
shard_sync_interval_ms = 1000

[state]
path = "state.redb"

[rules]
dir = "rules"

[actions.anonymize_user]
method = "POST"
url = "{backend}/v1/users/{{user_id}}/anonymize"
bearer_token_env = "BACKEND_TOKEN"
allow_insecure_http = true
initial_backoff_ms = 20
max_backoff_ms = 200
max_attempts = 4
timeout_ms = 5000
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Workspace { dir }
    }

    /// Keeps the directory after the workspace is dropped (the demo leaves it to inspect).
    #[allow(dead_code)] // used by examples/demo.rs
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Adds `[metrics] listen` on a free port to the config.
    pub fn with_metrics(&self) {
        let mut text = std::fs::read_to_string(self.config()).unwrap();
        text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
        std::fs::write(self.config(), text).unwrap();
    }

    /// Runs the daemon until the backend got `calls` requests and every shard caught up,
    /// then stops it (SIGTERM, exit 0).
    pub async fn run_until(&self, backend: &Backend, calls: usize) {
        let daemon = self.start_daemon(&[]);
        wait_until(Duration::from_secs(30), "backend calls", || {
            backend.count() >= calls
        })
        .await;
        wait_until(Duration::from_secs(30), "caught up", || {
            caught_up_count(&daemon.stderr()) >= 1
        })
        .await;
        assert!(daemon.stop().success());
    }

    /// Retries dead letters every second and sends each request once before it becomes
    /// one (for tests of the daemon's own retries).
    pub fn with_quick_retries(&self) {
        self.edit_config(
            "[state]\n",
            "[state]\ndead_letter_retry_interval_ms = 1000\n",
        );
        self.edit_config("max_attempts = 4", "max_attempts = 1");
    }

    /// Replaces the first `from` in the config file with `to`.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        assert!(text.contains(from), "{from:?} not in the config");
        std::fs::write(self.config(), text.replacen(from, to, 1)).unwrap();
    }

    pub fn write_rule(&self, name: &str, text: &str) {
        std::fs::write(self.path("rules").join(name), text).unwrap();
    }

    /// Starts `gdpr-consumer run --config config.toml` with `extra` flags.
    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        self.start_daemon_with_env(extra, &[])
    }

    pub fn start_daemon_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let name = format!("daemon-{}", rand_suffix());
        let log = self.path(&format!("{name}.log"));
        let out = self.path(&format!("{name}.out"));
        let child = command(&self.config())
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .args(extra)
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log, out }
    }

    /// Runs a command of the binary to its end: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = command(&self.config()).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The dead letters as JSON values (the daemon must be stopped).
    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        let config = self.config();
        let (code, out, err) =
            self.run(&["dead-letters", "list", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn rand_suffix() -> String {
    format!("{:?}", Instant::now()).replace(|c: char| !c.is_ascii_alphanumeric(), "")
}

/// The binary with a hermetic environment: static AWS credentials, the backend token.
pub fn command(config: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.current_dir(config.parent().unwrap())
        .env("BACKEND_TOKEN", TOKEN)
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_KINESIS")
        .env("GDPR_CONSUMER_LOG", "info");
    cmd
}

/// A running daemon; killed on drop if still running.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    pub out: PathBuf,
}

impl Daemon {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Waits (at most 30 s) for the process to exit.
    pub fn wait_exit(mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds, or fails with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lines of a daemon log that say a shard caught up.
pub fn caught_up_count(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("shard caught up"))
        .count()
}

/// The metrics listener's address, from the daemon's log (it listens on port 0).
pub async fn metrics_address(daemon: &Daemon) -> String {
    logged_address(daemon, "metrics listener up").await
}

/// The address the daemon logged on the line that says `event` (`... address=...`).
async fn logged_address(daemon: &Daemon, event: &str) -> String {
    wait_until(Duration::from_secs(30), event, || {
        daemon.stderr().contains(event)
    })
    .await;
    let log = daemon.stderr();
    let line = log.lines().find(|l| l.contains(event)).unwrap();
    line.split("address=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

/// `GET http://{address}{path}`: the status and the body.
pub async fn get(address: &str, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{address}{path}"))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The daemon's `/metrics` as `name{labels}` → value.
pub async fn metrics(address: &str) -> std::collections::HashMap<String, f64> {
    let (_, text) = get(address, "/metrics").await;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// Output of JSON lines, parsed.
pub fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Splits `shard` of `stream` in two halves of the hash key range.
pub async fn split_in_half(client: &Client, stream: &str, shard: &str) {
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard)
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
}

/// A fault the proxy injects instead of forwarding a call.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// 400 ProvisionedThroughputExceededException.
    Throttle,
    /// 500 InternalFailure.
    ServerError,
    /// 400 ExpiredIteratorException.
    ExpiredIterator,
    /// Forwarded, but answered this late.
    Slow(Duration),
    /// 400 AccessDeniedException: a fault retrying cannot mend.
    AccessDenied,
}

type Schedule = dyn Fn(&str, usize) -> Option<Fault> + Send + Sync;
type Rewrite = dyn Fn(&str, &mut serde_json::Value) + Send + Sync;

/// A proxy between the daemon and kinesalite that injects what the emulator never does:
/// throttling, 500s, expired iterators and slow answers. `schedule(operation, n)` picks the
/// fault for the n-th call (from 0) of an operation such as `GetRecords`.
pub struct FaultProxy {
    pub endpoint: String,
    injected: Arc<Mutex<Vec<(String, Fault)>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(
        upstream: &str,
        schedule: impl Fn(&str, usize) -> Option<Fault> + Send + Sync + 'static,
    ) -> Self {
        Self::with_rewrite(upstream, schedule, |_, _| {}).await
    }

    /// Also lets `rewrite(operation, answer)` change each JSON answer passed on.
    pub async fn with_rewrite(
        upstream: &str,
        schedule: impl Fn(&str, usize) -> Option<Fault> + Send + Sync + 'static,
        rewrite: impl Fn(&str, &mut serde_json::Value) + Send + Sync + 'static,
    ) -> Self {
        let schedule: Arc<Schedule> = Arc::new(schedule);
        let rewrite: Arc<Rewrite> = Arc::new(rewrite);
        let calls: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let injected: Arc<Mutex<Vec<(String, Fault)>>> = Arc::default();
        let client = reqwest::Client::new();
        let upstream = upstream.to_owned();
        let log = injected.clone();
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (schedule, calls, log, client, upstream) = (
                    schedule.clone(),
                    calls.clone(),
                    log.clone(),
                    client.clone(),
                    upstream.clone(),
                );
                let rewrite = rewrite.clone();
                async move {
                    let target = headers
                        .get("x-amz-target")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let operation = target.rsplit('.').next().unwrap_or("").to_owned();
                    let n = {
                        let mut calls = calls.lock().unwrap();
                        let n = calls.entry(operation.clone()).or_default();
                        *n += 1;
                        *n - 1
                    };
                    let fault = schedule(&operation, n);
                    if let Some(fault) = fault {
                        log.lock().unwrap().push((operation.clone(), fault));
                    }
                    let error = |status: u16, kind: &str| {
                        axum::http::Response::builder()
                            .status(status)
                            .header("content-type", "application/x-amz-json-1.1")
                            .body(axum::body::Body::from(format!(
                                r#"{{"__type":"{kind}","message":"injected by the test proxy"}}"#
                            )))
                            .unwrap()
                    };
                    match fault {
                        Some(Fault::Throttle) => {
                            return error(400, "ProvisionedThroughputExceededException")
                        }
                        Some(Fault::ServerError) => return error(500, "InternalFailure"),
                        Some(Fault::ExpiredIterator) => {
                            return error(400, "ExpiredIteratorException")
                        }
                        Some(Fault::AccessDenied) => return error(400, "AccessDeniedException"),
                        Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
                        None => {}
                    }
                    let mut request = client.post(&upstream).body(body);
                    for (name, value) in &headers {
                        if name != "host" && name != "content-length" {
                            request = request.header(name, value);
                        }
                    }
                    let response = request.send().await.unwrap();
                    let status = response.status().as_u16();
                    let content_type = response.headers().get("content-type").cloned();
                    let mut bytes = response.bytes().await.unwrap().to_vec();
                    if status == 200 {
                        if let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(&bytes)
                        {
                            rewrite(&operation, &mut answer);
                            bytes = answer.to_string().into_bytes();
                        }
                    }
                    let mut reply = axum::http::Response::builder().status(status);
                    if let Some(content_type) = content_type {
                        reply = reply.header("content-type", content_type);
                    }
                    reply.body(axum::body::Body::from(bytes)).unwrap()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FaultProxy {
            endpoint,
            injected,
            _server: server,
        }
    }

    /// The faults injected so far, by operation.
    pub fn injected(&self) -> Vec<(String, Fault)> {
        self.injected.lock().unwrap().clone()
    }
}

/// A partition key for each open shard of the stream, in shard order (Kinesis routes a
/// record by the MD5 of its key, as a 128-bit number, into a shard's hash key range).
pub async fn shard_keys(client: &Client, stream: &str) -> Vec<String> {
    use md5::{Digest, Md5};
    let out = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    out.shards()
        .iter()
        .map(|shard| {
            let range = shard.hash_key_range().unwrap();
            let low: u128 = range.starting_hash_key().parse().unwrap();
            let high: u128 = range.ending_hash_key().parse().unwrap();
            (0..)
                .map(|i| format!("key-{i}"))
                .find(|key| {
                    let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
                    (low..=high).contains(&hash)
                })
                .unwrap()
        })
        .collect()
}

/// Adds a `[console]` section to the config: any free loopback port, the token read from
/// `CONSOLE_TOKEN` (start the daemon with `start_daemon_with_env(&[], &[("CONSOLE_TOKEN", ..)])`).
impl Workspace {
    pub fn with_console(&self) {
        let mut text = std::fs::read_to_string(self.config()).unwrap();
        text.push_str("\n[console]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"CONSOLE_TOKEN\"\n");
        std::fs::write(self.config(), text).unwrap();
    }
}

/// The console's address, from the daemon's log (`console listening address=...`).
pub async fn console_address(daemon: &Daemon) -> String {
    logged_address(daemon, "console listening").await
}

/// Headless Chromium driven over WebDriver: a `chromedriver` of its own on a free port
/// (in its own process group, so the browser dies with it on drop), a fresh profile, and
/// downloads landing in `downloads` without a prompt.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: ChromeDriver,
    /// Where `screenshot` writes: `docs/console/` with `UPDATE_SCREENSHOTS=1`, else a tempdir.
    pub shots: PathBuf,
    pub downloads: tempfile::TempDir,
    _profile: tempfile::TempDir,
    _shots: Option<tempfile::TempDir>,
}

impl Browser {
    pub async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let mut driver = ChromeDriver(
            Command::new("chromedriver")
                .arg("--port=0")
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver (scripts/test.sh installs Debian's chromium-driver)"),
        );
        let mut lines = BufReader::new(driver.0.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("chromedriver exited before it listened")
                .unwrap();
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().parse::<u16>().unwrap();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(format!("{url}/status"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let profile = tempfile::tempdir().unwrap();
        let downloads = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ]
        .map(str::to_owned)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": args,
                "prefs": {
                    "download.default_directory": downloads.path(),
                    "download.prompt_for_download": false,
                },
            }),
        );
        // Both of rustls's providers are in the dependency tree: pick one for the process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = fantoccini::ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session from chromedriver");
        let (shots, shots_dir) = if std::env::var_os("UPDATE_SCREENSHOTS").is_some_and(|v| v == "1")
        {
            let dir = repo().join("docs/console");
            std::fs::create_dir_all(&dir).unwrap();
            (dir, None)
        } else {
            let dir = tempfile::tempdir().unwrap();
            (dir.path().to_owned(), Some(dir))
        };
        Browser {
            client,
            _driver: driver,
            shots,
            downloads,
            _profile: profile,
            _shots: shots_dir,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The current URL's path.
    pub async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    pub async fn find_all(&self, css: &str) -> Vec<fantoccini::elements::Element> {
        self.client
            .find_all(fantoccini::Locator::Css(css))
            .await
            .unwrap()
    }

    /// Waits (at most 10 s) for an element to be on the page.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} never showed on the page: {e}"))
    }

    pub async fn exists(&self, css: &str) -> bool {
        !self.find_all(css).await.is_empty()
    }

    /// Clicks the element (see `submit` for one that loads a page).
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Clicks a submit button (or link) and waits until the page it leads to replaced this
    /// one: chromedriver does not always wait for a form's navigation itself.
    pub async fn submit(&self, css: &str) {
        let page = self.find("html").await;
        self.click(css).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old page's root goes stale once the next page is loaded.
        while page.tag_name().await.is_ok() {
            assert!(Instant::now() < deadline, "{css} led to no new page");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_for("body").await;
    }

    /// Types `value` into the field (cleared first).
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    /// Picks the option with this value in a `<select>`.
    pub async fn select(&self, css: &str, value: &str) {
        self.find(css).await.select_by_value(value).await.unwrap();
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    /// The page's HTML as the browser holds it.
    pub async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    /// Saves a PNG of the viewport as `<name>.png` in `shots`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Waits for a finished, non-empty download (nothing in progress left) and returns its path.
    pub async fn download(&self) -> PathBuf {
        let dir = self.downloads.path().to_owned();
        let mut found = None;
        wait_until(Duration::from_secs(30), "a download", || {
            let files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            // While it writes, Chromium keeps a hidden temporary file or a `.crdownload`,
            // and may create the final name empty first.
            let in_progress = |p: &PathBuf| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with('.') || name.ends_with(".crdownload")
            };
            found = files
                .iter()
                .find(|p| !in_progress(p) && std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
                .cloned();
            found.is_some() && files.len() == 1
        })
        .await;
        found.unwrap()
    }

    /// Ends the session (the browser quits cleanly); drop kills the rest anyway.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// A chromedriver process in its own process group, killed with the Chromium it started
/// on drop (`Browser::close` first lets the browser quit cleanly).
struct ChromeDriver(Child);

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// A dynalite process (DynamoDB in memory, pinned in tools/dynalite) on a free loopback
/// port, killed on drop.
pub struct Dynalite {
    child: Child,
    pub endpoint: String,
}

impl Dynalite {
    pub fn start() -> Self {
        let (child, endpoint) = start_emulator("dynalite", "DYNALITE_PORT");
        Dynalite { child, endpoint }
    }

    pub fn client(&self) -> aws_sdk_dynamodb::Client {
        dynamodb_client_for(&self.endpoint)
    }
}

impl Drop for Dynalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test client for a local DynamoDB endpoint.
pub fn dynamodb_client_for(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}
