//! The web console for compliance staff, through the binary a user runs: driven in headless
//! Chromium over WebDriver (log in, look a request up, repair dead letters, pause and resume
//! an action, download an export; each change audited as `by: console`), and its refusals
//! checked over plain HTTP (no auth, no CSRF token, a guessed token).
//!
//! With `UPDATE_SCREENSHOTS=1` the browser test saves its pages to `docs/console/` for the
//! README; otherwise into a tempdir.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const CONSOLE_TOKEN: &str = "console-token-5d2e81";
/// A request id that appears nowhere else, so the page can be searched for it.
const LOOKUP_KEY: &str = "lookup-req-q7v3k9";
const REASON: &str = "user re-activated the account";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_through_the_console_in_chromium() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let (backend, fixed) = Backend::refusing_until_fixed().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_console();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));
    let daemon = ws.start_daemon_with_env(&[], &[("CONSOLE_TOKEN", CONSOLE_TOKEN)]);
    let console = format!("http://{}", console_address(&daemon).await);

    // r-0 and the lookup request are done; r-1 and r-2 refused: two dead letters.
    let mut records = traffic(30, 3, 0);
    let lookup = deletion(LOOKUP_KEY, "del-user-0-lookup");
    records.push(("lookup".into(), lookup.to_string().into_bytes()));
    put(&client, "events", &records).await;
    wait_until(Duration::from_secs(30), "4 backend calls", || {
        backend.count() >= 4
    })
    .await;
    wait_until(Duration::from_secs(30), "2 dead letters", || {
        let (_, out, _) = ws.run(&["dead-letters", "list", "--config", config]);
        json_lines(&out).len() == 2
    })
    .await;

    // Logging in: nothing shows before, nor with a wrong token.
    let browser = Browser::start().await;
    browser.goto(&format!("{console}/requests")).await;
    browser.wait_for("#login #token").await;
    assert_eq!(browser.path().await, "/login");
    browser.screenshot("login").await;
    browser.fill("#token", "not-the-token").await;
    browser.submit("#login-submit").await;
    let error = browser.wait_for("#error").await.text().await.unwrap();
    assert!(!error.is_empty());
    assert_eq!(browser.path().await, "/login");
    assert!(!browser.exists("#shards").await);
    assert!(!browser.source().await.contains("shardId-"));
    assert!(
        browser.client.get_named_cookie("gc_session").await.is_err(),
        "a wrong token got a session"
    );
    browser.fill("#token", CONSOLE_TOKEN).await;
    browser.submit("#login-submit").await;
    browser.wait_for("#shards").await;
    assert_eq!(browser.path().await, "/");
    let session = browser.client.get_named_cookie("gc_session").await.unwrap();
    assert_eq!(session.http_only(), Some(true));
    let shards = browser.text("#shards").await;
    assert!(shards.contains("shardId-000000000000"), "{shards}");
    assert_eq!(browser.text("#dead-letters-pending").await.trim(), "2");
    assert!(browser.exists("#health").await && browser.exists("#rules").await);
    browser.screenshot("overview").await;

    // Looking a done request up: its outcome and id hash, never its key.
    browser.goto(&format!("{console}/requests")).await;
    browser.wait_for("#lookup").await;
    browser
        .select("#lookup select[name=action]", "anonymize_user")
        .await;
    browser.fill("#lookup input[name=key]", LOOKUP_KEY).await;
    browser.submit("#lookup button").await;
    let result = browser
        .wait_for("#lookup-result")
        .await
        .text()
        .await
        .unwrap();
    assert!(result.contains("done"), "{result}");
    let (code, out, err) = run(&[
        "audit",
        "lookup",
        "--config",
        config,
        "--action",
        "anonymize_user",
        "--key",
        LOOKUP_KEY,
    ]);
    assert_eq!(code, 0, "{err}");
    let hash = json_lines(&out)[0]["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let source = browser.source().await;
    assert!(source.contains(&hash), "the request id hash is not shown");
    assert!(!source.contains(LOOKUP_KEY), "the key is echoed: {source}");
    assert!(!source.contains("del-user-0-lookup"), "a param is shown");
    browser.screenshot("requests").await;
    browser
        .select("#lookup select[name=action]", "anonymize_user")
        .await;
    browser
        .fill("#lookup input[name=key]", "no-such-request")
        .await;
    browser.submit("#lookup button").await;
    browser.wait_for("#lookup-none").await;
    assert!(!browser.exists("#lookup-result").await);

    // Dead letters: retry one, discard the other with a reason.
    browser.goto(&format!("{console}/dead-letters")).await;
    browser.wait_for("#dead-letters").await;
    let mut ids = Vec::new();
    for row in browser.find_all("#dead-letters tr[id^='letter-']").await {
        let id = row.attr("id").await.unwrap().unwrap();
        ids.push(id.strip_prefix("letter-").unwrap().to_owned());
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    let (retried, discarded) = (&ids[0], &ids[1]);
    browser.screenshot("dead-letters").await;

    // An empty reason is refused (Bearer: no CSRF token needed) and does nothing.
    let http = http_client();
    let answer = http
        .post(format!("{console}/dead-letters/{discarded}/discard"))
        .bearer_auth(CONSOLE_TOKEN)
        .form(&[("reason", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let (_, out, _) = run(&["dead-letters", "list", "--config", config]);
    assert_eq!(json_lines(&out).len(), 2, "{out}");

    fixed.store(true, Ordering::SeqCst);
    let calls = backend.count();
    browser
        .submit(&format!("#letter-{retried} form.retry button"))
        .await;
    let message = browser.wait_for("#message").await.text().await.unwrap();
    assert!(message.contains("resolved"), "{message}");
    assert_eq!(browser.path().await, "/dead-letters");
    assert!(!browser.exists(&format!("#letter-{retried}")).await);
    assert!(browser.exists(&format!("#letter-{discarded}")).await);
    assert_eq!(backend.count(), calls + 1, "the retry reached the backend");
    let path = backend.received().last().unwrap().path.clone();
    assert!(
        [
            "/v1/users/del-user-1/anonymize",
            "/v1/users/del-user-2/anonymize"
        ]
        .contains(&path.as_str()),
        "{path}"
    );
    // The message shows once.
    browser.goto(&format!("{console}/dead-letters")).await;
    browser.wait_for("#dead-letters").await;
    assert!(!browser.exists("#message").await);
    browser
        .fill(
            &format!("#letter-{discarded} form.discard input[name=reason]"),
            REASON,
        )
        .await;
    browser
        .submit(&format!("#letter-{discarded} form.discard button"))
        .await;
    let message = browser.wait_for("#message").await.text().await.unwrap();
    assert!(message.contains("discarded"), "{message}");
    assert!(!browser.exists(&format!("#letter-{discarded}")).await);
    assert_eq!(backend.count(), calls + 1, "a discard called the backend");
    let (_, out, _) = run(&["dead-letters", "list", "--config", config]);
    assert!(json_lines(&out).is_empty(), "{out}");

    // Pausing the action holds a new request; resuming sends it, once.
    let row = "#actions #action-anonymize_user";
    browser.goto(&format!("{console}/actions")).await;
    browser.wait_for(row).await;
    assert!(browser.exists(&format!("{row} form.pause")).await);
    browser
        .fill(
            &format!("{row} form.pause input[name=reason]"),
            "backend migration",
        )
        .await;
    browser.submit(&format!("{row} form.pause button")).await;
    browser.wait_for("#message").await;
    assert!(browser.exists(&format!("{row} form.resume")).await);
    assert!(browser.text(row).await.contains("backend migration"));
    let calls = backend.count();
    let held = deletion("held-req-1", "del-user-0-held");
    put(
        &client,
        "events",
        &[("held".into(), held.to_string().into_bytes())],
    )
    .await;
    wait_until(Duration::from_secs(30), "the request held", || {
        daemon.stderr().contains("request held")
    })
    .await;
    assert_eq!(backend.count(), calls, "a paused action called the backend");
    browser.goto(&format!("{console}/actions")).await;
    assert!(browser.exists(&format!("{row} form.resume")).await);
    let cells = cell_texts(&browser, row).await;
    assert!(cells.iter().any(|c| c == "1"), "held 1: {cells:?}");
    browser.screenshot("actions").await;
    browser.submit(&format!("{row} form.resume button")).await;
    browser.wait_for("#message").await;
    assert!(browser.exists(&format!("{row} form.pause")).await);
    wait_until(Duration::from_secs(30), "the held request sent", || {
        backend.count() > calls
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = backend
        .received()
        .iter()
        .filter(|r| r.path == "/v1/users/del-user-0-held/anonymize")
        .count();
    assert_eq!(sent, 1);
    assert_eq!(backend.count(), calls + 1);

    // The audit trail: every change above, by the console; the export is the CLI's.
    browser.goto(&format!("{console}/audit")).await;
    let recent = browser
        .wait_for("#recent-audit")
        .await
        .text()
        .await
        .unwrap();
    assert!(recent.contains("console"), "{recent}");
    browser.screenshot("audit").await;
    browser.select("#export select[name=format]", "csv").await;
    browser.click("#export-submit").await;
    let file = browser.download().await;
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("audit-") && name.ends_with(".csv"),
        "{name}"
    );
    let csv = std::fs::read_to_string(&file).unwrap();
    let (code, cli_csv, err) = run(&["audit", "export", "--format", "csv", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        csv, cli_csv,
        "the download is not what `audit export` prints"
    );
    let rows = csv_rows(&csv);
    let column = |name: &str| {
        rows[0]
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no {name} column in {:?}", rows[0]))
    };
    let (outcome, by) = (column("outcome"), column("by"));
    for expected in ["discarded", "paused", "resumed"] {
        assert!(
            rows[1..]
                .iter()
                .any(|r| r[outcome] == expected && r[by] == "console"),
            "no {expected} by console in\n{csv}"
        );
    }

    let (code, jsonl, err) = run(&["audit", "export", "--format", "jsonl", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let entries = json_lines(&jsonl);
    let by_console = |outcome: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| e["outcome"] == outcome && e["by"] == "console")
            .collect()
    };
    let discards = by_console("discarded");
    assert_eq!(discards.len(), 1, "{jsonl}");
    assert_eq!(discards[0]["note"], REASON);
    assert_eq!(by_console("paused").len(), 1, "{jsonl}");
    assert_eq!(by_console("resumed").len(), 1, "{jsonl}");
    let looked_up: Vec<&Value> = entries.iter().filter(|e| e["request_id"] == hash).collect();
    assert_eq!(looked_up.len(), 1, "{jsonl}");
    assert!(
        looked_up[0].get("by").is_none(),
        "the daemon's own entries have no by: {jsonl}"
    );

    // The rule playground: a record through the rules in force and the rules on disk. An
    // edit on disk that the running daemon has not loaded (its tests fail, so a reload
    // would be refused) shows as such; nothing is sent.
    let calls = backend.count();
    ws.write_rule(
        "acme_gdpr_delete_user.rhai",
        "fn decide(record) { return (); }\n",
    );
    browser.goto(&format!("{console}/rules")).await;
    let record = deletion("r-playground", "u-playground").to_string();
    browser.fill("#records", &record).await;
    browser.submit("#explain-submit").await;
    let explained = browser.text("table.explained").await;
    assert!(
        explained.contains("acme_gdpr_delete_user") && explained.contains("decided 1 request(s)"),
        "{explained}"
    );
    assert!(
        explained.contains("/v1/users/u-playground/anonymize"),
        "{explained}"
    );
    assert!(
        browser.text("#on-disk").await.contains("would be refused"),
        "the refused edit on disk is not said"
    );
    browser.screenshot("playground").await;
    assert_eq!(backend.count(), calls, "the playground sent a request");

    // Logging out ends the session.
    browser.submit("#logout button").await;
    browser.goto(&format!("{console}/")).await;
    browser.wait_for("#login").await;
    assert_eq!(browser.path().await, "/login");

    browser.close().await;
    assert!(daemon.stop().success());

    // The retried letter's entry: `done` (a retried request that was carried out, naming its
    // letter) or `resolved` (a letter that needed no call), made by the console.
    let retried: u64 = retried.parse().unwrap();
    let settled: Vec<&Value> = entries
        .iter()
        .filter(|e| e["dead_letter"] == retried && e["outcome"] != "dead_lettered")
        .collect();
    assert_eq!(settled.len(), 1, "{jsonl}");
    assert!(
        ["done", "resolved"].contains(&settled[0]["outcome"].as_str().unwrap()),
        "{jsonl}"
    );
    assert_eq!(
        settled[0]["by"], "console",
        "the retry from the console is not audited as by console: {jsonl}"
    );
    assert!(
        rows[1..]
            .iter()
            .any(|r| ["done", "resolved"].contains(&r[outcome].as_str())
                && r[by] == "console"
                && r[column("request_id")] == settled[0]["request_id"].as_str().unwrap()),
        "no retried entry by console in\n{csv}"
    );
}

/// The requests page over the obligations: the open requests with their status and due
/// date; a request looked up by its key as `requests show` tells it; extended (once: a
/// second extension is refused), put on legal hold and denied from its forms, each change
/// the CLI's command, audited as by the console. The key is typed, never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_extends_holds_and_denies_requests_in_the_console() {
    const EXTENDED: &str = "obl-extend-k4p8";
    const DENIED: &str = "obl-deny-w2m6";
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    // Every call refused: both requests stay open (failed, in dead letters).
    let backend = Backend::with_behaviour(Duration::ZERO, |_, _| 400).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_console();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| tokio::task::block_in_place(|| ws.run(args));
    let shown = |key: &str| {
        let (code, out, err) = run(&[
            "requests", "show", "--config", config, "--format", "json", "--key", key,
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let daemon = ws.start_daemon_with_env(&[], &[("CONSOLE_TOKEN", CONSOLE_TOKEN)]);
    let console = format!("http://{}", console_address(&daemon).await);
    let records: Vec<(String, Vec<u8>)> = [(EXTENDED, "obl-user-1"), (DENIED, "obl-user-2")]
        .iter()
        .map(|(key, user)| {
            (
                key.to_string(),
                deletion(key, user).to_string().into_bytes(),
            )
        })
        .collect();
    put(&client, "events", &records).await;
    wait_until(Duration::from_secs(30), "2 dead letters", || {
        ws.dead_letters().len() == 2
    })
    .await;
    let (first, second) = (shown(EXTENDED), shown(DENIED));
    let hash = |r: &Value| r["request"].as_str().unwrap().to_owned();

    let browser = Browser::start().await;
    browser.goto(&format!("{console}/login")).await;
    browser.fill("#token", CONSOLE_TOKEN).await;
    browser.submit("#login-submit").await;
    browser.goto(&format!("{console}/requests")).await;
    // Both open, soonest due first, with their status and due date; counted by status.
    let rows = browser.find_all("#open-requests tbody tr").await;
    assert_eq!(rows.len(), 2);
    let listed = browser.text("#open-requests").await;
    for r in [&first, &second] {
        assert_eq!(r["status"], "failed", "{r}");
        let row = listed
            .lines()
            .find(|l| l.contains(&hash(r)[..16]))
            .unwrap_or_else(|| panic!("{} not listed: {listed}", hash(r)));
        assert!(row.contains(r["due_date"].as_str().unwrap()), "{row}");
        assert!(row.contains("failed"), "{row}");
    }
    let counts = browser.find_all("#request-counts td").await;
    let mut texts = Vec::new();
    for cell in counts {
        texts.push(cell.text().await.unwrap());
    }
    let heads = browser.find_all("#request-counts th").await;
    let failed = {
        let mut at = None;
        for (i, head) in heads.iter().enumerate() {
            if head.text().await.unwrap() == "failed" {
                at = Some(i);
            }
        }
        at.expect("no failed count")
    };
    assert_eq!(texts[failed], "2", "{texts:?}");

    // Looked up: what `requests show` says; then extended from its form.
    browser.fill("#lookup input[name=key]", EXTENDED).await;
    browser.submit("#lookup button").await;
    assert_eq!(browser.text("#request-hash").await, hash(&first));
    assert_eq!(browser.text("#request-status").await, "failed");
    assert_eq!(
        browser.text("#request-due").await,
        first["due_date"].as_str().unwrap()
    );
    assert!(
        !browser.source().await.contains(EXTENDED),
        "the key is shown"
    );
    browser.fill("#extend input[name=key]", EXTENDED).await;
    browser
        .fill(
            "#extend input[name=reason]",
            "complex request: many systems",
        )
        .await;
    browser.submit("#extend button").await;
    assert_eq!(browser.path().await, "/requests/extend");
    let extended = shown(EXTENDED);
    let due = extended["due_date"].as_str().unwrap();
    assert_ne!(due, first["due_date"].as_str().unwrap());
    assert!(browser.text("#change-done").await.contains(due));
    assert_eq!(browser.text("#request-due").await, due);
    assert!(browser.exists("#request-extension").await);
    assert!(
        !browser.source().await.contains(EXTENDED),
        "the key is shown"
    );
    browser.screenshot("request").await;
    // Once only: the second is refused, and the page says so.
    browser.fill("#extend input[name=key]", EXTENDED).await;
    browser.fill("#extend input[name=reason]", "again").await;
    browser.submit("#extend button").await;
    let refusal = browser.text("#change-error").await;
    assert!(refusal.contains("extended already"), "{refusal}");
    assert!(!browser.exists("#change-done").await);
    assert_eq!(
        shown(EXTENDED)["due_date"],
        extended["due_date"],
        "{refusal}"
    );

    // A form without its CSRF token, or without a reason, changes nothing; a script with
    // the token gets the refusal as JSON.
    let http = http_client();
    let session = browser.client.get_named_cookie("gc_session").await.unwrap();
    let cookie = format!("gc_session={}", session.value());
    let answer = http
        .post(format!("{console}/requests/hold"))
        .header("cookie", &cookie)
        .form(&[("key", DENIED), ("reason", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let answer = http
        .post(format!("{console}/requests/hold"))
        .bearer_auth(CONSOLE_TOKEN)
        .form(&[("key", DENIED), ("reason", " ")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert_eq!(shown(DENIED)["status"], "failed");
    let answer = http
        .post(format!("{console}/requests/extend"))
        .bearer_auth(CONSOLE_TOKEN)
        .form(&[("key", EXTENDED), ("reason", "a third time")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 409);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["exit"], 1, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("extended already"),
        "{body}"
    );

    // The other request: on legal hold, then denied.
    browser.fill("#lookup input[name=key]", DENIED).await;
    browser.submit("#lookup button").await;
    assert_eq!(browser.text("#request-hash").await, hash(&second));
    browser.fill("#hold input[name=key]", DENIED).await;
    browser
        .fill("#hold input[name=reason]", "litigation hold 2026-17")
        .await;
    browser.submit("#hold button").await;
    browser.wait_for("#change-done").await;
    assert_eq!(browser.text("#request-status").await, "held");
    assert!(browser.exists("#request-hold").await && browser.exists("#release").await);
    assert_eq!(shown(DENIED)["status"], "held");
    browser.fill("#deny input[name=key]", DENIED).await;
    browser
        .select("#deny select[name=reason_code]", "legal_obligation")
        .await;
    browser.fill("#deny input[name=note]", "kept by law").await;
    browser.submit("#deny button").await;
    browser.wait_for("#change-done").await;
    assert_eq!(browser.text("#request-status").await, "denied");
    assert!(browser
        .text("#request-denial")
        .await
        .contains("legal_obligation"));
    assert!(
        !browser.exists("#deny").await,
        "a denied request offers changes"
    );
    assert_eq!(shown(DENIED)["status"], "denied");
    // Answered: no longer listed as open.
    browser.goto(&format!("{console}/requests")).await;
    let listed = browser.text("#open-requests").await;
    assert!(listed.contains(&hash(&first)[..16]), "{listed}");
    assert!(!listed.contains(&hash(&second)[..16]), "{listed}");
    browser.close().await;

    // The audit trail: each change by the console.
    let (code, jsonl, err) = run(&["audit", "export", "--format", "jsonl", "--config", config]);
    assert_eq!(code, 0, "{err}");
    let entries = json_lines(&jsonl);
    let by_console = |outcome: &str, r: &Value| -> Vec<Value> {
        entries
            .iter()
            .filter(|e| e["outcome"] == outcome && e["request"] == r["request"])
            .cloned()
            .collect()
    };
    for (outcome, r) in [
        ("extended", &first),
        ("legal_hold", &second),
        ("denied", &second),
    ] {
        let found = by_console(outcome, r);
        assert_eq!(found.len(), 1, "{outcome}: {jsonl}");
        assert_eq!(found[0]["by"], "console", "{outcome}: {jsonl}");
    }
    assert_eq!(
        by_console("denied", &second)[0]["denial_code"],
        "legal_obligation"
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_refuses_no_auth_a_missing_csrf_token_and_guessed_tokens() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_console();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let paused = || {
        let (code, out, err) =
            tokio::task::block_in_place(|| ws.run(&["actions", "list", "--config", config]));
        assert_eq!(code, 0, "{err}");
        json_lines(&out)[0]["paused"] == true
    };
    let daemon = ws.start_daemon_with_env(&[], &[("CONSOLE_TOKEN", CONSOLE_TOKEN)]);
    let console = format!("http://{}", console_address(&daemon).await);
    let http = http_client();

    // No auth: the API says 401, pages send to the login; no data either way.
    for path in ["/api/status", "/api/dead-letters", "/api/actions"] {
        let answer = http.get(format!("{console}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 401, "{path}");
        assert_security_headers(&answer, path);
        let challenge = header(&answer, "www-authenticate");
        assert!(challenge.starts_with("Bearer"), "{path}: {challenge}");
        let body: Value = answer.json().await.unwrap();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error"], "{path}: {body}");
    }
    let answer = http
        .get(format!("{console}/api/status"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    for path in [
        "/",
        "/requests",
        "/dead-letters",
        "/actions",
        "/audit",
        "/audit/export?format=csv",
    ] {
        let answer = http.get(format!("{console}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
        assert_eq!(header(&answer, "location"), "/login", "{path}");
        assert_security_headers(&answer, path);
        let body = answer.text().await.unwrap();
        assert!(!body.contains("anonymize_user"), "{path}: {body}");
    }
    let answer = http
        .post(format!("{console}/actions/anonymize_user/pause"))
        .form(&[("reason", "no auth")])
        .send()
        .await
        .unwrap();
    assert!(
        !answer.status().is_success() && header(&answer, "location") != "/actions",
        "{answer:?}"
    );
    assert!(!paused());

    // The API with the token.
    let answer = http
        .get(format!("{console}/api/status"))
        .bearer_auth(CONSOLE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_security_headers(&answer, "/api/status");
    let status: Value = answer.json().await.unwrap();
    assert!(status.get("ready").is_some(), "{status}");
    assert!(status["shards"].is_array(), "{status}");

    // The playground explains at most 20 events: 21 pasted are refused.
    let records = vec![deletion("r-1", "u-1").to_string(); 21].join("\n");
    let answer = http
        .post(format!("{console}/rules/explain"))
        .bearer_auth(CONSOLE_TOKEN)
        .form(&[("records", records.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);

    // A session from the login form: HttpOnly, SameSite=Strict.
    let answer = http.get(format!("{console}/login")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_security_headers(&answer, "/login");
    let answer = http
        .post(format!("{console}/login"))
        .form(&[("token", CONSOLE_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(header(&answer, "location"), "/");
    let set_cookie = answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("gc_session="))
        .expect("no gc_session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let answer = http
        .get(format!("{console}/api/actions"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the API takes the session too");
    let page = http
        .get(format!("{console}/actions"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_security_headers(&page, "/actions");
    let csrf = csrf_token(&page.text().await.unwrap());

    // A POST from the session without the CSRF token, or with another, does nothing.
    for form in [
        vec![("reason", "forged")],
        vec![("reason", "forged"), ("csrf", "not-the-token")],
    ] {
        let answer = http
            .post(format!("{console}/actions/anonymize_user/pause"))
            .header("cookie", &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403, "{form:?}");
        assert_security_headers(&answer, "a refused POST");
        assert!(!paused(), "paused without the CSRF token");
    }
    // With it, it pauses; with the Bearer header no CSRF token is needed.
    let answer = http
        .post(format!("{console}/actions/anonymize_user/pause"))
        .header("cookie", &cookie)
        .form(&[("reason", "maintenance"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(header(&answer, "location"), "/actions");
    assert!(paused());
    let answer = http
        .post(format!("{console}/actions/anonymize_user/resume"))
        .bearer_auth(CONSOLE_TOKEN)
        .form::<[(&str, &str)]>(&[])
        .send()
        .await
        .unwrap();
    let status = answer.status();
    assert!(status.is_success() || status == 303, "{status}");
    assert!(!paused());

    // Another site's page posting to the login form is refused, and counts as no guess
    // (it could otherwise lock everyone out).
    for _ in 0..6 {
        let answer = http
            .post(format!("{console}/login"))
            .header("origin", "http://evil.example")
            .form(&[("token", "guess")])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403);
    }
    let answer = http
        .post(format!("{console}/login"))
        .form(&[("token", CONSOLE_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303, "locked out by another site's posts");

    // Guessing: wrong tokens get no session, and are slowed down, then refused.
    let mut took = Vec::new();
    let mut limited = false;
    for _ in 0..10 {
        let started = Instant::now();
        let answer = http
            .post(format!("{console}/login"))
            .form(&[("token", "guess")])
            .send()
            .await
            .unwrap();
        took.push(started.elapsed());
        assert!(
            !answer.headers().get_all("set-cookie").iter().any(|c| c
                .to_str()
                .unwrap()
                .starts_with("gc_session=")
                && !c.to_str().unwrap().starts_with("gc_session=;")),
            "a wrong token got a session"
        );
        match answer.status().as_u16() {
            401 => {}
            429 => {
                limited = true;
                break;
            }
            other => panic!("a wrong token answered {other}"),
        }
        if started.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    assert!(
        limited || *took.last().unwrap() >= took[0] + Duration::from_millis(100),
        "wrong tokens are neither slowed down nor refused: {took:?}"
    );
    assert!(daemon.stop().success());
}

/// A client that shows redirects instead of following them.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn header(answer: &reqwest::Response, name: &str) -> String {
    answer
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The headers the contract puts on every answer.
fn assert_security_headers(answer: &reqwest::Response, what: &str) {
    let csp = header(answer, "content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{what}: {csp:?}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp:?}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp:?}");
    assert!(!csp.contains("script-src"), "{what}: {csp:?}");
    assert_eq!(
        header(answer, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
    assert!(
        header(answer, "x-frame-options").eq_ignore_ascii_case("deny"),
        "{what}"
    );
    assert_eq!(header(answer, "referrer-policy"), "same-origin", "{what}");
    assert!(
        header(answer, "cache-control").contains("no-store"),
        "{what}"
    );
}

/// The value of the first hidden `csrf` field of a page.
fn csrf_token(page: &str) -> String {
    let input = regex::Regex::new(r#"<input[^>]*name="csrf"[^>]*>"#)
        .unwrap()
        .find(page)
        .unwrap_or_else(|| panic!("no csrf field in {page}"))
        .as_str();
    regex::Regex::new(r#"value="([^"]*)""#)
        .unwrap()
        .captures(input)
        .unwrap_or_else(|| panic!("no value in {input}"))[1]
        .to_owned()
}

/// The texts of a table row's cells.
async fn cell_texts(browser: &Browser, row: &str) -> Vec<String> {
    let mut texts = Vec::new();
    for cell in browser.find_all(&format!("{row} td")).await {
        texts.push(cell.text().await.unwrap().trim().to_owned());
    }
    texts
}

/// RFC 4180 CSV (quoted fields may hold commas, quotes and newlines) as rows of fields.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// Asked to stop while the console serves a retry, the daemon lets the retry finish and
/// records it before it lets go of its state (as for a command on the control channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_a_retry_asked_from_the_console_finish() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    put(&client, "events", &traffic(20, 1, 0)).await;
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = Backend::serve(listener, {
        let slow = slow.clone();
        move |_, _| match slow.load(Ordering::SeqCst) {
            true => Reply {
                delay: Duration::from_millis(2500),
                ..Reply::from(200)
            },
            false => 400.into(),
        }
    });
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.with_console();
    let daemon = ws.start_daemon_with_env(&[], &[("CONSOLE_TOKEN", CONSOLE_TOKEN)]);
    let console = format!("http://{}", console_address(&daemon).await);
    wait_until(Duration::from_secs(30), "a refusal", || {
        backend.count() >= 1
    })
    .await;
    wait_until(Duration::from_secs(30), "its dead letter", || {
        ws.dead_letters().len() == 1
    })
    .await;
    slow.store(true, Ordering::SeqCst);
    let retry = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{console}/dead-letters/1/retry"))
            .bearer_auth(CONSOLE_TOKEN)
            .form(&[("csrf", "")])
            .send()
            .await
    });
    wait_until(Duration::from_secs(30), "the retry in flight", || {
        backend.count() >= 2
    })
    .await;
    daemon.signal("TERM");
    let log_file = daemon.log.clone();
    assert!(daemon.wait_exit().success());
    let log = std::fs::read_to_string(log_file).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        ws.dead_letters().is_empty(),
        "the retry's outcome was not recorded"
    );
    let _ = retry.await;
    assert_eq!(backend.count(), 2, "sent again");
}
