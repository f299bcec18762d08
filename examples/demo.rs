//! The main job on this machine, with nothing but the repo: a local Kinesis (kinesalite), a
//! stream of realistic events with deletion requests among them, a local backend, and the
//! daemon in between. Run it with `scripts/demo.sh`.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

const SHARDS: i32 = 4;
const EVENTS: usize = 2_000;
const DELETIONS: usize = 20;
const RETRIED: usize = 5;

#[tokio::main]
async fn main() {
    let kinesis = Kinesalite::start();
    println!("kinesalite (local Kinesis) on {}", kinesis.endpoint);
    let client = kinesis.client();
    create_stream(&client, "client-events", SHARDS).await;
    let records = traffic(EVENTS, DELETIONS, RETRIED);
    put(&client, "client-events", &records).await;
    println!(
        "stream client-events: {SHARDS} shards, {} events written (page views, orders, logins, log lines, \
         privacy requests of other kinds), among them {DELETIONS} GDPR \"Delete User\" requests from acme, \
         {RETRIED} of them written twice",
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
    println!(
        "... ({} more would-be actions)\n",
        out.matches("action: anonymize_user").count() - 1
    );
    if let Some(summary) = out.find("summary\n") {
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while caught_up_count(&daemon.stderr()) < SHARDS as usize || backend.count() < DELETIONS {
        assert!(
            std::time::Instant::now() < deadline,
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

    let received = backend.received();
    let unique: HashSet<_> = received.iter().map(|r| &r.path).collect();
    println!(
        "\nthe backend received {} requests for {} distinct users ({} duplicates in the stream were recognised); \
         the daemon exited with {status} on SIGTERM",
        received.len(),
        unique.len(),
        RETRIED
    );
    println!("\n-- the daemon's log (stderr; no payloads or identifiers in it):");
    for line in log.lines().filter(|l| !l.contains("action done")) {
        println!("{line}");
    }
    println!(
        "({} 'action done' lines left out)",
        log.matches("action done").count()
    );

    println!("\n== 4. gdpr-consumer checkpoints list");
    let (_, out, _) = ws.run(&["checkpoints", "list", "--config", config]);
    print!("{out}");
    println!("\n== 5. gdpr-consumer dead-letters list");
    let (_, out, _) = ws.run(&["dead-letters", "list", "--config", config]);
    println!("{}", if out.is_empty() { "(none)" } else { &out });

    let dir = ws.keep();
    println!(
        "\nThe demo's config, rules and state are in {}; try\n  target/debug/gdpr-consumer checkpoints list --config {}/config.toml",
        dir.display(),
        dir.display()
    );
}
