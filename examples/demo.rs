//! The main job on this machine, with nothing but the repo: a local Kinesis (kinesalite), a
//! stream of realistic events with privacy requests among them, a local backend, and the
//! daemon in between. Run it with `scripts/demo.sh`. It checks its own report against the
//! data it wrote, and exits non-zero if they disagree.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const SHARDS: i32 = 4;
const EVENTS: usize = 3_000;
const GDPR_DELETIONS: usize = 30;
const RETRIED: usize = 6;

/// Requests for the other shipped rules: verified ones to act on, and look-alikes not to.
fn other_requests() -> (Vec<(String, Vec<u8>)>, usize) {
    let mut records = Vec::new();
    for n in 0..5 {
        let verified = n % 2 == 0;
        let ccpa = json!({"type": "ccpa_consumer_request", "request_type": "delete",
            "consumer_id": format!("c-{n}"), "request_id": format!("ccpa-{n}"), "verified": verified});
        records.push((format!("c-{n}"), ccpa.to_string().into_bytes()));
        let status = if verified { "verified" } else { "pending" };
        let desk = json!({"type": "erasure_request", "source": "support_desk", "ticket": format!("T-{n}"),
            "user_id": format!("desk-user-{n}"), "verification": {"status": status}});
        records.push((format!("desk-user-{n}"), desk.to_string().into_bytes()));
    }
    // 3 verified CCPA requests and 3 verified desk requests.
    (records, 6)
}

#[tokio::main]
async fn main() {
    let kinesis = Kinesalite::start();
    println!("kinesalite (local Kinesis) on {}", kinesis.endpoint);
    let client = kinesis.client();
    create_stream(&client, "client-events", SHARDS).await;
    let mut records = traffic(EVENTS, GDPR_DELETIONS, RETRIED);
    let (others, verified_others) = other_requests();
    records.extend(others);
    put(&client, "client-events", &records).await;
    let expected = GDPR_DELETIONS + verified_others;
    println!(
        "stream client-events: {SHARDS} shards, {} events written: page views, orders, logins, log lines, \
         privacy requests of other clients and kinds, and {expected} requests to act on \
         ({GDPR_DELETIONS} GDPR \"Delete User\" from acme, {RETRIED} of them written twice; \
         {verified_others} verified CCPA and support-desk erasures, besides unverified ones)",
        records.len()
    );

    let backend = Backend::start().await;
    println!(
        "backend (stand-in for the client's API) on {}\n",
        backend.url
    );
    let ws = Workspace::new(&kinesis.endpoint, "client-events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();

    println!("== 1. gdpr-consumer rules test: the shipped rules against their test cases");
    let (_, out, _) = ws.run(&["rules", "test", "--config", config]);
    print!("{out}");

    println!("\n== 2. gdpr-consumer run --dry-run: what the rules would do (nothing is sent)");
    let (code, out, err) = ws.run(&["run", "--config", config, "--dry-run"]);
    assert_eq!(code, 0, "dry-run failed:\n{err}");
    let first_block = out
        .get(1..)
        .and_then(|o| o.find("\nrule: "))
        .map_or(out.len(), |i| i + 2);
    print!("{}", &out[..first_block]);
    let would = out.matches("\naction: ").count() + usize::from(out.starts_with("action: "));
    println!("... ({} more would-be actions)\n", would.saturating_sub(1));
    if let Some(summary) = out.find("summary: ") {
        print!("{}", &out[summary..]);
    }

    println!("\n== 3. gdpr-consumer run: the daemon, for real");
    let daemon = ws.start_daemon(&[]);
    let mut shown = 0;
    let mut show_new = |backend: &Backend| {
        for r in backend.received().iter().skip(shown) {
            println!(
                "backend got: {} {}  Idempotency-Key: {}…  body {}",
                r.method,
                r.path,
                &r.idempotency_key.as_deref().unwrap_or("-")[..12],
                r.body
            );
            shown += 1;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while caught_up_count(&daemon.stderr()) < SHARDS as usize || backend.count() < expected {
        assert!(
            Instant::now() < deadline,
            "the daemon did not finish:\n{}",
            daemon.stderr()
        );
        show_new(&backend);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    show_new(&backend);
    let log_path = daemon.log.clone();
    let status = daemon.stop();
    let log = std::fs::read_to_string(log_path).unwrap();

    println!("\n-- the daemon's log (stderr; no payloads or identifiers in it):");
    for line in log.lines().filter(|l| !l.contains("action done")) {
        println!("{line}");
    }
    println!(
        "({} 'action done' lines left out)",
        log.matches("action done").count()
    );

    println!("\n== 4. gdpr-consumer state");
    let (_, out, _) = ws.run(&["state", "--config", config]);
    print!("{out}");
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (_, letters, _) = ws.run(&["dead-letters", "list", "--config", config]);

    let received = backend.received();
    let distinct: HashSet<_> = received.iter().map(|r| &r.idempotency_key).collect();
    let dead_letters = letters.lines().count();
    println!("\n== report");
    println!("requests in the stream to act on:  {expected}");
    println!("requests found by the dry-run:     {would} ({RETRIED} of them duplicates)");
    println!(
        "calls the backend received:        {} ({} distinct requests)",
        received.len(),
        distinct.len()
    );
    println!(
        "duplicates recognised and skipped: {}",
        would - received.len()
    );
    println!("dead letters:                      {dead_letters}");
    println!(
        "requests remembered as done:       {}",
        state["dedup_entries"]
    );
    println!("daemon exit on SIGTERM:            {status}");

    // The report must match what was written.
    assert_eq!(would, expected + RETRIED, "dry-run");
    assert_eq!(received.len(), expected, "backend calls");
    assert_eq!(distinct.len(), expected, "each request once");
    assert_eq!(dead_letters, 0);
    assert_eq!(state["dedup_entries"], expected);
    assert!(status.success());
    println!(
        "\nreport matches the data written. The demo's files are removed; kinesalite is stopped."
    );
}
