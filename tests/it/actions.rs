//! Actions that never lose a request: an outage and its recovery, crashes, the privacy of
//! the state, injection, and an operator's retry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_ends_with_every_request_done_and_no_dead_letter_left() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    put(&client, "events", &traffic(400, 20, 0)).await;
    // The backend's port, closed for now: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ws = Workspace::new(
        &kinesis.endpoint,
        "events",
        &format!("http://127.0.0.1:{port}"),
    );
    ws.edit_config(
        "[state]\n",
        "[state]\ndead_letter_retry_interval_ms = 1000\n",
    );
    ws.with_metrics();
    let config = std::fs::read_to_string(ws.config())
        .unwrap()
        .replace("timeout_ms = 5000", "timeout_ms = 300");
    std::fs::write(ws.config(), config).unwrap();

    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    // 1. Refused connections: every request becomes a dead letter, and the shards move on.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(&address).await;
        if m.get("gdpr_consumer_dead_letters_pending") == Some(&20.0)
            && caught_up_count(&daemon.stderr()) >= 2
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. The backend comes up but answers 503 with Retry-After, 3. then stalls past the
    // timeout, 4. then recovers.
    let mode = Arc::new(AtomicU8::new(0));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let backend = {
        let mode = mode.clone();
        Backend::serve(listener, move |_, _| match mode.load(Ordering::SeqCst) {
            0 => Reply {
                status: 503,
                retry_after_s: Some(1),
                delay: Duration::ZERO,
            },
            1 => Reply {
                status: 200,
                retry_after_s: None,
                delay: Duration::from_secs(2),
            },
            _ => 200.into(),
        })
    };
    wait_until(Duration::from_secs(30), "503 answers", || {
        backend.count() >= 5
    })
    .await;
    mode.store(1, Ordering::SeqCst);
    let seen = backend.count();
    wait_until(Duration::from_secs(30), "timed-out attempts", || {
        backend.count() >= seen + 3
    })
    .await;
    let m = metrics(&address).await;
    assert_eq!(
        m["gdpr_consumer_dead_letters_pending"], 20.0,
        "nothing settles while the backend fails"
    );
    mode.store(2, Ordering::SeqCst);

    // The dead letters drain on their own.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metrics(&address).await["gdpr_consumer_dead_letters_pending"] != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters did not drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(daemon.stop().success());

    let config = ws.config();
    let (_, out, _) = ws.run(&["state", "--config", config.to_str().unwrap()]);
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["dedup_entries"], 20,
        "every request done: {summary}"
    );
    assert_eq!(summary["dead_letters_pending"], 0);
    let users: HashSet<String> = backend.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(users.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_repeats_only_what_was_in_flight() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 4).await;
    put(&client, "events", &traffic(2_000, 100, 0)).await;
    // Slow enough that the kills land while requests are still being sent.
    let backend = Backend::with_behaviour(Duration::from_millis(100), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);

    let unique = |backend: &Backend| {
        backend
            .received()
            .iter()
            .map(|r| r.path.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    let mut kills = 0;
    let mut seed: u64 = 0x5eed;
    while kills < 12 && unique(&backend) < 100 {
        let daemon = ws.start_daemon(&[]);
        // A pseudo-random point in the run.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = 100 + (seed >> 33) % 300;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        drop(daemon); // SIGKILL
        kills += 1;
    }
    assert!(
        kills >= 10,
        "the run ended before 10 kills ({kills}); make it slower"
    );

    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(120), "all 100 requests", || {
        unique(&backend) >= 100
    })
    .await;
    wait_until(Duration::from_secs(60), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 4
    })
    .await;
    assert!(daemon.stop().success());

    let received = backend.received();
    let mut per_request: HashMap<&str, Vec<&Received>> = HashMap::new();
    for r in &received {
        per_request.entry(&r.path).or_default().push(r);
    }
    assert_eq!(per_request.len(), 100, "a request was lost");
    let repeats: usize = per_request.values().map(|v| v.len() - 1).sum();
    // At most one request per shard is in flight when a kill lands.
    assert!(repeats <= kills * 4, "{repeats} repeats for {kills} kills");
    for sent in per_request.values() {
        assert!(sent
            .iter()
            .all(|r| r.idempotency_key == sent[0].idempotency_key));
    }
    eprintln!("{kills} kills, {repeats} requests sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_and_the_audit_trail_hold_no_identifier() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 2).await;
    let secrets: Vec<(String, String)> = (0..8)
        .map(|n| (format!("PII-USER-{n}-x9"), format!("PII-REQ-{n}-y8")))
        .collect();
    let email = "someone.private@example.org";
    let mut records = Vec::new();
    for (user, request) in &secrets {
        let mut event = deletion(request, user);
        event["email"] = json!(email);
        records.push((user.clone(), event.to_string().into_bytes()));
    }
    // A rule throws on this one (its record is kept, sealed).
    records.push((
        secrets[0].0.clone(),
        json!({"type": "order", "total_cents": 1, "order_id": secrets[0].1, "email": email})
            .to_string()
            .into_bytes(),
    ));
    put(&client, "events", &records).await;
    // PII-USER-7 is refused (its decision is kept, sealed).
    let backend = Backend::refusing("PII-USER-7", 422).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule(
        "zz_throws.rhai",
        "fn decide(record) {\n    let d = record.data;\n    if type_of(d) == \"map\" && d.type == \"order\" { throw \"bad order \" + d.order_id + \" of \" + d.email; }\n}\n",
    );
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "8 calls", || backend.count() >= 8).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 2
    })
    .await;
    assert!(daemon.stop().success());

    let config = ws.config();
    let config = config.to_str().unwrap();
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let raw = std::fs::read(ws.path("state.redb")).unwrap();
    let (_, jsonl, _) = ws.run(&["audit", "export", "--config", config]);
    let (_, csv, _) = ws.run(&["audit", "export", "--config", config, "--format", "csv"]);
    let listed: String = letters.iter().map(|l| l.to_string()).collect();
    for (user, request) in &secrets {
        for secret in [user.as_str(), request.as_str(), email] {
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the state file holds {secret}"
            );
            assert!(
                !jsonl.contains(secret) && !csv.contains(secret),
                "the audit export holds {secret}"
            );
            assert!(!listed.contains(secret), "dead-letters list shows {secret}");
        }
    }
    let audit = json_lines(&jsonl);
    // 8 decisions, and each of the 7 requests done is complete (one action each).
    assert_eq!(audit.len(), 15, "{jsonl}");
    assert_eq!(audit.iter().filter(|e| e["outcome"] == "done").count(), 7);
    assert_eq!(
        audit.iter().filter(|e| e["outcome"] == "complete").count(),
        7
    );
    let refused = audit
        .iter()
        .find(|e| e["outcome"] == "dead_lettered")
        .unwrap();
    assert_eq!(refused["http_status"], 422);
    assert_eq!(refused["regulation"], "GDPR");
    assert_eq!(refused["rule"], "acme_gdpr_delete_user");
    assert!(refused["due_date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(csv.lines().count(), 16);
    assert!(csv.starts_with("time,rule,rules_hash,action,request_id,outcome,"));

    // The lookup hashes the key it is given and finds the request.
    let (code, out, err) = ws.run(&[
        "audit",
        "lookup",
        "--config",
        config,
        "--action",
        "anonymize_user",
        "--key",
        &secrets[3].1,
    ]);
    assert_eq!(code, 0, "{err}");
    let found = json_lines(&out);
    assert_eq!(found[0]["outcome"], "done");
    assert_eq!(found.last().unwrap()["done"], true);
    let (code, _, _) = ws.run(&[
        "audit",
        "lookup",
        "--config",
        config,
        "--action",
        "anonymize_user",
        "--key",
        "never-seen",
    ]);
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_waits_for_an_operator_and_retry_completes_it() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(60, 3, 0)).await;
    let (backend, fixed) = Backend::refusing_until_fixed().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.edit_config(
        "[state]\n",
        "[state]\ndead_letter_retry_interval_ms = 1000\n",
    );
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "3 calls", || backend.count() >= 3).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    // No retry storm: the daemon's own retries leave refusals alone.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(daemon.stop().success());
    assert_eq!(
        backend.count(),
        3,
        "a refusal was retried without an operator"
    );
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 2);
    assert!(letters
        .iter()
        .all(|l| l["retryable"] == false && l["http_status"] == 400));

    // The backend is fixed; the operator retries one and discards the other.
    fixed.store(true, Ordering::SeqCst);
    let config = ws.config();
    let config = config.to_str().unwrap();
    let first = letters[0]["id"].as_u64().unwrap().to_string();
    let second = letters[1]["id"].as_u64().unwrap().to_string();
    let (code, out, err) = tokio::task::block_in_place(|| {
        ws.run(&["dead-letters", "retry", "--config", config, "--id", &first])
    });
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_lines(&out)[0]["outcome"], "resolved");
    assert_eq!(backend.count(), 4);
    let (code, _, err) = ws.run(&[
        "dead-letters",
        "discard",
        "--config",
        config,
        "--id",
        &second,
        "--reason",
        "user re-activated the account",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(ws.dead_letters().is_empty());

    let (_, jsonl, _) = ws.run(&["audit", "export", "--config", config]);
    let audit = json_lines(&jsonl);
    let outcomes: Vec<&str> = audit
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "done",
            "complete",
            "dead_lettered",
            "dead_lettered",
            "done",
            "complete",
            "discarded"
        ],
        "{jsonl}"
    );
    assert_eq!(audit[4]["request_id"], letters[0]["request_id"]);
    assert_eq!(audit[6]["note"], "user re-activated the account");
    // A time window.
    let (_, none, _) = ws.run(&[
        "audit",
        "export",
        "--config",
        config,
        "--until",
        "2000-01-01T00:00:00Z",
    ]);
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_cannot_escape_their_place_and_headers_cannot_be_injected() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let tricky = ["../admin?x=1#", "line\nbreak", "ok"];
    let records: Vec<(String, Vec<u8>)> = tricky
        .iter()
        .enumerate()
        .map(|(n, user)| {
            (
                "k".to_owned(),
                deletion(&format!("r-{n}"), user).to_string().into_bytes(),
            )
        })
        .collect();
    put(&client, "events", &records).await;
    let backend = Backend::refusing("/ok/", 404).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    // A body template, a fixed header, HMAC signing, and 404 meaning "already gone".
    let config = std::fs::read_to_string(ws.config()).unwrap().replace(
        "timeout_ms = 5000\n",
        "timeout_ms = 5000\nbody = '{\"subject\": \"{user_id}\", \"reason\": \"erasure of {user_id}\"}'\nheaders = { \"X-Client\" = \"acme\" }\nsigning_secret_env = \"SIGNING_SECRET\"\nsuccess_statuses = [404]\n",
    );
    std::fs::write(ws.config(), &config).unwrap();
    let daemon = ws.start_daemon_with_env(&[], &[("SIGNING_SECRET", "s3cret")]);
    wait_until(Duration::from_secs(30), "3 calls", || backend.count() >= 3).await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.stop().success());

    let received = backend.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/users/..%2Fadmin%3Fx%3D1%23/anonymize",
            "/v1/users/line%0Abreak/anonymize",
            "/v1/users/ok/anonymize"
        ]
    );
    let first = &received[0];
    let body: Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(
        body,
        json!({"subject": "../admin?x=1#", "reason": "erasure of ../admin?x=1#"})
    );
    let second: Value = serde_json::from_str(&received[1].body).unwrap();
    assert_eq!(second["subject"], "line\nbreak");
    assert_eq!(first.headers["x-client"], "acme");
    // The signature checks out with the shared secret.
    use hmac::{Hmac, Mac};
    let timestamp = &first.headers["x-signature-timestamp"];
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{timestamp}\nPOST\n{}\n{}", first.path, first.body).as_bytes());
    assert_eq!(
        first.headers["x-signature"],
        hex::encode(mac.finalize().into_bytes())
    );
    // 404 counts as done: no dead letter.
    assert!(ws.dead_letters().is_empty());

    // A header value with CR/LF is refused at start.
    let evil = config.replace(
        "\"X-Client\" = \"acme\"",
        "\"X-Client\" = \"acme\\r\\nX-Injected: 1\"",
    );
    std::fs::write(ws.config(), evil).unwrap();
    let (code, _, err) = ws.run(&["run", "--config", ws.config().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("control character"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_rate_limits_hold_across_shards() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 4).await;
    put(&client, "events", &traffic(400, 12, 0)).await;
    let backend = Backend::with_behaviour(Duration::from_millis(30), |_, _| 200).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = std::fs::read_to_string(ws.config()).unwrap().replace(
        "timeout_ms = 5000\n",
        "timeout_ms = 5000\nconcurrency = 1\nrate_limit_per_second = 10\n",
    );
    std::fs::write(ws.config(), config).unwrap();
    let started = std::time::Instant::now();
    let daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "12 calls", || {
        backend.count() >= 12
    })
    .await;
    let took = started.elapsed();
    assert!(daemon.stop().success());
    // Four shards want to call at once; the action lets one through at a time...
    assert_eq!(backend.max_in_flight(), 1);
    // ...and at most 10 a second: 12 calls need at least 1.1 s.
    assert!(took >= Duration::from_millis(1_100), "{took:?}");
}

