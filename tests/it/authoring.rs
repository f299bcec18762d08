//! The authoring tools compliance staff use on their own: `rules explain`, `rules test
//! --coverage` and `--junit`, and `dead-letters to-test`.

use serde_json::Value;

use crate::support::*;

fn fixture(name: &str) -> String {
    repo()
        .join("tests/fixtures/authoring")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A workspace with the shipped rules and the fixture rule that throws.
fn workspace() -> Workspace {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    ws.write_rule(
        "strict_erasure.rhai",
        &std::fs::read_to_string(fixture("strict_erasure.rhai")).unwrap(),
    );
    ws
}

fn trace<'a>(record: &'a Value, rule: &str) -> &'a Value {
    record["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["rule"] == rule)
        .unwrap_or_else(|| panic!("no trace of {rule} in {record}"))
}

#[test]
fn explain_says_why_each_rule_decided_what_it_did() {
    let ws = workspace();
    let config = ws.config();
    let rules = ws.path("rules");
    let args = |output: &'static str| {
        vec![
            "rules".to_owned(),
            "explain".into(),
            "--rules-dir".into(),
            rules.to_str().unwrap().into(),
            "--input".into(),
            fixture("explain.jsonl"),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--output".into(),
            output.into(),
        ]
    };
    let run = |output| {
        let args = args(output);
        let (code, out, err) = ws.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
        out
    };
    let records = json_lines(&run("json"));
    assert_eq!(records.len(), 5, "{records:?}");

    // A matching record: the decision and the exact request, token redacted.
    let matched = trace(&records[0], "acme_gdpr_delete_user");
    assert_eq!(matched["outcome"], "decided", "{matched}");
    let decided = &matched["decisions"][0];
    assert_eq!(decided["decision"]["key"], "r-456");
    assert_eq!(decided["request"]["method"], "POST");
    assert!(decided["request"]["url"]
        .as_str()
        .unwrap()
        .ends_with("/v1/users/u-123/anonymize"));
    assert!(!records[0].to_string().contains(TOKEN));
    assert_eq!(records[0]["sequence_number"], "1001");

    // Turned away by an opening check, at its line, with the field and value compared.
    let away = trace(&records[1], "acme_gdpr_delete_user");
    assert_eq!(away["outcome"], "turned_away", "{away}");
    assert_eq!(away["line"], 19);
    assert_eq!(away["field"], "record.data.client");
    assert_eq!(away["expected"], "acme");
    assert_eq!(away["found"], "globex");

    // Without the literal: kept out by the prefilter, which names it.
    for rule in ["acme_gdpr_delete_user", "ccpa_delete", "strict_erasure"] {
        assert_eq!(trace(&records[2], rule)["outcome"], "prefiltered");
    }
    assert_eq!(
        trace(&records[2], "acme_gdpr_delete_user")["missing"],
        serde_json::json!(["Delete User"])
    );

    // A record the rule throws on: where, and the message.
    let threw = trace(&records[3], "strict_erasure");
    assert_eq!(threw["outcome"], "threw", "{threw}");
    assert_eq!(threw["line"], 11);
    assert!(threw["message"]
        .as_str()
        .unwrap()
        .contains("strict_erasure without a user_id"));

    // Returned nothing, at the `return` that fired (not an opening check: an `||`).
    let nothing = trace(&records[4], "support_erasure_verified_only");
    assert_eq!(nothing["outcome"], "returned_nothing", "{nothing}");
    assert_eq!(nothing["line"], 19);
    assert_eq!(nothing["by_return"], true);

    // The text says the same, rule by rule.
    let human = run("human");
    let blocks: Vec<&str> = human
        .split("\nline ")
        .map(|b| b.trim_start_matches("line "))
        .collect();
    assert_eq!(blocks.len(), records.len(), "{human}");
    for (block, record) in blocks.iter().zip(&records) {
        assert!(
            block.starts_with(&format!("{} (shard ", record["line"])),
            "{block}"
        );
        for t in record["rules"].as_array().unwrap() {
            let file = t["file"].as_str().unwrap();
            let said = match t["outcome"].as_str().unwrap() {
                "prefiltered" => format!(
                    "kept out by its prefilter: the record holds none of {:?}",
                    t["missing"][0].as_str().unwrap()
                ),
                "turned_away" => format!(
                    "turned away by the opening check at {file}:{}: {} is {:?}, not {:?}",
                    t["line"],
                    t["field"].as_str().unwrap(),
                    t["found"].as_str().unwrap(),
                    t["expected"].as_str().unwrap()
                ),
                "returned_nothing" => format!("returned nothing at {file}:{} (return)", t["line"]),
                "threw" => format!(
                    "threw at {file}:{}: {}",
                    t["line"],
                    t["message"].as_str().unwrap()
                ),
                "decided" => format!(
                    "decided 1 request(s)\n    anonymize_user key {:?}",
                    t["decisions"][0]["decision"]["key"].as_str().unwrap()
                ),
                other => panic!("{other}"),
            };
            let expected = format!("  {}: {said}", t["rule"].as_str().unwrap());
            assert!(block.contains(&expected), "{expected}\nnot in\n{block}");
        }
    }
}

