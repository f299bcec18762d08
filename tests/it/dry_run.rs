//! Dry-run: shows what would be done, does none of it.

use std::time::Duration;

use crate::support::*;

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

    // Before any live run: no state or key file appears.
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0, "{err}");
    assert!(!ws.path("state.redb").exists() && !ws.path("state.redb.key").exists());
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, actions) = lines.split_last().unwrap();
    assert_eq!(actions.len(), 15, "{out}");
    let mut keys: Vec<&str> = actions.iter().map(|a| a["key"].as_str().unwrap()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 12);
    assert_eq!(actions.iter().filter(|a| a["duplicate"] == true).count(), 3);
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
    assert!(first["shard_id"].as_str().unwrap().starts_with("shardId-"));
    assert!(first["sequence_number"].as_str().unwrap().len() > 20);
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["actions"]["anonymize_user"], 15);
    let rule = &summary["rules"]["acme_gdpr_delete_user"];
    assert_eq!(rule["records_seen"], 603);
    assert_eq!(rule["matches"], 15);
    assert_eq!(rule["errors"], 0);
    assert!(!out.contains(TOKEN));

    // The human format: one block per action, the token redacted.
    let (code, out, _) =
        tokio::task::block_in_place(|| ws.run(&["run", "--config", config, "--dry-run"]));
    assert_eq!(code, 0);
    assert_eq!(out.matches("action: anonymize_user").count(), 15);
    assert!(out.contains("Authorization: Bearer <redacted>"));
    assert!(out.contains("POST http://127.0.0.1:"));
    assert!(!out.contains(TOKEN));
    assert_eq!(backend.count(), 0);

    // After a live run, a dry-run leaves the state file as it was.
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
    let (code, out, _) = tokio::task::block_in_place(|| {
        ws.run(&["run", "--config", config, "--dry-run", "--output", "json"])
    });
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 16);
    assert_eq!(std::fs::read(ws.path("state.redb")).unwrap(), before);
    assert_eq!(backend.count(), 12);
}
