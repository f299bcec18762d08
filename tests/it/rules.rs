//! Rules in the running daemon: hot reload that only installs a set that passes, and
//! hostile rules that cost their limit and nothing more.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use serde_json::{json, Value};

use crate::support::*;

fn vip(n: usize) -> Value {
    json!({"type": "vip_request", "request_id": format!("v-{n}"), "user_id": format!("vip-{n}")})
}

const VIP_V1: &str = r#"const PREFILTER = ["vip_request"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "vip_request" { return; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ user_id: d.user_id } }
}
"#;
const VIP_V1_TEST: &str = r#"[{"name": "vip", "record": {"data": {"type": "vip_request", "request_id": "v-0", "user_id": "vip-0"}},
  "expect": {"action": "anonymize_user", "key": "v-0", "params": {"user_id": "vip-0"}}}]"#;
const VIP_V2: &str = r#"const PREFILTER = ["vip_request"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "vip_request" { return; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ user_id: "edited-" + d.user_id } }
}
"#;
const VIP_V2_TEST: &str = r#"[{"name": "vip edited", "record": {"data": {"type": "vip_request", "request_id": "v-0", "user_id": "vip-0"}},
  "expect": {"action": "anonymize_user", "key": "v-0", "params": {"user_id": "edited-vip-0"}}}]"#;

/// Writes `records` and then a marker request, and waits until the marker reaches the
/// backend: on one shard, everything before it has been handled by then.
async fn phase(client: &Client, backend: &Backend, marker: &mut usize, records: &[Value]) {
    *marker += 1;
    let mut batch: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| ("k".to_owned(), r.to_string().into_bytes()))
        .collect();
    let user = format!("marker-{marker}");
    batch.push((
        "k".to_owned(),
        deletion(&user, &user).to_string().into_bytes(),
    ));
    put(client, "events", &batch).await;
    let path = format!("/v1/users/{user}/anonymize");
    wait_until(Duration::from_secs(30), &path.clone(), || {
        backend.received().iter().any(|r| r.path == path)
    })
    .await;
}

fn got(backend: &Backend, user: &str) -> bool {
    let path = format!("/v1/users/{user}/anonymize");
    backend.received().iter().any(|r| r.path == path)
}

