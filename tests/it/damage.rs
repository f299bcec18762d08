//! Nothing is lost under damage: a retry that cannot build its request, letters that keep
//! who they are, a lost key or a broken state file, a worker that keeps failing, signals at
//! the wrong moment, output that cannot be written.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn retry(ws: &Workspace, id: &str) -> (i32, Value) {
    let config = ws.config();
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&[
            "dead-letters",
            "retry",
            "--config",
            config.to_str().unwrap(),
            "--id",
            id,
        ])
    });
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{out}{err}");
    (code, lines[0].clone())
}

/// The bug: a retry whose request could no longer be built replaced the letter (the only
/// copy of the key and params) by an empty rule_failed letter, then "resolved" that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_build_its_request_keeps_the_letter_as_it_was() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let (backend, status) = Backend::switchable().await;
    status.store(400, Ordering::SeqCst);
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.run_until(&backend, 1).await;
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let first = letters[0].clone();
    let id = first["id"].as_u64().unwrap().to_string();
    assert_eq!(first["kind"], "action_failed");
    assert_eq!(first["retries"], 0);

    // The action's URL now needs a param the kept decision lacks (the rules, and their
    // test cases, were updated with it).
    ws.edit_config("/v1/users/{user_id}/", "/v1/{tenant}/users/{user_id}/");
    for entry in std::fs::read_dir(ws.path("rules")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    ws.write_rule(
        "acme.rhai",
        "const PREFILTER = [\"Delete User\"];\nfn decide(record) {\n    if record.data.client != \"acme\" || !record.data.tags.contains(\"GDPR\") { return; }\n    #{ action: \"anonymize_user\", key: record.data.request_id, params: #{ user_id: record.data.user_id, tenant: \"acme\" } }\n}\n",
    );
    ws.write_rule(
        "acme.test.json",
        r#"[{"name": "a request", "record": {"data": {"type": "privacy_request", "tags": ["GDPR", "Delete User"], "client": "acme", "request_id": "r-1", "user_id": "u-1"}},
            "expect": {"action": "anonymize_user", "key": "r-1", "params": {"user_id": "u-1", "tenant": "acme"}}}]"#,
    );
    for attempt in 1..=2 {
        let (code, line) = retry(&ws, &id);
        assert_eq!(code, 1, "{line}");
        assert_eq!(line["outcome"], "still_failing");
        assert!(line["error"].as_str().unwrap().contains("tenant"), "{line}");
        let letters = ws.dead_letters();
        assert_eq!(letters.len(), 1, "{letters:?}");
        let letter = &letters[0];
        for same in [
            "id",
            "created_at",
            "kind",
            "arrival_time",
            "sequence_number",
        ] {
            assert_eq!(letter[same], first[same], "{same} changed");
        }
        assert_eq!(letter["retries"], attempt);
        assert!(letter["last_error"].as_str().unwrap().contains("tenant"));
    }
    assert_eq!(backend.count(), 1, "nothing sent while it cannot be built");

    // Read again after a checkpoint reset, the request is held by its letter: not sent, not
    // dead-lettered twice.
    let config = ws.config();
    let config = config.to_str().unwrap();
    ws.edit_config("/v1/{tenant}/users/{user_id}/", "/v1/users/{user_id}/");
    let (code, _, err) = ws.run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 1);
    assert_eq!(ws.dead_letters().len(), 1);

    // Fixed: the retry sends the request the letter kept, and resolves the same letter.
    status.store(200, Ordering::SeqCst);
    let (code, line) = retry(&ws, &id);
    assert_eq!(code, 0, "{line}");
    assert_eq!(line["outcome"], "resolved");
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].path, "/v1/users/del-user-0/anonymize");
    assert_eq!(received[1].idempotency_key, received[0].idempotency_key);
    assert!(ws.dead_letters().is_empty());
    let (_, jsonl, _) = ws.run(&["audit", "export", "--config", config]);
    let mut audit = json_lines(&jsonl);
    // Its one action done, the request is complete.
    assert_eq!(audit.pop().unwrap()["outcome"], "complete");
    let last = audit.pop().unwrap();
    assert_eq!(last["outcome"], "done");
    assert_eq!(last["dead_letter"].to_string(), id);
}