/// The fixture rule that throws, with its test cases.
fn workspace_with_tests() -> Workspace {
    let ws = workspace();
    ws.write_rule(
        "strict_erasure.test.json",
        &std::fs::read_to_string(fixture("strict_erasure.test.json")).unwrap(),
    );
    ws
}

/// `N passed, N failed` from the end of `rules test`'s output.
fn counts(out: &str) -> (usize, usize) {
    let line = out
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed"))
        .unwrap_or_else(|| panic!("no count line in {out}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (numbers[0], numbers[1])
}

/// What a JUnit file holds: (testcases, failures, the failures' texts, suite names,
/// the totals on `testsuites`).
fn read_junit(path: &std::path::Path) -> (usize, usize, Vec<String>, Vec<String>, (usize, usize)) {
    use quick_xml::events::Event;
    let text = std::fs::read_to_string(path).unwrap();
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut cases, mut failures) = (0, 0);
    let (mut texts, mut suites) = (Vec::new(), Vec::new());
    let mut totals = (0, 0);
    let mut in_failure = false;
    let attribute = |e: &quick_xml::events::BytesStart, name: &str| -> String {
        e.try_get_attribute(name)
            .unwrap()
            .map(|a| {
                a.normalized_value(quick_xml::XmlVersion::Explicit1_0)
                    .unwrap()
                    .into_owned()
            })
            .unwrap_or_default()
    };
    loop {
        match reader
            .read_event()
            .expect("the JUnit file is well-formed XML")
        {
            Event::Start(e) | Event::Empty(e) => match e.name().0 {
                "testsuites" => {
                    totals = (
                        attribute(&e, "tests").parse().unwrap(),
                        attribute(&e, "failures").parse().unwrap(),
                    )
                }
                "testsuite" => suites.push(attribute(&e, "name")),
                "testcase" => cases += 1,
                "failure" => {
                    failures += 1;
                    in_failure = true;
                    texts.push(String::new());
                }
                _ => {}
            },
            Event::Text(t) if in_failure => {
                *texts.last_mut().unwrap() += &t.xml10_content();
            }
            Event::GeneralRef(r) if in_failure => {
                let name = r.xml10_content();
                let c = match name.as_ref() {
                    "quot" => '"',
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "apos" => '\'',
                    other => panic!("entity {other}"),
                };
                texts.last_mut().unwrap().push(c);
            }
            Event::End(e) if e.name().as_ref() == "failure" => in_failure = false,
            Event::Eof => break,
            _ => {}
        }
    }
    (cases, failures, texts, suites, totals)
}

#[test]
fn junit_counts_equal_the_summary_line() {
    let ws = workspace_with_tests();
    let rules = ws.path("rules");
    let junit = ws.path("results.xml");
    let run = |ws: &Workspace| {
        ws.run(&[
            "rules",
            "test",
            "--rules-dir",
            rules.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ])
    };
    let (code, out, err) = run(&ws);
    assert_eq!(code, 0, "{out}{err}");
    let (passed, failed) = counts(&out);
    assert_eq!(failed, 0);
    let (cases, failures, _, suites, totals) = read_junit(&junit);
    assert_eq!((cases - failures, failures), (passed, failed));
    assert_eq!(totals, (cases, failures));
    assert!(suites.contains(&"strict_erasure".to_owned()), "{suites:?}");
    assert!(
        suites.contains(&"acme_gdpr_delete_user".to_owned()),
        "{suites:?}"
    );

    // A case whose record the rule throws on, and one expecting the wrong key.
    let mut cases_json: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("strict_erasure.test.json")).unwrap(),
    )
    .unwrap();
    cases_json.push(serde_json::json!({
        "name": "no user id <& \"quotes\">",
        "record": {"data": {"type": "strict_erasure", "request_id": "s-3"}},
        "expect": null
    }));
    cases_json.push(serde_json::json!({
        "name": "the wrong key",
        "record": {"data": {"type": "strict_erasure", "request_id": "s-4", "user_id": "u-4"}},
        "expect": {"action": "anonymize_user", "key": "s-4", "params": {"user_id": "u-4"}}
    }));
    ws.write_rule(
        "strict_erasure.test.json",
        &serde_json::to_string_pretty(&cases_json).unwrap(),
    );
    let (code, out, _) = run(&ws);
    assert_eq!(code, 1, "{out}");
    let (passed, failed) = counts(&out);
    assert_eq!(failed, 2, "{out}");
    let (cases, failures, texts, _, totals) = read_junit(&junit);
    assert_eq!((cases - failures, failures), (passed, failed));
    assert_eq!(totals, (cases, failures));
    assert!(
        texts[0].contains("expected: null (no decision)")
            && texts[0].contains("actual:   error: ")
            && texts[0].contains("strict_erasure without a user_id"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains(r#"expected: {"action":"anonymize_user","key":"s-4""#)
            && texts[1].contains(r#"actual:   {"action":"anonymize_user","key":"strict:s-4""#),
        "{texts:?}"
    );
}

#[test]
fn coverage_names_the_lines_no_case_runs() {
    let ws = Workspace::new("http://127.0.0.1:9", "events", "http://127.0.0.1:9");
    let rules = ws.path("rules");
    let test = |extra: &[&str]| {
        let mut args = vec!["rules", "test", "--rules-dir", rules.to_str().unwrap()];
        args.extend(extra);
        ws.run(&args)
    };
    let line_of = |out: &str, rule: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("coverage: {rule}: ")))
            .unwrap_or_else(|| panic!("no coverage of {rule} in {out}"))
            .to_owned()
    };
    // The shipped support rule: no case has a payload that is not a map, so the `return`
    // of its map check (line 16) never runs.
    let (code, out, err) = test(&["--coverage"]);
    assert_eq!(code, 0, "{out}{err}");
    let support = line_of(&out, "support_erasure_verified_only");
    assert!(support.ends_with("; never ran: 16"), "{support}");
    assert!(!support.contains(": 100%"), "{support}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");

    // Below the bar: exit 1, saying which rule; at a bar every rule reaches: exit 0.
    let (code, out, _) = test(&["--min-coverage", "100"]);
    assert_eq!(code, 1, "{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("FAIL coverage"))
        .unwrap();
    assert!(fail.contains("support_erasure_verified_only"), "{fail}");
    let (code, out, _) = test(&["--min-coverage", "50"]);
    assert_eq!(code, 0, "{out}");

    // The case that reaches it: a payload that holds the literal but is not a map.
    let file = rules.join("support_erasure_verified_only.test.json");
    let mut cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    cases.push(serde_json::json!({
        "name": "a text payload that mentions erasure_request is not a request",
        "record": {"data_text": "\"erasure_request\""},
        "expect": null
    }));
    std::fs::write(&file, serde_json::to_string_pretty(&cases).unwrap()).unwrap();
    let (code, out, _) = test(&["--coverage"]);
    assert_eq!(code, 0, "{out}");
    let support = line_of(&out, "support_erasure_verified_only");
    assert!(support.contains(": 100% of statements"), "{support}");
    assert!(!support.contains("never ran"), "{support}");
}

