//! Obligations (issue 18): a request is its key, carried out by several actions, each maybe
//! an asynchronous job the daemon polls, durably, to its end; operators extend, hold,
//! release and deny requests; the yearly report counts what was done. All through the
//! binary, against a job backend on loopback.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::*;

/// One submission (a POST) the job backend received.
#[derive(Debug, Clone)]
struct Submission {
    path: String,
    idempotency_key: Option<String>,
    /// The job it started (none for `/plain/`, done at once).
    job: Option<String>,
}

struct Job {
    polls: usize,
    fails: bool,
    path: String,
}

#[derive(Default)]
struct JobsState {
    submissions: Vec<Submission>,
    jobs: HashMap<String, Job>,
    next_id: u64,
    /// Path fragments whose jobs stay pending whatever the polls.
    stuck: Vec<String>,
    /// Every poll: path and query, Authorization header.
    polls_seen: Vec<(String, Option<String>)>,
    /// Polls still to be answered 500 (a backend's passing trouble).
    poll_errors: usize,
    /// Path fragments whose jobs' polls take a minute to answer.
    slow: Vec<String>,
    /// Slow polls begun.
    slow_polls: usize,
    /// How long a slow poll takes to answer (a minute unless said).
    slow_for: Option<Duration>,
    /// Polls of one job under way at once now, by job id, and the most ever seen.
    in_flight: HashMap<String, usize>,
    most_in_flight: usize,
}

/// A poll under way, counted while it lives (answered, or dropped with its connection).
struct PollInFlight(Arc<Mutex<JobsState>>, String);

impl PollInFlight {
    fn enter(state: &Arc<Mutex<JobsState>>, job: &str) -> Self {
        let mut s = state.lock().unwrap();
        let now = s.in_flight.entry(job.to_owned()).or_default();
        *now += 1;
        let now = *now;
        s.most_in_flight = s.most_in_flight.max(now);
        PollInFlight(state.clone(), job.to_owned())
    }
}

impl Drop for PollInFlight {
    fn drop(&mut self) {
        if let Some(n) = self.0.lock().unwrap().in_flight.get_mut(&self.1) {
            *n -= 1;
        }
    }
}

/// A backend whose deletions are asynchronous jobs: `POST /db/{user}` and `POST
/// /mail/{user}` answer 202 `{"job":{"id":"N"}}` (`/mail/`: the number N); `GET /jobs/N`
/// answers `pending` for the first `pending_polls` polls (or while the job's path holds a
/// stuck fragment), then `completed`, or `failed` for users whose name holds "fail" (until
/// `fixed`); submissions for users whose name holds "busy" are answered 503 (until
/// `fixed`), for those whose name holds "gone" 404. `POST /plain/{user}` is a synchronous deletion: 200 at once; `POST
/// /nojob/{user}` answers 202 without a job id.
struct JobBackend {
    url: String,
    state: Arc<Mutex<JobsState>>,
    fixed: Arc<AtomicBool>,
    _server: tokio::task::JoinHandle<()>,
}