/// Scheduled retries that keep failing: the letter keeps its id and first-failure time, so
/// its age (and the deadline alert on it) grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_retries_keep_the_letter_and_its_age_grows() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let (backend, status) = Backend::switchable().await;
    status.store(503, Ordering::SeqCst);
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_quick_retries();
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    // The first sending and at least three scheduled retries.
    wait_until(Duration::from_secs(30), "retries", || backend.count() >= 4).await;
    let m = metrics(&address).await;
    assert_eq!(m["gdpr_consumer_dead_letters_pending"], 1.0);
    assert!(
        m["gdpr_consumer_oldest_dead_letter_age_seconds"] >= 2.0,
        "the age restarted with a retry: {m:?}"
    );
    assert!(daemon.stop().success());
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], 1);
    assert!(letters[0]["retries"].as_u64().unwrap() >= 3, "{letters:?}");
    assert!(letters[0]["last_error"].as_str().unwrap().contains("503"));
    assert_eq!(letters[0]["retryable"], true);
}

/// A lost key, a foreign key, an empty, truncated or corrupt state file: every command
/// stops with exit 1 and says what to restore; nothing is re-initialised, no key is made,
/// and once restored, a replay sends nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_key_or_a_damaged_state_stops_every_command() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(100, 5, 0)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.run_until(&backend, 5).await;
    let (state, key) = (ws.path("state.redb"), ws.path("state.redb.key"));
    let good_state = std::fs::read(&state).unwrap();
    let good_key = std::fs::read(&key).unwrap();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["run", "--config", config],
        vec!["state", "--config", config],
        vec!["checkpoints", "list", "--config", config],
        vec!["dead-letters", "list", "--config", config],
        vec!["dead-letters", "retry", "--all", "--config", config],
        vec!["audit", "export", "--config", config],
        vec![
            "audit",
            "lookup",
            "--config",
            config,
            "--action",
            "anonymize_user",
            "--key",
            "r-1",
        ],
    ];
    let all_refuse = |what: &str, expected: &str| {
        for command in &commands {
            let (code, out, err) = tokio::task::block_in_place(|| ws.run(command));
            assert_eq!(code, 1, "{what}: {command:?}: {out}{err}");
            assert!(err.contains(expected), "{what}: {command:?}: {err}");
            assert!(err.contains("restore"), "{what}: {command:?}: {err}");
        }
    };

    std::fs::remove_file(&key).unwrap();
    all_refuse("key moved away", "key file");
    assert!(!key.exists(), "a new key was generated");

    std::fs::write(&key, "ab".repeat(32)).unwrap();
    all_refuse("a foreign key", "fingerprint");
    assert!(
        std::fs::read(&state).unwrap() == good_state,
        "a refused command changed the state file"
    );
    std::fs::write(&key, &good_key).unwrap();

    std::fs::write(&state, b"").unwrap();
    all_refuse("an empty state file", "empty");
    assert_eq!(
        std::fs::metadata(&state).unwrap().len(),
        0,
        "re-initialised"
    );

    let flipped = |offset: usize| {
        let mut bytes = good_state.clone();
        for b in bytes.iter_mut().skip(offset).take(64) {
            *b ^= 0xff;
        }
        bytes
    };
    // A flipped page: a command that reads it stops with exit 1 saying what to restore (a
    // command that never reads it may work); never a crash.
    for offset in [4096, 8192, 16384] {
        std::fs::write(&state, flipped(offset)).unwrap();
        for command in &commands[1..] {
            let (code, _, err) = tokio::task::block_in_place(|| ws.run(command));
            assert!(
                code == 0 || (code == 1 && err.contains("restore")),
                "flipped at {offset}: {command:?}: {code} {err}"
            );
            assert!(
                !err.contains("panicked"),
                "flipped at {offset}: {command:?}: {err}"
            );
        }
    }
    for (what, damaged) in [
        ("truncated", good_state[..good_state.len() / 2].to_vec()),
        (
            "corrupt",
            good_state
                .iter()
                .enumerate()
                .map(|(i, b)| if i % 5 == 1 { b ^ 0x5a } else { *b })
                .collect(),
        ),
    ] {
        std::fs::write(&state, &damaged).unwrap();
        for command in &commands {
            let (code, _, err) = tokio::task::block_in_place(|| ws.run(command));
            assert_eq!(code, 1, "{what}: {command:?}: {err}");
            assert!(!err.contains("panicked"), "{what}: {command:?}: {err}");
            assert!(err.contains("restore"), "{what}: {command:?}: {err}");
        }
    }

    // Restored: a replay of the whole stream sends nothing again.
    std::fs::write(&state, &good_state).unwrap();
    let (code, _, err) = ws.run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 5, "a replay sent requests again");
}

