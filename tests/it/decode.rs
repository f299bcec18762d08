//! Aggregated (KPL) and compressed records through the daemon: every request inside reaches
//! the backend once, what cannot be decoded is dead-lettered, and a stop inside an
//! aggregate resumes at the next sub-record.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::*;

/// Aggregates records with AWS's aws-kinesis-agg library (pinned in tools/kinesalite), as
/// the Kinesis Producer Library does: (partition key, aggregated bytes) per Kinesis record.
fn kpl_aggregate(records: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let input: Vec<Value> = records
        .iter()
        .map(|(key, data)| json!({"partitionKey": key, "data": String::from_utf8(data.clone()).unwrap()}))
        .collect();
    let mut child = Command::new("node")
        .arg(repo().join("tools/kinesalite/aggregate.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::Array(input).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let data = base64::engine::general_purpose::STANDARD
                .decode(v["data_base64"].as_str().unwrap())
                .unwrap();
            (v["partitionKey"].as_str().unwrap().to_owned(), data)
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn request(user: &str) -> (String, Vec<u8>) {
    (
        user.to_owned(),
        deletion(&format!("req-{user}"), user)
            .to_string()
            .into_bytes(),
    )
}

const CLOUDWATCH_RULE: &str = r#"// CloudWatch Logs subscription records: each log event's message may hold a request.
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.messageType != "DATA_MESSAGE" { return; }
    let out = [];
    for event in d.logEvents {
        let m = parse_json(event.message);
        if type_of(m) == "map" && m.type == "privacy_request" && m.client == "acme" {
            out.push(#{ action: "anonymize_user", key: m.request_id, params: #{ user_id: m.user_id } });
        }
    }
    out
}
"#;

fn users(backend: &Backend) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in backend.received() {
        let user = r
            .path
            .trim_start_matches("/v1/users/")
            .trim_end_matches("/anonymize")
            .to_owned();
        *seen.entry(user).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_and_compressed_requests_reach_the_backend_once() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;

    // KPL aggregates of mixed traffic with 12 requests inside, one of them in two aggregates.
    let mut inner: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 0..60 {
        inner.push(if n % 5 == 0 {
            request(&format!("kpl-user-{}", n / 5))
        } else {
            unrelated_event(n)
        });
    }
    let mut records = Vec::new();
    for chunk in inner.chunks(20) {
        records.extend(kpl_aggregate(chunk));
    }
    records.extend(kpl_aggregate(&[request("kpl-user-3"), unrelated_event(99)]));
    // gzip, zlib, and a CloudWatch Logs subscription record (gzip JSON).
    let (key, plain) = request("gzip-user");
    records.push((key, gzip(&plain)));
    let (key, plain) = request("zlib-user");
    records.push((key, zlib(&plain)));
    let message = deletion("req-cwl-user", "cwl-user").to_string();
    let logs = json!({"messageType": "DATA_MESSAGE", "owner": "123456789012", "logGroup": "/app/privacy",
        "logStream": "s", "subscriptionFilters": ["all"],
        "logEvents": [{"id": "1", "timestamp": 1, "message": "GET /health 200"}, {"id": "2", "timestamp": 2, "message": message}]});
    records.push(("cwl".to_owned(), gzip(logs.to_string().as_bytes())));
    // A decompression bomb and a damaged aggregate: dead letters, not losses, not crashes.
    let zeros = vec![0u8; 40 << 20];
    records.push(("bomb".to_owned(), gzip(&zeros)));
    let mut damaged = kpl_aggregate(&[request("lost-user")])[0].1.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    records.push(("damaged".to_owned(), damaged));
    records.push(request("after-user"));
    put(&client, "events", &records).await;

    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule("cloudwatch.rhai", CLOUDWATCH_RULE);
    let mut daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "16 requests", || {
        backend.count() >= 16
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    assert!(daemon.is_running());
    assert!(daemon.stop().success());

    let seen = users(&backend);
    let mut expected: Vec<String> = (0..12).map(|n| format!("kpl-user-{n}")).collect();
    expected.extend(["gzip-user", "zlib-user", "cwl-user", "after-user"].map(String::from));
    for user in &expected {
        assert_eq!(seen.get(user), Some(&1), "{user}: {seen:?}");
    }
    assert_eq!(seen.len(), expected.len(), "{seen:?}");

    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l["kind"] == "decode_failed"));
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("decompression bomb")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("malformed KPL aggregate")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_inside_an_aggregate_resumes_at_the_next_sub_record() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let inner: Vec<(String, Vec<u8>)> =
        (0..60).map(|n| request(&format!("agg-user-{n}"))).collect();
    let aggregated = kpl_aggregate(&inner);
    assert_eq!(aggregated.len(), 1, "one aggregate holds all 60");
    put(&client, "events", &aggregated).await;
    let backend = Backend::with_behaviour(Duration::from_millis(40), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();

    // A clean stop part way: the checkpoint points inside the aggregate.
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "10 requests", || {
        backend.count() >= 10
    })
    .await;
    assert!(daemon.stop().success());
    let (_, out, _) = ws.run(&["checkpoints", "list", "--config", config]);
    let checkpoint = &json_lines(&out)[0];
    let sub = checkpoint["sub_sequence_number"]
        .as_u64()
        .expect("a checkpoint inside the aggregate");
    assert_eq!(sub + 1, backend.count() as u64, "{checkpoint}");

    // A kill -9 part way, then a run to the end.
    let daemon = ws.start_daemon(&[]);
    let before = backend.count();
    wait_until(Duration::from_secs(30), "10 more", || {
        backend.count() >= before + 10
    })
    .await;
    drop(daemon);
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "all 60", || {
        users(&backend).len() >= 60
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.stop().success());

    let seen = users(&backend);
    assert_eq!(seen.len(), 60);
    let repeats: usize = seen.values().map(|n| n - 1).sum();
    assert!(
        repeats <= 1,
        "only the sub-record in flight at the kill may be sent twice: {seen:?}"
    );
}

/// JSON nested `depth` levels deep inside an event with these `tags`.
fn deep_event(request_id: &str, user_id: &str, tags: &str, depth: usize) -> Vec<u8> {
    format!(
        r#"{{"type":"privacy_request","tags":[{tags}],"client":"acme","request_id":"{request_id}","user_id":"{user_id}","extra":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_cannot_be_read_are_dead_letters_and_the_shard_moves_on() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let (key, plain) = request("truncated-user");
    let whole = gzip(&plain);
    let mut records = vec![
        // A request whose gzip was cut short: a dead letter, not an opaque blob.
        (key, whole[..whole.len() - 12].to_vec()),
        // A request too deep for the JSON parser, past the shipped rule's prefilter.
        (
            "deep".to_owned(),
            deep_event("req-deep", "deep-user", r#""GDPR","Delete User""#, 200),
        ),
        // Too deep, but no rule's prefilter lets it through: only counted.
        (
            "deep-other".to_owned(),
            deep_event("x-1", "other-user", r#""audit""#, 200),
        ),
    ];
    // JSON behind a BOM with a Latin-1 byte, and gzip with padding after it: read.
    // Two of those: the second is counted, but not logged again within the minute.
    for user in ["latin1-user", "latin1-user-2"] {
        let mut latin1 = b"\xEF\xBB\xBF".to_vec();
        latin1.extend(
            deletion(&format!("req-{user}"), user)
                .to_string()
                .as_bytes(),
        );
        latin1.truncate(latin1.len() - 1);
        latin1.extend(b",\"name\":\"Jos\xE9\"}");
        records.push(("latin1".to_owned(), latin1));
    }
    let (key, plain) = request("padded-user");
    records.push((key, [gzip(&plain), b"\n\0".to_vec()].concat()));
    // A request cut short (not JSON any more) that holds the prefilter's literal: a dead
    // letter. A log line that starts like JSON, with no rule's literal: not even parsed.
    let (key, plain) = request("cut-user");
    records.push((key, plain[..plain.len() - 3].to_vec()));
    records.push(("log".to_owned(), b"[INFO] cache warmed in 12 ms".to_vec()));
    put(&client, "events", &records).await;
    let (key, last) = request("after-user");
    let last_sequence = client
        .put_record()
        .stream_name("events")
        .partition_key(key)
        .data(aws_sdk_kinesis::primitives::Blob::new(last))
        .send()
        .await
        .unwrap()
        .sequence_number()
        .to_owned();

    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    wait_until(Duration::from_secs(60), "4 requests", || {
        backend.count() >= 4
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    let metrics = reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let log = daemon.stderr();
    assert!(daemon.stop().success());

    let seen = users(&backend);
    let expected = ["latin1-user", "latin1-user-2", "padded-user", "after-user"];
    for user in expected {
        assert_eq!(seen.get(user), Some(&1), "{user}: {seen:?}");
    }
    assert_eq!(seen.len(), expected.len(), "{seen:?}");

    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(
        letters.iter().all(|l| l["kind"] == "decode_failed"),
        "{letters:?}"
    );
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("gzip payload does not inflate")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("nests too deep")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("does not parse")),
        "{errors:?}"
    );

    // A retry reads the sealed record again, and it still cannot be read: it stays (and
    // the command says so with exit code 1).
    for letter in &letters {
        let id = letter["id"].as_u64().unwrap().to_string();
        let config = ws.config();
        let config = config.to_str().unwrap();
        let (code, out, err) = ws.run(&["dead-letters", "retry", "--config", config, "--id", &id]);
        assert_eq!(code, 1, "{out}{err}");
        let outcome = &json_lines(&out)[0];
        assert_eq!(outcome["outcome"], "still_failing", "{outcome}");
        assert_eq!(outcome["error"], letter["error"], "{outcome}");
    }
    assert_eq!(ws.dead_letters().len(), 3);
    assert_eq!(backend.count(), 4);

    // The shard moved on past both: its checkpoint is the last record.
    let config = ws.config();
    let (code, out, _) = ws.run(&["checkpoints", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(
        json_lines(&out)[0]["sequence_number"],
        last_sequence,
        "{out}"
    );

    // Counted by reason, the too-deep record no rule would see included; logged (but that
    // one) without payload.
    for (reason, count) in [
        ("damaged_compression", 1),
        ("json_too_deep", 2),
        ("json_invalid_utf8", 2),
        ("json_invalid", 1),
    ] {
        let line =
            format!("gdpr_consumer_undecodable_records_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    assert_eq!(log.matches("undecodable_record").count(), 4, "{log}");
    for user in [
        "truncated-user",
        "deep-user",
        "other-user",
        "latin1-user",
        "cut-user",
    ] {
        assert!(!log.contains(user), "{user} in the log:\n{log}");
    }
}

/// One event of a KPL aggregate whose compression is damaged is a dead letter of its own
/// (at its sub-sequence number); the aggregate's other requests are carried out. An
/// aggregate that comes compressed is inflated, then split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_event_in_an_aggregate_is_a_letter_of_its_own() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let requests: Vec<(String, Vec<u8>)> =
        (0..4).map(|n| request(&format!("agg-user-{n}"))).collect();
    let (cut_key, cut) = request("cut-user");
    let cut = zlib(&cut);
    let cut = &cut[..cut.len() - 4];
    let mut subs: Vec<(&str, &[u8])> = requests
        .iter()
        .map(|(k, d)| (k.as_str(), d.as_slice()))
        .collect();
    subs.insert(2, (cut_key.as_str(), cut));
    let with_damage = gdpr_consumer::decode::aggregate(&subs);
    let (k1, r1) = request("gz-agg-user-1");
    let (k2, r2) = request("gz-agg-user-2");
    let compressed = gzip(&gdpr_consumer::decode::aggregate(&[
        (k1.as_str(), r1.as_slice()),
        (k2.as_str(), r2.as_slice()),
    ]));
    put(
        &client,
        "events",
        &[
            ("agg".to_owned(), with_damage),
            ("gz-agg".to_owned(), compressed),
        ],
    )
    .await;

    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.run_until(&backend, 6).await;
    let seen = users(&backend);
    for n in 0..4 {
        assert_eq!(seen.get(&format!("agg-user-{n}")), Some(&1), "{seen:?}");
    }
    assert_eq!(seen.get("gz-agg-user-1"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("gz-agg-user-2"), Some(&1), "{seen:?}");
    assert_eq!(seen.len(), 6, "{seen:?}");
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["kind"], "decode_failed");
    assert_eq!(letters[0]["sub_sequence_number"], 2);
    assert!(letters[0]["error"]
        .as_str()
        .unwrap()
        .contains("sub-record 2"));
}
