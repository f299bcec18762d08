//! Dry-run: shows what would be done, does none of it.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// (rule, action, key, shard, sequence number) of each would-be action.
type Sighting = (String, String, String, String, String);

fn from_json(actions: &[Value]) -> BTreeSet<Sighting> {
    actions
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap().to_owned();
            (
                s("rule"),
                s("action"),
                s("key"),
                s("shard_id"),
                s("sequence_number"),
            )
        })
        .collect()
}

fn from_human(out: &str) -> BTreeSet<Sighting> {
    out.split("rule: ")
        .skip(1)
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap()
                    .split(" (")
                    .next()
                    .unwrap()
                    .to_owned()
            };
            let rule = block.lines().next().unwrap().to_owned();
            (
                rule,
                field("action"),
                field("key"),
                field("shard"),
                field("sequence number"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_matches_and_touches_nothing() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    put(&client, "events", &traffic(600, 12, 3)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();
    let dry_run_json = || {
        tokio::task::block_in_place(|| {
            ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
        })
    };

    // Before any live run: no state or key file appears.
    let (code, out, err) = dry_run_json();
    assert_eq!(code, 0, "{err}");
    assert!(!ws.path("state.redb").exists() && !ws.path("state.redb.key").exists());
    assert!(
        !err.contains("checkpoints flushed"),
        "a dry-run flushes nothing: {err}"
    );
    let lines = json_lines(&out);
    let (summary, actions) = lines.split_last().unwrap();
    assert_eq!(actions.len(), 15, "{out}");
    let mut keys: Vec<&str> = actions.iter().map(|a| a["key"].as_str().unwrap()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 12);
    assert_eq!(actions.iter().filter(|a| a["duplicate"] == true).count(), 3);
    assert!(actions.iter().all(|a| a["already_done"].is_null()));
    let first = &actions[0];
    assert_eq!(first["type"], "action");
    assert_eq!(first["rule"], "acme_gdpr_delete_user");
    assert_eq!(first["action"], "anonymize_user");
    let user = first["request"]["body"]["user_id"].as_str().unwrap();
    assert_eq!(
        first["request"]["url"],
        format!("{}/v1/users/{user}/anonymize", backend.url)
    );
    assert_eq!(first["request"]["method"], "POST");
    assert_eq!(
        first["request"]["headers"]["Authorization"],
        "Bearer <redacted>"
    );
    assert_eq!(
        first["request"]["headers"]["Content-Type"],
        "application/json"
    );
    assert_eq!(
        first["request"]["headers"]["Idempotency-Key"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    assert!(first["shard_id"].as_str().unwrap().starts_with("shardId-"));
    assert!(first["sequence_number"].as_str().unwrap().len() > 20);
    assert!(first["arrival_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["records"], 603);
    // Duplicates would not be sent: 12 requests.
    assert_eq!(summary["actions"]["anonymize_user"], 12);
    let rule = &summary["rules"]["acme_gdpr_delete_user"];
    assert_eq!(rule["records_seen"], 603);
    assert_eq!(rule["matches"], 15);
    assert_eq!(rule["errors"], 0);
    assert_eq!(summary["rules"]["ccpa_delete"]["matches"], 0);
    assert!(!out.contains(TOKEN));

    // The human format shows the same actions, one block each, the token redacted.
    let (code, human, _) =
        tokio::task::block_in_place(|| ws.run(&["run", "--config", config, "--dry-run"]));
    assert_eq!(code, 0);
    assert_eq!(from_human(&human), from_json(actions));
    assert!(human.contains("Authorization: Bearer <redacted>"));
    assert!(human.contains("POST http://127.0.0.1:"));
    assert!(
        human.contains("action anonymize_user: 12 would be sent"),
        "{human}"
    );
    assert!(!human.contains(TOKEN));
    assert_eq!(backend.count(), 0);

    // After a live run, a dry-run leaves the state file as it was and marks what is done.
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "12 requests", || {
        backend.count() >= 12
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    assert!(daemon.stop().success());
    let before = std::fs::read(ws.path("state.redb")).unwrap();
    let (code, out, err) = dry_run_json();
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    let (summary, actions) = lines.split_last().unwrap();
    assert_eq!(actions.len(), 15);
    assert!(actions.iter().all(|a| a["already_done"] == true), "{out}");
    assert!(
        summary["actions"].as_object().unwrap().is_empty(),
        "{summary}"
    );
    assert_eq!(std::fs::read(ws.path("state.redb")).unwrap(), before);
    assert_eq!(backend.count(), 12);
}

/// The largest sequence number of each shard in captured records.
fn last_sequence_numbers(captured: &str) -> HashMap<String, String> {
    let mut last: HashMap<String, String> = HashMap::new();
    for record in json_lines(captured) {
        let shard = record["shard_id"].as_str().unwrap().to_owned();
        let seq = record["sequence_number"].as_str().unwrap().to_owned();
        let entry = last.entry(shard).or_default();
        if (seq.len(), &seq) > (entry.len(), &*entry) {
            *entry = seq;
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_beside_a_running_daemon_and_capture_for_preview() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    put(&client, "events", &traffic(400, 10, 0)).await;
    // A slow backend keeps the daemon busy while the dry-run reads the same stream.
    let backend = Backend::with_behaviour(Duration::from_millis(100), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();

    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "the daemon to start", || {
        backend.count() >= 1
    })
    .await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0, "{err}");
    // The daemon holds the state: it is asked, request by request.
    assert!(err.contains("looked up in its ledger"), "{err}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 11, "{out}");
    assert!(
        lines[..10].iter().all(|l| l["already_done"].is_boolean()),
        "{out}"
    );
    wait_until(Duration::from_secs(60), "10 requests", || {
        backend.count() >= 10
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    // Once the daemon has done them, a dry-run beside it marks every one done.
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0, "{err}");
    let lines = json_lines(&out);
    assert!(
        lines[..10].iter().all(|l| l["already_done"] == true),
        "{out}"
    );
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 10);

    // Capture the stream: the daemon's checkpoints are at each shard's last record.
    let (code, captured, err) =
        tokio::task::block_in_place(|| ws.run(&["capture", "--config", config]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(captured.lines().count(), 400);
    let last = last_sequence_numbers(&captured);
    let (_, checkpoints, _) = ws.run(&["checkpoints", "list", "--config", config]);
    for checkpoint in json_lines(&checkpoints) {
        let shard = checkpoint["shard_id"].as_str().unwrap();
        assert_eq!(checkpoint["sequence_number"].as_str().unwrap(), last[shard]);
    }

    // Offline preview of the capture finds what the dry-run found.
    std::fs::write(ws.path("captured.jsonl"), &captured).unwrap();
    let input = ws.path("captured.jsonl");
    let (code, previewed, err) = ws.run(&[
        "preview",
        "--rules-dir",
        "rules",
        "--config",
        config,
        "--input",
        input.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let previewed = json_lines(&previewed);
    let (_, dry_actions) = lines.split_last().unwrap();
    let (_, preview_actions) = previewed.split_last().unwrap();
    assert_eq!(from_json(preview_actions), from_json(dry_actions));

    // rules diff straight from the stream.
    let edited = repo().join("tests/fixtures/rules-edited");
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&[
            "rules",
            "diff",
            "--rules-dir",
            edited.to_str().unwrap(),
            "--against",
            "rules",
            "--config",
            config,
            "--output",
            "json",
        ])
    });
    assert_eq!(code, 0, "{err}");
    let summary = json_lines(&out).pop().unwrap();
    assert_eq!(summary["records"], 400);
    assert_eq!(summary["differing"], 0, "{out}");

    // A limit stops the capture early.
    let (code, some, _) =
        tokio::task::block_in_place(|| ws.run(&["capture", "--config", config, "--limit", "25"]));
    assert_eq!(code, 0);
    assert_eq!(some.lines().count(), 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_dry_run_prints_its_summary_on_ctrl_c() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(100, 2, 0)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let dry = ws.start_daemon(&["--dry-run", "--follow", "--output", "json"]);
    wait_until(Duration::from_secs(30), "2 actions", || {
        dry.stdout().lines().count() >= 2
    })
    .await;
    // Records written later are still picked up: it follows.
    put(
        &client,
        "events",
        &[(
            "k".to_owned(),
            deletion("r-late", "late-user").to_string().into_bytes(),
        )],
    )
    .await;
    wait_until(Duration::from_secs(30), "the late action", || {
        dry.stdout().contains("r-late")
    })
    .await;
    dry.signal("INT");
    let out = dry.out.clone();
    assert!(dry.wait_exit().success());
    let lines = json_lines(&std::fs::read_to_string(out).unwrap());
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["actions"]["anonymize_user"], 3);
    assert_eq!(summary["records"], 101);
    assert_eq!(backend.count(), 0);
}

/// Settings that cannot work exit 2 at start, naming the key and why, before anything is
/// read or written (each of these was accepted once; a dry-run would have shown nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_refused_at_start() {
    let kinesis = Kinesalite::start();
    create_stream(&kinesis.client(), "events", 1).await;
    let url = "url = \"http://127.0.0.1:9/v1/users/{user_id}/anonymize\"";
    let mut wrong = Vec::new();
    for (from, to, wanted) in [
        (
            "timeout_ms = 5000",
            "timeout_ms = 5000\nmax_retry_duration_ms = 4000",
            "[actions.anonymize_user]: timeout_ms = 5000 is longer than max_retry_duration_ms = 4000",
        ),
        (
            "poll_interval_ms = 200",
            "poll_interval_ms = 0",
            "[stream] poll_interval_ms = 0 is below 200",
        ),
        (
            "initial_backoff_ms = 20",
            "initial_backoff_ms = 0",
            "initial_backoff_ms must be at least 1",
        ),
        (
            "max_backoff_ms = 200",
            "max_backoff_ms = 0",
            "max_backoff_ms must be at least 1",
        ),
        (
            "initial_backoff_ms = 20",
            "initial_backoff_ms = 201",
            "initial_backoff_ms = 201 is above max_backoff_ms = 200",
        ),
        (
            "timeout_ms = 5000",
            "timeout_ms = 5000\nsuccess_statuses = [503]",
            "success_statuses: 503 is a backend fault",
        ),
        (
            "method = \"POST\"",
            "method = \"GETT\"",
            "method \"GETT\" is not one of GET, POST, PUT, PATCH, DELETE",
        ),
        (
            url,
            "url = \"http://127.0.0.1:9/v1/users/{user_id\"",
            "unclosed {",
        ),
        (
            "timeout_ms = 5000",
            "timeout_ms = 5000\nbody = '{\"{user_id}\":1}'",
            "body: the key \"{user_id}\" holds {user_id}: placeholders stand in values only",
        ),
        (
            "timeout_ms = 5000",
            "timeout_ms = 5000\nheaders = {\"X-User\"=\"{user_id}\"}",
            "header X-User: the value holds {user_id}, but headers are fixed",
        ),
        ("[state]\n", "[state]\nkey_file = \"\"\n", "[state] key_file is empty"),
        ("[state]\n", "[state]\nkey_env = \"\"\n", "[state] key_env is empty"),
        (
            "path = \"state.redb\"",
            "path = \"\"",
            "[state] path is empty",
        ),
    ] {
        let ws = Workspace::new(&kinesis.endpoint, "events", "http://127.0.0.1:9");
        ws.edit_config(from, to);
        let config = ws.config();
        let config = config.to_str().unwrap();
        // A live run only where it stops on its own without the check (it would run on).
        let args = match from {
            "path = \"state.redb\"" => &["run", "--config", config][..],
            _ => &["run", "--config", config, "--dry-run"][..],
        };
        let (code, _, err) = tokio::task::block_in_place(|| ws.run(args));
        if code != 2 || !err.contains(wanted) {
            wrong.push(format!("{to} ({args:?}): exit {code}, {err}"));
        }
        // Nothing written beside the config: no stray `.key` file, no state.
        let mut files: Vec<String> = std::fs::read_dir(ws.path(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        if files != ["config.toml", "rules"] {
            wrong.push(format!("{to}: left {files:?}"));
        }
    }
    assert!(wrong.is_empty(), "accepted:\n{}", wrong.join("\n"));
}

/// A dry-run whose output cannot be written fails (exit 1, `cannot write to stdout`); one
/// whose reader went away stops quietly (exit 0), `--follow` included: it would otherwise
/// read the stream for no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_fails_when_its_output_cannot_be_written() {
    use crate::preview::Stdout;
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(40, 4, 0)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config().to_string_lossy().into_owned();
    let mut wrong = Vec::new();
    for to in [Stdout::Full, Stdout::ClosedPipe] {
        for extra in [&[][..], &["--output", "json"], &["--follow"]] {
            let args = [&["run", "--config", &config, "--dry-run"][..], extra].concat();
            let mut child = command(&ws.config())
                .args(&args)
                .stdout(to.stdio())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // A dry-run that does not end on its own is killed, and reported.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let ended = loop {
                if child.try_wait().unwrap().is_some() {
                    break true;
                }
                if std::time::Instant::now() > deadline {
                    child.kill().unwrap();
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let out = child.wait_with_output().unwrap();
            let (code, err) = (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr),
            );
            let expected = match to {
                Stdout::Full => {
                    code == 1
                        && err.contains("error: cannot write to stdout: No space left on device")
                }
                Stdout::ClosedPipe => code == 0 && !err.contains("error"),
            };
            if !ended || !expected {
                wrong.push(format!(
                    "{args:?} to {to:?}: ended {ended}, exit {code}, {err}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