/// A state file the user may only read (an auditor's copy of a backup) can be inspected.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_commands_read_a_read_only_copy() {
    use std::os::unix::fs::PermissionsExt;
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(40, 2, 0)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.run_until(&backend, 2).await;
    let mode = |p: &str| std::fs::metadata(ws.path(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("state.redb"), 0o600);
    assert_eq!(mode("state.redb.key"), 0o600);
    let copy = ws.path("backup");
    std::fs::create_dir(&copy).unwrap();
    for name in ["state.redb", "state.redb.key"] {
        std::fs::copy(ws.path(name), copy.join(name)).unwrap();
        std::fs::set_permissions(copy.join(name), std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let before = std::fs::read(copy.join("state.redb")).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o500)).unwrap();
    let state = copy.join("state.redb");
    let state = state.to_str().unwrap();
    for command in [
        vec!["state", "--state", state],
        vec!["checkpoints", "list", "--state", state],
        vec!["audit", "export", "--state", state],
        vec![
            "audit",
            "lookup",
            "--state",
            state,
            "--action",
            "anonymize_user",
            "--key",
            "r-1",
        ],
    ] {
        let (code, out, err) = ws.run(&command);
        assert_eq!(code, 0, "{command:?}: {err}");
        assert!(!out.is_empty());
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(std::fs::read(copy.join("state.redb")).unwrap(), before);
}

/// Two rules fail on one record. Retrying one letter re-runs that rule alone: the other
/// rule's failure makes no new letter, a rule that now decides nothing resolves its letter
/// (audited), and a rule that is gone keeps its letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_failed_retry_reruns_only_the_rule_that_failed() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let throws = "const PREFILTER = [\"Delete User\"];\nfn decide(record) {\n    if record.data.request_id != \"r-0\" { return; }\n    throw \"not yet\";\n}\n";
    ws.write_rule("a_throws.rhai", throws);
    ws.write_rule("b_throws.rhai", throws);
    ws.run_until(&backend, 1).await;
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let id_of = |rule: &str| {
        letters.iter().find(|l| l["rule"] == rule).unwrap()["id"]
            .as_u64()
            .unwrap()
            .to_string()
    };
    let (a, b) = (id_of("a_throws"), id_of("b_throws"));

    // Read again after a checkpoint reset: no second letter for the same record and rule.
    let config = ws.config();
    let config = config.to_str().unwrap();
    let (code, _, err) = ws.run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0, "{err}");
    ws.run_until(&backend, 1).await;
    assert_eq!(ws.dead_letters().len(), 2, "dead-lettered again");

    // Rule a is fixed and now asks for a second request; b still throws.
    ws.write_rule(
        "a_throws.rhai",
        "const PREFILTER = [\"Delete User\"];\nfn decide(record) {\n    if record.data.request_id != \"r-0\" { return; }\n    #{ action: \"anonymize_user\", key: \"a-\" + record.data.request_id, params: #{ user_id: record.data.user_id } }\n}\n",
    );
    let (code, line) = retry(&ws, &a);
    assert_eq!(code, 0, "{line}");
    assert_eq!(line["outcome"], "resolved");
    assert_eq!(backend.count(), 2);
    let letters = ws.dead_letters();
    assert_eq!(
        letters.len(),
        1,
        "b's failure made a letter again: {letters:?}"
    );
    assert_eq!(letters[0]["id"].to_string(), b);

    let (code, line) = retry(&ws, &b);
    assert_eq!(code, 1, "{line}");
    assert_eq!(line["outcome"], "still_failing");
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["id"].to_string(), b);
    assert_eq!(letters[0]["retries"], 1);

    std::fs::remove_file(ws.path("rules").join("b_throws.rhai")).unwrap();
    let (code, line) = retry(&ws, &b);
    assert_eq!(code, 1, "{line}");
    assert!(
        line["error"].as_str().unwrap().contains("no longer"),
        "{line}"
    );
    assert_eq!(ws.dead_letters().len(), 1);

    ws.write_rule(
        "b_throws.rhai",
        "const PREFILTER = [\"Delete User\"];\nfn decide(record) {\n}\n",
    );
    let (code, line) = retry(&ws, &b);
    assert_eq!(code, 0, "{line}");
    assert!(ws.dead_letters().is_empty());
    let (_, jsonl, _) = ws.run(&["audit", "export", "--config", config]);
    let resolved: Vec<Value> = json_lines(&jsonl)
        .into_iter()
        .filter(|e| e["outcome"] == "resolved")
        .collect();
    assert_eq!(resolved.len(), 2, "every resolution is audited");
    assert!(resolved
        .iter()
        .any(|e| e["rule"] == "b_throws" && e["note"].as_str().unwrap().contains("nothing")));
}

