//! The state commands while the daemon runs: served by it over its control channel, with
//! the same flags, output and exit codes as when it is stopped.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_command_works_while_the_daemon_runs() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(60, 3, 0)).await;
    let (backend, fixed) = Backend::refusing_until_fixed().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "3 calls", || backend.count() >= 3).await;
    wait_until(Duration::from_secs(30), "the control channel", || {
        daemon.stderr().contains("control channel up")
    })
    .await;
    let mode = std::fs::metadata(ws.path("state.redb.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the daemon's user may use it");
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));

    let (code, out, err) = run(&["state", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["dead_letters_pending"], 2);
    let (code, out, _) = run(&["checkpoints", "list", "--config", config]);
    assert_eq!(code, 0);
    assert_eq!(json_lines(&out).len(), 1);
    let live_letters = run(&["dead-letters", "list", "--config", config]);
    assert_eq!(live_letters.0, 0);
    let letters = json_lines(&live_letters.1);
    assert_eq!(letters.len(), 2);
    let (code, out, _) = run(&[
        "audit",
        "lookup",
        "--config",
        config,
        "--action",
        "anonymize_user",
        "--key",
        "r-0",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_lines(&out).last().unwrap()["done"], true);
    let (code, _, _) = run(&[
        "audit",
        "lookup",
        "--config",
        config,
        "--action",
        "anonymize_user",
        "--key",
        "nope",
    ]);
    assert_eq!(code, 1, "not found is exit 1, live too");

    // Two at once.
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking({
            let config = config.to_owned();
            let ws_dir = ws.dir.path().to_owned();
            move || run_in(&ws_dir, &["audit", "export", "--config", &config])
        }),
        tokio::task::spawn_blocking({
            let config = config.to_owned();
            let ws_dir = ws.dir.path().to_owned();
            move || run_in(&ws_dir, &["audit", "export", "--config", &config])
        }),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.0, b.0), (0, 0));
    assert_eq!(a.1, b.1);
    let decisions = json_lines(&a.1)
        .into_iter()
        .filter(|e| e["outcome"] != "complete")
        .count();
    assert_eq!(decisions, 3, "{}", a.1);

    // What the running daemon will not do, it says.
    let (code, _, err) = run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("refused while the daemon runs"), "{err}");
    let (code, _, err) = run(&["state", "rotate-key", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("refused while the daemon runs"), "{err}");
    let (code, _, err) = run(&["dead-letters", "retry", "--config", config, "--id", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no dead letter 99"), "{err}");

    // A retry that fails again, served live: exit 1, the letter kept as it was.
    let first = letters[0]["id"].to_string();
    let second = letters[1]["id"].to_string();
    let (code, out, _) = run(&["dead-letters", "retry", "--config", config, "--id", &first]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(json_lines(&out)[0]["outcome"], "still_failing");
    let (_, out, _) = run(&["dead-letters", "list", "--config", config]);
    let kept = json_lines(&out);
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0]["id"], letters[0]["id"]);
    assert_eq!(kept[0]["created_at"], letters[0]["created_at"]);
    assert_eq!(kept[0]["retries"], 1);

    // Repairs, through the daemon's own pipeline.
    fixed.store(true, Ordering::SeqCst);
    let (code, out, err) = run(&["dead-letters", "retry", "--config", config, "--id", &first]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_lines(&out)[0]["outcome"], "resolved");
    assert_eq!(
        backend.count(),
        5,
        "3 first calls, a retry refused, a retry taken"
    );
    let (code, out, err) = run(&[
        "dead-letters",
        "discard",
        "--config",
        config,
        "--id",
        &second,
        "--reason",
        "re-activated",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded"), "{out}");
    let live_audit = run(&["audit", "export", "--format", "csv", "--config", config]);
    assert_eq!(live_audit.0, 0);
    // The operator's changes say who made them.
    let (_, out, _) = run(&["audit", "export", "--config", config]);
    let by: Vec<_> = json_lines(&out)
        .into_iter()
        .filter(|e| e["dead_letter"].is_u64() && e["outcome"] != "dead_lettered")
        .map(|e| e["by"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(by.len(), 2);
    assert!(by.iter().all(|by| by.starts_with("cli:")), "{by:?}");
    assert!(daemon.stop().success());

    // The same answers from the file, the daemon stopped.
    assert!(ws.dead_letters().is_empty());
    let stopped_audit = run(&["audit", "export", "--format", "csv", "--config", config]);
    assert_eq!(stopped_audit, live_audit);
    assert!(
        !ws.path("state.redb.sock").exists(),
        "the socket is removed at the stop"
    );
}

fn run_in(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = command(&dir.join("config.toml"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A daemon with one refused request (a dead letter), whose backend then answers after
/// `delay`; and a `dead-letters retry --all` sent to it, in flight once this returns.
async fn a_retry_in_flight(
    delay: Duration,
) -> (
    Kinesalite,
    Backend,
    Workspace,
    Daemon,
    tokio::task::JoinHandle<(i32, String, String)>,
) {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let slow = Arc::new(AtomicU16::new(0));
    let backend = {
        let slow = slow.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Refused at first; then slow to answer, so the daemon stops with the retry in flight.
        Backend::serve(listener, move |_, _| match slow.load(Ordering::SeqCst) {
            1 => Reply {
                status: 200,
                retry_after_s: None,
                delay,
            },
            _ => 400.into(),
        })
    };
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "a refusal", || {
        backend.count() >= 1
    })
    .await;
    wait_until(Duration::from_secs(30), "the control channel", || {
        daemon.stderr().contains("control channel up")
    })
    .await;
    slow.store(1, Ordering::SeqCst);
    let config = ws.config();
    let config = config.to_str().unwrap().to_owned();
    let dir = ws.dir.path().to_owned();
    let command = tokio::task::spawn_blocking(move || {
        run_in(
            &dir,
            &["dead-letters", "retry", "--all", "--config", &config],
        )
    });
    wait_until(Duration::from_secs(30), "the retry in flight", || {
        backend.count() >= 2
    })
    .await;
    (kinesis, backend, ws, daemon, command)
}

/// The daemon dies while it answers a command: the command says so, with exit 1, never a
/// half answer with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_cut_short_by_the_daemon_says_so() {
    let (_kinesis, _backend, _ws, daemon, command) =
        a_retry_in_flight(Duration::from_secs(5)).await;
    daemon.signal("KILL");
    let (code, out, err) = command.await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("stopped while answering"), "{err}");
}

/// Asked to stop while it serves a retry, the daemon lets the retry's request finish and
/// records it before it lets go of its state, as it does for the shards' requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_a_served_retry_finish_and_records_it() {
    let (_kinesis, backend, ws, daemon, command) =
        a_retry_in_flight(Duration::from_millis(1500)).await;
    daemon.signal("TERM");
    let (code, out, err) = command.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_lines(&out)[0]["outcome"], "resolved", "{out}");
    let log_file = daemon.log.clone();
    assert!(daemon.wait_exit().success());
    let log = std::fs::read_to_string(log_file).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        ws.dead_letters().is_empty(),
        "the retry's outcome was not recorded"
    );
    assert_eq!(backend.count(), 2, "sent again");
}

/// A discard asked while the same letter is being retried is refused: the trail never says
/// both that a request was given up and that it was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_being_retried_cannot_be_discarded() {
    let (_kinesis, backend, ws, daemon, command) =
        a_retry_in_flight(Duration::from_millis(1500)).await;
    let config = ws.config();
    let config = config.to_str().unwrap();
    let (code, _, err) = tokio::task::block_in_place(|| {
        ws.run(&[
            "dead-letters",
            "discard",
            "--id",
            "1",
            "--reason",
            "given up",
            "--config",
            config,
        ])
    });
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("being retried now"), "{err}");
    let (code, out, err) = command.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(backend.count(), 2);
    let (_, trail, _) =
        tokio::task::block_in_place(|| ws.run(&["audit", "export", "--config", config]));
    assert!(!trail.contains("discarded"), "{trail}");
    assert!(daemon.stop().success());
}
