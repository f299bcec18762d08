//! A backend that fails, and a rule that throws: nothing is lost, nothing stalls.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_faults_are_retried_and_refusals_dead_lettered() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    // del-user-2 is refused for good (400); every other request fails twice with 503 first.
    let backend = Backend::with_behaviour(Duration::ZERO, |r, earlier| {
        if r.path.contains("/del-user-2/") {
            400
        } else if earlier < 2 {
            503
        } else {
            200
        }
    })
    .await;
    put(&client, "events", &traffic(100, 5, 0)).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    // 4 requests × 3 attempts + 1 refused.
    wait_until(Duration::from_secs(60), "13 attempts", || {
        backend.count() >= 13
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.stop().success());

    let received = backend.received();
    assert_eq!(received.len(), 13);
    for n in [0, 1, 3, 4] {
        let attempts: Vec<_> = received
            .iter()
            .filter(|r| r.path == format!("/v1/users/del-user-{n}/anonymize"))
            .collect();
        assert_eq!(attempts.len(), 3, "del-user-{n}");
        // A retry is the same request: the backend can recognise it.
        assert!(attempts
            .iter()
            .all(|a| a.idempotency_key == attempts[0].idempotency_key));
    }
    // The refusal is not retried: an operator must look at it.
    assert_eq!(
        received
            .iter()
            .filter(|r| r.path.contains("/del-user-2/"))
            .count(),
        1
    );

    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["kind"], "action_failed");
    assert_eq!(letters[0]["action"], "anonymize_user");
    assert_eq!(letters[0]["retryable"], false);
    assert!(letters[0]["error"].as_str().unwrap().contains("400"));
    assert_eq!(letters[0]["shard_id"], "shardId-000000000000");

    // The shard moved on past the dead letter: its checkpoint is the last record.
    let config = ws.config();
    let (code, out, _) = ws.run(&["checkpoints", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    let checkpoint: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(checkpoint["sequence_number"].is_string(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_rule_throws_on_are_dead_lettered_and_the_rest_handled() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let records = traffic(1_000, 20, 0);
    put(&client, "events", &records).await;
    // Orders with an odd total make this rule throw.
    let throwing: usize = records
        .iter()
        .filter_map(|(_, data)| serde_json::from_slice::<serde_json::Value>(data).ok())
        .filter(|v| v["type"] == "order" && v["total_cents"].as_u64().unwrap() % 2 == 1)
        .count();
    assert!(throwing > 10, "{throwing}");

    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule(
        "zz_fragile.rhai",
        r#"fn decide(record) {
    let d = record.data;
    if type_of(d) == "map" && d.type == "order" && d.total_cents % 2 == 1 {
        throw "cannot price order " + d.order_id;
    }
}
"#,
    );
    let mut daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "20 requests", || {
        backend.count() >= 20
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    assert!(daemon.is_running(), "a throwing rule took the daemon down");
    let log = daemon.stderr();
    assert!(daemon.stop().success());

    assert_eq!(backend.count(), 20);
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), throwing);
    assert!(letters
        .iter()
        .all(|l| l["kind"] == "rule_failed" && l["rule"] == "zz_fragile"));
    let error = letters[0]["error"].as_str().unwrap();
    assert!(error.contains("zz_fragile.rhai:4:"), "{error}");
    // The log says where the rule failed, but not the value it threw.
    assert!(log.contains("zz_fragile.rhai:4:"), "{log}");
    assert!(!log.contains("cannot price order o-"), "{log}");
}