/// A worker whose reads fail in a way the reader cannot absorb is restarted with backoff,
/// not in a loop, and `/readyz` and `/status` say why meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shard_worker_restarts_with_backoff_and_says_why() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let proxy = FaultProxy::start(&kinesis.endpoint, |operation, n| {
        (operation == "GetRecords" && n < 3).then_some(Fault::AccessDenied)
    })
    .await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&proxy.endpoint, "events", &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(10), "a failure", || {
        !proxy.injected().is_empty()
    })
    .await;
    // The worker's failure reaches the supervisor a moment after the proxy answered.
    let mut answer = get(&address, "/readyz").await;
    for _ in 0..50 {
        if answer.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = get(&address, "/readyz").await;
    }
    let (code, body) = answer;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("AccessDenied"), "{body}");
    let (_, status) = get(&address, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["shards"][0]["state"], "restarting", "{status}");
    assert_eq!(status["ready"], false);
    // Restarts after about 1 s, then 2 s: a loop would have made hundreds of calls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(proxy.injected().len() <= 2, "{:?}", proxy.injected());
    wait_until(Duration::from_secs(20), "the request", || {
        backend.count() == 1
    })
    .await;
    assert_eq!(proxy.injected().len(), 3);
    let (code, body) = get(&address, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let m = metrics(&address).await;
    assert_eq!(
        m[r#"gdpr_consumer_shard_restarts_total{shard_id="shardId-000000000000"}"#],
        3.0
    );
    // Restarted once per failure, never again once it runs: one worker per shard.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let starts = daemon.stderr().matches("starting shard").count();
    assert_eq!(starts, 4, "1 start and 3 restarts");
    let (_, status) = get(&address, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["shards"][0]["state"], "reading", "{status}");
    assert!(daemon.stop().success());
}

/// SIGHUP as soon as the daemon has started (before its rules watcher runs), and to a
/// dry-run that follows the stream: neither dies of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_never_kills_the_daemon_or_a_dry_run() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    for extra in [&[][..], &["--dry-run", "--follow"][..]] {
        let mut daemon = ws.start_daemon(extra);
        wait_until(Duration::from_secs(30), "rules loaded", || {
            daemon.stderr().contains("rules loaded")
        })
        .await;
        for _ in 0..10 {
            daemon.signal("HUP");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(daemon.is_running(), "{extra:?}: {}", daemon.stderr());
        daemon.signal("INT");
        let status = daemon.wait_exit();
        assert!(status.success(), "{extra:?}: {status}");
    }
}

/// Output that cannot be written is an error; a reader that went away is not.
#[cfg(unix)]
#[test]
fn output_that_cannot_be_written_fails_the_command() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    let config = ws.config();
    let config = config.to_str().unwrap();
    // A state to read: the daemon makes one before it finds Kinesis unreachable.
    let (code, _, err) = ws.run(&["run", "--config", config]);
    assert_eq!(code, 1, "{err}");
    for command in [
        vec!["state", "--config", config],
        vec!["audit", "export", "--format", "csv", "--config", config],
        vec!["rules", "check", "--rules-dir", "rules"],
    ] {
        let full = std::fs::File::create("/dev/full").unwrap();
        let out = std::process::Command::new(bin())
            .current_dir(ws.dir.path())
            .args(&command)
            .stdout(full)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot write"), "{command:?}: {err}");

        let mut child = std::process::Command::new(bin())
            .current_dir(ws.dir.path())
            .args(&command)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{command:?}: broken pipe");
    }
}