/// A rule that throws on ids of one form (their first letter).
const ID_FORM: &str = r#"const PREFILTER = ["id_form"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "id_form" { return; }
    if d.id[0] == 'x' { throw "x ids are not ours"; }
}
"#;

/// The tester's rule: on a user id of one form (its third character), a decision that
/// cannot be sent; else one that can. A placeholder of another form takes the other branch.
const BRANCH: &str = r#"const PREFILTER = ["branch_form"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "branch_form" { return; }
    let uid = d.uid;
    if uid.sub_string(2, 1) == "7" {
        return #{ action: "anonymize_user", key: "k-" + uid, params: #{ user_id: #{ x: 1 } } };
    }
    #{ action: "anonymize_user", key: "k-" + uid, params: #{ user_id: uid } }
}
"#;

/// A rule whose decision the action cannot send: its `user_id` param is a map.
const BAD_PARAMS: &str = r#"const PREFILTER = ["bad_params"];
fn decide(record) {
    let d = record.data;
    if type_of(d) != "map" || d.type != "bad_params" { return; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ user_id: d.user } }
}
"#;

/// The fixture rule fixed: a request without a user id is carried out with its email.
const STRICT_FIXED: &str = r#"const PREFILTER = ["strict_erasure"];

fn decide(record) {
    let event = record.data;
    if type_of(event) != "map" { return; }
    if event.type != "strict_erasure" { return; }
    let user = if type_of(event.user_id) == "string" { event.user_id } else { event.email };
    #{ action: "anonymize_user", key: "strict:" + event.request_id, params: #{ user_id: user } }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_becomes_a_test_case_without_its_identifiers() {
    let kinesis = Kinesalite::start();
    let client = kinesis.client();
    create_stream(&client, "events", 1).await;
    let backend = Backend::start().await;
    let ws = Workspace::new(&kinesis.endpoint, "events", &backend.url);
    ws.write_rule(
        "strict_erasure.rhai",
        &std::fs::read_to_string(fixture("strict_erasure.rhai")).unwrap(),
    );
    let tests = std::fs::read_to_string(fixture("strict_erasure.test.json")).unwrap();
    ws.write_rule("strict_erasure.test.json", &tests);
    // A rule whose decision cannot be sent (its user_id param is a map).
    ws.write_rule("bad_params.rhai", BAD_PARAMS);
    // A rule that looks at the form of an id: placeholders would take it elsewhere.
    ws.write_rule("id_form.rhai", ID_FORM);
    ws.write_rule("branch.rhai", BRANCH);
    // The rule throws on this one (no user_id); then a request the backend gets, to know
    // the daemon is past it.
    let failing = serde_json::json!({
        "type": "strict_erasure",
        "request_id": "s-98765",
        "email": "Jane.Doe@example.org",
        "phone": "+1 555 0100",
        "account": 4417123456u64,
        "pin": 4821,
        "consents": {"s-98765": true, "Jane.Doe@example.org": 1},
    });
    put(
        &client,
        "events",
        &[
            ("jane-doe-42".to_owned(), failing.to_string().into_bytes()),
            (
                "k".to_owned(),
                serde_json::json!({"type": "id_form", "id": "x-991"})
                    .to_string()
                    .into_bytes(),
            ),
            (
                "k".to_owned(),
                serde_json::json!({"type": "bad_params", "request_id": "b-1", "user": {"id": "u-55"}})
                    .to_string()
                    .into_bytes(),
            ),
            (
                "k".to_owned(),
                serde_json::json!({"type": "branch_form", "uid": "u-77777"})
                    .to_string()
                    .into_bytes(),
            ),
            (
                "k".to_owned(),
                deletion("r-1", "u-1").to_string().into_bytes(),
            ),
        ],
    )
    .await;
    let daemon = ws.start_daemon(&[]);
    wait_until(std::time::Duration::from_secs(30), "the request", || {
        backend.count() >= 1
    })
    .await;
    let config = ws.config();
    let config = config.to_str().unwrap();
    // Served by the running daemon (its letters are written with the batch's progress,
    // after the request went out).
    let list = || ws.run(&["dead-letters", "list", "--config", config]);
    wait_until(std::time::Duration::from_secs(30), "the letters", || {
        json_lines(&list().1).len() >= 4
    })
    .await;
    let (code, out, err) = list();
    assert_eq!(code, 0, "{err}");
    let letters = json_lines(&out);
    assert_eq!(letters.len(), 4, "{out}");
    let letter = |rule: &str| {
        letters
            .iter()
            .find(|l| l["rule"] == rule)
            .unwrap_or_else(|| panic!("no letter of {rule} in {out}"))
    };
    assert_eq!(letter("strict_erasure")["kind"], "rule_failed");
    let id = letter("strict_erasure")["id"].to_string();
    // Placeholders that change the rule's path: refused (exit 2), unless kept as it is.
    let form = letter("id_form")["id"].to_string();
    let args = ["dead-letters", "to-test", "--id", &form, "--config", config];
    let (code, out, err) = ws.run(&args);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("the placeholders change the rule's path")
            && err.contains("--keep-identifiers"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    let (code, out, err) = ws.run(&[&args[..], &["--keep-identifiers"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("x-991"), "{out}");
    // The same outcome kind by another branch (a decision that can be sent, where the
    // record's could not): refused too, saying where they part.
    let branch = letter("branch")["id"].to_string();
    let (code, out, err) = ws.run(&[
        "dead-letters",
        "to-test",
        "--id",
        &branch,
        "--config",
        config,
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("the placeholders change the rule's path") && err.contains("line(s) 7"),
        "{err}"
    );
    assert!(!err.contains("77777"), "{err}");
    // A decision that cannot be sent: the case does not expect it, and says it still fails.
    let unsendable = letter("bad_params")["id"].to_string();
    let (code, out, err) = ws.run(&[
        "dead-letters",
        "to-test",
        "--id",
        &unsendable,
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    let case: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(case["expect"], Value::Null, "{case}");
    let name = case["name"].as_str().unwrap();
    assert!(
        name.contains("still fails") && name.contains("is a map or an array"),
        "{name}"
    );
    let to_test = |extra: &[&str]| {
        let mut args = vec!["dead-letters", "to-test", "--id", &id, "--config", config];
        args.extend(extra);
        let (code, out, err) = ws.run(&args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let served = to_test(&[]);
    // A relative --rules-dir is the one where the command runs, not the daemon's.
    let fixed = ws.path("fixed");
    std::fs::create_dir(&fixed).unwrap();
    std::fs::write(fixed.join("strict_erasure.rhai"), STRICT_FIXED).unwrap();
    let served_fixed = to_test(&["--rules-dir", "fixed"]);
    assert!(daemon.stop().success());
    // On the file, the same.
    let printed = to_test(&[]);
    assert_eq!(printed, served);
    assert_eq!(
        to_test(&["--rules-dir", fixed.to_str().unwrap()]),
        served_fixed
    );
    // Without a config or --rules-dir, from elsewhere: the rules where the rule was.
    let elsewhere = ws.path("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let state = ws.path("state.redb");
    let out = command(&elsewhere.join("none"))
        .args(["dead-letters", "to-test", "--id", &id])
        .args(["--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), printed);

    // No identifier of the record (in what it holds: its sequence number and arrival time
    // are the stream's); what the rule compares against stays.
    let case: Value = serde_json::from_str(&printed).unwrap();
    let held = format!(
        "{} {} {}",
        case["name"], case["record"]["data"], case["record"]["partition_key"]
    );
    for identifier in [
        "98765",
        "Jane",
        "Doe",
        "example.org",
        "555",
        "0100",
        "4417123456",
        "4821",
        "jane-doe",
    ] {
        assert!(!held.contains(identifier), "{identifier} in {printed}");
    }
    let data = &case["record"]["data"];
    assert_eq!(data["type"], "strict_erasure");
    let email = data["email"].as_str().unwrap();
    assert_eq!(email.len(), "Jane.Doe@example.org".len());
    assert_eq!((email.find('.'), email.find('@')), (Some(4), Some(8)));
    assert_eq!(case["expect"], Value::Null);
    assert!(
        case["name"].as_str().unwrap().contains("still fails"),
        "{case}"
    );

    // Added to the rule's tests, it fails the way the record did.
    let mut cases: Vec<Value> = serde_json::from_str(&tests).unwrap();
    cases.push(case.clone());
    ws.write_rule(
        "strict_erasure.test.json",
        &serde_json::to_string_pretty(&cases).unwrap(),
    );
    let rules = ws.path("rules");
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", rules.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("strict_erasure without a user_id"), "{out}");
    assert!(out.trim_end().ends_with(" passed, 1 failed"), "{out}");

    // With the rule fixed, the case expects its decision, placeholders and all, and passes.
    let out = served_fixed;
    let case: Value = serde_json::from_str(&out).unwrap();
    let data = &case["record"]["data"];
    assert_eq!(case["expect"]["params"]["user_id"], data["email"], "{case}");
    assert_eq!(
        case["expect"]["key"],
        format!("strict:{}", data["request_id"].as_str().unwrap())
    );
    std::fs::write(
        fixed.join("strict_erasure.test.json"),
        serde_json::to_string_pretty(&vec![case]).unwrap(),
    )
    .unwrap();
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", fixed.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with("1 passed, 0 failed"), "{out}");

    // Kept as it is on request.
    let kept = to_test(&["--keep-identifiers"]);
    assert!(
        kept.contains("s-98765") && kept.contains("jane-doe-42"),
        "{kept}"
    );
}

/// A rule whose cases hold identifiers; the daemon's log must never show them.
const PII_RULE: &str = r#"const PREFILTER = ["pii_request"];
fn decide(record) {
    let d = record.data;
    if d.type != "pii_request" { return; }
    if d.email != () { throw "cannot handle " + d.email; }
    #{ action: "anonymize_user", key: d.request_id, params: #{ user_id: d.user_id } }
}
"#;
const PII_PASSING: &str = r#"[{"name": "plain", "record": {"data": {"type": "pii_request", "request_id": "r-1", "user_id": "u-1"}},
  "expect": {"action": "anonymize_user", "key": "r-1", "params": {"user_id": "u-1"}}}]"#;
const PII_FAILING: &str = r#"[
  {"name": "wrong key", "record": {"data": {"type": "pii_request", "request_id": "PII-REQ-5521", "user_id": "PII-USER-7731"}},
   "expect": {"action": "anonymize_user", "key": "PII-KEY-0042", "params": {"user_id": "PII-USER-7731"}}},
  {"name": "throws", "record": {"data": {"type": "pii_request", "request_id": "r-2", "user_id": "u-2", "email": "pii.person@example.org"}},
   "expect": {"action": "anonymize_user", "key": "r-2", "params": {"user_id": "PII-PARAM-8812"}}}
]"#;
const PII_SECRETS: [&str; 5] = [
    "PII-REQ-5521",
    "PII-USER-7731",
    "PII-KEY-0042",
    "pii.person@example.org",
    "PII-PARAM-8812",
];

/// A refused reload names the failing cases and how they failed, in the log, `/status` and
/// at startup; the expected and actual decisions (keys, params, thrown messages) only
/// `rules test` shows, to the author.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_logs_no_keys_params_or_values() {
    let kinesis = Kinesalite::start();
    create_stream(&kinesis.client(), "events", 1).await;
    let ws = Workspace::new(&kinesis.endpoint, "events", "http://127.0.0.1:9");
    ws.with_metrics();
    ws.write_rule("pii.rhai", PII_RULE);
    let check = |text: &str, what: &str| {
        for secret in PII_SECRETS {
            assert!(!text.contains(secret), "{what} holds {secret:?}:\n{text}");
        }
        assert!(text.contains("pii / wrong key"), "{what}:\n{text}");
        assert!(
            text.contains("the decisions differ in: key"),
            "{what}:\n{text}"
        );
        assert!(
            text.contains("pii / throws: the rule failed: "),
            "{what}:\n{text}"
        );
    };

    // At startup: refused, exit 2, the same summary.
    ws.write_rule("pii.test.json", PII_FAILING);
    let config = ws.config();
    let (code, _, err) = ws.run(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    check(&err, "the startup error");

    // On a reload: the log and /status.
    ws.write_rule("pii.test.json", PII_PASSING);
    let daemon = ws.start_daemon(&[]);
    let address = metrics_address(&daemon).await;
    ws.write_rule("pii.test.json", PII_FAILING);
    wait_until(
        std::time::Duration::from_secs(30),
        "a refused reload",
        || daemon.stderr().contains("rules reload refused"),
    )
    .await;
    let status: Value = serde_json::from_str(&get(&address, "/status").await.1).unwrap();
    let last_error = status["rules"]["last_error"].as_str().unwrap().to_owned();
    let log_path = daemon.log.clone();
    assert!(daemon.stop().success());
    check(&std::fs::read_to_string(log_path).unwrap(), "the log");
    check(&last_error, "/status");

    // The author sees expected and actual.
    let rules = ws.path("rules");
    let (code, out, _) = ws.run(&["rules", "test", "--rules-dir", rules.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PII-KEY-0042") && out.contains("PII-REQ-5521"),
        "{out}"
    );
}

/// `rules explain` reads its input as the daemon reads records: as bytes (a Latin-1 line
/// too), decoded first; what the daemon cannot decode is said to become a decode_failed
/// dead letter. `-` reads stdin; an empty input says so; a line that holds a field only
/// `capture` writes but is not a captured record is an error naming the line; a plain
/// event with a `data` field of its own is a plain event.
#[test]
fn explain_reads_records_as_the_daemon_does() {
    use base64::Engine;
    use std::io::Write;
    let ws = workspace();
    let rules = ws.path("rules");
    let rules = rules.to_str().unwrap();
    let request = br#"{"type":"privacy_request","tags":["GDPR","Delete User"],"client":"acme","request_id":"r-456","user_id":"u-123"}"#;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(request).unwrap();
    let zipped = encoder.finish().unwrap();
    let captured = |bytes: &[u8]| {
        serde_json::json!({
            "data_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
            "sequence_number": "77",
            "sub_sequence_number": 2,
        })
        .to_string()
    };
    let mut input = Vec::new();
    input.extend(captured(&zipped[..zipped.len() - 6]).as_bytes());
    input.extend(b"\n{\"type\":\"privacy_request\",\"tags\":[\"Delete User\"],\"user_id\":\n");
    input.extend(b"{\"type\":\"privacy_request\",\"tags\":[\"GDPR\",\"Delete User\"],\"client\":\"acme\",\"request_id\":\"r-1\",\"user_id\":\"u-1\",\"name\":\"Jos\xe9\"}\n");
    input.extend(captured(&zipped).as_bytes());
    input.push(b'\n');
    let file = ws.path("input.jsonl");
    std::fs::write(&file, &input).unwrap();
    let explain = |input: &str, stdin: &[u8]| {
        let mut child = command(&ws.config())
            .args(["rules", "explain", "--rules-dir", rules, "--output", "json"])
            .args(["--input", input])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = explain(file.to_str().unwrap(), b"");
    assert_eq!(code, 0, "{err}");
    let records = json_lines(&out);
    assert_eq!(records.len(), 4, "{out}");
    let damaged = trace(&records[0], "acme_gdpr_delete_user");
    assert_eq!(damaged["outcome"], "undecodable", "{damaged}");
    assert_eq!(damaged["kind"], "damaged_compression");
    assert_eq!(records[0]["sub_sequence_number"], 2);
    let cut = trace(&records[1], "acme_gdpr_delete_user");
    assert_eq!(cut["kind"], "json_invalid", "{cut}");
    let latin1 = trace(&records[2], "acme_gdpr_delete_user");
    assert_eq!(latin1["outcome"], "decided", "{latin1}");
    let inflated = trace(&records[3], "acme_gdpr_delete_user");
    assert_eq!(inflated["outcome"], "decided", "{inflated}");
    assert_eq!(inflated["decisions"][0]["decision"]["key"], "r-456");

    // The same from stdin.
    let (code, from_stdin, err) = explain("-", &input);
    assert_eq!(code, 0, "{err}");
    assert_eq!(from_stdin, out);
    // Nothing to explain: said on stderr.
    let (code, out, err) = explain("-", b"\n");
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(err.contains("no records in -"), "{err}");
    // A captured record that is not one: the line named.
    let (code, _, err) = explain("-", b"{\"data\":{}}\n{\"data_base64\":\"!!!\"}\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("-:2: looks like a captured record (it has data_base64)"),
        "{err}"
    );
    // A plain event with a `data` field of its own is a plain event, its whole line the
    // payload; hex that does not decode is an error, not an empty event.
    let plain = br#"{"type":"privacy_request","client":"acme","tags":["GDPR","Delete User"],"request_id":"r-77","user_id":"u-77","data":{"source":"web"}}"#;
    let (code, out, err) = explain("-", plain);
    assert_eq!(code, 0, "{err}");
    let traced: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let rule = trace(&traced, "acme_gdpr_delete_user");
    assert_eq!(rule["outcome"], "decided", "{rule}");
    assert_eq!(rule["decisions"][0]["decision"]["key"], "r-77", "{rule}");
    let (code, _, err) = explain("-", b"{\"sequence_number\":\"1\",\"data_hex\":\"abc\"}\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("-:1:") && err.contains("data_hex"), "{err}");

    // What a rule threw is shown without its control characters.
    ws.write_rule(
        "ctl.rhai",
        "const PREFILTER = [\"ctl_event\"];\nfn decide(record) { throw \"bad \" + record.data.v; }\n",
    );
    let mut child = command(&ws.config())
        .args(["rules", "explain", "--rules-dir", rules, "--input", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"type":"ctl_event","v":"a\u001b[31mb"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(out.contains("bad a\\u{1b}[31mb"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
}

/// The JUnit file holds only what XML 1.0 can (control characters escaped, as on the
/// terminal); a rule below `--min-coverage` is a failing `coverage` testcase, counted in the
/// summary line too; with no rules, the counts still agree; a file that cannot be written
/// still leaves the count line.
#[test]
fn junit_holds_what_xml_can_and_whatever_failed_the_run() {
    let ws = workspace_with_tests();
    let rules = ws.path("rules");
    let junit = ws.path("results.xml");
    let test = |dir: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "rules",
            "test",
            "--rules-dir",
            dir.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ];
        args.extend(extra);
        ws.run(&args)
    };
    let unfit = |c: char| {
        (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    };

    // Control characters in a case's name and in what its rule threw.
    ws.write_rule(
        "ctl.rhai",
        "fn decide(record) {\n    if record.data.t == \"ctl\" { throw \"bad \" + record.data.v; }\n}\n",
    );
    let cases = serde_json::json!([{
        "name": "bell \u{7} escape \u{1b}[31m",
        "record": {"data": {"t": "ctl", "v": "a\u{1}b\u{FFFF}"}},
        "expect": null
    }]);
    ws.write_rule("ctl.test.json", &cases.to_string());
    let (code, out, _) = test(&rules, &[]);
    assert_eq!(code, 1, "{out}");
    let text = std::fs::read_to_string(&junit).unwrap();
    assert!(!text.chars().any(unfit), "{text:?}");
    for escaped in ["\\u{7}", "\\u{1b}", "\\u{1}", "\\u{ffff}"] {
        assert!(text.contains(escaped), "{escaped} not in {text}");
    }
    assert!(!out.chars().any(|c| c != '\n' && unfit(c)), "{out:?}");
    assert!(out.contains("bell \\u{7} escape \\u{1b}[31m"), "{out}");
    let (passed, failed) = counts(&out);
    let (cases, failures, _, _, totals) = read_junit(&junit);
    assert_eq!((cases - failures, failures), (passed, failed));
    assert_eq!(totals, (cases, failures));
    std::fs::remove_file(rules.join("ctl.rhai")).unwrap();
    std::fs::remove_file(rules.join("ctl.test.json")).unwrap();

    // Below --min-coverage: the support rule runs 8 of its 9 statements (88.8%, never
    // shown rounded up to 89%).
    let (code, out, _) = test(&rules, &["--min-coverage", "88.9"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("coverage: support_erasure_verified_only: 88.8% of statements (8 of 9)"),
        "{out}"
    );
    // Three rules are below it (ccpa_delete and strict_erasure too), all cases pass.
    let (passed, failed) = counts(&out);
    assert_eq!(failed, 3, "{out}");
    let (cases, failures, texts, _, totals) = read_junit(&junit);
    assert_eq!((cases - failures, failures), (passed, failed));
    assert_eq!(totals, (cases, failures));
    assert!(
        texts
            .iter()
            .any(|t| t
                .contains("below the minimum coverage of 88.9%: support_erasure_verified_only")),
        "{texts:?}"
    );
    let (code, out, _) = test(&rules, &["--min-coverage", "88.8"]);
    assert_eq!(code, 1, "{out}");
    let fail = out
        .lines()
        .find(|l| l.starts_with("FAIL coverage"))
        .unwrap();
    assert!(!fail.contains("support_erasure_verified_only"), "{fail}");
    let (code, out, _) = test(&rules, &["--min-coverage", "75"]);
    assert_eq!(code, 0, "{out}");

    // No rules at all: one error, counted on both sides.
    let empty = ws.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, out, _) = test(&empty, &[]);
    assert_eq!(code, 1, "{out}");
    let (passed, failed) = counts(&out);
    let (cases, _, _, _, (tests, _)) = read_junit(&junit);
    assert_eq!((cases, tests), (passed + failed, passed + failed), "{out}");
    assert_eq!(failed, 1, "{out}");

    // A JUnit file that cannot be written: the count line first, then the error.
    let (code, out, err) = ws.run(&[
        "rules",
        "test",
        "--rules-dir",
        rules.to_str().unwrap(),
        "--junit",
        ws.path("no/such/dir.xml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
    assert!(err.contains("cannot write"), "{err}");
}