impl JobBackend {
    async fn start(pending_polls: usize) -> Self {
        let state: Arc<Mutex<JobsState>> = Arc::default();
        let pending = Arc::new(AtomicUsize::new(pending_polls));
        let fixed = Arc::new(AtomicBool::new(false));
        let (s, p, f) = (state.clone(), pending, fixed.clone());
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap| {
                let (state, pending, fixed) = (s.clone(), p.clone(), f.clone());
                async move {
                    let path = uri.path().to_owned();
                    let reply = |status: u16, body: Value| {
                        axum::http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(axum::body::Body::from(body.to_string()))
                            .unwrap()
                    };
                    // A slow status URL: the answer takes a minute.
                    let slow = method == axum::http::Method::GET && {
                        let mut state = state.lock().unwrap();
                        let slow = path
                            .strip_prefix("/jobs/")
                            .and_then(|id| state.jobs.get(id))
                            .is_some_and(|j| {
                                state.slow.iter().any(|s| j.path.contains(s.as_str()))
                            });
                        state.slow_polls += usize::from(slow);
                        slow
                    };
                    let _in_flight = path
                        .strip_prefix("/jobs/")
                        .map(|id| PollInFlight::enter(&state, id));
                    if slow {
                        let slow_for = state.lock().unwrap().slow_for;
                        tokio::time::sleep(slow_for.unwrap_or(Duration::from_secs(60))).await;
                    }
                    let mut state = state.lock().unwrap();
                    if method == axum::http::Method::GET {
                        let Some(id) = path.strip_prefix("/jobs/") else {
                            return reply(404, json!({}));
                        };
                        let authorization = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let seen = uri
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        state.polls_seen.push((seen, authorization));
                        if state.poll_errors > 0 {
                            state.poll_errors -= 1;
                            return reply(500, json!({"error": "try later"}));
                        }
                        let stuck = state.stuck.clone();
                        let Some(job) = state.jobs.get_mut(id) else {
                            return reply(404, json!({"error": "no such job"}));
                        };
                        job.polls += 1;
                        let status = if job.polls <= pending.load(SeqCst)
                            || stuck.iter().any(|s| job.path.contains(s.as_str()))
                        {
                            "pending"
                        } else if job.fails {
                            "failed"
                        } else {
                            "completed"
                        };
                        return reply(200, json!({ "status": status }));
                    }
                    let idempotency_key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if method != axum::http::Method::POST {
                        return reply(405, json!({}));
                    }
                    if path.starts_with("/plain/") {
                        state.submissions.push(Submission {
                            path,
                            idempotency_key,
                            job: None,
                        });
                        return reply(200, json!({}));
                    }
                    if path.starts_with("/nojob/") {
                        state.submissions.push(Submission {
                            path,
                            idempotency_key,
                            job: None,
                        });
                        return reply(202, json!({"accepted": true}));
                    }
                    if path.contains("gone") {
                        state.submissions.push(Submission {
                            path,
                            idempotency_key,
                            job: None,
                        });
                        return reply(404, json!({"error": "no such user"}));
                    }
                    if path.contains("busy") && !fixed.load(SeqCst) {
                        state.submissions.push(Submission {
                            path,
                            idempotency_key,
                            job: None,
                        });
                        return reply(503, json!({"error": "busy"}));
                    }
                    if path.starts_with("/db/") || path.starts_with("/mail/") {
                        state.next_id += 1;
                        let id = state.next_id.to_string();
                        let fails = path.contains("fail") && !fixed.load(SeqCst);
                        let numeric = path.starts_with("/mail/");
                        state.jobs.insert(
                            id.clone(),
                            Job {
                                polls: 0,
                                fails,
                                path: path.clone(),
                            },
                        );
                        state.submissions.push(Submission {
                            path,
                            idempotency_key,
                            job: Some(id.clone()),
                        });
                        // A number from /mail/: the pointer may find either.
                        if numeric {
                            return reply(202, json!({"job": {"id": state.next_id}}));
                        }
                        return reply(202, json!({"job": {"id": id}}));
                    }
                    reply(404, json!({}))
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        JobBackend {
            url,
            state,
            fixed,
            _server: server,
        }
    }

    fn submissions(&self) -> Vec<Submission> {
        self.state.lock().unwrap().submissions.clone()
    }

    /// Submissions whose path starts with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        self.submissions()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .count()
    }

    /// How many times each (path, Idempotency-Key) was submitted.
    fn per_key(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for s in self.submissions() {
            *out.entry((s.path, s.idempotency_key.unwrap_or_default()))
                .or_default() += 1;
        }
        out
    }

    /// Every poll of every job so far.
    fn polls(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .jobs
            .values()
            .map(|j| j.polls)
            .sum()
    }

    /// The polls seen: (path and query, Authorization header).
    fn polls_seen(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().polls_seen.clone()
    }

    /// The next `n` polls are answered 500.
    fn fail_polls(&self, n: usize) {
        self.state.lock().unwrap().poll_errors = n;
    }

    /// Polls of the jobs whose path holds `fragment` take a minute to answer (until
    /// `unstick_all`).
    fn slow_down(&self, fragment: &str) {
        self.state.lock().unwrap().slow.push(fragment.to_owned());
    }

    fn slow_polls(&self) -> usize {
        self.state.lock().unwrap().slow_polls
    }

    /// Slow polls take `time` to answer.
    fn slow_for(&self, time: Duration) {
        self.state.lock().unwrap().slow_for = Some(time);
    }

    /// The most polls of one job ever under way at once.
    fn most_in_flight(&self) -> usize {
        self.state.lock().unwrap().most_in_flight
    }

    /// Polls of the jobs submitted at `path`.
    fn polls_at(&self, path: &str) -> usize {
        let state = self.state.lock().unwrap();
        state
            .jobs
            .values()
            .filter(|j| j.path == path)
            .map(|j| j.polls)
            .sum()
    }

    /// The job id given to the (last) submission at `path`.
    fn job_of(&self, path: &str) -> Option<String> {
        self.submissions()
            .iter()
            .rev()
            .find(|s| s.path == path)
            .and_then(|s| s.job.clone())
    }

    /// Jobs whose path holds `fragment` stay pending until `unstick_all`.
    fn stick(&self, fragment: &str) {
        self.state.lock().unwrap().stuck.push(fragment.to_owned());
    }

    fn unstick_all(&self) {
        self.stuck_only(&[]);
    }

    /// Only jobs whose path holds one of `fragments` stay pending (at once: no poll sees
    /// a state in between).
    fn stuck_only(&self, fragments: &[&str]) {
        let mut state = self.state.lock().unwrap();
        state.stuck = fragments.iter().map(|f| f.to_string()).collect();
        state.slow.clear();
    }
}

/// The Idempotency-Key the daemon sends: lowercase hex sha256("action\nkey").
fn idempotency_key(action: &str, key: &str) -> String {
    hex::encode(Sha256::digest(format!("{action}\n{key}")))
}

/// A proxy in front of kinesalite that gives a record whose partition key is `at-MS` the
/// arrival time MS (kinesalite stamps the time of the put): requests of the past.
async fn arrival_proxy(upstream: &str) -> FaultProxy {
    FaultProxy::with_rewrite(
        upstream,
        |_, _| None,
        |operation, answer| {
            if operation != "GetRecords" {
                return;
            }
            for record in answer["Records"].as_array_mut().into_iter().flatten() {
                let at = record["PartitionKey"]
                    .as_str()
                    .and_then(|k| k.strip_prefix("at-"))
                    .and_then(|ms| ms.parse::<i64>().ok());
                if let Some(ms) = at {
                    record["ApproximateArrivalTimestamp"] = json!(ms as f64 / 1000.0);
                }
            }
        },
    )
    .await
}

/// The rule: an `erase` record names its request, user, regulation and actions.
const RULE: &str = r#"
const PREFILTER = ["erase"];

fn decide(record) {
    let e = record.data;
    if type_of(e) != "map" || e.type != "erase" { return; }
    let out = [];
    for a in e.actions {
        out.push(#{ action: a, key: e.request_id, params: #{ user_id: e.user_id }, regulation: e.regulation });
    }
    out
}
"#;

const POLL_MS: u64 = 150;

/// Replaces the shipped rules with `RULE` and adds the actions: `purge_db`, `purge_mail`
/// and `purge_nojob` (jobs, with completion) and `notify` (done on its 2xx).
fn add_obligations(ws: &Workspace, jobs: &str) {
    for entry in std::fs::read_dir(ws.path("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    ws.write_rule("erase.rhai", RULE);
    let action = |name: &str, path: &str| {
        format!(
            r#"
[actions.{name}]
method = "POST"
url = "{jobs}/{path}/{{user_id}}"
bearer_token_env = "BACKEND_TOKEN"
allow_insecure_http = true
initial_backoff_ms = 20
max_backoff_ms = 200
max_attempts = 4
timeout_ms = 5000
"#
        )
    };
    let completion = |name: &str| {
        // purge_mail's status URL carries a param of the decision too.
        let query = if name == "purge_mail" {
            "?user={user_id}"
        } else {
            ""
        };
        format!(
            r#"
[actions.{name}.completion]
url = "{jobs}/jobs/{{job_id}}{query}"
job_id_pointer = "/job/id"
status_pointer = "/status"
done = ["completed"]
failed = ["failed"]
poll_interval_ms = {POLL_MS}
give_up_after_ms = 31536000000
"#
        )
    };
    let mut text = std::fs::read_to_string(ws.config()).unwrap();
    text += &action("purge_db", "db");
    text += &completion("purge_db");
    text += &action("purge_mail", "mail");
    text += &completion("purge_mail");
    text += &action("notify", "plain");
    text += &action("purge_nojob", "nojob");
    text += &completion("purge_nojob");
    std::fs::write(ws.config(), text).unwrap();
}

/// An `erase` record arriving now.
fn erase(key: &str, user: &str, regulation: &str, actions: &[&str]) -> (String, Vec<u8>) {
    erase_at("now".to_owned(), key, user, regulation, actions)
}

/// `days` ago, in ms, to the second: an arrival time passes through the proxy as float
/// seconds, exact only for whole ones.
fn whole_seconds_ago(days: i64) -> i64 {
    (jiff::Timestamp::now().as_second() - days * 86_400) * 1000
}

/// An `erase` record that arrived `days` ago (through `arrival_proxy`).
fn erase_aged(
    days: i64,
    key: &str,
    user: &str,
    regulation: &str,
    actions: &[&str],
) -> (String, Vec<u8>) {
    let at = whole_seconds_ago(days);
    erase_at(format!("at-{at}"), key, user, regulation, actions)
}

fn erase_at(
    partition_key: String,
    key: &str,
    user: &str,
    regulation: &str,
    actions: &[&str],
) -> (String, Vec<u8>) {
    let data = json!({
        "type": "erase", "request_id": key, "user_id": user,
        "regulation": regulation, "actions": actions,
    });
    (partition_key, data.to_string().into_bytes())
}

/// The binary's commands against one config (and environment), run off the async workers.
struct Cli<'a> {
    ws: &'a Workspace,
    env: Vec<(&'static str, &'static str)>,
}

impl Cli<'_> {
    fn new(ws: &Workspace) -> Cli<'_> {
        Cli {
            ws,
            env: Vec::new(),
        }
    }

    /// `args` with `--config` added: (exit code, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let config = self.ws.config();
        let out = tokio::task::block_in_place(|| {
            command(&config)
                .envs(self.env.iter().copied())
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .unwrap()
        });
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `args` and checks the exit code.
    fn expect(&self, code: i32, args: &[&str]) -> String {
        let (got, out, err) = self.run(args);
        assert_eq!(got, code, "{args:?}: exit {got}\n{out}\n{err}");
        out
    }

    /// `requests show --key K --format json`.
    fn show(&self, key: &str) -> Value {
        let out = self.expect(0, &["requests", "show", "--key", key, "--format", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("show {key}: {e}: {out}"))
    }

    /// Polls `requests show` until `cond` holds (60 s at most).
    async fn wait_show(&self, key: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (code, out, err) =
                self.run(&["requests", "show", "--key", key, "--format", "json"]);
            // Exit 1: not seen yet.
            assert!(
                code == 0 || code == 1,
                "show {key}: exit {code}\n{out}\n{err}"
            );
            let shown: Value = if code == 0 {
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("show {key}: {e}: {out}"))
            } else {
                Value::Null
            };
            if code == 0 && cond(&shown) {
                return shown;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {key}: {what}; last shown:\n{shown:#}{err}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_status(&self, key: &str, status: &str) -> Value {
        self.wait_show(key, &format!("status {status}"), |s| s["status"] == status)
            .await
    }

    /// The audit trail as JSON lines.
    fn audit(&self) -> Vec<Value> {
        json_lines(&self.expect(0, &["audit", "export"]))
    }

    fn letters(&self) -> Vec<Value> {
        json_lines(&self.expect(0, &["dead-letters", "list"]))
    }
}

/// The timeline's events of this name, each said to be by someone.
fn by_someone(shown: &Value, event: &str) -> usize {
    let events: Vec<&Value> = shown["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .collect();
    for e in &events {
        assert!(
            e["by"].as_str().is_some_and(|b| !b.is_empty()),
            "{event} by no one: {shown:#}"
        );
    }
    events.len()
}

/// How many audit entries have this outcome.
fn outcomes(audit: &[Value], outcome: &str) -> usize {
    audit.iter().filter(|e| e["outcome"] == outcome).count()
}

/// A stream of one shard behind an arrival proxy, the job backend, and a workspace with
/// the obligations' actions.
struct Setup {
    _kinesis: Kinesalite,
    _proxy: FaultProxy,
    client: aws_sdk_kinesis::Client,
    jobs: JobBackend,
    ws: Workspace,
}

async fn setup(pending_polls: usize) -> Setup {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let proxy = arrival_proxy(&kinesis.endpoint).await;
    let jobs = JobBackend::start(pending_polls).await;
    let ws = Workspace::new(&proxy.endpoint, "events", &jobs.url);
    add_obligations(&ws, &jobs.url);
    Setup {
        _kinesis: kinesis,
        _proxy: proxy,
        client,
        jobs,
        ws,
    }
}

/// Starts the daemon and waits until it serves commands.
async fn start(ws: &Workspace) -> Daemon {
    let daemon = ws.start_daemon(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.stderr().contains("control channel up") {
        assert!(
            std::time::Instant::now() < deadline,
            "no control channel:\n{}",
            daemon.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon
}

fn stop(daemon: Daemon) {
    let log = daemon.stderr();
    assert!(daemon.stop().success(), "{log}");
}

fn parse_time(text: &Value) -> jiff::Timestamp {
    text.as_str()
        .unwrap_or_else(|| panic!("not a time: {text}"))
        .parse()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn plus(ts: jiff::Timestamp, span: jiff::Span) -> jiff::Timestamp {
    ts.to_zoned(jiff::tz::TimeZone::UTC)
        .checked_add(span)
        .unwrap()
        .timestamp()
}

/// One rule, two decisions with the same key: one request, two jobs; `waiting` while
/// either runs, `complete` only when both are done; the trail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_fanned_out_to_two_jobs_is_complete_only_when_both_are_done() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[erase("r-1", "alice", "GDPR", &["purge_db", "purge_mail"])],
    )
    .await;
    wait_until(Duration::from_secs(30), "two submissions", || {
        s.jobs.count("/") >= 2
    })
    .await;
    // Both jobs pending: the request waits, each action with the job it started.
    cli.wait_show("r-1", "both polled", |s| {
        ["purge_db", "purge_mail"].iter().all(|a| {
            s["actions"][a]["polls"].as_u64() >= Some(1)
                && s["actions"][a]["last_status"] == "pending"
        })
    })
    .await;
    // Polled with the action's auth, at the URL built from the job id and the params.
    let (db_job, mail_job) = (
        s.jobs.job_of("/db/alice").unwrap(),
        s.jobs.job_of("/mail/alice").unwrap(),
    );
    let seen = s.jobs.polls_seen();
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some(bearer.as_str())),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(p, _)| *p == format!("/jobs/{db_job}")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(p, _)| *p == format!("/jobs/{mail_job}?user=alice")),
        "{seen:?}"
    );
    let pending = cli.show("r-1");
    let shown = &pending;
    // Not done in the ledger while its job runs.
    let lookup = |action: &str| {
        let out = cli.expect(0, &["audit", "lookup", "--action", action, "--key", "r-1"]);
        json_lines(&out).last().unwrap()["done"].clone()
    };
    assert_eq!(lookup("purge_db"), false);
    assert_eq!(shown["status"], "waiting", "{shown:#}");
    assert_eq!(shown["regulation"], "GDPR");
    assert!(shown["completed_at"].is_null(), "{shown:#}");
    assert!(shown["completed_at_ms"].is_null(), "{shown:#}");
    for (action, path) in [("purge_db", "/db/alice"), ("purge_mail", "/mail/alice")] {
        let a = &shown["actions"][action];
        assert_eq!(a["status"], "waiting", "{shown:#}");
        assert_eq!(a["job_id"].as_str(), s.jobs.job_of(path).as_deref());
        assert_eq!(a["attempts"], 1, "{shown:#}");
        assert!(a["done_at"].is_null(), "{shown:#}");
    }

    // One job done, the other still pending: still waiting.
    s.jobs.stuck_only(&["/mail/"]);
    let shown = cli
        .wait_show("r-1", "purge_db done", |s| {
            s["actions"]["purge_db"]["status"] == "done"
        })
        .await;
    assert_eq!(shown["status"], "waiting", "{shown:#}");
    assert_eq!(shown["actions"]["purge_mail"]["status"], "waiting");
    assert!(shown["actions"]["purge_db"]["done_at"].is_string());
    assert!(shown["completed_at"].is_null(), "{shown:#}");
    // Narrowed to one action.
    let out = cli.expect(
        0,
        &[
            "requests",
            "show",
            "--key",
            "r-1",
            "--action",
            "purge_mail",
            "--format",
            "json",
        ],
    );
    let narrowed: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&String> = narrowed["actions"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["purge_mail"], "{narrowed:#}");
    assert!(
        narrowed["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["action"] != "purge_db"),
        "{narrowed:#}"
    );

    // Both done (after a few polls the backend failed to answer): complete.
    s.jobs.fail_polls(3);
    s.jobs.unstick_all();
    let shown = cli.wait_status("r-1", "complete").await;
    for action in ["purge_db", "purge_mail"] {
        assert_eq!(shown["actions"][action]["status"], "done", "{shown:#}");
    }
    let arrival = shown["arrival_ms"].as_i64().unwrap();
    let completed = shown["completed_at_ms"].as_i64().unwrap();
    assert!(completed >= arrival, "{shown:#}");
    assert_eq!(
        parse_time(&shown["completed_at"]).as_millisecond(),
        completed
    );
    assert_eq!(parse_time(&shown["arrival_time"]).as_millisecond(), arrival);
    let events: Vec<&str> = shown["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(!events.is_empty(), "{shown:#}");
    // Human output names the request's status too.
    let human = cli.expect(0, &["requests", "show", "--key", "r-1"]);
    assert!(human.contains("complete"), "{human}");
    // Unknown key: exit 1; usage: 2.
    cli.expect(1, &["requests", "show", "--key", "never-seen"]);
    cli.expect(2, &["requests", "show"]);
    cli.expect(2, &["requests", "show", "--key", "r-1", "--format", "xml"]);
    for action in ["purge_db", "purge_mail"] {
        assert_eq!(lookup(action), true, "{action}");
    }
    stop(daemon);

    // Each submitted once, with the key the backend dedups on.
    let subs = s.jobs.submissions();
    assert_eq!(subs.len(), 2, "{subs:?}");
    for (action, path) in [("purge_db", "/db/alice"), ("purge_mail", "/mail/alice")] {
        let sub = subs.iter().find(|s| s.path == path).unwrap();
        assert_eq!(
            sub.idempotency_key.as_deref(),
            Some(idempotency_key(action, "r-1").as_str())
        );
    }
    // Stopped: the same answer from the state file.
    let stopped = cli.show("r-1");
    assert_eq!(stopped["status"], "complete");
    assert_eq!(stopped["completed_at_ms"], completed);
    assert!(
        cli.letters().is_empty(),
        "a poll answered 500 made a dead letter"
    );
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "accepted"), 2, "{audit:#?}");
    assert_eq!(outcomes(&audit, "job_done"), 2, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 1, "{audit:#?}");
    let position = |outcome: &str| audit.iter().rposition(|e| e["outcome"] == outcome);
    assert!(position("job_done") < position("complete"), "{audit:#?}");
    for entry in &audit {
        assert_eq!(entry["request"], shown["request"], "{entry}");
        assert_eq!(entry["nature"], "deletion", "{entry}");
    }
    let csv = cli.expect(0, &["audit", "export", "--format", "csv"]);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for column in ["request", "nature", "denial_code"] {
        assert!(header.contains(&column), "{header:?}");
    }
    // A waiting job: how often it was polled, what it last said; none once done.
    for action in ["purge_db", "purge_mail"] {
        assert!(
            pending["actions"][action]["polls"].as_u64() >= Some(1),
            "{pending:#}"
        );
        assert_eq!(
            pending["actions"][action]["last_status"], "pending",
            "{pending:#}"
        );
        assert_eq!(stopped["actions"][action]["polls"], 0, "{stopped:#}");
    }
}

/// Jobs pending across a SIGTERM and a kill -9: polled again after each start, to their
/// end; each submission made once, the same request written again included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_a_restart_and_a_crash_and_nothing_is_submitted_twice() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-1", "alice", "GDPR", &["purge_db", "purge_mail"]),
            // One action decided twice by one record: one submission.
            erase(
                "r-2",
                "bob",
                "CCPA",
                &["purge_db", "purge_mail", "purge_db"],
            ),
        ],
    )
    .await;
    wait_until(Duration::from_secs(30), "four submissions", || {
        s.jobs.count("/") >= 4
    })
    .await;
    wait_until(Duration::from_secs(30), "all polled", || {
        ["/db/alice", "/mail/alice", "/db/bob", "/mail/bob"]
            .iter()
            .all(|p| s.jobs.polls_at(p) >= 1)
    })
    .await;
    for key in ["r-1", "r-2"] {
        let shown = cli.show(key);
        assert_eq!(shown["status"], "waiting", "{shown:#}");
    }

    // SIGTERM while the jobs are pending.
    stop(daemon);
    let stopped = cli.show("r-2");
    assert_eq!(stopped["status"], "waiting", "{stopped:#}");
    assert_eq!(stopped["regulation"], "CCPA");
    let polls = s.jobs.polls();
    let daemon = start(&s.ws).await;
    wait_until(Duration::from_secs(30), "polls after the restart", || {
        s.jobs.polls() >= polls + 4
    })
    .await;

    // kill -9 while they still are.
    daemon.signal("KILL");
    let _ = daemon.wait_exit();
    let polls = s.jobs.polls();
    let daemon = start(&s.ws).await;
    wait_until(Duration::from_secs(30), "polls after the crash", || {
        s.jobs.polls() >= polls + 4
    })
    .await;
    // The same requests written again (a producer's retry; one deciding an action twice):
    // already under way.
    put(
        &s.client,
        "events",
        &[
            erase(
                "r-1",
                "alice",
                "GDPR",
                &["purge_db", "purge_db", "purge_mail"],
            ),
            erase("r-2", "bob", "CCPA", &["purge_db", "purge_mail"]),
            erase("r-m", "marker", "GDPR", &["notify"]),
        ],
    )
    .await;
    wait_until(Duration::from_secs(30), "the marker sent", || {
        s.jobs.count("/plain/marker") == 1
    })
    .await;
    s.jobs.unstick_all();
    for key in ["r-1", "r-2"] {
        cli.wait_status(key, "complete").await;
    }
    stop(daemon);

    let per_key = s.jobs.per_key();
    let expected: BTreeMap<(String, String), usize> = [
        ("/db/alice", "purge_db", "r-1"),
        ("/mail/alice", "purge_mail", "r-1"),
        ("/db/bob", "purge_db", "r-2"),
        ("/mail/bob", "purge_mail", "r-2"),
        ("/plain/marker", "notify", "r-m"),
    ]
    .iter()
    .map(|(path, action, key)| ((path.to_string(), idempotency_key(action, key)), 1))
    .collect();
    assert_eq!(per_key, expected);
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "accepted"), 4, "{audit:#?}");
    assert_eq!(outcomes(&audit, "job_done"), 4, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 3, "{audit:#?}");
}