/// Denying a request settles what waits for it: its dead letter is resolved (audited, by
/// the operator) and nothing is sent for it again, even when its records are read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_s_dead_letter_is_settled_and_nothing_more_is_sent() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::with_behaviour(Duration::ZERO, |_, _| 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let config = ws.config();
    let config = config.to_str().unwrap();
    put(&client, "events", &traffic(10, 1, 0)).await;
    ws.run_until(&backend, 1).await;
    assert_eq!(ws.dead_letters().len(), 1);

    let (code, out, err) = ws.run(&[
        "requests",
        "deny",
        "--key",
        "r-0",
        "--reason-code",
        "no_match",
        "--note",
        "no such account",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(ws.dead_letters().is_empty(), "{:?}", ws.dead_letters());
    let (_, out, _) = ws.run(&[
        "requests", "show", "--key", "r-0", "--format", "json", "--config", config,
    ]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["status"], "denied", "{shown:#}");
    assert_eq!(shown["denial"]["code"], "no_match", "{shown:#}");
    assert_eq!(
        shown["actions"]["anonymize_user"]["status"], "denied",
        "{shown:#}"
    );

    // Read again from the start: denied, not sent.
    let (code, _, err) = ws.run(&["checkpoints", "reset", "--all", "--config", config]);
    assert_eq!(code, 0, "{err}");
    ws.run_until(&backend, 1).await;
    assert_eq!(backend.count(), 1, "a denied request was sent");
    let (_, jsonl, _) = ws.run(&["audit", "export", "--config", config]);
    let audit = json_lines(&jsonl);
    let outcomes: Vec<&str> = audit
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["dead_lettered", "denied", "resolved", "denied"],
        "{jsonl}"
    );
    assert_eq!(audit[1]["denial_code"], "no_match");
    assert_eq!(audit[1]["note"], "no such account");
    assert!(
        audit[1]["by"].as_str().unwrap().starts_with("cli:"),
        "{jsonl}"
    );
    assert_eq!(audit[2]["by"], audit[1]["by"]);
    assert_eq!(audit[3]["action"], "anonymize_user", "{jsonl}");
}