/// Waits for the next reload outcome in the log and returns the log from that line on.
async fn next_reload(daemon: &Daemon, seen: &mut usize) -> String {
    let outcomes = |log: &str| {
        log.matches("rules reloaded").count() + log.matches("rules reload refused").count()
    };
    wait_until(Duration::from_secs(30), "a reload", || {
        outcomes(&daemon.stderr()) > *seen
    })
    .await;
    // Let a reload that the same edit triggered twice settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = daemon.stderr();
    *seen = outcomes(&log);
    let last = log
        .rfind("rules reloaded")
        .max(log.rfind("rules reload refused"))
        .unwrap();
    let start = log[..last].rfind('\n').map_or(0, |i| i + 1);
    log[start..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_installs_only_rule_sets_that_pass() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    let mut marker = 0;
    let mut reloads = 0;

    phase(&client, &backend, &mut marker, &[vip(1)]).await;
    assert!(!got(&backend, "vip-1"), "no rule matches VIP requests yet");

    // A new rule file starts matching new records.
    ws.write_rule("vip.test.json", VIP_V1_TEST);
    ws.write_rule("vip.rhai", VIP_V1);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(2)]).await;
    assert!(got(&backend, "vip-2"));

    // An edited rule changes behaviour.
    ws.write_rule("vip.rhai", VIP_V2);
    ws.write_rule("vip.test.json", VIP_V2_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(3)]).await;
    assert!(got(&backend, "edited-vip-3"));

    // A syntax error leaves the old set running, reported with file:line.
    ws.write_rule("vip.rhai", "fn decide(record) {\n    let x = ;\n}\n");
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(
        outcome.contains("rules reload refused") && outcome.contains("stale"),
        "{outcome}"
    );
    assert!(outcome.contains("vip.rhai:2:"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(4)]).await;
    assert!(
        got(&backend, "edited-vip-4"),
        "the previous rules must keep running"
    );

    // A failing test case too.
    ws.write_rule("vip.rhai", VIP_V1);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reload refused"), "{outcome}");
    assert!(
        outcome.contains("test failed: vip / vip edited"),
        "{outcome}"
    );
    phase(&client, &backend, &mut marker, &[vip(5)]).await;
    assert!(got(&backend, "edited-vip-5"));

    // A later good edit loads.
    ws.write_rule("vip.test.json", VIP_V1_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(6)]).await;
    assert!(got(&backend, "vip-6"));

    // Deleting the file removes the rule.
    std::fs::remove_file(ws.path("rules/vip.rhai")).unwrap();
    std::fs::remove_file(ws.path("rules/vip.test.json")).unwrap();
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(7)]).await;
    assert!(!got(&backend, "vip-7"));

    // SIGHUP reloads too.
    daemon.signal("HUP");
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("cause=SIGHUP"), "{outcome}");

    assert!(daemon.stop().success());
    assert!(ws.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rules_cost_their_limit_and_nothing_more() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule(
        "hostile.rhai",
        r#"fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" { return; }
    switch d.attack {
        "loop" => { let n = 0; loop { n += 1; } }
        "recursion" => { return deep(1); }
        "big_string" => { let s = "x"; loop { s += s; } }
        "big_array" => { let a = []; loop { a.push(a.len()); } }
    }
}
fn deep(n) { deep(n + 1) }
"#,
    );
    let attacks = ["loop", "recursion", "big_string", "big_array"];
    let mut records = Vec::new();
    for (n, attack) in attacks.iter().enumerate() {
        // Each attack rides on a real deletion request: the other rule must still handle it.
        let mut request = deletion(&format!("r-{n}"), &format!("del-user-{n}"));
        request["attack"] = json!(attack);
        records.push(("k".to_owned(), request.to_string().into_bytes()));
        records.push(unrelated_event(n));
    }
    put(&client, "events", &records).await;
    let mut daemon = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(60), "4 requests", || {
        backend.count() >= 4
    })
    .await;
    wait_until(Duration::from_secs(30), "caught up", || {
        caught_up_count(&daemon.stderr()) >= 1
    })
    .await;
    assert!(daemon.is_running());
    assert!(daemon.stop().success());

    assert_eq!(backend.count(), 4);
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 4, "{letters:?}");
    assert!(letters
        .iter()
        .all(|l| l["rule"] == "hostile" && l["kind"] == "rule_failed"));
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    // In clear: where and what kind (the full message is sealed with the record).
    assert!(
        errors.iter().all(|e| e.contains("hostile.rhai: ")),
        "{errors:?}"
    );
    let all = errors.join("\n");
    for expected in [
        "too many operations",
        "call stack overflow",
        "data too large",
    ] {
        assert!(all.contains(expected), "{expected}: {errors:?}");
    }
}