/// A job the backend says failed: the action `failed`, an `action_failed` letter saying
/// so; a retry (daemon running, or stopped) submits again with the same Idempotency-Key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_is_a_dead_letter_and_its_retry_submits_again_with_the_same_key() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-f", "fail-bob", "GDPR", &["purge_db", "notify"]),
            erase("r-f2", "fail-amy", "CCPA", &["purge_mail"]),
        ],
    )
    .await;
    let shown = cli.wait_status("r-f", "failed").await;
    cli.wait_status("r-f2", "failed").await;
    let db = &shown["actions"]["purge_db"];
    assert_eq!(db["status"], "failed", "{shown:#}");
    assert_eq!(shown["actions"]["notify"]["status"], "done", "{shown:#}");
    let job = s.jobs.job_of("/db/fail-bob").unwrap();
    assert_eq!(db["job_id"], job.as_str());
    assert!(db["error"].is_string(), "{shown:#}");

    // Listed while the daemon runs.
    let letters = cli.letters();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let letter = letters
        .iter()
        .find(|l| l["action"] == "purge_db")
        .unwrap_or_else(|| panic!("{letters:#?}"));
    for letter in &letters {
        assert_eq!(letter["kind"], "action_failed", "{letter}");
        let error = letter["error"].as_str().unwrap();
        assert!(
            error.contains("job") && error.contains("failed") && error.contains("status"),
            "{letter}"
        );
    }
    assert_eq!(db["dead_letter"], letter["id"], "{shown:#}");

    // The backend is fixed; the retry (served by the daemon) submits again, same key.
    s.jobs.fixed.store(true, SeqCst);
    let id = letter["id"].as_u64().unwrap().to_string();
    cli.expect(0, &["dead-letters", "retry", "--id", &id]);
    wait_until(Duration::from_secs(30), "the second submission", || {
        s.jobs.count("/db/") >= 2
    })
    .await;
    let shown = cli.wait_status("r-f", "complete").await;
    assert_eq!(shown["actions"]["purge_db"]["status"], "done");
    stop(daemon);

    // The other retried with the daemon stopped: submitted by the command, polled to its
    // end once the daemon runs.
    let letters = cli.letters();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["action"], "purge_mail", "{letters:#?}");
    let id = letters[0]["id"].as_u64().unwrap().to_string();
    cli.expect(0, &["dead-letters", "retry", "--id", &id]);
    assert_eq!(s.jobs.count("/mail/fail-amy"), 2);
    let daemon = start(&s.ws).await;
    let shown = cli.wait_status("r-f2", "complete").await;
    assert_eq!(shown["actions"]["purge_mail"]["status"], "done");
    assert!(cli.letters().is_empty());
    stop(daemon);

    for (path, action, key) in [
        ("/db/fail-bob", "purge_db", "r-f"),
        ("/mail/fail-amy", "purge_mail", "r-f2"),
    ] {
        let key = idempotency_key(action, key);
        let subs: Vec<Submission> = s
            .jobs
            .submissions()
            .into_iter()
            .filter(|s| s.path == path)
            .collect();
        assert_eq!(subs.len(), 2, "{subs:?}");
        for sub in &subs {
            assert_eq!(sub.idempotency_key.as_deref(), Some(key.as_str()));
        }
    }
    assert_eq!(s.jobs.count("/plain/"), 1, "notify sent again");
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "job_failed"), 2, "{audit:#?}");
    assert_eq!(outcomes(&audit, "job_done"), 2, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 2, "{audit:#?}");
}

/// A job still pending past `give_up_after_ms` is given up; an accepted submission without
/// a job id cannot be followed: both are dead letters at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_ending_is_given_up_and_one_without_an_id_is_a_dead_letter() {
    let s = setup(1).await;
    // purge_db's (the first completion in the config).
    s.ws.edit_config("give_up_after_ms = 31536000000", "give_up_after_ms = 1000");
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/db/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-s", "sam", "GDPR", &["purge_db"]),
            erase("r-n", "nina", "GDPR", &["purge_nojob"]),
        ],
    )
    .await;
    let slow = cli.wait_status("r-s", "failed").await;
    let nojob = cli.wait_status("r-n", "failed").await;
    assert!(s.jobs.polls_at("/db/sam") >= 1, "given up unpolled");
    assert_eq!(slow["actions"]["purge_db"]["status"], "failed", "{slow:#}");
    assert_eq!(
        nojob["actions"]["purge_nojob"]["status"], "failed",
        "{nojob:#}"
    );
    let letters = cli.letters();
    stop(daemon);
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let letter = |action: &str| {
        letters
            .iter()
            .find(|l| l["action"] == action)
            .unwrap_or_else(|| panic!("no letter for {action}: {letters:#?}"))
            .clone()
    };
    let gave_up = letter("purge_db");
    assert_eq!(gave_up["kind"], "action_failed");
    assert!(
        gave_up["error"].as_str().unwrap().contains("gave up"),
        "{gave_up}"
    );
    assert_eq!(slow["actions"]["purge_db"]["dead_letter"], gave_up["id"]);
    let no_id = letter("purge_nojob");
    assert_eq!(no_id["kind"], "action_failed");
    assert_eq!(nojob["actions"]["purge_nojob"]["dead_letter"], no_id["id"]);
    assert!(
        nojob["actions"]["purge_nojob"]["job_id"].is_null(),
        "{nojob:#}"
    );
}

