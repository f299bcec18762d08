//! Pausing an action: its requests are held durably while the shards read on, across a
//! restart, and sent in arrival order when it is resumed; every step audited.

use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_action_holds_its_requests_across_a_restart_and_sends_them_on_resume() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));

    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    let (code, _, err) = run(&[
        "actions", "pause", "nope", "--reason", "x", "--config", config,
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = run(&[
        "actions",
        "pause",
        "anonymize_user",
        "--reason",
        "backend migration",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused"), "{out}");

    put(&client, "events", &traffic(30, 3, 0)).await;
    wait_until(Duration::from_secs(30), "3 held", || {
        daemon.stderr().matches("request held").count() >= 3
    })
    .await;
    assert_eq!(backend.count(), 0, "a paused action called the backend");
    let (code, out, _) = run(&["actions", "list", "--config", config]);
    assert_eq!(code, 0);
    let list = json_lines(&out);
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["paused"], true);
    assert_eq!(list[0]["reason"], "backend migration");
    assert_eq!(list[0]["held"], 3);
    let m = metrics(&address).await;
    assert_eq!(
        m[r#"gdpr_consumer_action_paused{action="anonymize_user"}"#],
        1.0
    );
    assert_eq!(
        m[r#"gdpr_consumer_requests_held{action="anonymize_user"}"#],
        3.0
    );
    let (_, status) = get(&address, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["paused"][0]["action"], "anonymize_user", "{status}");
    // Held is settled: the shard moved on, nothing is a dead letter.
    wait_until(Duration::from_secs(30), "checkpointed", || {
        let (_, out, _) = ws.run(&["checkpoints", "list", "--config", config]);
        json_lines(&out)
            .first()
            .is_some_and(|c| c["sequence_number"].is_string())
    })
    .await;
    assert!(daemon.stop().success());
    assert!(ws.dead_letters().is_empty());

    // The pause survives a restart; so do the held requests, which are not held twice.
    let (code, _, _) = run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert_eq!(backend.count(), 0);
    let (_, out, _) = run(&["actions", "list", "--config", config]);
    assert_eq!(json_lines(&out)[0]["held"], 3, "{out}");

    // Resumed, through the running daemon: sent at once, in arrival order, with their keys.
    let (code, out, err) = run(&["actions", "resume", "anonymize_user", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 held request(s) settled"), "{out}");
    let received = backend.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/users/del-user-0/anonymize",
            "/v1/users/del-user-1/anonymize",
            "/v1/users/del-user-2/anonymize"
        ]
    );
    for (n, r) in received.iter().enumerate() {
        let key = hex::encode(Sha256::digest(format!("anonymize_user\nr-{n}")));
        assert_eq!(r.idempotency_key.as_deref(), Some(key.as_str()));
    }
    let (code, _, err) = run(&["actions", "resume", "anonymize_user", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("not paused"), "{err}");
    let (_, out, _) = run(&["actions", "list", "--config", config]);
    assert_eq!(json_lines(&out)[0]["held"], 0, "{out}");
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 3, "sent twice");

    let (_, jsonl, _) = run(&["audit", "export", "--config", config]);
    let outcomes: Vec<String> = json_lines(&jsonl)
        .iter()
        .map(|e| e["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        outcomes,
        [
            "paused",
            "held",
            "held",
            "held",
            // Read again after the checkpoint reset: already held.
            "duplicate",
            "duplicate",
            "duplicate",
            "resumed",
            // Each request has one action: done, it is complete.
            "done",
            "complete",
            "done",
            "complete",
            "done",
            "complete"
        ],
        "{jsonl}"
    );
}

/// Paused and resumed with the daemon stopped: the pause holds from the next start, and
/// the held requests are sent at the start after the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_and_resume_made_while_the_daemon_is_stopped() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));
    ws.run_until(&backend, 0).await;
    let (code, _, err) = run(&[
        "actions",
        "pause",
        "anonymize_user",
        "--reason",
        "incident",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");

    put(&client, "events", &traffic(20, 2, 0)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "2 held", || {
        daemon.stderr().matches("request held").count() >= 2
    })
    .await;
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 0);

    let (code, out, err) = run(&["actions", "resume", "anonymize_user", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("its 2 held request(s) are sent when the daemon starts"),
        "{out}"
    );
    ws.run_until(&backend, 2).await;
    assert_eq!(backend.count(), 2);
    let (_, out, _) = run(&["actions", "list", "--config", config]);
    assert_eq!(json_lines(&out)[0]["held"], 0, "{out}");
}

/// A resume sends the held requests first: requests that arrive while they go out queue
/// behind them (nothing overtakes a held one), and the housekeeping round, releasing at
/// the same time, records no false duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_during_a_resume_wait_behind_the_held_ones() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    // Slow enough that the resume is still sending when the next request arrives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = Backend::serve(listener, |_, _| Reply {
        delay: Duration::from_millis(400),
        ..Reply::from(200)
    });
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_quick_retries(); // the housekeeping round every second, releasing too
    let config = ws.config();
    let config = config.to_str().unwrap().to_owned();
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    let (code, _, err) = ws.run(&[
        "actions",
        "pause",
        "anonymize_user",
        "--reason",
        "migration",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{err}");
    let request = |n: usize| {
        (
            "same-key".to_owned(),
            deletion(&format!("r-{n}"), &format!("user-{n}"))
                .to_string()
                .into_bytes(),
        )
    };
    put(&client, "events", &(0..4).map(request).collect::<Vec<_>>()).await;
    wait_until(Duration::from_secs(30), "4 held", || {
        daemon.stderr().matches("request held").count() >= 4
    })
    .await;

    let resume = {
        let config = config.clone();
        std::thread::spawn(move || {
            command(std::path::Path::new(&config))
                .args(["actions", "resume", "anonymize_user", "--config", &config])
                .output()
                .unwrap()
        })
    };
    wait_until(
        Duration::from_secs(30),
        "the first held request sent",
        || backend.count() >= 1,
    )
    .await;
    put(&client, "events", &[request(4)]).await;
    let out = tokio::task::block_in_place(|| resume.join().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(30), "5 calls", || backend.count() >= 5).await;

    let order: Vec<String> = backend.received().iter().map(|r| r.path.clone()).collect();
    let expected: Vec<String> = (0..5)
        .map(|n| format!("/v1/users/user-{n}/anonymize"))
        .collect();
    assert_eq!(order, expected, "sent out of order");
    assert!(daemon.stop().success());
    let (_, out, _) = ws.run(&["audit", "export", "--config", &config]);
    let entries = json_lines(&out);
    let count = |outcome: &str| entries.iter().filter(|e| e["outcome"] == outcome).count();
    assert_eq!(count("done"), 5, "{out}");
    assert_eq!(count("duplicate"), 0, "{out}");
    // The pause ended with the last held request: nothing is paused any more.
    let (_, out, _) = ws.run(&["actions", "list", "--config", &config]);
    assert_eq!(json_lines(&out)[0]["paused"], false, "{out}");
}

/// A request on legal hold while its action is paused stays held after the resume, and
/// does not keep the action resuming: the action's other requests go out, and the held one
/// when its hold is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legal_hold_does_not_keep_a_resumed_action_paused() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    let (code, _, err) = run(&[
        "actions",
        "pause",
        "anonymize_user",
        "--reason",
        "incident",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    let request = |n: usize| {
        let user = format!("del-user-{n}");
        let data = deletion(&format!("r-{n}"), &user).to_string().into_bytes();
        vec![(user, data)]
    };
    put(&client, "events", &request(0)).await;
    wait_until(Duration::from_secs(30), "held", || {
        daemon.stderr().contains("request held")
    })
    .await;
    let (code, _, err) = run(&[
        "requests",
        "hold",
        "--key",
        "r-0",
        "--reason",
        "litigation",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&["actions", "resume", "anonymize_user", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(backend.count(), 0, "a request on legal hold was sent");
    let (_, out, _) = run(&["actions", "list", "--config", config]);
    let listed = &json_lines(&out)[0];
    assert_eq!(listed["paused"], false, "{out}");
    assert_eq!(listed["held"], 0, "{out}");

    // The action's other requests are not held behind the legal hold.
    put(&client, "events", &request(1)).await;
    wait_until(Duration::from_secs(30), "r-1 sent", || backend.count() == 1).await;
    let (_, out, _) = run(&[
        "requests", "show", "--key", "r-0", "--format", "json", "--config", config,
    ]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["status"], "held", "{shown:#}");
    assert_eq!(shown["hold"]["reason"], "litigation", "{shown:#}");

    let (code, out, err) = run(&["requests", "release", "--key", "r-0", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(30), "r-0 sent", || backend.count() == 2).await;
    let (_, out, _) = run(&[
        "requests", "show", "--key", "r-0", "--format", "json", "--config", config,
    ]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["status"], "complete", "{shown:#}");
    assert!(daemon.stop().success());
    let paths: Vec<String> = backend.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/users/del-user-1/anonymize",
            "/v1/users/del-user-0/anonymize"
        ]
    );
}
