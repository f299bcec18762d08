//! The source under faults the emulator never produces, and across merges.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_500s_expired_iterators_and_slow_answers_lose_nothing() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    // Faults on a schedule: more than the SDK's own retries absorb, so the daemon's
    // recovery is what keeps every record.
    // Runs of throttling longer than the SDK's three attempts, whichever shard's calls
    // interleave with the other's.
    let proxy = FaultProxy::start(&kinesis.endpoint, |operation, n| {
        match (operation, n % 12) {
            ("GetRecords", 1..=6) => Some(Fault::Throttle),
            ("GetRecords", 7) => Some(Fault::ExpiredIterator),
            ("GetRecords", 8 | 9) => Some(Fault::ServerError),
            ("GetRecords", 10) => Some(Fault::Slow(Duration::from_millis(400))),
            ("GetShardIterator", n) if n % 4 == 1 => Some(Fault::ServerError),
            _ => None,
        }
    })
    .await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&proxy.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    // Records arrive in waves while the faults go on.
    let records = traffic(1_500, 30, 0);
    for wave in records.chunks(300) {
        put(&client, "events", wave).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let unique = |b: &Backend| {
        b.received()
            .iter()
            .map(|r| r.path.clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    wait_until(Duration::from_secs(120), "30 requests", || {
        unique(&backend) >= 30
    })
    .await;
    let log = daemon.stderr();
    assert!(daemon.stop().success());
    assert_eq!(backend.count(), 30, "a request was sent twice");
    let injected = proxy.injected();
    for kind in ["Throttle", "ExpiredIterator", "ServerError", "Slow"] {
        assert!(
            injected
                .iter()
                .any(|(_, f)| format!("{f:?}").starts_with(kind)),
            "no {kind} injected"
        );
    }
    assert!(
        log.contains("shard iterator expired; resuming from the last record read"),
        "{log}"
    );
    assert!(log.contains("Kinesis call failed; retrying"), "{log}");
    assert!(log.contains("GetRecords"), "{log}");
    assert!(ws.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_keeps_key_order_and_a_restart_mid_lineage_resumes() {
    let kinesis = Kinesalite::start();
    merge_keeps_key_order(&kinesis.endpoint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kinesis_mock_a_merge_keeps_key_order_and_a_restart_mid_lineage_resumes() {
    let kinesis = KinesisMock::start();
    merge_keeps_key_order(&kinesis.endpoint).await;
}

/// Two parents merged into one child while records keep coming, with a restart along the
/// way: every request once, each key's in order.
async fn merge_keeps_key_order(endpoint: &str) {
    let client = client_for(endpoint);
    create_stream(&client, "events", 2).await;
    // Two keys, one per parent shard (kinesalite routes by the MD5 of the key).
    let keys = shard_keys(&client, "events").await;
    let backend = Backend::with_behaviour(Duration::from_millis(20), |_, _| 200).await;
    let ws = Workspace::new(endpoint, "events", &backend.url);
    let wave = |from, to| key_wave(&keys, from, to);
    put(&client, "events", &wave(0, 40)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "a first call", || {
        backend.count() >= 5
    })
    .await;
    client
        .merge_shards()
        .stream_name("events")
        .shard_to_merge("shardId-000000000000")
        .adjacent_shard_to_merge("shardId-000000000001")
        .send()
        .await
        .unwrap();
    wait_active(&client, "events").await;
    put(&client, "events", &wave(40, 80)).await;
    // Stop while the parents may still be draining, and start again.
    wait_until(Duration::from_secs(60), "half", || backend.count() >= 80).await;
    assert!(daemon.stop().success());
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "all 160", || {
        backend.count() >= 160
    })
    .await;
    assert!(daemon.stop().success());

    let received = backend.received();
    assert_eq!(received.len(), 160, "lost or repeated requests");
    for k in 0..2 {
        let order = key_order(&received, k);
        assert_eq!(order, (0..80).collect::<Vec<_>>(), "key {k} out of order");
    }
    let (_, out, _) = ws.run(&[
        "checkpoints",
        "list",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    let checkpoints = json_lines(&out);
    assert_eq!(
        checkpoints
            .iter()
            .filter(|c| c["shard_end"] == true)
            .count(),
        2,
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_positions_apply_to_shards_without_a_checkpoint() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let request = |user: &str| {
        (
            "k".to_owned(),
            deletion(user, user).to_string().into_bytes(),
        )
    };
    put(&client, "events", &[request("early-user")]).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let between = gdpr_consumer::clock::rfc3339(gdpr_consumer::clock::now_ms() as i64);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    put(&client, "events", &[request("late-user")]).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();
    let keys = |args: &[&str]| -> Vec<String> {
        let (code, out, err) = ws.run(args);
        assert_eq!(code, 0, "{err}");
        json_lines(&out)
            .iter()
            .filter(|l| l["type"] == "action")
            .map(|l| l["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let dry = ["run", "--config", config, "--dry-run", "--output", "json"];
    assert_eq!(
        keys(&dry),
        ["early-user", "late-user"],
        "trim-horizon is the dry-run default"
    );
    assert_eq!(
        keys(&[&dry[..], &["--from", &between]].concat()),
        ["late-user"]
    );
    assert!(keys(&[&dry[..], &["--from", "latest"]].concat()).is_empty());

    // The daemon with `start = "latest"` sees only what comes after it starts...
    let text = std::fs::read_to_string(ws.config())
        .unwrap()
        .replace("start = \"trim-horizon\"", "start = \"latest\"");
    std::fs::write(ws.config(), text).unwrap();
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    put(&client, "events", &[request("after-start-user")]).await;
    wait_until(Duration::from_secs(30), "the new request", || {
        backend.count() >= 1
    })
    .await;
    assert!(daemon.stop().success());
    // ...and, once it has a checkpoint, resumes there whatever `start` says.
    put(&client, "events", &[request("while-stopped-user")]).await;
    let daemon = ws.start_daemon(&["--from", "latest"]);
    wait_until(
        Duration::from_secs(30),
        "the request written while stopped",
        || backend.count() >= 2,
    )
    .await;
    assert!(daemon.stop().success());
    let paths: Vec<String> = backend.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/users/after-start-user/anonymize",
            "/v1/users/while-stopped-user/anonymize"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_clear_fatal_error() {
    let kinesis = Kinesalite::start();
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "no-such-stream", &backend.url);
    let config = ws.config();
    let (code, _, err) =
        tokio::task::block_in_place(|| ws.run(&["run", "--config", config.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("stream no-such-stream") && err.contains("ResourceNotFoundException"),
        "{err}"
    );
}

/// The lineage suite on the second implementation of the Kinesis API: ListShards read page
/// by page, and UpdateShardCount (which kinesalite lacks) while records keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kinesis_mock_pages_and_update_shard_count_lose_nothing() {
    let kinesis = KinesisMock::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let keys = shard_keys(&client, "events").await;
    let backend = Backend::with_behaviour(Duration::from_millis(20), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = std::fs::read_to_string(ws.config())
        .unwrap()
        .replace("[stream]\n", "[stream]\nlist_shards_page_size = 1\n");
    std::fs::write(ws.config(), config).unwrap();
    let wave = |from, to| key_wave(&keys, from, to);
    put(&client, "events", &wave(0, 15)).await;
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "a first call", || {
        backend.count() >= 3
    })
    .await;
    client
        .update_shard_count()
        .stream_name("events")
        .target_shard_count(4)
        .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
        .send()
        .await
        .unwrap();
    wait_active(&client, "events").await;
    put(&client, "events", &wave(15, 30)).await;
    wait_until(Duration::from_secs(120), "all 60", || backend.count() >= 60).await;
    let log = daemon.stderr();
    assert!(daemon.stop().success());

    let received = backend.received();
    assert_eq!(received.len(), 60, "lost or repeated requests");
    for k in 0..2 {
        let order = key_order(&received, k);
        assert_eq!(order, (0..30).collect::<Vec<_>>(), "key {k} out of order");
    }
    // Six shards listed one per page: the two parents and their four children.
    let started = log.matches("starting shard").count();
    assert!(started >= 4, "{log}");
    let (_, out, _) = ws.run(&[
        "checkpoints",
        "list",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    assert_eq!(
        json_lines(&out)
            .iter()
            .filter(|c| c["shard_end"] == true)
            .count(),
        2,
        "{out}"
    );
}

/// Kinesis now takes records of up to 10 MiB; kinesalite refuses more than 1 MiB, so the
/// proxy swaps a small record for a 10 MiB one on its way to the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mib_record_is_handled() {
    use base64::Engine as _;
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let mut big = deletion("r-big", "big-user");
    big["padding"] = serde_json::json!("SWAP-ME");
    put(
        &client,
        "events",
        &[
            ("k".to_owned(), big.to_string().into_bytes()),
            (
                "k".to_owned(),
                deletion("r-after", "after-user").to_string().into_bytes(),
            ),
        ],
    )
    .await;
    let proxy = FaultProxy::with_rewrite(
        &kinesis.endpoint,
        |_, _| None,
        |operation, answer| {
            if operation != "GetRecords" {
                return;
            }
            for record in answer["Records"].as_array_mut().into_iter().flatten() {
                let b64 = base64::engine::general_purpose::STANDARD;
                let data = b64.decode(record["Data"].as_str().unwrap()).unwrap();
                let text = String::from_utf8(data).unwrap();
                if text.contains("SWAP-ME") {
                    let mut event: serde_json::Value = serde_json::from_str(&text).unwrap();
                    event["padding"] = serde_json::json!("x".repeat(10 * 1024 * 1024 - 200));
                    record["Data"] = serde_json::json!(b64.encode(event.to_string()));
                }
            }
        },
    )
    .await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&proxy.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "2 requests", || {
        backend.count() >= 2
    })
    .await;
    assert!(daemon.stop().success());
    let paths: Vec<String> = backend.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/users/big-user/anonymize",
            "/v1/users/after-user/anonymize"
        ]
    );
    assert!(ws.dead_letters().is_empty());
}

/// Requests `from..to` for each key (users `k{key index}-{n}`), key by key in turn.
fn key_wave(keys: &[String], from: usize, to: usize) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .flat_map(|n| {
            keys.iter().enumerate().map(move |(k, key)| {
                let user = format!("k{k}-{n}");
                (key.clone(), deletion(&user, &user).to_string().into_bytes())
            })
        })
        .collect()
}

/// The request numbers of key `k`, in the order the backend received them.
fn key_order(received: &[Received], k: usize) -> Vec<usize> {
    received
        .iter()
        .filter_map(|r| {
            let user = r
                .path
                .trim_start_matches("/v1/users/")
                .trim_end_matches("/anonymize");
            user.strip_prefix(&format!("k{k}-"))
                .map(|n| n.parse().unwrap())
        })
        .collect()
}
