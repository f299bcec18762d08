//! Operating the daemon: metrics, status, readiness, and logs without personal data.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Prometheus text format into `name{labels}` → value, checking the format as it goes.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "not OpenMetrics text:\n{text}"
    );
    let mut values = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(
                line.is_empty()
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# HELP ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "{line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        assert!(series.starts_with("gdpr_consumer_"), "{series}");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        values.insert(series.to_owned(), value);
    }
    values
}

fn sum(values: &HashMap<String, f64>, prefix: &str) -> f64 {
    values
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_match_a_known_scenario() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    put(&client, "events", &traffic(1_000, 10, 2)).await;
    // del-user-3 is refused: one dead letter.
    let backend = Backend::refusing("/del-user-3/", 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(60), "10 calls", || {
        backend.count() >= 10
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;

    assert_eq!(get(&address, "/healthz").await, (200, "ok".to_owned()));
    assert_eq!(get(&address, "/readyz").await.0, 200);
    let (code, text) = get(&address, "/metrics").await;
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    assert_eq!(
        sum(&m, "gdpr_consumer_records_read_total{"),
        1_002.0,
        "{text}"
    );
    assert!(sum(&m, "gdpr_consumer_bytes_read_total{") > 50_000.0);
    assert_eq!(
        m[r#"gdpr_consumer_rule_matches_total{rule="acme_gdpr_delete_user"}"#], 12.0,
        "{text}"
    );
    assert_eq!(
        m[r#"gdpr_consumer_actions_total{action="anonymize_user",outcome="done"}"#],
        9.0
    );
    assert_eq!(
        m[r#"gdpr_consumer_actions_total{action="anonymize_user",outcome="duplicate"}"#],
        2.0
    );
    assert_eq!(
        m[r#"gdpr_consumer_actions_total{action="anonymize_user",outcome="dead_lettered"}"#],
        1.0
    );
    assert_eq!(m["gdpr_consumer_dead_letters_pending"], 1.0);
    assert_eq!(m["gdpr_consumer_rules_stale"], 0.0);
    assert_eq!(m["gdpr_consumer_shards_owned"], 2.0);
    assert_eq!(
        m[r#"gdpr_consumer_millis_behind_latest{shard_id="shardId-000000000000"}"#],
        0.0
    );
    assert_eq!(
        m[r#"gdpr_consumer_action_duration_seconds_count{action="anonymize_user"}"#],
        10.0
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("gdpr_consumer_rules_info{hash=")));
    assert!(m["gdpr_consumer_checkpoint_commit_seconds_count"] >= 2.0);

    let (code, status) = get(&address, "/status").await;
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["dead_letters_pending"], 1);
    assert_eq!(status["rules"]["stale"], false);
    assert_eq!(status["rules"]["loaded"], 3);
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    assert!(shards.iter().all(|s| s["state"] == "reading"
        && s["checkpoint"].is_string()
        && s["millis_behind_latest"] == 0));
    assert!(status["uptime_s"].is_u64());
    assert!(daemon.stop().success());

    // The state summary, without the daemon.
    let config = ws.config();
    let (code, out, err) = ws.run(&["state", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["dedup_entries"], 9);
    assert_eq!(summary["dead_letters_pending"], 1);
    assert_eq!(summary["schema_version"], 2);
    assert_eq!(summary["checkpoints"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_stale_rules_waiting_children_and_an_unreachable_stream() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(400, 40, 0)).await;
    // Slow: the parent still has a backlog when it is split.
    let backend = Backend::with_behaviour(Duration::from_millis(100), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(30), "a first call", || {
        backend.count() >= 1
    })
    .await;
    split_in_half(&client, "events", "shardId-000000000000").await;
    let waiting = || async {
        let status: Value = serde_json::from_str(&get(&address, "/status").await.1).unwrap();
        status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "waiting_for_parent")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while waiting().await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "children never shown waiting for their parent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        backend.count() < 40,
        "the parent was drained before the status was read"
    );

    // A refused reload: stale rules, in status and metrics.
    ws.write_rule("broken.rhai", "fn decide(record) {\n    let x = ;\n}\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status: Value = serde_json::from_str(&get(&address, "/status").await.1).unwrap();
        if status["rules"]["stale"] == true {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rules never reported stale"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status["rules"]["last_error"]
            .as_str()
            .unwrap()
            .contains("broken.rhai:2:"),
        "{status}"
    );
    let m = parse_metrics(&get(&address, "/metrics").await.1);
    assert_eq!(m["gdpr_consumer_rules_stale"], 1.0);
    assert_eq!(
        m[r#"gdpr_consumer_rules_reloads_total{result="refused"}"#],
        1.0
    );

    // Let the parent drain and the children start.
    wait_until(Duration::from_secs(60), "all 40 calls", || {
        backend.count() >= 40
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status: Value = serde_json::from_str(&get(&address, "/status").await.1).unwrap();
        let states: Vec<&str> = status["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["state"].as_str().unwrap())
            .collect();
        if states.iter().filter(|s| **s == "reading").count() == 2 && states.contains(&"finished") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The stream goes away: not ready.
    drop(kinesis);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get(&address, "/readyz").await.0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz still ready without a stream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&address, "/healthz").await.0, 200);
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_personal_data_even_at_trace_level() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let secret_user = "PII-USER-7f3a9c";
    let secret_request = "PII-REQ-91b2e4";
    let secret_email = "pii.person@example.org";
    let mut records = vec![];
    for n in 0..6 {
        let mut request = deletion(
            &format!("{secret_request}-{n}"),
            &format!("{secret_user}-{n}"),
        );
        request["email"] = json!(secret_email);
        records.push((
            format!("{secret_user}-{n}"),
            request.to_string().into_bytes(),
        ));
    }
    // Written twice (a duplicate), one refused by the backend, one a rule throws on.
    records.push(records[0].clone());
    records.push(("k".to_owned(), json!({"type": "order", "total_cents": 3, "order_id": secret_request, "email": secret_email}).to_string().into_bytes()));
    put(&client, "events", &records).await;
    let backend = Backend::refusing("-5/anonymize", 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule(
        "zz_throws.rhai",
        r#"fn decide(record) {
    let d = record.data;
    if type_of(d) == "map" && d.type == "order" { throw "cannot handle " + d.order_id + " " + d.email; }
}
"#,
    );
    let daemon = ws.start_daemon_with_env(&[], &[("GDPR_CONSUMER_LOG", "trace")]);
    wait_until(Duration::from_secs(60), "6 calls", || backend.count() >= 6).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    let log_path = daemon.log.clone();
    assert!(daemon.stop().success());
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.lines().count() > 20, "expected a verbose log:\n{log}");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not verbose"
    );
    for secret in [
        secret_user,
        secret_request,
        secret_email,
        TOKEN,
        "anonymize\"",
        "/v1/users/",
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
    // JSON logs too.
    let daemon =
        ws.start_daemon_with_env(&["--log-format", "json"], &[("GDPR_CONSUMER_LOG", "trace")]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    let log_path = daemon.log.clone();
    assert!(daemon.stop().success());
    let log = std::fs::read_to_string(log_path).unwrap();
    for line in log.lines() {
        let _: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    for secret in [secret_user, secret_request, secret_email, TOKEN] {
        assert!(!log.contains(secret), "the log holds {secret:?}");
    }
}