/// Settings that would lose requests or send them wrong are refused at start with exit 2,
/// naming the key: a ledger that forgets before the stream does, an empty token, a
/// placeholder in the URL's fragment (never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_lose_requests_are_refused_at_start() {
    let kinesis = Kinesalite::start();
    create_stream(&kinesis.client(), "events", 1).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", "http://127.0.0.1:9");
    let config = ws.config();
    let config = config.to_str().unwrap();
    for token in ["", "  \n"] {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(bin())
                .args(["run", "--config", config])
                .env("BACKEND_TOKEN", token)
                .output()
                .unwrap()
        });
        assert_eq!(out.status.code(), Some(2), "{token:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("BACKEND_TOKEN is empty"), "{err}");
    }

    // kinesalite keeps records 24 hours.
    ws.edit_config("[state]\n", "[state]\nledger_retention_days = 0\n");
    let (code, _, err) = tokio::task::block_in_place(|| ws.run(&["run", "--config", config]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ledger_retention_days = 0"), "{err}");
    ws.edit_config("ledger_retention_days = 0\n", "");

    ws.edit_config("/anonymize\"", "/anonymize#{user_id}\"");
    let (code, _, err) = tokio::task::block_in_place(|| ws.run(&["run", "--config", config]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[actions.anonymize_user]") && err.contains("fragment"),
        "{err}"
    );
}

/// A 409 is a refusal by default (an operator looks at it); `retry_statuses = [409]` makes
/// it a backend fault for a backend that answers 409 to "still in flight".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_is_a_refusal_unless_the_config_retries_it() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    for retried in [false, true] {
        let backend = Backend::with_behaviour(
            Duration::ZERO,
            |_, earlier| if earlier == 0 { 409 } else { 200 },
        )
        .await;
        let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
        if retried {
            ws.edit_config(
                "max_attempts = 4",
                "max_attempts = 4\nretry_statuses = [409]",
            );
        }
        ws.run_until(&backend, if retried { 2 } else { 1 }).await;
        let letters = ws.dead_letters();
        if retried {
            assert!(letters.is_empty(), "{letters:?}");
            assert_eq!(backend.count(), 2);
        } else {
            assert_eq!(letters.len(), 1);
            assert_eq!(letters[0]["http_status"], 409);
            assert_eq!(letters[0]["retryable"], false);
            assert_eq!(backend.count(), 1);
        }
    }
}