/// Retrying a dead letter sends an action: not for a denied request (nothing more is
/// sent for it), nor for a held one until it is released; neither the daemon's own retries
/// nor an operator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_send_nothing_for_a_denied_request_nor_for_a_held_one_until_released() {
    let s = setup(1).await;
    // One attempt each, then a dead letter the daemon retries every second.
    let text = std::fs::read_to_string(s.ws.config()).unwrap();
    let text = text
        .replace("max_attempts = 4", "max_attempts = 1")
        .replace(
            "[state]\n",
            "[state]\ndead_letter_retry_interval_ms = 1000\n",
        );
    std::fs::write(s.ws.config(), text).unwrap();
    let cli = Cli::new(&s.ws);
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-b1", "busy-1", "GDPR", &["purge_db"]), // to deny
            erase("r-b2", "busy-2", "GDPR", &["purge_db"]), // to hold
            erase("r-f3", "fail-3", "GDPR", &["purge_db"]), // to deny
            erase("r-b4", "busy-4", "GDPR", &["purge_db"]), // left alone
        ],
    )
    .await;
    for key in ["r-b1", "r-b2", "r-f3", "r-b4"] {
        cli.wait_status(key, "failed").await;
    }
    let letters = cli.letters();
    assert_eq!(letters.len(), 4, "{letters:#?}");
    for (key, code) in [("r-b1", "insufficient_verification"), ("r-f3", "other")] {
        cli.expect(
            0,
            &["requests", "deny", "--key", key, "--reason-code", code],
        );
    }
    cli.expect(
        0,
        &[
            "requests",
            "hold",
            "--key",
            "r-b2",
            "--reason",
            "litigation",
        ],
    );
    let before = |path: &str| s.jobs.count(path);
    let (b1, b2, f3) = (
        before("/db/busy-1"),
        before("/db/busy-2"),
        before("/db/fail-3"),
    );
    s.jobs.fixed.store(true, SeqCst);

    // The daemon's retries: the request left alone is sent and completes...
    cli.wait_status("r-b4", "complete").await;
    // ... and an operator's, of every letter.
    for letter in &letters {
        let id = letter["id"].as_u64().unwrap().to_string();
        let _ = cli.run(&["dead-letters", "retry", "--id", &id]);
    }
    // Time for two more rounds of the daemon's retries (one a second), were they to send.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.jobs.count("/db/busy-1"), b1, "a denied request was sent");
    assert_eq!(s.jobs.count("/db/fail-3"), f3, "a denied request was sent");
    assert_eq!(s.jobs.count("/db/busy-2"), b2, "a held request was sent");
    assert_eq!(cli.show("r-b1")["status"], "denied");
    assert_eq!(cli.show("r-b2")["status"], "held");

    // Released: its letter is retried (by the daemon, or an operator's retry of every
    // letter, which still sends nothing for the denied ones) and the request completes.
    cli.expect(0, &["requests", "release", "--key", "r-b2"]);
    for letter in cli.letters() {
        let id = letter["id"].as_u64().unwrap().to_string();
        let _ = cli.run(&["dead-letters", "retry", "--id", &id]);
    }
    let shown = cli.wait_status("r-b2", "complete").await;
    assert!(shown["hold"].is_null(), "{shown:#}");
    stop(daemon);
    assert_eq!(s.jobs.count("/db/busy-1"), b1, "a denied request was sent");
    assert_eq!(s.jobs.count("/db/fail-3"), f3, "a denied request was sent");
}

/// More jobs waiting than the daemon reads in one page (64): every one is polled to its
/// end, across a restart, and each submitted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_jobs_than_a_page_are_all_polled_to_their_end() {
    const N: usize = 70;
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    let daemon = start(&s.ws).await;
    let records: Vec<(String, Vec<u8>)> = (0..N)
        .map(|n| {
            erase(
                &format!("r-{n}"),
                &format!("user-{n}"),
                "GDPR",
                &["purge_db"],
            )
        })
        .collect();
    put(&s.client, "events", &records).await;
    wait_until(
        Duration::from_secs(60),
        "every job submitted and polled",
        || (0..N).all(|n| s.jobs.polls_at(&format!("/db/user-{n}")) >= 1),
    )
    .await;
    stop(daemon);
    s.jobs.unstick_all();
    let daemon = start(&s.ws).await;
    wait_until(
        Duration::from_secs(60),
        "every job polled to its end",
        || (0..N).all(|n| s.jobs.polls_at(&format!("/db/user-{n}")) >= 2),
    )
    .await;
    for n in [0, 63, 64, N - 1] {
        cli.wait_status(&format!("r-{n}"), "complete").await;
    }
    stop(daemon);
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "job_done"), N, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), N);
    let per_key = s.jobs.per_key();
    assert_eq!(per_key.len(), N);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
}

/// A completion's settings are checked before anything starts: polls no more often than
/// every 100 ms, give-ups no sooner than a second, pointers that are JSON pointers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_out_of_bounds_is_refused_at_start_naming_the_setting() {
    let jobs = JobBackend::start(1).await;
    // Nothing listens there: the config is refused before any connection.
    let ws = Workspace::new("http://127.0.0.1:9", "events", &jobs.url);
    add_obligations(&ws, &jobs.url);
    let good = std::fs::read_to_string(ws.config()).unwrap();
    for (from, to, named) in [
        (
            format!("poll_interval_ms = {POLL_MS}"),
            "poll_interval_ms = 50".to_owned(),
            "poll_interval_ms",
        ),
        (
            "job_id_pointer = \"/job/id\"".to_owned(),
            "job_id_pointer = \"job.id\"".to_owned(),
            "job_id_pointer",
        ),
        (
            "give_up_after_ms = 31536000000".to_owned(),
            "give_up_after_ms = 500".to_owned(),
            "give_up_after_ms",
        ),
    ] {
        std::fs::write(ws.config(), &good).unwrap();
        ws.edit_config(&from, &to);
        let config = ws.config();
        let (code, out, err) =
            tokio::task::block_in_place(|| ws.run(&["run", "--config", config.to_str().unwrap()]));
        assert_ne!(code, 0, "{to}: started\n{out}{err}");
        assert!(err.contains(named), "{to}: {err}");
        assert_eq!(jobs.count("/"), 0);
    }
}

/// A status URL that fails is asked again (and counted); one that answers slowly holds
/// up neither the other jobs nor a shutdown, and its job is asked again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_slow_status_urls_hold_up_nothing() {
    let s = setup(1).await;
    s.ws.with_metrics();
    // Long enough for a slow poll to outlast any wait for the shutdown.
    let text = std::fs::read_to_string(s.ws.config()).unwrap();
    std::fs::write(
        s.ws.config(),
        text.replace("timeout_ms = 5000", "timeout_ms = 120000"),
    )
    .unwrap();
    let cli = Cli::new(&s.ws);
    s.jobs.slow_down("slow-");
    s.jobs.fail_polls(2);
    let daemon = start(&s.ws).await;
    let address = metrics_address(&daemon).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-1", "slow-1", "GDPR", &["purge_db"]),
            erase("r-2", "quick-2", "GDPR", &["purge_db"]),
        ],
    )
    .await;
    wait_until(Duration::from_secs(30), "a slow poll under way", || {
        s.jobs.slow_polls() >= 1
    })
    .await;
    // The other job is polled (through two failing polls) to its end meanwhile.
    cli.wait_status("r-2", "complete").await;
    assert_eq!(cli.show("r-1")["status"], "waiting");
    let m = metrics(&address).await;
    assert_eq!(
        m.get(r#"gdpr_consumer_job_poll_errors_total{action="purge_db"}"#),
        Some(&2.0),
        "{m:?}"
    );
    // SIGTERM while the slow poll is unanswered: the daemon does not wait for it.
    stop(daemon);
    s.jobs.unstick_all();
    let daemon = start(&s.ws).await;
    cli.wait_status("r-1", "complete").await;
    stop(daemon);
    let per_key = s.jobs.per_key();
    assert_eq!(per_key.len(), 2, "{per_key:?}");
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    assert!(cli.letters().is_empty());
}

/// A status the action counts as done (404 "already gone") starts no job: done at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_status_that_is_no_job_is_done_at_once() {
    let s = setup(1).await;
    s.ws.edit_config(
        "[actions.purge_mail]\n",
        "[actions.purge_mail]\nsuccess_statuses = [404, 410]\n",
    );
    let cli = Cli::new(&s.ws);
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[erase("r-g", "gone-1", "GDPR", &["purge_mail"])],
    )
    .await;
    let shown = cli.wait_status("r-g", "complete").await;
    stop(daemon);
    let mail = &shown["actions"]["purge_mail"];
    assert_eq!(mail["status"], "done", "{shown:#}");
    assert_eq!(mail["http_status"], 404, "{shown:#}");
    assert!(mail["job_id"].is_null(), "{shown:#}");
    assert!(s.jobs.polls_seen().is_empty());
    assert_eq!(s.jobs.count("/mail/gone-1"), 1);
    assert!(cli.letters().is_empty());
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "accepted"), 0, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 1, "{audit:#?}");
}

/// A decision whose params cannot fill the status URL is refused before it is sent (a job
/// that could never be followed must not be started): a dead letter, nothing submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_cannot_fill_the_status_url_is_not_sent() {
    let s = setup(1).await;
    s.ws.edit_config("?user={user_id}", "?tenant={tenant}");
    let cli = Cli::new(&s.ws);
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-t", "tina", "GDPR", &["purge_mail"]),
            erase("r-m", "marker", "GDPR", &["notify"]),
            // One request, one action that cannot be built: not complete.
            erase("r-2", "two", "GDPR", &["notify", "purge_mail"]),
        ],
    )
    .await;
    cli.wait_status("r-m", "complete").await;
    let two = cli.wait_status("r-2", "failed").await;
    assert_eq!(two["actions"]["notify"]["status"], "done", "{two:#}");
    assert_eq!(two["actions"]["purge_mail"]["status"], "failed", "{two:#}");
    assert!(two["completed_at"].is_null(), "{two:#}");
    let letters = cli.letters();
    stop(daemon);
    assert_eq!(s.jobs.count("/mail/"), 0, "sent a job it could not follow");
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for letter in &letters {
        assert!(
            letter["error"].as_str().unwrap_or("").contains("tenant"),
            "{letters:#?}"
        );
    }
    assert_eq!(
        two["actions"]["purge_mail"]["dead_letter"],
        letters[1]["id"]
    );
}

/// `requests extend`: once, before the due date; GDPR two calendar months, CCPA 45 days.
/// A paused action's request is held; resumed, it is submitted and its job followed like
/// any other: waiting until the job is done, not done at the 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_a_paused_action_starts_its_job_when_resumed() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    let daemon = start(&s.ws).await;
    cli.expect(
        0,
        &["actions", "pause", "purge_db", "--reason", "migration"],
    );
    put(
        &s.client,
        "events",
        &[erase("r-p", "paula", "GDPR", &["purge_db", "notify"])],
    )
    .await;
    let shown = cli
        .wait_show("r-p", "purge_db held", |s| {
            s["actions"]["purge_db"]["status"] == "held"
                && s["actions"]["notify"]["status"] == "done"
        })
        .await;
    assert_eq!(shown["status"], "held", "{shown:#}");
    assert_eq!(s.jobs.count("/db/"), 0);
    cli.expect(0, &["actions", "resume", "purge_db"]);
    wait_until(Duration::from_secs(30), "submitted", || {
        s.jobs.count("/db/paula") == 1
    })
    .await;
    let shown = cli
        .wait_show("r-p", "its job polled", |s| {
            s["actions"]["purge_db"]["polls"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(shown["status"], "waiting", "{shown:#}");
    assert_eq!(shown["actions"]["purge_db"]["status"], "waiting");
    assert_eq!(
        shown["actions"]["purge_db"]["job_id"].as_str(),
        s.jobs.job_of("/db/paula").as_deref()
    );
    let lookup = cli.expect(
        0,
        &["audit", "lookup", "--action", "purge_db", "--key", "r-p"],
    );
    assert_eq!(
        json_lines(&lookup).last().unwrap()["done"],
        false,
        "{lookup}"
    );
    s.jobs.unstick_all();
    cli.wait_status("r-p", "complete").await;
    stop(daemon);
    assert_eq!(s.jobs.count("/db/paula"), 1);
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "job_done"), 1, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 1, "{audit:#?}");
}