/// A rule that vanished by mistake is named or refuses the set; it is never skipped quietly.
#[test]
fn rules_check_names_look_alikes_and_refuses_a_dangling_link() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    let rules = ws.path("rules");
    std::fs::rename(
        rules.join("ccpa_delete.rhai"),
        rules.join("ccpa_delete.RHAI"),
    )
    .unwrap();
    std::fs::create_dir(rules.join("moved.rhai")).unwrap();
    // Saved by a Windows editor: a byte-order mark first.
    ws.write_rule("bom.rhai", "\u{feff}fn decide(record) { () }\n");
    let (code, out, _) = ws.run(&["rules", "check", "--rules-dir", "rules"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  bom: "), "{out}");
    assert!(
        out.contains("ccpa_delete.RHAI: ignored: the extension must be `.rhai`"),
        "{out}"
    );
    assert!(
        out.contains("moved.rhai: ignored: a directory, not a rule file"),
        "{out}"
    );

    std::os::unix::fs::symlink(ws.path("elsewhere/gone.rhai"), rules.join("linked.rhai")).unwrap();
    let (code, out, _) = ws.run(&["rules", "check", "--rules-dir", "rules"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("linked.rhai: a symbolic link to nothing"),
        "{out}"
    );
}

/// Copies the shipped rules and their tests into `dir`.
fn copy_shipped(dir: &std::path::Path) {
    for entry in std::fs::read_dir(repo().join("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn write_vip(dir: &std::path::Path, rule: &str, test: &str) {
    std::fs::write(dir.join("vip.test.json"), test).unwrap();
    std::fs::write(dir.join("vip.rhai"), rule).unwrap();
}

/// A deploy that replaces the directory (`rm -rf rules; mkdir rules; ...`) reloads, and so do
/// the edits after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_survives_a_replaced_rules_directory() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    let (mut marker, mut reloads) = (0, 0);
    phase(&client, &backend, &mut marker, &[]).await;

    let rules = ws.path("rules");
    std::fs::remove_dir_all(&rules).unwrap();
    std::fs::create_dir(&rules).unwrap();
    copy_shipped(&rules);
    write_vip(&rules, VIP_V1, VIP_V1_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(1)]).await;
    assert!(got(&backend, "vip-1"));

    // The edit after the deploy is seen too.
    write_vip(&rules, VIP_V2, VIP_V2_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(2)]).await;
    assert!(got(&backend, "edited-vip-2"));
    assert!(daemon.stop().success());
}

/// A symlinked rules directory swapped by `ln -sfn` or by a rename over it reloads; edits in
/// the new target are seen, after a SIGHUP too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_follows_a_swapped_symlink() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let rules = ws.path("rules");
    std::fs::rename(&rules, ws.path("release-1")).unwrap();
    std::os::unix::fs::symlink("release-1", &rules).unwrap();
    let daemon = ws.start_daemon(&[]);
    let (mut marker, mut reloads) = (0, 0);
    phase(&client, &backend, &mut marker, &[]).await;

    // ln -sfn release-2 rules
    std::fs::create_dir(ws.path("release-2")).unwrap();
    copy_shipped(&ws.path("release-2"));
    write_vip(&ws.path("release-2"), VIP_V1, VIP_V1_TEST);
    let status = std::process::Command::new("ln")
        .args(["-sfn", "release-2", "rules"])
        .current_dir(ws.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(1)]).await;
    assert!(got(&backend, "vip-1"));

    // An edit in the new target.
    write_vip(&rules, VIP_V2, VIP_V2_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(2)]).await;
    assert!(got(&backend, "edited-vip-2"));

    // A new link renamed over the old one.
    std::fs::create_dir(ws.path("release-3")).unwrap();
    copy_shipped(&ws.path("release-3"));
    write_vip(&ws.path("release-3"), VIP_V1, VIP_V1_TEST);
    std::os::unix::fs::symlink("release-3", ws.path("rules.new")).unwrap();
    std::fs::rename(ws.path("rules.new"), &rules).unwrap();
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(3)]).await;
    assert!(got(&backend, "vip-3"));

    // After a SIGHUP, edits are still seen.
    daemon.signal("HUP");
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("cause=SIGHUP"), "{outcome}");
    write_vip(&rules, VIP_V2, VIP_V2_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(4)]).await;
    assert!(got(&backend, "edited-vip-4"));
    assert!(daemon.stop().success());
}