/// A key rotation: new entries under the new key, lookups and dedup under every key of
/// the ring, dead letters sealed again; a ring that lost the old key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_keeps_every_lookup_and_letter() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(60, 3, 0)).await;
    let backend = Backend::with_behaviour(Duration::ZERO, |r, _| {
        if r.path.contains("del-user-2") {
            400
        } else {
            200
        }
    })
    .await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.run_until(&backend, 3).await;
    let config = ws.config();
    let config = config.to_str().unwrap();
    let summary = |ws: &Workspace| {
        let (code, out, err) = ws.run(&["state", "--config", config]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let before = summary(&ws);
    let old_key = std::fs::read_to_string(ws.path("state.redb.key")).unwrap();

    let (code, out, err) = ws.run(&["state", "rotate-key", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let rotated: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rotated["dead_letters_resealed"], 1);
    let after = summary(&ws);
    assert_ne!(after["key_fingerprint"], before["key_fingerprint"]);
    assert_eq!(after["key_fingerprint"], rotated["key_fingerprint"]);
    assert_eq!(after["key_fingerprints"].as_array().unwrap().len(), 2);

    // A request done under the old key is still found, and not sent again on a replay.
    let (code, out, _) = ws.run(&[
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
    let (code, _, err) = ws.run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0, "{err}");
    ws.run_until(&backend, 3).await;
    assert_eq!(
        backend.count(),
        3,
        "a replay after the rotation sent requests again"
    );

    // The letter sealed under the old key opens under the new one.
    let id = ws.dead_letters()[0]["id"].to_string();
    let (code, line) = retry(&ws, &id);
    assert_eq!(code, 1, "{line}");
    assert_eq!(line["outcome"], "still_failing", "{line}");

    // The old key dropped from the ring: refused.
    let new_key = std::fs::read_to_string(ws.path("state.redb.key")).unwrap();
    assert!(new_key.ends_with(&old_key));
    std::fs::write(ws.path("state.redb.key"), new_key.lines().next().unwrap()).unwrap();
    let (code, _, err) = ws.run(&["state", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("fingerprint"), "{err}");
}

/// SIGTERM while the daemon retries a dead letter: the request in flight finishes and its
/// outcome is recorded (the drain waits for it), and `--id 1 2` names several letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_a_dead_letter_retry_in_flight() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(40, 2, 0)).await;
    // Both requests fail (503) and become letters.
    let backend = Backend::with_behaviour(Duration::ZERO, |r, earlier| {
        if earlier == 0 || r.path.contains("del-user-1") {
            503
        } else {
            200
        }
    })
    .await;
    let slow = Backend::with_behaviour(Duration::from_millis(1500), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_quick_retries();
    ws.run_until(&backend, 2).await;
    assert_eq!(ws.dead_letters().len(), 2);

    // The backend is now slow: the first scheduled retry is in flight when SIGTERM comes.
    ws.edit_config(&backend.url, &slow.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "a retry in flight", || {
        slow.count() >= 1
    })
    .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit();
    assert!(status.success(), "{status}");
    assert_eq!(slow.count(), 1, "the drain started another retry");
    let letters = ws.dead_letters();
    assert_eq!(
        letters.len(),
        1,
        "the retry in flight was cut off: {letters:?}"
    );

    // The operator retries the rest, naming ids as `--id 1 2` (one is gone already).
    let config = ws.config();
    let config = config.to_str().unwrap();
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&[
            "dead-letters",
            "retry",
            "--config",
            config,
            "--id",
            "1",
            "2",
        ])
    });
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no dead letter"), "{err}");
    let id = letters[0]["id"].to_string();
    let (code, line) = retry(&ws, &id);
    assert_eq!(code, 0, "{line}");
    assert!(ws.dead_letters().is_empty());
}

/// Makes a file immutable (`chattr +i`) until dropped: writes to it fail, as on a failing
/// disk.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: std::path::PathBuf) -> Self {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "chattr +i {}", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// The state cannot be written for a while (a failing disk): the request whose outcome
/// could not be recorded is not sent again while it cannot, `/readyz` and `/status` say
/// why, and once the file can be written the daemon opens it again and carries on: the
/// request sent once more (its outcome was never recorded), then done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_cannot_be_written_stops_the_calls_until_it_can() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    let immutable = Immutable::set(ws.path("state.redb"));
    put(&client, "events", &traffic(20, 1, 0)).await;
    wait_until(Duration::from_secs(30), "the request", || {
        backend.count() >= 1
    })
    .await;
    wait_until(Duration::from_secs(30), "not ready", || {
        daemon.stderr().contains("state_write_error")
    })
    .await;
    let (code, body) = get(&address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("state not writable"), "{body}");
    let (_, status) = get(&address, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"]["writable"], false, "{status}");
    // Restarts come and go: no call while the state cannot record its outcome.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(backend.count(), 1, "sent again while the state was broken");

    drop(immutable);
    for _ in 0..400 {
        if backend.count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(backend.count() >= 2, "not sent again:\n{}", daemon.stderr());
    wait_until(Duration::from_secs(30), "ready", || {
        daemon.stderr().contains("state_write_recovered")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, body) = get(&address, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(daemon.stop().success());
    let received = backend.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[0].idempotency_key, received[1].idempotency_key);
    assert!(ws.dead_letters().is_empty());
    let config = ws.config();
    let (code, out, _) = ws.run(&[
        "audit",
        "lookup",
        "--config",
        config.to_str().unwrap(),
        "--action",
        "anonymize_user",
        "--key",
        "r-0",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_lines(&out).last().unwrap()["done"], true);
}

/// A rule_failed letter whose fixed rule now decides, while the backend still fails: the
/// retry says so (exit 1), the letter stays as it was (no new letter, no new age), and a
/// later retry completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_failed_retry_whose_request_fails_keeps_its_letter() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let (backend, status) = Backend::switchable().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let rule = |body: &str| {
        format!("const PREFILTER = [\"Delete User\"];\nfn decide(record) {{\n    if record.data.request_id != \"r-0\" {{ return; }}\n    {body}\n}}\n")
    };
    ws.edit_config("max_attempts = 4", "max_attempts = 1");
    ws.write_rule("thrower.rhai", &rule("throw \"not yet\";"));
    ws.run_until(&backend, 1).await;
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let first = letters[0].clone();
    let id = first["id"].to_string();

    ws.write_rule(
        "thrower.rhai",
        &rule("#{ action: \"anonymize_user\", key: \"t-0\", params: #{ user_id: record.data.user_id } }"),
    );
    for (answer, attempt) in [(503, 1), (400, 2)] {
        status.store(answer, Ordering::SeqCst);
        let (code, line) = retry(&ws, &id);
        assert_eq!(code, 1, "{line}");
        assert_eq!(line["outcome"], "still_failing", "{line}");
        assert!(
            line["error"]
                .as_str()
                .unwrap()
                .contains(&answer.to_string()),
            "{line}"
        );
        let letters = ws.dead_letters();
        assert_eq!(letters.len(), 1, "a new letter was made: {letters:?}");
        for same in ["id", "created_at", "kind", "rule"] {
            assert_eq!(letters[0][same], first[same], "{same} changed");
        }
        assert_eq!(letters[0]["retries"], attempt);
    }
    status.store(200, Ordering::SeqCst);
    let (code, line) = retry(&ws, &id);
    assert_eq!(code, 0, "{line}");
    assert_eq!(line["outcome"], "resolved");
    assert!(ws.dead_letters().is_empty());
    // The acme rule's request, then the thrower's three tries.
    assert_eq!(backend.count(), 4);
}

/// A Kinesis endpoint that accepts connections and never answers: at start, `run` says so
/// and exits 1; while running, `/readyz` says the reads are failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kinesis_that_never_answers_is_a_fault_not_a_hang() {
    // Connections complete in the kernel's backlog; nothing ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let ws = Workspace::new(&endpoint, "events", "http://127.0.0.1:9");
    ws.edit_config("[stream]\n", "[stream]\ncall_timeout_ms = 300\n");
    let started = std::time::Instant::now();
    let (code, _, err) =
        tokio::task::block_in_place(|| ws.run(&["run", "--config", ws.config().to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.to_lowercase().contains("timeout") || err.contains("timed out"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let proxy = FaultProxy::start(&kinesis.endpoint, |operation, n| {
        (operation == "GetRecords" && n >= 2).then_some(Fault::Slow(Duration::from_secs(600)))
    })
    .await;
    let ws = Workspace::new(&proxy.endpoint, "events", "http://127.0.0.1:9");
    ws.edit_config("[stream]\n", "[stream]\ncall_timeout_ms = 300\n");
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(30), "reads reported failing", || {
        daemon.stderr().contains("kinesis_retry")
    })
    .await;
    let (code, body) = get(&address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("GetRecords"), "{body}");
    daemon.signal("TERM");
    assert!(daemon.wait_exit().success());
}

/// The daemon's scheduled retries while the state cannot be written: no call until it can
/// (an idle shard's empty commit must not count as a write that worked), then the letter's
/// request is sent once and the letter resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_retries_wait_while_the_state_cannot_be_written() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let (backend, status) = Backend::switchable().await;
    status.store(503, Ordering::SeqCst);
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_quick_retries();
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(30), "a letter retried", || {
        backend.count() >= 2
    })
    .await;
    let immutable = Immutable::set(ws.path("state.redb"));
    wait_until(Duration::from_secs(30), "a failed write", || {
        daemon.stderr().contains("state_write_error")
    })
    .await;
    status.store(200, Ordering::SeqCst);
    let before = backend.count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        backend.count(),
        before,
        "retried while the state was broken"
    );
    let (code, body) = get(&address, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    drop(immutable);
    wait_until(Duration::from_secs(30), "the retry", || {
        backend.count() > before
    })
    .await;
    wait_until(Duration::from_secs(30), "resolved", || {
        daemon.stderr().contains("dead_letter_resolved")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(backend.count(), before + 1, "sent again after it was done");
    assert!(daemon.stop().success());
    assert!(ws.dead_letters().is_empty());
}