/// A job whose action lost its completion (the config changed while it waited) is not
/// forgotten: still asked, and given up in time, a dead letter saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_action_lost_its_completion_is_given_up_not_forgotten() {
    let s = setup(1).await;
    // purge_db's (the first completion in the config).
    s.ws.edit_config("give_up_after_ms = 31536000000", "give_up_after_ms = 5000");
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[erase("r-l", "lou", "GDPR", &["purge_db"])],
    )
    .await;
    wait_until(Duration::from_secs(30), "polled", || {
        s.jobs.polls_at("/db/lou") >= 1
    })
    .await;
    stop(daemon);
    let text = std::fs::read_to_string(s.ws.config()).unwrap();
    let start_at = text.find("[actions.purge_db.completion]").unwrap();
    let end_at = start_at + text[start_at..].find("\n\n[").unwrap();
    std::fs::write(
        s.ws.config(),
        format!("{}{}", &text[..start_at], &text[end_at + 2..]),
    )
    .unwrap();
    assert!(!std::fs::read_to_string(s.ws.config())
        .unwrap()
        .contains("[actions.purge_db.completion]"));
    // Started again once its give-up time has passed (a job is given up at its first poll
    // after that time).
    let waiting = cli.show("r-l");
    let accepted = waiting["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "accepted")
        .map(|e| parse_time(&e["time"]))
        .unwrap_or_else(|| panic!("{waiting:#}"));
    let give_up = accepted.as_millisecond() + 5000 + 500;
    let left = give_up - jiff::Timestamp::now().as_millisecond();
    if left > 0 {
        tokio::time::sleep(Duration::from_millis(left as u64)).await;
    }
    let daemon = start(&s.ws).await;
    let shown = cli.wait_status("r-l", "failed").await;
    let letters = cli.letters();
    stop(daemon);
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert!(
        letters[0]["error"].as_str().unwrap().contains("gave up"),
        "{letters:#?}"
    );
    assert_eq!(
        shown["actions"]["purge_db"]["dead_letter"],
        letters[0]["id"]
    );
    assert_eq!(s.jobs.count("/db/lou"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_moves_the_due_date_once_by_the_regulation() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/");
    // The last day of January: a month later is the last day of February, long past.
    let old_at: jiff::Timestamp = "2026-01-31T10:00:00Z".parse().unwrap();
    // Recent requests, their due dates still ahead.
    let day = |days: i64| jiff::Timestamp::from_millisecond(whole_seconds_ago(days)).unwrap();
    // An arrival with a millisecond a float of seconds holds just below (….685 as
    // ….68499…): kept to the millisecond, not truncated.
    let gdpr_ms = (1..1000)
        .map(|ms| day(2).as_millisecond() + ms)
        .find(|ms| {
            let seconds = *ms as f64 / 1000.0;
            ((seconds - seconds.floor()) * 1000.0).floor() as i64 != ms % 1000
        })
        .unwrap();
    let gdpr_at = jiff::Timestamp::from_millisecond(gdpr_ms).unwrap();
    let ccpa_at = day(10);
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase_at(
                format!("at-{}", old_at.as_millisecond()),
                "r-old",
                "olga",
                "GDPR",
                &["purge_db"],
            ),
            erase_at(
                format!("at-{}", gdpr_at.as_millisecond()),
                "r-g",
                "gina",
                "GDPR",
                &["purge_db"],
            ),
            erase_at(
                format!("at-{}", ccpa_at.as_millisecond()),
                "ccpa:r-c",
                "carl",
                "CCPA",
                &["purge_db"],
            ),
        ],
    )
    .await;
    let old = cli.wait_status("r-old", "waiting").await;
    assert_eq!(old["arrival_ms"], old_at.as_millisecond(), "{old:#}");
    let feb_28: jiff::Timestamp = "2026-02-28T10:00:00Z".parse().unwrap();
    assert_eq!(plus(old_at, jiff::Span::new().months(1)), feb_28);
    assert_eq!(parse_time(&old["original_due_date"]), feb_28, "{old:#}");
    // Past its due date: too late to extend.
    let (code, _, err) = cli.run(&["requests", "extend", "--key", "r-old", "--reason", "late"]);
    assert_eq!(code, 1, "{err}");
    assert!(cli.show("r-old")["extension"].is_null());
    let gdpr = cli.wait_status("r-g", "waiting").await;
    let ccpa = cli.wait_status("ccpa:r-c", "waiting").await;
    assert_eq!(gdpr["arrival_ms"], gdpr_at.as_millisecond(), "{gdpr:#}");
    assert_eq!(ccpa["arrival_ms"], ccpa_at.as_millisecond(), "{ccpa:#}");
    let gdpr_due = plus(gdpr_at, jiff::Span::new().months(1));
    let ccpa_due = plus(ccpa_at, jiff::Span::new().days(45));
    assert_eq!(parse_time(&gdpr["original_due_date"]), gdpr_due);
    assert_eq!(parse_time(&gdpr["due_date"]), gdpr_due);
    assert_eq!(parse_time(&ccpa["original_due_date"]), ccpa_due);
    assert_eq!(parse_time(&ccpa["due_date"]), ccpa_due);
    assert!(gdpr["extension"].is_null());

    // GDPR, with the daemon running: two more calendar months, once.
    cli.expect(
        0,
        &[
            "requests",
            "extend",
            "--key",
            "r-g",
            "--reason",
            "complex request",
        ],
    );
    let gdpr = cli.show("r-g");
    let extended = plus(gdpr_due, jiff::Span::new().months(2));
    assert_eq!(parse_time(&gdpr["due_date"]), extended, "{gdpr:#}");
    assert_eq!(parse_time(&gdpr["original_due_date"]), gdpr_due);
    assert_eq!(gdpr["extension"]["reason"], "complex request");
    assert_eq!(parse_time(&gdpr["extension"]["due_date"]), extended);
    assert!(
        !gdpr["extension"]["by"].as_str().unwrap().is_empty(),
        "{gdpr:#}"
    );
    assert!(gdpr["extension"]["at"].is_string(), "{gdpr:#}");
    cli.expect(
        1,
        &["requests", "extend", "--key", "r-g", "--reason", "again"],
    );
    cli.expect(
        1,
        &["requests", "extend", "--key", "never-seen", "--reason", "x"],
    );
    stop(daemon);

    // CCPA, with the daemon stopped: 45 more days, once.
    cli.expect(
        0,
        &[
            "requests",
            "extend",
            "--key",
            "ccpa:r-c",
            "--reason",
            "reasonably necessary",
        ],
    );
    let ccpa = cli.show("ccpa:r-c");
    let extended = plus(ccpa_due, jiff::Span::new().days(45));
    assert_eq!(parse_time(&ccpa["due_date"]), extended, "{ccpa:#}");
    assert_eq!(parse_time(&ccpa["original_due_date"]), ccpa_due);
    cli.expect(
        1,
        &[
            "requests", "extend", "--key", "ccpa:r-c", "--reason", "again",
        ],
    );
    // Still once after a restart.
    let daemon = start(&s.ws).await;
    cli.expect(
        1,
        &["requests", "extend", "--key", "ccpa:r-c", "--reason", "x"],
    );
    let ccpa = cli.show("ccpa:r-c");
    assert_eq!(parse_time(&ccpa["due_date"]), extended);
    assert_eq!(by_someone(&ccpa, "extended"), 1, "{ccpa:#}");
    stop(daemon);
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "extended"), 2, "{audit:#?}");
    for entry in audit.iter().filter(|e| e["outcome"] == "extended") {
        assert!(
            entry["by"].as_str().is_some_and(|b| !b.is_empty()),
            "{entry}"
        );
    }
}

/// A legal hold keeps a request's later actions unsent until it is released (made and
/// lifted with the daemon running and stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_sends_nothing_until_released() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/db/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-h1", "hana", "GDPR", &["notify", "purge_db"]),
            erase("r-h2", "hugo", "GDPR", &["notify", "purge_db"]),
        ],
    )
    .await;
    for key in ["r-h1", "r-h2"] {
        cli.wait_show(key, "notify done", |s| {
            s["actions"]["notify"]["status"] == "done"
        })
        .await;
    }
    let hold = |key: &str, code: i32| {
        cli.expect(
            code,
            &[
                "requests",
                "hold",
                "--key",
                key,
                "--reason",
                "litigation hold",
            ],
        );
    };
    // Held while the daemon runs, and while it is stopped; once.
    hold("r-h1", 0);
    hold("r-h1", 1);
    stop(daemon);
    hold("r-h2", 0);
    hold("r-h2", 1);
    hold("never-seen", 1);
    let daemon = start(&s.ws).await;
    let shown = cli.show("r-h1");
    assert_eq!(shown["status"], "held", "{shown:#}");
    assert_eq!(shown["hold"]["reason"], "litigation hold");
    assert!(shown["hold"]["since"].is_string(), "{shown:#}");
    assert!(!shown["hold"]["by"].as_str().unwrap().is_empty());

    // New actions for the held requests, then a marker request after them.
    put(
        &s.client,
        "events",
        &[
            erase("r-h1", "hana", "GDPR", &["purge_mail"]),
            erase("r-h2", "hugo", "GDPR", &["purge_mail"]),
            erase("r-m", "marker", "GDPR", &["notify"]),
        ],
    )
    .await;
    wait_until(Duration::from_secs(30), "the marker sent", || {
        s.jobs.count("/plain/marker") == 1
    })
    .await;
    for key in ["r-h1", "r-h2"] {
        let shown = cli
            .wait_show(key, "purge_mail held", |s| {
                s["actions"]["purge_mail"]["status"] == "held"
            })
            .await;
        assert_eq!(shown["status"], "held", "{shown:#}");
    }
    assert_eq!(s.jobs.count("/mail/"), 0, "a held action was sent");

    // Released while the daemon runs: sent at once.
    cli.expect(0, &["requests", "release", "--key", "r-h1"]);
    cli.expect(1, &["requests", "release", "--key", "r-h1"]);
    wait_until(Duration::from_secs(30), "r-h1's purge_mail sent", || {
        s.jobs.count("/mail/hana") == 1
    })
    .await;
    stop(daemon);
    assert_eq!(s.jobs.count("/mail/hugo"), 0, "a held action was sent");

    // Released while it is stopped: sent once it starts.
    cli.expect(0, &["requests", "release", "--key", "r-h2"]);
    cli.expect(1, &["requests", "release", "--key", "r-h2"]);
    let daemon = start(&s.ws).await;
    wait_until(Duration::from_secs(30), "r-h2's purge_mail sent", || {
        s.jobs.count("/mail/hugo") == 1
    })
    .await;
    s.jobs.unstick_all();
    for key in ["r-h1", "r-h2"] {
        let shown = cli.wait_status(key, "complete").await;
        assert!(shown["hold"].is_null(), "{shown:#}");
        assert_eq!(by_someone(&shown, "legal_hold"), 1, "{shown:#}");
        assert_eq!(by_someone(&shown, "hold_released"), 1, "{shown:#}");
    }
    stop(daemon);
    assert_eq!(s.jobs.count("/mail/"), 2);
    assert_eq!(s.jobs.count("/db/"), 2);
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "legal_hold"), 2, "{audit:#?}");
    assert_eq!(outcomes(&audit, "hold_released"), 2, "{audit:#?}");
}