async fn http_get(address: &str, path: &str) -> String {
    reqwest::get(format!("http://{address}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// When the directory cannot be watched, the daemon says so (log, metric, stale status)
/// and watches it again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_watch_is_reported_and_recovered() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_metrics();
    let rules = ws.path("rules");
    std::fs::rename(&rules, ws.path("release-1")).unwrap();
    std::os::unix::fs::symlink("release-1", &rules).unwrap();
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    let (mut marker, mut reloads) = (0, 0);
    phase(&client, &backend, &mut marker, &[]).await;
    let status = |address: String| async move {
        serde_json::from_str::<Value>(&http_get(&address, "/status").await).unwrap()
    };
    assert_eq!(status(address.clone()).await["rules"]["stale"], false);

    // The link's target disappears: nothing left to watch.
    std::fs::remove_dir_all(ws.path("release-1")).unwrap();
    wait_until(Duration::from_secs(30), "the lost watch logged", || {
        daemon.stderr().contains("rules_watch_lost")
    })
    .await;
    let metrics = http_get(&address, "/metrics").await;
    assert!(
        metrics.contains("gdpr_consumer_rules_watch_lost 1\n"),
        "{metrics}"
    );
    let now = status(address.clone()).await;
    assert_eq!(now["rules"]["stale"], true, "{now}");
    assert!(
        now["rules"]["last_error"]
            .as_str()
            .unwrap()
            .contains("release-1")
            || now["rules"]["last_error"]
                .as_str()
                .unwrap()
                .contains("rules"),
        "{now}"
    );

    // Back, with a new rule: watched and loaded again, and edits are seen.
    std::fs::create_dir(ws.path("release-1")).unwrap();
    copy_shipped(&ws.path("release-1"));
    write_vip(&ws.path("release-1"), VIP_V1, VIP_V1_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    let outcome = if outcome.contains("refused") {
        next_reload(&daemon, &mut reloads).await
    } else {
        outcome
    };
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    assert!(daemon
        .stderr()
        .contains("watching the rules directory again"));
    let metrics = http_get(&address, "/metrics").await;
    assert!(
        metrics.contains("gdpr_consumer_rules_watch_lost 0\n"),
        "{metrics}"
    );
    assert_eq!(status(address.clone()).await["rules"]["stale"], false);
    write_vip(&rules, VIP_V2, VIP_V2_TEST);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    phase(&client, &backend, &mut marker, &[vip(1)]).await;
    assert!(got(&backend, "edited-vip-1"));
    assert!(daemon.stop().success());
}

/// A rule whose requests the config cannot send (the URL needs `{user_id}`).
const NAME_ONLY: &str = r#"fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "name_request" { return; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ name: d.name } }
}
"#;
const NAME_ONLY_TEST: &str = r#"[{"name": "by name", "record": {"data": {"type": "name_request", "request_id": "n-0", "name": "jo"}},
  "expect": {"action": "anonymize_user", "key": "n-0", "params": {"name": "jo"}}}]"#;

/// Test cases that expect a request the config cannot send refuse the rules: in `rules test
/// --config` and at `run` start.
#[test]
fn cases_expecting_unsendable_decisions_are_refused_with_the_config() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    ws.write_rule("name_only.rhai", NAME_ONLY);
    ws.write_rule("name_only.test.json", NAME_ONLY_TEST);
    let config = ws.config();
    let config = config.to_str().unwrap();

    // Without a config, any action goes.
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", "rules"]);
    assert_eq!(code, 0, "{out}");

    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", "rules", "--config", config]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("name_only.test.json: case \"by name\" expects a decision the configured actions cannot send: decision for action \"anonymize_user\": param \"user_id\" is missing (the URL needs it)"),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" passed, 1 failed"), "{out}");

    let (code, _, err) = ws.run(&["run", "--config", config]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("name_only.test.json: case \"by name\" expects a decision the configured actions cannot send: decision for action \"anonymize_user\": param \"user_id\" is missing"),
        "{err}"
    );
}

/// On reload too; and a decision that cannot be sent live (no case covered it) is a dead
/// letter whose error names the missing param.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_decisions_refuse_a_reload_and_name_the_param_live() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let daemon = ws.start_daemon(&[]);
    let (mut marker, mut reloads) = (0, 0);
    phase(&client, &backend, &mut marker, &[]).await;

    ws.write_rule("name_only.test.json", NAME_ONLY_TEST);
    ws.write_rule("name_only.rhai", NAME_ONLY);
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reload refused"), "{outcome}");
    assert!(
        outcome.contains("name_only.test.json: case") && outcome.contains("user_id"),
        "{outcome}"
    );

    // Its cases no longer cover the request: it loads, and fails live.
    ws.write_rule(
        "name_only.test.json",
        r#"[{"name": "not mine", "record": {"data": {"type": "order"}}, "expect": null}]"#,
    );
    let outcome = next_reload(&daemon, &mut reloads).await;
    assert!(outcome.contains("rules reloaded"), "{outcome}");
    let request = json!({"type": "name_request", "request_id": "n-1", "name": "jo"});
    phase(&client, &backend, &mut marker, &[request]).await;
    assert!(daemon.stop().success());
    let letters = ws.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0]["error"].as_str().unwrap();
    assert!(
        error.contains("name_only.rhai: decision cannot be sent")
            && error.contains("param \"user_id\" is missing"),
        "{error}"
    );
    assert!(!error.contains("jo"), "{error}");
}
