//! A fleet of three workers on this machine, with nothing but the repo: a local Kinesis
//! (kinesalite) with an 8-shard stream, a local DynamoDB (dynalite) for the fleet's lease
//! and state tables, a local backend, and three processes of the daemon sharing the
//! stream. One is killed with SIGKILL part way, the two others take its shards over, then
//! they are stopped with SIGTERM and hand their leases off. Run it with
//! `scripts/fleet-demo.sh`. It checks its own report against the data it wrote, and exits
//! non-zero if they disagree.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use support::*;

const STREAM: &str = "client-events";
const SHARDS: usize = 8;
const EVENTS: usize = 3_000;
const DELETIONS: usize = 60;
const RETRIED: usize = 20;
const LEASE_MS: u64 = 2_000;
/// The backend answers this late, so calls are in flight when a worker is killed.
const BACKEND_DELAY: Duration = Duration::from_millis(250);
const KEY_ENV: &str = "GDPR_CONSUMER_STATE_KEY";
const NAMES: [&str; 3] = ["A", "B", "C"];

/// One worker: a `gdpr-consumer run` process with its own log file.
struct Worker {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(ws: &Workspace, name: &'static str, key: &str) -> Self {
        let log = ws.path(&format!("worker-{}.log", name.to_lowercase()));
        let config = ws.config();
        let child = command(&config)
            .args(["run", "--config", config.to_str().unwrap()])
            .env(KEY_ENV, key)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Worker { name, child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `worker_id` is the default, the host name and the pid: does `owner` name it?
    fn is(&self, owner: &str) -> bool {
        owner.rsplit_once('-').map(|(_, pid)| pid) == Some(&self.pid().to_string())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Waits (at most 30 s) for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every item of the lease table (empty until the first worker created it).
async fn leases(db: &aws_sdk_dynamodb::Client) -> Vec<HashMap<String, AttributeValue>> {
    let mut out = Vec::new();
    let mut start = None;
    loop {
        let Ok(page) = db
            .scan()
            .table_name("gdpr-consumer")
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
        else {
            return out;
        };
        out.extend(page.items.unwrap_or_default());
        start = page.last_evaluated_key;
        if start.is_none() {
            return out;
        }
    }
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

/// leaseKey → leaseOwner (None: no owner).
async fn owners(db: &aws_sdk_dynamodb::Client) -> BTreeMap<String, Option<String>> {
    leases(db)
        .await
        .iter()
        .filter_map(|item| Some((text(item, "leaseKey")?, text(item, "leaseOwner"))))
        .collect()
}

/// The worker's name for a lease owner.
fn name_of(workers: &[Worker], owner: &Option<String>) -> String {
    match owner {
        None => "-".into(),
        Some(owner) => workers
            .iter()
            .find(|w| w.is(owner))
            .map_or_else(|| format!("? ({owner})"), |w| w.name.to_owned()),
    }
}

/// How many shards each of `workers` holds.
fn shares(workers: &[Worker], table: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut held = BTreeMap::new();
    for owner in table.values().flatten() {
        *held
            .entry(name_of(workers, &Some(owner.clone())))
            .or_default() += 1;
    }
    held
}

/// Waits until the live `workers` hold all the shards, each within one of a fair share.
async fn wait_spread(db: &aws_sdk_dynamodb::Client, workers: &[Worker], live: usize) -> Duration {
    let started = Instant::now();
    loop {
        let table = owners(db).await;
        let held = shares(workers, &table);
        let fair = SHARDS.div_ceil(live);
        if table.len() == SHARDS
            && held.len() == live
            && held.values().sum::<usize>() == SHARDS
            && held.values().all(|n| n + 1 >= fair && *n <= fair)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the leases did not spread over {live} workers: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn show_leases(db: &aws_sdk_dynamodb::Client, workers: &[Worker]) {
    let table = owners(db).await;
    for (shard, owner) in &table {
        println!("  {shard}  {}", name_of(workers, owner));
    }
    let held = shares(workers, &table);
    let line: Vec<String> = held
        .iter()
        .map(|(name, n)| format!("{name}: {n} shards"))
        .collect();
    if line.is_empty() {
        println!("  no lease has an owner");
    } else {
        println!("  {}", line.join(", "));
    }
}

/// The users whose requests reached the backend, with how many calls each.
fn sent_users(backend: &Backend) -> BTreeMap<String, usize> {
    let mut users = BTreeMap::new();
    for r in backend.received() {
        let user = r
            .path
            .strip_prefix("/v1/users/")
            .and_then(|p| p.strip_suffix("/anonymize"))
            .unwrap_or(&r.path)
            .to_owned();
        *users.entry(user).or_default() += 1;
    }
    users
}

/// Runs a command of the binary with the fleet's config and key: (exit code, stdout, stderr).
fn run(ws: &Workspace, key: &str, args: &[&str]) -> (i32, String, String) {
    let out = command(&ws.config())
        .env(KEY_ENV, key)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of a worker's log about leases, from byte `from` on.
fn lease_lines(worker: &Worker, from: usize) -> Vec<String> {
    let log = worker.log();
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("lease"))
        .map(|l| format!("{}: {l}", worker.name))
        .collect()
}

/// The `state` summary, shorter: checkpoints counted, one line per worker.
fn show_state(state: &serde_json::Value, workers: &[Worker]) {
    let Some(fields) = state.as_object() else {
        println!("{state}");
        return;
    };
    for (name, value) in fields {
        match name.as_str() {
            "checkpoints" => {
                let all = value.as_array().map_or(&[][..], Vec::as_slice);
                let shards: Vec<&str> = all.iter().filter_map(|c| c["shard_id"].as_str()).collect();
                println!(
                    "checkpoints: {} shards ({} ...)",
                    shards.len(),
                    shards.first().unwrap_or(&"")
                );
            }
            "workers" => {
                println!("workers:");
                for w in value.as_array().map_or(&[][..], Vec::as_slice) {
                    let id = w["worker_id"].as_str().unwrap_or("?");
                    println!("  {} = {w}", name_of(workers, &Some(id.to_owned())));
                }
            }
            _ => println!("{name}: {value}"),
        }
    }
    println!(
        "(\"stopped\": false marks A, which did not stop cleanly; \"live\" is judged by the \
         command's own clock, watching heartbeats move, which a command run once cannot do)"
    );
}

#[tokio::main]
async fn main() {
    let began = Instant::now();
    let kinesis = Kinesalite::start();
    println!("kinesalite (local Kinesis) on {}", kinesis.endpoint);
    let dynalite = Dynalite::start();
    println!(
        "dynalite (local DynamoDB, for the fleet's lease and state tables) on {}",
        dynalite.endpoint
    );
    let client = kinesis.client();
    create_stream(&client, STREAM, SHARDS as i32).await;
    let backend = Backend::with_behaviour(BACKEND_DELAY, |_, _| 200).await;
    println!(
        "backend (stand-in for the client's API) on {}, answering each call after {} ms",
        backend.url,
        BACKEND_DELAY.as_millis()
    );

    // One config for every worker: the fleet's tables on dynalite, the shared state key
    // read from the environment.
    let ws = Workspace::new(&kinesis.endpoint, STREAM, &backend.url);
    ws.edit_config("[state]\n", &format!("[state]\nkey_env = \"{KEY_ENV}\"\n"));
    ws.with_metrics();
    let mut config = std::fs::read_to_string(ws.config()).unwrap();
    config.push_str(&format!(
        "\n[coordination]\nkind = \"dynamodb\"\nendpoint_url = \"{}\"\ncreate_tables = true\nlease_duration_ms = {LEASE_MS}\n",
        dynalite.endpoint
    ));
    std::fs::write(ws.config(), &config).unwrap();
    let key = hex::encode(rand::random::<[u8; 32]>());
    let config_path = ws.config();
    let config_arg = config_path.to_str().unwrap();
    println!("\nthe fleet's config, {config_arg} (the same for every worker):");
    let coordination = config.find("[coordination]").unwrap();
    println!("  [state]\n  key_env = \"{KEY_ENV}\"   # the key every worker shares");
    for line in config[coordination..].lines() {
        println!("  {line}");
    }
    println!("  (and [stream], [rules], [actions], [metrics] as for one daemon)");
    let db = dynalite.client();

    println!("\n== 1. three workers: `gdpr-consumer run --config config.toml`, three times");
    let mut workers: Vec<Worker> = NAMES
        .iter()
        .map(|name| Worker::start(&ws, name, &key))
        .collect();
    for w in &workers {
        println!(
            "worker {}: pid {}, log {}",
            w.name,
            w.pid(),
            w.log.display()
        );
    }
    let took = wait_spread(&db, &workers, 3).await;
    println!(
        "\nleases spread over the three after {:.1} s (lease table gdpr-consumer: leaseOwner per leaseKey):",
        took.as_secs_f64()
    );
    show_leases(&db, &workers).await;

    println!("\n== 2. events written to the stream");
    let records = traffic(EVENTS, DELETIONS, RETRIED);
    put(&client, STREAM, &records).await;
    println!(
        "{} events: page views, orders, logins, log lines, look-alike privacy requests, and \
         {DELETIONS} GDPR \"Delete User\" requests from acme ({RETRIED} of them written twice, \
         under another partition key: maybe another shard, another worker)",
        records.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend.count() < DELETIONS / 4 {
        assert!(
            Instant::now() < deadline,
            "no requests reached the backend:\n{}",
            workers[0].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("\n== 3. kill -9 worker A, part way");
    let table = owners(&db).await;
    let victim = workers.remove(0);
    let victim_shards = table
        .values()
        .flatten()
        .filter(|owner| victim.is(owner))
        .count();
    let marks: Vec<usize> = workers.iter().map(|w| w.log().len()).collect();
    victim.signal("KILL");
    let sent_at_kill = backend.count();
    let distinct_at_kill = sent_users(&backend).len();
    println!(
        "killed A (pid {}), which held {victim_shards} shards, with {distinct_at_kill} of \
         {DELETIONS} requests answered",
        victim.pid()
    );
    // Keep it in the list (dead) so its name still shows in the lease table.
    workers.insert(0, victim);
    let _ = workers[0].wait();
    let took = wait_spread(&db, &workers, 2).await;
    println!(
        "\nits leases expired ({LEASE_MS} ms without renewal) and were taken over; spread over \
         B and C {:.1} s after the kill:",
        took.as_secs_f64()
    );
    show_leases(&db, &workers).await;
    let taken: Vec<String> = workers[1..]
        .iter()
        .zip(&marks)
        .flat_map(|(w, from)| lease_lines(w, *from))
        .collect();
    println!("-- from B's and C's logs since the kill:");
    for line in &taken {
        println!("{line}");
    }
    println!("\n== 4. every request to the backend");
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent_users(&backend).len() < DELETIONS {
        assert!(
            Instant::now() < deadline,
            "only {} of {DELETIONS} requests reached the backend",
            sent_users(&backend).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give a request read twice time to be sent twice, were it to be.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let users = sent_users(&backend);
    let repeated: BTreeMap<&String, &usize> = users.iter().filter(|(_, n)| **n > 1).collect();
    let repeats: usize = users.values().map(|n| n - 1).sum();
    let keys: BTreeSet<Option<String>> = backend
        .received()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    println!(
        "{} calls for {} requests; sent again: {repeated:?}",
        backend.count(),
        users.len()
    );

    println!(
        "\n== 5. SIGTERM to B and C: they finish their calls, checkpoint, hand their leases off"
    );
    let mut exits = Vec::new();
    for w in &mut workers[1..] {
        w.signal("TERM");
        let status = w.wait();
        println!("worker {}: {status}", w.name);
        exits.push(status);
    }
    let items = leases(&db).await;
    let owned = items
        .iter()
        .filter(|i| text(i, "leaseOwner").is_some())
        .count();
    let checkpointed = items
        .iter()
        .filter(|i| text(i, "checkpoint").is_some())
        .count();
    println!("lease table after the stop:");
    show_leases(&db, &workers).await;

    println!(
        "\n== 6. gdpr-consumer state --config config.toml: the shared state, no worker running"
    );
    let (code, out, err) = run(&ws, &key, &["state", "--config", config_arg]);
    assert_eq!(code, 0, "state: {err}");
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    show_state(&state, &workers);

    println!("\n== 7. gdpr-consumer audit export --config config.toml");
    let (code, out, err) = run(&ws, &key, &["audit", "export", "--config", config_arg]);
    assert_eq!(code, 0, "audit export: {err}");
    let entries = json_lines(&out);
    for line in out.lines().take(2) {
        println!("{line}");
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for e in &entries {
        *outcomes
            .entry(e["outcome"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    println!("... {} entries: {outcomes:?}", entries.len());

    let done = outcomes.get("done").copied().unwrap_or(0);
    let workers_listed = state["workers"].as_array().map_or(0, Vec::len);
    println!("\n== report");
    println!("requests in the stream to act on:   {DELETIONS} ({RETRIED} of them written twice)");
    println!(
        "requests that reached the backend:  {} of {DELETIONS}",
        users.len()
    );
    println!(
        "calls the backend received:         {} ({repeats} sent again; A held {victim_shards} \
         shards when killed, {sent_at_kill} calls made by then)",
        backend.count()
    );
    println!(
        "distinct Idempotency-Keys:          {} (a call sent again carries its request's)",
        keys.len()
    );
    println!("done in the shared audit trail:     {done}");
    println!(
        "requests remembered as done:        {}",
        state["dedup_entries"]
    );
    println!("workers the shared state lists:     {workers_listed}");
    println!(
        "B and C on SIGTERM:                 {}",
        exits
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "leases at the end:                  {} of {} with an owner, {checkpointed} checkpointed",
        owned,
        items.len()
    );
    println!(
        "time:                               {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // The report must match what was written and what a fleet promises.
    let expected: BTreeSet<String> = (0..DELETIONS).map(|n| format!("del-user-{n}")).collect();
    assert_eq!(
        users.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every request reached the backend, and nothing else"
    );
    assert!(
        distinct_at_kill < DELETIONS,
        "everything was sent before the kill: nothing shown"
    );
    assert!(
        repeats <= victim_shards,
        "{repeats} requests sent again; at most the killed worker's calls in flight \
         (one per shard it held: {victim_shards})"
    );
    assert_eq!(keys.len(), DELETIONS, "one Idempotency-Key per request");
    assert_eq!(done, DELETIONS, "done in the audit trail");
    assert_eq!(state["dedup_entries"], DELETIONS, "the shared ledger");
    assert_eq!(workers_listed, 3, "workers in the shared state");
    assert!(exits.iter().all(ExitStatus::success), "SIGTERM exits");
    assert_eq!(items.len(), SHARDS, "one lease per shard");
    assert_eq!(owned, 0, "every lease released");
    assert_eq!(checkpointed, SHARDS, "every shard checkpointed");
    println!(
        "\nreport matches the data written. The demo's files are removed; the emulators are stopped."
    );
}