/// A denied request: nothing more is sent for its key; show and the trail give the basis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_sends_nothing_more() {
    let s = setup(1).await;
    let cli = Cli::new(&s.ws);
    s.jobs.stick("/db/");
    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-d1", "dora", "GDPR", &["purge_db"]),
            erase("r-d2", "dan", "CCPA", &["purge_db"]),
            erase("r-ok", "otto", "GDPR", &["notify"]),
        ],
    )
    .await;
    for key in ["r-d1", "r-d2"] {
        cli.wait_status(key, "waiting").await;
    }
    cli.wait_status("r-ok", "complete").await;

    // Denied while the daemon runs.
    cli.expect(
        0,
        &[
            "requests",
            "deny",
            "--key",
            "r-d1",
            "--reason-code",
            "legal_obligation",
            "--note",
            "tax records kept 10 years",
        ],
    );
    cli.expect(
        2,
        &[
            "requests",
            "deny",
            "--key",
            "r-d2",
            "--reason-code",
            "bored",
        ],
    );
    cli.expect(
        1,
        &[
            "requests",
            "deny",
            "--key",
            "r-ok",
            "--reason-code",
            "other",
        ],
    );
    cli.expect(
        1,
        &[
            "requests",
            "deny",
            "--key",
            "never-seen",
            "--reason-code",
            "other",
        ],
    );
    stop(daemon);
    // Denied while it is stopped.
    cli.expect(
        0,
        &[
            "requests",
            "deny",
            "--key",
            "r-d2",
            "--reason-code",
            "no_match",
        ],
    );

    let daemon = start(&s.ws).await;
    put(
        &s.client,
        "events",
        &[
            erase("r-d1", "dora", "GDPR", &["purge_mail", "notify"]),
            erase("r-d2", "dan", "CCPA", &["purge_mail", "notify"]),
            erase("r-m", "marker", "GDPR", &["notify"]),
        ],
    )
    .await;
    wait_until(Duration::from_secs(30), "the marker sent", || {
        s.jobs.count("/plain/marker") == 1
    })
    .await;
    let d1 = cli.show("r-d1");
    let d2 = cli.show("r-d2");
    stop(daemon);
    assert_eq!(s.jobs.count("/mail/"), 0, "a denied request was sent");
    assert_eq!(s.jobs.count("/plain/dora"), 0, "a denied request was sent");
    assert_eq!(s.jobs.count("/plain/dan"), 0, "a denied request was sent");
    assert_eq!(s.jobs.count("/db/"), 2);

    for (shown, code) in [(&d1, "legal_obligation"), (&d2, "no_match")] {
        assert_eq!(shown["status"], "denied", "{shown:#}");
        assert_eq!(shown["denial"]["code"], code, "{shown:#}");
        assert!(!shown["denial"]["by"].as_str().unwrap().is_empty());
        assert!(shown["denial"]["at"].is_string(), "{shown:#}");
        for action in ["purge_mail", "notify"] {
            let a = &shown["actions"][action];
            assert!(
                a.is_null() || a["status"] == "denied",
                "{action} of a denied request: {shown:#}"
            );
        }
    }
    assert_eq!(d1["denial"]["note"], "tax records kept 10 years");
    for shown in [&d1, &d2] {
        assert_eq!(
            shown["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["event"] == "denied" && e["action"].is_null())
                .inspect(|e| assert!(e["by"].as_str().is_some_and(|b| !b.is_empty()), "{e}"))
                .count(),
            1,
            "{shown:#}"
        );
    }
    let audit = cli.audit();
    let denied: Vec<&Value> = audit.iter().filter(|e| e["outcome"] == "denied").collect();
    // The operators' denials, by whom; then each action a later record decided, not sent.
    let by_operator: Vec<&&Value> = denied
        .iter()
        .filter(|e| e["by"].as_str().is_some_and(|b| !b.is_empty()))
        .collect();
    assert_eq!(by_operator.len(), 2, "{audit:#?}");
    let codes: BTreeSet<&str> = by_operator
        .iter()
        .map(|e| e["denial_code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, BTreeSet::from(["legal_obligation", "no_match"]));
    for entry in &denied {
        assert_eq!(entry["nature"], "deletion");
    }
    assert!(
        denied.len() <= 8,
        "more denied entries than denials, suppressed actions and ended jobs: {audit:#?}"
    );
    // In CSV too.
    let csv = cli.expect(0, &["audit", "export", "--format", "csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (outcome, code, nature) = (column("outcome"), column("denial_code"), column("nature"));
    let rows: Vec<Vec<&str>> = lines
        .filter(|l| !l.contains('"'))
        .map(|l| l.split(',').collect())
        .filter(|r: &Vec<&str>| r.len() == header.len() && r[outcome] == "denied")
        .collect();
    assert!(!rows.is_empty(), "{csv}");
    for row in rows {
        assert!(
            ["legal_obligation", "no_match"].contains(&row[code]),
            "{row:?}"
        );
        assert_eq!(row[nature], "deletion");
    }
    // Each says on what basis.
    for entry in &denied {
        assert!(
            ["legal_obligation", "no_match"].contains(&entry["denial_code"].as_str().unwrap_or("")),
            "a denied entry without its basis: {entry}"
        );
    }
}

const DENIAL_CODES: [&str; 5] = [
    "no_match",
    "insufficient_verification",
    "outside_jurisdiction",
    "legal_obligation",
    "other",
];

fn year_of(ms: i64) -> i16 {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .year()
}

/// The report's figures for `year`, computed from each request's `requests show`.
fn expected_report(shown: &[Value], year: i16, now: jiff::Timestamp) -> Value {
    let mut regulations = serde_json::Map::new();
    for regulation in ["GDPR", "CCPA"] {
        let of: Vec<&Value> = shown
            .iter()
            .filter(|s| s["regulation"] == regulation)
            .filter(|s| year_of(s["arrival_ms"].as_i64().unwrap()) == year)
            .collect();
        let denied = |s: &Value| !s["denial"].is_null();
        let complete = |s: &Value| s["status"] == "complete";
        let mut denials = serde_json::Map::new();
        denials.insert(
            "total".into(),
            json!(of.iter().filter(|s| denied(s)).count()),
        );
        for code in DENIAL_CODES {
            let n = of.iter().filter(|s| s["denial"]["code"] == code).count();
            denials.insert(code.into(), json!(n));
        }
        let complied = of
            .iter()
            .filter(|s| !denied(s))
            .filter(|s| {
                s["actions"]
                    .as_object()
                    .unwrap()
                    .values()
                    .any(|a| a["status"] == "done")
            })
            .count();
        let mut days: Vec<f64> = of
            .iter()
            .filter(|s| complete(s))
            .map(|s| {
                (s["completed_at_ms"].as_i64().unwrap() - s["arrival_ms"].as_i64().unwrap()) as f64
                    / 86_400_000.0
            })
            .collect();
        days.sort_by(f64::total_cmp);
        let median = match days.len() {
            0 => None,
            n if n % 2 == 1 => Some(days[n / 2]),
            n => Some((days[n / 2 - 1] + days[n / 2]) / 2.0),
        };
        let mean = (!days.is_empty()).then(|| days.iter().sum::<f64>() / days.len() as f64);
        let open: Vec<&&Value> = of.iter().filter(|s| !complete(s) && !denied(s)).collect();
        let overdue = open
            .iter()
            .filter(|s| parse_time(&s["due_date"]) < now)
            .count();
        regulations.insert(
            regulation.into(),
            json!({
                "received": of.len(),
                "complied": complied,
                "denied": denials,
                "median_days": median,
                "mean_days": mean,
                "open": open.len(),
                "overdue": overdue,
            }),
        );
    }
    json!({ "year": year, "regulations": regulations })
}

/// Compares figures: counts exactly, days within 1e-6.
fn assert_figures(got: &Value, expected: &Value, context: &str) {
    match (got, expected) {
        (Value::Object(g), Value::Object(e)) => {
            let (gk, ek): (BTreeSet<_>, BTreeSet<_>) = (g.keys().collect(), e.keys().collect());
            assert_eq!(gk, ek, "{context}: fields");
            for (k, v) in e {
                assert_figures(&g[k], v, &format!("{context}.{k}"));
            }
        }
        (Value::Number(g), Value::Number(e)) => {
            let (g, e) = (g.as_f64().unwrap(), e.as_f64().unwrap());
            assert!((g - e).abs() < 1e-6, "{context}: {g} != {e}");
        }
        _ => assert_eq!(got, expected, "{context}"),
    }
}

/// The CSV report as the JSON one, to compare the same way.
fn csv_as_json(csv: &str, year: i16) -> Value {
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("regulation,received,complied,denied,denied_no_match,denied_insufficient_verification,denied_outside_jurisdiction,denied_legal_obligation,denied_other,median_days,mean_days,open,overdue"),
        "{csv}"
    );
    let mut regulations = serde_json::Map::new();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{csv}");
    for (row, regulation) in rows.iter().zip(["GDPR", "CCPA"]) {
        assert!(row.starts_with(&format!("{regulation},")), "{csv}");
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 13, "{row}");
        let n = |i: usize| json!(cells[i].parse::<u64>().unwrap_or_else(|_| panic!("{row}")));
        let f = |i: usize| match cells[i] {
            "" => Value::Null,
            x => json!(x.parse::<f64>().unwrap_or_else(|_| panic!("{row}"))),
        };
        let mut denied = serde_json::Map::new();
        denied.insert("total".into(), n(3));
        for (i, code) in DENIAL_CODES.iter().enumerate() {
            denied.insert((*code).into(), n(4 + i));
        }
        regulations.insert(
            regulation.into(),
            json!({
                "received": n(1), "complied": n(2), "denied": denied,
                "median_days": f(9), "mean_days": f(10), "open": n(11), "overdue": n(12),
            }),
        );
    }
    json!({ "year": year, "regulations": regulations })
}

/// The requests' statuses and overdue count as the metrics should show them.
fn expected_metrics(shown: &[Value], now: jiff::Timestamp) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for status in ["open", "waiting", "failed", "held", "complete", "denied"] {
        let n = shown.iter().filter(|s| s["status"] == status).count();
        out.insert(
            format!(r#"gdpr_consumer_requests{{status="{status}"}}"#),
            n as f64,
        );
    }
    let overdue = shown
        .iter()
        .filter(|s| !matches!(s["status"].as_str(), Some("complete" | "denied")))
        .filter(|s| parse_time(&s["due_date"]) < now)
        .count();
    out.insert("gdpr_consumer_requests_overdue".into(), overdue as f64);
    out
}

/// Waits (30 s at most) for the metrics to say `want` (refreshed on their own schedule).
async fn wait_metrics(address: &str, want: &BTreeMap<String, f64>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(address).await;
        let got: BTreeMap<String, f64> = want
            .keys()
            .map(|k| (k.clone(), m.get(k).copied().unwrap_or(f64::NAN)))
            .collect();
        // A status no request has may be absent or 0; one some request has must show.
        let matches = want.iter().all(|(k, v)| {
            let g = got[k];
            g == *v || (*v == 0.0 && g.is_nan() && k.contains("status"))
        });
        if matches {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The report against a scenario of both regulations, computed independently from each
/// request; and the request metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_and_the_metrics_count_what_each_request_shows() {
    let s = setup(1).await;
    s.ws.with_metrics();
    let cli = Cli::new(&s.ws);
    // Users named wait-* have jobs that never end; fail-* jobs fail.
    s.jobs.stick("wait-");
    let daemon = start(&s.ws).await;
    let address = metrics_address(&daemon).await;
    // Nothing open yet: nothing overdue.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(&address).await;
        let zero = |name: &str| m.get(name) == Some(&0.0);
        if zero("gdpr_consumer_oldest_open_request_overdue_seconds")
            && zero("gdpr_consumer_requests_overdue")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (db, mail, notify) = ("purge_db", "purge_mail", "notify");
    // Either side of the new year (UTC): counted in the year each arrived in.
    let year = year_of(jiff::Timestamp::now().as_millisecond());
    let new_year: jiff::Timestamp = format!("{year}-01-01T00:00:00Z").parse().unwrap();
    let at = |t: jiff::Timestamp| format!("at-{}", t.as_millisecond());
    let last_ms = jiff::Timestamp::from_millisecond(new_year.as_millisecond() - 1).unwrap();
    let requests = [
        erase_at(at(last_ms), "y0", "y0", "GDPR", &[notify]),
        erase_at(at(new_year), "y1", "wait-y1", "GDPR", &[db]), // overdue
        erase_aged(10, "g1", "g1", "GDPR", &[notify]),
        erase_aged(3, "g2", "g2", "GDPR", &[notify, db]),
        erase_aged(20, "g9", "g9", "GDPR", &[notify]),
        erase_aged(40, "g3", "wait-g3", "GDPR", &[db]), // overdue
        erase_aged(25, "g4", "wait-g4", "GDPR", &[db]), // extended before its due date
        erase_aged(1, "g5", "wait-g5", "GDPR", &[db]),  // denied
        erase_aged(2, "g6", "wait-g6", "GDPR", &[notify, mail]), // in part
        erase_aged(2, "g7", "wait-g7", "GDPR", &[db]),  // held
        erase_aged(1, "g8", "fail-g8", "GDPR", &[db]),  // failed
        erase_aged(50, "c1", "c1", "CCPA", &[notify]),
        erase("c4", "c4", "CCPA", &[notify]),
        erase_aged(7, "c6", "c6", "CCPA", &[notify, mail]),
        erase_aged(50, "c2", "wait-c2", "CCPA", &[db]), // overdue
        erase_aged(2, "c3", "wait-c3", "CCPA", &[notify, db]), // denied after a deletion
        erase_aged(1, "c5", "wait-c5", "CCPA", &[mail]), // denied
    ];
    put(&s.client, "events", &requests).await;
    let keys = [
        "y0", "y1", "g1", "g2", "g9", "g3", "g4", "g5", "g6", "g7", "g8", "c1", "c4", "c6", "c2",
        "c3", "c5",
    ];
    for key in ["y0", "g1", "g2", "g9", "c1", "c4", "c6"] {
        cli.wait_status(key, "complete").await;
    }
    cli.wait_status("g8", "failed").await;
    for key in ["y1", "g3", "g4", "g5", "g7", "c2", "c3", "c5"] {
        cli.wait_status(key, "waiting").await;
    }
    for key in ["g6", "c3"] {
        cli.wait_show(key, "notify done", |s| {
            s["actions"]["notify"]["status"] == "done"
        })
        .await;
    }
    cli.expect(
        0,
        &["requests", "extend", "--key", "g4", "--reason", "complex"],
    );
    cli.expect(
        0,
        &["requests", "hold", "--key", "g7", "--reason", "court order"],
    );
    for (key, code) in [
        ("g5", "no_match"),
        ("c3", "legal_obligation"),
        ("c5", "other"),
    ] {
        cli.expect(
            0,
            &["requests", "deny", "--key", key, "--reason-code", code],
        );
    }

    let shown: Vec<Value> = keys.iter().map(|k| cli.show(k)).collect();
    let now = jiff::Timestamp::now();
    let years: BTreeSet<i16> = shown
        .iter()
        .map(|s| year_of(s["arrival_ms"].as_i64().unwrap()))
        .collect();
    // Sanity of the scenario itself: the figures below are not all zero.
    let this_year = year_of(now.as_millisecond());
    // The scenario is what it was meant to be (so the figures below compare something).
    let statuses: BTreeMap<&str, &str> = keys
        .iter()
        .zip(&shown)
        .map(|(k, s)| (*k, s["status"].as_str().unwrap()))
        .collect();
    let intended: BTreeMap<&str, &str> = [
        ("y0", "complete"),
        ("y1", "waiting"),
        ("g1", "complete"),
        ("g2", "complete"),
        ("g9", "complete"),
        ("g3", "waiting"),
        ("g4", "waiting"),
        ("g5", "denied"),
        ("g6", "waiting"),
        ("g7", "held"),
        ("g8", "failed"),
        ("c1", "complete"),
        ("c4", "complete"),
        ("c6", "complete"),
        ("c2", "waiting"),
        ("c3", "denied"),
        ("c5", "denied"),
    ]
    .into_iter()
    .collect();
    assert_eq!(statuses, intended);
    let expected = expected_report(&shown, this_year, now);
    // The aged requests arrived this year too (not so in early January).
    if years.len() == 2 {
        let figures = |r: &str| {
            let r = &expected["regulations"][r];
            [
                &r["received"],
                &r["complied"],
                &r["denied"]["total"],
                &r["open"],
                &r["overdue"],
            ]
            .map(|v| v.as_u64().unwrap())
        };
        assert_eq!(figures("GDPR"), [10, 4, 1, 6, 2], "{expected:#}");
        assert_eq!(figures("CCPA"), [6, 3, 2, 1, 1], "{expected:#}");
    }
    let last_year = expected_report(&shown, this_year - 1, now);
    assert_eq!(
        last_year["regulations"]["GDPR"]["received"], 1,
        "{last_year:#}"
    );

    // The metrics, while the daemon runs (refreshed on their own schedule).
    let want = expected_metrics(&shown, now);
    assert!(want["gdpr_consumer_requests_overdue"] >= 2.0, "{want:?}");
    wait_metrics(&address, &want).await;
    // The same on /status.
    let (_, status) = get(&address, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    let requests = &status["requests"];
    for (name, value) in &want {
        if let Some(label) = name.strip_prefix("gdpr_consumer_requests{status=\"") {
            let label = label.trim_end_matches("\"}");
            let got = requests["by_status"][label].as_u64().unwrap_or(0);
            assert_eq!(got as f64, *value, "{label}: {status:#}");
        }
    }
    assert_eq!(
        requests["overdue"].as_u64().map(|n| n as f64),
        Some(want["gdpr_consumer_requests_overdue"]),
        "{status:#}"
    );
    // The open request due first: how long past due it is.
    let oldest_due = shown
        .iter()
        .filter(|s| !matches!(s["status"].as_str(), Some("complete" | "denied")))
        .map(|s| parse_time(&s["due_date"]))
        .min()
        .unwrap();
    let m = metrics(&address).await;
    let overdue_s = m["gdpr_consumer_oldest_open_request_overdue_seconds"];
    let expected_s =
        (jiff::Timestamp::now().as_millisecond() - oldest_due.as_millisecond()) as f64 / 1000.0;
    assert!(
        overdue_s > 0.0 && (overdue_s - expected_s).abs() < 600.0,
        "{overdue_s} vs {expected_s}"
    );

    // The report: JSON served by the running daemon, CSV read with it stopped.
    for year in &years {
        let out = cli.expect(
            0,
            &["report", "--year", &year.to_string(), "--format", "json"],
        );
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_figures(
            &got,
            &expected_report(&shown, *year, now),
            &format!("report {year}"),
        );
    }
    let human = cli.expect(0, &["report", "--year", &this_year.to_string()]);
    assert!(human.contains("GDPR") && human.contains("CCPA"), "{human}");
    stop(daemon);
    for year in &years {
        let out = cli.expect(
            0,
            &["report", "--year", &year.to_string(), "--format", "csv"],
        );
        assert_figures(
            &csv_as_json(&out, *year),
            &expected_report(&shown, *year, now),
            &format!("csv report {year}"),
        );
    }
    // A year without requests: zeros and nulls.
    let empty = cli.expect(0, &["report", "--year", "2001", "--format", "json"]);
    let empty: Value = serde_json::from_str(&empty).unwrap();
    assert_figures(&empty, &expected_report(&[], 2001, now), "report 2001");
    cli.expect(2, &["report", "--year", "2026", "--format", "xml"]);
    cli.expect(2, &["report", "--year", "99999", "--format", "json"]);
}

/// The state key a fleet's workers share.
const FLEET_KEY: &str = "5f0c6a1e9b2d4c3f8a7e6d5c4b3a29180f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// A workspace with the obligations' actions whose config runs a fleet on `dynamo`.
fn fleet_workspace(kinesis: &str, jobs: &str, dynamo: &str) -> Workspace {
    let ws = Workspace::new(kinesis, "events", jobs);
    add_obligations(&ws, jobs);
    ws.edit_config("[state]\n", "[state]\nkey_env = \"GDPR_TEST_STATE_KEY\"\n");
    let text = std::fs::read_to_string(ws.config()).unwrap();
    std::fs::write(
        ws.config(),
        format!(
            "{text}\n[coordination]\nkind = \"dynamodb\"\nendpoint_url = \"{dynamo}\"\ncreate_tables = true\nlease_duration_ms = 1500\n"
        ),
    )
    .unwrap();
    ws
}

/// Two workers on a shared state (dynalite): jobs started by one are polled to their end
/// by whichever runs, across a SIGTERM and a kill -9; each submitted once. Holds and
/// denials made with the fleet's config bind every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_polls_jobs_across_restarts_submits_each_once_and_honours_holds_and_denials() {
    let kinesis = Kinesalite::start();
    let dynalite = Dynalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let jobs = JobBackend::start(1).await;
    let ws = fleet_workspace(&kinesis.endpoint, &jobs.url, &dynalite.endpoint);
    ws.with_metrics();
    let cli = Cli {
        ws: &ws,
        env: vec![("GDPR_TEST_STATE_KEY", FLEET_KEY)],
    };
    let worker = || ws.start_daemon_with_env(&[], &[("GDPR_TEST_STATE_KEY", FLEET_KEY)]);
    jobs.stick("/");
    let first = worker();
    let second = worker();
    let keys: Vec<String> = (0..4).map(|n| format!("r-{n}")).collect();
    let records: Vec<(String, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| {
            let (_, data) = erase(
                key,
                &format!("user-{n}"),
                "GDPR",
                &["purge_db", "purge_mail"],
            );
            (format!("pk-{n}"), data)
        })
        .collect();
    put(&client, "events", &records).await;
    let logs = |workers: &[&Daemon]| {
        workers
            .iter()
            .map(|w| w.stderr())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while jobs.count("/") < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "8 submissions: {:?}\n{}",
            jobs.submissions(),
            logs(&[&first, &second])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(0..4).all(|n| {
        jobs.polls_at(&format!("/db/user-{n}")) >= 1
            && jobs.polls_at(&format!("/mail/user-{n}")) >= 1
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "not all jobs polled\n{}",
            logs(&[&first, &second])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for key in &keys {
        let shown = cli.show(key);
        assert_eq!(shown["status"], "waiting", "{shown:#}");
    }

    // One worker stops (SIGTERM), the other crashes (kill -9); two new ones take over.
    stop(first);
    second.signal("KILL");
    let _ = second.wait_exit();
    let polls = jobs.polls();
    let third = worker();
    let fourth = worker();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while jobs.polls() < polls + 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "no polls after the restart\n{}",
            logs(&[&third, &fourth])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    jobs.stuck_only(&["user-8", "user-9"]);
    for key in &keys {
        cli.wait_status(key, "complete").await;
    }

    // Held and denied in the fleet: a later record's actions are not sent (denied), or
    // not until released (held). One partition key: one shard, in order.
    let one_shard = |key: &str, user: &str, actions: &[&str]| {
        let (_, data) = erase(key, user, "GDPR", actions);
        ("same-shard".to_owned(), data)
    };
    put(
        &client,
        "events",
        &[
            one_shard("r-8", "user-8", &["purge_db"]),
            one_shard("r-9", "user-9", &["purge_db"]),
            one_shard("r-7", "fail-7", &["purge_db"]),
        ],
    )
    .await;
    // A failed job: one dead letter, whichever worker saw it fail.
    let failed = cli.wait_status("r-7", "failed").await;
    // Extended with the fleet's config, once.
    cli.expect(
        0,
        &["requests", "extend", "--key", "r-7", "--reason", "complex"],
    );
    cli.expect(1, &["requests", "extend", "--key", "r-7", "--reason", "x"]);
    let extended = cli.show("r-7");
    assert_eq!(
        parse_time(&extended["due_date"]),
        plus(parse_time(&failed["due_date"]), jiff::Span::new().months(2)),
        "{extended:#}"
    );
    for key in ["r-8", "r-9"] {
        cli.wait_status(key, "waiting").await;
    }
    cli.expect(
        0,
        &[
            "requests",
            "deny",
            "--key",
            "r-9",
            "--reason-code",
            "outside_jurisdiction",
        ],
    );
    cli.expect(
        0,
        &["requests", "hold", "--key", "r-8", "--reason", "litigation"],
    );
    put(
        &client,
        "events",
        &[
            one_shard("r-8", "user-8", &["purge_mail"]),
            one_shard("r-9", "user-9", &["purge_mail", "notify"]),
            one_shard("r-m", "marker", &["notify"]),
        ],
    )
    .await;
    wait_until(Duration::from_secs(60), "the marker sent", || {
        jobs.count("/plain/marker") == 1
    })
    .await;
    let held = cli
        .wait_show("r-8", "purge_mail held", |s| {
            s["actions"]["purge_mail"]["status"] == "held"
        })
        .await;
    assert_eq!(held["status"], "held", "{held:#}");
    assert_eq!(jobs.count("/mail/user-8"), 0, "a held action was sent");
    cli.expect(0, &["requests", "release", "--key", "r-8"]);
    jobs.unstick_all();
    cli.wait_status("r-8", "complete").await;
    assert_eq!(cli.show("r-9")["status"], "denied");
    // Each worker's gauges count the fleet's requests.
    let all: Vec<Value> = keys
        .iter()
        .map(String::as_str)
        .chain(["r-7", "r-8", "r-9", "r-m"])
        .map(|k| cli.show(k))
        .collect();
    let want = expected_metrics(&all, jiff::Timestamp::now());
    assert_eq!(
        want[r#"gdpr_consumer_requests{status="complete"}"#], 6.0,
        "{want:?}"
    );
    for worker in [&third, &fourth] {
        wait_metrics(&metrics_address(worker).await, &want).await;
    }
    // The report, read from the shared state, counts them too.
    let now = jiff::Timestamp::now();
    let years: BTreeSet<i16> = all
        .iter()
        .map(|s| year_of(s["arrival_ms"].as_i64().unwrap()))
        .collect();
    for year in &years {
        let out = cli.expect(
            0,
            &["report", "--year", &year.to_string(), "--format", "json"],
        );
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_figures(
            &got,
            &expected_report(&all, *year, now),
            &format!("fleet report {year}"),
        );
    }
    // Time for a second submission, were there to be one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(third);
    stop(fourth);
    let per_key = jobs.per_key();
    let mut expected: BTreeMap<(String, String), usize> = keys
        .iter()
        .enumerate()
        .flat_map(|(n, key)| {
            [("db", "purge_db"), ("mail", "purge_mail")].map(|(path, action)| {
                (
                    (format!("/{path}/user-{n}"), idempotency_key(action, key)),
                    1,
                )
            })
        })
        .collect();
    for (path, action, key) in [
        ("/db/user-8", "purge_db", "r-8"),
        ("/mail/user-8", "purge_mail", "r-8"),
        ("/db/user-9", "purge_db", "r-9"),
        ("/db/fail-7", "purge_db", "r-7"),
        ("/plain/marker", "notify", "r-m"),
    ] {
        expected.insert((path.to_owned(), idempotency_key(action, key)), 1);
    }
    assert_eq!(per_key, expected);
    let letters = cli.letters();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["action"], "purge_db");
    let failed = cli.show("r-7")["request"].clone();
    let trail = cli.audit();
    assert_eq!(
        trail
            .iter()
            .filter(|e| e["request"] == failed && e["outcome"] == "job_failed")
            .count(),
        1,
        "{trail:#?}"
    );
    // The trail of the first four requests.
    let first_four: BTreeSet<String> = keys
        .iter()
        .map(|k| cli.show(k)["request"].as_str().unwrap().to_owned())
        .collect();
    let audit: Vec<Value> = cli
        .audit()
        .into_iter()
        .filter(|e| first_four.contains(e["request"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(outcomes(&audit, "accepted"), 8, "{audit:#?}");
    assert_eq!(outcomes(&audit, "job_done"), 8, "{audit:#?}");
    assert_eq!(outcomes(&audit, "complete"), 4, "{audit:#?}");
}

/// A fleet's workers page through the shared jobs too: more than a page (64) waiting,
/// each polled to its end by one worker or the other, each submitted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_polls_more_jobs_than_a_page_to_their_end() {
    const N: usize = 70;
    let kinesis = Kinesalite::start();
    let dynalite = Dynalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let jobs = JobBackend::start(1).await;
    let ws = fleet_workspace(&kinesis.endpoint, &jobs.url, &dynalite.endpoint);
    let cli = Cli {
        ws: &ws,
        env: vec![("GDPR_TEST_STATE_KEY", FLEET_KEY)],
    };
    let worker = || ws.start_daemon_with_env(&[], &[("GDPR_TEST_STATE_KEY", FLEET_KEY)]);
    jobs.stick("/");
    let workers = [worker(), worker()];
    let records: Vec<(String, Vec<u8>)> = (0..N)
        .map(|n| {
            let (_, data) = erase(
                &format!("r-{n}"),
                &format!("user-{n}"),
                "GDPR",
                &["purge_db"],
            );
            (format!("pk-{n}"), data)
        })
        .collect();
    put(&client, "events", &records).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(0..N).all(|n| jobs.polls_at(&format!("/db/user-{n}")) >= 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every job polled: {} submitted\n{}",
            jobs.count("/db/"),
            workers
                .iter()
                .map(|w| w.stderr())
                .collect::<Vec<_>>()
                .join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    jobs.unstick_all();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(0..N).all(|n| jobs.polls_at(&format!("/db/user-{n}")) >= 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every job polled to its end\n{}",
            workers
                .iter()
                .map(|w| w.stderr())
                .collect::<Vec<_>>()
                .join("\n-----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in [0, 63, 64, N - 1] {
        cli.wait_status(&format!("r-{n}"), "complete").await;
    }
    for worker in workers {
        stop(worker);
    }
    let audit = cli.audit();
    assert_eq!(outcomes(&audit, "job_done"), N);
    assert_eq!(outcomes(&audit, "complete"), N);
    let per_key = jobs.per_key();
    assert_eq!(per_key.len(), N);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
}

/// In a fleet, one worker polls a job at a time, even when a poll outlasts the poll
/// interval; and a job finished by one worker is not brought back by another's late answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_polls_a_slow_job_one_worker_at_a_time() {
    let kinesis = Kinesalite::start();
    let dynalite = Dynalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let jobs = JobBackend::start(1).await;
    let ws = fleet_workspace(&kinesis.endpoint, &jobs.url, &dynalite.endpoint);
    let cli = Cli {
        ws: &ws,
        env: vec![("GDPR_TEST_STATE_KEY", FLEET_KEY)],
    };
    let worker = || ws.start_daemon_with_env(&[], &[("GDPR_TEST_STATE_KEY", FLEET_KEY)]);
    jobs.stick("/");
    // Each poll takes a second and a half: several poll intervals.
    jobs.slow_down("slow-");
    jobs.slow_for(Duration::from_millis(1500));
    let workers = [worker(), worker()];
    put(
        &client,
        "events",
        &[erase("r-s", "slow-1", "GDPR", &["purge_db"])],
    )
    .await;
    wait_until(Duration::from_secs(60), "four slow polls", || {
        jobs.slow_polls() >= 4
    })
    .await;
    jobs.stuck_only(&[]);
    cli.wait_status("r-s", "complete").await;
    for worker in workers {
        stop(worker);
    }
    assert_eq!(
        jobs.most_in_flight(),
        1,
        "a job polled by two workers at once"
    );
    assert_eq!(jobs.count("/db/"), 1);
    let audit = cli.audit();
    let done = audit.iter().filter(|e| e["outcome"] == "job_done").count();
    assert_eq!(done, 1, "{audit:#?}");
    assert!(cli.letters().is_empty());
}
