//! Commands that need no stream: rules check/test, config errors, the state lock.

use std::time::Duration;

use crate::support::*;

fn workspace() -> Workspace {
    Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9")
}

#[test]
fn shipped_rules_pass_check_and_test() {
    let ws = workspace();
    let dir = repo().join("rules");
    let (code, out, _) = ws.run(&["rules", "check", "--rules-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}

#[test]
fn rules_check_shows_each_rules_prefilter_and_where_it_comes_from() {
    let ws = workspace();
    ws.write_rule(
        "guarded.rhai",
        "fn decide(record) {\n    let event = record.data;\n    if type_of(event) != \"map\" { return; }\n    if event.type != \"erasure\" { return; }\n    if event.source != \"support_desk\" { return; }\n    #{ action: \"anonymize_user\", key: event.id }\n}\n",
    );
    ws.write_rule(
        "open.rhai",
        "fn decide(record) {\n    if record.data.type == \"x\" { return #{ action: \"anonymize_user\", key: \"k\" }; }\n}\n",
    );
    let (code, out, _) = ws.run(&["rules", "check", "--rules-dir", "rules"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  acme_gdpr_delete_user: prefilter [\"Delete User\"]\n"),
        "{out}"
    );
    assert!(
        out.contains("  guarded: prefilter [\"support_desk\"], from its opening checks\n"),
        "{out}"
    );
    assert!(
        out.contains("  open: no prefilter: it runs on every event\n"),
        "{out}"
    );
}

#[test]
fn rules_check_reports_file_line_col() {
    let ws = workspace();
    ws.write_rule("broken.rhai", "fn decide(record) {\n    let x = ;\n}\n");
    let (code, out, _) = ws.run(&["rules", "check", "--rules-dir", "rules"]);
    assert_eq!(code, 1);
    let line = out.lines().find(|l| l.contains("broken.rhai")).unwrap();
    assert!(line.starts_with("rules/broken.rhai:2:"), "{line}");
}

#[test]
fn rules_test_shows_expected_and_actual() {
    let ws = workspace();
    ws.write_rule(
        "acme_gdpr_delete_user.test.json",
        r#"[{"name": "wrong key", "record": {"data": {"type": "privacy_request", "tags": ["GDPR", "Delete User"], "client": "acme", "request_id": "r-1", "user_id": "u-1"}},
             "expect": {"action": "anonymize_user", "key": "r-2", "params": {"user_id": "u-1"}}},
            {"name": "no match", "record": {"data": {"type": "page_view"}}, "expect": null}]"#,
    );
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", "rules"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL acme_gdpr_delete_user / wrong key"),
        "{out}"
    );
    assert!(
        out.contains(r#"expected: {"action":"anonymize_user","key":"r-2""#),
        "{out}"
    );
    assert!(
        out.contains(r#"actual:   {"action":"anonymize_user","key":"r-1""#),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" passed, 1 failed"), "{out}");
}

#[test]
fn run_refuses_bad_setup_with_exit_2() {
    let ws = workspace();
    let config = ws.config();
    let config = config.to_str().unwrap();
    // A missing token variable.
    let out = std::process::Command::new(bin())
        .args(["run", "--config", config])
        .env_remove("BACKEND_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BACKEND_TOKEN"));

    // Rules that fail their tests.
    ws.write_rule("acme_gdpr_delete_user.test.json", r#"[{"name": "x", "record": {"data": {}}, "expect": {"action": "anonymize_user", "key": "k"}}]"#);
    let (code, _, err) = ws.run(&["run", "--config", config]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("test failed: acme_gdpr_delete_user / x"),
        "{err}"
    );

    // An http:// action without allow_insecure_http.
    let text = std::fs::read_to_string(ws.config())
        .unwrap()
        .replace("allow_insecure_http = true", "");
    std::fs::write(ws.config(), text).unwrap();
    let (code, _, err) = ws.run(&["run", "--config", config]);
    assert_eq!(code, 2);
    assert!(err.contains("allow_insecure_http"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_fails_clearly() {
    let kinesis = Kinesalite::start();
    create_stream(&kinesis.client(), "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    let first = ws.start_daemon(&[]);
    wait_until(Duration::from_secs(30), "the first daemon to start", || {
        first.stderr().contains("stream reachable")
    })
    .await;
    let config = ws.config();
    let (code, _, err) =
        tokio::task::block_in_place(|| ws.run(&["run", "--config", config.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another gdpr-consumer"), "{err}");
    assert!(first.stop().success());
}

#[test]
fn shipped_example_rules_pass_their_tests() {
    let ws = workspace();
    let dir = repo().join("rules/examples");
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn rules_test_warns_about_untested_rules() {
    let ws = workspace();
    ws.write_rule("untested.rhai", "fn decide(record) { }");
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", "rules"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: rule untested has no test cases"),
        "{out}"
    );
}

/// The guide's examples are the shipped, tested rules: its code blocks cannot drift.
#[test]
fn the_rules_guide_quotes_the_shipped_rules() {
    let guide = std::fs::read_to_string(repo().join("docs/rules.md")).unwrap();
    let mut shipped = String::new();
    let mut cases: Vec<serde_json::Value> = Vec::new();
    for dir in ["rules", "rules/examples"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.to_string_lossy().into_owned();
            if name.ends_with(".rhai") {
                shipped.push_str(&std::fs::read_to_string(&path).unwrap());
            } else if name.ends_with(".test.json") {
                let list: Vec<serde_json::Value> =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                cases.extend(list);
            }
        }
    }
    let blocks = |lang: &str| -> Vec<String> {
        guide
            .split(&format!("```{lang}\n"))
            .skip(1)
            .map(|rest| rest.split("```").next().unwrap().to_owned())
            .collect()
    };
    let rhai = blocks("rhai");
    assert!(rhai.len() >= 3);
    for block in rhai {
        assert!(shipped.contains(&block), "not in rules/:\n{block}");
    }
    let json = blocks("json");
    assert!(!json.is_empty());
    for block in json {
        let quoted: Vec<serde_json::Value> = serde_json::from_str(&block).unwrap();
        for case in quoted {
            assert!(cases.contains(&case), "not a shipped test case: {case}");
        }
    }
}

#[test]
fn a_console_without_its_token_or_on_a_public_address_is_refused_with_exit_2() {
    let ws = workspace();
    let config = ws.config();
    let config = config.to_str().unwrap();
    let base = std::fs::read_to_string(config).unwrap();
    let with_console = |section: &str| {
        std::fs::write(config, format!("{base}\n[console]\n{section}\n")).unwrap();
    };
    let run = |token: Option<&str>| {
        let mut command = std::process::Command::new(bin());
        command
            .args(["run", "--config", config])
            .current_dir(ws.dir.path())
            .env("BACKEND_TOKEN", "t");
        match token {
            Some(token) => command.env("CONSOLE_TOKEN", token),
            None => command.env_remove("CONSOLE_TOKEN"),
        };
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    with_console(r#"listen = "127.0.0.1:0""#);
    let (code, err) = run(Some("secret"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("[console] token_env is required"), "{err}");

    with_console("listen = \"127.0.0.1:0\"\ntoken_env = \"CONSOLE_TOKEN\"");
    let (code, err) = run(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("CONSOLE_TOKEN, which is not set"), "{err}");
    let (code, err) = run(Some("  "));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is empty"), "{err}");
    let (code, err) = run(Some("short"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("shorter than 16"), "{err}");

    with_console("listen = \"0.0.0.0:0\"\ntoken_env = \"CONSOLE_TOKEN\"");
    let (code, err) = run(Some("a-long-enough-console-token"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("allow_remote = true"), "{err}");
}

#[test]
fn a_reason_must_be_said_in_words_of_a_readable_length() {
    let ws = workspace();
    let config = ws.config();
    let config = config.to_str().unwrap();
    for reason in [
        "",
        "   ",
        "\u{1b}[31mred",
        &"x".repeat(1001),
        "\u{200b}\u{200b}",
        "ok \u{202e}reversed",
    ] {
        for args in [
            vec!["dead-letters", "discard", "--id", "1"],
            vec!["actions", "pause", "anonymize_user"],
        ] {
            let mut args = args.clone();
            args.extend(["--reason", reason, "--config", config]);
            let (code, _, err) = ws.run(&args);
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains("reason"), "{err}");
        }
    }
    assert!(
        !ws.path("state.redb").exists(),
        "a refused command wrote nothing"
    );
}
